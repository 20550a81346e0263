"""Quantisation: ``quantize`` (and ``--compare``), ``loftq``, ``paged-demo``."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from minilora.cli.common import (
    POSITIVE,
    _add_backend,
    _formatter,
    _load,
    _use_backend,
    add_overwrite,
    float_range,
    int_list,
    output,
    written,
)
from minilora.config import QuantConfig
from minilora.data import encode_corpus, load_shakespeare
from minilora.errors import UsageError
from minilora.memory import check_fits
from minilora.experiments.studies.loftq import loftq_residual_study
from minilora.experiments.studies.paged_demo import paged_demo
from minilora.experiments.studies.quant_compare import run_comparison
from minilora.io import atomic_write_text
from minilora.paged import DeviceOutOfMemory, MiB
from minilora.quant.model_quant import load_quantized, save_quantized
from minilora.train import evaluate, fixed_batches


def cmd_quantize(args):
    if args.compare:
        if args.out is not None:
            raise UsageError("--out is the quantised file; with --compare the JSON goes to "
                             "--results DIR")
        if args.results is not None:
            output(Path(args.results) / "quant", "--results", command="quantize", name="compare",
                   kind="collection", args=args)
            root = Path(args.results)
        else:
            root = output(None, "--results", command="quantize", name="compare",
                          kind="collection")
    else:
        if args.results is not None:
            raise UsageError("--results is where --compare writes; the quantised file goes to "
                             "--out FILE")
        out = output(args.out, "--out", command="quantize", name=args.type,
                     suffix=".safetensors", kind="file", args=args)
    _use_backend(args)
    if args.compare:
        run_comparison(root, ckpt=args.ckpt)
        written("comparison", Path(root) / "quant")
        return
    model, tok, _ = _load(args.ckpt)
    check_fits(f"--eval-batches {args.eval_batches:,} of 8 x 128 windows",
               16.0 * args.eval_batches * 8 * 128, 16.0 * 8 * 128, " batches")
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
    written("quantised checkpoint", out)


def cmd_loftq(args):
    out = output(args.out, "--out", command="loftq", name="loftq_residuals", suffix=".json",
                 kind="file", args=args)
    _use_backend(args)
    model, _, _ = _load(args.ckpt)
    ranks = args.ranks
    quant = QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize,
                        double_quant=not args.no_double_quant)
    study = loftq_residual_study(model, ranks, args.iters, quant)
    study["command"] = (f"minilora loftq --ranks {','.join(map(str, ranks))} --iters {args.iters} --quant-type "
                        f"{args.quant_type} --blocksize {args.blocksize}"
                        + (" --no-double-quant" if args.no_double_quant else ""))
    for r, v in study["ranks"].items():
        rel = v["mean_relative_residual"]
        print(f"r={r}: mean ||W - Q - BA|| / ||W||: plain {args.quant_type} {rel[0]:.4f} -> "
              + " -> ".join(f"{x:.4f}" for x in rel[1:])
              + f"  (non-increasing in {v['monotone_layers']}/{v['n_layers']} layers)")
    atomic_write_text(out, json.dumps(study, indent=2) + "\n")
    written("LoftQ residuals", out)


def cmd_paged_demo(args):
    spikes = args.spike_steps
    late = [s for s in spikes if s >= args.steps]
    if late:
        raise UsageError(f"--spike-steps {late} lie beyond the run: steps are 0..{args.steps - 1} "
                         f"(--steps {args.steps})")
    out = None
    if args.out != "":
        out = output(args.out, "--out", command="paged-demo", name="trace", suffix=".json",
                     kind="file", args=args)
    _use_backend(args)
    try:
        r = paged_demo(out=out, steps=args.steps, spike_steps=spikes,
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
    if out is not None:
        written("trace", out)


def add_parsers(sub):
    """Add this group's subcommands to the ``minilora`` parser."""
    s = sub.add_parser("quantize", help="quantise a checkpoint's linear weights to NF4/FP4/int4",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora quantize                                  # the shipped base model, NF4 + DQ
              minilora quantize --type fp4 --no-double-quant --out runs/fp4.safetensors
              minilora quantize --ckpt runs/base/ckpt.safetensors --blocksize 128
              minilora quantize --compare     # NF4 vs FP4 vs int4 -> runs/quantize/compare/quant/
              minilora quantize --compare --results results --overwrite  # the committed results/quant/
            """))
    s.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped base model)")
    s.add_argument("--out", default=None,
                   help="output file (default: a new runs/quantize/TYPE.safetensors)")
    add_overwrite(s, "the --out file (with --compare: the JSON files in RESULTS/quant)")
    s.add_argument("--type", choices=["nf4", "fp4", "int4"], default="nf4")
    s.add_argument("--blocksize", type=POSITIVE, default=64, help="weights per absmax block")
    s.add_argument("--no-double-quant", action="store_true", help="keep absmax in float32")
    s.add_argument("--eval-batches", type=POSITIVE, default=8,
                   help="validation windows (8 x 128) for the float vs 4-bit loss")
    s.add_argument("--compare", action="store_true",
                   help="instead: compare nf4, fp4 and int4 (error, error vs block size, codes "
                        "used) on N(0,1) data and the checkpoint's weights; write "
                        "RESULTS/quant/*.json")
    s.add_argument("--results", default=None,
                   help="--compare writes RESULTS/quant/*.json (default: a new "
                        "runs/quantize/compare; --results results --overwrite updates the "
                        "committed files)")
    _add_backend(s)
    s.set_defaults(func=cmd_quantize)


    s = sub.add_parser("loftq", help="LoftQ residual per iteration on the base model's weights",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            examples:
              minilora loftq                   # r 4,8,16, 10 steps, NF4 + DQ -> runs/loftq/
              minilora loftq --ranks 8 --iters 5 --out runs/loftq.json
              minilora loftq --out results/quant/loftq_residuals.json --overwrite   # the committed one
            """))
    s.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped base model)")
    s.add_argument("--ranks", type=int_list(1), default=[4, 8, 16],
                   help="comma-separated LoRA ranks (default 4,8,16)")
    s.add_argument("--iters", type=POSITIVE, default=10, help="alternating steps T (default 10)")
    s.add_argument("--quant-type", choices=["nf4", "fp4", "int4"], default="nf4")
    s.add_argument("--blocksize", type=POSITIVE, default=64, help="weights per absmax block")
    s.add_argument("--no-double-quant", action="store_true")
    s.add_argument("--out", default=None,
                   help="the study's JSON (default: a new runs/loftq/loftq_residuals.json; "
                        "committed copy: results/quant/loftq_residuals.json)")
    add_overwrite(s, "the --out file")
    _add_backend(s)
    s.set_defaults(func=cmd_loftq)


    s = sub.add_parser("paged-demo", help="paged AdamW on a simulated GPU: a long batch pages state out",
                       formatter_class=_formatter, epilog=textwrap.dedent("""\
            Full fine-tuning of the base model on Milton; step(s) --spike-steps use
            --spike-block-size tokens. Two runs: a tight budget (a normal step just fits) and a
            roomy one. Prints page events per step and writes the trace.
            examples:
              minilora paged-demo                                  # writes runs/paged-demo/trace.json
              minilora paged-demo --spike-steps 5 --page-kib 64 --bandwidth-gbs 25 --out ''
              minilora paged-demo --out results/paged/trace.json --overwrite   # the committed trace
            """))
    s.add_argument("--steps", type=POSITIVE, default=10, help="training steps of each run")
    s.add_argument("--spike-steps", type=int_list(0, allow_empty=True), default=[3, 7],
                   help="comma-separated 0-based steps (default 3,7)")
    s.add_argument("--batch-size", type=POSITIVE, default=2, help="windows per step")
    s.add_argument("--block-size", type=POSITIVE, default=64, help="tokens per window, normal steps")
    s.add_argument("--spike-block-size", type=POSITIVE, default=128,
                   help="tokens per window, spikes")
    s.add_argument("--page-kib", type=float_range(0, lo_open=True), default=2048,
                   help="page size in KiB (default 2 MiB)")
    s.add_argument("--bandwidth-gbs", type=float_range(0, lo_open=True), default=16.0,
                   help="host<->device GB/s of the cost model (default 16, PCIe 3.0 x16)")
    s.add_argument("--budget-mb", type=float_range(0, lo_open=True), default=None,
                   help="device budget in MiB (default: what a normal step needs)")
    s.add_argument("--ckpt", default=None, help="checkpoint (default: the shipped base model)")
    s.add_argument("--out", default=None,
                   help="trace JSON (default: a new runs/paged-demo/trace.json; '' to skip; "
                        "committed copy: results/paged/trace.json)")
    add_overwrite(s, "the --out file")
    _add_backend(s)
    s.set_defaults(func=cmd_paged_demo)
