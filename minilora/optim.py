"""Hand-written AdamW, the learning-rate schedule and global-norm gradient clipping.

AdamW (Loshchilov & Hutter), per parameter p with gradient g at step t (1-based)::

    m = beta1 m + (1 - beta1) g                 first moment
    v = beta2 v + (1 - beta2) g^2               second moment
    m_hat = m / (1 - beta1^t);  v_hat = v / (1 - beta2^t)
    p = p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)      decoupled weight decay

Weight decay applies to matrices (ndim >= 2: linear weights, embeddings) and not to biases or
LayerNorm gains, as in nanoGPT. State (m, v) is kept only for *trainable* parameters and keyed by
their dotted names, so it can be checkpointed and so its size shows what a method costs: with
LoRA only the small factors carry optimizer state.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from minilora import backend
from minilora.backend import is_cupy, xp
from minilora.errors import MiniloraError, UsageError
from minilora.threads import parallel_chunks


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate at 0-based ``step``: linear warmup, then cosine decay to ``min_lr``.

    warmup:  lr * (step + 1) / warmup_steps                      for step < warmup_steps
    cosine:  min_lr + (lr - min_lr) * 0.5 (1 + cos(pi * s))      s = progress in [0, 1]
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    s = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * s))


def clip_grad_norm(grads: list, max_norm: float) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``.

    norm = sqrt(sum_i ||g_i||^2); if norm > max_norm: g_i *= max_norm / (norm + 1e-6)

    (the 1e-6 is torch.nn.utils.clip_grad_norm_'s, so the clipped norm lands just below
    ``max_norm`` and our steps match PyTorch's).
    ``max_norm <= 0`` disables clipping. Returns the norm before clipping (a Python float).
    """
    total = xp.zeros((), dtype=xp.float64)
    for g in grads:
        total += xp.vdot(g.reshape(-1), g.reshape(-1))  # one device sync below, not one per tensor
    norm = math.sqrt(backend.to_scalar(total))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g *= scale
    return norm


#: elements per slice of one parameter's AdamW update (1 MiB of float32). A larger parameter
#: is updated slice by slice, so its 14 passes run on a slice in the cache; not smaller: two
#: threads updating small slices wait on each other for the GIL between NumPy's calls (medium,
#: 2 threads: 23.7 ms a step at 2^14, 13.7 at 2^16, 12.0 at 2^18, 11.8 unsliced; load 1)
UPDATE_BLOCK = 1 << 18


class NonFiniteError(MiniloraError, FloatingPointError):
    """The loss or the gradients became NaN/inf; training stops and keeps the last good checkpoint."""


class ParamGroup(NamedTuple):
    """Parameters updated at ``lr_scale`` times the learning rate (PyTorch's parameter groups,
    chosen by name): in the Adam step and in the decoupled decay alike.

    Attributes:
        name: what the group is, for messages ("lora_B", "modules_to_save").
        match: ``f(parameter name) -> bool``.
        lr_scale: the multiplier of the learning rate (a finite number > 0).
    """
    name: str
    match: Callable[[str], bool]
    lr_scale: float


def loraplus_group(ratio: float) -> ParamGroup:
    """LoRA+ (Hayou, Ghosh & Yu 2024): the group of every LoRA ``B`` factor (``...lora_B``) at
    ``ratio`` times the learning rate, so that eta_B = ratio * eta_A.

    The paper's argument: with B = 0 at the start and A random, equal learning rates leave the
    feature update B A x learning too slowly in wide layers; a larger step for B fixes that
    (the paper suggests ratio ~ 16, PEFT's helper ``create_loraplus_optimizer`` takes
    ``loraplus_lr_ratio``). PEFT's helper also puts every 1-D parameter (biases, LayerNorm,
    DoRA's magnitude) in B's group; here only the B factors get the ratio.

    Raises :class:`UsageError` unless ``ratio`` is a finite number > 0 (1 is plain LoRA).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
            or ratio <= 0:
        raise UsageError(f"loraplus ratio must be a finite number > 0 (B's learning rate = ratio "
                         f"x A's; 1 is plain LoRA, the LoRA+ paper uses ~16); got {ratio!r}")
    return ParamGroup("lora_B", lambda name: name.rsplit(".", 1)[-1] == "lora_B", float(ratio))


def group_scale(groups):
    """``name -> lr multiplier`` of ``groups`` (the first group that matches; 1 for none), or
    None for no groups (every update then bit-identical to the plain optimizer)."""
    groups = tuple(groups or ())
    for g in groups:
        s = g.lr_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) \
                or s <= 0:
            raise UsageError(f"parameter group {g.name!r}: lr_scale must be a finite number > 0, "
                             f"got {s!r}")
    if not groups:
        return None

    def lr_scale(name: str) -> float:
        for g in groups:
            if g.match(name):
                return float(g.lr_scale)
        return 1.0
    return lr_scale


class AdamW:
    """AdamW over a model's trainable parameters, keyed by name.

    Args:
        model: a :class:`minilora.nn.layers.Module`; its ``named_trainable()`` is read each step,
            so freezing/unfreezing between steps is honoured.
        lr, betas, eps, weight_decay: as in the formula above (``lr`` may be changed per step).
        groups: :class:`ParamGroup` s: a parameter in a group is updated with ``lr *
            lr_scale`` in both the Adam step and the decoupled decay (the first group that
            matches; :func:`loraplus_group` is LoRA+'s). None: every parameter at ``lr``, every
            update bit-identical to the plain optimizer.

    The optimizer knows no method: what a method does after each update (AdaLoRA's rank
    allocator) is a training callback (:func:`minilora.train.train`).
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                 groups=None):
        self.model = model
        self.lr_scale = group_scale(groups)
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.t = 0
        self.m: dict = {}
        self.v: dict = {}

    def step(self, lr: float | None = None, grad_clip: float = 0.0) -> float:
        """One update of every trainable parameter from its gradient; returns the grad norm.

        Raises :class:`NonFiniteError` (before touching any parameter) if a gradient is not
        finite.
        """
        if lr is not None:
            self.lr = lr
        items = [(n, p, g if g is not None else xp.zeros_like(p))
                 for n, p, g in self.model.named_trainable()]
        norm = clip_grad_norm([g for _, _, g in items], grad_clip)
        if not math.isfinite(norm):
            raise NonFiniteError("gradient norm is not finite (NaN or inf): parameters left unchanged")
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        step_size = self.lr / bc1
        self._ensure_state(items)

        def update(i0, i1):
            for name, p, g in items[i0:i1]:
                self._update_one(name, p, g, bc2, step_size)
        if type(self)._before_update is AdamW._before_update:  # independent: share the cores
            parallel_chunks(len(items), update)
        else:  # a subclass moves state in and out per parameter (paging): one at a time
            update(0, len(items))
        return norm

    def _update_one(self, name: str, p, g, bc2: float, step_size: float) -> None:
        """The AdamW update of one parameter, in place, with one scratch buffer, over slices of
        :data:`UPDATE_BLOCK` elements (the update's passes run on one slice while it is in the
        core's cache instead of streaming the whole tensor from memory per pass; the same
        floats as one pass over the whole, element by element)."""
        scale = 1.0 if self.lr_scale is None else self.lr_scale(name)
        self._before_update(name)
        m, v = self.m[name], self.v[name]
        decay = (1.0 - self.lr * scale * self.weight_decay
                 if self.weight_decay and p.ndim >= 2 else None)
        arrays = (p, g, m, v)
        n = p.size
        if (is_cupy() or n <= UPDATE_BLOCK
                or not all(a.flags.c_contiguous and a.shape == p.shape for a in arrays)):
            self._update_kernel(*arrays, g * (1.0 - self.beta1), decay, bc2, step_size, scale)
            return
        flat = [a.reshape(-1) for a in arrays]  # views: every array is C-contiguous
        tmp = xp.empty(UPDATE_BLOCK, dtype=g.dtype)
        for i0 in range(0, n, UPDATE_BLOCK):
            i1 = min(i0 + UPDATE_BLOCK, n)
            ps, gs, ms, vs = (a[i0:i1] for a in flat)
            self._update_kernel(ps, gs, ms, vs, xp.multiply(gs, 1.0 - self.beta1, out=tmp[:i1 - i0]),
                                decay, bc2, step_size, scale)

    def _update_kernel(self, p, g, m, v, tmp, decay, bc2, step_size, scale) -> None:
        """AdamW on one slice, in place; ``tmp`` holds ``(1 - beta1) g`` on entry (the scratch)."""
        b1, b2 = self.beta1, self.beta2
        m *= b1
        m += tmp
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v *= b2
        v += tmp
        if decay is not None:
            p *= decay  # decoupled: no 1/sqrt(v)
        xp.sqrt(v, out=tmp)  # denom = sqrt(v) / sqrt(bc2) + eps (as torch computes it)
        tmp *= 1.0 / math.sqrt(bc2)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= step_size * scale  # scale 1.0: the same float as step_size
        p -= tmp

    # -- where the state lives (overridden by minilora.paged.PagedAdamW) --------------------------
    def _ensure_state(self, items) -> None:
        """Create zero moments ``m, v`` (shaped like the parameter) for parameters that have none."""
        for name, p, _ in items:
            if name not in self.m:
                self.m[name] = xp.zeros_like(p)
                self.v[name] = xp.zeros_like(p)

    def _before_update(self, name: str) -> None:
        """Called just before parameter ``name`` is updated (a paged optimizer fetches its state)."""

    # -- checkpointing ---------------------------------------------------------------------------
    def state_arrays(self) -> dict:
        """Arrays to save: ``{"<param>.m": m, "<param>.v": v}``."""
        out = {}
        for name in self.m:
            out[f"{name}.m"] = self.m[name]
            out[f"{name}.v"] = self.v[name]
        return out

    def state_meta(self) -> dict:
        return {"t": self.t, "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, "weight_decay": self.weight_decay}

    def load_state(self, arrays: dict, meta: dict) -> None:
        """Restore from :meth:`state_arrays` / :meth:`state_meta` (names checked against the model)."""
        params = {n: p for n, p, _ in self.model.named_trainable()}
        m, v = {}, {}
        for key, a in arrays.items():
            name, kind = key.rsplit(".", 1)
            if kind not in ("m", "v") or name not in params:
                raise UsageError(f"optimizer state has key {key!r} that matches no trainable parameter")
            if tuple(a.shape) != tuple(params[name].shape):
                raise UsageError(f"optimizer state {key!r} has shape {tuple(a.shape)}, parameter "
                                 f"has {tuple(params[name].shape)}")
            (m if kind == "m" else v)[name] = backend.asarray(a, dtype=params[name].dtype)
        if set(m) != set(v):
            raise UsageError("optimizer state is inconsistent: m and v name different parameters")
        self.m, self.v = m, v
        self.t = int(meta["t"])
        self.lr = float(meta["lr"])

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (2 moments per trainable element)."""
        return sum(int(a.nbytes) for a in self.m.values()) + sum(int(a.nbytes) for a in self.v.values())
