"""``minilora ablate``: rank × target-set × seed sweeps of the fine-tuning harness, on Dask."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from minilora.cli.common import (
    POSITIVE,
    _formatter,
    add_overwrite,
    check_input_file,
    float_range,
    int_list,
    int_range,
    output,
    written,
)
from minilora.errors import UsageError
from minilora.experiments.ablate import MODES, run_sweep, time_modes
from minilora.experiments.ablate_records import (
    DEFAULT_RUNS,
    LINEARS,
    TARGET_NAMES,
    grid,
    load_records,
    parse_targets,
    summary_table,
)
from minilora.experiments.studies.delta_w import STUDIES, run_delta_w_study
from minilora.experiments.studies.delta_w_common import OUT as DELTA_W_OUT
from minilora.experiments.paths import command_line
from minilora.experiments.tasks import TASKS
from minilora.io import atomic_write_text


def _target_sets(text: str, flag: str = "--targets") -> list[tuple]:
    """``"q,v;q,k,v,o;all-linear"`` -> [("q", "v"), ("q", "k", "v", "o"), LINEARS]."""
    sets = []
    for part in text.split(";"):
        if not part.strip():
            continue
        names = parse_targets(part)
        bad = [n for n in names if n not in TARGET_NAMES]
        if not names or bad:
            raise UsageError(f"{flag} {text!r}: unknown target {', '.join(bad) or '(empty)'}; "
                             f"allowed: {', '.join(TARGET_NAMES)} or all-linear, sets separated "
                             f"by ';'")
        sets.append(names)
    return sets


def _pairs(text: str, flag: str = "--pairs") -> list[tuple]:
    """``"q:8;q,v:4;q,k,v,o:2"`` -> [(("q",), 8), (("q", "v"), 4), ...]."""
    out = []
    for part in text.split(";"):
        if not part.strip():
            continue
        targets, sep, r = part.rpartition(":")
        if not sep or not r.strip().isdigit() or int(r) < 1:
            raise UsageError(f"{flag} {text!r}: each item is TARGETS:R with R an integer >= 1 "
                             f"(e.g. 'q:8;q,v:4'), got {part!r}")
        out.append((_target_sets(targets, flag)[0], int(r)))
    return out


def cmd_ablate(args):
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise UsageError(f"--tasks: unknown task {', '.join(bad) or '(none)'}; allowed: "
                         f"{', '.join(TASKS)}")
    target_sets = _target_sets(args.targets) if args.targets else []
    pairs = _pairs(args.pairs) if args.pairs else []
    if args.ranks and not target_sets:
        raise UsageError("--ranks needs --targets (the target sets to adapt at each rank)")
    if target_sets and not args.ranks:
        raise UsageError("--targets needs --ranks")
    if not (args.ranks or pairs or args.full):
        raise UsageError("nothing to run: give --ranks with --targets, --pairs, or --full")
    if args.serial and args.scheduler:
        raise UsageError("--serial and --scheduler exclude each other")
    cores = os.cpu_count() or 1
    if not args.scheduler and args.workers > 4 * cores:
        raise UsageError(f"--workers {args.workers}: a LocalCluster of that many processes on "
                         f"{cores} CPU core(s) only competes for them; give at most {4 * cores} "
                         "(or --scheduler ADDRESS for a real cluster)")
    if args.blas_threads > cores:
        raise UsageError(f"--blas-threads {args.blas_threads} exceeds the {cores} CPU core(s) "
                         "here")
    if args.base is not None:
        check_input_file(args.base, "--base")
    fields = dict(lr=args.lr, lora_alpha=args.alpha, eval_batches=args.eval_batches,
                  batch_size=args.batch_size, block_size=args.block_size, base=args.base)
    cells = grid(tasks, args.ranks or [], target_sets, args.seeds, args.steps, full=args.full,
                 pairs=pairs, **fields)
    if args.time_modes:
        bench_dir = output(args.time_modes, "--time-modes", command="ablate", name="time-modes",
                           args=args)
        res = time_modes(cells, bench_dir)
        atomic_write_text(bench_dir / "time_modes.json", json.dumps(res, indent=2) + "\n")
        written("timings", bench_dir / "time_modes.json")
        return
    # a sweep directory is extended, never overwritten: a cell's record is keyed by its whole
    # configuration and written once; concurrent runs on one directory share the cells
    out = output(args.out, "--out", command="ablate", name="results", kind="sweep")
    runs = output(args.runs or DEFAULT_RUNS, "--runs", command="ablate", name="weights",
                  kind="sweep")
    res = run_sweep(cells, out, runs, workers=args.workers, blas_threads=args.blas_threads,
                    serial=args.serial, scheduler=args.scheduler,
                    progress=not args.no_progress)
    keys = {k for k in res["done"] + res["skipped"] + res["shared"]}
    recs = [r for r in load_records(out) if r["key"] in keys]
    table = summary_table(recs)
    print(table)
    path = Path(out) / "table.md"
    atomic_write_text(path, "# Ablation cells (mean ± std over seeds)\n\n"
                      + summary_table(load_records(out)) + "\n")
    print(f"{len(res['done'])} cell(s) run, {len(res['skipped'])} already done, "
          + (f"{len(res['shared'])} run by another process, " if res["shared"] else "")
          + f"{len(res['failed'])} failed in {res['seconds']:.0f} s; records in {out}/cells/, "
          f"table of all records: {path}")
    if res["failed"]:
        raise SystemExit(1)


def cmd_delta_w(args):
    only = [s for s in args.only.split(",") if s] if args.only else None
    bad = [s for s in only or [] if s not in STUDIES]
    if bad:
        raise UsageError(f"--only: unknown study {', '.join(bad)}; allowed: {', '.join(STUDIES)}")
    if not (Path(args.sweep) / "cells").is_dir():
        raise UsageError(f"--sweep {args.sweep!r} has no cells/ directory (make it with "
                         "minilora ablate --out ...)")
    if len(args.phi_ranks) != 2 or args.phi_ranks[0] >= args.phi_ranks[1]:
        raise UsageError(f"--phi-ranks takes two ranks, smaller first (e.g. 8,64), got "
                         f"{','.join(map(str, args.phi_ranks))}")
    budget = _pairs(args.budget, "--budget")
    if len(budget) != 1:
        raise UsageError(f"--budget takes one TARGETS:R (e.g. q:8), got {args.budget!r}")
    out = output(args.out, "--out", command="delta-w", name=Path(args.sweep).resolve().name,
                 kind="collection", args=args)
    run_delta_w_study(args.sweep, out, args.runs, only=only, steps=args.steps,
                      phi_ranks=tuple(args.phi_ranks), budget=budget[0],
                      made_by=command_line(), progress=not args.no_progress)
    written("studies", f"{out}/ (draw them: minilora figures --results {out.parent})"
            if out.name == "delta_w" else out)


def add_parsers(sub):
    """Add this group's subcommands to the ``minilora`` parser."""
    s = sub.add_parser("ablate", help="rank / target-set / seed sweeps of the fine-tuning "
                       "harness on Dask, one JSON record per cell (resumable)",
                       formatter_class=_formatter, epilog=textwrap.dedent(f"""\
            Every cell is one fine-tuning run; its record <out>/cells/<key>.json (key = hash
            of the full configuration) holds the finetune result and the ΔW summary of every
            adapted matrix. A re-run skips finished cells and re-runs corrupt ones; the
            trained weights stay under --runs (git-ignored). lora_alpha is 2r unless --alpha.

            examples:
              minilora ablate --ranks 1,2,4 --targets "q,v;q,k,v,o" --seeds 0,1,2 \\
                  --tasks milton --steps 200 --out results/ablate
              minilora ablate --ranks 8 --targets all-linear --seeds 0 --full --serial
              minilora ablate --pairs "q:8;k:8;v:8;o:8;q,k:4;q,v:4;q,k,v,o:2" --seeds 0,1
              minilora ablate ... --scheduler tcp://10.0.0.5:8786     # an existing cluster

            targets: {', '.join(TARGET_NAMES)}; all-linear = {','.join(LINEARS)}
            """))
    s.add_argument("--ranks", type=int_list(1), default=None, help="comma-separated LoRA ranks")
    s.add_argument("--targets", default=None,
                   help="target sets separated by ';', modules within a set by ',' "
                        "(e.g. 'q,v;all-linear')")
    s.add_argument("--pairs", default=None,
                   help="explicit TARGETS:R cells separated by ';' (a fixed parameter budget: "
                        "'q:8;q,v:4;q,k,v,o:2')")
    s.add_argument("--full", action="store_true", help="add full fine-tuning (one per seed)")
    s.add_argument("--seeds", type=int_list(0), default=[0], help="comma-separated (default 0)")
    s.add_argument("--tasks", default="milton", help=f"comma-separated: {', '.join(TASKS)} "
                   "(default milton)")
    s.add_argument("--steps", type=POSITIVE, default=200, help="training steps (default 200)")
    s.add_argument("--lr", type=float_range(0, 1, lo_open=True, hi_open=True), default=None,
                   help="peak learning rate (default: the method's, 5e-3 LoRA, 1e-3 full)")
    s.add_argument("--alpha", type=float_range(0, lo_open=True), default=None,
                   help="lora_alpha for every rank (default 2r)")
    s.add_argument("--batch-size", type=POSITIVE, default=8, help="default 8")
    s.add_argument("--block-size", type=int_range(2), default=128,
                   help="training window (default 128, at most the base's context)")
    s.add_argument("--eval-batches", type=POSITIVE, default=16,
                   help="fixed windows for the held-out and Shakespeare losses (default 16)")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    s.add_argument("--out", default=None,
                   help="records directory, extended by every run (default runs/ablate/results; "
                        "the committed sweep is results/ablate)")
    s.add_argument("--runs", default=None,
                   help=f"where each cell keeps its weights, in a folder named by its key "
                        f"(default {DEFAULT_RUNS})")
    s.add_argument("--workers", type=POSITIVE, default=2,
                   help="LocalCluster worker processes, 1 thread each (default 2)")
    s.add_argument("--blas-threads", type=POSITIVE, default=1,
                   help="BLAS threads per worker (default 1)")
    s.add_argument("--serial", action="store_true",
                   help="run in this process, one cell after another (debugging; no Dask)")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use a running Dask scheduler (e.g. tcp://host:8786) instead of a "
                        "LocalCluster")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--time-modes", default=None, metavar="DIR",
                   help="benchmark: run the cells once per mode (" + "; ".join(MODES) + ") into "
                        "the new directory DIR and report cells per hour (--out is not touched)")
    add_overwrite(s, "the --time-modes directory")
    s.set_defaults(func=cmd_ablate)

    s = sub.add_parser("delta-w", help="the ΔW studies on a sweep's cells: φ, amplification, "
                       "full FT vs LoRA, intruder dimensions, fixed budget (JSON for figures)",
                       formatter_class=_formatter, epilog=textwrap.dedent(f"""\
            Reads <sweep>/cells/*.json and the weights the cells kept under --runs; writes one
            JSON per study into --out; `minilora figures` draws them. A study (or part of one)
            whose cells the sweep lacks is skipped with one line naming the `minilora ablate`
            command that adds them; the others run.

            examples:
              minilora ablate --ranks 2,8 --targets q,v --seeds 0,1 --full --steps 50 \
                  --out runs/study/ablate
              minilora delta-w --sweep runs/study/ablate --out runs/study/delta_w
              minilora figures --results runs/study
              minilora delta-w --only phi,intruders
              minilora delta-w --out results/delta_w --overwrite   # the committed studies

            studies: {', '.join(STUDIES)}
            """))
    s.add_argument("--sweep", default="results/ablate", help="the sweep's records (default "
                   "results/ablate)")
    s.add_argument("--runs", default=str(DEFAULT_RUNS),
                   help=f"the cells' weights (default {DEFAULT_RUNS})")
    s.add_argument("--out", default=None,
                   help="where the studies' JSON go (default: a new runs/delta-w/NAME, NAME the "
                        f"sweep directory's; the committed ones: --out {DELTA_W_OUT} --overwrite)")
    add_overwrite(s, "the studies' JSON files in --out")
    s.add_argument("--only", default=None, help="comma-separated studies (default: all)")
    s.add_argument("--steps", type=POSITIVE, default=None,
                   help="use the cells of this step count (needed if the sweep mixes several)")
    s.add_argument("--phi-ranks", type=int_list(1), default=[8, 64],
                   help="the two ranks φ compares (default 8,64)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--budget", default="q:8",
                   help="TARGETS:R whose trainable parameters are the fixed budget (default q:8)")
    s.set_defaults(func=cmd_delta_w)
