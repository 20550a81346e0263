"""LoRA's config: which layers get ΔW = scaling · B A, at which rank, and how the factors start.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from minilora.config import ConfigError, JsonConfig, check_float, check_int, option

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
    real ``adapter_config.json`` (see :mod:`minilora.methods.lora.peft_io`).

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
            * ``"loftq"``: 4-bit bases only (:func:`minilora.methods.qlora.inject_qlora`): W0 is split
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
            ``m / ||W0 + scaling B A||_row · (W0 + scaling B A)`` (see :mod:`minilora.methods.lora.dora`).
            Linear targets only (not ``wte``), as a float base (not QLoRA).

    Chapter: chapters/04-lora-notes.ipynb
    """

    r: int = option(8, "rank of the update (A is (r, d_in))", range=(1, None))
    lora_alpha: float = option(8, "scaling = lora_alpha / r", flag="alpha",
                               range=(0, None, True, False))
    lora_dropout: float = option(0.0, "dropout on the adapter input", flag="dropout",
                                 range=(0, 1, False, True))
    target_modules: tuple = option(("q", "v"), "comma-separated layers to adapt: q,k,v,o,up,down,"
                                   "wte,lm_head or all-linear", flag="targets")
    use_rslora: bool = option(False, "scaling = lora_alpha / sqrt(r) (rsLoRA)", flag="rslora")
    init_lora_weights: object = option(True, "true (PEFT's) | false | gaussian | swap | pissa | "
                                       "loftq (qlora: LoftQ's split of W0 into Q + B A)",
                                       flag="init")
    bias: str = option("none", "biases trained with the factors", choices=LORA_BIAS_MODES)
    seed: int = option(0, "seed of the factors' and dropout's RNG", cli=False)
    use_dora: bool = option(False, "DoRA: magnitude m times the direction of W0 + BA (method "
                            "dora)", cli=False)

    def __post_init__(self):
        check_int("r", self.r)
        check_float("lora_alpha", self.lora_alpha, lo=0.0, lo_open=True)
        check_float("lora_dropout", self.lora_dropout, lo=0.0)
        if self.lora_dropout >= 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        object.__setattr__(self, "target_modules", normalize_lora_targets(self.target_modules))
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init in LORA_INITS)):
            raise ConfigError(f"init_lora_weights must be one of "
                              f"{', '.join(repr(v) for v in LORA_INITS)}; got {init!r}")
        if self.bias not in LORA_BIAS_MODES:
            raise ConfigError(f"bias must be one of {', '.join(map(repr, LORA_BIAS_MODES))}; "
                              f"got {self.bias!r}")
        check_int("seed", self.seed, lo=0)
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.use_dora and "wte" in self.target_modules:
            raise ConfigError("use_dora=True adapts Linear layers only; drop 'wte' from "
                              "target_modules (an embedding has no weight rows to normalise)")

    @property
    def scaling(self) -> float:
        """The factor in front of B A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def normalize_lora_targets(targets) -> tuple:
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


__all__ = ["LORA_ALL_LINEAR", "LORA_BIAS_MODES", "LORA_INITS", "LORA_TARGETS",
           "LORA_TARGET_ALIASES", "LoraConfig", "normalize_lora_targets"]


