"""Where the memory of a training step goes: weights, gradients, optimizer state, activations.

For a model with ``N`` parameters of which ``N_t`` train, in float32 (4 bytes) with AdamW::

    weights      4 N                 (all parameters, frozen or not; quantised layers: their bytes)
    gradients    4 N_t               (only trainable parameters get one)
    optimizer    8 N_t               (AdamW's two moments m, v)
    activations  what the forward pass keeps for backward (grows with B x T; the same for every
                 method that backpropagates through the whole network)

So full fine-tuning needs ``16 N + act`` and LoRA ``4 N + 16 N_lora + act``: at most 4x less in
float32 when activations are negligible. (The LoRA paper's "up to 2/3 less" (1.2 TB -> 350 GB for
GPT-3 175B) is the same count with 16-bit weights: 2 N for the frozen weights vs about
2 + 2 + 12 = 16 bytes/param for mixed-precision Adam, less their activations.)

:func:`memory_account` counts the first four from the real arrays (the activations are the bytes
of the cache one forward pass returns) and *measures* the peak of one steady training step with
``tracemalloc`` (NumPy registers its buffers with it), so the accounting and the measurement can be
compared. On CuPy only the computed part is given.

Chapter: chapters/05-lora-and-qlora.ipynb (the LoRA section: memory of full, LoRA and QLoRA).
"""
from __future__ import annotations

import gc
import os
import tracemalloc

from minilora import backend
from minilora.errors import UsageError
from minilora.optim import AdamW


def _buffer(a):
    """The array that owns the memory ``a`` views (``a`` itself if it owns it)."""
    while getattr(a, "base", None) is not None and backend.is_array(a.base):
        a = a.base
    return a


def _buffer_id(a) -> int:
    return id(_buffer(a))


def tree_bytes(tree, exclude=()) -> int:
    """Bytes of the distinct arrays in a nested tuple/list/dict (e.g. a forward cache).

    Each underlying buffer counts once (a view counts as its base, at the base's size); arrays
    whose buffer is in ``exclude`` (e.g. the model's weights, which caches reference) are
    skipped.
    """
    seen = {_buffer_id(a) for a in exclude}
    total = 0
    stack = [tree]
    while stack:
        obj = stack.pop()
        if backend.is_array(obj):
            key = _buffer_id(obj)
            if key not in seen:
                seen.add(key)
                total += int(_buffer(obj).nbytes)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (tuple, list)):
            stack.extend(obj)
    return total


def weight_bytes(model) -> int:
    """Bytes of every parameter, plus any frozen storage a module keeps outside its parameters
    (a module may define ``buffer_bytes()``, e.g. a layer holding NF4 codes)."""
    total = sum(int(p.nbytes) for _, p in model.named_parameters())
    for _, m in model.named_modules():
        extra = getattr(m, "buffer_bytes", None)
        if callable(extra):
            total += int(extra())
    return total


def step_peak_bytes(step) -> int:
    """Bytes allocated during ``step()`` and alive together at its peak (tracemalloc); blocks that
    existed before (weights, AdamW moments) are not counted."""
    was_tracing = tracemalloc.is_tracing()
    gc.collect()
    if not was_tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - base)


def memory_account(model, x, y, measure: bool = True) -> dict:
    """Computed bytes by category for one AdamW training step on the batch ``(x, y)``, and the
    measured peak.

    The model's weights are left exactly as they were: the measured steps use an AdamW with
    ``lr = 0`` (moments are created and updated in a throwaway optimizer, as in training).

    Args:
        model: anything with ``forward``, ``forward_backward``, ``named_parameters``,
            ``named_trainable`` and ``named_modules`` (a GPT, with or without adapters).
        x, y: one (B, T) batch of inputs and targets (NumPy or backend arrays).
        measure: also measure the peak with tracemalloc (NumPy backend only).

    Returns:
        ``{"weights", "gradients", "optimizer", "activations", "computed_total"}`` in bytes, and
        when measured: ``"measured_step_peak"`` (bytes allocated during a steady step and alive
        at its peak: gradients, activations, temporaries) and ``"measured_total"`` (weights +
        optimizer state + that peak).
    """

    x, y = backend.asarray(x), backend.asarray(y)
    trainable = [p for _, p, _ in model.named_trainable()]
    params = [p for _, p in model.named_parameters()]
    logits, cache = model.forward(x, check=False)
    out = {"weights": weight_bytes(model),
           "gradients": sum(int(p.nbytes) for p in trainable),
           "optimizer": 2 * sum(int(p.nbytes) for p in trainable),
           "activations": tree_bytes(cache, exclude=params),
           "logits": int(logits.nbytes)}
    del logits, cache
    out["computed_total"] = (out["weights"] + out["gradients"] + out["optimizer"]
                             + out["activations"])
    out["measured_step_peak"] = out["measured_total"] = None
    if measure and not backend.is_cupy():
        opt = AdamW(model, lr=0.0, weight_decay=0.0)

        def step():
            model.forward_backward(x, y)
            opt.step(0.0)

        step()  # the moments now exist, as in a steady training step
        model.zero_grad()
        out["measured_step_peak"] = step_peak_bytes(step)
        model.zero_grad()
        out["measured_total"] = out["weights"] + opt.state_bytes() + out["measured_step_peak"]
        del opt
    return out


def adam_training_bytes(n_params: int, n_trainable: int, weight_bytes: float = 4,
                        grad_bytes: float = 4, state_bytes: float = 8,
                        master_bytes: float = 0) -> float:
    """Bytes of weights + gradients + optimizer state, no activations (the paper-scale count).

    ``weight_bytes`` per parameter for every weight, and for each trainable one ``grad_bytes`` +
    ``state_bytes`` (Adam: two moments) + ``master_bytes`` (an fp32 master copy in mixed
    precision). Float32 training: 4 / 4 / 8 / 0; fp16 mixed precision: 2 / 2 / 8 / 4.
    """
    if n_params <= 0 or not 0 <= n_trainable <= n_params:
        raise UsageError(f"need 0 <= n_trainable <= n_params and n_params > 0, got "
                         f"n_trainable={n_trainable}, n_params={n_params}")
    return n_params * weight_bytes + n_trainable * (grad_bytes + state_bytes + master_bytes)


# ----------------------------------------------------------------------------------------------
# limits: what is asked checked against what fits, before anything is allocated
# ----------------------------------------------------------------------------------------------
GiB = 2 ** 30


def available_bytes() -> int | None:
    """Memory this process can still take: Linux's ``MemAvailable`` (what can be allocated
    without swapping), else free physical pages; None where neither can be read. On CuPy: the
    device's free memory."""
    if backend.is_cupy():
        try:
            return int(backend.xp.cuda.runtime.memGetInfo()[0])
        except Exception:  # noqa: BLE001 - a stand-in or an old CuPy: no limit known
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.0f} MiB"


def check_fits(asked: str, nbytes: float, per_unit: float | None = None, unit: str = "",
               fixed: float = 0.0, available: int | None = None) -> None:
    """Refuse (:class:`UsageError`, one line) a request of ``nbytes`` that exceeds the memory
    available, before it is allocated: ``asked`` names the request (``"max_new_tokens
    99999999"``); with ``per_unit`` bytes per unit of it (after ``fixed`` bytes that do not
    scale), the message also says how many units fit."""
    avail = available_bytes() if available is None else available
    if avail is None or nbytes <= avail:
        return
    fits = ""
    if per_unit:
        n = int(max(0.0, avail - fixed) // per_unit)
        fits = f": at most about {n:,}{unit} fit" if n > 0 else ": not even one fits"
    raise UsageError(f"{asked} needs about {_gib(nbytes)} of memory, {_gib(avail)} is "
                     f"available{fits}")


def training_step_bytes(model, batch_size: int, block_size: int) -> tuple[int, int]:
    """(bytes that do not grow with the batch, bytes per sequence) of one AdamW training step:
    weights + gradients + moments, and the activations of one sequence of ``block_size``
    tokens measured from a forward pass of one (as :func:`memory_account` counts them; the
    measured peak agrees within a few per cent) plus its logits and their gradient."""
    params = [p for _, p in model.named_parameters()]
    trainable = sum(int(p.nbytes) for _, p, _ in model.named_trainable())
    x = backend.asarray(backend.cpu_module().zeros((1, block_size), dtype="int64"))
    rngs = [g for _, m in model.named_modules()
            for g in [getattr(m, "dropout_rng", None)] if g is not None]
    states = [g.bit_generator.state for g in rngs]   # this probe draws no dropout mask of a run
    try:
        logits, cache = model.forward(x, check=False)
        per_seq = tree_bytes(cache, exclude=params) + 2 * int(logits.nbytes)
        del logits, cache
    finally:
        for g, st in zip(rngs, states):
            g.bit_generator.state = st
    return weight_bytes(model) + 3 * trainable, per_seq


def check_training_fits(model, batch_size: int, block_size: int, flag: str = "batch_size") \
        -> None:
    """Refuse a training batch whose step would not fit in memory (what it needs, what is
    available and the largest ``flag`` that fits), before any step runs."""
    fixed, per_seq = training_step_bytes(model, batch_size, block_size)
    check_fits(f"{flag} {batch_size}: a training step of {batch_size} x {block_size} tokens",
               fixed + batch_size * per_seq, per_seq, " sequences per batch", fixed)

