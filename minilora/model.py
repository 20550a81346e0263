"""The GPT: token + position embeddings, pre-LayerNorm blocks, final LayerNorm, LM head.

::

    logits, cache = model.forward(idx)            # idx (B, T) int -> logits (B, T, V)
    loss, dlogits = ops.cross_entropy(logits, targets)
    model.zero_grad(); model.backward(dlogits, cache)   # fills model.grads of trainable params

Parameter names (GPT-2's where they exist; q/k/v/o and up/down are separate so that any of them
can be a LoRA target)::

    wte.weight (V, C)   wpe.weight (block_size, C)
    blocks.{i}.ln_1.{weight,bias} (C,)
    blocks.{i}.attn.{q,k,v,o}.weight (C, C)   .bias (C,)
    blocks.{i}.ln_2.{weight,bias} (C,)
    blocks.{i}.mlp.up.weight (4C, C) .bias (4C,)   blocks.{i}.mlp.down.weight (C, 4C) .bias (C,)
    ln_f.{weight,bias} (C,)   lm_head.weight (V, C)   (untied from wte, so either can be frozen)

Weights are drawn on the CPU from a seeded ``numpy.random.Generator`` and then moved to the
backend, so NumPy and CuPy runs start from identical weights.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import math

from minilora import backend
from minilora.backend import xp
from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.nn import ops
from minilora.nn.layers import (
    MLP,
    Block,
    CausalSelfAttention,
    Embedding,
    LayerNorm,
    Linear,
    Module,
)


class InputError(MiniloraError, ValueError):
    """The token ids given to the model are not valid for it."""


def _init_params(config: GPTConfig, rng, dtype):
    """All initial arrays, drawn on the CPU in a fixed order, then moved to the backend.

    ``rng=None``: no draws; the random matrices are zeros (a model about to be loaded)."""
    C, V = config.n_embd, config.vocab_size
    std = config.init_std
    std_proj = std / math.sqrt(2 * config.n_layer)  # GPT-2: residual projections scaled down

    def normal(shape, s):
        if rng is None:
            return xp.zeros(shape, dtype=dtype)
        return backend.asarray(rng.standard_normal(shape, dtype="float64") * s, dtype=dtype)

    def zeros(n):
        return xp.zeros((n,), dtype=dtype)

    def ones(n):
        return xp.ones((n,), dtype=dtype)

    def linear(d_out, d_in, s):
        return Linear(normal((d_out, d_in), s), zeros(d_out) if config.bias else None)

    wte = Embedding(normal((V, C), std))
    wpe = Embedding(normal((config.block_size, C), std))
    blocks = []
    for _ in range(config.n_layer):
        attn = CausalSelfAttention(linear(C, C, std), linear(C, C, std), linear(C, C, std),
                                   linear(C, C, std_proj), config.n_head)
        mlp = MLP(linear(4 * C, C, std), linear(C, 4 * C, std_proj))
        blocks.append(Block(LayerNorm(ones(C), zeros(C)), attn, LayerNorm(ones(C), zeros(C)), mlp))
    ln_f = LayerNorm(ones(C), zeros(C))
    lm_head = Linear(normal((V, C), std), None)
    return wte, wpe, blocks, ln_f, lm_head


class LanguageModelMixin:
    """The two training-loop entry points, written once for anything with the GPT's
    ``forward(idx) -> (logits, cache)`` / ``backward(dlogits, cache)`` / ``zero_grad()`` contract
    (the GPT itself, and the prefix/prompt-tuning wrappers of :mod:`minilora.peft`)."""

    def loss(self, idx, targets):
        """Forward only: mean cross-entropy (nats per token) as a Python float."""
        logits, _ = self.forward(idx)
        loss, _ = ops.cross_entropy_forward(logits, targets)
        return backend.to_scalar(loss)

    def forward_backward(self, idx, targets):
        """One training pass: loss (float), gradients left in ``grads`` (zeroed first)."""
        logits, cache = self.forward(idx)
        loss, dlogits = ops.cross_entropy(logits, targets)
        del logits
        self.zero_grad()
        self.backward(dlogits, cache)
        return backend.to_scalar(loss)


class GPT(LanguageModelMixin, Module):
    """A decoder-only transformer with hand-written backward passes.

    Args:
        config: a :class:`GPTConfig`.
        rng: a ``numpy.random.Generator`` or an int seed (weights are drawn from it on the CPU);
            None allocates zeros without drawing, for a model whose weights are loaded next
            (:func:`minilora.checkpoint.load_checkpoint`: three times faster).
        dtype: 'float32' (training default) or 'float64' (gradient checks).
    """

    def __init__(self, config: GPTConfig, rng=0, dtype="float32"):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        rng = None if rng is None else backend.cpu_rng(rng)
        wte, wpe, blocks, ln_f, lm_head = _init_params(config, rng, dtype)
        self.wte, self.wpe = self.add("wte", wte), self.add("wpe", wpe)
        self.blocks = []
        blocks_node = self.add("blocks", Module())
        for i, blk in enumerate(blocks):
            self.blocks.append(blocks_node.add(str(i), blk))
        self.ln_f, self.lm_head = self.add("ln_f", ln_f), self.add("lm_head", lm_head)

    @property
    def dtype(self):
        return self.lm_head.params["weight"].dtype

    def check_input(self, idx) -> None:
        """One clear error for ids the model cannot take (shape, dtype, range, length)."""
        if not backend.is_array(idx):
            raise InputError(f"idx must be a {backend.get_backend()} integer array of shape (B, T), "
                             f"got {type(idx).__name__}")
        if idx.ndim != 2:
            raise InputError(f"idx must have shape (B, T), got shape {tuple(idx.shape)}")
        if idx.dtype.kind not in "iu":
            raise InputError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        T = idx.shape[1]
        if T == 0:
            raise InputError("idx is empty: give at least one token")
        if T > self.config.block_size:
            raise InputError(f"context of {T} tokens is longer than block_size "
                             f"{self.config.block_size}; crop it to the last "
                             f"{self.config.block_size} tokens")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.config.vocab_size}), "
                             f"got values in [{lo}, {hi}]")

    def forward(self, idx, prefix_kv=None, input_embeds=None, check: bool = True):
        """idx (B, T) -> logits (B, T, V), cache.

        Args:
            prefix_kv: optional list (one per block) of (pk, pv) arrays (B, P, C): prefix tuning.
            input_embeds: optional (B, P, C) soft-prompt vectors placed before the tokens (prompt
                tuning); the logits then cover P + T positions.
        """
        if check:
            self.check_input(idx)
        B, T = idx.shape
        tok, c_tok = self.wte.forward(idx)  # (B, T, C)
        P = 0
        if input_embeds is not None:
            P = input_embeds.shape[1]
            tok = xp.concatenate([input_embeds.astype(tok.dtype), tok], axis=1)  # (B, P+T, C)
            if P + T > self.config.block_size:
                raise InputError(f"soft prompt ({P}) + context ({T}) exceeds block_size "
                                 f"{self.config.block_size}")
        pos_ids = xp.arange(P + T)[None, :]  # (1, P+T)
        pos, c_pos = self.wpe.forward(pos_ids)  # (1, P+T, C)
        x = tok + pos
        block_caches = []
        for i, blk in enumerate(self.blocks):
            x, c = blk.forward(x, None if prefix_kv is None else prefix_kv[i])
            block_caches.append(c)
        x, c_ln = self.ln_f.forward(x)
        logits, c_head = self.lm_head.forward(x)  # (B, P+T, V)
        return logits, (c_tok, c_pos, block_caches, c_ln, c_head, P, prefix_kv is not None)

    def backward(self, dlogits, cache):
        """Backpropagate ``dlogits`` (B, T, V); adds into ``grads`` of trainable parameters.

        Returns a dict with the gradients of the optional inputs: ``"prefix_kv"`` (list of
        (dpk, dpv)) and ``"input_embeds"`` ((B, P, C)), when they were given.
        """
        c_tok, c_pos, block_caches, c_ln, c_head, P, has_prefix = cache
        dx = self.lm_head.backward(dlogits, c_head)
        dx = self.ln_f.backward(dx, c_ln)
        # block i needs its input gradient only if something below it trains (the embeddings,
        # a soft prompt, a prefix, or a trainable parameter in an earlier block): under LoRA on
        # q, v the first block skips its q/k/v input GEMMs and its ln_1 backward
        below = [P > 0 or has_prefix or bool(self.wte.trainable) or bool(self.wpe.trainable)]
        for blk in self.blocks[:-1]:
            below.append(below[-1] or any(m.trainable for _, m in blk.named_modules()))
        dprefix = []
        for i in reversed(range(len(self.blocks))):
            if dx is None:  # nothing at or below block i trains: stop here
                break
            dx = self.blocks[i].backward(dx, block_caches[i], need_dx=below[i])
            if isinstance(dx, tuple):
                dx, dp = dx
                dprefix.append(dp)
        extra = {}
        if dprefix:
            extra["prefix_kv"] = dprefix[::-1]
        if dx is None:  # nothing below the blocks trains
            return extra
        if self.wpe.needs_grad("weight"):
            self.wpe.backward(dx.sum(axis=0, keepdims=True), c_pos)
        if P:
            extra["input_embeds"] = dx[:, :P]
            dx = dx[:, P:]
        self.wte.backward(dx, c_tok)
        return extra
