"""LoRA vs full fine-tuning, many adapters on one base, adapter latency, QLoRA vs LoRA."""
from __future__ import annotations

import tempfile
from pathlib import Path

from minilora import backend
from minilora.adapters import AdapterRegistry
from minilora.bench.core import (
    BenchContext,
    Check,
    Section,
    _ours_stepper,
    interleaved,
)
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.config import QuantConfig
from minilora.data import CharTokenizer
from minilora.io import read_typed
from minilora.methods.lora import inject_lora, lora_layers, lora_state_dict, merge_lora
from minilora.memory import memory_account
from minilora.model import GPT
from minilora.methods.houlsby import HoulsbyConfig, inject_houlsby
from minilora.methods.qlora import inject_qlora


def measure_lora(ctx: BenchContext) -> Section:
    """LoRA (r=8 on q, v) training step vs full fine-tuning step, and inference with the adapter
    merged / unmerged vs the plain base model (all interleaved in one run).

    Targets (the LoRA issue): step ratio <= 0.70 (ideal ~2/3: the frozen weights' dW GEMMs,
    a third of the matmul work, are skipped); merged inference / base <= 1.02 (the same
    computation); unmerged <= 1.15 (two thin extra GEMMs per adapted layer).
    """

    _, _, full_step = _ours_stepper(ctx, GPT(ctx.config, rng=0, dtype="float32"))
    lora_model = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(lora_model, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
    _, _, lora_step = _ours_stepper(ctx, lora_model)
    steps = interleaved({"full": full_step, "lora": lora_step}, ctx.steps, ctx.warmup)

    base = GPT(ctx.config, rng=0, dtype="float32")
    unmerged = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(unmerged, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
    merged = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(merged, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
    merge_lora(merged)
    assert all(m.merged for m in lora_layers(merged).values())
    x = backend.asarray(ctx.batches(1)[0][0])
    infer = interleaved({"base": lambda: base.forward(x, check=False),
                          "merged": lambda: merged.forward(x, check=False),
                          "unmerged": lambda: unmerged.forward(x, check=False)},
                         ctx.steps, ctx.warmup)
    mem = None
    if ctx.memory and not backend.is_cupy():
        xb, yb = ctx.batches(1)[0]
        mem = {"full": memory_account(GPT(ctx.config, rng=0, dtype="float32"), xb, yb),
               "lora": memory_account(lora_model, xb, yb)}
    r_step = steps["lora"] / steps["full"]
    r_merged = infer["merged"] / infer["base"]
    r_unmerged = infer["unmerged"] / infer["base"]
    checks = [Check(ctx.name, "LoRA step / full FT step", r_step, "<=", 0.70),
              Check(ctx.name, "merged inference / base", r_merged, "<=", 1.02),
              Check(ctx.name, "unmerged inference / base", r_unmerged, "<=", 1.15)]
    rows = [("LoRA r=8 q,v step / full FT step",
             f"{steps['lora'] * 1e3:.1f} / {steps['full'] * 1e3:.1f} ms = {r_step:.2f}",
             f"<= 0.70  {checks[0].status()}"),
            ("merged LoRA inference / base", f"{r_merged:.3f}", f"<= 1.02  {checks[1].status()}"),
            ("unmerged LoRA inference / base", f"{r_unmerged:.3f}", f"<= 1.15  {checks[2].status()}")]
    data = {"step_median_s": steps, "inference_median_s": infer, "ratio_lora_over_full": r_step,
            "ratio_merged_over_base": r_merged, "ratio_unmerged_over_base": r_unmerged,
            "memory": mem}
    if mem is not None:
        # peak = weights + AdamW state + what one steady step allocates (gradients, activations)
        r_mem = mem["lora"]["measured_total"] / mem["full"]["measured_total"]
        data["ratio_peak_memory_lora_over_full"] = r_mem
        checks.append(Check(ctx.name, "LoRA peak memory / full FT peak memory", r_mem, "<=", 0.5))
        mib = 2.0 ** 20
        rows.append(("LoRA peak memory / full FT (tracemalloc)",
                     f"{mem['lora']['measured_total'] / mib:.1f} / "
                     f"{mem['full']['measured_total'] / mib:.1f} MiB = {r_mem:.2f}",
                     f"<= 0.5  {checks[-1].status()}"))
        rows.append(("  of which activations, LoRA / full",
                     f"{mem['lora']['activations'] / mib:.1f} / "
                     f"{mem['full']['activations'] / mib:.1f} MiB", "counted from the caches"))
    return Section(data, rows, checks)


def measure_multi_adapter(ctx: BenchContext) -> Section:
    """Many adapters on one base (:mod:`minilora.adapters`; 4 adapters, r=8 on q, v).

    (a) **switch time / base checkpoint reload time**: switching the active adapter unmerged
        (re-pointing lora_A / lora_B: no arithmetic) and merged (W0 -= ΔW_old; W0 += ΔW_new), each
        against reloading the base checkpoint from disk (``load_checkpoint``; the file is in the
        page cache, the kindest case for the reload). Target <= 0.05 (the LoRA issue). Also
        reported, without a target: the bare tensor read (``read_typed``), since most of
        ``load_checkpoint``'s time is ``GPT.__init__`` drawing the random weights it overwrites.
    (b) **mixed-adapter batch throughput / one merged adapter**: the same (B, T) batch, rows
        assigned round robin to the 4 adapters (sorted segments, two thin GEMMs per adapter and
        layer), against the model with one adapter merged (the base's cost). Interleaved.
        Target >= 0.8.
    """


    n_adapters, switches = 4, 50
    reg, merged_reg = (AdapterRegistry(GPT(ctx.config, rng=0, dtype="float32")) for _ in "ab")
    single = GPT(ctx.config, rng=0, dtype="float32")
    for i in range(n_adapters):
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"), init_lora_weights=False,
                         seed=i)
        m = GPT(ctx.config, rng=0, dtype="float32")
        inject_lora(m, cfg)
        arrays = {k: backend.to_numpy(v) for k, v in lora_state_dict(m).items()}
        reg.add(f"a{i}", arrays, cfg)
        merged_reg.add(f"a{i}", arrays, cfg)
        if i == 0:
            inject_lora(single, cfg)
            for name, p in lora_state_dict(single).items():
                p[...] = backend.asarray(arrays[name])
            merge_lora(single, safe_merge=True)
    names = reg.names
    k = [0]

    def switch(registry, merge):
        def run():  # `switches` switches per call, cycling through the adapters
            for _ in range(switches):
                k[0] += 1
                registry.set_adapter(names[k[0] % n_adapters], merge=merge)
            backend.synchronize()
        return run

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.safetensors"
        save_checkpoint(path, GPT(ctx.config, rng=0, dtype="float32"), CharTokenizer.default())
        times = interleaved({"reload": lambda: load_checkpoint(path),
                              "read": lambda: read_typed(path, None),
                              "unmerged": switch(reg, False), "merged": switch(merged_reg, True)},
                             ctx.steps, 1)
    reload_s = times["reload"]
    unmerged_s, merged_s = times["unmerged"] / switches, times["merged"] / switches
    reg.disable_adapters()
    x = backend.asarray(ctx.batches(1)[0][0])
    ids = [names[b % n_adapters] for b in range(x.shape[0])]

    def mixed():
        reg.forward(x, ids, check=False)
        backend.synchronize()

    def one_merged():
        single.forward(x, check=False)
        backend.synchronize()
    infer = interleaved({"merged_single": one_merged, "mixed": mixed}, ctx.steps, ctx.warmup)
    r_unmerged, r_merged = unmerged_s / reload_s, merged_s / reload_s
    r_tput = infer["merged_single"] / infer["mixed"]  # throughput ratio = inverse time ratio
    checks = [Check(ctx.name, "unmerged adapter switch / base reload", r_unmerged, "<=", 0.05),
              Check(ctx.name, "merged adapter switch / base reload", r_merged, "<=", 0.05),
              Check(ctx.name, f"mixed {n_adapters}-adapter batch / merged throughput", r_tput,
                    ">=", 0.8)]
    rows = [("base checkpoint reload", f"{reload_s * 1e3:.2f} ms", "load_checkpoint, page cache"),
            ("  of which the bare tensor read (read_typed)", f"{times['read'] * 1e3:.2f} ms",
             f"merged switch / read = {merged_s / times['read']:.2f} (no target)"),
            ("adapter switch, unmerged (pointers)",
             f"{unmerged_s * 1e6:.1f} us = {r_unmerged:.4f}", f"<= 0.05  {checks[0].status()}"),
            ("adapter switch, merged (unmerge + merge)",
             f"{merged_s * 1e3:.3f} ms = {r_merged:.3f}", f"<= 0.05  {checks[1].status()}"),
            (f"mixed {n_adapters}-adapter batch / 1 merged (throughput)",
             f"{infer['mixed'] * 1e3:.1f} vs {infer['merged_single'] * 1e3:.1f} ms = "
             f"{r_tput:.2f}", f">= 0.8  {checks[2].status()}")]
    data = {"n_adapters": n_adapters, "reload_median_s": reload_s, "read_median_s": times["read"],
            "switch_unmerged_s": unmerged_s, "switch_merged_s": merged_s,
            "ratio_switch_unmerged_over_reload": r_unmerged,
            "ratio_switch_merged_over_reload": r_merged, "inference_median_s": infer,
            "ratio_mixed_over_merged_throughput": r_tput}
    return Section(data, rows, checks)


def measure_peft_latency(ctx: BenchContext) -> Section:
    """Inference latency / base of Houlsby adapters (bottleneck 16 after attn.o and mlp.down,
    unmergeable), LoRA r=8 on q, v unmerged, and LoRA merged, at batch 1 and at the config's
    batch (full context T), all interleaved with the base: the LoRA paper's Table 1 (adapters add
    sequential depth, which shows most at small batch). No target: the figures are reported.
    Batch 1 is cheap and noisy, so it takes 3x the timed forwards. An identical copy of the base
    runs in the same rotation: its ratio is the noise floor of the figures. Every model's arrays
    are re-allocated after all are built (a model's speed was seen to depend on when its arrays
    were allocated: the first-built one ran ~10% slower than an identical later one).
    """

    lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    models = {"base": GPT(ctx.config, rng=0, dtype="float32")}
    models["adapter"] = GPT(ctx.config, rng=0, dtype="float32")
    inject_houlsby(models["adapter"], HoulsbyConfig(bottleneck=16, zero_up=False))
    models["lora_unmerged"] = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(models["lora_unmerged"], lora_cfg)
    models["lora_merged"] = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(models["lora_merged"], lora_cfg)
    merge_lora(models["lora_merged"])
    models["base_copy"] = GPT(ctx.config, rng=0, dtype="float32")
    adapter_params = models["adapter"].num_parameters(trainable_only=True)  # before freezing
    for m in models.values():
        m.astype("float32")  # fresh copies of every array, allocated together
        m.freeze()  # inference: no layer keeps its input for a weight gradient (the base neither)
    x_full = ctx.batches(1)[0][0]  # (B, T)
    data, rows = {}, []
    for label, B, steps in (("batch 1", 1, 3 * ctx.steps), (f"batch {ctx.batch_size}",
                                                            ctx.batch_size, ctx.steps)):
        x = backend.asarray(x_full[:B])
        fns = {name: (lambda m=m: m.forward(x, check=False)) for name, m in models.items()}
        t = interleaved(fns, steps, ctx.warmup)
        ratios = {name: t[name] / t["base"] for name in models if name != "base"}
        data[f"B{B}"] = {"median_s": t, "ratio_over_base": ratios,
                         "tokens": B * ctx.config.block_size}
        rows.append((f"inference {label} x T {ctx.config.block_size}: base",
                     f"{t['base'] * 1e3:.2f} ms", ""))
        for name, what in (("base_copy", "identical base copy (noise floor)"),
                           ("adapter", "Houlsby m=16 (2 per block)"),
                           ("lora_unmerged", "LoRA r=8 q,v unmerged"),
                           ("lora_merged", "LoRA r=8 q,v merged")):
            rows.append((f"  {what} / base", f"{ratios[name]:.3f}",
                         "LoRA paper Table 1 (GPU, B=1): Adapter^H +30%" if
                         (name == "adapter" and B == 1) else ""))
    data["adapter_params"] = adapter_params
    data["lora_params"] = models["lora_unmerged"].num_parameters(trainable_only=True)
    return Section(data, rows, [])


def measure_qlora(ctx: BenchContext) -> Section:
    """QLoRA (NF4 + double-quantised base, LoRA r=8 on q, v) training step vs the same LoRA on
    the float32 base: step time (interleaved) and peak memory.

    Peak memory is :func:`minilora.memory.memory_account`'s measured total: weights at rest
    (QLoRA's 4-bit layers count their codes and scales), AdamW moments, and the tracemalloc peak
    of one steady step (gradients, activations, temporaries, including QLoRA's transient
    dequantised matrices). Targets (ours, from the cost model): step ratio <= 1.10 (dequantising
    a (d_out, d_in) matrix is O(d_out d_in) against the O(B T d_out d_in) matmul it feeds, twice
    per step); peak-memory ratio <= 1.0. Timed for information: QLoRA with ``keep_dequantized``
    (float copies held, no per-call dequantisation).
    """

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    models = {n: GPT(ctx.config, rng=0, dtype="float32") for n in ("lora", "qlora", "qlora_kept")}
    inject_lora(models["lora"], cfg)
    inject_qlora(models["qlora"], cfg, QuantConfig())
    inject_qlora(models["qlora_kept"], cfg, QuantConfig(keep_dequantized=True))
    med = interleaved({n: _ours_stepper(ctx, m)[2] for n, m in models.items()}, ctx.steps,
                       ctx.warmup)
    r_step = med["qlora"] / med["lora"]
    r_kept = med["qlora_kept"] / med["lora"]
    checks = [Check(ctx.name, "QLoRA step / LoRA step", r_step, "<=", 1.10)]
    rows = [("QLoRA (NF4+DQ) r=8 q,v step / LoRA step",
             f"{med['qlora'] * 1e3:.1f} / {med['lora'] * 1e3:.1f} ms = {r_step:.2f}",
             f"<= 1.10  {checks[0].status()}"),
            ("QLoRA with dequantised copies kept / LoRA (info)", f"{r_kept:.2f}", "")]
    data = {"step_median_s": med, "ratio_step_qlora_over_lora": r_step,
            "ratio_step_qlora_kept_over_lora": r_kept, "memory": None}
    if ctx.memory and not backend.is_cupy():
        xb, yb = ctx.batches(1)[0]
        mem = {n: memory_account(models[n], xb, yb) for n in ("lora", "qlora")}
        r_mem = mem["qlora"]["measured_total"] / mem["lora"]["measured_total"]
        r_w = mem["qlora"]["weights"] / mem["lora"]["weights"]
        r_act = mem["qlora"]["measured_step_peak"] / mem["lora"]["measured_step_peak"]
        checks.append(Check(ctx.name, "QLoRA peak memory / LoRA peak memory", r_mem, "<=", 1.0))
        mib = 2.0 ** -20
        rows += [("QLoRA / LoRA peak memory (weights + AdamW + step)",
                  f"{mem['qlora']['measured_total'] * mib:.1f} / "
                  f"{mem['lora']['measured_total'] * mib:.1f} MiB = {r_mem:.2f}",
                  f"<= 1.0  {checks[1].status()}"),
                 ("  weights at rest, QLoRA / LoRA",
                  f"{mem['qlora']['weights'] * mib:.1f} / {mem['lora']['weights'] * mib:.1f} MiB"
                  f" = {r_w:.2f}", ""),
                 ("  step peak (tracemalloc), QLoRA / LoRA", f"{r_act:.2f}", "")]
        data.update(memory=mem, ratio_peak_memory_qlora_over_lora=r_mem,
                    ratio_weights_qlora_over_lora=r_w, ratio_step_peak_qlora_over_lora=r_act)
    return Section(data, rows, checks)
