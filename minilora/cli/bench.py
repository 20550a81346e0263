"""``minilora bench``: speed and memory measured side by side; ``minilora gpu-check``: the CuPy
path proven on a CUDA machine."""
from __future__ import annotations

import sys
import textwrap
import time

from minilora.bench import MEASUREMENTS, run_bench
from minilora.bench.gpu_check import run_check
from minilora.cli.common import (
    POSITIVE,
    _add_backend,
    _formatter,
    _use_backend,
    add_overwrite,
    output,
    written,
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


def cmd_gpu_check(args):
    out = output(args.out, "--out", command="gpu-check", name=time.strftime("%Y%m%d-%H%M%S"),
                 args=args)
    result = run_check(out, quick=args.quick, standin=args.standin, tests=not args.no_tests)
    failed = [n for n, p in result["parts"].items() if p["status"] == "failed"]
    written("the GPU check (gpu_check.json, gpu_check.md)", out)
    if failed:
        print(f"minilora gpu-check: {len(failed)} part(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        raise SystemExit(1)


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

    s = sub.add_parser("gpu-check", help="prove the CuPy path on a CUDA machine: GPU tests, "
                                         "gradcheck, the NF4 kernel byte for byte, the bench "
                                         "(~8 minutes)",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora gpu-check                     # on a machine with CuPy and a GPU
              minilora gpu-check --quick             # a smoke run (a minute)
              .ci/gpu-check                          # the same on a bare CUDA machine
            The parts (device, tests, gradcheck, nf4, bench) are in
            minilora/bench/gpu_check.py; results: OUT/gpu_check.json and OUT/gpu_check.md.
            """))
    s.add_argument("--out", default=None,
                   help="run directory (default: runs/gpu-check/<date-time>)")
    s.add_argument("--quick", action="store_true",
                   help="a smoke run: small tensors, the micro bench config, 2 steps")
    s.add_argument("--standin", action="store_true",
                   help="run on the strict CuPy stand-in of the tests (MINILORA_CUPY_STANDIN "
                        "names tests/fake_cupy): what CI does; no GPU needed, figures "
                        "meaningless")
    s.add_argument("--no-tests", action="store_true", help="skip the pytest part")
    add_overwrite(s, "the run directory")
    s.set_defaults(func=cmd_gpu_check)

