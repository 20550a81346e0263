"""``minilora bench``: speed and memory measured side by side."""
from __future__ import annotations

import textwrap

from minilora.bench import MEASUREMENTS, run_bench
from minilora.cli.common import (
    POSITIVE,
    _add_backend,
    _formatter,
    _use_backend,
    add_overwrite,
    output,
)

DEFAULT_CONFIGS, DEFAULT_STEPS = "small,medium", 10


def cmd_bench(args):
    out = None
    if args.out:  # JSON only when asked for
        out = output(args.out, "--out", command="bench", name="bench", suffix=".json",
                     kind="file", args=args)
    _use_backend(args)
    configs, steps, extra = args.configs, args.steps, {}
    if args.quick:  # a smoke run: every measurement once, on the small config, seconds each
        configs = "small" if args.configs == DEFAULT_CONFIGS else args.configs
        steps = 2 if args.steps == DEFAULT_STEPS else args.steps
        extra = dict(warmup=1, sgemm_sizes=(512,), pause_s=0.0)
    run_bench(configs=configs.split(","), steps=steps, threads=args.threads,
              torch_compare=not args.no_torch, out=out,
              only=args.only.split(",") if args.only else None, **extra)


def add_parsers(sub):
    """Add this group's subcommands to the ``minilora`` parser."""
    s = sub.add_parser("bench", help="speed/memory benchmarks (ratios measured in one run)",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora bench                         # small and medium, vs PyTorch if installed
              minilora bench --configs small --steps 5 --no-torch
              minilora bench --out results/bench.json --overwrite
              minilora bench --configs small --only peft_latency   # adapters vs LoRA latency
              minilora bench --quick                 # smoke run: small, 2 steps, ~2 minutes
            """))
    s.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated: small,medium")
    s.add_argument("--steps", type=POSITIVE, default=DEFAULT_STEPS,
                   help="timed steps per measurement")
    s.add_argument("--quick", action="store_true",
                   help="smoke run: the small config, 2 timed steps after 1 warm-up, a small "
                        "sgemm (explicit --configs / --steps still apply); figures are rough")
    s.add_argument("--threads", type=POSITIVE, default=2, help="minilora's thread pool (one BLAS thread each) and torch's threads (default 2)")
    s.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    s.add_argument("--only", default=None,
                   help=f"comma-separated measurements ({', '.join(n for n, _ in MEASUREMENTS)};"
                        " default: all)")
    s.add_argument("--out", default=None, help="also write the results as JSON here")
    add_overwrite(s, "the --out file")
    _add_backend(s)
    s.set_defaults(func=cmd_bench)

