"""What every PEFT method here shares: two small helpers (the error class, PeftError, lives in
minilora.errors).

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from minilora.model import GPT


def _truncated_normal(rng, shape, std):
    """N(0, std^2) redrawn until inside +-2 std (TensorFlow's truncated_normal), CPU float64."""
    a = rng.standard_normal(shape)
    bad = abs(a) > 2.0
    while bad.any():
        a[bad] = rng.standard_normal(int(bad.sum()))
        bad = abs(a) > 2.0
    return a * std

def _check_gpt(gpt, what: str) -> None:

    if not isinstance(gpt, GPT):
        raise TypeError(f"{what} wraps a minilora GPT, got {type(gpt).__name__}")
