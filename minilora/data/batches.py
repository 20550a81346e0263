"""Training windows and labelled rows as NumPy ``int32`` arrays.

The language-model objective these arrays feed: for a window ``x = ids[s : s+T]`` the targets are
``y = ids[s+1 : s+T+1]``, i.e. ``y[b, t] = x[b, t+1]`` and the model learns
``p(ids[s+t+1] | ids[s : s+t+1])`` at every position ``t`` at once. Move batches to the active
backend with ``minilora.backend.asarray`` when training on a GPU.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import numpy as np

from minilora.data.text import CharTokenizer, DataError


def get_batch(ids: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``batch_size`` random windows of ``block_size`` tokens and their next tokens.

    With starts ``s_b ~ Uniform{0, ..., N - T - 1}`` (N = ``len(ids)``, T = ``block_size``):
    ``x[b] = ids[s_b : s_b + T]`` and ``y[b] = ids[s_b + 1 : s_b + T + 1]``, so
    ``y[:, :-1] == x[:, 1:]``.

    Args:
        ids: encoded corpus, shape ``(N,)``, with ``N >= T + 1``.
        batch_size: B, windows per batch.
        block_size: T, tokens per window (the model's context length).
        rng: the only source of randomness, so a seeded generator gives the same batches.

    Returns:
        ``(x, y)``, both int32 NumPy arrays of shape ``(B, T)``.

    Chapter: chapters/01-foundations.ipynb
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise DataError(f"ids must be 1-D (an encoded corpus), got shape {ids.shape}")
    if int(batch_size) < 1 or int(block_size) < 1:
        raise DataError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    n = len(ids)
    if n < block_size + 1:
        raise DataError(f"corpus has {n} tokens but a window needs block_size + 1 = "
                         f"{block_size + 1} (inputs plus the one next target); use a longer "
                         "corpus or a smaller block_size")
    starts = rng.integers(0, n - block_size, size=batch_size)  # (B,), high is exclusive
    index = starts[:, None] + np.arange(block_size)  # (B, T)
    x = ids[index].astype(np.int32, copy=False)  # (B, T)
    y = ids[index + 1].astype(np.int32, copy=False)  # (B, T)
    return x, y

def encode_classification(pairs, tokenizer: CharTokenizer, block_size: int,
                          lm_targets: bool = False):
    """Labelled examples -> fixed-length rows for a causal LM scored at one position.

    Each ``(text, label)`` becomes the characters of ``text + "\\t"``, cut to their last
    ``block_size`` and left-padded with newlines; the target row is ``-1`` (ignored by the loss)
    everywhere except the last position (the tab), whose target is the label's character. So
    the model learns, and is scored on, the character after the tab only.

    With ``lm_targets=True`` the text positions also get their next character as target
    (``Y[i, t] = X[i, t + 1]`` inside the text, the padding stays ``-1``): the label is still
    the target of the last position, and the rest is a language-modelling term on the text
    (weighted separately by :func:`minilora.experiments.tasks.label_lm_forward_backward`).

    Returns:
        ``(X, Y)``: int32 arrays of shape ``(n, block_size)``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    n = len(pairs)
    X = np.full((n, block_size), tokenizer.encode("\n")[0], dtype=np.int32)
    Y = np.full((n, block_size), -1, dtype=np.int32)
    for i, (text, label) in enumerate(pairs):
        ids = tokenizer.encode(text + "\t")[-block_size:]
        X[i, block_size - len(ids):] = ids
        if lm_targets:
            Y[i, block_size - len(ids):-1] = ids[1:]
        Y[i, -1] = tokenizer.encode(label)[0]
    return X, Y


def sample_rows(X: np.ndarray, Y: np.ndarray, batch_size: int, rng: np.random.Generator):
    """``batch_size`` rows drawn uniformly (with replacement) from ``(X, Y)``."""
    rows = rng.integers(0, len(X), size=batch_size)
    return X[rows], Y[rows]
