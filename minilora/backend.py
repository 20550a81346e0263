"""The array module behind every computation: NumPy by default, CuPy by one switch.

This is the only module of the compute path that names ``numpy`` or ``cupy``. Everything else
writes ``from minilora.backend import xp`` and calls ``xp.matmul``, ``xp.exp``, ... on it.

``xp`` is a small proxy, not the module itself, so that switching the backend *after* other
modules were imported still takes effect everywhere (a plain ``xp = numpy`` binding would be
copied into each importer at import time and never change again).

Switch with the environment variable ``MINILORA_BACKEND=cupy`` (read once, at import) or at run
time with :func:`set_backend`. Arrays made before a switch stay where they are: move them with
:func:`asarray` / :func:`to_numpy`.

Weights are always initialised on the CPU from a seeded ``numpy.random.Generator`` and then moved
with :func:`asarray`, so a NumPy run and a CuPy run start from bit-identical weights.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import os
from typing import Any

import numpy as _np

BACKENDS = ("numpy", "cupy")

_state: dict[str, Any] = {"name": "numpy", "module": _np}


class BackendError(RuntimeError):
    """Raised when the requested backend cannot be used (unknown name, CuPy missing, no GPU)."""


def _load_cupy():
    try:
        import cupy  # noqa: the one place cupy is imported
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


def set_backend(name: str) -> None:
    """Make ``name`` ('numpy' or 'cupy') the array module for all later computation."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    name = name.lower()
    module = _np if name == "numpy" else _load_cupy()
    _state["name"], _state["module"] = name, module


def get_backend() -> str:
    """The name of the active backend: 'numpy' or 'cupy'."""
    return _state["name"]


def is_cupy() -> bool:
    return _state["name"] == "cupy"


class _XP:
    """Forwards attribute access to the active array module (``numpy`` or ``cupy``)."""

    __slots__ = ()

    def __getattr__(self, attr):
        return getattr(_state["module"], attr)

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
    if callable(get) and type(a).__module__.startswith("cupy"):
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


_env = os.environ.get("MINILORA_BACKEND", "").strip()
if _env:
    set_backend(_env)
