"""The cells of a rank ablation and their records: a cell is one full configuration, keyed by a
hash of its canonical JSON; a record is one JSON file per cell (config + finetune result + ΔW
summary); summaries group the records by configuration across seeds.

Running the cells (serially or on Dask): :mod:`minilora.experiments.ablate`.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import numpy as np

try:  # optional (the ablate extra): reads and limits the BLAS threads of the process a cell runs in
    import threadpoolctl
except ImportError:  # then the environment set before the worker started is all there is
    threadpoolctl = None

from minilora.checkpoint import load_checkpoint
from minilora.errors import MiniloraError, UsageError
from minilora.experiments.paths import RUNS, base_model_path
from minilora.experiments.tasks import TASKS

RECORD_FORMAT = 1
#: fine-tuned left singular vectors whose max |cos| with W_0's are stored per matrix
INTRUDER_TOP_K = 20
#: the linear layers of a block, in the model's order (full fine-tuning's ΔW summary covers these)
LINEARS = ("q", "k", "v", "o", "up", "down")
TARGET_NAMES = LINEARS + ("lm_head",)
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
#: fields of a record that are measurements of time, not results (ignored when comparing runs)
TIMING_FIELDS = ("train_seconds", "median_step_ms")
DEFAULT_RUNS = RUNS / "ablate"


class SweepError(MiniloraError):
    """A sweep cannot start (bad cells, no Dask, an unusable output directory)."""


# ----------------------------------------------------------------------------------------------
# cells


def make_cell(task: str = "milton", method: str = "lora", r: int | None = 8,
              targets=("q", "v"), seed: int = 0, steps: int = 200, lr: float | None = None,
              lora_alpha: float | None = None, batch_size: int = 8, block_size: int = 128,
              eval_batches: int = 16, base=None) -> dict:
    """One cell's full configuration (module docstring), validated.

    ``targets`` is a tuple of layer names (:data:`TARGET_NAMES`) or "all-linear" (= the six
    linears of a block); ``lora_alpha`` None means 2r (so ΔW = 2 · B A at every rank, the recipe
    of Biderman et al. and Shuttleworth et al.). ``method`` "full" ignores r, targets, alpha.
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if method not in ("lora", "full"):
        raise UsageError(f"method must be 'lora' or 'full', got {method!r}")
    for name, v, lo in (("seed", seed, 0), ("steps", steps, 1), ("batch_size", batch_size, 1),
                        ("block_size", block_size, 2), ("eval_batches", eval_batches, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and 0 < lr < 1):
        raise UsageError(f"lr must be in (0, 1), got {lr!r}")
    cell = dict(task=task, method=method, seed=int(seed), steps=int(steps),
                lr=None if lr is None else float(lr), batch_size=int(batch_size),
                block_size=int(block_size), eval_batches=int(eval_batches),
                base="shipped" if base is None else str(base),
                r=None, lora_alpha=None, targets=None)
    if method == "lora":
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise UsageError(f"r must be an integer >= 1, got {r!r}")
        targets = parse_targets(targets) if isinstance(targets, str) else tuple(targets)
        bad = [t for t in targets if t not in TARGET_NAMES]
        if not targets or bad:
            raise UsageError(f"unknown target(s) {', '.join(bad) or '(none)'}; allowed: "
                             f"{', '.join(TARGET_NAMES)} or all-linear")
        alpha = 2.0 * r if lora_alpha is None else float(lora_alpha)
        if not alpha > 0:
            raise UsageError(f"lora_alpha must be > 0, got {lora_alpha!r}")
        cell.update(r=int(r), lora_alpha=alpha,
                    targets=[t for t in TARGET_NAMES if t in targets])  # one order per set
    return cell


def parse_targets(text: str) -> tuple:
    """``"q,v"`` -> ("q", "v"); ``"all-linear"`` -> the six linears of a block."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all-linear"]:
        return LINEARS
    return tuple(names)


def target_label(targets) -> str:
    """A short name for a target set: "q,v", "all-linear", or "full" (None)."""
    if targets is None:
        return "full"
    return "all-linear" if tuple(targets) == LINEARS else ",".join(targets)


def cell_key(cell: dict) -> str:
    """The first 16 hex digits of SHA-256 of the cell's canonical JSON (sorted keys)."""
    text = json.dumps(cell, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def grid(tasks, ranks, target_sets, seeds, steps: int, full: bool = False, pairs=(),
         **fields) -> list[dict]:
    """The cells of a sweep: every task × seed × (rank × target set, plus the explicit
    ``pairs`` of (targets, r)), plus one full fine-tuning cell per task × seed if ``full``.
    ``fields`` go to every :func:`make_cell` (lr, batch_size, base, ...). Duplicates are dropped."""
    cells, seen = [], set()
    for task in tasks:
        for seed in seeds:
            combos = [(t, r) for t in target_sets for r in ranks] + list(pairs)
            todo = [make_cell(task, "lora", r, t, seed, steps, **fields) for t, r in combos]
            if full:
                todo.append(make_cell(task, "full", None, None, seed, steps,
                                      **{k: v for k, v in fields.items() if k != "lora_alpha"}))
            for c in todo:
                k = cell_key(c)
                if k not in seen:
                    seen.add(k)
                    cells.append(c)
    return cells


def check_cells_fit_base(cells) -> None:
    """Every rank fits the base it runs on (r <= the smallest side of a targeted matrix), and the
    base loads: checked once per base before any cell starts."""
    for base in sorted({c["base"] for c in cells}):
        model, _, _ = load_checkpoint(base_model_path() if base == "shipped" else base)
        C = model.config.n_embd
        too_big = sorted({c["r"] for c in cells if c["base"] == base and c["r"] and c["r"] > C})
        if too_big:
            raise UsageError(f"--ranks: r = {too_big} exceed the model width n_embd = {C} of "
                             f"base {base!r} (r must be <= min(d_in, d_out))")
        blk = model.config.block_size
        if any(c["block_size"] > blk for c in cells if c["base"] == base):
            raise UsageError(f"--block-size: windows must be at most the base's context of "
                             f"{blk} characters ({base!r})")


# ----------------------------------------------------------------------------------------------
# records


def read_record(path) -> tuple[dict | None, str | None]:
    """(record, None) for a complete record at ``path``; (None, why) for a missing, unreadable,
    partial or mismatched one."""
    path = Path(path)
    if not path.exists():
        return None, "missing"
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    missing = [k for k in ("format", "key", "config", "status", "result", "delta_w")
               if k not in rec]
    if missing:
        return None, f"partial (no {', '.join(missing)})"
    if rec["format"] != RECORD_FORMAT:
        return None, f"record format {rec['format']} (now {RECORD_FORMAT})"
    if rec["status"] != "done":
        return None, f"status {rec['status']!r}"
    if not isinstance(rec["config"], dict) or cell_key(rec["config"]) != rec["key"] \
            or path.stem != rec["key"]:
        return None, "its key does not match its configuration"
    res = rec["result"]
    if not isinstance(res, dict) or not all(k in res for k in ("task_metric", "forgetting")):
        return None, "partial result"
    why = _bad_fields(rec)
    return (None, why) if why else (rec, None)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _bad_fields(rec: dict) -> str | None:
    """What is wrong with a record's fields (types, ranges, nulls), or None: the configuration
    must be one :func:`make_cell` makes, and every number the table, the figures and the ΔW
    studies read must be there and finite."""
    c = rec["config"]
    try:
        fields = {k: v for k, v in c.items() if k not in ("method", "base")}
        fields["targets"] = tuple(c["targets"]) if c.get("targets") else None
        again = make_cell(**fields, method=c.get("method"),
                          base=None if c.get("base") == "shipped" else c.get("base"))
    except (MiniloraError, TypeError, KeyError) as e:
        return f"an invalid configuration ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if again != c:
        return "a configuration make_cell would not make"
    res = rec["result"]
    for k in ("task_metric", "task_metric_base", "forgetting"):
        if not _number(res.get(k)):
            return f"result.{k} = {res.get(k)!r} (a finite number is needed)"
    n = res.get("trainable_params")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return f"result.trainable_params = {n!r} (an integer >= 0 is needed)"
    if not isinstance(rec["delta_w"], dict):
        return "delta_w is not an object"
    for name, m in rec["delta_w"].items():
        if not isinstance(m, dict):
            return f"delta_w[{name!r}] is not an object"
        for k in ("effective_rank", "stable_rank", "fro", "w_fro"):
            if not _number(m.get(k)):
                return f"delta_w[{name!r}].{k} = {m.get(k)!r} (a finite number is needed)"
        for k in ("singular_values", "intruder_similarities"):
            v = m.get(k)
            if not isinstance(v, list) or not all(_number(x) for x in v):
                return f"delta_w[{name!r}].{k} is not a list of finite numbers"
    return None


def load_records(out) -> list[dict]:
    """Every complete record under ``<out>/cells/`` (sorted by key)."""
    d = Path(out) / "cells"
    recs = [read_record(p)[0] for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    return [r for r in recs if r is not None]


def comparable(record: dict) -> dict:
    """``record`` without its timings (``run``, :data:`TIMING_FIELDS`): what must be identical
    when the same cell runs twice, serially or on Dask."""
    rec = {k: v for k, v in record.items() if k != "run"}
    rec["result"] = {k: v for k, v in rec["result"].items() if k not in TIMING_FIELDS}
    return rec


def intruder_count(summary: dict, eps: float, k: int) -> int:
    """Intruders among the top k of one matrix's ΔW summary at threshold ε:
    #{j < k : max_i |cos(y_j, x_i)| < ε}."""
    sims = summary["intruder_similarities"]
    if k > len(sims):
        raise UsageError(f"k = {k} exceeds the {len(sims)} similarities stored per matrix")
    return int(sum(s < eps for s in sims[:k]))


# ----------------------------------------------------------------------------------------------
# the table


def group_records(records) -> dict:
    """``{(task, method, targets label, r, steps): [records over seeds]}``."""
    groups = {}
    for rec in records:
        c = rec["config"]
        groups.setdefault((c["task"], c["method"], target_label(c["targets"]), c["r"],
                           c["steps"]), []).append(rec)
    return groups


def _mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summary_rows(records) -> list[dict]:
    """One row per (task, method, targets, r, steps), means and sample std over seeds of the
    task metric and forgetting, the trainable parameters and the mean effective rank of ΔW."""
    rows = []
    for (task, method, tl, r, steps), recs in sorted(
            group_records(records).items(),
            key=lambda kv: (kv[0][0], kv[0][1] != "full", kv[0][2], kv[0][3] or 0, kv[0][4])):
        m, ms = _mean_std([x["result"]["task_metric"] for x in recs])
        f, fs = _mean_std([x["result"]["forgetting"] for x in recs])
        er = statistics.fmean(statistics.fmean(v["effective_rank"] for v in x["delta_w"].values())
                              for x in recs)
        rows.append(dict(task=task, method=method, targets=tl, r=r, steps=steps,
                         seeds=len(recs), metric=recs[0]["result"]["metric"],
                         task_metric=m, task_metric_std=ms, forgetting=f, forgetting_std=fs,
                         trainable_params=recs[0]["result"]["trainable_params"],
                         effective_rank=er))
    return rows


def summary_table(records) -> str:
    """:func:`summary_rows` as a Markdown table."""
    lines = [("| task | method | targets | r | steps | seeds | task metric | forgetting | "
              "trainable | mean eff. rank of ΔW |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for x in summary_rows(records):
        lines.append(f"| {x['task']} | {x['method']} | {x['targets']} | {x['r'] or '-'} | "
                     f"{x['steps']} | {x['seeds']} | {x['task_metric']:.4f} ± "
                     f"{x['task_metric_std']:.4f} | {x['forgetting']:+.4f} ± "
                     f"{x['forgetting_std']:.4f} | {x['trainable_params']:,} | "
                     f"{x['effective_rank']:.1f} |")
    return "\n".join(lines)


#: the execution modes :func:`time_modes` compares: label -> run_sweep keyword arguments
