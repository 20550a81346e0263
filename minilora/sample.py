"""Sampling text from a trained model: temperature and top-k, seeded, with a KV cache.

For each new token: take the logits of the last position, divide by the temperature, keep the
``top_k`` largest (others get probability 0), softmax, and draw from that distribution with a
seeded CPU Generator (so NumPy and CuPy draw the same text from the same logits).

The logits come from a KV cache (:class:`minilora.nn.kv_cache.KVCache`): the prompt is encoded
once, then each step feeds only the new token, whose queries attend over the keys and values
every layer kept. A step costs O(context) instead of a forward pass over the whole context.

Past ``block_size`` (position embeddings are absolute, so a cache cannot simply drop its oldest
token) there are two ways on, chosen by ``exact_window``:

* **chunked window** (the default): when the window is full, the last half of it is
  re-encoded (one forward pass over ``block_size // 2`` tokens) and the cache serves the next
  ``block_size // 2`` tokens, so every token is predicted from between half a window and a whole
  window of the latest text. An approximation of the exact window: the text differs from it
  once the window has filled, and a 2,000-character generation runs at the speed of steps
  inside the window.
* **exact sliding window** (``exact_window=True``, ``minilora sample --exact-window``): every
  token is predicted from exactly the last ``block_size`` tokens, as re-running the model on the
  cropped context would (``use_cache=False``, to float rounding); past the window each new token
  costs a forward pass over the whole window.

Inside the window both give the same text.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import numbers
import sys

import numpy as np
from tqdm.auto import tqdm

from minilora import backend, threads
from minilora.backend import xp
from minilora.errors import UsageError
from minilora.memory import check_fits
from minilora.nn.kv_cache import CHUNKED


def _check_sampling(temperature, top_k) -> None:
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
            and temperature > 0):
        raise UsageError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top_k must be a positive integer or None, got {top_k!r}")


def probs_from_logits(logits, temperature: float = 1.0, top_k: int | None = None):
    """Next-token probabilities (B, V), NumPy float64, from last-position logits (B, V).

    p = softmax(z / temperature) over the ``top_k`` largest z (the others get 0).
    """
    z = backend.to_numpy(logits).astype("float64") / temperature  # (B, V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def next_token_probs(model, idx, temperature: float = 1.0, top_k: int | None = None):
    """Probabilities (B, V) of the next token after ``idx`` (B, T) — a NumPy float64 array.

    One full forward pass over the last ``block_size`` tokens (no cache)."""
    _check_sampling(temperature, top_k)
    logits, _ = model.forward(idx[:, -model.config.block_size:])
    return probs_from_logits(logits[:, -1, :], temperature, top_k)


def _draw(p, rng):
    """One id per row from the rows of ``p`` (B, V): inverse-CDF with a uniform from ``rng``."""
    u = rng.random((p.shape[0], 1))
    nxt = (p.cumsum(axis=-1) < u).sum(axis=-1)  # (B,)
    return np.minimum(nxt, p.shape[-1] - 1)


def _check_cache_support(model) -> None:
    if not (hasattr(model, "kv_cache") and hasattr(model, "forward_incremental")):
        raise UsageError(f"{type(model).__name__} has no kv_cache / forward_incremental, so it "
                         "cannot generate with a KV cache; pass use_cache=False")


@threads.in_phase("decode")
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             rng=0, *, use_cache: bool = True, exact_window: bool = False,
             keep: int | None = None, progress=None, on_token=None):
    """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + new).

    Args:
        model: a GPT, a PEFT wrapper (prefix / prompt tuning) or a mixed-adapter batch view
            (:meth:`minilora.adapters.AdapterRegistry.view`).
        rng: int seed or NumPy Generator for the draws (one uniform per row and step).
        use_cache: decode with a KV cache (default); False re-runs the model over the context
            (cropped to ``block_size``) for every token, the plain definition.
        exact_window: past ``block_size``, predict every token from exactly the last
            ``block_size`` tokens (one forward pass over the window per token) instead of the
            chunked window (re-encode half the window when it is full); see the module
            docstring. Inside the window both are the same.
        keep: tokens the cache re-encodes when its window is full, for other trade-offs
            (:class:`minilora.nn.kv_cache.KVCache`); not with ``exact_window``. Cache only.
        progress: a tqdm bar on stderr; None (default) shows it only when stderr is a terminal
            and the generation takes more than half a second; False never, True always.
        on_token: called as ``on_token(ids)`` with each step's new ids (a NumPy (B,) array) as
            soon as they are drawn (for streaming).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k)
    if use_cache:
        _check_cache_support(model)
    elif keep is not None:
        raise UsageError("keep sets how a KV cache slides; it has no meaning with use_cache=False")
    if keep is not None and exact_window:
        raise UsageError("keep and exact_window both set how the window slides: give one "
                         "(exact_window is keep = block_size - 1)")
    if not backend.is_array(idx) or idx.ndim != 2 or idx.shape[1] == 0:
        raise UsageError("idx must be a (B, T) array of token ids with T >= 1")
    rng = backend.cpu_rng(rng)
    B, T0 = idx.shape
    # the ids and, on the way out, the text: about 16 bytes per generated token and row
    check_fits(f"max_new_tokens {max_new_tokens:,}", 16 * B * (T0 + max_new_tokens), 16 * B,
               " new tokens", 16 * B * T0)
    out = xp.zeros((B, T0 + max_new_tokens), dtype=idx.dtype)
    out[:, :T0] = idx
    if max_new_tokens == 0:
        return out
    window = model.config.block_size

    def logits_after(t, first=False):
        """Last-position logits (B, V) given out[:, :t]."""
        if use_cache:
            new = out[:, max(0, t - kv.window):t] if first else out[:, t - 1:t]
            return model.forward_incremental(new, kv, check=first)[:, -1]
        return model.forward(out[:, max(0, t - window):t], check=first)[0][:, -1]

    if use_cache:
        kv = model.kv_cache(B, keep if keep is not None else None if exact_window else CHUNKED)
    bar = tqdm(total=max_new_tokens, desc="generating", unit="tok", leave=False, file=sys.stderr,
               disable=(not progress) if progress is not None else None,
               delay=0.0 if progress else 0.5, dynamic_ncols=True)
    with bar:
        logits = logits_after(T0, first=True)
        for i in range(max_new_tokens):
            nxt = _draw(probs_from_logits(logits, temperature, top_k), rng)  # (B,)
            out[:, T0 + i] = backend.asarray(nxt.astype("int64"))
            if on_token is not None:
                on_token(nxt)
            bar.update(1)
            if i + 1 < max_new_tokens:
                logits = logits_after(T0 + i + 1)
    return out


def sample_text(model, tokenizer, prompt: str = "\n", max_new_tokens: int = 200,
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0, *,
                use_cache: bool = True, exact_window: bool = False, keep: int | None = None,
                progress=None, stream=None) -> str:
    """Continue ``prompt`` (a string) and return prompt + continuation as a string.

    Characters outside the tokenizer's vocabulary raise one clear error before any work.
    ``use_cache``, ``exact_window``, ``keep``, ``progress``: as for :func:`generate`.
    ``stream``: called as ``stream(text)`` with each new character as soon as it is drawn
    (e.g. a function that writes it to the terminal).
    """
    if not prompt:
        raise UsageError("prompt must contain at least one character (try '\\n')")
    ids = tokenizer.encode(prompt)
    idx = backend.asarray(ids[None, :].astype("int64"))
    on_token = None if stream is None else (lambda nxt: stream(tokenizer.decode(nxt[:1])))
    out = generate(model, idx, max_new_tokens, temperature, top_k, rng=seed,
                   use_cache=use_cache, exact_window=exact_window, keep=keep, progress=progress,
                   on_token=on_token)
    return tokenizer.decode(backend.to_numpy(out[0]))
