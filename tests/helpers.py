"""Small helpers shared by the test files (imported as ``from helpers import ...``: pytest puts
``tests/`` on sys.path)."""
import numpy as np

from minilora import backend


def randn(rng, *shape, scale=1.0, dtype="float64"):
    """A standard-normal backend array of ``shape`` times ``scale``, drawn from ``rng``."""
    return backend.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def batch(seed=0, B=2, T=6, V=11):
    """One (inputs, targets) pair of random token ids, (B, T) each, from its own seed."""
    rng = np.random.default_rng(seed)
    return (backend.asarray(rng.integers(0, V, size=(B, T))),
            backend.asarray(rng.integers(0, V, size=(B, T))))


def np_(a):
    """A backend array as NumPy (for assertions)."""
    return backend.to_numpy(a)
