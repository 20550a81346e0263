"""Configuration dataclasses, validated on construction and saved as JSON.

Field names follow nanoGPT (``n_layer``, ``n_head``, ``n_embd``, ``block_size``, ``vocab_size``)
so a reader can cross-read it. Unknown fields in a JSON file are an error, never silently dropped.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what is allowed."""


def _check_int(name, value, lo=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")


def _check_float(name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {value!r}")


class JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``save``/``load`` with unknown-field checking."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(known)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({e})") from None
        return cls.from_dict(d)


@dataclass(frozen=True)
class GPTConfig(JsonConfig):
    """The shape of the GPT.

    Attributes:
        vocab_size: V, number of token ids (97 for minilora's ASCII character vocabulary).
        block_size: the longest context T the model accepts (position-embedding rows).
        n_layer: number of transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: width C of the residual stream.
        bias: linear layers (and LayerNorms always) carry biases; BitFit needs them.
        init_std: std of the normal initialisation (GPT-2's 0.02); the residual output
            projections (``attn.o``, ``mlp.down``) use ``init_std / sqrt(2 n_layer)``.
    """

    vocab_size: int = 97
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _check_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        _check_float("init_std", self.init_std, lo=0.0, lo_open=True)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self) -> int:
        """Closed-form parameter count (checked against the model in the tests)."""
        V, T, L, C = self.vocab_size, self.block_size, self.n_layer, self.n_embd
        b = 1 if self.bias else 0
        per_block = (4 * C * C + 4 * C * b) + (8 * C * C + 4 * C * b + C * b) + 4 * C
        return V * C + T * C + L * per_block + 2 * C + V * C


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """How to train: optimiser, schedule, batch, logging and checkpoints.

    The learning rate follows a linear warmup for ``warmup_steps`` then a cosine decay to
    ``min_lr`` at ``max_steps`` (see :func:`minilora.optim.lr_at`).
    """

    max_steps: int = 1000
    batch_size: int = 16
    block_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 500
    seed: int = 1337
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "block_size", "eval_every", "eval_batches",
                     "ckpt_every"):
            _check_int(name, getattr(self, name))
        _check_int("warmup_steps", self.warmup_steps, lo=0)
        _check_int("seed", self.seed, lo=0)
        _check_float("lr", self.lr, lo=0.0, lo_open=True)
        _check_float("min_lr", self.min_lr, lo=0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        _check_float("weight_decay", self.weight_decay, lo=0.0)
        _check_float("beta1", self.beta1, lo=0.0, hi=1.0)
        _check_float("beta2", self.beta2, lo=0.0, hi=1.0)
        if self.beta1 >= 1.0 or self.beta2 >= 1.0:
            raise ConfigError("beta1 and beta2 must be < 1")
        _check_float("eps", self.eps, lo=0.0, lo_open=True)
        _check_float("grad_clip", self.grad_clip, lo=0.0)  # 0 disables clipping
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


__all__ = ["ConfigError", "GPTConfig", "TrainConfig", "JsonConfig", "field"]
