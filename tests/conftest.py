"""Shared fixtures: a seeded Generator, and the backends to run on.

``xpb`` runs a test on NumPy, on the strict CuPy stand-in (``tests/fake_cupy``: NumPy underneath,
CuPy's refusals of implicit host/device conversion on top) and, where CuPy and a GPU are usable,
on the real CuPy. ``python -m pytest -q -k cupy_strict`` runs only the stand-in cases.
"""
import os
import pathlib

import numpy as np
import pytest

from minilora import backend

STANDIN_DIR = pathlib.Path(__file__).parent / "fake_cupy"


def _cupy_usable() -> bool:
    try:
        backend.set_backend("cupy")
        return True
    except backend.BackendError:
        return False
    finally:
        backend.set_backend("numpy")


CUPY = _cupy_usable()
STANDIN = backend.load_cupy_standin(str(STANDIN_DIR))
BACKENDS = ["numpy", "cupy_strict"] + (["cupy"] if CUPY else [])


def use_backend(name: str) -> None:
    """Switch to 'numpy', 'cupy' (real) or 'cupy_strict' (the stand-in)."""
    if name == "cupy_strict":
        backend.set_backend("cupy", module=STANDIN)
    else:
        backend.set_backend(name)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=BACKENDS)
def xpb(request):
    """Run the test on each available backend; yields the backend name and restores NumPy."""
    use_backend(request.param)
    try:
        yield request.param
    finally:
        backend.set_backend("numpy")


@pytest.fixture(autouse=True)
def _numpy_by_default():
    backend.set_backend("numpy")
    yield
    backend.set_backend("numpy")


def pytest_collection_modifyitems(items):
    """Mark every test that runs on the real CuPy (a ``"cupy"`` parameter: ``xpb``, the strict
    files' ``STRICT``) ``gpu``, beside the tests marked so by hand: ``pytest -m gpu`` is the
    GPU check's selection (minilora.bench.gpu_check)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and v == "cupy" for v in params.values()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True, scope="session")
def _svd_cache_in_a_temporary_folder(tmp_path_factory):
    """`minilora svd` keeps base SVDs in ~/.cache by default: the tests keep theirs apart."""
    old = os.environ.get("MINILORA_SVD_CACHE")
    os.environ["MINILORA_SVD_CACHE"] = str(tmp_path_factory.mktemp("svd-cache"))
    yield
    if old is None:
        os.environ.pop("MINILORA_SVD_CACHE", None)
    else:
        os.environ["MINILORA_SVD_CACHE"] = old
