"""The ``minilora`` command line.

    minilora tour                      a 1-3 minute guided run for a newcomer
    minilora pretrain --preset base    train the Shakespeare base model from scratch
    minilora sample --prompt "ROMEO:"  generate text from a checkpoint
    minilora gradcheck                 finite-difference check of every op and a whole tiny model
    minilora bench                     speed and memory benchmarks, printed as ratios
    minilora finetune --method lora    fine-tune the base model (full, LoRA, other PEFT) on a task
    minilora quantize                  NF4 (+ double quantisation) checkpoint, bit account, error
    minilora loftq                     LoftQ residual ||W - Q - BA|| per iteration on the base
    minilora results                   the fine-tuning results table (every method x task)
    minilora figures                   every figure in figures/, made from the saved results/
    minilora adapter merge|export-peft|import-peft|claim   adapter files; the many-adapter claim
    minilora score --adapter A --adapter B --task milton   several adapters in one mixed batch
    minilora paged-demo                paged AdamW on a simulated GPU: a long batch pages state out

Every command has ``--help`` with examples. Errors the user can fix (a bad flag value, a missing
or broken checkpoint, a character outside the vocabulary) print one line ``minilora: error: ...``
and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

PRESETS = {
    # the shipped base model: 1,928,000 parameters (7.7 MB float32); see data/SOURCES.md
    "base": dict(model=dict(block_size=256, n_layer=6, n_head=5, n_embd=160),
                 train=dict(max_steps=3000, batch_size=16, block_size=256, lr=2e-3, min_lr=1e-4,
                            warmup_steps=100, weight_decay=0.1, eval_every=250, eval_batches=40,
                            ckpt_every=250)),
    # a few seconds on a laptop: for trying the CLI and for tests
    "tiny": dict(model=dict(block_size=64, n_layer=2, n_head=2, n_embd=32),
                 train=dict(max_steps=50, batch_size=8, block_size=64, lr=3e-3, min_lr=3e-4,
                            warmup_steps=5, eval_every=25, eval_batches=4, ckpt_every=25)),
    # the benchmark configs of the Foundation issue
    "small": dict(model=dict(block_size=128, n_layer=4, n_head=4, n_embd=128),
                  train=dict(max_steps=1000, batch_size=16, block_size=128)),
    "medium": dict(model=dict(block_size=256, n_layer=6, n_head=8, n_embd=256),
                   train=dict(max_steps=1000, batch_size=8, block_size=256)),
}


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_backend(p):
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: $MINILORA_BACKEND or numpy)")


def _use_backend(args):
    from minilora import backend
    if getattr(args, "backend", None):
        backend.set_backend(args.backend)


def _load(path):
    from minilora.checkpoint import base_model_path, load_checkpoint
    return load_checkpoint(path or base_model_path())


# ----------------------------------------------------------------------------------------------
def cmd_pretrain(args):
    from minilora import backend
    from minilora.config import GPTConfig, TrainConfig
    from minilora.data import CharTokenizer, encode_corpus, load_shakespeare
    from minilora.model import GPT
    from minilora.train import CKPT_NAME, train

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
    splits = load_shakespeare(tuple(args.val_plays.split(",")))
    train_ids, val_ids = encode_corpus(splits["train"], tok), encode_corpus(splits["val"], tok)
    model = GPT(model_cfg, rng=train_cfg.seed)
    print(f"minilora pretrain: {model.num_parameters():,} parameters "
          f"({model.num_parameters() * 4 / 1e6:.1f} MB float32), backend {backend.get_backend()}; "
          f"train {len(train_ids):,} chars, val {len(val_ids):,} chars (plays: {args.val_plays})")
    print(f"  model {json.dumps(model_cfg.to_dict())}\n  train {json.dumps(train_cfg.to_dict())}")
    out = Path(args.out)
    hist = train(model, tok, train_ids, val_ids, train_cfg, out_dir=out, resume=args.resume,
                 progress=not args.no_progress)
    v = hist.final_val_loss
    print(f"done in {hist.seconds / 60:.1f} min: val loss {v:.4f} nats/char "
          f"({v / 0.6931471805599453:.4f} bits/char); checkpoint {out / CKPT_NAME}")
    if args.export:
        from minilora.checkpoint import save_checkpoint
        save_checkpoint(args.export, model, tok, extra={
            "val_loss_nats_per_char": v, "val_plays": args.val_plays,
            "train_config": train_cfg.to_dict(), "train_seconds": round(hist.seconds, 1),
            "command": "minilora " + " ".join(sys.argv[1:])})
        print(f"weights-only copy written to {args.export}")


def _adapter_registry(model, paths):
    """An AdapterRegistry on ``model`` holding the adapter files ``paths``; returns (registry,
    labels). A label is the file stem, or the folder name for finetune's ``adapter.safetensors``."""
    from minilora.multi_adapter import AdapterRegistry

    reg, labels = AdapterRegistry(model), []
    for path in paths:
        p = Path(path)
        label = p.parent.name if p.stem == "adapter" and p.parent.name else p.stem
        base, k = label, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        reg.load(label, p)
        labels.append(label)
    return reg, labels


def cmd_sample(args):
    from minilora.sample import sample_text

    _use_backend(args)
    model, tok, _ = _load(args.ckpt)
    prompt = args.prompt.replace("\\n", "\n")
    if not args.adapter:
        print(sample_text(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k,
                          args.seed))
        return
    from minilora.multi_adapter import generate_mixed

    reg, labels = _adapter_registry(model, args.adapter)
    texts = generate_mixed(reg, tok, prompt, labels, args.max_new_tokens, args.temperature,
                           args.top_k, args.seed)
    if len(texts) == 1:
        print(texts[0])
        return
    for label, text in zip(labels, texts):
        print(f"=== {label} ===\n{text}\n")


def cmd_gradcheck(args):
    from minilora import gradcheck

    _use_backend(args)
    t = time.perf_counter()
    rows = gradcheck.op_suite(args.seed) + gradcheck.tiny_model_check(args.seed)
    print(gradcheck.format_table(rows))
    print(f"({time.perf_counter() - t:.1f} s; float64, centred differences h=1e-5, "
          "pass: relative error < 1e-6 or absolute < 1e-9)")
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)


def cmd_bench(args):
    from minilora.bench import run_bench
    _use_backend(args)
    run_bench(configs=args.configs.split(","), steps=args.steps, threads=args.threads,
              torch_compare=not args.no_torch, out=args.out,
              only=args.only.split(",") if args.only else None)


def cmd_finetune(args):
    from minilora.config import LoraConfig
    from minilora.finetune import finetune, format_result, task_recipe

    _use_backend(args)
    method_cfg = None
    if args.method in ("lora", "qlora"):
        init = {"true": True, "false": False}.get(args.init.lower(), args.init)
        targets = args.targets or ",".join(task_recipe(args.task).get("lora_targets", ("q", "v"))
                                           if args.method == "lora" else ("q", "v"))
        method_cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                target_modules=tuple(t for t in targets.split(",") if t),
                                use_rslora=args.rslora, init_lora_weights=init, bias=args.bias)
        if args.method == "qlora":  # the 4-bit base: NF4 (+ double quant), LoftQ steps
            from minilora.config import QuantConfig
            quant = QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize,
                                double_quant=not args.no_double_quant,
                                loftq_iter=args.loftq_iter)
            method_cfg = (method_cfg, quant)
    elif args.method in ("adapter", "prefix", "prompt", "bitfit"):
        from minilora.peft_methods import (AdapterConfig, BitFitConfig, PrefixConfig,
                                           PromptConfig)
        method_cfg = {"adapter": lambda: AdapterConfig(bottleneck=args.bottleneck),
                      "prefix": lambda: PrefixConfig(prefix_len=args.prefix_len),
                      "prompt": lambda: PromptConfig(prompt_len=args.prompt_len),
                      "bitfit": BitFitConfig}[args.method]()
    given = dict(max_steps=args.steps, batch_size=args.batch_size, block_size=args.block_size,
                 lr=args.lr)  # None: the task recipe's, else the harness default
    overrides = dict({k: v for k, v in given.items() if v is not None}, seed=args.seed)
    r = finetune(args.method, args.task, method_cfg, overrides, base_path=args.base,
                 out_dir=args.out, progress=not args.no_progress, eval_batches=args.eval_batches,
                 eval_examples=args.eval_examples, lm_weight=args.lm_weight)
    print(format_result(r))
    if args.out:
        print(f"written: {args.out}/result.json and {args.out}/{r['weights_file']}")


def cmd_figures(args):
    from minilora.plots import make_figures

    done = make_figures(args.only.split(",") if args.only else None, args.results, args.figures)
    skipped = [n for n, v in done.items() if isinstance(v, str)]
    print(f"{len(done) - len(skipped)} figure(s) written to {args.figures}/"
          + (f"; {len(skipped)} skipped (results missing, see above)" if skipped else ""))


def cmd_results(args):
    from minilora.results_table import run_missing, write_table

    _use_backend(args)
    if args.run:
        run_missing(args.root, args.tasks.split(",") if args.tasks else None,
                    args.methods.split(",") if args.methods else None,
                    progress=not args.no_progress)
    text, path = write_table(args.root)
    print(text)
    print(f"written: {path}")


def cmd_loftq(args):
    from minilora.checkpoint import atomic_write_text
    from minilora.config import QuantConfig
    from minilora.qlora import loftq_residual_study

    _use_backend(args)
    model, _, _ = _load(args.ckpt)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    quant = QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize,
                        double_quant=not args.no_double_quant)
    study = loftq_residual_study(model, ranks, args.iters, quant)
    study["command"] = (f"minilora loftq --ranks {args.ranks} --iters {args.iters} --quant-type "
                        f"{args.quant_type} --blocksize {args.blocksize}"
                        + (" --no-double-quant" if args.no_double_quant else ""))
    for r, v in study["ranks"].items():
        rel = v["mean_relative_residual"]
        print(f"r={r}: mean ||W - Q - BA|| / ||W||: plain {args.quant_type} {rel[0]:.4f} -> "
              + " -> ".join(f"{x:.4f}" for x in rel[1:])
              + f"  (non-increasing in {v['monotone_layers']}/{v['n_layers']} layers)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(study, indent=2) + "\n")
    print(f"written: {args.out}")


def cmd_quantize(args):
    from minilora.data import encode_corpus, load_shakespeare
    from minilora.quant.model_quant import load_quantized, save_quantized
    from minilora.train import evaluate, fixed_batches

    _use_backend(args)
    if args.compare:
        from minilora.quant.compare import run_comparison
        run_comparison(args.results, ckpt=args.ckpt)
        return
    model, tok, _ = _load(args.ckpt)
    out = args.out or "runs/quantized.safetensors"
    rep = save_quantized(out, model, tok, args.type, args.blocksize, not args.no_double_quant)
    print(f"quantised {rep['quantized_tensors']} weight matrices ({rep['quantized_params']:,} "
          f"parameters) to {args.type}, block {args.blocksize}, double quant "
          f"{'on' if rep['double_quant'] else 'off'}; kept float32: {rep['kept_float32_params']:,}")
    print(f"  bits per quantised parameter: {rep['bits_per_param_measured']:.4f} measured, "
          f"{rep['bits_per_param_formula']:.4f} by formula")
    print(f"  checkpoint bytes: {rep['float32_bytes']:,} float32 -> {rep['quantized_bytes']:,} "
          f"({rep['quantized_bytes'] / rep['float32_bytes']:.3f}x)")
    print(f"  reconstruction error |W - W_hat|: mean {rep['mean_abs_error']:.2e}, "
          f"max {rep['max_abs_error']:.2e}")
    qmodel, _, _ = load_quantized(out)
    batches = fixed_batches(encode_corpus(load_shakespeare()["val"], tok), args.eval_batches, 8,
                            min(128, model.config.block_size), seed=12345)
    lf, lq = evaluate(model, batches), evaluate(qmodel, batches)
    print(f"  Shakespeare validation loss: float32 {lf:.4f} -> {args.type} {lq:.4f} nats/char "
          f"({lq - lf:+.4f})")
    print(f"written: {out}")


def cmd_paged_demo(args):
    from minilora.paged import MiB, DeviceOutOfMemory, paged_demo

    _use_backend(args)
    try:
        spikes = [int(s) for s in args.spike_steps.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--spike-steps must be comma-separated step numbers, got "
                         f"{args.spike_steps!r}") from None
    try:
        r = paged_demo(out=args.out or None, steps=args.steps, spike_steps=spikes,
                       batch_size=args.batch_size, block_size=args.block_size,
                       spike_block_size=args.spike_block_size,
                       page_bytes=int(args.page_kib * 1024),
                       bandwidth_bytes_per_s=args.bandwidth_gbs * 1e9,
                       budget_bytes=None if args.budget_mb is None else int(args.budget_mb * MiB),
                       ckpt=args.ckpt, log=print)
    except DeviceOutOfMemory as e:
        raise UsageError(f"out of (simulated) device memory: {e}") from None
    for label, run in r["runs"].items():
        t = run["totals"]
        print(f"{label}: budget {run['budget_bytes'] / MiB:.1f} MiB, peak {t['peak_bytes'] / MiB:.1f}"
              f" MiB; {t['page_outs']} page-outs, {t['page_ins']} page-ins, "
              f"{(t['bytes_in'] + t['bytes_out']) / MiB:.1f} MiB moved, modelled "
              f"{t['modelled_s'] * 1e3:.2f} ms at {args.bandwidth_gbs:g} GB/s")
    print(f"losses identical with and without paging: {r['losses_identical']}")
    if args.out:
        print(f"written: {args.out}")


def cmd_tour(args):
    from minilora.tour import run_tour
    _use_backend(args)
    run_tour(fast=args.fast)


def cmd_score(args):
    from minilora.multi_adapter import format_scores, score_adapters

    _use_backend(args)
    model, tok, _ = _load(args.ckpt)
    reg, labels = _adapter_registry(model, args.adapter or [])
    adapters = ([] if args.no_base else [None]) + labels
    if not adapters:
        raise UsageError("nothing to score: give --adapter FILE (or leave out --no-base)")
    res = score_adapters(reg, tok, args.task, adapters, args.eval_batches, args.batch_size,
                         args.block_size, args.eval_examples)
    print(format_scores(args.task, res))


def cmd_adapter_merge(args):
    from minilora.checkpoint import base_model_path, save_checkpoint
    from minilora.lora import load_adapter
    from minilora.multi_adapter import merge_and_unload

    _use_backend(args)
    model, tok, _ = _load(args.base)
    config = load_adapter(args.adapter, model)
    merge_and_unload(model)
    save_checkpoint(args.out, model, tok, extra={
        "merged_adapter": str(args.adapter), "lora_config": config.to_dict(),
        "base": str(args.base or base_model_path())})
    print(f"merged {args.adapter} (r={config.r}, targets {','.join(config.target_modules)}) into "
          f"the base: {model.num_parameters():,} parameters written to {args.out}")


def cmd_adapter_export_peft(args):
    from minilora.checkpoint import base_model_path
    from minilora.lora import load_adapter
    from minilora.peft_format import CONFIG_NAME, WEIGHTS_NAME, export_peft

    _use_backend(args)
    model, _, _ = _load(args.base)
    config = load_adapter(args.adapter, model)
    out = export_peft(args.out, model, config, str(args.base or base_model_path()))
    print(f"written: {out / WEIGHTS_NAME} and {out / CONFIG_NAME}")


def cmd_adapter_import_peft(args):
    from minilora.lora import save_adapter
    from minilora.peft_format import import_peft

    _use_backend(args)
    model, _, _ = _load(args.base)
    config = import_peft(args.peft_dir, model)
    save_adapter(args.out, model, config)
    print(f"imported {args.peft_dir} (r={config.r}, targets {','.join(config.target_modules)}); "
          f"written: {args.out}")


def cmd_adapter_claim(args):
    from minilora.multi_adapter import run_claim

    _use_backend(args)
    run_claim(args.out, tuple(t for t in args.tasks.split(",") if t), args.steps, args.r,
              args.alpha, eval_batches=args.eval_batches, eval_examples=args.eval_examples,
              runs_dir=args.runs, progress=not args.no_progress)


def _add_adapter_parsers(sub):
    """``minilora adapter ...`` and ``minilora score``."""
    a = sub.add_parser("adapter", help="adapter files: merge into a checkpoint, PEFT format, claim",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora adapter merge runs/milton/adapter.safetensors --out runs/milton-merged.safetensors
              minilora adapter export-peft runs/milton/adapter.safetensors --out runs/milton-peft
              minilora adapter import-peft runs/milton-peft --out runs/milton2.safetensors
              minilora adapter claim --out results/multi_adapter      # ~10 min on 2 CPU cores
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
    s.add_argument("--out", required=True, help="the merged checkpoint to write")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    _add_backend(s)
    s.set_defaults(func=cmd_adapter_merge)

    s = asub.add_parser("export-peft", help="write an adapter in PEFT's directory format",
                        formatter_class=_formatter, epilog=textwrap.dedent("""\
            example:
              minilora adapter export-peft runs/milton/adapter.safetensors --out runs/milton-peft
            """))
    s.add_argument("adapter", help="adapter file")
    s.add_argument("--out", required=True,
                   help="directory for adapter_model.safetensors + adapter_config.json")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    _add_backend(s)
    s.set_defaults(func=cmd_adapter_export_peft)

    s = asub.add_parser("import-peft", help="read a PEFT adapter directory into an adapter file",
                        formatter_class=_formatter, epilog=textwrap.dedent("""\
            example:
              minilora adapter import-peft runs/milton-peft --out runs/milton2.safetensors
            """))
    s.add_argument("peft_dir", metavar="DIR", help="PEFT adapter directory")
    s.add_argument("--out", required=True, help="adapter file to write")
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    _add_backend(s)
    s.set_defaults(func=cmd_adapter_import_peft)

    s = asub.add_parser("claim", help="per-task LoRAs hot-swapped vs one general LoRA",
                        formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora adapter claim --out results/multi_adapter
              minilora adapter claim --tasks milton,python,sentiment --steps 200 --out /tmp/claim
            """))
    s.add_argument("--out", default="results/multi_adapter", help="where claim.json goes")
    s.add_argument("--runs", default="runs/multi_adapter", help="where the adapters go")
    s.add_argument("--tasks", default="milton,python", help="comma-separated, at least two")
    s.add_argument("--steps", type=int, default=200, help="steps per task (general: steps x tasks)")
    s.add_argument("--r", type=int, default=8)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--eval-batches", type=int, default=16)
    s.add_argument("--eval-examples", type=int, default=None,
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
    s.add_argument("--task", choices=["milton", "python", "sentiment", "lexicon"],
                   default="milton")
    s.add_argument("--no-base", action="store_true", help="leave out the base model's row")
    s.add_argument("--eval-batches", type=int, default=16)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--block-size", type=int, default=128)
    s.add_argument("--eval-examples", type=int, default=None,
                   help="sentiment: score only the first N test sentences (default: all)")
    s.add_argument("--ckpt", default=None, help="base checkpoint (default: the shipped one)")
    _add_backend(s)
    s.set_defaults(func=cmd_score)


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    s.add_argument("--out", default="runs/pretrain", help="run directory (checkpoint, metrics.jsonl)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.safetensors")
    s.add_argument("--export", default=None,
                   help="also write a weights-only checkpoint here at the end (what we ship)")
    s.add_argument("--val-plays", default="hamlet,tempest",
                   help="comma-separated plays held out for validation (default: hamlet,tempest)")
    for name, typ in (("block-size", int), ("n-layer", int), ("n-head", int), ("n-embd", int),
                      ("max-steps", int), ("batch-size", int), ("lr", float), ("min-lr", float),
                      ("warmup-steps", int), ("weight-decay", float), ("grad-clip", float),
                      ("eval-every", int), ("eval-batches", int), ("ckpt-every", int),
                      ("seed", int)):
        s.add_argument(f"--{name}", type=typ, default=None, help="override the preset")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_backend(s)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("finetune", help="fine-tune the base model: full, LoRA, Houlsby adapters, "
                       "prefix, prompt, BitFit; like for like",
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
            """))
    from minilora.finetune import METHODS
    s.add_argument("--method", choices=list(METHODS), default="lora")
    s.add_argument("--task", choices=["milton", "python", "sentiment", "lexicon"],
                   default="milton", help="milton / python: held-out loss; sentiment (movie-review "
                   "sentences) / lexicon (VADER words): accuracy (default milton)")
    s.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    s.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (default 16)")
    s.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    s.add_argument("--targets", default=None,
                   help="comma-separated modules: q,k,v,o,up,down,wte,lm_head (default q,v; "
                        "lora on sentiment: q,k,v,o,up,down,lm_head)")
    s.add_argument("--init", default="true",
                   help="init_lora_weights: true (PEFT default), false, gaussian, swap, pissa; "
                        "qlora: loftq (LoftQ split of W0 into 4-bit Q + B A)")
    s.add_argument("--rslora", action="store_true", help="scaling alpha/sqrt(r) (rsLoRA)")
    s.add_argument("--bias", choices=["none", "all", "lora_only"], default="none")
    s.add_argument("--quant-type", choices=["nf4", "fp4", "int4"], default="nf4",
                   help="qlora: 4-bit code of the frozen base (default nf4)")
    s.add_argument("--blocksize", type=int, default=64,
                   help="qlora: weights per absmax block (default 64)")
    s.add_argument("--no-double-quant", action="store_true",
                   help="qlora: keep float32 block scales (4.5 instead of 4.127 bits/weight)")
    s.add_argument("--loftq-iter", type=int, default=5,
                   help="qlora --init loftq: alternating steps T (default 5; PEFT: 1)")
    s.add_argument("--bottleneck", type=int, default=16,
                   help="adapter: Houlsby bottleneck width m (default 16)")
    s.add_argument("--prefix-len", type=int, default=16,
                   help="prefix: keys/values per layer P (default 16)")
    s.add_argument("--prompt-len", type=int, default=16,
                   help="prompt: soft prompt vectors P (default 16)")
    s.add_argument("--steps", type=int, default=None,
                   help="training steps (default 200; sentiment: 400)")
    s.add_argument("--batch-size", type=int, default=None, help="default 8; sentiment: 32")
    s.add_argument("--block-size", type=int, default=None, help="default 128")
    s.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the method's: 1e-3 full, 5e-3 lora / "
                        "adapter, 1e-2 bitfit, 3e-2 prefix, 1e-1 prompt; lora on sentiment: "
                        "3e-3)")
    s.add_argument("--lm-weight", type=float, default=None,
                   help="sentiment: weight of the language-modelling loss on the sentence "
                        "beside the label loss (default 1; 0: the label only)")
    s.add_argument("--eval-batches", type=int, default=16)
    s.add_argument("--eval-examples", type=int, default=None,
                   help="sentiment: score only the first N test sentences (default: all 2,014)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    s.add_argument("--out", default=None, help="write result.json and the adapter/model here")
    s.add_argument("--no-progress", action="store_true")
    _add_backend(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("loftq", help="LoftQ residual per iteration on the base model's weights",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora loftq                                    # r 4,8,16, 10 steps, NF4 + DQ
              minilora loftq --ranks 8 --iters 5 --out runs/loftq.json
            """))
    s.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped base model)")
    s.add_argument("--ranks", default="4,8,16", help="comma-separated LoRA ranks (default 4,8,16)")
    s.add_argument("--iters", type=int, default=10, help="alternating steps T (default 10)")
    s.add_argument("--quant-type", choices=["nf4", "fp4", "int4"], default="nf4")
    s.add_argument("--blocksize", type=int, default=64)
    s.add_argument("--no-double-quant", action="store_true")
    s.add_argument("--out", default="results/quant/loftq_residuals.json")
    _add_backend(s)
    s.set_defaults(func=cmd_loftq)

    s = sub.add_parser("quantize", help="quantise a checkpoint's linear weights to NF4/FP4/int4",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora quantize                                  # the shipped base model, NF4 + DQ
              minilora quantize --type fp4 --no-double-quant --out runs/fp4.safetensors
              minilora quantize --ckpt runs/base/ckpt.safetensors --blocksize 128
              minilora quantize --compare     # NF4 vs FP4 vs int4 -> results/quant/*.json
            """))
    s.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped base model)")
    s.add_argument("--out", default=None, help="output file (default runs/quantized.safetensors)")
    s.add_argument("--type", choices=["nf4", "fp4", "int4"], default="nf4")
    s.add_argument("--blocksize", type=int, default=64)
    s.add_argument("--no-double-quant", action="store_true", help="keep absmax in float32")
    s.add_argument("--eval-batches", type=int, default=8)
    s.add_argument("--compare", action="store_true",
                   help="instead: compare nf4, fp4 and int4 (error, error vs block size, codes "
                        "used) on N(0,1) data and the checkpoint's weights; write "
                        "RESULTS/quant/*.json")
    s.add_argument("--results", default="results", help="results folder for --compare")
    _add_backend(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("results", help="the fine-tuning results table (every method x task)",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora results                 the table of the saved runs in results/finetune/
              minilora results --run           first run every missing (task, method) pair
              minilora results --run --tasks milton --methods lora,full
            """))
    s.add_argument("--run", action="store_true",
                   help="run the missing (task, method) pairs first (harness defaults)")
    s.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    s.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    s.add_argument("--root", default="results/finetune", help="where the runs are saved")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_backend(s)
    s.set_defaults(func=cmd_results)

    s = sub.add_parser("figures", help="make every figure in figures/ from the saved results/",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora figures                      all figures whose results exist
              minilora figures --only base_pretrain
            """))
    s.add_argument("--only", default=None, help="comma-separated figure names (default: all)")
    s.add_argument("--results", default="results", help="where the saved results are")
    s.add_argument("--figures", default="figures", help="where the PNGs go")
    s.set_defaults(func=cmd_figures)

    s = sub.add_parser("sample", help="generate text from a checkpoint", formatter_class=_formatter,
                       epilog=textwrap.dedent("""\
            examples:
              minilora sample                                   # the shipped base model
              minilora sample --prompt "KING HENRY:" --max-new-tokens 300 --seed 3
              minilora sample --ckpt runs/tiny/ckpt.safetensors --temperature 1.0
              minilora sample --adapter runs/milton/adapter.safetensors --prompt "Of Man"
              minilora sample --adapter a.safetensors --adapter b.safetensors   # one batch
            """))
    s.add_argument("--ckpt", default=None, help="checkpoint file (default: the shipped base model)")
    s.add_argument("--prompt", default="\n", help="start text; '\\n' is a newline (default: newline)")
    s.add_argument("--max-new-tokens", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--adapter", action="append", default=[],
                   help="LoRA adapter file on the base; repeat to sample several in one batch")
    _add_backend(s)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("gradcheck", help="finite-difference check of every backward pass",
                       formatter_class=_formatter, epilog="example:\n  minilora gradcheck --seed 3")
    s.add_argument("--seed", type=int, default=0)
    _add_backend(s)
    s.set_defaults(func=cmd_gradcheck)

    s = sub.add_parser("bench", help="speed/memory benchmarks (ratios measured in one run)",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora bench                         # small and medium, vs PyTorch if installed
              minilora bench --configs small --steps 5 --no-torch
              minilora bench --out results/bench.json
              minilora bench --configs small --only peft_latency   # adapters vs LoRA latency
            """))
    s.add_argument("--configs", default="small,medium", help="comma-separated: small,medium")
    s.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    s.add_argument("--threads", type=int, default=2, help="BLAS / torch threads (default 2)")
    s.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    s.add_argument("--only", default=None,
                   help="comma-separated measurements (train_step, memory, lora, multi_adapter, "
                        "peft_latency, qlora; default: all)")
    s.add_argument("--out", default=None, help="also write the results as JSON here")
    _add_backend(s)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("paged-demo", help="paged AdamW on a simulated GPU: a long batch pages state out",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            Full fine-tuning of the base model on Milton; step(s) --spike-steps use
            --spike-block-size tokens. Two runs: a tight budget (a normal step just fits) and a
            roomy one. Prints page events per step and writes the trace.
            examples:
              minilora paged-demo                                  # writes results/paged/trace.json
              minilora paged-demo --spike-steps 5 --page-kib 64 --bandwidth-gbs 25 --out ''
            """))
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--spike-steps", default="3,7", help="comma-separated 0-based steps (default 3,7)")
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--block-size", type=int, default=64, help="tokens per window, normal steps")
    s.add_argument("--spike-block-size", type=int, default=128, help="tokens per window, spikes")
    s.add_argument("--page-kib", type=float, default=2048, help="page size in KiB (default 2 MiB)")
    s.add_argument("--bandwidth-gbs", type=float, default=16.0,
                   help="host<->device GB/s of the cost model (default 16, PCIe 3.0 x16)")
    s.add_argument("--budget-mb", type=float, default=None,
                   help="device budget in MiB (default: what a normal step needs)")
    s.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped base model)")
    s.add_argument("--out", default="results/paged/trace.json", help="trace JSON ('' to skip)")
    _add_backend(s)
    s.set_defaults(func=cmd_paged_demo)
    _add_adapter_parsers(sub)
    return p


def main(argv=None) -> int:
    from minilora.backend import BackendError
    from minilora.checkpoint import CheckpointError
    from minilora.config import ConfigError
    from minilora.optim import NonFiniteError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (UsageError, BackendError, CheckpointError, ConfigError, ValueError,
            FileNotFoundError, NonFiniteError) as e:
        print(f"minilora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minilora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
