"""``minilora adapter truncate``: the best rank-k version of an adapter (PEFT directory or minilora
file), with the energy each module keeps (:mod:`minilora.experiments.truncate`)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from minilora.analysis.decisions import RANK_CRITERIA
from minilora.cli.common import POSITIVE, _formatter, add_overwrite, float_range, output
from minilora.errors import MiniloraError, UsageError
from minilora.experiments.svd_report import adapter_label, is_peft, open_adapter
from minilora.experiments.truncate import truncate_adapter, truncation_table


def cmd_adapter_truncate(args):
    src = Path(args.adapter)
    if not src.exists():
        raise UsageError(f"adapter {str(src)!r} does not exist")
    if sum(x is not None for x in (args.rank, args.energy, args.suggested)) != 1:
        raise UsageError("give exactly one of --rank K, --energy E, --suggested CRITERION")
    try:
        peft = is_peft(open_adapter(src))
    except MiniloraError as e:
        raise UsageError(f"adapter: {e}") from None
    out = output(args.out, "--out", command="truncate", name=adapter_label(src),
                 kind="run" if peft else "file", suffix="" if peft else ".safetensors",
                 args=args)
    try:
        report = truncate_adapter(src, out, rank=args.rank, energy=args.energy,
                                  criterion=args.suggested)
    except MiniloraError as e:
        raise UsageError(str(e)) from None
    print(truncation_table(report))
    print(f"{'PEFT directory' if peft else 'adapter file'} written to {out}")


def add_parser(asub) -> None:
    """``minilora adapter truncate`` (under the ``adapter`` command's subparsers)."""
    s = asub.add_parser(
        "truncate", help="the best rank-k version of an adapter (PEFT dir or adapter file)",
        formatter_class=_formatter,
        description=textwrap.dedent("""\
            Write an adapter whose every ΔW = s·B·A is replaced by its best rank-k approximation
            (Eckart-Young), and print the energy ‖ΔW_k‖F² / ‖ΔW‖F² each module keeps. A PEFT
            directory gives a PEFT directory (per-module ranks in rank_pattern / alpha_pattern,
            scale 1, every other tensor copied); a minilora adapter file gives an adapter file
            (per-module ranks zero-padded to the largest)."""),
        epilog=textwrap.dedent("""\
            examples:
              minilora adapter truncate tests/data/peft/llama_lora --rank 2 --out /tmp/r2
              minilora adapter truncate my_peft_adapter --energy 0.95
              minilora adapter truncate chapters/assets/milton-lora/adapter.safetensors \\
                  --suggested rank_95 --out /tmp/milton-r95.safetensors
            """))
    s.add_argument("adapter", help="PEFT adapter directory or minilora adapter file")
    s.add_argument("--rank", type=POSITIVE, default=None, metavar="K",
                   help="the same rank k for every module (capped at its r)")
    s.add_argument("--energy", type=float_range(0, 1, lo_open=True), default=None, metavar="E",
                   help="per module, the smallest k keeping this fraction of ‖ΔW‖F²")
    s.add_argument("--suggested", choices=RANK_CRITERIA, default=None,
                   help="per module, the rank minilora svd suggests by this criterion")
    s.add_argument("--out", default=None,
                   help="where to write (default: a new runs/truncate/NAME)")
    add_overwrite(s, "the --out adapter")
    s.set_defaults(func=cmd_adapter_truncate)
