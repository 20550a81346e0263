"""Fine-tuning and its records: ``finetune``, ``results``, ``figures``."""
from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import NamedTuple

from minilora.cli.common import (
    POSITIVE,
    SEED,
    _add_allow_nonfinite,
    _add_backend,
    _formatter,
    _recompute_chunk,
    _use_backend,
    add_overwrite,
    check_input_file,
    flag_hint,
    float_range,
    int_range,
    output,
    written,
)
from minilora.config import ConfigError
from minilora.errors import UsageError
from minilora.experiments.figures import FIGURES, make_figures
from minilora.experiments.finetune import default_lora_config, finetune, format_result
from minilora.experiments.methods import Extras
from minilora.experiments.results_table import (
    DEFAULT_ROOT,
    run_missing,
    table_text,
    write_table,
)
from minilora.experiments.tasks import TASKS, task_recipe
from minilora.io import CheckpointError
from minilora.methods.registry import METHODS, get_method

# ----------------------------------------------------------------------------------------------
# the method flags, generated from the methods' config dataclasses (minilora.methods.METHODS)
# ----------------------------------------------------------------------------------------------
class MethodFlag(NamedTuple):
    """One generated ``finetune`` flag: the config field it sets in each method that has it."""
    flag: str              # "--r"
    dest: str              # the argparse attribute: "m_r"
    fields: dict           # method name -> dataclasses.Field
    kind: str              # "int", "float", "bool", "tuple", "str" or "object"


def _kind(f) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "object")
    return t if t in ("int", "float", "bool", "tuple", "str") else "object"


def method_flags() -> dict:
    """``{"--r": MethodFlag}`` for every field (``cli`` not False) of every registered method's
    config; a flag applies to a method exactly when its config has the field."""
    flags = {}
    for name, method in METHODS.items():
        for f in method.config_fields():
            if not f.metadata.get("cli", True) or "help" not in f.metadata:
                continue
            flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
            spec = flags.setdefault(flag, MethodFlag(flag, "m_" + flag[2:].replace("-", "_"), {},
                                                     _kind(f)))
            if (spec.kind == "bool") != (_kind(f) == "bool"):   # a switch and a value: a bug
                raise TypeError(f"{flag} sets a true/false field and a valued one")
            spec.fields[name] = f
    return flags


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(str, v))
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _flag_help(spec: MethodFlag, defaults: dict) -> str:
    """``lora, qlora, dora: rank of the update (default 8); ...`` grouped by help and default."""
    groups = {}
    for name, f in spec.fields.items():
        d = defaults[name]
        default = _show(getattr(d, f.name)) if d is not None else None
        meta = f.metadata
        allowed = (f"{'|'.join(meta['choices'])}; " if "choices" in meta else "") + \
            (f"{_range_text(meta['range'])}; " if "range" in meta else "")
        key = (meta["help"], allowed, default)
        groups.setdefault(key, []).append(name)
    return "; ".join(f"{', '.join(names)}: {h} [{allowed}default {d}]".replace("; default", ", default")
                     for (h, allowed, d), names in groups.items())


def _range_text(r) -> str:
    lo, hi, lo_open, hi_open = r
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else f"<= {hi:g}"


def parse_flag_value(spec: MethodFlag, method: str, text):
    """The value of flag ``spec`` for ``method``'s field, parsed and checked against the field's
    range and choices: one line naming the flag, as argparse would say it."""
    f = spec.fields[method]
    if spec.kind == "bool":
        return text
    meta = f.metadata
    if _kind(f) == "int":
        lo, hi = meta.get("range", (None, None, False, False))[:2]
        try:
            value = int_range(lo, hi)(text)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{spec.flag} {e}") from None
    elif _kind(f) == "float":
        try:
            value = float_range(*meta.get("range", (None, None, False, False)))(text)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{spec.flag} {e}") from None
    elif _kind(f) == "tuple":
        value = tuple(t for t in text.split(",") if t)
    elif _kind(f) == "object":   # true / false or a name (init_lora_weights)
        value = {"true": True, "false": False}.get(text.lower(), text)
    else:
        value = text
    if "choices" in meta and value not in meta["choices"]:
        raise UsageError(f"{spec.flag}: invalid choice: {text!r} (choose from "
                         f"{', '.join(map(repr, meta['choices']))})")
    return value


def method_config(args, steps: int):
    """The config of ``args.method``: the method's default (for lora on a task whose recipe
    names targets, those targets; for adalora the schedule of ``steps``), with every given
    method flag applied. A flag whose field the method's config lacks is refused."""
    method = get_method(args.method)
    flags = method_flags()
    given = {s.flag: getattr(args, s.dest) for s in flags.values()
             if getattr(args, s.dest) is not None}
    unused = [f for f in given if args.method not in flags[f].fields]
    if unused:
        have = ", ".join(f for f, s in flags.items() if args.method in s.fields) or "none"
        raise UsageError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply "
                         f"to --method {args.method} (its config has no such field; its flags: "
                         f"{have})")
    if method.config_cls is None:
        return None
    default = (default_lora_config(args.task) if args.method == "lora"
               else method.default_config(steps=steps))
    changes = {flags[f].fields[args.method].name: parse_flag_value(flags[f], args.method, v)
               for f, v in given.items()}
    try:
        return dataclasses.replace(default, **changes)
    except ConfigError as e:
        which = ", ".join(given) or "the defaults"
        raise UsageError(f"{which}: {e}") from None


def _add_method_flags(s) -> None:
    defaults = {n: m.default_config() for n, m in METHODS.items()}
    for spec in method_flags().values():
        if spec.kind == "bool":
            s.add_argument(spec.flag, dest=spec.dest, action=argparse.BooleanOptionalAction,
                           default=None, help=_flag_help(spec, defaults))
        else:
            s.add_argument(spec.flag, dest=spec.dest, default=None, metavar=spec.kind.upper()
                           .replace("TUPLE", "A,B").replace("OBJECT", "VALUE"),
                           help=_flag_help(spec, defaults))


def cmd_finetune(args):
    chunk = _recompute_chunk(args)
    try:
        method = get_method(args.method)   # a renamed method: one line naming the new name
    except UsageError as e:
        raise UsageError(f"--method: {e}") from None
    steps = args.steps or task_recipe(args.task).get("train", {}).get("max_steps", 200)
    method_cfg = method_config(args, steps)   # a flag the method's config lacks: refused here
    if args.base is not None:
        check_input_file(args.base, "--base")
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR (the run directory to continue)")
    if args.resume and not method.resumable:
        raise UsageError(f"--resume is not supported for {args.method}: {method.resumable_why}")
    if args.eval_examples is not None and TASKS[args.task].kind != "classification":
        labelled = ", ".join(n for n, t in TASKS.items() if t.kind == "classification")
        raise UsageError(f"--eval-examples is for the labelled tasks ({labelled}); "
                         f"--task {args.task} is scored on --eval-batches windows")
    out = output(args.out, "--out", command="finetune", name=f"{args.method}-{args.task}",
                 args=args, can_resume=True)
    _use_backend(args)
    mts = tuple(m for m in (args.modules_to_save or "").split(",") if m)
    if mts or args.loraplus_ratio is not None:
        method_lr = args.lr or task_recipe(args.task).get("lr", {}).get(args.method)
        method_cfg = Extras(method_cfg, mts, args.loraplus_ratio, args.modules_to_save_lr,
                            method_lr)
    given = dict(max_steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                 lr=args.lr)  # None: the task recipe's, else the harness default
    overrides = dict({k: v for k, v in given.items() if v is not None}, seed=args.seed)
    try:
        r = finetune(args.method, args.task, method_cfg, overrides, base_path=args.base,
                     out_dir=out, progress=not args.no_progress,
                     eval_batches=args.eval_batches, eval_examples=args.eval_examples,
                     lm_weight=args.lm_weight, resume=args.resume, save_every=args.save_every,
                     recompute=args.recompute, recompute_chunk=chunk,
                     allow_nonfinite=args.allow_nonfinite)
    except CheckpointError as e:
        raise flag_hint(e) from None
    print(format_result(r))
    print(f"result: {out / 'result.json'}")
    written("adapter" if args.method != "full" else "model", out / r["weights_file"])


def cmd_results(args):
    if args.run:   # the runs go into the named root or runs/results, extended run by run
        root = output(args.root, "--out", command="results", name="finetune", kind="sweep")
    else:
        root = Path(args.root or DEFAULT_ROOT)
        if not root.is_dir():
            raise UsageError(f"--out {str(root)!r} is not a directory")
    if not args.run and not any(Path(root).glob("*/result.json")):
        raise UsageError(f"no runs under {root}/*/result.json; make them with `minilora results "
                         "--run` or `minilora finetune --out ...`")
    _use_backend(args)
    if args.run:
        run_missing(root, args.tasks.split(",") if args.tasks else None,
                    args.methods.split(",") if args.methods else None,
                    progress=not args.no_progress)
    if args.run or args.root is not None:  # the table goes beside the runs the user named
        text, path = write_table(root)
        print(text)
        written("table", path)
    else:
        print(table_text(root))


def cmd_figures(args):
    unknown = [n for n in (args.only or "").split(",") if n and n not in FIGURES]
    if unknown:
        raise UsageError(f"--only: unknown figure(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(FIGURES)}")
    figures = output(args.figures, "--figures", command="figures",
                     name=Path(args.results).resolve().name, kind="collection", args=args)
    if not Path(args.results).is_dir():
        raise UsageError(f"--results {args.results!r} is not a directory")
    done = make_figures(args.only.split(",") if args.only else None, args.results, figures)
    skipped = [n for n, v in done.items() if isinstance(v, str) and v.startswith("skipped")]
    failed = [n for n, v in done.items() if isinstance(v, str) and v.startswith("failed")]
    print(f"{len(done) - len(skipped) - len(failed)} figure(s) written to {figures}/"
          + (f"; {len(skipped)} skipped (what each needs: see above)" if skipped else "")
          + (f"; {len(failed)} FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)


def add_parsers(sub):
    """Add this group's subcommands to the ``minilora`` parser."""
    examples = "\n".join(f"  minilora finetune --method {n} {m.example}".rstrip().ljust(58)
                         + f"  # {m.summary.split(':')[0]}" for n, m in METHODS.items())
    s = sub.add_parser("finetune", help=f"fine-tune the base model, like for like: "
                       f"{', '.join(METHODS)}",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora finetune --method lora --task milton --r 8 --alpha 16 --targets q,v
              minilora finetune --method full --task milton --out runs/ft-full
              minilora finetune --method lora --init pissa --targets q,k,v,o --steps 400
              minilora finetune --method lora --task python --r 4 --rslora
              minilora finetune --method qlora --task milton --init loftq --out runs/ft-qlora
              minilora finetune --method lora --task sentiment       # its recipe: 400 x 32
              minilora finetune --method lora --task sentiment --lm-weight 0   # label loss only
              minilora finetune --method lora --loraplus-ratio 16     # LoRA+
              minilora finetune --method bitfit --task lexicon --modules-to-save lm_head
            every method, with its own flags (a method flag applies to the methods whose config
            has the field; --help above says which):
            """) + examples)
    s.add_argument("--method", default="lora", metavar="{" + ",".join(METHODS) + "}",
                   help="; ".join(f"{n}: {m.summary}" for n, m in METHODS.items())
                   + " (default lora)")
    s.add_argument("--task", choices=list(TASKS), default="milton",
                   help="; ".join(f"{n}: {t.about}" for n, t in TASKS.items())
                   + " (default milton)")
    _add_method_flags(s)
    s.add_argument("--loraplus-ratio", type=float_range(0, lo_open=True), default=None,
                   help="LoRA+: learning rate of the B factors = ratio x A's (> 0; the paper "
                        "uses ~16; lora, qlora, dora, adalora)")
    s.add_argument("--modules-to-save", default=None,
                   help="comma-separated modules trained whole beside the method and saved "
                        "with it (PEFT's modules_to_save), e.g. lm_head or lm_head,ln_f")
    s.add_argument("--modules-to-save-lr", type=float_range(0, lo_open=True), default=None,
                   help="peak learning rate of the --modules-to-save modules (default: the "
                        "method's, as in PEFT; full fine-tuning uses 1e-3)")
    s.add_argument("--steps", type=POSITIVE, default=None,
                   help="training steps (default 200; sentiment: 400)")
    s.add_argument("--batch-size", type=POSITIVE, default=None, help="default 8; sentiment: 32")
    s.add_argument("--block-size", type=POSITIVE, default=None,
                   help="default 128, at most the base's context")
    s.add_argument("--lr", type=float_range(0, lo_open=True), default=None,
                   help="peak learning rate (default: the method's: "
                   + ", ".join(f"{m.lr[0]:g} {n}" for n, m in METHODS.items())
                   + "; lora on sentiment: 3e-3)")
    s.add_argument("--lm-weight", type=float_range(0), default=None,
                   help="sentiment: weight of the language-modelling loss on the sentence "
                        "beside the label loss (default 1; 0: the label only)")
    s.add_argument("--eval-batches", type=POSITIVE, default=16,
                   help="fixed windows for the held-out and Shakespeare losses")
    s.add_argument("--eval-examples", type=POSITIVE, default=None,
                   help="sentiment: score only the first N test sentences (default: all 2,014)")
    s.add_argument("--seed", type=SEED, default=0, help="batches, dropout and initial factors")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    s.add_argument("--out", default=None,
                   help="run directory: result.json, the adapter/model, metrics.jsonl and a "
                        "resumable ckpt.safetensors (default: a new runs/finetune/METHOD-TASK); "
                        "checked before the base is loaded")
    s.add_argument("--save-every", type=POSITIVE, default=None,
                   help="save a resumable checkpoint every N steps (default: every tenth of "
                        "the run)")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same flags)")
    add_overwrite(s, "the run in --out (its files are removed first)")
    s.add_argument("--recompute", action="store_true",
                   help="activation recomputation: keep only each block's input in the forward "
                        "and run the block again in the backward (same gradients, less memory, "
                        "about a third more compute)")
    s.add_argument("--recompute-chunk", type=POSITIVE, default=None, metavar="N",
                   help="with --recompute: run each block N sequences at a time (1: the least "
                        "memory; gradients equal to rounding; default: the whole batch)")
    s.add_argument("--no-progress", action="store_true")
    _add_allow_nonfinite(s)
    _add_backend(s)
    s.set_defaults(func=cmd_finetune)


    s = sub.add_parser("results", help="the fine-tuning results table (every method x task)",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora results                 the table of the saved runs in results/finetune/
              minilora results --run           run every missing (task, method) pair into
                                               runs/results/finetune/ and write their table
              minilora results --run --tasks milton --methods lora,full
              minilora results --run --out results/finetune   update the committed runs
            """))
    s.add_argument("--run", action="store_true",
                   help="run the missing (task, method) pairs first (harness defaults)")
    s.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    s.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    s.add_argument("--out", "--root", dest="root", default=None,
                   help="where the runs are (default: results/finetune to read, printing the "
                        "table; runs/results/finetune with --run, so committed results change "
                        "only with --out results/...); a named directory gets table.md")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_backend(s)
    s.set_defaults(func=cmd_results)


    s = sub.add_parser("figures", help="draw every figure from saved results (into runs/figures/; "
                       "figures/ only when named)",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora figures                      all figures whose results exist, drawn
                                                    into a new runs/figures/results
              minilora figures --only base_pretrain
              minilora figures --figures figures --overwrite   redraw the committed figures
            A PNG is rewritten only when its bytes change, so an unchanged figure stays
            byte-identical in git.
            """))
    s.add_argument("--only", default=None, help="comma-separated figure names (default: all)")
    s.add_argument("--results", default="results", help="where the saved results are")
    s.add_argument("--figures", default=None,
                   help="where the PNGs go (default: a new runs/figures/NAME, NAME the results "
                        "directory's; the committed ones: --figures figures --overwrite)")
    add_overwrite(s, "PNGs of the same names in --figures")
    s.set_defaults(func=cmd_figures)

