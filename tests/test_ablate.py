"""The sweep engine: cells keyed by their configuration, atomic records, skipping, re-running
corrupt records, resuming after a kill, serial vs Dask, failing cells, the ΔW summary."""
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.cli import main
from minilora.config import GPTConfig
from minilora.data import CharTokenizer
from minilora.errors import UsageError
from minilora.experiments.ablate import run_sweep
from minilora.experiments.ablate_records import (
    LINEARS,
    cell_key,
    comparable,
    grid,
    intruder_count,
    load_records,
    make_cell,
    read_record,
    summary_rows,
)
from minilora.methods.lora import lora_scaling, read_adapter
from minilora.model import GPT

TINY = dict(batch_size=2, block_size=32, eval_batches=2)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    save_checkpoint(path, GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32), rng=0),
                    CharTokenizer.default())
    return str(path)


def _cells(base, steps=3, seeds=(0,), full=True):
    return grid(["milton"], [1, 2], [("q", "v"), "all-linear"], list(seeds), steps, full=full,
                base=base, **TINY)


def _sweep(cells, tmp_path, name="out", **kw):
    kw.setdefault("serial", True)
    logs = []
    res = run_sweep(cells, tmp_path / name, tmp_path / f"{name}-runs", progress=False,
                    log=logs.append, **kw)
    return res, logs


def test_cell_key_is_the_configuration():
    a = make_cell("milton", "lora", 4, ("v", "q"), seed=1, steps=10)
    b = make_cell("milton", "lora", 4, ("q", "v"), seed=1, steps=10)
    assert a == b and cell_key(a) == cell_key(b)           # one order per target set
    assert a["lora_alpha"] == 8.0                           # alpha = 2r by default
    keys = {cell_key(make_cell(r=r, seed=s)) for r in (1, 2) for s in (0, 1)}
    assert len(keys) == 4                                   # every field is in the key
    assert make_cell(targets="all-linear")["targets"] == list(LINEARS)
    full = make_cell(method="full", r=None, targets=None)
    assert full["r"] is None and full["targets"] is None
    for bad in (dict(r=0), dict(targets=("q", "x")), dict(task="chess"), dict(seed=-1),
                dict(steps=0), dict(lr=2.0)):
        with pytest.raises(UsageError):
            make_cell(**bad)


def test_records_hold_the_result_and_a_correct_delta_w_summary(tiny_base, tmp_path):
    cells = _cells(tiny_base)
    res, _ = _sweep(cells, tmp_path)
    assert len(res["done"]) == len(cells) == 5 and not res["failed"]
    recs = {r["key"]: r for r in load_records(tmp_path / "out")}
    base = {n: np.asarray(p, np.float64) for n, p in load_checkpoint(tiny_base)[0].named_parameters()}
    for c in cells:
        rec = recs[cell_key(c)]
        assert rec["config"] == c and np.isfinite(rec["result"]["task_metric"])
        wdir = tmp_path / "out-runs" / rec["key"]
        if c["method"] == "lora":
            arrays, cfg = read_adapter(wdir / "adapter.safetensors")
            assert set(rec["delta_w"]) == {n[:-7] for n in arrays if n.endswith(".lora_A")}
            name = "blocks.1.attn.v"
            B = np.asarray(arrays[name + ".lora_B"], np.float64)
            dW = lora_scaling(cfg.r, cfg.lora_alpha) * (B @ np.asarray(arrays[name + ".lora_A"],
                                                                       np.float64))
        else:
            assert len(rec["delta_w"]) == 2 * len(LINEARS)
            name = "blocks.1.mlp.up"
            tuned = {n: np.asarray(p, np.float64) for n, p in
                     load_checkpoint(wdir / "model.safetensors")[0].named_parameters()}
            dW = tuned[name + ".weight"] - base[name + ".weight"]
        s = np.linalg.svd(dW, compute_uv=False)[:len(rec["delta_w"][name]["singular_values"])]
        summ = rec["delta_w"][name]
        np.testing.assert_allclose(summ["singular_values"], s, rtol=1e-5, atol=1e-12)
        assert summ["fro"] == pytest.approx(np.linalg.norm(dW), rel=1e-5)
        # intruder similarities: |cos| of the top vectors of W0 + ΔW against W0's, in [0, 1]
        sims = np.asarray(summ["intruder_similarities"])
        U0 = np.linalg.svd(base[name + ".weight"])[0]
        Ut = np.linalg.svd(base[name + ".weight"] + dW)[0]
        np.testing.assert_allclose(sims, np.abs(U0.T @ Ut[:, :sims.size]).max(axis=0), atol=1e-5)
        assert intruder_count(summ, 1.01, sims.size) == sims.size
        assert intruder_count(summ, 1e-9, sims.size) == 0


def test_rerun_skips_finished_cells_and_reruns_a_corrupt_or_partial_record(tiny_base, tmp_path):
    cells = _cells(tiny_base)
    _sweep(cells, tmp_path)
    cdir = tmp_path / "out" / "cells"
    before = {p.name: (p.stat().st_mtime_ns, json.loads(p.read_text())) for p in cdir.glob("*.json")}
    res, logs = _sweep(cells, tmp_path)
    assert res["done"] == [] and len(res["skipped"]) == len(cells)
    assert {p.name: p.stat().st_mtime_ns for p in cdir.glob("*.json")} == \
        {k: v[0] for k, v in before.items()}                  # nothing rewritten
    k1, k2, k3 = (cell_key(c) for c in cells[:3])
    (cdir / f"{k1}.json").write_text('{"format": 1, "key": "')            # cut short
    rec = json.loads((cdir / f"{k2}.json").read_text())
    del rec["delta_w"]
    (cdir / f"{k2}.json").write_text(json.dumps(rec))                      # partial
    rec = json.loads((cdir / f"{k3}.json").read_text())
    rec["config"]["seed"] = 7
    (cdir / f"{k3}.json").write_text(json.dumps(rec))                      # mismatched
    assert read_record(cdir / f"{k1}.json")[0] is None
    res, logs = _sweep(cells, tmp_path)
    assert sorted(res["done"]) == sorted([k1, k2, k3]) and len(res["skipped"]) == len(cells) - 3
    text = "\n".join(logs)
    assert f"cell {k1}: unreadable" in text and f"cell {k2}: partial" in text
    assert f"cell {k3}: its key does not match" in text
    for k in (k1, k2, k3):     # training is deterministic: the same record again
        assert comparable(json.loads((cdir / f"{k}.json").read_text())) == \
            comparable(before[f"{k}.json"][1])


def test_a_failing_cell_does_not_lose_the_others(tiny_base, tmp_path):
    cells = _cells(tiny_base, full=False)
    bad = cell_key(cells[1])
    (tmp_path / "out-runs").mkdir()
    (tmp_path / "out-runs" / bad).write_text("a file where the cell's run directory goes")
    res, logs = _sweep(cells, tmp_path)
    assert list(res["failed"]) == [bad] and len(res["done"]) == len(cells) - 1
    assert "\n" not in res["failed"][bad] and "OutputError" in res["failed"][bad]
    assert any(bad in line and "lora r=" in line for line in logs)
    assert len(load_records(tmp_path / "out")) == len(cells) - 1
    (tmp_path / "out-runs" / bad).unlink()                  # fixed: the re-run does only that cell
    res, _ = _sweep(cells, tmp_path)
    assert res["done"] == [bad] and not res["failed"]


def test_serial_and_dask_give_identical_records(tiny_base, tmp_path):
    pytest.importorskip("distributed")
    cells = _cells(tiny_base)
    _sweep(cells, tmp_path, "serial")
    res, _ = _sweep(cells, tmp_path, "dask", serial=False, workers=2, blas_threads=1)
    assert len(res["done"]) == len(cells) and not res["failed"]
    a = {r["key"]: r for r in load_records(tmp_path / "serial")}
    b = {r["key"]: r for r in load_records(tmp_path / "dask")}
    assert a.keys() == b.keys() == {cell_key(c) for c in cells}
    for k, rec in a.items():
        assert comparable(rec) == comparable(b[k])
        assert b[k]["run"]["blas_threads"] == 1 and b[k]["run"]["pid"] != os.getpid()


@pytest.mark.slow  # an end-to-end run; CI runs -m slow
def test_killed_sweep_resumes_to_the_same_records(tiny_base, tmp_path):
    cells = _cells(tiny_base, steps=25, seeds=(0, 1))
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent("""\
        import json, sys
        from minilora.experiments.ablate import (run_sweep)
        if __name__ == "__main__":
            run_sweep(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], serial=True,
                      progress=False)
        """))
    out, runs = tmp_path / "killed", tmp_path / "killed-runs"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cells), str(out), str(runs)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "cells").glob("*.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_saved = len(load_records(out))
    assert 1 <= n_saved < len(cells), "the kill should land mid-sweep"
    res = run_sweep(cells, out, runs, serial=True, progress=False, log=lambda *_: None)
    assert len(res["skipped"]) == n_saved and len(res["done"]) == len(cells) - n_saved
    _sweep(cells, tmp_path, "reference")
    ref = {r["key"]: comparable(r) for r in load_records(tmp_path / "reference")}
    assert {r["key"]: comparable(r) for r in load_records(out)} == ref


def test_summary_rows_average_over_seeds(tiny_base, tmp_path):
    cells = grid(["milton"], [2], [("q", "v")], [0, 1], 3, base=tiny_base, **TINY)
    _sweep(cells, tmp_path)
    recs = load_records(tmp_path / "out")
    (row,) = summary_rows(recs)
    vals = [r["result"]["task_metric"] for r in recs]
    assert row["seeds"] == 2 and row["targets"] == "q,v" and row["r"] == 2
    assert row["task_metric"] == pytest.approx(statistics.fmean(vals))
    assert row["task_metric_std"] == pytest.approx(statistics.stdev(vals))


@pytest.mark.parametrize("argv, flag", [
    (["--ranks", "1,x", "--targets", "q"], "--ranks"),
    (["--ranks", "1", "--targets", "q,z"], "--targets"),
    (["--pairs", "q:8;q,v"], "--pairs"),
    (["--ranks", "1", "--targets", "q", "--serial", "--scheduler", "tcp://x:1"], "--serial"),
    (["--ranks", "1", "--targets", "q", "--tasks", "chess"], "--tasks"),
    (["--ranks", "1", "--targets", "q", "--base", "/nonexistent/base.safetensors"], "--base"),
    (["--ranks", "1"], "--ranks needs --targets"),
])
def test_cli_refuses_bad_flags_in_one_line(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) if argv[:2] == ["--ranks", "1,x"] else _nothing():
        rc = main(["ablate", *argv, "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "r")])
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) <= 2
    assert not (tmp_path / "o").exists()


def test_cli_ranks_above_the_width_refused_before_any_work(tiny_base, capsys, tmp_path):
    rc = main(["ablate", "--ranks", "64", "--targets", "q", "--base", tiny_base, "--serial",
               "--block-size", "32", "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "r")])
    assert rc == 2 and "n_embd = 32" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("cells/*.json"))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_time_modes_runs_each_mode_into_a_fresh_directory(tiny_base, tmp_path):
    from minilora.experiments.ablate import time_modes
    from minilora.experiments.ablate_records import SweepError
    cells = _cells(tiny_base, full=False)[:2]
    res = time_modes(cells, tmp_path / "t", {"serial": {"serial": True}}, log=lambda *_: None)
    assert res["cells"] == 2 and res["serial"]["failed"] == 0
    assert res["serial"]["cells_per_hour"] == pytest.approx(2 * 3600 / res["serial"]["seconds"])
    assert len(load_records(tmp_path / "t" / "0" / "out")) == 2
    with pytest.raises(SweepError, match="not empty"):
        time_modes(cells, tmp_path / "t", {"serial": {"serial": True}}, log=lambda *_: None)
