"""Fine-tuning and its records: ``finetune``, ``results``, ``figures``."""
from __future__ import annotations

import textwrap
from pathlib import Path

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
    output,
    written,
)
from minilora.config import LoraConfig, QuantConfig
from minilora.errors import UsageError
from minilora.experiments.figures import FIGURES, make_figures
from minilora.experiments.finetune import finetune, format_result
from minilora.experiments.methods import METHODS, Extras
from minilora.experiments.results_table import (
    DEFAULT_ROOT,
    run_missing,
    table_text,
    write_table,
)
from minilora.experiments.tasks import TASKS, task_recipe
from minilora.io import CheckpointError
from minilora.lora import AdaLoraConfig
from minilora.peft import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    PrefixConfig,
    PromptConfig,
)

#: method-specific flags: (attribute, the methods whose config has the field it sets). A flag
#: given for a method whose config lacks the field is refused rather than silently dropped.
METHOD_FLAGS = (
    ("r", ("lora", "qlora", "dora")), ("alpha", ("lora", "qlora", "dora", "adalora")),
    ("dropout", ("lora", "qlora", "dora", "adalora")),
    ("targets", ("lora", "qlora", "dora", "adalora")),
    ("init", ("lora", "qlora", "dora")), ("rslora", ("lora", "qlora", "dora")),
    ("bias", ("lora", "qlora", "dora")), ("quant_type", ("qlora",)),
    ("blocksize", ("qlora",)), ("no_double_quant", ("qlora",)),
    ("loftq_iter", ("qlora",)), ("init_r", ("adalora",)), ("target_r", ("adalora",)),
    ("bottleneck", ("adapter",)), ("prefix_len", ("prefix",)), ("prompt_len", ("prompt",)),
)


def cmd_finetune(args):
    chunk = _recompute_chunk(args)
    unused = [f"--{name.replace('_', '-')}" for name, methods in METHOD_FLAGS
              if args.method not in methods and getattr(args, name) not in (None, False)]
    if unused:
        raise UsageError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply "
                         f"to --method {args.method}")
    if args.base is not None:
        check_input_file(args.base, "--base")
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR (the run directory to continue)")
    if args.resume and args.method == "adalora":
        raise UsageError("--resume is not supported for adalora: the checkpoint does not hold "
                         "the rank allocator's importance scores; start the run again")
    if args.eval_examples is not None and TASKS[args.task].kind != "classification":
        labelled = ", ".join(n for n, t in TASKS.items() if t.kind == "classification")
        raise UsageError(f"--eval-examples is for the labelled tasks ({labelled}); "
                         f"--task {args.task} is scored on --eval-batches windows")
    out = output(args.out, "--out", command="finetune", name=f"{args.method}-{args.task}",
                 args=args, can_resume=True)
    _use_backend(args)
    method_cfg = None
    if args.method in ("lora", "qlora", "dora"):
        init = args.init or "true"
        init = {"true": True, "false": False}.get(init.lower(), init)
        targets = args.targets or ",".join(task_recipe(args.task).get("lora_targets", ("q", "v"))
                                           if args.method == "lora" else ("q", "v"))
        method_cfg = LoraConfig(r=args.r or 8,
                                lora_alpha=16.0 if args.alpha is None else args.alpha,
                                lora_dropout=args.dropout or 0.0,
                                target_modules=tuple(t for t in targets.split(",") if t),
                                use_rslora=args.rslora, init_lora_weights=init,
                                bias=args.bias or "none", use_dora=args.method == "dora")
        if args.method == "qlora":  # the 4-bit base: NF4 (+ double quant), LoftQ steps
            quant = QuantConfig(quant_type=args.quant_type or "nf4",
                                blocksize=args.blocksize or 64,
                                double_quant=not args.no_double_quant,
                                loftq_iter=args.loftq_iter or 5)
            method_cfg = (method_cfg, quant)
    elif args.method in ("adapter", "prefix", "prompt", "bitfit"):
        method_cfg = {"adapter": lambda: AdapterConfig(bottleneck=args.bottleneck or 16),
                      "prefix": lambda: PrefixConfig(prefix_len=args.prefix_len or 16),
                      "prompt": lambda: PromptConfig(prompt_len=args.prompt_len or 16),
                      "bitfit": BitFitConfig}[args.method]()
    elif args.method == "ia3":
        method_cfg = IA3Config()
    elif args.method == "adalora":  # the schedule needs the number of steps
        steps = args.steps or task_recipe(args.task).get("train", {}).get("max_steps", 200)
        init_r = args.init_r or 12
        method_cfg = AdaLoraConfig(
            init_r=init_r, target_r=args.target_r or min(8, init_r),
            lora_dropout=args.dropout or 0.0,
            # c = lora_alpha / init_r; the default 24 = 2 x 12 matches LoRA's 16 / 8
            lora_alpha=2.0 * init_r if args.alpha is None else args.alpha,
            target_modules=tuple(t for t in (args.targets or "q,v").split(",") if t),
            tinit=steps // 10, tfinal=steps // 5, deltaT=max(1, steps // 40), total_step=steps)
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
              minilora finetune --method adapter --bottleneck 16      # Houlsby adapters
              minilora finetune --method prefix --prefix-len 16       # prefix tuning
              minilora finetune --method prompt --prompt-len 16       # prompt tuning
              minilora finetune --method bitfit                       # biases only
              minilora finetune --method dora --task milton           # DoRA (use_dora)
              minilora finetune --method adalora --init-r 12 --target-r 8   # AdaLoRA budget
              minilora finetune --method ia3                          # (IA)³ vectors
              minilora finetune --method lora --loraplus-ratio 16     # LoRA+
              minilora finetune --method bitfit --task lexicon --modules-to-save lm_head
            """))
    s.add_argument("--method", choices=list(METHODS), default="lora")
    s.add_argument("--task", choices=list(TASKS), default="milton",
                   help="; ".join(f"{n}: {t.about}" for n, t in TASKS.items())
                   + " (default milton)")
    s.add_argument("--r", type=POSITIVE, default=None, help="LoRA rank (lora, qlora, dora; default 8)")
    s.add_argument("--alpha", type=float_range(0, lo_open=True), default=None,
                   help="lora_alpha (default 16; adalora: 24 = 2 x --init-r, its scale "
                        "lora_alpha / init_r matching LoRA's 16 / 8)")
    s.add_argument("--dropout", type=float_range(0, 1, hi_open=True), default=None,
                   help="lora_dropout (default 0)")
    s.add_argument("--targets", default=None,
                   help="comma-separated modules: q,k,v,o,up,down,wte,lm_head (default q,v; "
                        "lora on sentiment: q,k,v,o,up,down,lm_head)")
    s.add_argument("--init", default=None,
                   help="init_lora_weights: true (PEFT default), false, gaussian, swap, pissa; "
                        "qlora: loftq (LoftQ split of W0 into 4-bit Q + B A)")
    s.add_argument("--rslora", action="store_true", help="scaling alpha/sqrt(r) (rsLoRA)")
    s.add_argument("--bias", choices=["none", "all", "lora_only"], default=None,
                   help="biases trained with the factors (default none)")
    s.add_argument("--quant-type", choices=["nf4", "fp4", "int4"], default=None,
                   help="qlora: 4-bit code of the frozen base (default nf4)")
    s.add_argument("--blocksize", type=POSITIVE, default=None,
                   help="qlora: weights per absmax block (default 64)")
    s.add_argument("--no-double-quant", action="store_true",
                   help="qlora: keep float32 block scales (4.5 instead of 4.127 bits/weight)")
    s.add_argument("--loftq-iter", type=POSITIVE, default=None,
                   help="qlora --init loftq: alternating steps T (default 5; PEFT: 1)")
    s.add_argument("--init-r", type=POSITIVE, default=None,
                   help="adalora: triplets per layer at the start (default 12)")
    s.add_argument("--target-r", type=POSITIVE, default=None,
                   help="adalora: average triplets per layer at the end, <= --init-r (default 8)")
    s.add_argument("--loraplus-ratio", type=float_range(0, lo_open=True), default=None,
                   help="LoRA+: learning rate of the B factors = ratio x A's (> 0; the paper "
                        "uses ~16; lora, qlora, dora, adalora)")
    s.add_argument("--modules-to-save", default=None,
                   help="comma-separated modules trained whole beside the method and saved "
                        "with it (PEFT's modules_to_save), e.g. lm_head or lm_head,ln_f")
    s.add_argument("--modules-to-save-lr", type=float_range(0, lo_open=True), default=None,
                   help="peak learning rate of the --modules-to-save modules (default: the "
                        "method's, as in PEFT; full fine-tuning uses 1e-3)")
    s.add_argument("--bottleneck", type=POSITIVE, default=None,
                   help="adapter: Houlsby bottleneck width m (default 16)")
    s.add_argument("--prefix-len", type=POSITIVE, default=None,
                   help="prefix: keys/values per layer P (default 16)")
    s.add_argument("--prompt-len", type=POSITIVE, default=None,
                   help="prompt: soft prompt vectors P (default 16)")
    s.add_argument("--steps", type=POSITIVE, default=None,
                   help="training steps (default 200; sentiment: 400)")
    s.add_argument("--batch-size", type=POSITIVE, default=None, help="default 8; sentiment: 32")
    s.add_argument("--block-size", type=POSITIVE, default=None,
                   help="default 128, at most the base's context")
    s.add_argument("--lr", type=float_range(0, lo_open=True), default=None,
                   help="peak learning rate (default: the method's: 1e-3 full, 5e-3 lora / "
                        "adapter, 1e-2 bitfit, 3e-2 prefix, 1e-1 prompt; lora on sentiment: "
                        "3e-3)")
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

