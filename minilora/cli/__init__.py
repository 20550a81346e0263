"""The ``minilora`` command line: parse, validate, dispatch. One module per command group.

* :mod:`~minilora.cli.model`     tour, pretrain, sample, gradcheck
* :mod:`~minilora.cli.finetune`  finetune, results, figures
* :mod:`~minilora.cli.quant`     quantize, loftq, paged-demo
* :mod:`~minilora.cli.adapters`  adapter (merge | export-peft | import-peft | claim), score
* :mod:`~minilora.cli.bench`     bench
* :mod:`~minilora.cli.course`    grade (homework without nbgrader)
* :mod:`~minilora.cli.svd`       svd (the ΔW analysis of any LoRA adapter)
* :mod:`~minilora.cli.ablate`    ablate, delta-w (rank sweeps on Dask, the ΔW studies)

One error policy: a :class:`~minilora.errors.MiniloraError` (a user mistake: a bad flag, a broken
file, an unusable backend) is printed as one line ``minilora: error: ...`` and exits 2; any other
exception is a bug in minilora and keeps its traceback. ``MINILORA_DEBUG=1`` shows the traceback
for user errors too. Ctrl-C exits 130.

One output policy: a command that writes opens each output with :func:`minilora.cli.common.output`
(default under ``runs/<command>/``, nothing replaced without ``--overwrite``, one writer at a
time); :func:`main` closes them when the command ends, whatever happened.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from minilora import backend, threads
from minilora.cli import ablate, adapters, bench, course, finetune, model, quant, svd
from minilora.cli.common import MiniloraParser, _formatter, close_outputs
from minilora.errors import MiniloraError

GROUPS = (model, finetune, quant, adapters, bench, ablate, svd, course)
#: the thread phase (minilora.threads) each command runs in; the rest train
PHASE_OF = {"sample": "decode", "svd": "analysis", "delta-w": "analysis", "quantize": "analysis",
            "loftq": "analysis"}


def build_parser() -> argparse.ArgumentParser:
    p = MiniloraParser(
        prog="minilora", formatter_class=_formatter,
        description="minilora: an autograd-free GPT in NumPy, with LoRA and QLoRA built step by step.",
        epilog=textwrap.dedent("""\
            examples:
              minilora tour
              minilora sample --prompt "ROMEO:" --temperature 0.8 --top-k 20
              minilora pretrain --preset tiny --out runs/tiny
              minilora gradcheck
              minilora bench --configs small
            """))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    ok = False
    try:
        backend.check_env()
        threads.check_env()  # MINILORA_THREADS=0 is refused like a bad flag
        with threads.phase(PHASE_OF.get(args.command, "train")):
            args.func(args)
        ok = True
    except MiniloraError as e:
        if os.environ.get("MINILORA_DEBUG"):
            raise
        print(f"minilora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minilora: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minilora ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        close_outputs(ok)  # the outputs' locks released; what a refused command made, removed
    return 0


__all__ = ["build_parser", "main"]
