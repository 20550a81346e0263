"""Layers: thin objects that hold parameters and call the pure ops of :mod:`minilora.nn.ops`.

The layer contract (every layer of the package follows it)::

    out, cache = layer.forward(x)        # no hidden state: the caller keeps the cache
    dx = layer.backward(dout, cache)     # adds (+=) gradients for *trainable* parameters only

A layer owns ``params`` (name -> array), ``grads`` (same keys, trainable ones, filled by
backward) and ``trainable`` (a set of local names). A frozen parameter gets no gradient buffer and
costs no weight-gradient matmul: this is where LoRA's savings in step time and memory come from.

Gradients are *accumulated*: the first backward after :meth:`Module.zero_grad` stores the fresh
gradient array (no zero-fill, no extra add), later ones add into it. Inside
:func:`shadow_grads` a thread's backward passes put them into a store of its own instead (the
data-parallel step: each micro-batch's thread its own gradients, summed afterwards).

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, NamedTuple

from minilora.backend import xp
from minilora.errors import UsageError
from minilora.nn import ops, ops_fast


_shadow = threading.local()  # per thread: .store (inside shadow_grads) or absent


@contextlib.contextmanager
def shadow_grads(store: dict | None):
    """Within the block, in the calling thread only, every :attr:`Module.grads` is the module's
    dict in ``store`` (``id(module) -> {name: array}``, filled as the backward passes add to
    them) instead of the module's own; ``None``: the modules' own. Other threads are not
    affected, so two threads can run backward passes of one model at once, each into its own
    gradients. Add a store into the modules' own gradients with :func:`add_shadow_grads`."""
    saved = getattr(_shadow, "store", None)
    _shadow.store = store
    try:
        yield store
    finally:
        _shadow.store = saved


def add_shadow_grads(model: "Module", store: dict) -> None:
    """Add the gradients of a :func:`shadow_grads` ``store`` into ``model``'s own, module by
    module in the tree's order (a fixed order: the same floats every time); a gradient a
    module does not have yet is taken over as it is."""
    done = set()
    for _, m in model.named_modules():
        extra = store.get(id(m))
        if not extra or id(m) in done:  # (a module reached twice in the tree counts once)
            continue
        done.add(id(m))
        own = m._grads
        for k, g in extra.items():
            if k in own:
                own[k] += g
            else:
                own[k] = g


class Module:
    """A node of the model tree: own parameters plus named children.

    Parameter names are dotted paths built from the child names, e.g.
    ``blocks.0.attn.q.weight``. The names are the checkpoint keys and the optimizer-state keys.
    """

    def __init__(self):
        self.params: dict = {}
        self._grads: dict = {}
        self.trainable: set[str] = set()
        self.children: dict[str, Module] = {}

    @property
    def grads(self) -> dict:
        """Gradients (local name -> array) of trainable parameters: this module's own dict, or,
        inside :func:`shadow_grads` in this thread, this module's dict in that store."""
        store = getattr(_shadow, "store", None)
        if store is None:
            return self._grads
        mine = store.get(id(self))
        if mine is None:
            mine = store[id(self)] = {}
        return mine

    @grads.setter
    def grads(self, value: dict) -> None:
        self._grads = value

    # -- tree walking ---------------------------------------------------------------------------
    def add(self, name: str, module: "Module") -> "Module":
        self.children[name] = module
        return module

    def replace(self, name: str, new: "Module") -> "Module":
        """Put ``new`` in place of child ``name``: in ``children`` and in every attribute (or
        list item) of this module that points at the old child, since forward code calls
        e.g. ``self.q.forward``. Used by ``inject_lora`` to wrap a layer."""
        old = self.children[name]
        self.children[name] = new
        for attr, val in list(vars(self).items()):
            if val is old:
                setattr(self, attr, new)
            elif isinstance(val, list):
                val[:] = [new if item is old else item for item in val]
        return new

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix.rstrip("."), self
        for name, child in self.children.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, object]]:
        """Yield ``(dotted_name, array)`` for every parameter, own ones first, in a fixed order."""
        for name, p in self.params.items():
            yield prefix + name, p
        for cname, child in self.children.items():
            yield from child.named_parameters(f"{prefix}{cname}.")

    def _slots(self, prefix: str = ""):
        """Yield ``(dotted_name, owning_module, local_name)`` for every parameter."""
        for name in self.params:
            yield prefix + name, self, name
        for cname, child in self.children.items():
            yield from child._slots(f"{prefix}{cname}.")

    def state_dict(self) -> dict:
        return dict(self.named_parameters())

    def load_state_dict(self, arrays: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, checking names and shapes (one clear error)."""
        slots = {n: (m, k) for n, m, k in self._slots()}
        missing = sorted(set(slots) - set(arrays))
        unexpected = sorted(set(arrays) - set(slots))
        if strict and (missing or unexpected):
            raise UsageError(
                f"state dict does not match the model: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        for name, a in arrays.items():
            if name not in slots:
                continue
            m, k = slots[name]
            if tuple(a.shape) != tuple(m.params[k].shape):
                raise UsageError(f"parameter {name!r}: checkpoint shape {tuple(a.shape)} != "
                                 f"model shape {tuple(m.params[k].shape)}")
        for name, a in arrays.items():
            if name in slots:
                m, k = slots[name]
                m.params[k] = xp.asarray(a, dtype=m.params[k].dtype)

    # -- trainable / frozen ----------------------------------------------------------------------
    def set_trainable(self, predicate) -> None:
        """Mark exactly the parameters whose dotted name satisfies ``predicate(name)`` trainable."""
        for full, m, k in self._slots():
            if predicate(full):
                m.trainable.add(k)
            else:
                m.trainable.discard(k)
                m.grads.pop(k, None)

    def freeze(self) -> None:
        self.set_trainable(lambda name: False)

    def unfreeze(self) -> None:
        self.set_trainable(lambda name: True)

    def named_trainable(self) -> Iterator[tuple[str, object, object]]:
        """Yield ``(name, param, grad_or_None)`` for trainable parameters."""
        for full, m, k in self._slots():
            if k in m.trainable:
                yield full, m.params[k], m.grads.get(k)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(int(p.size) for n, m, k in self._slots()
                   for p in [m.params[k]] if not trainable_only or k in m.trainable)

    def trainable_report(self, targets: list) -> dict:
        """What a PEFT method's ``inject``/``apply`` returns: ``{"trainable", "total",
        "percent": 100 trainable / total, "targets"}`` for this model as it is now."""
        trainable, total = self.num_parameters(trainable_only=True), self.num_parameters()
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total,
                "targets": list(targets)}

    def zero_grad(self) -> None:
        for _, m in self.named_modules():
            m.grads.clear()

    def astype(self, dtype) -> "Module":
        """Cast every parameter in place (float64 for gradient checks)."""
        for _, m in self.named_modules():
            for k in m.params:
                m.params[k] = m.params[k].astype(dtype)
            m.grads.clear()
        return self

    # -- gradient accumulation -------------------------------------------------------------------
    def _accumulate(self, name: str, g) -> None:
        if g is None:
            return
        if name in self.grads:
            self.grads[name] += g
        else:
            self.grads[name] = g

    def needs_grad(self, name: str) -> bool:
        return name in self.trainable

    def draws_random(self) -> bool:
        """True when this module's own forward draws random numbers now (dropout masks). The
        data-parallel step runs such a model in one pass, so the draws keep their order. The
        default assumes so for a module that keeps a ``dropout_rng``; a layer that knows
        better (dropout off, or not training) says so."""
        return getattr(self, "dropout_rng", None) is not None


class Linear(Module):
    """``y = x @ weight.T + bias``; weight (d_out, d_in), bias (d_out,) or absent."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.params["weight"] = weight
        if bias is not None:
            self.params["bias"] = bias
        self.trainable = set(self.params)

    @property
    def d_in(self) -> int:
        return self.params["weight"].shape[1]

    @property
    def d_out(self) -> int:
        return self.params["weight"].shape[0]

    def forward(self, x):
        return ops_fast.linear_forward_fast(x, self.params["weight"], self.params.get("bias"),
                                            keep_x=self.needs_grad("weight"))

    def backward(self, dout, cache, need_dx: bool = True):
        dx, dw, db = ops_fast.linear_backward_fast(
            dout, cache, need_dx=need_dx,
            need_dw=self.needs_grad("weight"), need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        return dx


class Embedding(Module):
    """``out = weight[idx]``; weight (V, C). Has no input gradient (ids are integers)."""

    def __init__(self, weight):
        super().__init__()
        self.params["weight"] = weight
        self.trainable = {"weight"}

    def forward(self, idx):
        return ops.embedding_forward(idx, self.params["weight"])

    def backward(self, dout, cache):
        if self.needs_grad("weight"):
            self._accumulate("weight", ops.embedding_backward(dout, cache))
        return None


class LayerNorm(Module):
    """LayerNorm over the last axis with weight (C,) and bias (C,)."""

    def __init__(self, weight, bias, eps: float = 1e-5):
        super().__init__()
        self.params["weight"], self.params["bias"] = weight, bias
        self.trainable = {"weight", "bias"}
        self.eps = eps

    def forward(self, x):
        return ops_fast.layernorm_forward_fast(x, self.params["weight"], self.params["bias"], self.eps)

    def backward(self, dout, cache, need_dx: bool = True):
        need_w = self.needs_grad("weight") or self.needs_grad("bias")
        dx, dw, db = ops_fast.layernorm_backward_fast(dout, cache, need_dx=need_dx, need_dw=need_w)
        if self.needs_grad("weight"):
            self._accumulate("weight", dw)
        if self.needs_grad("bias"):
            self._accumulate("bias", db)
        return dx


class PastKV:
    """Keys and values of positions *before* an attention call's own tokens, which every one of
    its queries also sees. Two kinds exist, and attention treats them alike:

    * a generation's KV cache (:class:`minilora.nn.kv_cache.KVCache`): the keys of the tokens
      already decoded, so a decoding step computes keys for its new token only;
    * prefix tuning's trainable prefix (:class:`minilora.methods.prefix.PrefixKV`).

    The attention layer calls::

        k_all, v_all = past.extend(k, v)     # k, v (B, T, C) -> (B, Tp + T, C): earlier first
        past.backward(dk_past, dv_past)      # in its backward: (B, Tp, C) each

    so the gradient of the earlier keys goes back to whatever produced them, and the layer's
    backward returns dx as always.
    """

    def extend(self, k, v):
        raise NotImplementedError

    def backward(self, dk, dv) -> None:
        raise NotImplementedError


class AttentionLayerCache(NamedTuple):
    """What :meth:`CausalSelfAttention.backward` needs from the forward pass."""
    q: tuple  # the q, k, v, o projections' caches
    k: tuple
    v: tuple
    attn: ops_fast.TiledAttentionCache  # (ops.AttentionCache for a small input)
    o: tuple
    past: PastKV | None  # the earlier keys/values (their gradient goes back there), or None


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with separate q, k, v and o projections.

    Separate projections (rather than GPT-2's fused ``c_attn``) let any subset of W_q, W_k, W_v,
    W_o be a LoRA target, as in the LoRA paper; the cost is three (C, C) matmuls instead of one
    (3C, C), which BLAS runs at nearly the same speed.
    """

    def __init__(self, q: Linear, k: Linear, v: Linear, o: Linear, n_head: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (self.add(n, m) for n, m in zip("qkvo", (q, k, v, o)))
        self.n_head = n_head

    def forward(self, x, past: PastKV | None = None):
        """x (B, T, C) -> (B, T, C), cache.

        ``past``: optional :class:`PastKV`, keys and values of earlier positions (a KV cache, a
        prefix) that every query of x sees before its own causal past:
        K = [K_past; x W_k^T + b_k], V = [V_past; x W_v^T + b_v], each (B, Tp + T, C).
        """
        q, cq = self.q.forward(x)
        k, ck = self.k.forward(x)
        v, cv = self.v.forward(x)
        if past is not None:
            k, v = past.extend(k, v)  # (B, Tp + T, C)
        y, ca = ops_fast.attention_forward_fast(q, k, v, self.n_head)
        out, co = self.o.forward(y)
        return out, AttentionLayerCache(cq, ck, cv, ca, co, past)

    def backward(self, dout, cache: AttentionLayerCache, need_dx: bool = True):
        """dout (B, T, C) -> dx (B, T, C), or None without ``need_dx``.

        forward: K = [K_past; k]  ->  dK_past = dK[:, :Tp] goes to ``past.backward``,
        dk = dK[:, Tp:] to the k projection (likewise V).
        """
        dy = self.o.backward(dout, cache.o)
        dq, dk, dv = ops_fast.attention_backward_fast(dy, cache.attn)
        if cache.past is not None:
            Tp = dk.shape[1] - dq.shape[1]
            cache.past.backward(dk[:, :Tp], dv[:, :Tp])
            dk, dv = dk[:, Tp:], dv[:, Tp:]
        dx = self.q.backward(dq, cache.q, need_dx)
        dxk = self.k.backward(dk, cache.k, need_dx)
        dxv = self.v.backward(dv, cache.v, need_dx)
        if need_dx:
            ops_fast.add(dx, dxk, out=dx)
            ops_fast.add(dx, dxv, out=dx)
        return dx


class MLP(Module):
    """``down(gelu(up(x)))`` with up (4C, C) and down (C, 4C)."""

    def __init__(self, up: Linear, down: Linear):
        super().__init__()
        self.up, self.down = self.add("up", up), self.add("down", down)

    def forward(self, x):
        h, cu = self.up.forward(x)  # (B, T, 4C)
        g, cg = ops_fast.gelu_forward_fast(h)
        out, cd = self.down.forward(g)  # (B, T, C)
        return out, (cu, cg, cd)

    def backward(self, dout, cache, need_dx: bool = True):
        cu, cg, cd = cache
        dg = self.down.backward(dout, cd)
        dh = ops_fast.gelu_backward_fast(dg, cg)
        return self.up.backward(dh, cu, need_dx)


class BlockCache(NamedTuple):
    """What :meth:`Block.backward` needs from the forward pass."""
    ln_1: tuple
    attn: AttentionLayerCache
    ln_2: tuple
    mlp: tuple


class Block(Module):
    """Pre-LayerNorm transformer block: ``h = x + attn(ln_1(x)); out = h + mlp(ln_2(h))``."""

    def __init__(self, ln_1: LayerNorm, attn: CausalSelfAttention, ln_2: LayerNorm, mlp: MLP):
        super().__init__()
        self.ln_1, self.attn = self.add("ln_1", ln_1), self.add("attn", attn)
        self.ln_2, self.mlp = self.add("ln_2", ln_2), self.add("mlp", mlp)

    def forward(self, x, past: PastKV | None = None):
        """x (B, T, C) -> (B, T, C), cache; ``past`` goes to the attention (:class:`PastKV`)."""
        a, c1 = self.ln_1.forward(x)
        a, ca = self.attn.forward(a, past)
        h = ops_fast.add(x, a)  # residual
        m, c2 = self.ln_2.forward(h)
        m, cm = self.mlp.forward(m)
        out = ops_fast.add(h, m)  # residual
        return out, BlockCache(c1, ca, c2, cm)

    def backward(self, dout, cache: BlockCache, need_dx: bool = True):
        """Returns dx (None when ``need_dx`` is False: nothing below trains)."""
        # out = h + mlp(ln_2(h)): both paths reach h
        dh = self.ln_2.backward(self.mlp.backward(dout, cache.mlp), cache.ln_2)
        ops_fast.add(dh, dout, out=dh)
        # h = x + attn(ln_1(x)); without need_dx, attention's input gradient (three GEMMs) is
        # only computed when ln_1 itself trains
        need_da = need_dx or bool(self.ln_1.trainable)
        da = self.attn.backward(dh, cache.attn, need_dx=need_da)
        dx = None
        if need_da:
            dx = self.ln_1.backward(da, cache.ln_1, need_dx=need_dx)
        if need_dx:
            ops_fast.add(dx, dh, out=dx)
        return dx
