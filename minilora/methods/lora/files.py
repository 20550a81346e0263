"""LoRA adapter files: the factors alone (kilobytes), with the config needed to rebuild them.

One safetensors file written by :func:`minilora.io.write_typed` (format ``minilora-adapter-v1``):
the ``lora_`` tensors (and the biases the config trains) by parameter name, the whole modules
trained beside it (``modules_to_save``: ``lm_head.modules_to_save.default.weight``, PEFT's name),
and in the JSON header the :class:`LoraConfig`, the adapted module names, the saved modules and
the base model's config.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

from minilora import backend
from minilora.methods.lora.config import LoraConfig
from minilora.io import check_same_base, config_from_meta, read_typed, write_typed
from minilora.methods.lora.inject import bias_names, lora_layers, prepare_for_adapter
from minilora.methods.lora.layers import LoRAError
from minilora.nn.layers import Module
from minilora.nn.modules_to_save import (
    check_saved_modules,
    load_saved_modules,
    saved_modules_tensors,
    split_saved_modules,
)

ADAPTER_FORMAT = "minilora-adapter-v1"

def lora_state_dict(model: Module, bias: str = "none") -> dict:
    """The adapter's tensors: every ``lora_`` parameter, plus the biases ``bias`` selects.

    Same dotted names as ``model.named_parameters()`` (``blocks.0.attn.q.lora_A``), on the
    active backend (not copies).

    Chapter: chapters/04-lora-notes.ipynb
    """
    biases = bias_names(model, bias)
    return {n: p for n, p in model.named_parameters()
            if n.rsplit(".", 1)[-1].startswith("lora_") or n in biases}


def load_lora_state_dict(model: Module, arrays: dict, strict: bool = True) -> None:
    """Copy adapter tensors (from :func:`lora_state_dict`) into an injected model.

    Every name must be a ``lora_`` factor or a bias of ``model`` and every shape must match; an
    adapter trained for another base shape (other n_embd, vocab or r) gets one error naming the
    first mismatching tensor. With ``strict`` every LoRA factor of the model must be present.
    All checks run before any parameter is written.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA layers: call inject_lora(model, config) with the "
                        "adapter's config first (load_adapter does this for you)")
    if any(m.merged for m in layers.values()):
        raise LoRAError("cannot load adapter weights while LoRA layers are merged (W0 holds the "
                        "old ΔW); call unmerge_lora(model) first")
    slots = {n: (m, k) for n, m, k in model._slots()}
    unexpected = [n for n in arrays
                  if n not in slots or not (n.rsplit(".", 1)[-1].startswith("lora_")
                                            or n.endswith(".bias"))]
    if unexpected:
        raise LoRAError(f"adapter tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} "
                        f"match no LoRA factor or bias of this model; its LoRA layers are "
                        f"{list(layers)[:6]}. Was the adapter built with other target_modules?")
    if strict:
        missing = [f"{n}.{k}" for n, m in layers.items() for k in ("lora_A", "lora_B")
                   if f"{n}.{k}" not in arrays]
        if missing:
            raise LoRAError(f"adapter lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
                            "it was built for other target_modules, or for a base model with "
                            "fewer layers (n_layer) (or pass strict=False)")
    for n, a in arrays.items():
        m, k = slots[n]
        if tuple(a.shape) != tuple(m.params[k].shape):
            raise LoRAError(f"adapter tensor {n!r} has shape {tuple(a.shape)} but this model's is "
                            f"{tuple(m.params[k].shape)}: the adapter was built for a base model "
                            "of another shape (n_embd / vocab_size) or another r")
    for n, a in arrays.items():
        m, k = slots[n]
        m.params[k] = backend.asarray(backend.to_numpy(a), dtype=m.params[k].dtype)


def save_adapter(path, model: Module, config: LoraConfig, modules_to_save=()) -> None:
    """Write the adapter alone (factors + selected biases, kilobytes) to one safetensors file.

    The JSON metadata holds the :class:`LoraConfig` and, if the model has one, its
    ``GPTConfig``, so :func:`load_adapter` can rebuild the wrappers and check the base. Atomic
    (:func:`minilora.io.write_typed`). Saved unmerged: a merged model is refused.
    ``modules_to_save``: module paths trained whole beside the factors (``("lm_head",)``),
    stored in the same file (see :mod:`minilora.nn.modules_to_save`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("save_adapter: the model has no LoRA layers")
    if any(m.merged for m in layers.values()):
        raise LoRAError("save_adapter: LoRA layers are merged; unmerge_lora(model) first so the "
                        "saved factors and the base weight stay separable")
    meta = {"lora_config": config.to_dict(), "targets": list(layers),
            "modules_to_save": list(modules_to_save)}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        meta["model_config"] = model_config.to_dict()
    arrays = {**lora_state_dict(model, config.bias), **saved_modules_tensors(model, modules_to_save)}
    write_typed(path, ADAPTER_FORMAT, arrays, meta)


def read_adapter(path, model: Module | None = None,
                 allow_nonfinite: bool = False) -> tuple[dict, LoraConfig]:
    """Read a file from :func:`save_adapter` without touching any model.

    Returns ``(arrays, config)``: the tensors (NumPy, by parameter name; a saved module's under
    ``<path>.modules_to_save.default.<parameter>``) and the adapter's :class:`LoraConfig`. Checks the format and the config; given ``model``, also that the adapter
    was built for a base of the same shape (vocab_size, n_embd, n_layer, bias), one clear error
    otherwise. Used by :func:`load_adapter` and by the many-adapter registry
    (:mod:`minilora.adapters`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    arrays, meta = read_typed(path, ADAPTER_FORMAT, "adapter", allow_nonfinite)
    config = config_from_meta(path, meta, "lora_config", LoraConfig, "adapter")
    check_same_base(path, meta.get("model_config"), getattr(model, "config", None),
                    error=LoRAError)
    return arrays, config


def load_adapter(path, model: Module) -> LoraConfig:
    """Load a file from :func:`save_adapter` into ``model``; returns the adapter's config.

    A model without LoRA layers is injected first with the saved config (for ``"pissa"`` that
    recomputes the same residual base from the same W0). A model that already has LoRA layers
    must have exactly the saved targets. Shapes are checked with clear errors. Saved whole
    modules (``modules_to_save``) are copied into the model after the factors and left trainable.

    Chapter: chapters/04-lora-notes.ipynb
    """
    arrays, config = read_adapter(path, model)
    arrays, saved, paths = split_saved_modules(arrays)
    check_saved_modules(model, paths, saved, str(path), error=LoRAError)
    prepare_for_adapter(model, config)
    load_lora_state_dict(model, arrays)
    if paths:
        load_saved_modules(model, paths, saved, str(path), error=LoRAError)
    return config
