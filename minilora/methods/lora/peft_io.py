"""LoRA adapters to and from Hugging Face PEFT's directory format (names, constants, the config
reader and the directory itself: :mod:`minilora.peft_format`).

The tensors of a LoRA adapter under PEFT's keys (``base_model.model.<LLaMA-style path>.<suffix>``):

==============================  =========================================  ==============
our tensor                      PEFT key suffix                            shape
==============================  =========================================  ==============
Linear ``lora_A``               ``.lora_A.weight``                         (r, d_in)
Linear ``lora_B``               ``.lora_B.weight``                         (d_out, r)
Embedding ``lora_A``            ``.lora_embedding_A`` (no ``.weight``)     (r, V)
Embedding ``lora_B``            ``.lora_embedding_B`` (no ``.weight``)     (C, r)
DoRA ``lora_magnitude_vector``  ``.lora_magnitude_vector`` (no ``.weight``)  (d_out,)
bias of an adapted layer        ``.base_layer.bias``                       (d_out,)
any other bias (bias="all")     ``.bias``                                  (C,)
a ``modules_to_save`` module    its own names: ``lm_head`` -> ``.weight``  as in the base
==============================  =========================================  ==============

Our layouts are already PEFT's, so no tensor is transposed. A bias of an adapted layer lives
under ``base_layer`` because inside PEFT the original layer becomes the wrapper's
``base_layer``. The config holds PEFT's ``LoraConfig`` fields (``peft_type "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ...). Values PEFT does not know (our
``init_lora_weights="swap"`` and ``seed``) are written as ``init_lora_weights: true`` in the JSON
and kept exactly in the safetensors metadata entry ``"minilora"``. A ``"pissa"`` adapter is
relative to the residual base W0 - ΔW0: importing it into a minilora model recomputes that
residual from the same W0.

Importing also accepts what PEFT adds with its default ``save_embedding_layers="auto"`` when an
embedding layer is a target: a full copy of that layer's base weight, checked against ours and
dropped (:func:`minilora.peft_format.check_base_copy`); a copy that differs is refused: a
trained full layer is imported only when the config names it in ``modules_to_save``.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from minilora import backend
from minilora.config import ConfigError
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora.dora import DoRALinear
from minilora.methods.lora.files import load_lora_state_dict, lora_state_dict
from minilora.methods.lora.inject import lora_layers, prepare_for_adapter
from minilora.methods.lora.layers import LoRAEmbedding, LoRAError, LoRALinear
from minilora.nn.modules_to_save import (
    load_saved_modules,
    modules_to_save_state_dict,
)
from minilora.peft_format import (
    KEY_PREFIX,
    PeftFormatError,
    check_base_copy,
    from_peft_module,
    peft_config,
    read_peft_dir,
    saved_modules_peft_tensors,
    take_saved_modules,
    to_peft_module,
    write_peft_dir,
)

#: PEFT config fields that must keep their default for the adapter to mean what we compute
UNSUPPORTED_KEYS = {"fan_in_fan_out": False, "lora_bias": False,
                    "rank_pattern": {}, "alpha_pattern": {},
                    "layers_to_transform": None, "layer_replication": None}


def peft_state_dict(model, bias: str = "none", modules_to_save=()) -> dict:
    """Our adapter tensors under PEFT's saved key names (see the module docstring's table);
    ``modules_to_save``: module paths whose every parameter is saved whole.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = lora_layers(model)
    out = saved_modules_peft_tensors(modules_to_save_state_dict(model, modules_to_save))
    for name, a in lora_state_dict(model, bias).items():
        module, _, tensor = name.rpartition(".")
        peft = KEY_PREFIX + to_peft_module(module)
        layer = layers.get(module)
        if tensor == "bias":
            key = f"{peft}.base_layer.bias" if layer is not None else f"{peft}.bias"
        elif isinstance(layer, LoRAEmbedding):
            key = f"{peft}.lora_embedding_{tensor[-1]}"
        elif tensor == "lora_magnitude_vector":  # DoRA: a Parameter, no ".weight"
            key = f"{peft}.{tensor}"
        else:
            key = f"{peft}.{tensor}.weight"
        out[key] = a
    return out


def peft_config_dict(config: LoraConfig, base_model_name_or_path=None,
                     modules_to_save=()) -> dict:
    """The ``adapter_config.json`` object for ``config`` (PEFT field names and defaults).

    Chapter: chapters/04-lora-notes.ipynb
    """
    init = config.init_lora_weights
    return peft_config("LORA", {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True if init == "swap" else init,
        "lora_bias": False,
        "use_dora": config.use_dora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
        "loftq_config": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
    }, config.target_modules, modules_to_save, base_model_name_or_path)


def export_peft(path_dir, model, config: LoraConfig, base_model_name_or_path=None,
                modules_to_save=()) -> Path:
    """Write ``model``'s adapter as a PEFT directory (``adapter_model.safetensors`` +
    ``adapter_config.json``); returns the directory.

    Args:
        path_dir: directory to create or overwrite the two files in.
        model: a model after :func:`minilora.methods.lora.inject_lora`, not merged.
        config: the :class:`LoraConfig` it was injected with.
        base_model_name_or_path: written into the config (PEFT's field; None is PEFT's default).
        modules_to_save: module paths (``lm_head``, ``ln_f``) saved whole beside the factors
            (:mod:`minilora.nn.modules_to_save`), named in the config as PEFT does.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("export_peft: the model has no LoRA layers")
    if any(m.merged for m in layers.values()):
        raise LoRAError("export_peft: LoRA layers are merged; unmerge_lora(model) first")
    if {n.rsplit(".", 1)[-1] for n in layers} != set(config.target_modules):
        raise LoRAError(f"export_peft: the model's LoRA layers {list(layers)[:4]} do not match "
                        f"config.target_modules {list(config.target_modules)}")
    tensors = {k: backend.to_numpy(a)
               for k, a in peft_state_dict(model, config.bias, modules_to_save).items()}
    ours = {"init_lora_weights": config.init_lora_weights, "seed": config.seed}
    try:
        return write_peft_dir(path_dir, tensors,
                              peft_config_dict(config, base_model_name_or_path, modules_to_save),
                              {"minilora": json.dumps(ours)})
    except PeftFormatError as e:
        raise LoRAError(f"export_peft: {e}") from None


def _config_from_peft(d: dict, ours: dict, where: str) -> LoraConfig:
    """A :class:`LoraConfig` from an ``adapter_config.json`` object; unknown keys are ignored
    (as PEFT does), features minilora does not implement are refused."""
    if d.get("peft_type") != "LORA":
        raise PeftFormatError(f"{where}: peft_type is {d.get('peft_type')!r}; only 'LORA' "
                              "adapters can be imported")
    for key, default in UNSUPPORTED_KEYS.items():
        if d.get(key):  # every supported value is empty: False, None, {} or []
            raise PeftFormatError(f"{where}: {key}={d[key]!r} is not supported by minilora "
                                  f"(only {default!r})")
    targets = d.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise PeftFormatError(f"{where}: target_modules is the regex {targets!r}; give a list of "
                              "module names")
    init = ours.get("init_lora_weights", d.get("init_lora_weights", True))
    try:
        return LoraConfig(r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8),
                          lora_dropout=d.get("lora_dropout", 0.0),
                          target_modules=tuple(targets) if isinstance(targets, list) else targets,
                          use_rslora=d.get("use_rslora", False), init_lora_weights=init,
                          bias=d.get("bias", "none"), seed=ours.get("seed", 0),
                          use_dora=bool(d.get("use_dora", False)))
    except ConfigError as e:
        raise PeftFormatError(f"{where}: {e}") from None


def _our_name(key: str, where: str) -> tuple[str, str]:
    """PEFT key -> (our parameter name, kind), kind in {'linear', 'embedding', 'bias',
    'base_copy'} ('base_copy': a full copy of an adapted layer's base weight, written by PEFT's
    ``save_embedding_layers``)."""
    if not key.startswith(KEY_PREFIX):
        raise PeftFormatError(f"{where}: key {key!r} does not start with {KEY_PREFIX!r}")
    rest = key[len(KEY_PREFIX):]
    for suffix, tensor, kind in ((".lora_A.weight", "lora_A", "linear"),
                                 (".lora_B.weight", "lora_B", "linear"),
                                 (".lora_embedding_A", "lora_A", "embedding"),
                                 (".lora_embedding_B", "lora_B", "embedding"),
                                 (".lora_magnitude_vector", "lora_magnitude_vector", "magnitude"),
                                 (".base_layer.bias", "bias", "bias"),
                                 (".base_layer.weight", "weight", "base_copy"),
                                 (".bias", "bias", "bias")):
        if rest.endswith(suffix):
            try:
                module = from_peft_module(rest[: -len(suffix)])
            except PeftFormatError as e:
                raise PeftFormatError(f"{where}: key {key!r}: {e}") from None
            return f"{module}.{tensor}", kind
    raise PeftFormatError(f"{where}: key {key!r} is not a LoRA factor, a DoRA magnitude, a bias "
                          "or a module named in modules_to_save (lora_bias is not supported)")


def import_peft(path_dir, model, return_modules: bool = False):
    """Load a PEFT LoRA directory into ``model``; returns the adapter's :class:`LoraConfig`
    (with ``return_modules``: ``(config, the module paths saved whole)``, which a caller that
    writes the adapter again must pass on).

    A model without LoRA layers is injected with the file's config first; one that has them must
    have exactly the file's targets. Keys, kinds (Linear vs embedding factors), shapes and the
    config are checked with one clear error each before any weight is written.

    Chapter: chapters/04-lora-notes.ipynb
    """
    d, raw, meta, cfg_path, w_path = read_peft_dir(path_dir, ("LORA",))
    try:
        ours = json.loads(meta.get("minilora", "{}"))
    except json.JSONDecodeError:
        ours = {}
    config = _config_from_peft(d, ours, str(cfg_path))
    raw, saved_tensors, saved_paths = take_saved_modules(raw, d, str(cfg_path))
    arrays, kinds = {}, {}
    for key, a in raw.items():
        name, kind = _our_name(key, str(w_path))
        if kind == "base_copy":  # equal to the base (checked) or refused; nothing to load
            ours_w = dict(model.named_parameters()).get(name)
            check_base_copy(name, a, None if ours_w is None else backend.to_numpy(ours_w),
                            str(w_path))
            continue
        arrays[name], kinds[name] = a, kind
    saved_targets = sorted({n.rsplit(".", 2)[-2] for n, k in kinds.items() if k != "bias"})
    if saved_targets != sorted(config.target_modules):
        raise PeftFormatError(f"{str(path_dir)!r}: the weights adapt {saved_targets} but "
                              f"target_modules says {sorted(config.target_modules)}")
    prepare_for_adapter(model, config)
    layers = lora_layers(model)
    for name, kind in kinds.items():
        layer = layers.get(name.rpartition(".")[0])
        if kind == "magnitude" and not isinstance(layer, DoRALinear):
            raise PeftFormatError(f"{str(w_path)!r}: {name!r} is a DoRA magnitude but the config "
                                  "has use_dora=false: not a LoRA factor of this adapter")
        want = {"linear": LoRALinear, "embedding": LoRAEmbedding,
                "magnitude": DoRALinear}.get(kind)
        if want is not None and not isinstance(layer, want):
            raise PeftFormatError(f"{str(w_path)!r}: {name!r} is stored as a {kind} factor but "
                                  f"the model's layer there is "
                                  f"{type(layer).__name__ if layer else 'not a LoRA layer'}")
    missing = [f"{n}.lora_magnitude_vector" for n, m in layers.items()
               if isinstance(m, DoRALinear) and f"{n}.lora_magnitude_vector" not in arrays]
    if missing:
        raise PeftFormatError(f"{str(w_path)!r}: the config has use_dora=true but the file holds "
                              f"no lora_magnitude_vector for {missing[:4]}")
    if saved_paths:
        load_saved_modules(model, saved_paths, saved_tensors, str(w_path), error=PeftFormatError)
    load_lora_state_dict(model, arrays)
    return (config, saved_paths) if return_modules else config


__all__ = ["UNSUPPORTED_KEYS", "export_peft", "import_peft", "peft_config_dict",
           "peft_state_dict"]
