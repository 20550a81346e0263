"""Activation recomputation (:func:`minilora.model.set_recompute`): peak memory and step time of
full fine-tuning, LoRA and QLoRA plain, with recomputation of whole blocks, and with
recomputation one sequence at a time (``chunk=1``), and the LoRA / full memory ratio each gives.

Why it matters for LoRA: without recomputation a LoRA step still holds every block's activations
(as full fine-tuning does), so LoRA saves only the gradients and AdamW moments of the frozen
weights. With it, the activations shrink to the block inputs plus one block's (on one sequence,
with ``chunk=1``), and what is left is mostly weights + optimizer state: the regime the LoRA
paper's "3x less memory" speaks of. The bound with no activations at all is
(weights + 3 x LoRA's numbers) / (4 x weights), about 0.25; at batch 1 the ratio comes close.
"""
from __future__ import annotations

from minilora import backend
from minilora.bench.core import BenchContext, Check, Section, _ours_stepper, interleaved
from minilora.methods.lora.config import LoraConfig
from minilora.config import QuantConfig
from minilora.methods.lora import inject_lora
from minilora.memory import memory_account
from minilora.model import GPT, set_recompute
from minilora.methods.qlora import inject_qlora

LORA = dict(r=8, lora_alpha=16, target_modules=("q", "v"))
#: variant -> (recompute, chunk)
VARIANTS = {"plain": (False, None), "recompute": (True, None), "recompute-chunk1": (True, 1)}
METHODS = ("full", "lora", "qlora")


def _model(ctx: BenchContext, method: str, variant: str):
    model = GPT(ctx.config, rng=0, dtype="float32")
    if method == "lora":
        inject_lora(model, LoraConfig(**LORA))
    elif method == "qlora":
        inject_qlora(model, LoraConfig(**LORA), QuantConfig())
    on, chunk = VARIANTS[variant]
    set_recompute(model, on, chunk)
    return model


def measure_recompute(ctx: BenchContext) -> Section:
    """Peak memory (tracemalloc: weights + AdamW state + one steady step's allocations) and
    median step time (all nine steppers interleaved) of each method in each variant.

    Target: LoRA / full peak memory <= 0.5 with recomputation on (``chunk=1``, its
    lowest-memory setting); the whole-block and batch-1 ratios are reported beside it.
    """
    if backend.is_cupy():
        return Section({"skipped": "memory is measured for the NumPy backend only"},
                       [("recomputation", "skipped", "NumPy backend only")])
    xb, yb = ctx.batches(1)[0]
    data = {"peak_bytes": {}, "peak_bytes_batch1": {}}
    steppers = {}
    for method in METHODS:
        for variant in VARIANTS:
            key = f"{method}/{variant}"
            if ctx.memory:
                data["peak_bytes"][key] = memory_account(
                    _model(ctx, method, variant), xb, yb)["measured_total"]
                data["peak_bytes_batch1"][key] = memory_account(
                    _model(ctx, method, variant), xb[:1], yb[:1])["measured_total"]
            steppers[key] = _ours_stepper(ctx, _model(ctx, method, variant))[2]
    t = data["step_median_s"] = interleaved(steppers, ctx.steps, ctx.warmup)
    rows, checks = [], []
    mib = 2.0 ** 20
    for method in METHODS:
        plain = t[f"{method}/plain"]
        for variant in list(VARIANTS)[1:]:
            v = t[f"{method}/{variant}"]
            rows.append((f"{method} step, {variant} / plain",
                         f"{v * 1e3:.1f} / {plain * 1e3:.1f} ms = {v / plain:.2f}",
                         "(no target; one more forward: ~1.3)"))
        if ctx.memory:
            p = data["peak_bytes"]
            rows.append((f"{method} peak memory: plain, recompute, chunk 1",
                         " / ".join(f"{p[f'{method}/{v}'] / mib:.1f}" for v in VARIANTS) + " MiB",
                         ""))
    if ctx.memory:
        p, p1 = data["peak_bytes"], data["peak_bytes_batch1"]
        ratio = {v: p[f"lora/{v}"] / p[f"full/{v}"] for v in VARIANTS}
        r1 = p1["lora/recompute-chunk1"] / p1["full/recompute-chunk1"]
        rq = p["qlora/recompute-chunk1"] / p["full/recompute-chunk1"]
        data.update(ratio_lora_over_full=ratio, ratio_lora_over_full_batch1_chunk1=r1,
                    ratio_qlora_over_full_chunk1=rq)
        checks.append(Check(ctx.name, "LoRA / full peak memory, recomputation (chunk 1)",
                            ratio["recompute-chunk1"], "<=", 0.5))
        rows += [("LoRA / full peak memory, recompute chunk 1", f"{ratio['recompute-chunk1']:.2f}",
                  f"<= 0.5  {checks[-1].status()}"),
                 ("  whole-block recompute; no recompute",
                  f"{ratio['recompute']:.2f}; {ratio['plain']:.2f}", "(no target)"),
                 ("  chunk 1 at batch 1", f"{r1:.2f}", "(no target; bound ~0.25)"),
                 ("QLoRA / full peak memory, recompute chunk 1", f"{rq:.2f}", "(no target)")]
    return Section(data, rows, checks)
