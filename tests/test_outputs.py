"""The output policy (minilora.experiments.paths.Output) as a user meets it: defaults under runs/,
nothing replaced without --overwrite, two runs never mixing, one writer at a time, a killed
writer's lock taken over, and two `ablate` processes sharing one sweep cell by cell."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minilora import cli
from minilora.errors import MiniloraError
from minilora.experiments.paths import LOCK_NAME, MARKER_NAME, Lock, Output

ROOT = Path(__file__).resolve().parents[1]

#: parser destinations that name where a command writes
OUTPUT_DESTS = ("out", "figures", "runs", "root", "results", "export", "time_modes")


def _subparsers(parser, prefix=()):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _subparsers(sub, prefix + (name,))


def test_no_command_writes_into_results_or_figures_by_default():
    """Every output flag of every command defaults to nothing (a fresh runs/<command>/<name>)
    or to a path under runs/; reading defaults (figures --results, delta-w --sweep) aside."""
    reads = {("figures", "results"), ("delta-w", "sweep")}
    checked = 0
    for names, sub in _subparsers(cli.build_parser()):
        for a in sub._actions:
            if a.dest in OUTPUT_DESTS and (names[-1], a.dest) not in reads:
                if names == ("results",) and a.dest == "root":
                    continue      # `results` without --run reads results/finetune, writes nothing
                checked += 1
                assert a.default is None or str(a.default).startswith("runs"), (names, a.dest)
    assert checked >= 15


def _run(argv, cwd, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "minilora.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})}, **kw)


def test_defaults_are_fresh_run_directories_and_say_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert cli.main(["pretrain", "--max-steps", "1", "--eval-every", "1",
                         "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "checkpoint written to runs/pretrain/tiny-2/ckpt.safetensors"
    assert (tmp_path / "runs/pretrain/tiny/ckpt.safetensors").is_file()
    marker = json.loads((tmp_path / "runs/pretrain/tiny-2" / MARKER_NAME).read_text())
    assert marker["kept"] == [] and "finished" in marker
    assert not list(tmp_path.rglob(LOCK_NAME))


def test_an_existing_run_is_refused_and_overwrite_removes_the_earlier_files(tmp_path,
                                                                            monkeypatch, capsys):
    """The issue: a second run on one --out silently mixed its files with the first's."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "run"
    argv = ["pretrain", "--max-steps", "1", "--eval-every", "1", "--no-progress", "--out", "run"]
    assert cli.main(argv) == 0
    (d / "left-by-the-first.bin").write_bytes(b"x")   # a file the second run does not write
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--out 'run' already holds an earlier run; --resume continues it, --overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before  # untouched
    assert cli.main(argv + ["--overwrite"]) == 0
    assert "the earlier run's 3 file(s) in run are replaced" in capsys.readouterr().err
    assert not (d / "left-by-the-first.bin").exists()
    assert (d / "ckpt.safetensors").is_file()


def test_a_refused_overwrite_gives_the_earlier_run_back(tmp_path, monkeypatch, capsys):
    """--overwrite sets the earlier run aside; a command refused after that (here: a model
    config checked once the output is open) restores it byte for byte."""
    monkeypatch.chdir(tmp_path)
    argv = ["pretrain", "--max-steps", "1", "--eval-every", "1", "--no-progress", "--out", "run"]
    assert cli.main(argv) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert cli.main(argv + ["--overwrite", "--n-embd", "30", "--n-head", "4"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_overwrite_never_empties_a_directory_no_run_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert cli.main(["pretrain", "--max-steps", "1", "--out", "mine", "--overwrite"]) == 2
    assert "no minilora run recorded" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]


def test_files_and_collections_need_overwrite(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("{}")
    with pytest.raises(MiniloraError, match="already exists; --overwrite replaces it"):
        Output(f, kind="file").check()
    Output(f, kind="file", overwrite=True).check()
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "x.png").write_bytes(b"")
    with pytest.raises(MiniloraError, match=r"already holds 1 file\(s\); --overwrite"):
        Output(tmp_path / "figs", kind="collection", flag="--figures").check()
    with Output(tmp_path / "figs", kind="collection", overwrite=True) as p:
        assert (p / LOCK_NAME).exists()
    assert sorted(x.name for x in (tmp_path / "figs").iterdir()) == ["x.png"]  # nothing removed


def test_a_refused_command_leaves_no_directory_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["pretrain", "--n-embd", "30", "--n-head", "4"]) == 2
    assert cli.main(["finetune", "--block-size", "1000"]) == 2
    assert list(tmp_path.iterdir()) == []


HOLD = textwrap.dedent("""\
    import sys, time
    from minilora.experiments.paths import Output
    out = Output(sys.argv[1], kind=sys.argv[2])
    out.check(); out.open()
    print("holding", flush=True)
    time.sleep(120)
    """)


def _holder(tmp_path, path, kind="run"):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), kind], cwd=tmp_path,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


def test_a_second_writer_fails_at_once_naming_the_first_and_a_dead_ones_lock_is_taken_over(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = _holder(tmp_path, "run")
    try:
        t = time.perf_counter()
        assert cli.main(["pretrain", "--max-steps", "1", "--out", "run", "--no-progress"]) == 2
        assert time.perf_counter() - t < 5
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"--out 'run' is in use by another minilora run (pid {first.pid}, started" in err
        assert "kind=" not in err and "; wait for it to finish or choose another path" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()        # the killed run's lock stays ...
    assert cli.main(["pretrain", "--max-steps", "1", "--eval-every", "1", "--out", "run",
                     "--no-progress"]) == 0               # ... and the next run takes it over
    err = capsys.readouterr().err
    assert f"taking over {Path('run') / LOCK_NAME}, left by a run that is gone (pid {first.pid}" \
        in err
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_file_output_in_use_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = _holder(tmp_path, "q.safetensors", "file")
    try:
        assert cli.main(["quantize", "--out", "q.safetensors"]) == 2
        assert f"in use by another minilora run (pid {first.pid}" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()


def test_a_lock_is_taken_by_one_process_only(tmp_path):
    lock = Lock(tmp_path / "x.lock")
    assert lock.try_acquire() is None
    other = Lock(tmp_path / "x.lock")
    held = other.try_acquire()
    assert held is not None and held["pid"] == os.getpid()
    lock.release()
    assert other.try_acquire() is None
    other.release()
    (tmp_path / "x.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname()[1]}))
    notes = []
    assert Lock(tmp_path / "x.lock").try_acquire(notes.append) is None   # a dead pid: stale
    assert "left by a run that is gone (pid 4206649" in notes[0]


# ----------------------------------------------------------------------------------------------
# ablate: two processes on one sweep
# ----------------------------------------------------------------------------------------------
SWEEP = textwrap.dedent("""\
    import json, sys
    from minilora.experiments.ablate import run_sweep
    res = run_sweep(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], serial=True,
                    progress=False, poll=0.2, log=lambda *a: None)
    print(json.dumps(res))
    """)


def test_two_ablate_processes_share_the_cells(tmp_path):
    from minilora.checkpoint import save_checkpoint
    from minilora.config import GPTConfig
    from minilora.data import CharTokenizer
    from minilora.experiments.ablate_records import grid, load_records
    from minilora.model import GPT

    base = tmp_path / "tiny.safetensors"
    save_checkpoint(base, GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16), rng=0),
                    CharTokenizer.default())
    cells = grid(["milton"], [1, 2, 4], [("q",), ("v",)], [0], 4, base=str(base),
                 batch_size=2, block_size=16, eval_batches=1)
    out, runs = tmp_path / "sweep", tmp_path / "weights"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MINILORA_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SWEEP, json.dumps(cells), str(out),
                               str(runs)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    res = [json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in procs]
    ran = res[0]["done"] + res[1]["done"]
    assert sorted(ran) == sorted(set(ran)), "a cell ran twice"
    assert len(ran) == len(cells) == 6 and not res[0]["failed"] and not res[1]["failed"]
    assert all(len(r["done"]) + len(r["shared"]) + len(r["skipped"]) == 6 for r in res)
    assert len(load_records(out)) == 6
    assert not list((out / "cells").glob(".*.lock"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("argv", [
    ["delta-w", "--out", "ro/x"], ["figures", "--figures", "ro/x"],
    ["adapter", "merge", "a.safetensors", "--out", "ro/m.safetensors"],
    ["quantize", "--out", "ro/q.safetensors"], ["finetune", "--out", "ro/run"],
])
def test_a_read_only_folder_is_refused_before_any_work(argv, tmp_path, monkeypatch, capsys):
    """The issue: unwritable outputs gave tracebacks (delta-w after 7 s of work)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        t = time.perf_counter()
        assert cli.main(argv) == 2
        assert time.perf_counter() - t < 5
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "(permission denied)" in err, err
    finally:
        (tmp_path / "ro").chmod(0o700)
