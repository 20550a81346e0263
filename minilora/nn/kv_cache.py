"""A generation's KV cache: every attention layer's keys and values, allocated once.

::

    kv = model.kv_cache(batch_size=B)              # minilora.model.GPT.kv_cache
    logits = model.forward_incremental(idx, kv)    # the prompt (B, T) -> (B, T, V)
    logits = model.forward_incremental(nxt, kv)    # then each new token (B, 1) -> (B, 1, V)

Each layer's part is a :class:`~minilora.nn.layers.PastKV`: its attention writes the new tokens'
keys after the cached ones and attends over all of them.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

from minilora.backend import xp
from minilora.errors import MiniloraError
from minilora.nn.layers import PastKV


#: ``keep`` for the chunked window: re-encode half the window when it is full (see :class:`KVCache`)
CHUNKED = "half"


class KVCacheError(MiniloraError, ValueError):
    """A KV cache is used in a way it cannot serve (batch size, chunk length, gradients)."""


class _LayerKV(PastKV):
    """Layer ``i``'s part of a :class:`KVCache`, as its attention sees it (a :class:`PastKV`).

    extend(k, v): write the new keys (B, T, C) after the n held ones, return all n + T of them
    (views of the cache, no copy). The cache's length moves on only after every layer has run
    (:meth:`KVCache.advance`), so all layers write to the same slots.
    """

    def __init__(self, cache: KVCache, i: int):
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

    * ``keep = window - 1`` (the default here, the *exact sliding window*): every token is
      predicted from exactly the last ``window`` tokens, which is what running the model on the
      context cropped to ``block_size`` (generation without a cache) computes; past the window
      each new token then costs a forward pass over the whole window, as without a cache.
    * ``keep = "half"`` (``window // 2``, what :func:`minilora.sample.generate` uses unless
      asked for the exact window: the *chunked window*): the window shifts by half its length
      at a time, one re-encoding of ``window // 2`` tokens every ``window - window // 2`` new
      ones, and the cache serves every token in between; each token sees between
      ``window // 2 + 1`` and ``window`` tokens, an approximation of the exact window (a
      token just after a shift sees half the context the exact window would give it) at a
      cost per token close to that of a step inside the window.
    * any other ``keep`` in ``[0, window - 1]``: one re-encoding every ``window - keep`` tokens.

    Built by ``model.kv_cache(batch_size)`` (:meth:`minilora.model.GPT.kv_cache` and the PEFT
    wrappers' own, which fill the fixed slots); used by ``model.forward_incremental(idx, kv)``.
    """

    def __init__(self, n_layer: int, batch_size: int, n_embd: int, window: int, dtype, *,
                 n_fixed: int = 0, first_position: int = 0, keep: int | None = None):
        for name, v, lo in (("batch_size", batch_size, 1), ("window", window, 1),
                            ("n_fixed", n_fixed, 0), ("first_position", first_position, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise KVCacheError(f"{name} must be an integer >= {lo}, got {v!r}")
        keep = window - 1 if keep is None else window // 2 if keep == CHUNKED else keep
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < window:
            raise KVCacheError(f"keep (tokens re-encoded when the cache is full) must be "
                               f"{CHUNKED!r} or an integer in [0, {window - 1}] for a window "
                               f"of {window}, got {keep!r}")
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
