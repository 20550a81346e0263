"""The model's own commands: ``tour``, ``pretrain``, ``sample``, ``gradcheck``."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

from minilora import backend, gradcheck
from minilora.adapters import generate_mixed
from minilora.checkpoint import save_checkpoint
from minilora.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    _adapter_registry,
    _add_allow_nonfinite,
    _add_backend,
    _formatter,
    _load,
    _recompute_chunk,
    _use_backend,
    add_overwrite,
    check_input_file,
    float_range,
    output,
    written,
)
from minilora.config import GPTConfig, TrainConfig
from minilora.data import CharTokenizer, encode_corpus, load_shakespeare
from minilora.errors import UsageError
from minilora.experiments.presets import PRESETS
from minilora.experiments.tour import run_tour
from minilora.memory import check_fits
from minilora.model import GPT, set_recompute
from minilora.sample import sample_text
from minilora.train import CKPT_NAME, train


def cmd_tour(args):
    _use_backend(args)
    run_tour(fast=args.fast)


def cmd_pretrain(args):
    chunk = _recompute_chunk(args)
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR (the run directory to continue)")
    if args.resume and not (Path(args.out) / CKPT_NAME).is_file():
        raise UsageError(f"--resume: {str(Path(args.out) / CKPT_NAME)!r} does not exist (nothing "
                         "to continue; leave out --resume to start a new run)")
    out = output(args.out, "--out", command="pretrain", name=args.preset, args=args,
                 can_resume=True)
    export = None
    if args.export:
        export = output(args.export, "--export", command="pretrain", name=args.preset,
                        kind="file", args=args)
    _use_backend(args)
    preset = PRESETS[args.preset]
    mcfg = dict(preset["model"])
    tcfg = dict(preset["train"])
    for k in ("block_size", "n_layer", "n_head", "n_embd"):
        if getattr(args, k) is not None:
            mcfg[k] = getattr(args, k)
    if args.block_size is not None:
        tcfg["block_size"] = args.block_size
    for k in ("max_steps", "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay",
              "eval_every", "eval_batches", "ckpt_every", "seed", "grad_clip"):
        if getattr(args, k) is not None:
            tcfg[k] = getattr(args, k)
    tok = CharTokenizer.default()
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, **mcfg)
    train_cfg = TrainConfig(**tcfg)
    C, L, V = model_cfg.n_embd, model_cfg.n_layer, model_cfg.vocab_size
    n_params = 12 * L * C * C + (2 * V + model_cfg.block_size + 13 * L) * C
    check_fits(f"--n-embd {C} --n-layer {L}: a model of about {n_params:,} parameters "
               "(weights, gradients and AdamW's moments in float32)", 16.0 * n_params)
    splits = load_shakespeare(tuple(args.val_plays.split(",")))
    train_ids, val_ids = encode_corpus(splits["train"], tok), encode_corpus(splits["val"], tok)
    model = GPT(model_cfg, rng=train_cfg.seed)
    set_recompute(model, args.recompute, chunk)
    print(f"minilora pretrain: {model.num_parameters():,} parameters "
          f"({model.num_parameters() * 4 / 1e6:.1f} MB float32), backend {backend.get_backend()}; "
          f"train {len(train_ids):,} chars, val {len(val_ids):,} chars (plays: {args.val_plays})")
    print(f"  model {json.dumps(model_cfg.to_dict())}\n  train {json.dumps(train_cfg.to_dict())}")
    hist = train(model, tok, train_ids, val_ids, train_cfg, out_dir=out, resume=args.resume,
                 progress=not args.no_progress)
    v = hist.final_val_loss
    print(f"done in {hist.seconds / 60:.1f} min: val loss {v:.4f} nats/char "
          f"({v / 0.6931471805599453:.4f} bits/char)")
    if export is not None:
        save_checkpoint(export, model, tok, extra={
            "val_loss_nats_per_char": v, "val_plays": args.val_plays,
            "train_config": train_cfg.to_dict(), "train_seconds": round(hist.seconds, 1),
            "command": "minilora " + " ".join(sys.argv[1:])})
        written("weights-only copy", export)
    written("checkpoint", out / CKPT_NAME)


def cmd_sample(args):
    for a in args.adapter:
        check_input_file(a, "--adapter")
    if args.keep is not None and args.exact_window:
        raise UsageError("--keep and --exact-window both set how the window slides past the "
                         "context: give one (--exact-window is --keep CONTEXT-1)")
    _use_backend(args)
    model, tok, _ = _load(args.ckpt, args.allow_nonfinite)
    prompt = args.prompt.replace("\\n", "\n")
    window = dict(use_cache=not args.no_cache, exact_window=args.exact_window, keep=args.keep)
    if not args.adapter:  # one text: each character is printed as soon as it is drawn
        tok.encode(prompt)  # a character outside the vocabulary: one error before any output

        def stream(text):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write(prompt)
        sample_text(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k,
                    args.seed, progress=False, stream=stream, **window)
        sys.stdout.write("\n")
        return

    reg, labels = _adapter_registry(model, args.adapter)
    texts = generate_mixed(reg, tok, prompt, labels, args.max_new_tokens, args.temperature,
                           args.top_k, args.seed, **window)
    if len(texts) == 1:
        print(texts[0])
        return
    for label, text in zip(labels, texts):
        print(f"=== {label} ===\n{text}\n")


def cmd_gradcheck(args):
    _use_backend(args)
    t = time.perf_counter()
    rows = gradcheck.op_suite(args.seed) + gradcheck.tiny_model_check(args.seed)
    print(gradcheck.format_table(rows))
    print(f"({time.perf_counter() - t:.1f} s; float64, centred differences h=1e-5)")
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)


def add_parsers(sub):
    """Add this group's subcommands to the ``minilora`` parser."""
    s = sub.add_parser("tour", help="a 1-3 minute guided run: sample, gradcheck, train a few steps",
                       formatter_class=_formatter, epilog="example:\n  minilora tour\n  minilora tour --fast")
    s.add_argument("--fast", action="store_true", help="shorter training demo (for tests/CI)")
    _add_backend(s)
    s.set_defaults(func=cmd_tour)


    s = sub.add_parser("pretrain", help="train a GPT on Shakespeare from scratch",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora pretrain --preset tiny --out runs/tiny          # seconds
              minilora pretrain --preset base --out runs/base          # the shipped base model
              minilora pretrain --preset base --out runs/base --resume # continue after a stop
            """))
    s.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model and training defaults (default: tiny)")
    s.add_argument("--out", default=None, help="run directory: checkpoint, metrics.jsonl "
                   "(default: a new runs/pretrain/PRESET)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.safetensors")
    add_overwrite(s, "the run in --out (and the --export file)")
    s.add_argument("--recompute", action="store_true",
                   help="activation recomputation: keep only each block's input in the forward "
                        "and run the block again in the backward (same gradients, less memory)")
    s.add_argument("--recompute-chunk", type=POSITIVE, default=None, metavar="N",
                   help="with --recompute: run each block N sequences at a time (1: the least "
                        "memory; gradients equal to rounding; default: the whole batch)")
    s.add_argument("--export", default=None,
                   help="also write a weights-only checkpoint here at the end (what we ship)")
    s.add_argument("--val-plays", default="hamlet,tempest",
                   help="comma-separated plays held out for validation (default: hamlet,tempest)")
    for name, typ in (("block-size", POSITIVE), ("n-layer", POSITIVE), ("n-head", POSITIVE),
                      ("n-embd", POSITIVE), ("max-steps", POSITIVE), ("batch-size", POSITIVE),
                      ("lr", float_range(0, lo_open=True)), ("min-lr", float_range(0)),
                      ("warmup-steps", NON_NEGATIVE), ("weight-decay", float_range(0)),
                      ("grad-clip", float_range(0)), ("eval-every", POSITIVE),
                      ("eval-batches", POSITIVE), ("ckpt-every", POSITIVE), ("seed", SEED)):
        s.add_argument(f"--{name}", type=typ, default=None, help="override the preset")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_backend(s)
    s.set_defaults(func=cmd_pretrain)


    s = sub.add_parser("sample", help="generate text from a checkpoint", formatter_class=_formatter,
                       epilog=textwrap.dedent("""\
            examples:
              minilora sample                                   # the shipped base model
              minilora sample --prompt "KING HENRY:" --max-new-tokens 300 --seed 3
              minilora sample --max-new-tokens 2000            # past the window: chunked
              minilora sample --max-new-tokens 2000 --exact-window   # exact sliding window
              minilora sample --ckpt runs/tiny/ckpt.safetensors --temperature 1.0
              minilora sample --adapter runs/milton/adapter.safetensors --prompt "Of Man"
              minilora sample --adapter a.safetensors --adapter b.safetensors   # one batch
            """))
    s.add_argument("--ckpt", default=None, help="checkpoint file (default: the shipped base model)")
    s.add_argument("--prompt", default="\n", help="start text; '\\n' is a newline (default: newline)")
    s.add_argument("--max-new-tokens", type=NON_NEGATIVE, default=300,
                   help="characters to generate")
    s.add_argument("--temperature", type=float_range(0, lo_open=True), default=0.8,
                   help="divide the logits by this (lower: more conservative)")
    s.add_argument("--top-k", type=POSITIVE, default=None,
                   help="sample only among the k likeliest characters (default: all)")
    s.add_argument("--seed", type=SEED, default=0, help="the sampler's random draws")
    s.add_argument("--adapter", action="append", default=[],
                   help="LoRA adapter file on the base; repeat to sample several in one batch")
    s.add_argument("--no-cache", action="store_true",
                   help="re-run the whole context for every character instead of using the KV "
                        "cache (slower; the exact sliding window's text)")
    s.add_argument("--exact-window", action="store_true",
                   help="past the context window (256 characters for the shipped model), "
                        "predict every character from exactly the last CONTEXT characters: one "
                        "forward pass over the window per character (~60 characters/s). "
                        "Default: the chunked window, which re-encodes the last half of the "
                        "window when it is full and then continues from the cache, so each "
                        "character sees between half a window and a whole one (an "
                        "approximation: the text past the window differs; over 1,000 "
                        "characters/s). Inside the window both give the same text")
    s.add_argument("--keep", type=NON_NEGATIVE, default=None,
                   help="past the context window, re-encode only the last KEEP characters, "
                        "once every (context - KEEP) characters (default: context / 2, the "
                        "chunked window; context - 1 is --exact-window)")
    _add_allow_nonfinite(s)
    _add_backend(s)
    s.set_defaults(func=cmd_sample)


    s = sub.add_parser("gradcheck", help="finite-difference check of every backward pass",
                       formatter_class=_formatter, epilog="example:\n  minilora gradcheck --seed 3")
    s.add_argument("--seed", type=SEED, default=0, help="draws of the random inputs")
    _add_backend(s)
    s.set_defaults(func=cmd_gradcheck)

