"""The fine-tuning methods the harness knows: one setup function per method in :data:`METHODS`.

A setup function ``f(model, tokenizer, config or None) -> MethodSetup`` turns the freshly loaded
base model into the model to train (in place, or wrapped), and says how to save what it trained
and at which learning rates it trains by default. Adding a method = one function here + one line in
:data:`METHODS`; the layers themselves live in the library (``minilora.lora``, ``minilora.peft``,
``minilora.qlora``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, NamedTuple

from minilora.checkpoint import save_checkpoint
from minilora.config import LoraConfig, QuantConfig
from minilora.errors import UsageError
from minilora.lora import inject_lora, save_adapter
from minilora.peft import CONFIGS, apply_peft, save_peft
from minilora.peft.prefix import _GPTWrapper
from minilora.qlora import inject_qlora, save_qlora_adapter


class MethodSetup(NamedTuple):
    """What a fine-tuning method does to the freshly loaded base model.

    Attributes:
        model: the model to train (usually the base itself, modified in place; a method may wrap
            it, e.g. prompt tuning). It must offer ``forward(idx, check=...)``,
            ``forward_backward(x, y)``, ``named_trainable()`` and ``num_parameters()``.
        config: the method's options as a JSON-able dict (or None), recorded in ``result.json``.
        save: ``f(out_dir: Path)`` writing the trained weights (atomically) into ``out_dir``;
            returns the file name written.
        lr, min_lr: the method's default peak and final learning rates.
        base_model: the untouched base, for methods that leave it intact but change the outputs
            at step 0 (prefix / prompt tuning wrap it): the ``*_base`` figures are measured on
            it and the method's step-0 figures are reported as ``*_init``. None: ``model`` at
            step 0 is the base (LoRA's B = 0, zero-up adapters, BitFit).
    """
    model: object
    config: dict | None
    save: Callable
    lr: float
    min_lr: float
    base_model: object = None


def _setup_full(model, tok, config) -> MethodSetup:

    if config is not None:
        raise ValueError("method 'full' takes no method config (every parameter trains)")

    def save(out: Path) -> str:
        save_checkpoint(out / "model.safetensors", model, tok, extra={"finetune": True})
        return "model.safetensors"
    return MethodSetup(model, None, save, 1e-3, 1e-4)


def _setup_lora(model, tok, config) -> MethodSetup:

    config = config or LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    if not isinstance(config, LoraConfig):
        raise UsageError(f"method 'lora' needs a LoraConfig, got {type(config).__name__}")
    inject_lora(model, config)

    def save(out: Path) -> str:
        save_adapter(out / "adapter.safetensors", model, config)
        return "adapter.safetensors"
    return MethodSetup(model, config.to_dict(), save, 5e-3, 5e-4)


def setup_qlora(model, tok, config):
    """``finetune`` method "qlora": the float base quantised to 4 bits, LoRA around it.

    ``config`` is None (LoRA r=8, alpha 16 on q, v, as method "lora"; NF4 + double quant), a
    :class:`LoraConfig` (default QuantConfig), or a ``(LoraConfig, QuantConfig)`` pair.
    The float base is the harness's ``base_model``: ``*_base`` and ``forgetting`` are measured
    from it (as for LoRA), and the 4-bit model at step 0 is reported as ``*_init`` (plain QLoRA:
    the quantised base; LoftQ: dequant(Q) + scaling B A).
    """
    lora_cfg, quant = config if isinstance(config, tuple) else (config, None)
    lora_cfg = lora_cfg or LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    quant = quant or QuantConfig()
    if not isinstance(lora_cfg, LoraConfig) or not isinstance(quant, QuantConfig):
        raise UsageError("method 'qlora' needs a LoraConfig or a (LoraConfig, QuantConfig) pair; "
                        f"got {type(config).__name__}")
    # the float base, kept for the harness's *_base figures: forgetting is measured from the
    # model one had before quantising (the 4-bit model at step 0 is reported as *_init)
    base = copy.deepcopy(model)
    report = inject_qlora(model, lora_cfg, quant)

    def save(out: Path) -> str:
        save_qlora_adapter(out / "adapter.safetensors", model, lora_cfg, quant,
                           report["base_digest"])
        return "adapter.safetensors"
    summary = {k: v for k, v in report.items() if k != "loftq"}
    if "loftq" in report:
        summary["loftq"] = {k: v for k, v in report["loftq"].items() if k != "layers"}
    return MethodSetup(model, {"lora": lora_cfg.to_dict(), "quant": quant.to_dict(),
                               "base": summary}, save, 5e-3, 5e-4, base_model=base)


# ----------------------------------------------------------------------------------------------
# the LoftQ residual study (results/quant/loftq_residuals.json)


#: default (lr, min_lr) of each method in the harness (200 steps of 8 x 128 on the base model).
#: adapter as LoRA; prefix and prompt move only a few vectors and want more (one probe each on
#: Milton: prefix 1e-2 -> 3e-2 took the test loss 1.827 -> 1.748, prompt 3e-2 -> 1e-1 took
#: 1.827 -> 1.820; Lester et al. use 0.3 with Adafactor); BitFit 1e-2 (no sweep).
DEFAULT_LR = {"adapter": (5e-3, 5e-4), "prefix": (3e-2, 3e-3), "prompt": (1e-1, 1e-2),
              "bitfit": (1e-2, 1e-3)}
WEIGHTS_FILE = {"adapter": "houlsby.safetensors", "prefix": "prefix.safetensors",
                "prompt": "prompt.safetensors", "bitfit": "bitfit.safetensors"}


def _setup(method: str, model, config):
    cls = CONFIGS[method]
    config = cls() if config is None else config
    if isinstance(config, dict):
        config = cls.from_dict(config)
    if not isinstance(config, cls):
        raise UsageError(f"method {method!r} needs a {cls.__name__}, got {type(config).__name__}")
    model = apply_peft(model, config)

    def save(out: Path) -> str:
        save_peft(Path(out) / WEIGHTS_FILE[method], model, config)
        return WEIGHTS_FILE[method]

    lr, min_lr = DEFAULT_LR[method]
    # prefix / prompt: the wrapped GPT is the untouched base (its outputs differ at step 0)
    base = model.gpt if isinstance(model, _GPTWrapper) else None
    return MethodSetup(model, config.to_dict(), save, lr, min_lr, base)


def setup_adapter(model, tok, config):
    """Harness setup for Houlsby adapters (default bottleneck 16 after attn.o and mlp.down)."""
    return _setup("adapter", model, config)


def setup_prefix(model, tok, config):
    """Harness setup for prefix tuning (default P = 16, "vocab" init)."""
    return _setup("prefix", model, config)


def setup_prompt(model, tok, config):
    """Harness setup for prompt tuning (default P = 16, "vocab" init)."""
    return _setup("prompt", model, config)


def setup_bitfit(model, tok, config):
    """Harness setup for BitFit (Linear and LayerNorm biases)."""
    return _setup("bitfit", model, config)




#: method name -> setup function ``f(model, tokenizer, config or None) -> MethodSetup``.
METHODS = {
    "full": _setup_full,
    "lora": _setup_lora,
    "qlora": setup_qlora,  # LoRA around a 4-bit (NF4) base; --init loftq
    # the other PEFT methods of the taxonomy (minilora.peft)
    "adapter": setup_adapter,
    "prefix": setup_prefix,
    "prompt": setup_prompt,
    "bitfit": setup_bitfit,
}


def method_setup(method: str) -> Callable:
    """The setup function registered for ``method`` (one clear error for an unknown name)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method]
