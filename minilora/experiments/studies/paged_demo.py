"""``minilora paged-demo``: a memory spike from one long-sequence batch pushes the paged AdamW
state out to the host and back, on a simulated device (:mod:`minilora.paged`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from minilora import backend
from minilora.checkpoint import load_checkpoint
from minilora.data import encode_corpus, get_batch, load_milton
from minilora.errors import UsageError
from minilora.experiments.paths import base_model_path
from minilora.io import atomic_write_text
from minilora.memory import check_training_fits, tree_bytes, weight_bytes
from minilora.nn import ops
from minilora.paged import (
    PAGE_BYTES,
    PCIE_BYTES_PER_S,
    DeviceMemory,
    MiB,
    PagedAdamW,
    _aligned,
    check_int,
)

DEMO_MADE_BY = "minilora paged-demo --out results/paged/trace.json"


def _run_demo_once(ckpt, ids, budget_bytes, page_bytes, bandwidth, steps, spike_steps,
                   batch_size, block_size, spike_block_size, lr, seed, log):

    model, _, _ = load_checkpoint(ckpt or base_model_path())
    params = [p for _, p in model.named_parameters()]
    device = DeviceMemory(budget_bytes, page_bytes, bandwidth)
    opt = PagedAdamW(model, lr=lr, weight_decay=0.0, device=device)
    device.allocate("weights", weight_bytes(model))
    device.allocate("gradients", sum(int(p.nbytes) for _, p, _ in model.named_trainable()))
    rng = backend.cpu_rng(seed)
    records = []
    for step in range(steps):
        T = spike_block_size if step in spike_steps else block_size
        x, y = get_batch(ids, batch_size, T, rng)
        before = device.counters()
        t0 = time.perf_counter()
        logits, cache = model.forward(backend.asarray(x), check=False)
        act = tree_bytes(cache, exclude=params) + int(logits.nbytes)
        device.allocate("activations", act)  # the forward pass's peak: may push state pages out
        at_peak = device.counters()
        loss, dlogits = ops.cross_entropy(logits, backend.asarray(y))
        del logits
        model.zero_grad()
        model.backward(dlogits, cache)
        del cache, dlogits
        device.free("activations")
        opt.step()  # each parameter's update pages its state back in
        backend.synchronize()
        wall = time.perf_counter() - t0
        after = device.counters()
        rec = {"step": step, "T": T, "B": batch_size, "loss": backend.to_scalar(loss),
               "activation_bytes": act, "fixed_bytes_at_peak": at_peak["fixed_bytes"],
               "resident_state_bytes_at_peak": at_peak["resident_bytes"],
               "host_state_bytes_at_peak": at_peak["host_bytes"],
               "demand_without_paging_bytes": at_peak["fixed_bytes"] + opt.paged_bytes(),
               "resident_state_bytes_after": after["resident_bytes"],
               "step_wall_s": wall}
        for key in ("page_ins", "page_outs", "bytes_in", "bytes_out", "first_touches"):
            rec[key] = after[key] - before[key]
        rec["modelled_transfer_s"] = device.transfer_seconds(rec["bytes_in"] + rec["bytes_out"])
        records.append(rec)
        log(f"  step {step:2d} T={T:3d} loss {rec['loss']:.4f}  act {act / MiB:6.1f} MiB  "
            f"page-out {rec['page_outs']:2d} page-in {rec['page_ins']:2d}  "
            f"modelled {rec['modelled_transfer_s'] * 1e3:.2f} ms")
    totals = device.counters()
    sizes = {"weights_bytes": weight_bytes(model),
             "gradient_bytes": sum(int(p.nbytes) for _, p, _ in model.named_trainable()),
             "state_bytes": opt.state_bytes(), "paged_bytes": opt.paged_bytes(),
             "state_pages": opt.paged_bytes() // page_bytes}
    return {"budget_bytes": budget_bytes, "steps": records, "totals": totals}, sizes


def paged_demo(out: str | Path | None = "results/paged/trace.json", steps: int = 10,
               spike_steps=(3, 7), batch_size: int = 2, block_size: int = 64,
               spike_block_size: int = 128, page_bytes: int = PAGE_BYTES,
               bandwidth_bytes_per_s: float = PCIE_BYTES_PER_S, budget_bytes: int | None = None,
               lr: float = 3e-4, seed: int = 0, ckpt=None, log=print) -> dict:
    """Full fine-tuning of the base model on Milton with a paged AdamW on a simulated device,
    where step(s) ``spike_steps`` use ``spike_block_size``-token windows instead of ``block_size``.

    Two runs on the same batches: **tight** (``budget_bytes``; default: exactly what a normal
    step needs, weights + gradients + all state pages + a normal step's activations, so only the
    spike pages) and **roomy** (room for the spike too). Activations are the bytes of the
    forward cache plus the logits (:func:`minilora.memory.tree_bytes`), charged as one
    allocation for the whole forward/backward; weights and gradients are charged throughout.

    Returns (and writes to ``out`` as JSON, unless None) the per-step traces, the sizes, and
    ``losses_identical`` (paging never changes the numbers).
    """


    spike_steps = tuple(int(s) for s in spike_steps)
    if steps < 1 or any(not 0 <= s < steps for s in spike_steps):
        raise UsageError(f"need steps >= 1 and spike steps in [0, {steps}), got steps={steps}, "
                         f"spike_steps={spike_steps}")
    page_bytes = check_int("page_bytes", page_bytes, 1)
    model, tok, _ = load_checkpoint(ckpt or base_model_path())
    if not 1 <= block_size <= spike_block_size <= model.config.block_size:
        raise UsageError(f"need 1 <= block_size <= spike_block_size <= {model.config.block_size} "
                         f"(the model's context), got {block_size}, {spike_block_size}")
    check_training_fits(model, batch_size, spike_block_size, "--batch-size")
    ids = encode_corpus(load_milton()["train"], tok)
    params = [p for _, p in model.named_parameters()]

    def act_bytes(T):  # activations of one step at context T (shapes only, same for any batch)
        x = backend.asarray(ids[:batch_size * T].reshape(batch_size, T).copy())  # own buffer
        logits, cache = model.forward(x, check=False)
        return tree_bytes(cache, exclude=params) + int(logits.nbytes)

    act_normal, act_spike = act_bytes(block_size), act_bytes(spike_block_size)
    n_train = sum(int(p.nbytes) for _, p, _ in model.named_trainable())
    state_aligned = sum(2 * _aligned(p.nbytes) for _, p, _ in model.named_trainable())
    state_pages = -(-state_aligned // page_bytes) * page_bytes
    fixed = weight_bytes(model) + n_train
    tight = budget_bytes if budget_bytes is not None else fixed + state_pages + act_normal
    roomy = fixed + state_pages + act_spike
    if fixed + act_spike > tight:
        raise UsageError(
            f"the spike needs {(fixed + act_spike) / MiB:.1f} MiB of non-pageable memory (weights, "
            f"gradients, activations {act_spike / MiB:.1f} MiB at T={spike_block_size}) but the "
            f"budget is {tight / MiB:.1f} MiB: paging all {state_pages / MiB:.1f} MiB of optimizer "
            "state cannot absorb it (out of memory even when paged); use a smaller "
            "--spike-block-size or --batch-size, or a larger --budget-mb")
    model = None  # each run below loads its own copy
    runs = {}
    for label, budget in (("tight", tight), ("roomy", roomy)):
        log(f"{label} run: budget {budget / MiB:.1f} MiB")
        runs[label], sizes = _run_demo_once(
            ckpt, ids, budget, page_bytes, bandwidth_bytes_per_s, steps, spike_steps, batch_size,
            block_size, spike_block_size, lr, seed, log)
    losses = {k: [r["loss"] for r in v["steps"]] for k, v in runs.items()}
    result = {
        "what": "paged AdamW on a simulated device: per-step memory and page traffic",
        "made_by": DEMO_MADE_BY, "backend": backend.get_backend(),
        "config": {"steps": steps, "spike_steps": list(spike_steps), "batch_size": batch_size,
                   "block_size": block_size, "spike_block_size": spike_block_size,
                   "page_bytes": page_bytes, "bandwidth_bytes_per_s": bandwidth_bytes_per_s,
                   "lr": lr, "seed": seed, "task": "full fine-tuning on Milton (Books I-IX)"},
        "sizes": dict(sizes, activation_bytes_normal=act_normal, activation_bytes_spike=act_spike),
        "runs": runs,
        "losses_identical": losses["tight"] == losses["roomy"],
    }
    if out is not None:
        atomic_write_text(Path(out), json.dumps(result, indent=1) + "\n")
    return result
