"""The GPU check (minilora/bench/gpu_check.py, `.ci/gpu-check`) runs on the strict CuPy stand-in,
so it cannot rot while no GPU is at hand; on a bare machine it needs only numpy, scipy,
safetensors, pytest and CuPy."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import STANDIN_DIR

from minilora.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setenv("MINILORA_CUPY_STANDIN", str(STANDIN_DIR))


@pytest.mark.slow  # ~5 s: the whole GPU check on the stand-in; CI runs -m slow
def test_the_check_runs_on_the_standin_and_writes_json_and_table(tmp_path, standin):
    lines = []
    result = gpu_check.run_check(tmp_path, quick=True, standin=True, tests=False,
                                 print_fn=lines.append)
    assert result["ok"], result["parts"]
    assert list(result["parts"]) == ["device", "gradcheck", "nf4", "bench"]
    assert all(p["status"] == "ok" for p in result["parts"].values())
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["format"] == gpu_check.FORMAT and saved["standin"] is True
    assert saved["parts"]["gradcheck"]["checks"] >= 100 and not saved["parts"]["gradcheck"]["failed"]
    nf4 = saved["parts"]["nf4"]
    assert nf4["kernel_compiled"] is False  # the stand-in builds no kernel: the fallback compared
    assert len(nf4["cases"]) == 10 and all(all(c.values()) for c in nf4["cases"].values())
    metrics = {t["metric"] for t in saved["targets"]}
    assert {"quantise + dequantise / device copy bandwidth",
            "training step, CuPy speed-up over NumPy"} <= metrics
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| gradcheck | ok |" in table and "| nf4 | ok |" in table
    assert any("GPU check" in line for line in lines)


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, standin, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_nf4", lambda standin, quick: 1 / 0)
    monkeypatch.setattr(gpu_check, "run_gradcheck", lambda standin: {"checks": 0})  # (fast)
    result = gpu_check.run_check(tmp_path, quick=True, standin=True, tests=False,
                                 print_fn=lambda *a: None)
    assert not result["ok"]
    assert result["parts"]["nf4"] == {"status": "failed", "error": "ZeroDivisionError: division "
                                      "by zero", "seconds": result["parts"]["nf4"]["seconds"]}
    assert result["parts"]["bench"]["status"] == "ok"


def test_nf4_cases_cover_the_edges():
    cases = dict(gpu_check.nf4_cases(1024))
    assert cases["normal"].size % 64 != 0  # a ragged last block
    assert not cases["zero block"][64:128].any()
    assert np.isin(np.float32(1.0), cases["midpoints"])


def test_gpu_test_files_are_the_ones_with_cupy_tests():
    run, left = gpu_check.gpu_test_files()
    names = {p.name for p in run + left}
    assert {"test_ops_grad.py", "test_model.py", "test_cupy_strict.py",
            "test_kv_cache.py"} <= names
    assert "test_layering.py" not in names


@pytest.mark.slow
def test_ci_gpu_check_on_a_bare_machine(tmp_path):
    """`.ci/gpu-check --quick --standin` with tqdm and threadpoolctl unimportable (as on a CUDA
    machine that has only numpy, scipy, safetensors, pytest and CuPy): every part passes."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""\
        import importlib.abc, importlib.machinery, sys
        class _Bare(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("tqdm", "threadpoolctl"):
                    spec = importlib.machinery.PathFinder.find_spec(name, path)
                    if spec is not None and "site-packages" in str(spec.origin):
                        raise ImportError(f"{name} is not installed on this machine")
                return None
        sys.meta_path.insert(0, _Bare())
        """))
    env = {k: v for k, v in os.environ.items() if k != "MINILORA_BACKEND"}
    env["PYTHONPATH"] = str(site)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu-check"), "--quick", "--standin",
                        "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tqdm is not installed" in r.stderr and "threadpoolctl is not installed" in r.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert [p["status"] for p in result["parts"].values()] == ["ok"] * 5
    assert result["parts"]["tests"]["counts"]["passed"] >= 1
