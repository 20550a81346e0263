"""A strict, NumPy-backed stand-in for CuPy, for running the CuPy code path without a GPU.

It is not CuPy and computes nothing on a device. What it reproduces is CuPy's *contract* at the
host/device boundary, so that code which would fail on a real GPU fails here too:

* ``ndarray`` is a wrapper around a ``numpy.ndarray``, not a subclass (NumPy converts a subclass
  silently, without ever asking it). ``numpy.asarray(x)`` / ``numpy.array(x)`` call
  ``x.__array__``, which raises CuPy's TypeError: "Implicit conversion to a NumPy array is not
  allowed. Please use `.get()` to construct a NumPy array explicitly."
* Every ufunc and function accepts only stand-in arrays and scalars (Python numbers, NumPy
  scalars such as ``numpy.float32(2)``); a ``numpy.ndarray`` argument raises TypeError
  ("Unsupported type <class 'numpy.ndarray'>"), as CuPy's kernels do. That covers mixing in
  arithmetic in both orders (``x + a`` and ``a + x``) and NumPy functions called on stand-in
  arrays (``numpy.exp(x)`` dispatches here through ``__array_ufunc__`` / ``__array_function__``
  and returns a stand-in array, as it does with CuPy).
* Reductions and full integer indexing return 0-d arrays, never NumPy scalars (CuPy's rule), so
  ``x.sum() * numpy_array`` fails here as it would on the GPU.
* ``float(x)`` / ``int(x)`` / ``bool(x)`` / ``format(x)`` work on arrays of ONE element (CuPy
  implements them as ``float(self.get())``: one device sync) and raise TypeError for more
  elements, as NumPy does. The stand-in counts those syncs in ``cupy.cuda.SYNCS``.
* ``x[...] = numpy_array`` with basic indexing raises ValueError (CuPy's ``fill`` path: "non-scalar
  numpy.ndarray cannot be used for fill"); advanced indexing and index arrays accept NumPy
  input, which CuPy copies to the device.
* ``.get()``, ``asnumpy``, ``asarray`` (copies NumPy input, as a host-to-device copy does), the
  ``cuda`` module (``Device``, ``Stream``, ``MemoryPool``, ``malloc_managed``,
  ``set_allocator``, ``runtime.getDeviceCount`` -> 1, ``runtime.pointerGetAttributes``,
  ``runtime.memPrefetchAsync`` that refuses memory that is not managed).
* ``ElementwiseKernel``, ``RawKernel``, ``RawModule``, ``ReductionKernel`` and ``fuse`` raise
  NotImplementedError, so code with a kernel of its own must have (and exercise) a fallback.
* Only names that CuPy has are exposed (``_FUNCTIONS`` below); anything else is an
  AttributeError, and a few keyword arguments only NumPy has (``take(mode=...)``,
  ``sum(where=...)``) are a TypeError.

Load it with ``minilora.backend.set_backend("cupy", module=...)`` (the tests' fixture) or the
environment variable ``MINILORA_BACKEND=cupy-strict`` with ``MINILORA_CUPY_STANDIN`` naming the
directory that holds this package.
"""
from __future__ import annotations

import builtins as _builtins
import copy as _copy
import numbers as _numbers
import sys as _sys
import weakref as _weakref

import numpy as _np

from . import cuda

STANDIN = True  # real CuPy has no such attribute; tests use it to tell the two apart
__version__ = "0.0.0-strict-standin"

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


def _unsupported(v):
    return TypeError(f"Unsupported type {type(v)} (the strict CuPy stand-in refuses a "
                     "host array where CuPy needs a device array: move it with "
                     "cupy.asarray / minilora.backend.asarray)")


# ------------------------------------------------------------------------------------------
# wrapping and unwrapping at the boundary
# ------------------------------------------------------------------------------------------

def _wrap(r):
    """NumPy results -> stand-in arrays (scalars become 0-d arrays, as CuPy returns them)."""
    t = type(r)
    if t is _np.ndarray:
        out = _new(ndarray)
        out._a = r
        if r.base is None:               # owns its memory: views will name it as their base
            _owners[id(r)] = out
        return out
    if isinstance(r, _np.generic) and not isinstance(r, (_np.str_, _np.bytes_, _np.void)):
        return _wrap(_np.asarray(r))
    if t is tuple or t is list:
        return t([_wrap(x) for x in r])
    if isinstance(r, _np.ndarray):  # a NumPy subclass (np.matrix, masked arrays): not in CuPy
        raise TypeError(f"the strict CuPy stand-in got a {t} from NumPy")
    return r


_new = object.__new__
_owners: _weakref.WeakValueDictionary = _weakref.WeakValueDictionary()  # id(owner) -> wrapper


def _is_scalar(v) -> bool:
    return isinstance(v, (_numbers.Number, _np.generic)) and not isinstance(v, _np.ndarray)


def _deep(v):
    """Arguments of functions: sequences of arrays are unwrapped too; NumPy arrays refused."""
    t = type(v)
    if t is ndarray:
        return v._a
    if t is tuple or t is list:
        return t([_deep(x) for x in v])
    if isinstance(v, _np.ndarray):
        raise _unsupported(v)
    return v


def _ufunc_arg(v):
    if type(v) is ndarray:
        return v._a
    if v is None or _is_scalar(v):
        return v
    raise _unsupported(v)


def _out_arg(o):
    if o is None:
        return None
    if not isinstance(o, ndarray):
        raise TypeError(f"out must be a cupy.ndarray; got {type(o)}")
    return o._a


def _ufunc_kwargs(kw):
    kw = dict(kw)
    if kw.get("out") is not None:
        out = kw["out"]
        kw["out"] = tuple(_out_arg(o) for o in out) if isinstance(out, tuple) else _out_arg(out)
    if "where" in kw and not isinstance(kw["where"], bool):
        kw["where"] = _ufunc_arg(kw["where"])
    return kw


def _index(key):
    """An index: stand-in arrays unwrap; NumPy arrays and lists are allowed (CuPy copies them)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    return key


def _is_advanced(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return _builtins.any(isinstance(k, (ndarray, _np.ndarray, list, bool, _np.bool_))
               for k in keys)


# ------------------------------------------------------------------------------------------
# ufuncs
# ------------------------------------------------------------------------------------------

class ufunc:
    """A CuPy-style universal function over stand-in arrays (NumPy's ufunc underneath)."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout = np_ufunc.nin, np_ufunc.nout

    def __repr__(self):
        return f"<ufunc 'cupy.{self.__name__}' (strict stand-in)>"

    def __call__(self, *args, **kw):
        return _wrap(self._u(*[_ufunc_arg(a) for a in args], **(_ufunc_kwargs(kw) if kw else kw)))

    def _method(self, name, *args, **kw):
        return _wrap(getattr(self._u, name)(*(_ufunc_arg(a) for a in args),
                                            **_ufunc_kwargs(kw)))

    def reduce(self, a, *args, **kw):
        return self._method("reduce", a, *args, **kw)

    def accumulate(self, a, *args, **kw):
        return self._method("accumulate", a, *args, **kw)

    def outer(self, a, b, **kw):
        return self._method("outer", a, b, **kw)

    def reduceat(self, a, indices, *args, **kw):
        return _wrap(self._u.reduceat(_ufunc_arg(a), _deep(indices), *args,
                                      **_ufunc_kwargs(kw)))

    def at(self, a, indices, b=None):
        """``ufunc.at`` (CuPy >= 13): indices may be arrays of either kind, ``a`` must not."""
        if not isinstance(a, ndarray):
            raise _unsupported(a)
        args = (_index(indices),) if b is None else (_index(indices), _ufunc_arg(b))
        self._u.at(a._a, *args)


# ------------------------------------------------------------------------------------------
# the array
# ------------------------------------------------------------------------------------------

def _binary(name, reflected=False):
    u = getattr(_np, name)

    def op(self, other):
        if type(other) is ndarray:
            o = other._a
        elif _is_scalar(other):
            o = other
        elif isinstance(other, (list, tuple, _np.ndarray)):
            raise _unsupported(other)
        else:
            return NotImplemented
        return _wrap(u(o, self._a) if reflected else u(self._a, o))
    return op


def _inplace(name):
    u = getattr(_np, name)

    def op(self, other):
        u(self._a, _ufunc_arg(other), out=self._a)
        return self
    return op


class _Borrowed:
    """The memory under an array the stand-in did not allocate itself (plain device memory)."""

    def __init__(self, ptr: int, size: int):
        self.ptr, self.size = ptr, size


class ndarray:
    """A device array, in the stand-in: a NumPy array that refuses implicit host conversion."""

    __slots__ = ("__weakref__", "_a", "_owner")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if isinstance(shape, _numbers.Integral):
            shape = (int(shape),)
        shape = tuple(int(s) for s in shape)
        dtype = _np.dtype(dtype)
        if memptr is None:
            self._a = _np.empty(shape, dtype=dtype, order=order)
            _owners[id(self._a)] = self
            return
        count = int(_np.prod(shape, dtype=_np.int64))
        buf = memptr.mem.buffer
        if memptr.offset + count * dtype.itemsize > buf.nbytes:
            raise ValueError("memptr is too small for the requested shape and dtype")
        a = _np.frombuffer(buf, dtype=dtype, count=count, offset=memptr.offset)
        if strides is not None:
            a = _np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)
        self._a = a.reshape(shape)

    # -- the boundary -------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, uf, method, *inputs, **kwargs):
        args = [_ufunc_arg(x) for x in inputs]
        return _wrap(getattr(uf, method)(*args, **_ufunc_kwargs(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        f = globals().get(func.__name__)
        if f is None or func.__module__.split(".")[0] != "numpy" or not callable(f):
            return NotImplemented
        return f(*args, **kwargs)

    def get(self, stream=None, order="C", out=None, blocking=True):
        """Copy to the host: a new ``numpy.ndarray`` (or into ``out``)."""
        cuda._sync()
        if out is not None:
            out[...] = self._a
            return out
        return _np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        """Copy host array ``arr`` (same shape) into this array."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray; got {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError(f"shape mismatch: {arr.shape} != {self._a.shape}")
        self._a[...] = arr

    # -- attributes -------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))
    device = property(lambda self: cuda.Device(0))

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    @property
    def base(self):
        """The array that owns the memory (one stable object, as in CuPy), or None."""
        root = self._a
        while isinstance(root.base, _np.ndarray):
            root = root.base
        if root is self._a:
            return None
        owner = _owners.get(id(root))
        if owner is None or owner._a is not root:
            owner = _wrap(root)
            _owners[id(root)] = owner
        self._owner = owner          # keeps it alive as long as this view
        return owner

    @property
    def data(self):
        ptr = self._a.__array_interface__["data"][0]
        return cuda.MemoryPointer(_Borrowed(ptr, self._a.nbytes), 0)

    # -- conversion to Python scalars (a device sync on CuPy) ---------------------------------
    def _scalar(self, kind):
        if self._a.size != 1:
            raise TypeError(f"only length-1 arrays can be converted to Python scalars "
                            f"(got {kind}() of an array of shape {self._a.shape})")
        cuda._sync()
        return self._a.reshape(()).item()

    def __float__(self):
        return float(self._scalar("float"))

    def __int__(self):
        return int(self._scalar("int"))

    def __complex__(self):
        return complex(self._scalar("complex"))

    def __bool__(self):
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is "
                             "ambiguous. Use a.any() or a.all()")
        return bool(self._scalar("bool"))

    def __format__(self, spec):
        if self._a.ndim == 0 or self._a.size == 1:
            return format(self._scalar("format"), spec)
        return format(str(self), spec)

    def item(self, *args):
        cuda._sync()
        return self._a.item(*args)

    def tolist(self):
        cuda._sync()
        return self._a.tolist()

    def __repr__(self):
        return repr(self._a).replace("array(", "array(", 1)

    def __str__(self):
        return str(self._a)

    # -- sequence protocol ------------------------------------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, _np.ndarray) and value.ndim > 0 and not _is_advanced(key):
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        if isinstance(value, (list, tuple)) and not _is_advanced(key):
            raise _unsupported(value)
        self._a[_index(key)] = value._a if isinstance(value, ndarray) else value

    def __copy__(self):
        return _wrap(self._a.copy())

    def __deepcopy__(self, memo):
        return _wrap(_copy.deepcopy(self._a, memo))

    def __reduce__(self):
        raise TypeError("the strict CuPy stand-in does not pickle arrays")

    # -- methods ----------------------------------------------------------------------------
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return _wrap(self._a.astype(dtype, order=order, copy=copy))

    def view(self, dtype=None):
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype))

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _wrap(self._a.reshape(shape, order=order))

    def fill(self, value):
        if isinstance(value, _np.ndarray):
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        if isinstance(value, ndarray):
            raise TypeError("fill takes a scalar; got a cupy.ndarray")
        self._a.fill(value)

    def copy(self, order="C"):
        return _wrap(self._a.copy(order=order))

    def __getattr__(self, name):
        if name not in _METHODS:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} "
                                 "(not in CuPy, or not modelled by the strict stand-in)")
        meth = getattr(self._a, name)

        def call(*args, **kw):
            if kw:
                _check_kwargs(name, kw)
                kw = {k: _deep(v) for k, v in kw.items()}
            return _wrap(meth(*_deep(args), **kw))
        call.__name__ = name
        return call

    # -- operators ---------------------------------------------------------------------------
    __add__, __radd__ = _binary("add"), _binary("add", True)
    __sub__, __rsub__ = _binary("subtract"), _binary("subtract", True)
    __mul__, __rmul__ = _binary("multiply"), _binary("multiply", True)
    __truediv__, __rtruediv__ = _binary("true_divide"), _binary("true_divide", True)
    __floordiv__, __rfloordiv__ = _binary("floor_divide"), _binary("floor_divide", True)
    __mod__, __rmod__ = _binary("remainder"), _binary("remainder", True)
    __pow__, __rpow__ = _binary("power"), _binary("power", True)
    __matmul__, __rmatmul__ = _binary("matmul"), _binary("matmul", True)
    __and__, __rand__ = _binary("bitwise_and"), _binary("bitwise_and", True)
    __or__, __ror__ = _binary("bitwise_or"), _binary("bitwise_or", True)
    __xor__, __rxor__ = _binary("bitwise_xor"), _binary("bitwise_xor", True)
    __lshift__, __rlshift__ = _binary("left_shift"), _binary("left_shift", True)
    __rshift__, __rrshift__ = _binary("right_shift"), _binary("right_shift", True)
    __lt__, __le__ = _binary("less"), _binary("less_equal")
    __gt__, __ge__ = _binary("greater"), _binary("greater_equal")
    __eq__, __ne__ = _binary("equal"), _binary("not_equal")
    __iadd__, __isub__ = _inplace("add"), _inplace("subtract")
    __imul__, __itruediv__ = _inplace("multiply"), _inplace("true_divide")
    __ifloordiv__, __imod__ = _inplace("floor_divide"), _inplace("remainder")
    __ipow__ = _inplace("power")
    __iand__, __ior__, __ixor__ = (_inplace("bitwise_and"), _inplace("bitwise_or"),
                                   _inplace("bitwise_xor"))
    __ilshift__, __irshift__ = _inplace("left_shift"), _inplace("right_shift")

    def __neg__(self):
        return _wrap(-self._a)

    def __pos__(self):
        return _wrap(+self._a)

    def __abs__(self):
        return _wrap(_np.absolute(self._a))

    def __invert__(self):
        return _wrap(~self._a)


# Methods of cupy.ndarray (those NumPy also has, with the same meaning) that the stand-in forwards.
_METHODS = frozenset("""
all any argmax argmin argpartition argsort clip compress conj conjugate cumprod cumsum diagonal
dot flatten max mean min nonzero partition prod ptp put ravel repeat round sort squeeze std sum
swapaxes take tobytes trace transpose var choose
""".split())  # noqa: SIM905


# ------------------------------------------------------------------------------------------
# the module's functions
# ------------------------------------------------------------------------------------------

def asarray(a, dtype=None, order=None, *, blocking=False):
    """To the device: a stand-in array stays as it is; NumPy input / lists / scalars are copied."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    if isinstance(a, (list, tuple)):
        a = _deep(_host_list(a))
    return _wrap(_np.array(a, dtype=dtype, order=order or "K", copy=True))


def _host_list(a):
    """Lists of stand-in 0-d/n-d arrays are allowed in cupy.array (CuPy stacks them)."""
    if isinstance(a, (list, tuple)):
        return type(a)(_host_list(x) for x in a)
    if isinstance(a, ndarray):
        return a
    return a


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        r = obj._a.astype(dtype or obj.dtype, order=order, copy=bool(copy))
    else:
        r = _np.array(_deep(obj) if isinstance(obj, (list, tuple)) else obj, dtype=dtype,
                      order=order, copy=True)
    if ndmin > r.ndim:
        r = r.reshape((1,) * (ndmin - r.ndim) + r.shape)
    return _wrap(r)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        return asarray(a, dtype=dtype)
    return _wrap(_np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """Device -> host. NumPy input and scalars pass through ``numpy.asarray``, as in CuPy."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    r = _np.asarray(a, order=order)
    if out is not None:
        out[...] = r
        return out
    return r


def get_array_module(*args):
    return _sys.modules[__name__] if _builtins.any(isinstance(a, ndarray) for a in args) else _np


def isscalar(x):
    return _np.isscalar(x)


def _kernel_unavailable(kind):
    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError(
                f"cupy.{kind} cannot be compiled by the strict CuPy stand-in (no GPU); the code "
                "must fall back to array functions when the kernel is unavailable")
    _Unavailable.__name__ = kind
    return _Unavailable


ElementwiseKernel = _kernel_unavailable("ElementwiseKernel")
RawKernel = _kernel_unavailable("RawKernel")
RawModule = _kernel_unavailable("RawModule")
ReductionKernel = _kernel_unavailable("ReductionKernel")


def fuse(*args, **kwargs):
    raise NotImplementedError("cupy.fuse is not available in the strict CuPy stand-in")


# (The loops below define module-level names such as abs, any, max, round and sum, which hide
# the builtins inside this module: code above reaches the builtins through _builtins.)
# Types, constants and functions CuPy exposes under the same names as NumPy. A name missing
# here is an AttributeError, so code cannot lean on a NumPy-only function by accident.
_PASSTHROUGH = """
bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 complex64
complex128 intp uintp byte ubyte short ushort intc uintc longlong ulonglong half single double
dtype finfo iinfo integer floating number generic signedinteger unsignedinteger inexact
complexfloating issubdtype can_cast result_type promote_types min_scalar_type common_type
newaxis inf nan pi e euler_gamma little_endian
""".split()  # noqa: SIM905

_UFUNCS = """
add subtract multiply divide true_divide floor_divide power negative positive remainder mod
fmod absolute abs fabs sign exp exp2 expm1 log log2 log10 log1p sqrt square cbrt reciprocal sin
cos tan arcsin arccos arctan arctan2 sinh cosh tanh arcsinh arccosh arctanh hypot deg2rad
rad2deg degrees radians maximum minimum fmax fmin greater greater_equal less less_equal equal
not_equal logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
bitwise_not invert left_shift right_shift isfinite isinf isnan signbit copysign nextafter floor
ceil trunc rint heaviside logaddexp logaddexp2 clip conj conjugate
""".split()  # noqa: SIM905

_FUNCTIONS = """
empty empty_like zeros zeros_like ones ones_like full full_like arange linspace logspace eye
identity diag diagflat tri tril triu meshgrid reshape ravel transpose swapaxes moveaxis
rollaxis squeeze expand_dims broadcast_to broadcast_arrays atleast_1d atleast_2d atleast_3d
concatenate stack vstack hstack dstack column_stack split array_split hsplit vsplit tile repeat
flip fliplr flipud roll rot90 pad copyto copy take take_along_axis put put_along_axis choose
compress diagonal where nonzero flatnonzero argwhere searchsorted sort argsort lexsort
partition argpartition unique sum prod cumsum cumprod mean std var average median max min amax
amin argmax argmin ptp nansum nanmean nanmax nanmin nanargmax nanargmin all any count_nonzero
allclose isclose array_equal matmul dot vdot inner outer tensordot einsum kron trace around
round clip nan_to_num interp bincount histogram diff cross convolve sign isfinite isinf isnan
real imag angle cov corrcoef may_share_memory shares_memory result_type size ndim shape
""".split()  # noqa: SIM905


# Keyword arguments NumPy takes and CuPy's function of the same name does not.
_NUMPY_ONLY_KWARGS = {
    "take": ("mode",),
    **{r: ("where", "initial") for r in ("sum", "prod", "max", "min", "amax", "amin", "mean",
                                         "all", "any")},
}


def _check_kwargs(name, kw):
    bad = [k for k in _NUMPY_ONLY_KWARGS.get(name, ()) if k in kw]
    if bad:
        raise TypeError(f"cupy.{name}() got an unexpected keyword argument {bad[0]!r} "
                        "(NumPy has it, CuPy does not)")


def _function(name):
    f = getattr(_np, name)

    def call(*args, **kw):
        if kw:
            _check_kwargs(name, kw)
            kw = {k: _deep(v) for k, v in kw.items()}
        return _wrap(f(*_deep(args), **kw))
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"cupy.{name} (strict stand-in: numpy.{name} on the wrapped arrays)"
    return call


for _n in _PASSTHROUGH:
    if _n not in globals() and hasattr(_np, _n):
        globals()[_n] = getattr(_np, _n)
for _n in _UFUNCS:
    if _n not in globals() and isinstance(getattr(_np, _n, None), _np.ufunc):
        globals()[_n] = ufunc(getattr(_np, _n))
for _n in _FUNCTIONS:
    if _n not in globals() and hasattr(_np, _n):
        globals()[_n] = _function(_n)
del _n

from . import random  # noqa: F401  (cupy.random)
