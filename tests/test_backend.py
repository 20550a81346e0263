"""The backend switch, and the rule that only backend.py names numpy/cupy in the compute path."""
import ast
import pathlib
import sys

import numpy as np
import pytest

import minilora
from minilora import backend

PKG = pathlib.Path(minilora.__file__).parent
# The compute path: every array operation here goes through minilora.backend.xp, so it runs on
# NumPy or CuPy unchanged. These files must name neither numpy nor a CPU-module alias
# (backend.cpu_module()); code that is CPU by design (init draws, SVD inits, routing, sampling,
# file formats, analysis, plots) lives elsewhere and writes `import numpy as np` plainly.
COMPUTE_PATH = ["nn/ops.py", "nn/ops_fast.py", "nn/layers.py", "model.py", "optim.py", "paged.py",
                "methods/lora/layers.py", "methods/lora/inject.py", "methods/lora/mixed.py",
                "methods/lora/dora.py", "methods/qlora.py", "methods/ia3.py",
                "quant/linear.py", "methods/houlsby.py", "methods/prefix.py", "methods/prompt.py",
                "methods/bitfit.py"]


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_only_backend_imports_cupy_and_nothing_imports_an_autograd_framework():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        mods = set(_imports(path))
        if "cupy" in mods and rel.name != "backend.py":
            offenders.append(f"{rel} imports cupy")
        if mods & {"torch", "jax", "tensorflow"}:
            offenders.append(f"{rel} imports an autograd framework")
    assert not offenders, offenders


@pytest.mark.parametrize("rel", COMPUTE_PATH)
def test_compute_path_names_neither_numpy_nor_a_cpu_alias(rel):
    path = PKG / rel
    assert path.is_file(), f"{rel} moved: update COMPUTE_PATH"
    text = path.read_text()
    assert "numpy" not in set(_imports(path)), f"{rel} imports numpy (use minilora.backend.xp)"
    assert "cpu_module" not in text, f"{rel} uses backend.cpu_module(): move CPU work out of it"


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(backend.BackendError, match="unknown backend 'tensorflow'.*numpy, cupy"):
        backend.set_backend("tensorflow")
    assert backend.get_backend() == "numpy"


def test_cupy_without_cupy_or_gpu_is_one_clear_error():
    try:
        backend.set_backend("cupy")
    except backend.BackendError as e:
        assert "cupy" in str(e).lower() and "numpy" in str(e)
    else:  # a machine with a GPU: then the switch must really take effect
        assert backend.get_backend() == "cupy" and "cupy" in repr(backend.xp)
        backend.set_backend("numpy")


def test_xp_follows_the_switch_after_import():
    import numpy

    from minilora.backend import xp
    assert xp.zeros(1).__class__ is numpy.ndarray
    assert repr(xp) == "<minilora xp -> numpy>"


def test_bad_env_var_is_reported_at_first_use_and_by_the_cli_as_one_line():
    import os
    import subprocess
    import sys
    env = dict(os.environ, MINILORA_BACKEND="nonsense")
    r = subprocess.run([sys.executable, "-c", "import minilora.backend"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # importing never fails
    r = subprocess.run([sys.executable, "-c", "from minilora.backend import xp; xp.zeros(1)"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown backend 'nonsense'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "minilora.cli", "gradcheck"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "minilora: error: MINILORA_BACKEND='nonsense': unknown backend 'nonsense'; "
        "allowed: numpy, cupy"]


def test_cpu_rng_rejects_bad_seeds():
    with pytest.raises(TypeError, match="seed"):
        backend.cpu_rng(1.5)
    g = backend.cpu_rng(3)
    assert backend.cpu_rng(g) is g


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_large_temporaries_reuse_freed_memory_instead_of_fresh_pages():
    """backend.reuse_freed_memory (applied at import): a freed 16 MiB array's pages serve the
    next one, so allocating it again costs no page faults (without it: ~4,000)."""
    import resource
    assert backend.reuse_freed_memory()
    np.ones(1 << 22, dtype=np.float32)  # 16 MiB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        np.ones(1 << 22, dtype=np.float32)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 500
