"""``cupy.random`` in the strict stand-in: seeded draws that return stand-in arrays.

minilora draws its randomness on the CPU (``minilora.backend.cpu_rng``) and moves it; these are
here so that code which does draw on the device runs, deterministically.
"""
from __future__ import annotations

import numpy as _np

_state = [_np.random.default_rng(0)]


def seed(s=None):
    _state[0] = _np.random.default_rng(s)


def _draw(name):
    def f(*args, **kw):
        from . import _wrap
        return _wrap(_np.asarray(getattr(_state[0], name)(*args, **kw)))
    f.__name__ = name
    return f


standard_normal = _draw("standard_normal")
random = _draw("random")
integers = _draw("integers")
normal = _draw("normal")
uniform = _draw("uniform")


def rand(*shape):
    return random(shape)


def randn(*shape):
    return standard_normal(shape)


def randint(low, high=None, size=None, dtype=int):
    return integers(low, high, size=size, dtype=dtype)
