"""minilora results: the table is made from saved result.json files; --run fills only the gaps."""
import json

import pytest

from minilora.experiments import results_table
from minilora.experiments.results_table import (
    format_table,
    load_results,
    run_missing,
    write_table,
)


def _record(task, method, trainable, metric):
    r = {"method": method, "task": task, "trainable_params": trainable, "total_params": 1000,
         "median_step_ms": 12.0, "forgetting": 0.25, "memory": {"measured_total": 3 * 2**20}}
    if task == "sentiment":
        r.update(accuracy_base=0.5, accuracy=metric)
    else:
        r.update(task_loss_base=2.0, task_loss=metric)
    return r


def _save(root, r):
    d = root / f"{r['task']}-{r['method']}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(r))


def test_table_rows_in_task_then_method_order(tmp_path):
    mts = _record("sentiment", "bitfit", 30, 0.7)
    mts["method_config"] = {"modules_to_save": ["lm_head", "ln_f"]}
    _save(tmp_path, mts)
    _save(tmp_path, _record("sentiment", "lora", 10, 0.75))
    _save(tmp_path, _record("milton", "lora", 10, 1.6))
    _save(tmp_path, _record("milton", "full", 1000, 1.5))
    rows = load_results(tmp_path)
    assert [(r["task"], r["method"]) for r in rows] == [("milton", "full"), ("milton", "lora"),
                                                        ("sentiment", "lora"),
                                                        ("sentiment", "bitfit")]
    text, path = write_table(tmp_path)
    assert path.read_text() == text == format_table(rows)
    assert ("| milton-lora | milton | lora | - | 2.000 -> 1.600 | 10 | 1.00 | 12 | 3.0 | +0.250 |"
            in text)
    assert "| sentiment-bitfit | sentiment | bitfit | lm_head, ln_f | 50.0 % -> 70.0 % |" in text
    assert "50.0 % -> 75.0 %" in text


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="minilora results --run"):
        write_table(tmp_path)


def test_run_missing_runs_only_the_gaps(tmp_path, monkeypatch):
    _save(tmp_path, _record("milton", "full", 1000, 1.5))
    calls = []

    def fake(method, task, out_dir=None, progress=True):
        calls.append((task, method))
        r = _record(task, method, 10, 1.7)
        out_dir.mkdir(parents=True, exist_ok=True)  # made and locked by run_missing first
        (out_dir / "result.json").write_text(json.dumps(r))
        return dict(r, metric="m", task_metric_base=2.0, task_metric=1.7,
                    shakespeare_loss_base=1.5, shakespeare_loss=1.75)

    monkeypatch.setattr(results_table, "finetune", fake)
    done = run_missing(tmp_path, ["milton"], ["full", "lora"], log=lambda s: None)
    assert done == calls == [("milton", "lora")]
    with pytest.raises(ValueError, match="unknown task/method nope"):
        run_missing(tmp_path, ["nope"], None)
