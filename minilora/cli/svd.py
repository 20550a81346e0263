"""``minilora svd``: the ΔW analysis of one or many LoRA adapters (PEFT directories or minilora
files).

Every input is checked before any work starts (paths, regex, numbers, the adapters' modules,
finite factors, the base weights, the output directory); a mistake is one line naming the flag
(and the file, module and tensor), exit 2, and nothing is written. Then one task per module (all
adapters that hold it; serially, or on Dask with ``--workers`` / ``--scheduler``), a progress
bar on a terminal, the report on stdout, and its files in ``--out``.
"""
from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from minilora.analysis import INTRUDER_MODES, SUBSPACES, BaseSvdCache, default_cache_dir
from minilora.analysis.exact_intruders import CACHE_ENV, cache_report_text
from minilora.cli.common import POSITIVE, _formatter, add_overwrite, float_range, output
from minilora.errors import MiniloraError, UsageError
from minilora.experiments.ablate import _dask
from minilora.experiments.figures.svd import svd_figures
from minilora.experiments.paths import base_model_path
from minilora.experiments.svd_report import (
    AdapterInput,
    check_pair,
    expand_adapter_paths,
    is_peft,
    open_adapter,
    prepare,
    run_analysis,
    select_modules,
    unique_labels,
)
from minilora.experiments.svd_tables import run_text, write_report


def _flag(flag: str, fn, *a):
    """``fn(*a)``, with any user error re-raised as a UsageError naming ``flag``."""
    try:
        return fn(*a)
    except UsageError:
        raise
    except MiniloraError as e:
        raise UsageError(f"{flag}: {e}") from None


def _existing(flag: str, path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {str(p)!r} does not exist")
    return p


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # lazy: figures only; probed to skip them with one line when missing
        del matplotlib
        return True
    except ImportError:
        return False


def _cache_commands(args) -> bool:
    """``--cache-report`` / ``--clear-cache``: act on the cache and say so; True if one ran."""
    if not (args.cache_report or args.clear_cache):
        return False
    if args.paths:
        raise UsageError("--cache-report and --clear-cache act on the cache alone; give no PATH")
    cache = BaseSvdCache(args.cache_dir or default_cache_dir())
    if args.clear_cache:
        before = cache.clear()
        print(f"cleared: {cache_report_text(before)}")
    else:
        print(cache_report_text(cache.report()))
    return True


def cmd_svd(args):
    if _cache_commands(args):
        return
    # -- every check before any work (nothing is written until the analysis is done) ----------
    if not args.paths:
        raise UsageError("PATH: give one or more adapters (PEFT directories, minilora adapter "
                         "files, or a directory of PEFT adapters)")
    if args.modules is not None:
        try:
            re.compile(args.modules)
        except re.error as e:
            raise UsageError(f"--modules {args.modules!r} is not a regular expression ({e})") \
                from None
    if args.base is not None and args.no_base:
        raise UsageError("--base and --no-base exclude each other")
    if args.serial and args.scheduler:
        raise UsageError("--serial and --scheduler exclude each other")
    if args.no_cache and args.cache_dir:
        raise UsageError("--no-cache and --cache-dir exclude each other")
    paths = [_existing("PATH", p) for p in args.paths]
    paths = _flag("PATH", expand_adapter_paths, paths)
    if args.other is not None and len(paths) > 1:
        raise UsageError("--other compares one adapter with another; with several PATHs every "
                         "pair is compared already (leave --other out)")
    labels = unique_labels(paths)
    out = output(args.out, "--out", command="svd",
                 name=labels[0] if len(labels) == 1 else f"{labels[0]}+{len(labels) - 1}",
                 args=args)
    inputs = []
    for p, label in zip(paths, labels):
        adapter = _flag("PATH", open_adapter, p, args.adapter_name)
        names = _flag("--modules", select_modules, adapter, args.modules)
        inputs.append(AdapterInput(label, str(p), adapter, names))
    kinds = {inp.kind for inp in inputs}
    if len(kinds) > 1:
        raise UsageError("PATH: the adapters must be of one kind (all PEFT directories or all "
                         "minilora adapter files)")
    shapes = {}
    for inp in inputs:
        for n in inp.names:
            m = inp.adapter.modules[n]
            if shapes.setdefault(n, (m.d_out, m.d_in)) != (m.d_out, m.d_in):
                raise UsageError(f"PATH: module {n} is {shapes[n]} in one adapter and "
                                 f"{(m.d_out, m.d_in)} in {inp.path}: not the same model")
    other = None
    if args.other is not None:
        other = _flag("--other", open_adapter, _existing("--other", args.other),
                      args.adapter_name)
        _flag("--other", check_pair, inputs[0].adapter, other, inputs[0].names)
    base_path, base_name, base_loaded = args.base, args.base, None
    peft = is_peft(inputs[0].adapter)
    if base_path is None and not args.no_base and not peft:
        base_path = _flag("--base", base_model_path)       # minilora adapters: the shipped base
        base_name = "shipped"
    if base_path is not None:
        base_path = _existing("--base", base_path)
        if not peft:
            base_loaded = {}
            for inp in inputs:
                base_loaded.update(_flag("--base", inp.adapter.base_weights, base_path))
            base_path = None
    try:
        source, warnings, problems = prepare(inputs, base_path, args.keep_going, base_loaded)
    except MiniloraError as e:
        raise UsageError(f"{'--base: ' if args.base else ''}{e}") from None
    if args.auto:
        # a LocalCluster costs seconds to start: worth it for large base matrices only
        big = (source is not None and hasattr(source, "plan") and sum(
            8 * int(np.prod(source.weights.shape(p.key))) for p in source.plan.values())
            > AUTO_DASK_BYTES)
        args.serial = not (big and _dask_installed())
    if not args.serial and not peft:
        args.serial = True                 # minilora adapters are small: always in-process
    if not args.serial:
        try:
            _dask()
        except MiniloraError as e:
            raise UsageError(f"{e} (or pass --serial)") from None
    figures = not args.no_figures
    if figures and not _have_matplotlib():
        print("figures skipped: matplotlib is not installed (pip install matplotlib); the "
              "tables are written", file=sys.stderr)
        figures = False
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    # -- the analysis ---------------------------------------------------------------------------
    total = len({n for inp in inputs for n in inp.names})
    bar = tqdm(total=total, desc="svd", unit="module", file=sys.stderr, leave=False,
               dynamic_ncols=True, disable=args.no_progress or not sys.stderr.isatty())

    def progress(done, total, module):
        bar.set_postfix_str(module, refresh=False)
        bar.update(1)

    opts = {"top_k": args.top_k, "eps": args.eps, "subspace": args.subspace,
            "intruders": args.intruders, "full_svd_max_dim": args.full_svd_max_dim,
            "base_rank": args.base_rank}
    try:
        run = run_analysis(inputs, source, other, problems=problems, opts=opts,
                           cache_dir=cache_dir, use_cache=not args.no_cache,
                           keep_going=args.keep_going, serial=args.serial,
                           scheduler=args.scheduler, workers=args.workers, progress=progress)
    except MiniloraError as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    run.warnings = warnings + run.warnings
    if not any(a.records for a in run.adapters):
        first = next((t["reason"] for a in run.adapters for t in a.not_analysed
                      if t["tensor"] is None), "nothing was selected")
        raise UsageError(f"no module could be analysed; the first: {first}")
    # -- the report -----------------------------------------------------------------------------
    title = " vs ".join([inp.label for inp in inputs]
                        + ([Path(args.other).name] if args.other else []))
    print(run_text(run), end="")
    meta = {"base": None if base_name is None else str(base_name),
            "other": None if args.other is None else str(args.other),
            "options": {"adapter_name": args.adapter_name, "modules": args.modules,
                        "top_k": args.top_k, "eps": args.eps, "subspace": args.subspace,
                        "intruders": args.intruders, "full_svd_max_dim": args.full_svd_max_dim,
                        "base_rank": args.base_rank, "keep_going": args.keep_going}}
    paths = write_report(out, run, meta, f"ΔW analysis of {title}")
    if figures:
        paths += svd_figures(run, out, title)
    failed = sum(1 for a in run.adapters for t in a.not_analysed if t["tensor"] is None)
    if run.cache is not None and run.cache.get("path") and (run.cache["hits"]
                                                             or run.cache["misses"]):
        print(f"{cache_report_text(run.cache)} (this run: {run.cache['hits']} read, "
              f"{run.cache['misses']} computed in {run.cache['seconds_computing']:.1f} s)")
    print(f"{run.execution}, {run.seconds:.1f} s; written: {', '.join(str(p) for p in paths)}")
    if failed:
        print(f"minilora: {failed} module(s) could not be analysed (--keep-going): see 'not "
              f"analysed' in {out / 'summary.md'}", file=sys.stderr)


def add_parsers(sub):
    """``minilora svd``."""
    s = sub.add_parser(
        "svd", help="ΔW analysis of LoRA adapters: spectrum, φ between them, amplification, "
                    "exact intruders", formatter_class=_formatter,
        description=textwrap.dedent(f"""\
            The ΔW = s·B·A analysis of LoRA adapters, module by module, in float64 NumPy (no
            torch): the singular spectrum (from the r x r core: no d x d matrix), energy,
            effective and stable rank, rank suggestions; with several adapters, the subspace
            similarity φ between every pair against the random null, and a merge triage; with
            base weights, ‖ΔW‖2/‖W‖2, the amplification factor and the intruder dimensions
            (the paper's exact count at any size: W0's SVD is computed once per base matrix and
            cached, ${CACHE_ENV} or --cache-dir). PATH is a PEFT adapter directory
            (adapter_model.safetensors + adapter_config.json, any model), a directory of them,
            or a minilora adapter file (--base: a minilora checkpoint, the shipped base model by
            default). Every tensor the analysis leaves out is listed with its reason."""),
        epilog=textwrap.dedent("""\
            examples:
              minilora svd tests/data/peft/llama_lora --base tests/data/peft/base.safetensors
              minilora svd tests/data/peft/llama_lora tests/data/peft/llama_lora_b \\
                  --modules 'q_proj|v_proj' --out /tmp/svd-pair
              minilora svd runs/milton/adapter.safetensors --top-k 10 --eps 0.5
              minilora svd big_adapter --base llama-7b/ --workers 2     # on a local Dask cluster
              minilora svd --cache-report              # where the base SVDs are, how big
            """))
    s.add_argument("paths", metavar="PATH", nargs="*",
                   help="PEFT adapter directories (or a directory of them) or minilora adapter "
                        "files")
    s.add_argument("--other", metavar="PATH", default=None,
                   help="a second adapter of the same kind and modules: φ grids against it")
    s.add_argument("--base", metavar="PATH", default=None,
                   help="base weights: safetensors file/sharded dir (PEFT) or minilora "
                        "checkpoint (default for minilora adapters: the shipped base)")
    s.add_argument("--no-base", action="store_true",
                   help="minilora adapters: skip the base (no amplification, no intruders)")
    s.add_argument("--adapter-name", metavar="NAME", default=None,
                   help="PEFT files holding several adapters: the one to analyse (all PATHs)")
    s.add_argument("--modules", metavar="REGEX", default=None,
                   help="analyse only module paths where this regular expression is found")
    s.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: a new runs/svd/<adapter name>)")
    s.add_argument("--top-k", type=POSITIVE, default=10, metavar="K",
                   help="intruders: examine the top k singular vectors of W0 + ΔW")
    s.add_argument("--eps", type=float_range(0, 1, lo_open=True), default=0.5, metavar="E",
                   help="intruders: cosine threshold ε")
    s.add_argument("--intruders", choices=INTRUDER_MODES, default="exact",
                   help="exact: the paper's count (full base spectrum, W0's SVD cached); "
                        "approx: a randomized SVD of large W0, the count as a range; off")
    s.add_argument("--subspace", choices=SUBSPACES, default="A",
                   help="φ compares: A = right singular vectors of A (the LoRA paper), B = left "
                        "of B, delta_in / delta_out = right / left of ΔW")
    s.add_argument("--full-svd-max-dim", type=POSITIVE, default=1024, metavar="N",
                   help="--intruders approx: base matrices wider than this use a randomized SVD")
    s.add_argument("--base-rank", type=POSITIVE, default=64, metavar="M",
                   help="--intruders approx: top singular vectors of W0 kept")
    s.add_argument("--cache-dir", metavar="DIR", default=None,
                   help=f"where W0's SVDs are kept (default: ${CACHE_ENV}, else "
                        f"~/.cache/minilora/base-svd)")
    s.add_argument("--no-cache", action="store_true",
                   help="compute W0's SVDs without keeping them")
    s.add_argument("--cache-report", action="store_true",
                   help="print where the cache is and its size, and stop")
    s.add_argument("--clear-cache", action="store_true", help="empty the cache and stop")
    s.add_argument("--keep-going", action="store_true",
                   help="a module that cannot be analysed (NaN, no base weight) is listed under "
                        "'not analysed' and the others go on (default: stop, naming it)")
    s.add_argument("--serial", action="store_true",
                   help="one module after another in this process (default: a local Dask "
                        "cluster when the base weights exceed 256 MiB and Dask is installed, "
                        "else this)")
    s.add_argument("--workers", type=POSITIVE, default=None, metavar="N",
                   help="run the modules on a local Dask cluster of N worker processes, one "
                        "BLAS thread each (default when Dask runs: min(2, cores))")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the modules on a running Dask scheduler (e.g. tcp://host:8786); "
                        "its workers need the files and the cache directory at the same paths")
    add_overwrite(s, "the report in --out")
    s.add_argument("--no-figures", action="store_true", help="write the tables only")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_entry)


#: base weights (float64 bytes) above which the default run goes to a local Dask cluster
AUTO_DASK_BYTES = 256 * 2 ** 20


def _dask_installed() -> bool:
    try:
        import distributed  # lazy: optional (the ablate extra); probed for the default
        del distributed
        return True
    except ImportError:
        return False


def _entry(args):
    # the default: a local Dask cluster for large base matrices, else this process
    args.auto = not (args.serial or args.workers is not None or args.scheduler is not None)
    if args.workers is None:
        args.workers = min(2, os.cpu_count() or 1)
    return cmd_svd(args)
