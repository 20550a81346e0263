"""Checks for homework test cells: each failure is one sentence a student can act on.

A test cell of an assignment calls these instead of a bare ``assert``, so that a wrong answer
reads as ``dx differs from finite differences: rel error 3.2e-01 (allowed 1e-06)`` rather than
as a traceback. Every check raises :class:`AssertionError` with that sentence, which both
nbgrader (a failed cell scores 0) and :mod:`minilora.course.grade` (the sentence becomes the
test's feedback line) understand. The checks return None on purpose: nbgrader reads a number
left as a test cell's last value as *partial credit*, so a check must never leave one.

    expect_array("dx", dx, shape=x.shape)          # an array of the right shape, finite
    expect_close("dx", dx, numerical_grad(f, x), 1e-6, "finite differences")
    expect_equal("q", q, q_ref, "the library's nearest_code")
    expect_raises(ValueError, lambda: layer.merge(), "merging twice")

**NumPy only.** A test cell calls the student's functions through :func:`numpy_only`
(``numpy_only(layernorm_backward)(dout, x, w)``, ``numpy_only(MergeableLoRA)(W0, b, A, B, s)``):
while the student's code runs, every Python function it calls is watched, and one from the
``minilora`` package (the reference implementations) or from any installed package other than
NumPy (SciPy, PyTorch, ...) fails the test with ``layernorm_backward used
minilora.nn.ops.layernorm_backward: ...``. So a wrapper of the library scores zero, however it
reached the library; the standard library and the student's own helpers are fine.

Relative errors are :func:`minilora.gradcheck.rel_error` (largest elementwise
``|a - b| / max(|a|, |b|, floor)``), the same number the chapters print.
"""
from __future__ import annotations

import functools
import os
import signal
import site
import sys
import sysconfig
import warnings

import numpy as np

import minilora
from minilora.gradcheck import numerical_grad, rel_error

__all__ = ["expect_array", "expect_close", "expect_equal", "expect_raises", "numerical_grad",
           "numpy_only", "rel_error"]


def _describe(value) -> str:
    """A short name for what a student returned: 'None', 'a tuple of 2', 'a list', ..."""
    if value is None:
        return "None"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return f"a {type(value).__name__}"


def expect_array(name: str, got, shape=None, finite: bool = True) -> None:
    """``got`` is a NumPy array (of ``shape`` if given) holding only finite numbers."""
    if not isinstance(got, np.ndarray) or got.dtype.kind not in "fiub":
        raise AssertionError(f"{name} should be a NumPy array of numbers, got {_describe(got)}"
                             + (f" of dtype {got.dtype}" if isinstance(got, np.ndarray) else ""))
    if shape is not None and tuple(got.shape) != tuple(shape):
        raise AssertionError(f"{name} has shape {tuple(got.shape)}, expected {tuple(shape)}")
    if finite and got.dtype.kind == "f" and not np.isfinite(got).all():
        n_bad = int((~np.isfinite(got)).sum())
        raise AssertionError(f"{name} holds {n_bad} NaN or inf value(s)")


def expect_close(name: str, got, want, tol: float, against: str) -> None:
    """``got`` has ``want``'s shape and ``rel_error(got, want) < tol``.

    ``against`` names where ``want`` came from ("finite differences", "the library's
    layernorm_backward", "scaling * B @ A"), so the message says what disagreed with what.
    """
    want = np.asarray(want)
    expect_array(name, got, shape=want.shape)
    err = rel_error(got, want)
    if not err < tol:
        raise AssertionError(f"{name} differs from {against}: rel error {err:.1e} "
                             f"(allowed {tol:.0e})")


def expect_equal(name: str, got, want, against: str) -> None:
    """Exact equality of two arrays (integer codes, bytes); the message shows the first miss."""
    want = np.asarray(want)
    expect_array(name, got, shape=want.shape)
    miss = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
    if miss.size:
        i = int(miss[0])
        raise AssertionError(f"{name} differs from {against} at {miss.size} of {want.size} "
                             f"position(s); first at flat index {i}: got "
                             f"{got.reshape(-1)[i].item()!r}, expected "
                             f"{want.reshape(-1)[i].item()!r}")


def expect_raises(exc_types, fn, what: str) -> None:
    """Calling ``fn()`` raises one of ``exc_types``; ``what`` says what the call was."""
    if not isinstance(exc_types, tuple):
        exc_types = (exc_types,)
    names = " or ".join(t.__name__ for t in exc_types)
    try:
        fn()
    except exc_types:
        return
    except Exception as e:  # noqa: BLE001 - any other error is a wrong answer, said plainly
        raise AssertionError(f"{what} should raise {names}, but raised "
                             f"{type(e).__name__}: {e}") from None
    raise AssertionError(f"{what} should raise {names}, but returned normally")


# ----------------------------------------------------------------------------------------------
# NumPy only
# ----------------------------------------------------------------------------------------------
_MINILORA_DIR = os.path.dirname(os.path.abspath(minilora.__file__)) + os.sep
_NUMPY_DIR = os.path.dirname(os.path.abspath(np.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)
#: where installed packages live: code from there (other than NumPy) is not the student's
_PACKAGE_DIRS = tuple(sorted({os.path.abspath(d) + os.sep for d in [
    *site.getsitepackages(), site.getusersitepackages(),
    sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] if d}))
#: C functions of these packages are refused too (their Python wrappers are caught by file)
_REFUSED_MODULES = ("minilora", "scipy", "torch", "cupy", "jax", "tensorflow", "sklearn",
                    "bitsandbytes")


def _refused_file(filename: str) -> bool:
    path = os.path.abspath(filename) if not filename.startswith("<") else filename
    if path == _THIS_FILE:                       # numpy_only's own wrappers (nested calls)
        return False
    if path.startswith(_MINILORA_DIR):
        return True
    return path.startswith(_PACKAGE_DIRS) and not path.startswith(_NUMPY_DIR)


def _c_module(fn) -> str:
    mod = getattr(fn, "__module__", None)
    if not mod:
        owner = getattr(fn, "__self__", None)
        mod = getattr(type(owner), "__module__", "") if owner is not None else ""
    return mod or ""


#: import hooks that installed packages put on sys.meta_path (setuptools, editable installs) run
#: when a student's function imports a standard-library module: not a use of those packages
_IMPORT_HOOKS = ("find_spec", "find_module", "find_distributions", "invalidate_caches",
                 "_get_spec", "path_hook")


def _where(module: str, qualname: str) -> str:
    return module if "<locals>" in qualname or "<" in qualname else f"{module}.{qualname}"


def _trusted_code() -> set:
    """Code that runs *inside* a student's call without the student asking for it: the methods of
    the current output streams (``print`` into Jupyter's or the grader's stream), the warnings
    display hooks and the grader's alarm handler. Everything such code calls is trusted too."""
    funcs = []
    for stream in (sys.stdout, sys.stderr):
        for klass in type(stream).__mro__:
            funcs += [v for v in vars(klass).values() if callable(v)]
    funcs += [warnings.showwarning, warnings.formatwarning]
    if hasattr(signal, "SIGALRM"):
        funcs.append(signal.getsignal(signal.SIGALRM))
    return {getattr(f, "__code__", None) for f in funcs} - {None}


class _Watch:
    """A profile hook that records the first call into code the student may not use."""

    def __init__(self):
        self.refused = None
        self.in_hook = None             # an import hook or trusted frame being run, and its calls
        self.trusted = _trusted_code()

    def __call__(self, frame, event, arg):
        if self.refused is not None:
            return
        if self.in_hook is not None:
            if event == "return" and frame is self.in_hook:
                self.in_hook = None
            return
        if event == "call" and frame.f_code in self.trusted:
            self.in_hook = frame
        elif event == "call" and _refused_file(frame.f_code.co_filename):
            if frame.f_code.co_name in _IMPORT_HOOKS:
                self.in_hook = frame
                return
            self.refused = _where(frame.f_globals.get("__name__", "?"),
                                  getattr(frame.f_code, "co_qualname", frame.f_code.co_name))
        elif event == "c_call" and _c_module(arg).split(".")[0] in _REFUSED_MODULES:
            self.refused = _where(_c_module(arg), getattr(arg, "__name__", "?"))


def _guard(fn, name: str):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        watch, previous = _Watch(), sys.getprofile()
        sys.setprofile(watch)
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            if watch.refused is None:
                raise
            result = None               # the refusal below is the more useful message
        finally:
            sys.setprofile(previous)
        if watch.refused is not None:
            raise AssertionError(
                f"{name} used {watch.refused}: the graded functions may use NumPy only (and "
                f"Python's standard library), not minilora, SciPy or PyTorch; write it yourself")
        return result
    return guarded


def numpy_only(student):
    """``student`` (a function, or a class whose methods are the answer) wrapped so that each call
    fails the test when the student's code calls into minilora or another package but NumPy.

    A class comes back as a subclass of the same name whose own methods (those the class and its
    bases outside NumPy define) are guarded; a function as a guarded function. What the student's
    code returns or raises passes through unchanged.
    """
    if isinstance(student, type):
        guarded = {}
        for klass in reversed(student.__mro__[:-1]):
            for attr, value in vars(klass).items():
                if callable(value) and not isinstance(value, type) and (
                        not attr.startswith("__") or attr in ("__init__", "__call__")):
                    guarded[attr] = _guard(value, f"{student.__name__}.{attr}")
        return type(student.__name__, (student,), {**guarded, "__module__": student.__module__,
                                                   "__qualname__": student.__qualname__})
    if not callable(student):
        raise AssertionError(f"expected a function or class to test, got {_describe(student)}")
    return _guard(student, getattr(student, "__name__", "the function"))
