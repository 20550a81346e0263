"""Where a training step's time goes: ours op by op, PyTorch's by its own profiler.

Ours: every leaf op of :mod:`minilora.nn.ops` that a step calls (linear, attention, layer norm,
GELU, embedding, cross-entropy; forward and backward separately) and the optimizer step are
wrapped with a timer for a few steps (the wrappers are removed after); what is left of the step
is "other" (residual adds, gradient clipping, Python). An op run on several threads at once
(the data-parallel step's two micro-batches) counts its time summed over them divided by their
number: its share of the step's wall clock. PyTorch's step is run under
``torch.profiler`` and its operators' *self* CPU time is grouped into the same categories
(matmuls: ``mm`` / ``addmm`` / ``bmm``; ``softmax``; ``layer_norm``; ``gelu``; ...).

The two columns answer "which part is slower than PyTorch's", which is what the speed issue asks
to be profiled before anything is optimised.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict

import numpy as np

from minilora.bench.core import (
    BenchContext,
    Section,
    _ours_stepper,
    _timed,
    _torch_stepper,
)
from minilora.model import GPT
from minilora.nn import ops, ops_fast
from minilora.nn.ops_fast import matmul_rows
from minilora.optim import AdamW

#: our ops timed, in the order they are printed (forward, then backward)
OPS = ("embedding_forward", "linear_forward", "cross_entropy_forward", "cross_entropy_backward",
       "linear_backward", "embedding_backward")
#: ... and those of :mod:`minilora.nn.ops_fast` (the layers call these twins)
FAST_OPS = ("layernorm_forward_fast", "linear_forward_fast", "attention_forward_fast",
            "gelu_forward_fast", "linear_backward_fast", "attention_backward_fast",
            "gelu_backward_fast", "layernorm_backward_fast")

#: torch operator name (``aten::...``) fragments -> our category
TORCH_GROUPS = (("matmul (linear, attention)", ("aten::mm", "aten::addmm", "aten::bmm")),
                ("softmax", ("softmax",)), ("layer norm", ("layer_norm",)),
                ("gelu", ("gelu",)), ("cross-entropy", ("nll_loss", "log_softmax")),
                ("embedding", ("embedding",)),
                ("optimizer", ("_foreach", "adam", "addcdiv", "lerp")))


def profile_ours(ctx: BenchContext, steps: int = 3) -> dict:
    """Milliseconds per step spent in each op of :data:`OPS` and :data:`FAST_OPS` and in
    ``AdamW.step``, plus the step's mean total; the op wrappers are put back afterwards."""
    model = GPT(ctx.config, rng=0, dtype="float32")
    _, _, step = _ours_stepper(ctx, model)
    for _ in range(max(1, ctx.warmup)):
        step()
    spent = defaultdict(float)
    ran_on = defaultdict(set)  # op -> the threads that ran it
    lock = threading.Lock()
    originals = {(mod, name): getattr(mod, name)
                 for mod, names in ((ops, OPS), (ops_fast, FAST_OPS)) for name in names}
    original_step = AdamW.step

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                dt = time.perf_counter() - t0
                with lock:  # the data-parallel step runs ops on two threads at once
                    spent[name] += dt
                    ran_on[name].add(threading.get_ident())
        return wrapper
    try:
        for (mod, name), fn in originals.items():
            setattr(mod, name, timed(name, fn))
        AdamW.step = timed("optimizer (AdamW + clip)", original_step)
        totals = [_timed(step) for _ in range(steps)]
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
        AdamW.step = original_step
    total = sum(totals) / steps
    # an op that ran on k threads at once (the data-parallel step's micro-batches) took about
    # 1/k of its summed time out of the step's wall clock
    per_step = {k: v / steps / len(ran_on[k]) for k, v in spent.items()}
    # cross_entropy_forward/backward run inside ops.cross_entropy, whose own calls go through
    # the module's globals: they are timed. A wrapped op that calls another wrapped op would be
    # counted twice; none of OPS / FAST_OPS does.
    per_step["other (residuals, Python)"] = max(0.0, total - sum(per_step.values()))
    return {"step_s": total, "per_op_s": per_step}


def profile_torch(ctx: BenchContext, steps: int = 3) -> dict | None:
    """Self CPU time per step of PyTorch's step, grouped by :data:`TORCH_GROUPS` (None without
    torch)."""
    torch = ctx.torch
    if torch is None:
        return None
    _, _, step = _torch_stepper(ctx, GPT(ctx.config, rng=0, dtype="float32"), use_sdpa=False)
    for _ in range(max(1, ctx.warmup)):
        step()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    groups = defaultdict(float)
    ops_self = {}
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6 / steps
        ops_self[e.key] = s
        for group, keys in TORCH_GROUPS:
            if any(k in e.key for k in keys):
                groups[group] += s
                break
        else:
            groups["other"] += s
    top = dict(sorted(ops_self.items(), key=lambda kv: -kv[1])[:12])
    return {"step_s_profiled": wall, "groups_s": dict(groups), "top_ops_s": top}


def linear_gemms(config, batch_size: int) -> list:
    """The weight GEMMs of one full training step as ``(name, (m, k), (k, n), count)``: forward
    ``x W^T``, input gradient ``dy W`` and weight gradient ``dy^T x`` of every block linear and
    of the head (the attention's own products are not here)."""
    N, C, V, L = batch_size * config.block_size, config.n_embd, config.vocab_size, config.n_layer
    out = []
    for name, d_in, d_out, per_block in (("q/k/v/o", C, C, 4), ("mlp.up", C, 4 * C, 1),
                                         ("mlp.down", 4 * C, C, 1), ("lm_head", C, V, 0)):
        n = per_block * L or 1
        out += [(f"{name} forward", (N, d_in), (d_in, d_out), n),
                (f"{name} dx", (N, d_out), (d_out, d_in), n),
                (f"{name} dW", (d_out, N), (N, d_in), n)]
    return out


def compare_gemms(ctx: BenchContext, reps: int = 5) -> dict | None:
    """Median time of each of :func:`linear_gemms`' products as minilora runs them (rows shared
    over :func:`minilora.threads.cpu_threads`, one BLAS call per thread, as the layers do) and
    as ``torch.mm`` runs them (same shapes, float32 operands, torch's threads), summed over one
    step (None without torch): how much of the step-time gap is the GEMMs rather than the rest.
    All NumPy products first, a pause, then all torch ones (one library's idle BLAS threads spin
    for a while and would slow the other)."""
    torch = ctx.torch
    if torch is None:
        return None
    rng = np.random.default_rng(0)
    shapes = linear_gemms(ctx.config, ctx.batch_size)
    operands = [(rng.standard_normal(a).astype(np.float32), rng.standard_normal(b).astype(np.float32))
                for _, a, b, _ in shapes]

    t_np = [statistics.median(_timed(lambda: matmul_rows(a, b, min_rows=16)) for _ in range(reps))
            for a, b in operands]
    time.sleep(max(ctx.pause_s, 0.2))
    t_t = []
    for a, b in operands:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        t_t.append(statistics.median(_timed(lambda: torch.mm(ta, tb)) for _ in range(reps)))
    rows = [{"gemm": name, "count": count, "numpy_s": tn, "torch_s": tt}
            for (name, _, _, count), tn, tt in zip(shapes, t_np, t_t)]
    ours_s = sum(r["count"] * r["numpy_s"] for r in rows)
    theirs = sum(r["count"] * r["torch_s"] for r in rows)
    return {"per_gemm": rows, "numpy_step_s": ours_s, "torch_step_s": theirs,
            "ratio_numpy_over_torch": ours_s / theirs}


def _ours_group(name: str) -> str:
    for group, prefix in (("matmul (linear, attention)", ("linear_", "attention_")),
                          ("layer norm", ("layernorm",)), ("gelu", ("gelu",)),
                          ("cross-entropy", ("cross_entropy",)), ("embedding", ("embedding",))):
        if name.startswith(prefix):
            return group
    return name


def measure_profile(ctx: BenchContext) -> Section:
    """The per-op breakdown of one full training step, ours and PyTorch's."""
    ours = profile_ours(ctx, steps=max(2, min(ctx.steps, 5)))
    theirs = profile_torch(ctx, steps=max(2, min(ctx.steps, 5)))
    rows = []
    total = ours["step_s"]
    for name, s in sorted(ours["per_op_s"].items(), key=lambda kv: -kv[1]):
        rows.append((f"ours: {name}", f"{s * 1e3:.1f} ms", f"{100 * s / total:.0f} % of step"))
    grouped = defaultdict(float)
    for name, s in ours["per_op_s"].items():
        grouped[_ours_group(name)] += s
    gemms = compare_gemms(ctx)
    data = {"ours": ours, "ours_groups_s": dict(grouped), "torch": theirs, "blas": gemms}
    if gemms is not None:
        rows.append(("the step's weight GEMMs alone, ours / torch.mm",
                     f"{gemms['numpy_step_s'] * 1e3:.1f} / {gemms['torch_step_s'] * 1e3:.1f} ms = "
                     f"{gemms['ratio_numpy_over_torch']:.2f}", "same shapes and threads"))
    if theirs is not None:
        tg = theirs["groups_s"]
        for group, _ in TORCH_GROUPS[:5]:
            rows.append((f"{group}: ours / torch", f"{grouped.get(group, 0) * 1e3:.1f} / "
                         f"{tg.get(group, 0) * 1e3:.1f} ms", "self time, per step"))
    return Section(data, rows, [])
