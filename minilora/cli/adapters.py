"""Adapter files and many adapters on one base: ``adapter merge | export-peft | import-peft | claim``, ``score``."""
from __future__ import annotations

import textwrap
from pathlib import Path

from minilora.checkpoint import save_checkpoint
from minilora.cli import truncate
from minilora.cli.common import (
    POSITIVE,
    _adapter_registry,
    _add_allow_nonfinite,
    _add_backend,
    _formatter,
    _load,
    _use_backend,
    add_overwrite,
    check_block_size,
    check_input_file,
    float_range,
    output,
    written,
)
from minilora.errors import MiniloraError, UsageError
from minilora.experiments.paths import base_model_path
from minilora.experiments.scoring import format_scores, score_adapters
from minilora.experiments.studies.claim import run_claim
from minilora.experiments.tasks import TASKS
from minilora.memory import check_fits, training_step_bytes
from minilora.methods.registry import METHODS, method_of_file
from minilora.peft_format import CONFIG_NAME, WEIGHTS_NAME


def cmd_score(args):
    if args.no_base and not args.adapter:
        raise UsageError("nothing to score: give --adapter FILE (or leave out --no-base)")
    for a in args.adapter:
        check_input_file(a, "--adapter")
    if args.eval_examples is not None and TASKS[args.task].kind != "classification":
        labelled = ", ".join(n for n, t in TASKS.items() if t.kind == "classification")
        raise UsageError(f"--eval-examples is for the labelled tasks ({labelled}); "
                         f"--task {args.task} is scored on --eval-batches windows")
    _use_backend(args)
    model, tok, _ = _load(args.ckpt, args.allow_nonfinite)
    check_block_size(args.block_size, model)
    n = len(args.adapter) + (0 if args.no_base else 1)    # one batch holds every adapter's rows
    _, per_seq = training_step_bytes(model, args.batch_size, args.block_size)
    check_fits(f"--batch-size {args.batch_size} x {n} adapter(s): one scoring batch of "
               f"{n * args.batch_size} x {args.block_size} tokens", n * args.batch_size * per_seq,
               n * per_seq, " windows per batch (--batch-size)")
    check_fits(f"--eval-batches {args.eval_batches:,} of {args.batch_size} x {args.block_size} "
               "windows", 16.0 * args.eval_batches * args.batch_size * args.block_size,
               16.0 * args.batch_size * args.block_size, " batches")
    reg, labels = _adapter_registry(model, args.adapter or [])
    adapters = ([] if args.no_base else [None]) + labels
    res = score_adapters(reg, tok, args.task, adapters, args.eval_batches, args.batch_size,
                         args.block_size, args.eval_examples)
    print(format_scores(args.task, res))


def _describe(tuned) -> str:
    """``lora (r=8, targets q,v; whole module(s) lm_head)``: what an adapter holds."""
    c = tuned.config
    parts = [f"{k}={getattr(c, k)}" for k in ("r", "init_r", "bottleneck", "prefix_len",
                                               "prompt_len") if hasattr(c, k)]
    targets = getattr(c, "target_modules", None) or getattr(c, "targets", None)
    if targets:
        parts.append(f"targets {','.join(targets)}")
    if tuned.modules_to_save:
        parts.append(f"whole module(s) {', '.join(tuned.modules_to_save)}")
    return f"{tuned.method.name}" + (f" ({'; '.join(parts)})" if parts else "")


def cmd_adapter_merge(args):
    check_input_file(args.adapter, "adapter")
    out = output(args.out, "--out", command="merge", name=_stem(args.adapter),
                 suffix=".safetensors", kind="file", args=args)
    method = method_of_file(args.adapter)
    if not method.can_merge:
        raise UsageError(f"{args.adapter}: a {method.name} adapter cannot be merged into the "
                         "base weights (its update is not a change of W0); use it as it is")
    _use_backend(args)
    model, tok, _ = _load(args.base)
    tuned = method.load(args.adapter, model)
    merged = method.merge(tuned)
    save_checkpoint(out, merged, tok, extra={
        "merged_adapter": str(args.adapter), "method": method.name,
        "method_config": method.record(tuned), "modules_to_save": list(tuned.modules_to_save),
        "base": str(args.base or base_model_path())})
    print(f"merged {args.adapter}: {_describe(tuned)} into the base: "
          f"{merged.num_parameters():,} parameters")
    written("merged checkpoint", out)


def cmd_adapter_export_peft(args):
    check_input_file(args.adapter, "adapter")
    method = method_of_file(args.adapter)
    if method.peft_type is None:   # before any output or work: one line naming why
        try:
            method.export_peft(args.out, None)
        except MiniloraError as e:
            have = ", ".join(n for n, m in METHODS.items() if m.peft_type)
            raise UsageError(f"{args.adapter}: {e}; those that do: {have}") from None
    out = output(args.out, "--out", command="export-peft", name=_stem(args.adapter),
                 kind="collection", args=args)   # always the same two files: no run marker
    _use_backend(args)
    model, _, _ = _load(args.base)
    tuned = method.load(args.adapter, model)
    out = Path(method.export_peft(out, tuned, str(args.base or base_model_path())))
    written(f"PEFT adapter ({_describe(tuned)})", f"{out}/ ({WEIGHTS_NAME}, {CONFIG_NAME})")


def cmd_adapter_import_peft(args):
    if not Path(args.peft_dir).is_dir():
        raise UsageError(f"DIR {args.peft_dir!r} is not a directory (a PEFT adapter directory "
                         "holds adapter_config.json and adapter_model.safetensors)")
    method = method_of_file(args.peft_dir)
    folder = not method.weights_file.endswith(".safetensors") or "/" in method.weights_file
    out = output(args.out, "--out", command="import-peft", name=Path(args.peft_dir).name,
                 suffix="" if folder else ".safetensors", kind="run" if folder else "file",
                 args=args)
    _use_backend(args)
    model, _, _ = _load(args.base)
    tuned = method.import_peft(args.peft_dir, model)
    method.save(out, tuned)
    print(f"imported {args.peft_dir}: {_describe(tuned)}")
    written(f"{method.name} adapter", out)


def _stem(path) -> str:
    """A default output name from an input path: the file stem, or the folder's name for
    finetune's ``adapter.safetensors``."""
    p = Path(path)
    return p.parent.name if p.stem == "adapter" and p.parent.name else p.stem


def cmd_adapter_claim(args):
    out = output(args.out, "--out", command="claim", name="claim", kind="collection", args=args)
    runs = output(args.runs, "--runs", command="claim", name="adapters", kind="collection",
                  args=args)
    _use_backend(args)
    run_claim(out, tuple(t for t in args.tasks.split(",") if t), args.steps, args.r,
              args.alpha, eval_batches=args.eval_batches, eval_examples=args.eval_examples,
              runs_dir=runs, progress=not args.no_progress)


def add_parsers(sub):
    """``minilora adapter ...`` and ``minilora score``."""
    a = sub.add_parser("adapter", help="adapter files: merge into a checkpoint, PEFT format, claim",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora adapter merge runs/milton/adapter.safetensors --out runs/milton-merged.safetensors
              minilora adapter export-peft runs/milton/adapter.safetensors --out runs/milton-peft
              minilora adapter import-peft runs/milton-peft --out runs/milton2.safetensors
              minilora adapter truncate runs/milton-peft --energy 0.95 --out runs/milton-e95
              minilora adapter claim                  # ~10 min on 2 CPU cores -> runs/claim/claim
              minilora adapter claim --out results/multi_adapter --runs runs/multi_adapter \
                  --overwrite                         # update the committed claim.json
            """))
    a.set_defaults(func=lambda args: a.print_help())
    asub = a.add_subparsers(dest="adapter_command", metavar="ACTION")

    s = asub.add_parser("merge", help="merge an adapter into its base: a full checkpoint",
                        formatter_class=_formatter, epilog=textwrap.dedent("""\
            example:
              minilora adapter merge runs/milton/adapter.safetensors --out runs/milton.safetensors
              minilora sample --ckpt runs/milton.safetensors --prompt "Of Man's first"
            """))
    s.add_argument("adapter", help="adapter file (from finetune --out or save_adapter)")
    s.add_argument("--out", default=None, help="the merged checkpoint to write (default: a new "
                   "runs/merge/NAME.safetensors)")
    add_overwrite(s, "the --out file")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    _add_backend(s)
    s.set_defaults(func=cmd_adapter_merge)

    s = asub.add_parser("export-peft", help="write an adapter in PEFT's directory format",
                        formatter_class=_formatter, epilog=textwrap.dedent("""\
            example:
              minilora adapter export-peft runs/milton/adapter.safetensors --out runs/milton-peft
            """))
    s.add_argument("adapter", help="adapter file")
    s.add_argument("--out", default=None,
                   help="directory for adapter_model.safetensors + adapter_config.json "
                        "(default: a new runs/export-peft/NAME)")
    add_overwrite(s, "the --out directory's earlier export")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    _add_backend(s)
    s.set_defaults(func=cmd_adapter_export_peft)

    s = asub.add_parser("import-peft", help="read a PEFT adapter directory into an adapter file",
                        formatter_class=_formatter, epilog=textwrap.dedent("""\
            example:
              minilora adapter import-peft runs/milton-peft --out runs/milton2.safetensors
            """))
    s.add_argument("peft_dir", metavar="DIR", help="PEFT adapter directory")
    s.add_argument("--out", default=None, help="adapter file to write (default: a new "
                   "runs/import-peft/NAME.safetensors)")
    add_overwrite(s, "the --out file")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    _add_backend(s)
    s.set_defaults(func=cmd_adapter_import_peft)

    truncate.add_parser(asub)

    s = asub.add_parser("claim", help="per-task LoRAs hot-swapped vs one general LoRA",
                        formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora adapter claim                          # writes runs/claim/claim/claim.json
              minilora adapter claim --tasks milton,python,sentiment --steps 200 --out /tmp/claim
              minilora adapter claim --out results/multi_adapter --runs runs/multi_adapter \
                  --overwrite                                  # update the committed claim.json
            """))
    s.add_argument("--out", default=None,
                   help="where claim.json goes (default: a new runs/claim/claim; committed: "
                        "results/multi_adapter)")
    s.add_argument("--runs", default=None,
                   help="where the adapters go (default: a new runs/claim/adapters)")
    add_overwrite(s, "claim.json in --out and the adapters in --runs")
    s.add_argument("--tasks", default="milton,python", help="comma-separated, at least two")
    s.add_argument("--steps", type=POSITIVE, default=200,
                   help="steps per task (general: steps x tasks)")
    s.add_argument("--r", type=POSITIVE, default=8, help="LoRA rank")
    s.add_argument("--alpha", type=float_range(0, lo_open=True), default=16.0, help="lora_alpha")
    s.add_argument("--eval-batches", type=POSITIVE, default=16, help="fixed scoring windows")
    s.add_argument("--eval-examples", type=POSITIVE, default=None,
                   help="sentiment: score only the first N test sentences")
    s.add_argument("--no-progress", action="store_true")
    _add_backend(s)
    s.set_defaults(func=cmd_adapter_claim)

    s = sub.add_parser("score", help="score several adapters on a task in one mixed batch",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora score --adapter runs/milton/adapter.safetensors --task milton
              minilora score --adapter runs/multi_adapter/milton/adapter.safetensors \\
                             --adapter runs/multi_adapter/general/adapter.safetensors --task milton
              minilora score --adapter a.safetensors --task sentiment --eval-examples 200 --no-base
            """))
    s.add_argument("--adapter", action="append", default=[],
                   help="adapter file; repeat for several (each row of a batch picks one)")
    s.add_argument("--task", choices=list(TASKS), default="milton",
                   help="; ".join(f"{n}: {t.about}" for n, t in TASKS.items())
                   + " (default milton)")
    s.add_argument("--no-base", action="store_true", help="leave out the base model's row")
    s.add_argument("--eval-batches", type=POSITIVE, default=16, help="fixed scoring windows")
    s.add_argument("--batch-size", type=POSITIVE, default=8, help="windows per batch")
    s.add_argument("--block-size", type=POSITIVE, default=128,
                   help="characters per window, at most the base's context")
    s.add_argument("--eval-examples", type=POSITIVE, default=None,
                   help="sentiment: score only the first N test sentences (default: all)")
    s.add_argument("--ckpt", default=None, help="base checkpoint (default: the shipped one)")
    _add_allow_nonfinite(s)
    _add_backend(s)
    s.set_defaults(func=cmd_score)
