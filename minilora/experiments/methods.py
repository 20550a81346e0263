"""The fine-tuning methods the harness knows: one setup function per method in :data:`METHODS`.

A setup function ``f(model, tokenizer, config or None) -> MethodSetup`` turns the freshly loaded
base model into the model to train (in place, or wrapped), and says how to save what it trained
and at which learning rates it trains by default. Adding a method = one function here + one line in
:data:`METHODS`; the layers themselves live in the library (``minilora.lora``, ``minilora.peft``,
``minilora.qlora``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, NamedTuple

from minilora.checkpoint import save_checkpoint
from minilora.config import LoraConfig, QuantConfig
from minilora.errors import UsageError
from minilora.io import atomic_write_text
from minilora.lora import (
    AdaLoraConfig,
    AdaLoraModel,
    export_adalora_peft,
    inject_lora,
    save_adapter,
)
from minilora.optim import loraplus_lr_scale
from minilora.peft import (
    CONFIGS,
    IA3Config,
    add_modules_to_save,
    apply_peft,
    inject_ia3,
    save_ia3,
    save_peft,
)
from minilora.peft.prefix import _GPTWrapper
from minilora.qlora import inject_qlora, save_qlora_adapter


class MethodSetup(NamedTuple):
    """What a fine-tuning method does to the freshly loaded base model.

    Attributes:
        model: the model to train (usually the base itself, modified in place; a method may wrap
            it, e.g. prompt tuning). It must offer ``forward(idx, check=...)``,
            ``forward_backward(x, y)``, ``named_trainable()`` and ``num_parameters()``.
        config: the method's options as a JSON-able dict (or None), recorded in ``result.json``.
        save: ``f(out_dir: Path, modules_to_save=())`` writing the trained weights (atomically)
            into ``out_dir``, with the whole modules at the paths ``modules_to_save`` in the same
            file; returns the file name written.
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

    def save(out: Path, modules_to_save=()) -> str:
        save_checkpoint(out / "model.safetensors", model, tok, extra={"finetune": True})
        return "model.safetensors"
    return MethodSetup(model, None, save, 1e-3, 1e-4)


def _setup_lora(model, tok, config) -> MethodSetup:

    config = config or LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    if not isinstance(config, LoraConfig):
        raise UsageError(f"method 'lora' needs a LoraConfig, got {type(config).__name__}")
    inject_lora(model, config)

    def save(out: Path, modules_to_save=()) -> str:
        save_adapter(out / "adapter.safetensors", model, config, modules_to_save)
        return "adapter.safetensors"
    return MethodSetup(model, config.to_dict(), save, 5e-3, 5e-4)


def setup_dora(model, tok, config):
    """``finetune`` method "dora": LoRA with ``use_dora=True`` (default r=8, alpha 16 on q, v, as
    method "lora"); the magnitude vectors are saved in the adapter file with the factors."""
    config = config or LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"), use_dora=True)
    if not isinstance(config, LoraConfig) or not config.use_dora:
        raise UsageError("method 'dora' needs a LoraConfig with use_dora=True")
    return _setup_lora(model, tok, config)


def setup_adalora(model, tok, config):
    """``finetune`` method "adalora": AdaLoRA on q, v; default init_r 12 -> target_r 8 (the
    average rank of method "lora"), lora_alpha 24 (c = 24/12 = 2 = LoRA's 16/8), warm-up 20 steps
    (tinit), final 40 steps at a fixed allocation (tfinal), pruning every 5 steps, total_step
    200 (the harness default; ``minilora finetune`` sets it to --steps). Saves the adapter in
    PEFT's AdaLoRA layout (``adalora/``: the kept triplets, ``rank_pattern`` in its config) and
    the final rank per layer in ``adalora_ranks.json`` and in the result's method_config."""
    config = config or AdaLoraConfig(init_r=12, target_r=8, lora_alpha=24,
                                     target_modules=("q", "v"), tinit=20, tfinal=40, deltaT=5,
                                     total_step=200)
    if not isinstance(config, AdaLoraConfig):
        raise UsageError(f"method 'adalora' needs an AdaLoraConfig, got {type(config).__name__}")
    wrapped = AdaLoraModel(model, config)
    summary = config.to_dict()

    def save(out: Path, modules_to_save=()) -> str:
        alloc = wrapped.allocator
        summary["final_ranks"] = alloc.ranks()
        summary["rank_history"] = [list(h) for h in alloc.history]
        export_adalora_peft(Path(out) / "adalora", wrapped, config, alloc.rank_pattern,
                            modules_to_save)
        atomic_write_text(Path(out) / "adalora_ranks.json",
                          json.dumps({"final_ranks": alloc.ranks(),
                                      "history": summary["rank_history"]}, indent=1) + "\n")
        return "adalora/adapter_model.safetensors"
    return MethodSetup(wrapped, summary, save, 5e-3, 5e-4)


def setup_ia3(model, tok, config):
    """``finetune`` method "ia3": (IA)³ vectors on k, v and the MLP's inner activation (PEFT's
    default); learning rate 1e-2 like BitFit (no sweep)."""
    config = config or IA3Config()
    if not isinstance(config, IA3Config):
        raise UsageError(f"method 'ia3' needs an IA3Config, got {type(config).__name__}")
    inject_ia3(model, config)

    def save(out: Path, modules_to_save=()) -> str:
        save_ia3(Path(out) / "ia3.safetensors", model, config, modules_to_save)
        return "ia3.safetensors"
    return MethodSetup(model, config.to_dict(), save, 1e-2, 1e-3)


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
    if isinstance(lora_cfg, LoraConfig) and lora_cfg.use_dora:
        raise UsageError("method 'qlora' does not combine with use_dora (DoRA needs the float W0 "
                         "to normalise); use method 'dora' on the float base")
    if not isinstance(lora_cfg, LoraConfig) or not isinstance(quant, QuantConfig):
        raise UsageError("method 'qlora' needs a LoraConfig or a (LoraConfig, QuantConfig) pair; "
                        f"got {type(config).__name__}")
    # the float base, kept for the harness's *_base figures: forgetting is measured from the
    # model one had before quantising (the 4-bit model at step 0 is reported as *_init)
    base = copy.deepcopy(model)
    report = inject_qlora(model, lora_cfg, quant)

    def save(out: Path, modules_to_save=()) -> str:
        save_qlora_adapter(out / "adapter.safetensors", model, lora_cfg, quant,
                           report["base_digest"], modules_to_save)
        return "adapter.safetensors"
    summary = {k: v for k, v in report.items() if k != "loftq"}
    if "loftq" in report:
        summary["loftq"] = {k: v for k, v in report["loftq"].items() if k != "layers"}
    return MethodSetup(model, {"lora": lora_cfg.to_dict(), "quant": quant.to_dict(),
                               "base": summary}, save, 5e-3, 5e-4, base_model=base)


# ----------------------------------------------------------------------------------------------
# the LoftQ residual study (results/quant/loftq_residuals.json)


#: default (lr, min_lr) of each method in the harness (200 steps of 8 x 128 on the base model).
#: adapter as LoRA; prefix and prompt move only a few vectors and want larger rates (each chosen
#: by one probe on Milton, recorded in BENCHMARKS.md "The other PEFT methods on Milton"; Lester
#: et al. use 0.3 with Adafactor); BitFit 1e-2 (no sweep).
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

    def save(out: Path, modules_to_save=()) -> str:
        save_peft(Path(out) / WEIGHTS_FILE[method], model, config, modules_to_save)
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




class Extras(NamedTuple):
    """What can be added to any method: ``finetune(method, task, Extras(config, ...))``.

    Attributes:
        config: the method's own config (or None for its default).
        modules_to_save: module names trained whole beside the method (PEFT's
            ``modules_to_save``, e.g. ``("lm_head",)``); saved inside the method's own file
            (``lm_head.modules_to_save.default.weight``; PEFT's layout in AdaLoRA's folder).
        loraplus_ratio: LoRA+: the B factors' learning rate is ratio x A's (methods with LoRA
            factors: lora, qlora, dora, adalora).
        modules_to_save_lr: peak learning rate of the saved modules (None: the method's, as in
            PEFT, where one optimizer trains everything); the schedule scales it like the rest.
        method_lr: the run's peak learning rate when it is not the method's default (a task
            recipe's or ``--lr``), so that ``modules_to_save_lr`` comes out right.
    """
    config: object = None
    modules_to_save: tuple = ()
    loraplus_ratio: float | None = None
    modules_to_save_lr: float | None = None
    method_lr: float | None = None


def _with_extras(setup_fn: Callable) -> Callable:
    """``setup_fn`` that also accepts an :class:`Extras` in place of its config."""

    def setup(model, tok, config):
        if not isinstance(config, Extras):
            return setup_fn(model, tok, config)
        extras = config
        lora_scale = (loraplus_lr_scale(extras.loraplus_ratio)  # checks the ratio first
                      if extras.loraplus_ratio is not None else None)
        for name in ("modules_to_save_lr", "method_lr"):
            v = getattr(extras, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise UsageError(f"{name} must be a finite number > 0, got {v!r}")
        if extras.modules_to_save and setup_fn is _setup_full:
            raise UsageError("method 'full' trains every module already; modules_to_save is "
                             "for the parameter-efficient methods")
        s = setup_fn(model, tok, extras.config)
        summary = dict(s.config or {})
        save = s.save
        if lora_scale is not None:
            if not any(n.endswith(".lora_B") for n, _, _ in s.model.named_trainable()):
                raise UsageError("loraplus_ratio sets the learning rate of LoRA B factors; this "
                                 "method has none (use lora, qlora, dora or adalora)")
            s.model.lr_scale = lora_scale
            summary["loraplus_ratio"] = float(extras.loraplus_ratio)
        if extras.modules_to_save:
            saved = add_modules_to_save(s.model, extras.modules_to_save)
            summary["modules_to_save"] = saved.paths
            if extras.modules_to_save_lr is not None:
                ratio = extras.modules_to_save_lr / (extras.method_lr or s.lr)
                names = set(saved.param_names)

                def lr_scale(name, _lora=lora_scale):
                    return (ratio if name in names else 1.0) * (_lora(name) if _lora else 1.0)
                s.model.lr_scale = lr_scale
                summary["modules_to_save_lr"] = float(extras.modules_to_save_lr)

            def save(out: Path, modules_to_save=(), _inner=s.save) -> str:
                return _inner(out, saved.paths)
        return s._replace(config=summary, save=save)
    setup.__doc__ = setup_fn.__doc__
    return setup


#: method name -> setup function ``f(model, tokenizer, config or Extras or None) -> MethodSetup``.
METHODS = {name: _with_extras(fn) for name, fn in {
    "full": _setup_full,
    "lora": _setup_lora,
    "qlora": setup_qlora,  # LoRA around a 4-bit (NF4) base; --init loftq
    "dora": setup_dora,  # LoRA with a magnitude per output unit (use_dora)
    "adalora": setup_adalora,  # SVD-form LoRA with an importance-scored rank budget
    # the other PEFT methods of the taxonomy (minilora.peft)
    "adapter": setup_adapter,
    "prefix": setup_prefix,
    "prompt": setup_prompt,
    "bitfit": setup_bitfit,
    "ia3": setup_ia3,  # rescaling vectors on k, v and the MLP's inner activation
}.items()}


def method_setup(method: str) -> Callable:
    """The setup function registered for ``method`` (one clear error for an unknown name)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method]
