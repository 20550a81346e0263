"""Shared fixtures: a seeded Generator, and the backends to run on (CuPy only where usable)."""
import numpy as np
import pytest

from minilora import backend


def _cupy_usable() -> bool:
    try:
        backend.set_backend("cupy")
        return True
    except backend.BackendError:
        return False
    finally:
        backend.set_backend("numpy")


CUPY = _cupy_usable()
BACKENDS = ["numpy"] + (["cupy"] if CUPY else [])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=BACKENDS)
def xpb(request):
    """Run the test on each available backend; yields the backend name and restores NumPy."""
    backend.set_backend(request.param)
    try:
        yield request.param
    finally:
        backend.set_backend("numpy")


@pytest.fixture(autouse=True)
def _numpy_by_default():
    backend.set_backend("numpy")
    yield
    backend.set_backend("numpy")
