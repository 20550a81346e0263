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


# ----------------------------------------------------------------------------------------------
# LoRA (appended by the "LoRA family" work; see minilora/lora.py)
# ----------------------------------------------------------------------------------------------
#: The layers of our GPT that LoRA can adapt, by the last component of their module name.
LORA_TARGETS = ("q", "k", "v", "o", "up", "down", "wte", "lm_head")

#: PEFT / LLaMA-style names accepted as aliases in ``target_modules`` (mapped to ours).
LORA_TARGET_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                       "up_proj": "up", "down_proj": "down", "embed_tokens": "wte"}

#: PEFT's shorthand for "every linear layer except the output head".
LORA_ALL_LINEAR = ("q", "k", "v", "o", "up", "down")

LORA_INITS = (True, False, "gaussian", "swap", "pissa", "loftq")
LORA_BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class LoraConfig(JsonConfig):
    """Which layers get a low-rank update ΔW = scaling · B A, and how it starts.

    Field names and meanings follow Hugging Face PEFT's ``LoraConfig``, so the fields map onto a
    real ``adapter_config.json`` (see :mod:`minilora.lora.peft_io`).

    scaling = lora_alpha / r              (``use_rslora=False``, LoRA's original choice)
    scaling = lora_alpha / sqrt(r)        (``use_rslora=True``, rank-stabilised LoRA)

    Attributes:
        r: rank of the update; A is (r, d_in), B is (d_out, r). Must be an int >= 1.
        lora_alpha: numerator of ``scaling`` (PEFT's default 8).
        lora_dropout: dropout probability on the adapter's input x (Linear targets only; PEFT
            applies none to embeddings). In [0, 1).
        target_modules: names of the layers to adapt, matched against the last component of the
            module name: ``q, k, v, o, up, down, wte, lm_head``. PEFT / LLaMA spellings
            (``q_proj`` ... ``down_proj``, ``embed_tokens``) are accepted and mapped to ours;
            ``"all-linear"`` means ``q, k, v, o, up, down`` (as PEFT, not the output head).
        use_rslora: use ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        init_lora_weights: how A and B start (Linear layout A (r, d_in), B (d_out, r)):

            * ``True`` (PEFT's default): A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), the Kaiming-uniform
              init with a = sqrt(5) that ``torch.nn.Linear`` uses; B = 0. ΔW = 0 at step 0.
            * ``"gaussian"``: A ~ N(0, std = 1/r), B = 0 (PEFT's meaning of the std).
            * ``"swap"`` (minilora only): A = 0, B ~ U(-1/sqrt(r), 1/sqrt(r)). ΔW is still 0 at
              step 0, but now dL/dB = 0 and only A moves on the first step (the mirror of the
              default, where dL/dA = 0 and only B moves).
            * ``"pissa"``: A, B from the top-r singular triplets of W0, which is replaced by the
              residual W0 - scaling · B A, so the layer's output is unchanged at step 0.
            * ``"loftq"``: 4-bit bases only (:func:`minilora.qlora.inject_qlora`): W0 is split
              into NF4 codes Q plus scaling · B A by alternating quantisation and a truncated
              SVD of the residual (LoftQ), so Q + scaling · B A is closer to W0 than Q alone.
            * ``False``: PEFT's debug setting: both factors keep a random ``nn.Linear``-style init
              (A as above, B ~ U(-1/sqrt(r), 1/sqrt(r))), so ΔW != 0 from the start.

            Embeddings follow PEFT's reversed convention (``True``/``"gaussian"``: A = 0,
            B ~ N(0, 1); ``"swap"``: A ~ N(0, 1), B = 0; ``False``: both N(0, 1)).
        bias: ``"none"`` trains no bias; ``"all"`` trains every bias of the model (LayerNorm
            biases too), ``"lora_only"`` trains the biases of the adapted layers. A trained bias
            changes the base model's behaviour even with the adapter switched off, and is saved
            with the adapter.
        seed: seeds the CPU generator that draws the factors and the dropout masks.
        use_dora: DoRA (Liu et al. 2024): each adapted Linear also gets a trainable magnitude
            vector m (d_out,), initialised to the row norms of W0 + scaling · B A, and computes
            ``m / ||W0 + scaling B A||_row · (W0 + scaling B A)`` (see :mod:`minilora.lora.dora`).
            Linear targets only (not ``wte``), as a float base (not QLoRA).

    Chapter: chapters/04-lora-notes.ipynb
    """

    r: int = field(default=8, metadata={"help": "rank of the update (A is (r, d_in))"})
    lora_alpha: float = field(default=8, metadata={"help": "scaling = lora_alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: tuple = field(default=("q", "v"),
                                  metadata={"help": "layer names to adapt (last name component)"})
    use_rslora: bool = field(default=False,
                             metadata={"help": "scaling = lora_alpha / sqrt(r) (rsLoRA)"})
    init_lora_weights: object = field(default=True,
                                      metadata={"help": "True | False | gaussian | swap | pissa | "
                                                        "loftq (4-bit bases only)"})
    bias: str = field(default="none", metadata={"help": "none | all | lora_only"})
    seed: int = field(default=0, metadata={"help": "seed of the factors' and dropout's RNG"})
    use_dora: bool = field(default=False,
                           metadata={"help": "DoRA: magnitude m times the direction of W0 + BA"})

    def __post_init__(self):
        _check_int("r", self.r)
        _check_float("lora_alpha", self.lora_alpha, lo=0.0, lo_open=True)
        _check_float("lora_dropout", self.lora_dropout, lo=0.0)
        if self.lora_dropout >= 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        object.__setattr__(self, "target_modules", _normalize_lora_targets(self.target_modules))
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init in LORA_INITS)):
            raise ConfigError(f"init_lora_weights must be one of "
                              f"{', '.join(repr(v) for v in LORA_INITS)}; got {init!r}")
        if self.bias not in LORA_BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(map(repr, LORA_BIAS_MODES))}; "
                              f"got {self.bias!r}")
        _check_int("seed", self.seed, lo=0)
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.use_dora and "wte" in self.target_modules:
            raise ConfigError("use_dora=True adapts Linear layers only; drop 'wte' from "
                              "target_modules (an embedding has no weight rows to normalise)")

    @property
    def scaling(self) -> float:
        """The factor in front of B A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _normalize_lora_targets(targets) -> tuple:
    """Map ``target_modules`` to a tuple of our names (aliases resolved, duplicates dropped)."""
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (tuple, list)) or not targets:
        raise ConfigError(f"target_modules must be a non-empty list of layer names from "
                          f"{list(LORA_TARGETS)}; got {targets!r}")
    out = []
    for t in targets:
        if t == "all-linear":
            names = LORA_ALL_LINEAR
        elif isinstance(t, str) and t in LORA_TARGETS:
            names = (t,)
        elif isinstance(t, str) and t in LORA_TARGET_ALIASES:
            names = (LORA_TARGET_ALIASES[t],)
        else:
            raise ConfigError(
                f"unknown target module {t!r}; allowed: {', '.join(LORA_TARGETS)}, the PEFT "
                f"aliases {', '.join(LORA_TARGET_ALIASES)}, or 'all-linear'")
        out += [n for n in names if n not in out]
    return tuple(out)


__all__ += ["LoraConfig", "LORA_TARGETS", "LORA_TARGET_ALIASES"]


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
        _check_int("blocksize", self.blocksize)
        _check_int("loftq_iter", self.loftq_iter)
        for name in ("double_quant", "keep_dequantized"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")


__all__ += ["QuantConfig"]
