"""Rank ablations as a sweep of cells, one JSON record per cell: ``minilora ablate``.

A **cell** is one fine-tuning run, given in full by a configuration dict (:func:`make_cell`):

    {"task", "method", "r", "lora_alpha", "targets", "seed", "steps", "lr", "batch_size",
     "block_size", "eval_batches", "base"}

(``r``, ``lora_alpha`` and ``targets`` are None for full fine-tuning; ``lr`` None is the
method's harness default; ``base`` "shipped" or a checkpoint path). Its **key** is the first 16
hex digits of the SHA-256 of the canonical JSON (sorted keys, no spaces), so the same
configuration always lands in the same file ``<out>/cells/<key>.json``. A record holds

* ``config`` and ``key``; ``result``: the :func:`~minilora.experiments.finetune.finetune` record
  (task metric, forgetting, parameters, ...);
* ``delta_w``: per adapted matrix (full fine-tuning: the 6 linears of every block), the singular
  values of ΔW, ||ΔW||_F, the effective and stable ranks, and the max |cos| of the top
  :data:`INTRUDER_TOP_K` left singular vectors of W_0 + ΔW against those of W_0 (so the intruder
  count at any threshold ε can be read from the record, see :func:`intruder_count`);
* ``run``: wall seconds, the BLAS threads it ran with, where (timings are not part of the
  configuration and differ from run to run).

Records are written atomically by the process that ran the cell, so a killed sweep loses only
the cells in flight. A re-run reads every record first: a finished one is skipped; an unreadable,
partial or mismatched one is reported and run again. The weights of each cell stay under
``<runs>/<key>/`` (git-ignored; the ΔW studies read them) and are not needed for the records.

Execution: through Dask (``dask.distributed``: a ``LocalCluster`` of ``workers`` processes with
one thread each, or an existing scheduler), or serially in this process (``serial=True``, for
debugging). One failing cell never stops the others: failures come back with a one-line error.
Each worker sets its BLAS thread count before NumPy loads (the Nanny's pre-spawn environment),
so two workers on two cores do not oversubscribe them.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

try:  # optional (the ablate extra): reads and limits the BLAS threads of the process a cell runs in
    import threadpoolctl
except ImportError:  # then the environment set before the worker started is all there is
    threadpoolctl = None

from minilora import threads
from minilora.analysis import (
    effective_rank,
    lowrank_svd,
    singular_values,
    stable_rank,
    svd,
)
from minilora.checkpoint import load_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.errors import MiniloraError, UsageError
from minilora.experiments.ablate_records import (
    BLAS_ENV,
    DEFAULT_RUNS,
    INTRUDER_TOP_K,
    LINEARS,
    RECORD_FORMAT,
    SweepError,
    cell_key,
    check_cells_fit_base,
    read_record,
    target_label,
)
from minilora.experiments.finetune import finetune
from minilora.experiments.paths import Lock, base_model_path, describe_lock
from minilora.io import atomic_write_json, ensure_writable_dir
from minilora.methods.lora import lora_scaling, read_adapter

# ----------------------------------------------------------------------------------------------
# one cell (runs in a worker)


def _summary(W0, W_t, delta_s) -> dict:
    """The ΔW summary of one matrix: its spectrum, norms, ranks, and the intruder similarities of
    W_t against W_0 (top :data:`INTRUDER_TOP_K` of W_t)."""
    s = np.asarray(delta_s, dtype=np.float64)
    U0, Ut = svd(W0).U, svd(W_t).U
    k = min(INTRUDER_TOP_K, Ut.shape[1])
    sims = np.abs(U0.T @ Ut[:, :k]).max(axis=0)
    return {"singular_values": [float(f"{x:.6g}") for x in s],
            "fro": float(np.sqrt(np.sum(s ** 2))), "w_fro": float(np.linalg.norm(W0)),
            "effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
            "intruder_similarities": [round(float(x), 6) for x in sims]}


def delta_w_summary(cell: dict, weights_dir: Path) -> dict:
    """``{module: summary}`` for the trained weights in ``weights_dir`` (module docstring)."""
    base = base_model_path() if cell["base"] == "shipped" else cell["base"]
    model0, _, _ = load_checkpoint(base)
    W0 = {n: np.asarray(p, dtype=np.float64) for n, p in model0.named_parameters()}
    out = {}
    if cell["method"] == "lora":
        arrays, cfg = read_adapter(weights_dir / "adapter.safetensors")
        scale = lora_scaling(cfg.r, cfg.lora_alpha, cfg.use_rslora)
        for name in sorted(n[:-len(".lora_A")] for n in arrays if n.endswith(".lora_A")):
            A = np.asarray(arrays[name + ".lora_A"], dtype=np.float64)
            B = np.asarray(arrays[name + ".lora_B"], dtype=np.float64)
            W = W0[name + ".weight"]
            if W.shape != (B.shape[0], A.shape[1]):   # an embedding stores ΔW transposed
                continue
            s = lowrank_svd(B, A, scale).s
            out[name] = _summary(W, W + scale * (B @ A), s)
    else:
        model1, _, _ = load_checkpoint(weights_dir / "model.safetensors")
        W1 = {n: np.asarray(p, dtype=np.float64) for n, p in model1.named_parameters()}
        for n, w0 in W0.items():
            parts = n.split(".")
            if len(parts) >= 3 and parts[-2] in LINEARS and parts[-1] == "weight":
                out[n[:-len(".weight")]] = _summary(w0, W1[n], singular_values(W1[n] - w0))
    return out


def _blas_threads() -> int | None:
    """The BLAS threads of this process (threadpoolctl), or the environment's setting."""
    if threadpoolctl is None:
        env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        return int(env) if env and env.isdigit() else None
    info = threadpoolctl.threadpool_info()
    return max((i.get("num_threads", 0) for i in info if i.get("user_api") == "blas"),
               default=None)


def run_cell(cell: dict, out: str, runs: str, blas_threads: int | None = None) -> dict:
    """Run one cell and write its record ``<out>/cells/<key>.json``; returns
    ``{"key", "status": "done" | "failed", "error": one line or None, "seconds"}``.

    Never raises for a failing cell (the error comes back as one line); this is the function
    the Dask workers run. ``blas_threads`` limits BLAS in this process (threadpoolctl, if
    installed) on top of the environment the worker was started with.
    """
    key = cell_key(cell)
    t0 = time.perf_counter()
    try:
        limiter = None
        if blas_threads is not None and threadpoolctl is not None:
            limiter = threadpoolctl.threadpool_limits(blas_threads, user_api="blas")
        try:
            record = _run(cell, key, Path(out), Path(runs), t0)
        finally:
            if limiter is not None:
                limiter.restore_original_limits()
        atomic_write_json(Path(out) / "cells" / f"{key}.json", record)
        return {"key": key, "status": "done", "error": None,
                "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - one cell's failure must not stop the sweep
        line = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, MiniloraError):
            tb = traceback.extract_tb(e.__traceback__)
            if tb:
                line += f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
        return {"key": key, "status": "failed", "error": line,
                "seconds": time.perf_counter() - t0}


def _run(cell, key, out: Path, runs: Path, t0) -> dict:
    method_cfg = None
    if cell["method"] == "lora":
        method_cfg = LoraConfig(r=cell["r"], lora_alpha=cell["lora_alpha"],
                                target_modules=tuple(cell["targets"]), seed=cell["seed"])
    train = dict(max_steps=cell["steps"], seed=cell["seed"], batch_size=cell["batch_size"],
                 block_size=cell["block_size"])
    if cell["lr"] is not None:
        train["lr"] = cell["lr"]
    weights_dir = runs / key
    result = finetune(cell["method"], cell["task"], method_cfg, train,
                      base_path=None if cell["base"] == "shipped" else cell["base"],
                      out_dir=weights_dir, progress=False, eval_batches=cell["eval_batches"],
                      measure_memory=False)
    delta = delta_w_summary(cell, weights_dir)
    (weights_dir / "ckpt.safetensors").unlink(missing_ok=True)  # the resumable state: not needed
    return {"format": RECORD_FORMAT, "key": key, "config": cell, "status": "done",
            "result": result, "delta_w": delta,
            "run": {"seconds": round(time.perf_counter() - t0, 3),
                    "blas_threads": _blas_threads(), "pid": os.getpid(),
                    "weights": str(weights_dir)}}


# ----------------------------------------------------------------------------------------------
# the sweep


def _dask():
    try:
        import dask  # lazy: optional dependency (the ablate extra), only for parallel sweeps
        import distributed  # lazy: as above
    except ImportError:
        raise SweepError("Dask is not installed: pip install 'dask[distributed]' (the ablate "
                         "extra), or run with --serial") from None
    return dask, distributed


def start_cluster(workers: int = 2, blas_threads: int = 1, scheduler: str | None = None):
    """A Dask client: on ``scheduler`` (an address) if given, else on a new ``LocalCluster`` of
    ``workers`` processes × 1 thread whose BLAS thread count is ``blas_threads`` (set in the
    environment before the worker process starts, so before NumPy loads). Returns (client,
    cluster or None); close both when done."""
    dask, distributed = _dask()
    if scheduler:
        try:
            return distributed.Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as e:
            raise SweepError(f"--scheduler {scheduler}: cannot connect ({e})") from None
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.update({v: str(blas_threads) for v in BLAS_ENV})
    if blas_threads == 1:  # minilora's pool on each worker's share of the cores (unless the
        env[threads.POOL_VAR] = threads.child_env(workers)[threads.POOL_VAR]  # user set it)
    else:  # the BLAS threads itself: one pool is enough
        env[threads.POOL_VAR] = "1"
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                           processes=True, dashboard_address=":0",
                                           silence_logs=40)  # logging.ERROR
    return distributed.Client(cluster), cluster


def plan(cells, out) -> tuple[list[dict], list[dict], list[str]]:
    """Split ``cells`` into (finished records, cells to run, notes on records being re-run)."""
    done, todo, notes = [], [], []
    for cell in cells:
        key = cell_key(cell)
        path = Path(out) / "cells" / f"{key}.json"
        rec, why = read_record(path)
        if rec is not None:
            done.append(rec)
        else:
            todo.append(cell)
            if why != "missing":
                notes.append(f"cell {key}: {why} record, running it again")
    return done, todo, notes


def cell_lock(out, key: str) -> Lock:
    """The claim on cell ``key`` of the sweep in ``out`` (``cells/.<key>.lock``): the process
    that holds it runs the cell; others leave it alone and read its record when it is done."""
    return Lock(Path(out) / "cells" / f".{key}.lock")


def run_sweep(cells, out, runs=None, workers: int = 2, blas_threads: int = 1,
              serial: bool = False, scheduler: str | None = None, progress: bool = True,
              log=print, rerun_missing_weights: bool = False, poll: float = 2.0) -> dict:
    """Run every cell of ``cells`` that has no complete record under ``<out>/cells/``.

    Args:
        cells: configurations from :func:`make_cell` / :func:`grid`.
        out: the records' directory (``cells/`` inside it).
        runs: where each cell keeps its weights (default ``runs/ablate``, git-ignored).
        workers, blas_threads: the LocalCluster's worker processes and BLAS threads per worker.
        serial: run in this process, one cell after another (debugging; no Dask needed).
        scheduler: the address of a running Dask scheduler instead of a LocalCluster.
        rerun_missing_weights: also re-run finished cells whose weights are gone from ``runs``
            (the ΔW studies need them; training is deterministic, so the record is the same).
        poll: seconds between looks at cells another process is running.

    Several processes may run one sweep directory at once: each cell is claimed
    (:func:`cell_lock`) just before it starts, so every cell runs once; a process that runs
    out of cells to claim waits for the others' cells and reads their records (a cell whose
    process died is claimed and run again).

    Returns ``{"done": [keys run now], "skipped": [keys already done], "shared": [keys another
    process ran meanwhile], "failed": {key: error}, "seconds": wall time}``. Raises
    :class:`SweepError` before any work if the output directory is unusable or Dask is needed
    but missing.
    """
    cells = list({cell_key(c): c for c in cells}.values())   # the same cell once
    if not cells:
        raise SweepError("no cells to run")
    if serial and scheduler:
        raise UsageError("--serial and --scheduler exclude each other")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be an integer >= 1, got {workers!r}")
    if isinstance(blas_threads, bool) or not isinstance(blas_threads, int) or blas_threads < 1:
        raise UsageError(f"--blas-threads must be an integer >= 1, got {blas_threads!r}")
    out, runs = Path(out), Path(runs) if runs is not None else DEFAULT_RUNS
    ensure_writable_dir(out / "cells")
    ensure_writable_dir(runs)
    if not serial:
        _dask()
    check_cells_fit_base(cells)
    done, todo, notes = plan(cells, out)
    if rerun_missing_weights:
        keep = []
        for rec in done:
            wfile = "adapter.safetensors" if rec["config"]["method"] == "lora" \
                else "model.safetensors"
            if (runs / rec["key"] / wfile).exists():
                keep.append(rec)
            else:
                todo.append(rec["config"])
                notes.append(f"cell {rec['key']}: weights missing under {runs}, running it again")
        done = keep
    for n in notes:
        log(n)
    log(f"{len(cells)} cells: {len(done)} already done, {len(todo)} to run"
        + ("" if not todo else " serially" if serial else
           f" on {scheduler}" if scheduler else
           f" on {workers} Dask worker(s) x {blas_threads} BLAS thread(s)"))
    t0 = time.perf_counter()
    results, shared = [], []
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress or not todo)
    forced = {cell_key(c) for c in todo} if rerun_missing_weights else set()
    pending = list(todo)

    def claim_next():
        """The next pending cell this process may run, with its lock held; None if every
        pending cell is claimed by another process (cells they finished are taken off)."""
        for cell in list(pending):
            key = cell_key(cell)
            if key not in forced and read_record(out / "cells" / f"{key}.json")[0] is not None:
                pending.remove(cell)          # another process finished it meanwhile
                shared.append(key)
                bar.update(1)
                continue
            lock = cell_lock(out, key)
            if lock.try_acquire(log) is not None:
                continue
            if key not in forced and read_record(out / "cells" / f"{key}.json")[0] is not None:
                lock.release()                # finished just before we claimed it
                pending.remove(cell)
                shared.append(key)
                bar.update(1)
                continue
            pending.remove(cell)
            return cell, lock
        return None

    waiting_said = False

    def wait_for_others():
        nonlocal waiting_said
        if not waiting_said:
            holders = {describe_lock(h) for c in pending
                       if (h := cell_lock(out, cell_key(c)).holder()) is not None}
            log(f"{len(pending)} cell(s) are being run by another process "
                f"({'; '.join(sorted(holders)) or 'just released'}); waiting for their records")
            waiting_said = True
        time.sleep(poll)

    if todo and serial:
        while pending:
            got = claim_next()
            if got is None:
                if pending:
                    wait_for_others()
                continue
            cell, lock = got
            try:
                results.append(run_cell(cell, str(out), str(runs), blas_threads))
            finally:
                lock.release()
            _tick(bar, results)
    elif todo:
        client, cluster = start_cluster(workers, blas_threads, scheduler)
        _, distributed = _dask()
        n_slots = workers if scheduler is None else max(
            workers, len(client.scheduler_info().get("workers", {})))
        flight = {}                            # future -> (key, lock)
        try:
            while pending or flight:
                while len(flight) < n_slots:
                    got = claim_next()
                    if got is None:
                        break
                    cell, lock = got
                    fut = client.submit(run_cell, cell, str(out.resolve()), str(runs.resolve()),
                                        blas_threads, key=f"cell-{cell_key(cell)}", pure=False,
                                        retries=0)
                    flight[fut] = (cell_key(cell), lock)
                if not flight:
                    if pending:
                        wait_for_others()
                    continue
                try:
                    finished, _ = distributed.wait(list(flight), return_when="FIRST_COMPLETED",
                                                   timeout=poll if pending else None)
                except TimeoutError:           # nothing finished: look at the pending cells
                    finished = []
                for fut in finished:
                    key, lock = flight.pop(fut)
                    try:
                        res = fut.result()
                    except Exception as e:  # noqa: BLE001 - a lost worker fails only its cell
                        res = {"key": key, "status": "failed",
                               "error": f"{type(e).__name__}: {e}".splitlines()[0],
                               "seconds": None}
                    lock.release()
                    results.append(res)
                    _tick(bar, results)
        finally:
            for _, lock in flight.values():
                lock.release()
            client.close()
            if cluster is not None:
                cluster.close()
    bar.close()
    failed = {r["key"]: r["error"] for r in results if r["status"] == "failed"}
    summary = {"done": [r["key"] for r in results if r["status"] == "done"],
               "skipped": [r["key"] for r in done], "shared": shared, "failed": failed,
               "seconds": time.perf_counter() - t0}
    if shared:
        log(f"{len(shared)} cell(s) were run by another process on this sweep meanwhile")
    if failed:
        by_key = {cell_key(c): c for c in todo}
        log(f"{len(failed)} cell(s) failed (the others are saved):")
        for k, err in failed.items():
            log(f"  {k} {describe(by_key[k])}: {err}")
    return summary


def _tick(bar, results):
    bar.update(1)
    n_failed = sum(r["status"] == "failed" for r in results)
    if n_failed:
        bar.set_postfix(failed=n_failed)


def describe(cell: dict) -> str:
    """One line naming a cell: ``milton lora r=8 q,v seed 0 (100 steps)``."""
    what = "full" if cell["method"] == "full" else \
        f"lora r={cell['r']} {target_label(cell['targets'])}"
    return f"{cell['task']} {what} seed {cell['seed']} ({cell['steps']} steps)"


MODES = {"serial": {"serial": True},
         "dask 2 workers x 1 BLAS thread": {"workers": 2, "blas_threads": 1},
         "dask 1 worker x 2 BLAS threads": {"workers": 1, "blas_threads": 2}}


def time_modes(cells, root, modes=None, log=print) -> dict:
    """Run the same ``cells`` once per execution mode (:data:`MODES`), each into a fresh
    ``<root>/<n>/``, and time them: ``{label: {"seconds", "cells_per_hour", "failed"}}`` plus
    ``"load_average"`` (1-minute, before and after: a shared machine skews every number)."""
    root = Path(root)
    out = {"cells": len(cells), "load_average_before": os.getloadavg()[0]}
    for i, (label, kw) in enumerate((modes or MODES).items()):
        d = root / str(i)
        if d.exists() and any(d.iterdir()):
            raise SweepError(f"{d} is not empty: time_modes needs fresh directories")
        t = time.perf_counter()
        res = run_sweep(cells, d / "out", d / "runs", progress=False, log=lambda *_: None, **kw)
        s = time.perf_counter() - t
        out[label] = {"seconds": s, "cells_per_hour": len(res["done"]) * 3600 / s,
                      "failed": len(res["failed"])}
        log(f"{label}: {len(res['done'])} cells in {s:.1f} s = {out[label]['cells_per_hour']:.0f} "
            "cells/hour")
    out["load_average_after"] = os.getloadavg()[0]
    return out


def temporary_runs_dir() -> Path:
    """A fresh scratch directory for cell weights (tests, benchmarks)."""
    return Path(tempfile.mkdtemp(prefix="minilora-ablate-"))
