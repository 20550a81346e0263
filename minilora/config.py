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

from minilora.errors import MiniloraError


class ConfigError(MiniloraError, ValueError):
    """A configuration value is invalid; the message says which and what is allowed."""


def check_int(name, value, lo=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {value!r}")


def check_float(name, value, lo=None, hi=None, lo_open=False):
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
            check_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        check_float("init_std", self.init_std, lo=0.0, lo_open=True)

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
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, lo=0)
        check_int("seed", self.seed, lo=0)
        check_float("lr", self.lr, lo=0.0, lo_open=True)
        check_float("min_lr", self.min_lr, lo=0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        check_float("weight_decay", self.weight_decay, lo=0.0)
        check_float("beta1", self.beta1, lo=0.0, hi=1.0)
        check_float("beta2", self.beta2, lo=0.0, hi=1.0)
        if self.beta1 >= 1.0 or self.beta2 >= 1.0:
            raise ConfigError("beta1 and beta2 must be < 1")
        check_float("eps", self.eps, lo=0.0, lo_open=True)
        check_float("grad_clip", self.grad_clip, lo=0.0)  # 0 disables clipping
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")


def option(default, help: str, *, flag: str | None = None, range: tuple | None = None,
           choices: tuple | None = None, cli: bool = True):
    """A config field with what the command line needs to offer it: its help line, its flag name
    (default: the field's, ``_`` -> ``-``), its range ``(lo, hi, lo_open, hi_open)`` or choices;
    ``cli=False`` keeps it off the command line. ``minilora finetune``'s method flags are
    generated from these (a flag applies to a method exactly when its config has the field)."""
    meta = {"help": help, "cli": cli}
    if flag is not None:
        meta["flag"] = flag
    if range is not None:
        meta["range"] = tuple(range) + (False, False)[len(range) - 2:] if len(range) < 4 \
            else tuple(range)
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


__all__ = ["ConfigError", "GPTConfig", "JsonConfig", "TrainConfig", "check_float", "check_int",
           "field", "option"]


# ----------------------------------------------------------------------------------------------
# 4-bit base for QLoRA (see minilora/qlora.py and minilora/quant/)
# ----------------------------------------------------------------------------------------------
#: the named 4-bit codes (minilora.quant.nf4 holds their tables); a QuantState may also hold a
#: "custom" code
QUANT_TYPES = ("nf4", "fp4", "int4")


@dataclass(frozen=True)
class QuantConfig(JsonConfig):
    """How QLoRA stores the frozen base: which 4-bit code, block size, double quantisation.

    The names follow minilora's quant package (bitsandbytes / transformers names in brackets).

    Attributes:
        quant_type: 4-bit code table, ``"nf4"`` (QLoRA's), ``"fp4"`` (E2M1) or ``"int4"``
            [``bnb_4bit_quant_type``].
        blocksize: weights per absmax block (64, as bitsandbytes and the paper).
        double_quant: quantise the block scales to 8 bits as well, 4.127 instead of 4.5 bits
            per weight at blocksize 64 [``bnb_4bit_use_double_quant`` / ``compress_statistics``].
        loftq_iter: alternating steps T of the LoftQ initialisation (used only with
            ``init_lora_weights="loftq"``); PEFT's ``LoftQConfig(loftq_iter=1)`` default is T = 1.
        keep_dequantized: hold a float32 copy of every dequantised weight instead of rebuilding
            it in each forward and backward pass (faster; gives up the memory saving).
    """

    quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4 | int4"})
    blocksize: int = field(default=64, metadata={"help": "weights per absmax block"})
    double_quant: bool = field(default=True, metadata={"help": "8-bit block scales"})
    loftq_iter: int = field(default=5, metadata={"help": "LoftQ alternating steps T"})
    keep_dequantized: bool = field(default=False,
                                   metadata={"help": "cache the dequantised weights"})

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quant_type must be one of {', '.join(QUANT_TYPES)}; "
                              f"got {self.quant_type!r}")
        check_int("blocksize", self.blocksize)
        check_int("loftq_iter", self.loftq_iter)
        for name in ("double_quant", "keep_dequantized"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")


__all__ += ["QuantConfig"]
