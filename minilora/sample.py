"""Sampling text from a trained model: temperature and top-k, seeded.

For each new token: crop the context to the last ``block_size`` tokens, run the model, take the
logits of the last position, divide by the temperature, keep the ``top_k`` largest (others get
probability 0), softmax, and draw from that distribution with a seeded CPU Generator (so NumPy
and CuPy draw the same text from the same logits). No KV cache: each step recomputes the whole
window, which is simple and fast enough at these sizes.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import numpy as np

from minilora import backend
from minilora.backend import xp
from minilora.errors import UsageError


def next_token_probs(model, idx, temperature: float = 1.0, top_k: int | None = None):
    """Probabilities (B, V) of the next token after ``idx`` (B, T) — a NumPy float64 array."""
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature!r}")
    T = model.config.block_size
    logits, _ = model.forward(idx[:, -T:])
    z = backend.to_numpy(logits[:, -1, :]).astype("float64") / temperature  # (B, V)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise UsageError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_k < z.shape[-1]:
            kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             rng=0):
    """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + new)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    rng = backend.cpu_rng(rng)
    for _ in range(max_new_tokens):
        p = next_token_probs(model, idx, temperature, top_k)  # (B, V)
        u = rng.random((p.shape[0], 1))
        nxt = (p.cumsum(axis=-1) < u).sum(axis=-1)  # inverse-CDF draw, (B,)
        nxt = np.minimum(nxt, p.shape[-1] - 1)
        idx = xp.concatenate([idx, backend.asarray(nxt[:, None].astype(idx.dtype))], axis=1)
    return idx


def sample_text(model, tokenizer, prompt: str = "\n", max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0) -> str:
    """Continue ``prompt`` (a string) and return prompt + continuation as a string.

    Characters outside the tokenizer's vocabulary raise one clear ValueError before any work.
    """
    if not prompt:
        raise UsageError("prompt must contain at least one character (try '\\n')")
    ids = tokenizer.encode(prompt)
    idx = backend.asarray(ids[None, :].astype("int64"))
    out = generate(model, idx, max_new_tokens, temperature, top_k, rng=seed)
    return tokenizer.decode(backend.to_numpy(out[0]))
