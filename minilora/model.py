"""The GPT: token + position embeddings, pre-LayerNorm blocks, final LayerNorm, LM head.

::

    logits, cache = model.forward(idx)            # idx (B, T) int -> logits (B, T, V)
    loss, dlogits = ops.cross_entropy(logits, targets)
    model.zero_grad(); model.backward(dlogits, cache)   # fills model.grads of trainable params
    loss = model.forward_backward(idx, targets)    # the same in one call; on the CPU a batch of
                                                   # 2+ sequences runs as 2 micro-batches, one
                                                   # thread each (data parallelism, the same floats
                                                   # on any thread count)

    set_recompute(model, True)                     # each block a Recomputed wrapper: forward
                                                   # keeps its input, backward runs it again
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
from minilora import threads as _threads
from minilora.backend import xp
from minilora.config import GPTConfig
from minilora.errors import MiniloraError
from minilora.nn import ops
from minilora.nn.kv_cache import KVCache
from minilora.nn.layers import (
    MLP,
    Block,
    CausalSelfAttention,
    Embedding,
    LayerNorm,
    Linear,
    Module,
    add_shadow_grads,
    shadow_grads,
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
    (the GPT itself, and the prefix/prompt-tuning wrappers of :mod:`minilora.methods`)."""

    def loss(self, idx, targets):
        """Forward only: mean cross-entropy (nats per token) as a Python float."""
        logits, _ = self.forward(idx)
        loss, _ = ops.cross_entropy_forward(logits, targets)
        return backend.to_scalar(loss)

    def forward_backward(self, idx, targets):
        """One training pass: loss (float), gradients left in ``grads`` (zeroed first).

        On the CPU a batch of at least :data:`MIN_DATA_PARALLEL_TOKENS` tokens is split into
        :data:`MICRO_BATCHES` micro-batches of whole sequences, each one's forward and backward
        run whole on a thread of its own (data parallelism: one parallel region per step instead
        of one per op; :func:`data_parallel_pieces`). Each micro-batch's mean loss is weighted by
        its share of the scored tokens, so the loss and gradients are the one-pass ones up to
        float rounding; the split is fixed, so the floats are the same on any number of threads.
        One pass otherwise (CuPy, a small batch, or dropout in the model: its masks are drawn in
        one pass so their order stays fixed)."""
        pieces = data_parallel_pieces(self, idx, targets)
        if pieces is None:
            logits, cache = self.forward(idx)
            loss, dlogits = ops.cross_entropy(logits, targets)
            del logits
            self.zero_grad()
            self.backward(dlogits, cache)
            return backend.to_scalar(loss)
        n_total = sum(n for _, n in pieces)
        stores = [None] + [{} for _ in pieces[1:]]  # piece 0 into the model's own gradients
        losses = [0.0] * len(pieces)
        self.zero_grad()

        def run(k0, k1):
            for k in range(k0, k1):
                sl, n = pieces[k]
                with _threads.serial(), shadow_grads(stores[k]):
                    logits, cache = self.forward(idx[sl])
                    loss, ce = ops.cross_entropy_forward(logits, targets[sl])
                    del logits
                    dlogits = ops.cross_entropy_backward(n / n_total, ce)
                    del ce
                    self.backward(dlogits, cache)
                    losses[k] = backend.to_scalar(loss) * (n / n_total)
        _threads.parallel_chunks(len(pieces), run)
        for store in stores[1:]:  # in a fixed order, whichever thread ran which piece
            add_shadow_grads(self, store)
        return float(sum(losses))


#: micro-batches of the data-parallel training step (fixed, whatever the thread count: the
#: floats then do not depend on it)
MICRO_BATCHES = 2
#: fewer tokens than this in a batch: one pass (the threads' hand-off costs more than it saves)
MIN_DATA_PARALLEL_TOKENS = 256


def data_parallel_pieces(model, idx, targets):
    """How :meth:`LanguageModelMixin.forward_backward` splits a batch: a list of
    ``(slice of whole sequences, scored tokens in it)``, one per micro-batch, or None for one
    pass (CuPy, fewer than 2 sequences or :data:`MIN_DATA_PARALLEL_TOKENS` tokens, a micro-batch
    with no scored token, or a module whose forward draws random numbers: dropout)."""
    B = idx.shape[0] if getattr(idx, "ndim", 0) == 2 else 0
    m = min(MICRO_BATCHES, B)
    if (m < 2 or idx.size < MIN_DATA_PARALLEL_TOKENS or backend.is_cupy()
            or getattr(targets, "shape", None) != idx.shape):
        return None
    if any(mod.draws_random() for _, mod in model.named_modules()):
        return None
    bounds = [B * k // m for k in range(m + 1)]
    pieces = []
    for b0, b1 in zip(bounds, bounds[1:]):
        n = int((targets[b0:b1] != ops.IGNORE_INDEX).sum())
        if n == 0:
            return None
        pieces.append((slice(b0, b1), n))
    return pieces


class StackCache(NamedTuple):
    """What :meth:`GPT.stack_backward` needs from :meth:`GPT.stack`."""
    blocks: list  # one cache per block (a :class:`~minilora.nn.layers.BlockCache`, or a
    #               :class:`RecomputeCache` under recomputation)
    ln_f: tuple
    head: tuple
    has_past: bool  # past_kv was given (its gradient flows through every block)


class GPTCache(NamedTuple):
    """What :meth:`GPT.backward` needs from the forward pass."""
    tok: tuple  # token embedding cache
    pos: tuple  # position embedding cache
    stack: StackCache


class RecomputeCache(NamedTuple):
    """What a block keeps in the forward pass under activation recomputation: its input and
    what is needed to run its forward again exactly (the state of every dropout generator in it,
    so the recomputed masks are the ones the forward drew)."""
    x: object  # the block's input (B, T, C)
    past: object  # the block's PastKV or None
    rng_states: list  # bit-generator states of the block's dropout generators


def _dropout_rngs(block: Module) -> list:
    """The NumPy generators that draw the dropout masks inside ``block`` (LoRA's)."""
    return [g for _, m in block.named_modules()
            for g in [getattr(m, "dropout_rng", None)] if g is not None]


class Recomputed(Module):
    """A transformer block under activation recomputation: the forward keeps only the block's
    input (B, T, C), the backward runs the block's forward again, then its backward.

    It shares the block's children (same objects, same parameter names), so wrapping and
    unwrapping changes no name, no weight and no optimizer state. ``chunk``: run the block
    ``chunk`` sequences at a time in both passes (every op in a block acts on each sequence
    alone), so the live activations are those of one block on ``chunk`` sequences; not with a
    prefix shared by the batch (``past``), which is then run whole. Dropout masks are replayed
    from the generators' saved states, so the gradients are the plain path's.
    """

    def __init__(self, block: Module, chunk: int | None = None):
        super().__init__()
        self.block = block
        self.children = block.children   # the same dict: one set of weights, the same names
        self.chunk = chunk

    def _pieces(self, x, past) -> list:
        B, n = x.shape[0], self.chunk
        if n is None or n >= B or past is not None:
            return [slice(None)]
        return [slice(b, min(b + n, B)) for b in range(0, B, n)]

    def forward(self, x, past=None):
        """x (B, T, C) -> (B, T, C), :class:`RecomputeCache` (the block's own cache dropped)."""
        states = [g.bit_generator.state for g in _dropout_rngs(self.block)]
        pieces = self._pieces(x, past)
        if len(pieces) == 1:
            out, _ = self.block.forward(x, past)
        else:
            out = xp.empty_like(x)
            for sl in pieces:
                out[sl], _ = self.block.forward(x[sl], past)
        return out, RecomputeCache(x, past, states)

    def backward(self, dout, saved: RecomputeCache, need_dx: bool = True):
        """The block's forward again from the saved input (piece by piece, the dropout
        generators set back to their forward-pass states, then restored), each piece's backward
        right after its forward."""
        rngs = _dropout_rngs(self.block)
        now = [g.bit_generator.state for g in rngs]
        for g, state in zip(rngs, saved.rng_states):
            g.bit_generator.state = state
        pieces = self._pieces(saved.x, saved.past)
        dx = None if not need_dx or len(pieces) == 1 else xp.empty_like(saved.x)
        for sl in pieces:
            _, cache = self.block.forward(saved.x[sl], saved.past)
            d = self.block.backward(dout[sl], cache, need_dx=need_dx)
            del cache
            if len(pieces) == 1:
                dx = d
            elif need_dx:
                dx[sl] = d
        for g, state in zip(rngs, now):
            g.bit_generator.state = state
        return dx


def set_recompute(model: Module, on: bool = True, chunk: int | None = None) -> None:
    """Switch activation recomputation on (or off) for every :class:`GPT` inside ``model``
    (the GPT itself, or a PEFT wrapper around it: prefix / prompt tuning, AdaLoRA).

    With it on, every block is wrapped in a :class:`Recomputed` (the GPT itself does not know):
    the forward keeps only each block's input (B, T, C) instead of the block's activations (attention probabilities (B, H, T, T), the MLP's (B, T, 4C), ...), and
    :meth:`GPT.backward` runs each block's forward again, one block at a time, just before its
    backward. Gradients are identical (same operations on the same inputs; dropout masks are
    replayed from the saved generator states); the cost is one more forward pass per step,
    about a third more compute, for activation memory of one block instead of all of them.

    ``chunk``: also run each block's forward and its recomputation + backward ``chunk``
    sequences at a time (every op in a block acts on each sequence alone), so the live
    activations are those of one block on ``chunk`` sequences. Parameter gradients are then
    sums over the chunks: equal to the plain path's up to float rounding, no longer bit for
    bit; with LoRA dropout the masks are drawn piece by piece (valid dropout, other masks than a
    whole-batch draw, replayed exactly in the backward). Not with prefix tuning (its keys are
    shared by the whole batch): the whole batch then.

    Chapter: chapters/01-foundations.ipynb
    """
    gpt = model
    while not isinstance(gpt, GPT) and getattr(gpt, "gpt", None) is not None:
        gpt = gpt.gpt  # prefix / prompt tuning keep the GPT they wrap as .gpt
    if not isinstance(gpt, GPT):
        raise MiniloraError(f"set_recompute: {type(model).__name__} is not a GPT and wraps none "
                            "(.gpt)")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise MiniloraError(f"set_recompute: chunk must be an integer >= 1 (sequences) or None "
                            f"(the whole batch), got {chunk!r}")
    node = gpt.children["blocks"]
    for i, blk in enumerate(gpt.blocks):
        plain = blk.block if isinstance(blk, Recomputed) else blk
        new = Recomputed(plain, chunk) if on else plain
        node.children[str(i)] = new
        gpt.blocks[i] = new
    gpt.recompute = bool(on)
    gpt.recompute_chunk = chunk if on else None


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
        self.recompute = False  # activation recomputation (see set_recompute)
        self.recompute_chunk = None  # ... and sequences per piece (None: the whole batch)

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

    def forward(self, idx, past_kv=None, check: bool = True, start_pos: int = 0):
        """idx (B, T) -> logits (B, T, V), cache (:class:`GPTCache`): :meth:`add_positions` of the
        token embeddings, then :meth:`stack`.

        Args:
            past_kv: optional list (one per block) of :class:`~minilora.nn.layers.PastKV`: keys
                and values before the tokens that every query sees (prefix tuning's prefix, or a
                generation's :class:`KVCache` layers).
            start_pos: position id of the first input (a decoding step continues where the
                cache left off); ``start_pos + T <= block_size``.
        """
        if check:
            self.check_input(idx)
        tok, c_tok = self.wte.forward(idx)  # (B, T, C)
        x, c_pos = self.add_positions(tok, start_pos)
        logits, c_stack = self.stack(x, past_kv)
        return logits, GPTCache(c_tok, c_pos, c_stack)

    def add_positions(self, x, start_pos: int = 0):
        """x (B, N, C) -> x + wpe[start_pos : start_pos + N], cache. The inputs before the stack
        need not all be tokens (prompt tuning puts its vectors in front and composes
        ``wte``, this and :meth:`stack` itself)."""
        N = x.shape[1]
        if start_pos + N > self.config.block_size:
            raise InputError(f"positions {start_pos} .. {start_pos + N - 1} (start {start_pos}, "
                             f"{N} inputs) exceed block_size {self.config.block_size}")
        pos, c_pos = self.wpe.forward(start_pos + xp.arange(N)[None, :])  # (1, N, C)
        return x + pos, c_pos

    def add_positions_backward(self, dx, cache) -> None:
        """The position table's gradient (when it trains) from dx (B, N, C)."""
        if self.wpe.needs_grad("weight"):
            self.wpe.backward(dx.sum(axis=0, keepdims=True), cache)

    def stack(self, x, past_kv=None):
        """The blocks, the final LayerNorm and the head: x (B, N, C) -> logits (B, N, V), cache
        (:class:`StackCache`)."""
        block_caches = []
        for i, blk in enumerate(self.blocks):
            x, c = blk.forward(x, None if past_kv is None else past_kv[i])
            block_caches.append(c)
        x, c_ln = self.ln_f.forward(x)
        logits, c_head = self.lm_head.forward(x)  # (B, N, V)
        return logits, StackCache(block_caches, c_ln, c_head, past_kv is not None)

    def stack_backward(self, dlogits, cache: StackCache, need_dx: bool = False):
        """Backpropagate ``dlogits`` (B, N, V) through the head, ln_f and the blocks; returns the
        gradient of the stack's input (B, N, C), or None when ``need_dx`` is False and nothing
        below a block needs it.

        Block i needs its input gradient only if something below it trains (``need_dx``: the
        embeddings or a soft prompt, earlier keys, or a trainable parameter in an earlier
        block): under LoRA on q, v the first block skips its q/k/v input GEMMs and its ln_1
        backward. The gradient of ``past_kv`` goes to each layer's ``past.backward``."""
        dx = self.lm_head.backward(dlogits, cache.head)
        dx = self.ln_f.backward(dx, cache.ln_f)
        below = [need_dx or cache.has_past]
        for blk in self.blocks[:-1]:
            below.append(below[-1] or any(m.trainable for _, m in blk.named_modules()))
        for i in reversed(range(len(self.blocks))):
            if dx is None:  # nothing at or below block i trains: stop here
                break
            dx = self.blocks[i].backward(dx, cache.blocks[i], need_dx=below[i])
        return dx

    def backward(self, dlogits, cache: GPTCache):
        """Backpropagate ``dlogits`` (B, T, V); adds into ``grads`` of trainable parameters.
        Returns an empty dict (the gradients are in the parameters)."""
        embeddings = bool(self.wte.trainable) or bool(self.wpe.trainable)
        dx = self.stack_backward(dlogits, cache.stack, need_dx=embeddings)
        if dx is not None:
            self.add_positions_backward(dx, cache.pos)
            self.wte.backward(dx, cache.tok)
        return {}

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
