"""Limits instead of tracebacks: sizes checked against the memory before anything is allocated,
a diverging run stopped with one line naming its last good checkpoint, damaged files read as
one line naming the file."""
import json

import pytest

from minilora import cli
from minilora.errors import UsageError
from minilora.experiments.figures.common import MissingResults, read_json, read_jsonl
from minilora.io import CheckpointError
from minilora.memory import GiB, check_fits
from minilora.train import _read_metrics, diverged


def test_check_fits_says_what_was_asked_and_what_fits():
    check_fits("x", 10 * GiB, available=11 * GiB)
    with pytest.raises(UsageError, match=r"^max_new_tokens 10 needs about 10.0 GiB of memory, "
                                         r"2.0 GiB is available: at most about 1,073,741 new "
                                         r"tokens fit$"):
        check_fits("max_new_tokens 10", 10 * GiB, 2000, " new tokens", 0, available=2 * GiB)
    with pytest.raises(UsageError, match="not even one fits"):
        check_fits("a step", 10 * GiB, 5 * GiB, "", 0, available=2 * GiB)


def test_divergence_rule_stops_runaway_loss_only():
    assert diverged([2.0, 2.1], 2.0) is None                     # too early to tell
    assert diverged([2.0, 2.3, 2.4, 2.2, 2.1], 2.0) is None       # a warm-up wobble
    assert diverged([4.6, 4.7, 4.8, 4.7], 4.6) is None            # pretraining's slow start
    assert diverged([2.0, 4.0, 5.5, 5.6], 2.0) == pytest.approx(4.275)
    assert diverged([4.6, 9.0, 12.0, 15.0], 4.6) is not None


def test_lr_5_diverges_and_exits_2_naming_the_last_good_checkpoint(tmp_path, capsys):
    """The issue: --lr 5 took the loss from 1.96 to 5.63 and exited 0."""
    out = tmp_path / "run"
    rc = cli.main(["finetune", "--lr", "5", "--steps", "30", "--batch-size", "2",
                   "--block-size", "32", "--eval-batches", "1", "--save-every", "1",
                   "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("minilora: error: the loss diverged (mean ") and "try a lower " \
        "learning rate" in err
    assert f"the last good checkpoint is {out / 'ckpt.safetensors'} (after " in err
    assert (out / "ckpt.safetensors").is_file() and not (out / "result.json").exists()
    assert "stopped" in json.loads((out / ".minilora-run.json").read_text())


def test_damaged_metrics_are_one_line_and_a_cut_last_line_is_dropped(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "loss": 1.9}\n{"step": 2, "lo')
    assert [r["step"] for r in _read_metrics(p, 5)] == [0, 1]
    p.write_text('{"step": 0, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.9}\n')
    with pytest.raises(CheckpointError, match="metrics.jsonl line 2 is not a metrics record"):
        _read_metrics(p, 5)


@pytest.mark.parametrize("text, match", [
    ('{"rows": [1, 2', "is not valid JSON \\(line 1, column"),
    ("[1, 2]", "holds a JSON list, not the object"),
])
def test_a_damaged_results_file_skips_its_figure_with_one_line(tmp_path, text, match):
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(MissingResults, match=match):
        read_json(p, "minilora make-it")
    p.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(MissingResults, match="line 2 is not a JSON object"):
        read_jsonl(p, "minilora make-it")


def test_a_closed_pipe_is_not_a_traceback():
    import subprocess
    import sys
    from pathlib import Path
    r = subprocess.run(f"{sys.executable} -m minilora.cli results | head -1", shell=True,
                       capture_output=True, text=True, timeout=120, check=False,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.stdout.startswith("| run |") and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("change, why", [
    (lambda r: r["result"].update(task_metric=None), "result.task_metric = None"),
    (lambda r: r["result"].update(trainable_params=-3), "result.trainable_params = -3"),
    (lambda r: r["config"].update(steps="many"), "an invalid configuration"),
    (lambda r: next(iter(r["delta_w"].values())).update(singular_values=[1, "x"]),
     "singular_values is not a list of finite numbers"),
])
def test_a_damaged_sweep_record_is_refused_field_by_field(tmp_path, change, why):
    """A record is read by one reader (types, ranges, nulls); a damaged one is re-run by ablate
    and left out of the table, the figures and the ΔW studies, never half-used."""
    from pathlib import Path

    from minilora.experiments.ablate_records import cell_key, read_record
    src = sorted((Path(__file__).resolve().parents[1] / "results/ablate/cells").glob("*.json"))
    if not src:
        pytest.skip("no committed sweep")
    rec = json.loads(src[0].read_text())
    assert read_record(src[0])[0] is not None
    change(rec)
    rec["key"] = cell_key(rec["config"])
    p = tmp_path / f"{rec['key']}.json"
    p.write_text(json.dumps(rec))
    got, reason = read_record(p)
    assert got is None and why in reason, reason
