"""The GPT: token + position embeddings, pre-LayerNorm blocks, final LayerNorm, LM head.

::

    logits, cache = model.forward(idx)            # idx (B, T) int -> logits (B, T, V)
    loss, dlogits = ops.cross_entropy(logits, targets)
    model.zero_grad(); model.backward(dlogits, cache)   # fills model.grads of trainable params

    kv = model.kv_cache(batch_size=B)              # generation: one KV cache per generation
    logits = model.forward_incremental(idx, kv)    # the prompt (B, T) -> (B, T, V)
    logits = model.forward_incremental(nxt, kv)    # then each new token (B, 1) -> (B, 1, V)

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
from typing import NamedTuple

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
    PastKV,
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


class KVCacheError(MiniloraError, ValueError):
    """A KV cache is used in a way it cannot serve (batch size, chunk length, gradients)."""


class _LayerKV(PastKV):
    """Layer ``i``'s part of a :class:`KVCache`, as its attention sees it (a :class:`PastKV`).

    extend(k, v): write the new keys (B, T, C) after the n held ones, return all n + T of them
    (views of the cache, no copy). The cache's length moves on only after every layer has run
    (:meth:`KVCache.advance`), so all layers write to the same slots.
    """

    def __init__(self, cache: "KVCache", i: int):
        self.cache = cache
        self.keys, self.values = cache.keys[i], cache.values[i]  # (B, S, C) views

    def extend(self, k, v):
        n, T = self.cache.length, k.shape[1]
        self.keys[:, n:n + T] = k
        self.values[:, n:n + T] = v
        return self.keys[:, :n + T], self.values[:, :n + T]

    def backward(self, dk, dv) -> None:
        raise KVCacheError("a KV cache serves generation only and has no gradient; train with "
                           "model.forward / forward_backward (no cache)")


class KVCache:
    """One generation's keys and values at every attention layer, allocated once.

    For B sequences and a model of L layers, width C and context ``block_size``::

        keys, values   (L, B, n_fixed + window, C)
        tokens         (B, window)   the ids whose keys are held (to re-encode them, below)

    Slots [0, n_fixed) hold entries that never leave: prefix tuning's keys and values, or a soft
    prompt's (which also take positions 0 .. P-1: ``first_position = P``). Then the window: the
    keys of the last ``n_tokens`` tokens fed, oldest first, at positions ``first_position + 0, 1,
    ...``; ``window = block_size - first_position``.

    **Past the window.** Position embeddings are absolute (``wpe``), so a key computed at one
    position is wrong at another: a cache cannot just drop its oldest entry and shift. When a
    chunk of T new tokens does not fit, the cache forgets its token entries and the model
    re-encodes the last ``min(keep, window - T)`` tokens it held, followed by the chunk, from
    position ``first_position`` on (one forward pass over them). So each token is predicted by
    the model run on its *context*: the tokens fed since the last re-encoding (the fixed entries
    first), where a re-encoding starts the context again from the last ``keep`` tokens.

    * ``keep = window - 1`` (the default): every token is predicted from exactly the last
      ``window`` tokens, which is what running the model on the context cropped to
      ``block_size`` (generation without a cache) computes; past the window each new token then
      costs a forward pass over the whole window, as without a cache.
    * a smaller ``keep`` (e.g. ``window // 2``): one re-encoding every ``window - keep`` tokens,
      each token seeing between ``keep + 1`` and ``window`` tokens: long generations stay cheap,
      with shorter contexts just after each re-encoding.

    Built by ``model.kv_cache(batch_size)`` (:meth:`GPT.kv_cache` and the PEFT wrappers' own,
    which fill the fixed slots) and used by ``model.forward_incremental(idx, cache)``.
    """

    def __init__(self, n_layer: int, batch_size: int, n_embd: int, window: int, dtype, *,
                 n_fixed: int = 0, first_position: int = 0, keep: int | None = None):
        for name, v, lo in (("batch_size", batch_size, 1), ("window", window, 1),
                            ("n_fixed", n_fixed, 0), ("first_position", first_position, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise KVCacheError(f"{name} must be an integer >= {lo}, got {v!r}")
        keep = window - 1 if keep is None else keep
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < window:
            raise KVCacheError(f"keep (tokens re-encoded when the cache is full) must be an "
                               f"integer in [0, {window - 1}] for a window of {window}, "
                               f"got {keep!r}")
        S = n_fixed + window
        self.keys = xp.zeros((n_layer, batch_size, S, n_embd), dtype=dtype)
        self.values = xp.zeros((n_layer, batch_size, S, n_embd), dtype=dtype)
        self.tokens = xp.zeros((batch_size, window), dtype="int64")
        self.batch_size, self.window, self.keep = batch_size, window, keep
        self.n_fixed, self.first_position = n_fixed, first_position
        self.length = 0  # slots filled, fixed ones included
        self.reencodings = 0  # how many times the window was re-encoded (for tests and reports)
        self.layers = [_LayerKV(self, i) for i in range(n_layer)]

    @property
    def n_tokens(self) -> int:
        """Tokens whose keys are held (the window's fill)."""
        return max(0, self.length - self.n_fixed)

    @property
    def next_position(self) -> int:
        """The position id the next token fed gets."""
        return self.first_position + self.n_tokens

    def set_fixed(self, keys, values) -> None:
        """Write the fixed entries: ``keys``, ``values`` (L, n_fixed, C), the same for every row
        (prefix tuning's prefix; a soft prompt's keys). Only on an empty cache."""
        if self.length:
            raise KVCacheError("set_fixed: the cache already holds entries; fixed entries come "
                               "first, on a new cache")
        want = (self.keys.shape[0], self.n_fixed, self.keys.shape[3])
        if tuple(keys.shape) != want or tuple(values.shape) != want:
            raise KVCacheError(f"fixed keys/values must have shape (n_layer, n_fixed, C) = {want},"
                               f" got {tuple(keys.shape)} and {tuple(values.shape)}")
        self.keys[:, :, :self.n_fixed] = keys[:, None]
        self.values[:, :, :self.n_fixed] = values[:, None]
        self.length = self.n_fixed

    def check_chunk(self, idx) -> None:
        """One clear error for new token ids (B, T) this cache cannot take."""
        B, T = idx.shape
        if B != self.batch_size:
            raise KVCacheError(f"this KV cache holds {self.batch_size} sequences, got a batch of "
                               f"{B}; make one cache per generation with model.kv_cache({B})")
        if T > self.window:
            raise KVCacheError(f"a chunk of {T} tokens is longer than the cache's window "
                               f"{self.window}; feed the last {self.window} tokens only")
        if self.length < self.n_fixed:
            raise KVCacheError("the cache's fixed entries (prefix / soft prompt) are not written;"
                               " build it with the model's own kv_cache(batch_size)")

    def make_room(self, idx):
        """The ids to encode for the new chunk ``idx`` (B, T): ``idx`` itself when it fits;
        else the cache is reset to its fixed entries and the last ``min(keep, window - T)`` held
        tokens come back in front of ``idx`` (see the class docstring)."""
        T = idx.shape[1]
        n = self.n_tokens
        if n + T <= self.window:
            return idx
        kept = min(self.keep, self.window - T, n)
        tail = self.tokens[:, n - kept:n]
        self.length = self.n_fixed
        self.reencodings += 1
        return xp.concatenate([tail.astype(idx.dtype), idx], axis=1) if kept else idx

    def advance(self, idx) -> None:
        """Record that every layer has written the keys of the tokens ``idx`` (B, T)."""
        n, T = self.n_tokens, idx.shape[1]
        self.tokens[:, n:n + T] = idx
        self.length += T


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

    def forward(self, idx, past_kv=None, input_embeds=None, check: bool = True,
                start_pos: int = 0):
        """idx (B, T) -> logits (B, T, V), cache (:class:`GPTCache`).

        Args:
            past_kv: optional list (one per block) of :class:`~minilora.nn.layers.PastKV`: keys
                and values before the tokens that every query sees (prefix tuning's prefix, or a
                generation's :class:`KVCache` layers).
            input_embeds: optional (B, P, C) soft-prompt vectors placed before the tokens (prompt
                tuning); the logits then cover P + T positions.
            start_pos: position id of the first input (a decoding step continues where the
                cache left off); ``start_pos + P + T <= block_size``.
        """
        if check:
            self.check_input(idx)
        B, T = idx.shape
        tok, c_tok = self.wte.forward(idx)  # (B, T, C)
        P = 0
        if input_embeds is not None:
            P = input_embeds.shape[1]
            tok = xp.concatenate([input_embeds.astype(tok.dtype), tok], axis=1)  # (B, P+T, C)
        if start_pos + P + T > self.config.block_size:
            raise InputError(f"positions {start_pos} .. {start_pos + P + T - 1} (start {start_pos}"
                             f", soft prompt {P}, context {T}) exceed block_size "
                             f"{self.config.block_size}")
        pos_ids = start_pos + xp.arange(P + T)[None, :]  # (1, P+T)
        pos, c_pos = self.wpe.forward(pos_ids)  # (1, P+T, C)
        x = tok + pos
        block_caches = []
        for i, blk in enumerate(self.blocks):
            x, c = blk.forward(x, None if past_kv is None else past_kv[i])
            block_caches.append(c)
        x, c_ln = self.ln_f.forward(x)
        logits, c_head = self.lm_head.forward(x)  # (B, P+T, V)
        return logits, GPTCache(c_tok, c_pos, block_caches, c_ln, c_head, P, past_kv is not None)

    def backward(self, dlogits, cache: "GPTCache"):
        """Backpropagate ``dlogits`` (B, T, V); adds into ``grads`` of trainable parameters.

        The gradient of ``past_kv`` goes to each layer's ``past.backward`` (the attention calls
        it). Returns a dict: ``{"input_embeds": (B, P, C)}`` when a soft prompt was given, else
        empty.
        """
        c = cache
        dx = self.lm_head.backward(dlogits, c.head)
        dx = self.ln_f.backward(dx, c.ln_f)
        # block i needs its input gradient only if something below it trains (the embeddings,
        # a soft prompt, earlier keys, or a trainable parameter in an earlier block): under LoRA
        # on q, v the first block skips its q/k/v input GEMMs and its ln_1 backward
        below = [c.n_prompt > 0 or c.has_past or bool(self.wte.trainable)
                 or bool(self.wpe.trainable)]
        for blk in self.blocks[:-1]:
            below.append(below[-1] or any(m.trainable for _, m in blk.named_modules()))
        for i in reversed(range(len(self.blocks))):
            if dx is None:  # nothing at or below block i trains: stop here
                break
            dx = self.blocks[i].backward(dx, c.blocks[i], need_dx=below[i])
        extra = {}
        if dx is None:  # nothing below the blocks trains
            return extra
        if self.wpe.needs_grad("weight"):
            self.wpe.backward(dx.sum(axis=0, keepdims=True), c.pos)
        P = c.n_prompt
        if P:
            extra["input_embeds"] = dx[:, :P]
            dx = dx[:, P:]
        self.wte.backward(dx, c.tok)
        return extra

    # -- generation with a KV cache ------------------------------------------------------------
    def kv_cache(self, batch_size: int, keep: int | None = None, *, n_fixed: int = 0,
                 first_position: int = 0) -> KVCache:
        """A new, empty :class:`KVCache` for ``batch_size`` sequences of this model (``keep``:
        tokens re-encoded when the window is full, default ``block_size - 1``; ``n_fixed`` /
        ``first_position``: for the PEFT wrappers, which fill the fixed slots)."""
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_embd, c.block_size - first_position,
                       self.dtype, n_fixed=n_fixed, first_position=first_position, keep=keep)

    def forward_incremental(self, idx, kv: KVCache, check: bool = True):
        """Logits (B, T, V) of the T new tokens ``idx`` (B, T) after every token fed to ``kv``
        before; appends their keys and values to ``kv``.

        The first call feeds the prompt, then one call per new token (B, 1): each layer computes
        q, k, v for the new tokens only and attends over the cached keys plus its own, so a step
        costs O(T_context) instead of a forward over the whole context. The logits equal those of
        :meth:`forward` run on the cache's context (:class:`KVCache`, to float rounding).
        """
        if check:
            self.check_input(idx)
            kv.check_chunk(idx)
        T = idx.shape[1]
        run = kv.make_room(idx)  # idx, or after a full window: the re-encoded tail + idx
        logits, _ = self.forward(run, past_kv=kv.layers, check=False, start_pos=kv.next_position)
        kv.advance(run)
        return logits[:, -T:]


class GPTCache(NamedTuple):
    """What :meth:`GPT.backward` needs from the forward pass."""
    tok: tuple  # token embedding cache
    pos: tuple  # position embedding cache
    blocks: list  # one :class:`~minilora.nn.layers.BlockCache` per block
    ln_f: tuple
    head: tuple
    n_prompt: int  # P soft-prompt vectors before the tokens (0 without)
    has_past: bool  # past_kv was given (its gradient flows through every block)
