"""The backend switch, and the rule that only backend.py names numpy/cupy in the compute path."""
import ast
import pathlib

import pytest

import minilora
from minilora import backend

PKG = pathlib.Path(minilora.__file__).parent
# CPU-side modules that may use NumPy directly: data I/O, checkpoints, analysis, plots, the CLI
CPU_SIDE = {"backend.py", "data.py", "checkpoint.py", "cli.py", "bench.py", "tour.py",
            "plots.py", "nbutils.py", "peft_format.py"}
CPU_SIDE_DIRS = {"analysis"}


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_only_backend_imports_cupy_and_compute_path_never_imports_numpy():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        mods = set(_imports(path))
        if "cupy" in mods and rel.name != "backend.py":
            offenders.append(f"{rel} imports cupy")
        cpu_ok = rel.name in CPU_SIDE or (rel.parts[0] in CPU_SIDE_DIRS)
        if "numpy" in mods and not cpu_ok:
            offenders.append(f"{rel} imports numpy (use minilora.backend.xp)")
        if mods & {"torch", "jax", "tensorflow"}:
            offenders.append(f"{rel} imports an autograd framework")
    assert not offenders, offenders


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
    from minilora.backend import xp
    import numpy
    assert xp.zeros(1).__class__ is numpy.ndarray
    assert repr(xp) == "<minilora xp -> numpy>"


def test_env_var_selects_backend_in_a_fresh_process():
    import subprocess, sys, os
    env = dict(os.environ, MINILORA_BACKEND="nonsense")
    r = subprocess.run([sys.executable, "-c", "import minilora.backend"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown backend 'nonsense'" in r.stderr


def test_cpu_rng_rejects_bad_seeds():
    with pytest.raises(TypeError, match="seed"):
        backend.cpu_rng(1.5)
    g = backend.cpu_rng(3)
    assert backend.cpu_rng(g) is g
