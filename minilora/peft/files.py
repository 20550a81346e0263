"""One entry point per idea for every PEFT method here: apply, trainable set, count, save, load.

    model = apply_peft(base_gpt, AdapterConfig(bottleneck=16))   # or PrefixConfig(prefix_len=16),
    ...train model...                                            #    PromptConfig, BitFitConfig
    save_peft("houlsby.safetensors", model, config)              # the small tensors + the config
    model2, config = load_peft("houlsby.safetensors", fresh_base_gpt)

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from minilora import backend
from minilora.config import GPTConfig
from minilora.errors import PeftError
from minilora.io import (
    CheckpointError,
    check_same_base,
    config_from_meta,
    read_typed,
    write_typed,
)
from minilora.nn.layers import Module
from minilora.nn.modules_to_save import (
    check_saved_modules,
    load_saved_modules,
    saved_modules_tensors,
    split_saved_modules,
)
from minilora.peft.bitfit import BitFitConfig, apply_bitfit, bitfit_trainable
from minilora.peft.houlsby import AdapterConfig, adapter_trainable, inject_adapters
from minilora.peft.prefix import (
    PrefixConfig,
    PromptConfig,
    _GPTWrapper,
    add_prefix,
    add_prompt,
)

PEFT_FORMAT = "minilora-peft-v1"

CONFIGS = {"adapter": AdapterConfig, "prefix": PrefixConfig, "prompt": PromptConfig,
           "bitfit": BitFitConfig}


def _method_of(config) -> str:
    for name, cls in CONFIGS.items():
        if isinstance(config, cls):
            return name
    raise TypeError(f"config must be one of {', '.join(c.__name__ for c in CONFIGS.values())}; "
                    f"got {type(config).__name__}")

def _trainable_predicate(config, model: Module | None = None):
    """name -> bool: the parameters a method trains (and saves)."""
    if isinstance(config, AdapterConfig):
        return adapter_trainable(config)
    if isinstance(config, PrefixConfig):
        return lambda name: name.startswith("prefix.")
    if isinstance(config, PromptConfig):
        return lambda name: name.startswith("prompt.")
    if isinstance(config, BitFitConfig):
        return bitfit_trainable(config, model)
    raise TypeError(f"not a PEFT method config: {type(config).__name__}")


def apply_peft(model, config):
    """Apply the method ``config`` stands for to a GPT; returns the model to train (the same
    object for adapters and BitFit, a wrapper for prefix and prompt tuning).

    Chapter: chapters/04-lora-notes.ipynb
    """
    method = _method_of(config)
    if method == "adapter":
        inject_adapters(model, config)
        return model
    if method == "bitfit":
        apply_bitfit(model, config)
        return model
    return add_prefix(model, config) if method == "prefix" else add_prompt(model, config)


def count_peft_parameters(config, model_config: GPTConfig) -> int:
    """Closed-form number of trainable parameters of ``apply_peft(GPT(model_config), config)``.

    adapter: n_adapters (2 m C + C + m), n_adapters = L len(targets)   (Houlsby: 2md + d + m)
             + L 2 (2C) + 2C with train_layernorm (gain and bias of ln_1, ln_2 per block, ln_f)
    prefix:  2 L P C                                                     (key and value per layer)
    prompt:  P C
    bitfit:  L (4C [q,k,v,o] + 4C [up] + C [down]) if the Linears have biases,
             + L 2C + C with layernorm (the biases of ln_1, ln_2, ln_f)

    Chapter: chapters/04-lora-notes.ipynb
    """
    L, C = model_config.n_layer, model_config.n_embd
    method = _method_of(config)
    if method == "adapter":
        m = config.bottleneck
        n = L * len(config.targets) * (2 * m * C + C + m)
        return n + (L * 2 * 2 * C + 2 * C if config.train_layernorm else 0)
    if method == "prefix":
        return 2 * L * config.prefix_len * C
    if method == "prompt":
        return config.prompt_len * C
    n = L * (4 * C + 4 * C + C) if model_config.bias else 0
    return n + (L * 2 * C + C if config.layernorm else 0)


def _base_gpt(model):
    return model.gpt if isinstance(model, _GPTWrapper) else model


def peft_state_dict(model, config) -> dict:
    """The method's tensors by parameter name (the arrays themselves, on the active backend)."""
    pred = _trainable_predicate(config, model)
    return {n: p for n, p in model.named_parameters() if pred(n)}


def save_peft(path, model, config, modules_to_save=()) -> None:
    """Write only the method's small tensors (safetensors) with a JSON header holding the
    method, its config and the base model's config; atomic (:func:`minilora.io.write_typed`).
    ``modules_to_save``: module paths trained whole beside the method, stored in the same file
    (:mod:`minilora.nn.modules_to_save`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    method = _method_of(config)
    arrays = peft_state_dict(model, config)
    if not arrays:
        raise PeftError(f"save_peft: the model holds no {method} parameters; apply the method "
                        "first (apply_peft)")
    meta = {"method": method, "config": config.to_dict(),
            "model_config": _base_gpt(model).config.to_dict(),
            "modules_to_save": list(modules_to_save)}
    write_typed(path, PEFT_FORMAT, {**arrays, **saved_modules_tensors(model, modules_to_save)},
                meta)


def load_peft(path, model, allow_nonfinite: bool = False):
    """Apply a file from :func:`save_peft` to a fresh base GPT; returns ``(model, config)``, where
    ``model`` is what :func:`apply_peft` returns (a wrapper for prefix / prompt tuning).

    The saved base shape must match (vocab_size, n_embd, n_layer, n_head, bias); every saved name
    must be one of the method's parameters with the same shape; all are checked before anything
    is written. Saved whole modules (``modules_to_save``) are copied in last and stay trainable.

    Chapter: chapters/04-lora-notes.ipynb
    """
    arrays, meta = read_typed(path, PEFT_FORMAT, "PEFT file", allow_nonfinite)
    method = meta.get("method")
    if method not in CONFIGS:
        raise CheckpointError(f"{str(path)!r}: unknown PEFT method {method!r}; allowed: "
                              f"{', '.join(CONFIGS)}")
    config = config_from_meta(path, meta, "config", CONFIGS[method], f"{method} file")
    check_same_base(path, meta.get("model_config"), model.config, error=PeftError)
    arrays, saved, paths = split_saved_modules(arrays)
    model = apply_peft(model, config)
    slots = {n: (m, k) for n, m, k in model._slots()}
    wanted = peft_state_dict(model, config)
    unexpected = sorted(set(arrays) - set(wanted))
    missing = sorted(set(wanted) - set(arrays))
    if unexpected or missing:
        raise PeftError(f"{str(path)!r} does not match the {method} parameters of this model: "
                        f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for n, a in arrays.items():
        if tuple(a.shape) != tuple(wanted[n].shape):
            raise PeftError(f"{str(path)!r}: tensor {n!r} has shape {tuple(a.shape)}, the model's "
                            f"is {tuple(wanted[n].shape)}")
    check_saved_modules(model, paths, saved, str(path))   # before any write
    for n, a in arrays.items():
        m, k = slots[n]
        m.params[k] = backend.asarray(a, dtype=m.params[k].dtype)
    if paths:
        load_saved_modules(model, paths, saved, str(path))
    return model, config
