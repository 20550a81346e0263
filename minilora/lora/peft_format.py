"""Export and import LoRA adapters in Hugging Face PEFT's on-disk format.

A PEFT LoRA adapter is a directory with two files:

* ``adapter_model.safetensors``: the factors, keyed ``base_model.model.<module path>.<tensor>``
  with no adapter name in the key (PEFT strips ``.default`` on save):

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

  (peft 0.21 writes a saved module under its own path and names it in the config's
  ``modules_to_save``; older PEFT wrote ``.modules_to_save.default.weight``, which is read too.)
  Our layouts are already PEFT's, so no tensor is transposed. A bias of an adapted layer lives
  under ``base_layer`` because inside PEFT the original layer becomes the wrapper's
  ``base_layer`` (read from PEFT's ``get_peft_model_state_dict``, not run here).
* ``adapter_config.json``: PEFT's ``LoraConfig`` fields (``peft_type "LORA"``, ``task_type
  "CAUSAL_LM"``, ``r``, ``lora_alpha``, ``target_modules``, ...).

Module paths are mapped from ours to a LLaMA-style PyTorch model by :data:`PEFT_MODULE_MAP`, so
that ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` is our
``blocks.0.attn.q.lora_A`` (the double ``model.`` is PEFT's wrapper attribute followed by the HF
model's own ``.model``):

==========================  ==========================================
minilora module             LLaMA-style module
==========================  ==========================================
``wte``                     ``model.embed_tokens``
``blocks.{i}.attn.q``       ``model.layers.{i}.self_attn.q_proj``
``blocks.{i}.attn.k``       ``model.layers.{i}.self_attn.k_proj``
``blocks.{i}.attn.v``       ``model.layers.{i}.self_attn.v_proj``
``blocks.{i}.attn.o``       ``model.layers.{i}.self_attn.o_proj``
``blocks.{i}.mlp.up``       ``model.layers.{i}.mlp.up_proj``
``blocks.{i}.mlp.down``     ``model.layers.{i}.mlp.down_proj``
``blocks.{i}.ln_1``         ``model.layers.{i}.input_layernorm``
``blocks.{i}.ln_2``         ``model.layers.{i}.post_attention_layernorm``
``ln_f``                    ``model.norm``
``lm_head``                 ``lm_head``
==========================  ==========================================

The names line up; the architectures do not (LLaMA has a gated MLP, RMSNorm and rotary
positions; our GPT has GELU, LayerNorm and ``wpe``), so the files are PEFT-shaped, not loadable
into a LLaMA checkpoint. Values PEFT does not know (our ``init_lora_weights="swap"`` and ``seed``)
are written as ``init_lora_weights: true`` in the JSON and kept exactly in the safetensors
metadata entry ``"minilora"``. A ``"pissa"`` adapter is relative to the residual base W0 - ΔW0:
importing it into a minilora model recomputes that residual from the same W0.

Each file is written atomically (temp file + ``os.replace``); the weights are written before the
config, so a crash never leaves a new config describing old weights.

Importing also accepts what PEFT adds with its default ``save_embedding_layers="auto"`` when an
embedding layer (``embed_tokens``, ``lm_head``) is a target: a full copy of that layer's base
weight, ``...embed_tokens.base_layer.weight``. It carries nothing new when it equals the base's
weight, so it is checked and dropped: compared in float64, every element must satisfy
``|saved - W| <= 2^-8 |W| + 1e-8`` (:data:`BASE_COPY_RTOL`: the rounding of a bfloat16 copy; a
float32 copy of our weights is exact). A copy that differs (a resized or trained embedding) is
refused, saying so: a trained full layer is imported only when the config names it in
``modules_to_save``.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from minilora import backend
from minilora.config import ConfigError, LoraConfig
from minilora.io import atomic_write_bytes, atomic_write_json, first_nonfinite
from minilora.lora.dora import DoRALinear
from minilora.lora.files import load_lora_state_dict, lora_state_dict
from minilora.lora.inject import lora_layers, prepare_for_adapter
from minilora.lora.layers import LoRAEmbedding, LoRAError, LoRALinear
from minilora.lora.peft_modules import check_base_copy, take_saved_modules
from minilora.lora.peft_names import (
    CONFIG_NAME,
    KEY_PREFIX,
    PEFT_MODULE_MAP,
    PEFT_TARGET_NAMES,
    UNSUPPORTED_KEYS,
    WEIGHTS_NAME,
    PeftFormatError,
    from_peft_module,
    read_peft_dir,
    to_peft_module,
)
from minilora.nn.modules_to_save import (
    load_saved_modules,
    modules_to_save_state_dict,
)


def peft_state_dict(model, bias: str = "none", modules_to_save=()) -> dict:
    """Our adapter tensors under PEFT's saved key names (see the module docstring's table);
    ``modules_to_save``: module paths whose every parameter is saved whole.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = lora_layers(model)
    out = {}
    for name, a in modules_to_save_state_dict(model, modules_to_save).items():
        module, _, tensor = name.rpartition(".")
        out[f"{KEY_PREFIX}{to_peft_module(module)}.{tensor}"] = a
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
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": [PEFT_TARGET_NAMES[t] for t in config.target_modules],
        "exclude_modules": None,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True if init == "swap" else init,
        "fan_in_fan_out": False,
        "lora_bias": False,
        "use_dora": config.use_dora,
        "modules_to_save": [to_peft_module(p) for p in modules_to_save] or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
        "loftq_config": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
    }


def export_peft(path_dir, model, config: LoraConfig, base_model_name_or_path=None,
                modules_to_save=()) -> Path:
    """Write ``model``'s adapter as a PEFT directory (``adapter_model.safetensors`` +
    ``adapter_config.json``); returns the directory.

    Args:
        path_dir: directory to create or overwrite the two files in.
        model: a model after :func:`minilora.lora.inject_lora`, not merged.
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
    tensors = {k: np.ascontiguousarray(backend.to_numpy(a))
               for k, a in peft_state_dict(model, config.bias, modules_to_save).items()}
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise LoRAError(f"export_peft: refusing to write {bad!r}: it holds NaN or inf")
    ours = {"init_lora_weights": config.init_lora_weights, "seed": config.seed}
    path_dir = Path(path_dir)
    data = save(tensors, metadata={"format": "pt", "minilora": json.dumps(ours)})
    atomic_write_bytes(path_dir / WEIGHTS_NAME, data)
    atomic_write_json(path_dir / CONFIG_NAME,
                      peft_config_dict(config, base_model_name_or_path, modules_to_save))
    return path_dir


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
    d, cfg_path, w_path = read_peft_dir(path_dir)
    try:
        with safe_open(str(w_path), framework="numpy") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError: truncated or not safetensors
        raise PeftFormatError(f"{str(w_path)!r} is truncated or not a safetensors file "
                              f"({type(e).__name__}: {e})") from None
    try:
        ours = json.loads(meta.get("minilora", "{}"))
    except json.JSONDecodeError:
        ours = {}
    bad = first_nonfinite(raw)
    if bad is not None:
        raise PeftFormatError(f"{str(w_path)!r}: tensor {bad!r} holds NaN or inf")
    config = _config_from_peft(d, ours, str(cfg_path))
    raw, saved_tensors, saved_paths = take_saved_modules(raw, d, cfg_path, w_path)
    arrays, kinds = {}, {}
    for key, a in raw.items():
        name, kind = _our_name(key, str(w_path))
        if kind == "base_copy":  # equal to the base (checked) or refused; nothing to load
            check_base_copy(name, a, model, str(w_path))
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


__all__ = ["PEFT_MODULE_MAP", "PEFT_TARGET_NAMES", "PeftFormatError", "export_peft", "import_peft",
           "peft_state_dict", "peft_config_dict", "to_peft_module", "from_peft_module",
           "WEIGHTS_NAME", "CONFIG_NAME"]
