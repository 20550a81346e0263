"""The array module behind every computation: NumPy by default, CuPy by one switch.

This is the only module of the compute path that names ``numpy`` or ``cupy``. Everything else
writes ``from minilora.backend import xp`` and calls ``xp.matmul``, ``xp.exp``, ... on it.

``xp`` is a small proxy, not the module itself, so that switching the backend *after* other
modules were imported still takes effect everywhere (a plain ``xp = numpy`` binding would be
copied into each importer at import time and never change again).

Switch with the environment variable ``MINILORA_BACKEND=cupy`` (read once, at import) or at run
time with :func:`set_backend`. Arrays made before a switch stay where they are: move them with
:func:`asarray` / :func:`to_numpy`. For tests, ``MINILORA_BACKEND=cupy-strict`` (with
``MINILORA_CUPY_STANDIN`` naming the repository's ``tests/fake_cupy``) runs the CuPy code path on
a strict NumPy-backed stand-in for CuPy that refuses implicit host/device conversions as CuPy does.

Weights are always initialised on the CPU from a seeded ``numpy.random.Generator`` and then moved
with :func:`asarray`, so a NumPy run and a CuPy run start from bit-identical weights.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from typing import Any

import numpy as _np

from minilora.errors import MiniloraError

BACKENDS = ("numpy", "cupy")

_state: dict[str, Any] = {"name": "numpy", "module": _np}


class BackendError(MiniloraError, RuntimeError):
    """Raised when the requested backend cannot be used (unknown name, CuPy missing, no GPU)."""


def _load_cupy():
    try:
        import cupy  # lazy: optional (the gpu extra); the one place cupy is imported
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise BackendError(
            "backend 'cupy' was requested but CuPy cannot be imported "
            f"({type(e).__name__}: {e}). Install it with `pip install -e \".[gpu]\"` "
            "(a cupy-cuda12x wheel) on a machine with an NVIDIA GPU, or use backend 'numpy'."
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise BackendError(
            f"backend 'cupy' was requested but no CUDA device is usable ({type(e).__name__}: {e}). "
            "Use backend 'numpy' on this machine."
        ) from None
    if n < 1:
        raise BackendError("backend 'cupy' was requested but no CUDA device is visible. "
                           "Use backend 'numpy' on this machine.")
    return cupy


def load_cupy_standin(directory=None):
    """Import the strict CuPy stand-in (a NumPy-backed ``cupy`` package kept with the tests).

    ``directory`` (default: the environment variable ``MINILORA_CUPY_STANDIN``) is the folder
    that holds the stand-in's ``cupy/`` package. It is imported under the name ``cupy_strict``,
    so it never shadows a real CuPy in the same process. For tests only: the stand-in runs the
    CuPy code path on the CPU, with CuPy's refusals of implicit host/device conversion.
    """
    if "cupy_strict" in sys.modules:
        return sys.modules["cupy_strict"]
    directory = directory or os.environ.get("MINILORA_CUPY_STANDIN", "").strip()
    init = os.path.join(directory, "cupy", "__init__.py") if directory else ""
    if not init or not os.path.isfile(init):
        raise BackendError(
            "backend 'cupy-strict' needs MINILORA_CUPY_STANDIN = the directory that holds the "
            f"stand-in's cupy/ package (the repository's tests/fake_cupy); got {directory!r}")
    spec = importlib.util.spec_from_file_location(
        "cupy_strict", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cupy_strict"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["cupy_strict"]
        raise
    return module


def set_backend(name: str, module=None) -> None:
    """Make ``name`` ('numpy' or 'cupy') the array module for all later computation.

    ``module`` (tests only) is an array module to use as 'cupy' instead of importing CuPy: the
    strict stand-in from :func:`load_cupy_standin`. The name 'cupy-strict' loads that stand-in
    from ``MINILORA_CUPY_STANDIN``; 'cupy' alone always means the real CuPy and a real GPU.
    """
    if isinstance(name, str) and name.lower() == "cupy-strict" and module is None:
        name, module = "cupy", load_cupy_standin()
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    name = name.lower()
    if module is not None and name != "cupy":
        raise BackendError("a substitute array module can only stand in for 'cupy'")
    if name == "numpy":
        module = _np
    elif module is None:
        module = _load_cupy()
    _state["name"], _state["module"] = name, module
    xp.__dict__.clear()  # the proxy's kept names belonged to the old module


def get_backend() -> str:
    """The name of the active backend: 'numpy' or 'cupy'."""
    return _state["name"]


def is_cupy() -> bool:
    return _state["name"] == "cupy"


class _XP:
    """Forwards attribute access to the active array module (``numpy`` or ``cupy``).

    The first access of a name looks it up on the module and keeps it on the proxy, so later
    ones are a plain attribute read (~30 ns) instead of a forwarding call (~500 ns: a decoding
    step makes ~600 of them); switching the backend forgets them all (:func:`set_backend`).
    """

    def __getattr__(self, attr):
        module = _state["module"]
        value = getattr(module, attr)
        if not isinstance(module, _Unusable):
            self.__dict__[attr] = value
        return value

    def __repr__(self):
        return f"<minilora xp -> {_state['name']}>"


xp = _XP()


def asarray(a, dtype=None):
    """Move ``a`` (NumPy array, CuPy array, list, scalar) onto the active backend."""
    return _state["module"].asarray(a, dtype=dtype)


def to_numpy(a):
    """Return ``a`` as a NumPy array on the CPU (a no-op for NumPy input)."""
    if isinstance(a, _np.ndarray):
        return a
    get = getattr(a, "get", None)  # cupy.ndarray.get() copies device -> host
    if callable(get) and type(a).__module__.startswith("cupy"):  # also the stand-in, cupy_strict
        return get()
    return _np.asarray(a)


def to_scalar(a) -> float:
    """A Python float from a 0-d array of either backend (one device sync on CuPy)."""
    return float(to_numpy(a))


def is_array(a) -> bool:
    """True for an array of the active backend."""
    return isinstance(a, _state["module"].ndarray)


def synchronize() -> None:
    """Wait for queued GPU work (for honest timings); a no-op on NumPy."""
    if is_cupy():
        _state["module"].cuda.Device().synchronize()


# -- managed (unified) memory, for paged optimizer state (minilora/paged.py) --------------------
def managed_zeros(nbytes: int):
    """A zeroed 1-D ``uint8`` buffer of ``nbytes`` bytes for state that may be paged out.

    On CuPy it is CUDA *managed* (unified) memory, ``cudaMallocManaged`` through
    ``cupy.cuda.malloc_managed``, drawn from a dedicated ``cupy.cuda.MemoryPool(malloc_managed)``:
    one virtual address valid on host and device, whose pages the driver migrates on demand and
    evicts to host RAM when the GPU runs out of memory. Only this buffer is managed; CuPy's
    default allocator (weights, activations) is left alone, as bitsandbytes pages only the
    optimizer state. The zero fill runs on the GPU, so its pages start out on the device.

    On NumPy it is an ordinary array (there is no second memory to page to; see
    :class:`minilora.paged.DeviceMemory` for the simulation).
    """
    nbytes = int(nbytes)
    if nbytes < 1:
        raise ValueError(f"a managed buffer needs at least 1 byte, got {nbytes}")
    if not is_cupy():
        return _np.zeros(nbytes, dtype=_np.uint8)
    cupy = _state["module"]
    pool = _state.get("managed_pool")
    if pool is None or _state.get("managed_pool_of") is not cupy:  # one pool per array module
        pool = _state["managed_pool"] = cupy.cuda.MemoryPool(cupy.cuda.malloc_managed)
        _state["managed_pool_of"] = cupy
    a = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=pool.malloc(nbytes))
    a.fill(0)
    return a


def is_managed(a) -> bool:
    """True if ``a`` is a CuPy array in CUDA managed memory (always False on NumPy)."""
    if isinstance(a, _np.ndarray) or not is_cupy():
        return False
    rt = _state["module"].cuda.runtime
    attrs = rt.pointerGetAttributes(a.data.ptr)
    kind = getattr(attrs, "type", getattr(attrs, "memoryType", None))
    return kind is not None and int(kind) == int(getattr(rt, "memoryTypeManaged", 3))  # = 3


def prefetch(a, to_host: bool = False) -> str | None:
    """Ask the driver to migrate the pages of managed array ``a`` to the GPU (or to host RAM).

    ``cudaMemPrefetchAsync`` on the current stream; ``to_host`` uses ``cudaCpuDeviceId`` (-1). It
    is a hint: the results are the same without it, only the page faults move earlier. Returns
    None when issued, or a one-line reason when it was not (NumPy backend; a device or driver
    without prefetch support, e.g. no concurrent managed access), so a caller can stop asking.
    """
    if not is_cupy():
        return "numpy backend: no device memory to prefetch into"
    cupy = _state["module"]
    rt = cupy.cuda.runtime
    if not hasattr(rt, "memPrefetchAsync"):
        return "this CuPy has no cupy.cuda.runtime.memPrefetchAsync"
    dst = -1 if to_host else cupy.cuda.Device().id
    try:
        rt.memPrefetchAsync(a.data.ptr, int(a.nbytes), dst, cupy.cuda.get_current_stream().ptr)
    except Exception as e:  # CUDARuntimeError: not supported on this device/driver
        return f"cudaMemPrefetchAsync failed ({type(e).__name__}: {e})"
    return None


def cpu_rng(seed_or_rng=None):
    """A ``numpy.random.Generator`` (CPU) from an int seed, or the Generator itself.

    Randomness that must agree between backends (weight init, dropout masks, batches) is drawn
    here on the CPU and then moved with :func:`asarray`.
    """
    if isinstance(seed_or_rng, _np.random.Generator):
        return seed_or_rng
    if seed_or_rng is not None and (isinstance(seed_or_rng, bool) or not isinstance(seed_or_rng, int)):
        raise TypeError(f"expected an int seed or a numpy.random.Generator, got {seed_or_rng!r}")
    return _np.random.default_rng(seed_or_rng)


def cpu_module():
    """NumPy, for CPU-side work that is not the compute path (I/O, analysis, plots)."""
    return _np


# -- the C heap under NumPy's large arrays -----------------------------------------------------
#: freed memory glibc keeps for reuse instead of returning it to the system (above a training
#: step's temporaries at the bench's medium size, ~300 MiB)
KEEP_FREED_BYTES = 512 << 20


def reuse_freed_memory() -> bool:
    """Let NumPy's large temporaries reuse freed memory instead of fresh pages (glibc, Linux).

    By default glibc serves an allocation over a threshold (128 KiB at first) with new pages
    from the system and gives them back when it is freed; a training step makes hundreds of
    such temporaries, so every step the kernel zeroes the same pages again: 13,000-16,000 page
    faults a step at the bench's small and medium sizes, 6-12 % of the step's CPU time. Set
    here (``mallopt``): allocations up to 32 MiB come from the heap, and up to
    :data:`KEEP_FREED_BYTES` of freed memory stays there for the next step. Called when this
    module is imported; returns whether it applied (False on other C libraries and systems).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc by that name, or one without mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(
        mallopt(m_trim_threshold, KEEP_FREED_BYTES))


class _Unusable:
    """Stands in for the array module when ``MINILORA_BACKEND`` names a backend that cannot be
    used: importing minilora still works, and the first array operation raises the error."""

    def __init__(self, error: BackendError):
        self.error = error

    def __getattr__(self, attr):
        raise self.error


def check_env() -> None:
    """Raise the :class:`BackendError` of an unusable ``MINILORA_BACKEND`` now (the CLI calls this
    first, so a bad variable is one clear line before any work starts)."""
    if isinstance(_state["module"], _Unusable):
        raise _state["module"].error


reuse_freed_memory()
_env = os.environ.get("MINILORA_BACKEND", "").strip()
if _env:
    try:
        set_backend(_env)
    except BackendError as e:  # reported on first use (or by check_env), not at import
        xp.__dict__.clear()
        _state["name"], _state["module"] = _env, _Unusable(BackendError(
            f"MINILORA_BACKEND={_env!r}: {e}"))
