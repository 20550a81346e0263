"""``minilora svd``: the ΔW analysis of one LoRA adapter (PEFT directory or minilora file).

Every input is checked before any work starts (paths, regex, numbers, the pair's module names,
the base weights, the output directory); a mistake is one line naming the flag, exit 2, and
nothing is written. Then one record per module (a progress bar on a terminal), the summary table
on stdout, and ``summary.csv``, ``summary.md``, ``records.json`` and the figures in ``--out``.
"""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from tqdm.auto import tqdm

from minilora.analysis import SUBSPACES
from minilora.cli.common import POSITIVE, _formatter, add_overwrite, float_range, output
from minilora.errors import MiniloraError, UsageError
from minilora.experiments.figures.svd import svd_figures
from minilora.experiments.paths import base_model_path
from minilora.experiments.svd_report import (
    adapter_label,
    analyze,
    check_pair,
    is_peft,
    open_adapter,
    open_base,
    select_modules,
)
from minilora.experiments.svd_tables import summary_table, write_report
from minilora.io import ensure_writable_dir


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


def _check_matplotlib() -> None:
    try:
        import matplotlib  # lazy: optional (test/chapters extras); probed only to fail early
        del matplotlib
    except ImportError:
        raise UsageError("the figures need matplotlib (pip install 'minilora[chapters]'); or "
                         "pass --no-figures for the tables alone") from None


def cmd_svd(args):
    # -- every check before any work (nothing is written until the analysis is done) ----------
    if args.modules is not None:
        try:
            re.compile(args.modules)
        except re.error as e:
            raise UsageError(f"--modules {args.modules!r} is not a regular expression ({e})") \
                from None
    if args.base is not None and args.no_base:
        raise UsageError("--base and --no-base exclude each other")
    out = output(args.out, "--out", command="svd", name=adapter_label(args.path), args=args)
    adapter = _flag("PATH", open_adapter, _existing("PATH", args.path), args.adapter_name)
    names = _flag("--modules", select_modules, adapter, args.modules)
    other = None
    if args.other is not None:
        other = _flag("--other", open_adapter, _existing("--other", args.other),
                      args.adapter_name)
        _flag("--other", check_pair, adapter, other, names)
    base_path, base_name = args.base, args.base
    if base_path is None and not args.no_base and not is_peft(adapter):
        base_path = _flag("--base", base_model_path)       # minilora adapters: the shipped base
        base_name = "shipped"
    base = None
    if base_path is not None:
        base = _flag("--base", open_base, adapter, _existing("--base", base_path))
    if not args.no_figures:
        _check_matplotlib()
    # -- the analysis ---------------------------------------------------------------------------
    bar = tqdm(total=len(names), desc="svd", unit="module", file=sys.stderr, leave=False,
               dynamic_ncols=True, disable=args.no_progress or not sys.stderr.isatty())

    def progress(done, total, module):
        bar.set_postfix_str(module, refresh=False)
        bar.update(1)

    try:
        records = analyze(adapter, other, base, names=names, top_k=args.top_k, eps=args.eps,
                          subspace=args.subspace, full_svd_max_dim=args.full_svd_max_dim,
                          base_rank=args.base_rank, progress=progress)
    except MiniloraError as e:     # a check inside the analysis (base weights of a module)
        raise UsageError(f"{'--base: ' if base is not None else ''}{e}") from None
    finally:
        bar.close()

    # -- the report -----------------------------------------------------------------------------
    print(summary_table(records))
    title = adapter_label(args.path) + (f" vs {adapter_label(args.other)}" if other else "")
    meta = {"adapter": str(args.path), "other": None if other is None else str(args.other),
            "base": None if base_name is None else str(base_name),
            "adapter_kind": "peft" if is_peft(adapter) else "minilora",
            "options": {"adapter_name": args.adapter_name, "modules": args.modules,
                        "top_k": args.top_k, "eps": args.eps, "subspace": args.subspace,
                        "full_svd_max_dim": args.full_svd_max_dim, "base_rank": args.base_rank}}
    _flag("--out", ensure_writable_dir, out)
    paths = write_report(out, records, meta, f"ΔW analysis of {title}")
    if not args.no_figures:
        paths += svd_figures(records, out, title)
    print(f"written: {', '.join(str(p) for p in paths)}")


def add_parsers(sub):
    """``minilora svd``."""
    s = sub.add_parser(
        "svd", help="ΔW analysis of a LoRA adapter: spectrum, φ vs another, amplification, "
                    "intruders", formatter_class=_formatter,
        description=textwrap.dedent("""\
            The ΔW = s·B·A analysis of a LoRA adapter, module by module, in float64 NumPy (no
            torch): the singular spectrum (from the r x r core: no d x d matrix), energy and
            effective rank; with --other, the subspace similarity φ against a second adapter and
            the random baseline max(i, j)/d; with base weights, the amplification factor and the
            intruder dimensions. PATH is a PEFT adapter directory (adapter_model.safetensors +
            adapter_config.json, any model; --base: a .safetensors file or a sharded directory)
            or a minilora adapter file (--base: a minilora checkpoint, the shipped base model by
            default)."""),
        epilog=textwrap.dedent("""\
            examples:
              minilora svd tests/data/peft/llama_lora --base tests/data/peft/base.safetensors
              minilora svd tests/data/peft/llama_lora --other tests/data/peft/llama_lora_b \\
                  --modules 'q_proj|v_proj' --out /tmp/svd-pair
              minilora svd runs/milton/adapter.safetensors --top-k 10 --eps 0.5
            """))
    s.add_argument("path", metavar="PATH", help="PEFT adapter directory or minilora adapter file")
    s.add_argument("--other", metavar="PATH", default=None,
                   help="a second adapter of the same kind and modules: φ between the two")
    s.add_argument("--base", metavar="PATH", default=None,
                   help="base weights: safetensors file/sharded dir (PEFT) or minilora "
                        "checkpoint (default for minilora adapters: the shipped base)")
    s.add_argument("--no-base", action="store_true",
                   help="minilora adapters: skip the base (no amplification, no intruders)")
    s.add_argument("--adapter-name", metavar="NAME", default=None,
                   help="PEFT files holding several adapters: the one to analyse (both PATHs)")
    s.add_argument("--modules", metavar="REGEX", default=None,
                   help="analyse only module paths where this regular expression is found")
    s.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: a new runs/svd/<adapter name>)")
    s.add_argument("--top-k", type=POSITIVE, default=10, metavar="K",
                   help="intruders: examine the top k singular vectors of W0 + ΔW")
    s.add_argument("--eps", type=float_range(0, 1, lo_open=True), default=0.5, metavar="E",
                   help="intruders: cosine threshold ε")
    s.add_argument("--subspace", choices=SUBSPACES, default="A",
                   help="φ compares: A = right singular vectors of A (the LoRA paper), B = left "
                        "of B, delta_in / delta_out = right / left of ΔW")
    s.add_argument("--full-svd-max-dim", type=POSITIVE, default=1024, metavar="N",
                   help="base matrices wider than this use a randomized SVD")
    s.add_argument("--base-rank", type=POSITIVE, default=64, metavar="M",
                   help="randomized SVD: top singular vectors of W0 kept")
    add_overwrite(s, "the report in --out")
    s.add_argument("--no-figures", action="store_true", help="write the tables only")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_svd)
