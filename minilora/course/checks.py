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

Relative errors are :func:`minilora.gradcheck.rel_error` (largest elementwise
``|a - b| / max(|a|, |b|, floor)``), the same number the chapters print.
"""
from __future__ import annotations

import numpy as np

from minilora.gradcheck import rel_error


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
