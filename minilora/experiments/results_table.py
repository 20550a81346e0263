"""The fine-tuning results table: every method on every task, from the saved ``result.json`` files.

``minilora results`` prints (and writes ``results/finetune/table.md``) one row per run found under
``results/finetune/<task>-<method>/result.json``; ``minilora results --run`` first runs the missing
(task, method) pairs with the harness defaults of :func:`minilora.experiments.finetune.finetune`, so the whole
table is made by one command. Columns: the modules trained whole beside the method
(``modules_to_save``), the task metric before -> after, trainable parameters,
median step time, measured peak memory of a training step (weights + optimizer state + the
step's allocations, :func:`minilora.memory.memory_account`), and forgetting (change in the
Shakespeare validation loss).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from minilora.errors import UsageError
from minilora.experiments.finetune import finetune, format_result
from minilora.experiments.paths import LOCK_NAME, Lock, Output, describe_lock
from minilora.methods.registry import METHODS, RENAMED
from minilora.experiments.tasks import TASKS
from minilora.io import atomic_write_text

DEFAULT_ROOT = Path("results") / "finetune"


def run_dir(root, task: str, method: str) -> Path:
    """Where the harness run of ``method`` on ``task`` is saved."""
    return Path(root) / f"{task}-{method}"


class BadResult(UsageError):
    """A ``result.json`` that is not what :func:`minilora.experiments.finetune.finetune` writes."""


#: the fields the table reads: name -> (type, lowest allowed value or None)
RESULT_FIELDS = {"method": (str, None), "task": (str, None), "trainable_params": (int, 0),
                 "total_params": (int, 1), "median_step_ms": (float, 0.0),
                 "forgetting": (float, None)}


def read_result(path) -> dict:
    """One run's ``result.json``, checked field by field (types, ranges, nulls): a damaged or
    foreign file is one line naming it and the field, never a traceback or a wrong row."""
    path = Path(path)
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadResult(f"{path} is not readable JSON ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]})") from None
    if not isinstance(r, dict):
        raise BadResult(f"{path} holds a JSON {type(r).__name__}, not a run's result object")
    metric = ("accuracy_base", "accuracy") if "accuracy" in r else ("task_loss_base", "task_loss")
    fields = {**RESULT_FIELDS, **{k: (float, None) for k in metric}}
    for k, (typ, lo) in fields.items():
        v = r.get(k)
        ok = (isinstance(v, str) if typ is str else
              isinstance(v, int) and not isinstance(v, bool) if typ is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        if not ok:
            raise BadResult(f"{path}: field {k!r} must be "
                            f"{'a string' if typ is str else 'an integer' if typ is int else 'a finite number'}"
                            f", got {json.dumps(v) if k in r else 'nothing (missing)'}")
        if lo is not None and v < lo:
            raise BadResult(f"{path}: field {k!r} must be >= {lo}, got {v}")
    return r


def load_results(root=DEFAULT_ROOT) -> list[dict]:
    """Every ``result.json`` directly under ``root/*/`` (sorted by task, then method)."""

    rows = []
    for path in sorted(Path(root).glob("*/result.json")):
        r = read_result(path)
        r["method"] = RENAMED.get(r.get("method"), r.get("method"))  # runs made before a rename
        r["_dir"] = path.parent.name
        rows.append(r)
    order_t = {t: i for i, t in enumerate(TASKS)}
    order_m = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order_t.get(r["task"], 99), order_m.get(r["method"], 99), r["_dir"]))
    return rows


def _fmt_metric(r: dict) -> str:
    if "accuracy" in r:
        return f"{100 * r['accuracy_base']:.1f} % -> {100 * r['accuracy']:.1f} %"
    return f"{r['task_loss_base']:.3f} -> {r['task_loss']:.3f}"


def _peak(r: dict) -> str:
    mem = r.get("memory") or {}
    v = mem.get("measured_total")
    return "-" if v is None else f"{v / 2**20:.1f}"


def _saved_modules(r: dict) -> str:
    saved = (r.get("method_config") or {}).get("modules_to_save") or []
    return ", ".join(saved) or "-"


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`load_results` rows."""
    head = ("| run | task | method | modules_to_save | metric (base -> tuned) | trainable params "
            "| % of total | step ms | peak MiB | forgetting |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['_dir']} | {r['task']} | {r['method']} | {_saved_modules(r)} | {_fmt_metric(r)} "
            f"| {r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.2f} "
            f"| {r['median_step_ms']:.0f} | {_peak(r)} | {r['forgetting']:+.3f} |")
    notes = ("\nmodules_to_save: whole modules trained beside the method (PEFT's option; their "
             "numbers are in the trainable count). metric: test loss in nats/char (milton, python; lower is better) or exact-match "
             "accuracy (sentiment). forgetting: Shakespeare validation loss after - before. "
             "peak MiB: measured (tracemalloc) weights + optimizer state + one step's allocations "
             "at the run's batch.\n")
    return "\n".join(lines) + "\n" + notes


def run_missing(root=DEFAULT_ROOT, tasks=None, methods=None, progress: bool = True,
                log=print) -> list[tuple[str, str]]:
    """Run every (task, method) pair whose ``result.json`` is missing, with the harness defaults."""

    tasks = list(tasks or TASKS)
    methods = list(methods or METHODS)
    renamed = [f"{m} (now {RENAMED[m]})" for m in methods if m in RENAMED]
    if renamed:
        raise UsageError(f"--methods: {', '.join(renamed)}: use the new name")
    bad = [t for t in tasks if t not in TASKS] + [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown task/method {', '.join(bad)}; tasks: {', '.join(TASKS)}; "
                         f"methods: {', '.join(METHODS)}")
    done = []
    for task in tasks:
        for method in methods:
            out = run_dir(root, task, method)
            if (out / "result.json").exists():
                continue
            # a pair left unfinished by a killed run is run again (its files replaced); a pair
            # that another process is running now is left to it
            run = Output(out, kind="run", overwrite=True)
            held = Lock(out / LOCK_NAME).holder()
            if held is not None:
                log(f"skipping {method} on {task}: {out} is being run by {describe_lock(held)}")
                continue
            run.check()
            run.open(log)
            ok = False
            try:
                if (out / "result.json").exists():
                    continue
                log(f"running {method} on {task} -> {out}")
                r = finetune(method, task, out_dir=out, progress=progress)
                ok = True
            finally:
                run.close(ok)
            log(format_result(r))
            done.append((task, method))
    return done


class NoRuns(UsageError, FileNotFoundError):
    """The results root holds no run (``<root>/*/result.json``)."""


def table_text(root=DEFAULT_ROOT) -> str:
    """The table of every saved run under ``root`` (Markdown)."""
    rows = load_results(root)
    if not rows:
        raise NoRuns(f"no runs under {root}/*/result.json; make them with "
                         "`minilora results --run` or `minilora finetune --out ...`")
    return format_table(rows)


def write_table(root=DEFAULT_ROOT) -> tuple[str, Path]:
    """Format the table of every saved run and write it to ``root/table.md`` (atomically)."""

    text = table_text(root)
    path = Path(root) / "table.md"
    atomic_write_text(path, text)
    return text, path
