"""Whole modules in a PEFT LoRA file: ``modules_to_save`` (trained copies, both key layouts) and
the base-layer copies PEFT writes with ``save_embedding_layers`` (accepted when they equal the
base weight). Used by :func:`minilora.lora.peft_format.import_peft` and the AdaLoRA import; the saved
modules are then loaded by :func:`minilora.nn.modules_to_save.load_saved_modules`.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import numpy as np

from minilora import backend
from minilora.lora.peft_names import KEY_PREFIX, PeftFormatError, from_peft_module
from minilora.nn.modules_to_save import MTS_INFIX  # PEFT < 0.21 wrote this infix

BASE_COPY_RTOL = 2.0 ** -8
BASE_COPY_ATOL = 1e-8


def check_base_copy(name: str, saved, model, where: str) -> None:
    """Accept a saved copy of the base weight ``name`` (PEFT's ``save_embedding_layers``) only if
    it equals the model's within :data:`BASE_COPY_RTOL` (see the module docstring)."""
    ours = dict(model.named_parameters()).get(name)
    what = (f"{where}: {name!r} is a full copy of the base layer's weight (PEFT writes one with "
            "save_embedding_layers when an embedding layer is a LoRA target)")
    if ours is None:
        raise PeftFormatError(f"{what}, but this model has no parameter {name!r}")
    ours = np.asarray(backend.to_numpy(ours), dtype=np.float64)
    saved = np.asarray(saved, dtype=np.float64)
    if saved.shape != ours.shape:
        raise PeftFormatError(f"{what} of shape {saved.shape}, but this base's is {ours.shape} "
                              "(a resized embedding: added tokens are not supported)")
    excess = np.abs(saved - ours) - (BASE_COPY_RTOL * np.abs(ours) + BASE_COPY_ATOL)
    if (excess > 0).any():
        i = tuple(int(j) for j in np.unravel_index(int(np.argmax(excess)), excess.shape))
        raise PeftFormatError(f"{what}, and it differs from this base's weight (at {i}: "
                              f"{saved[i]:.6g} vs {ours[i]:.6g}, beyond bfloat16 rounding): the "
                              "adapter belongs to another base or changed the embedding itself; "
                              "a trained full layer is imported only under modules_to_save")


def saved_module_key(key: str, saved_names: list):
    """(our module path, tensor) if ``key`` is a tensor of a module named in the config's
    ``modules_to_save`` (either layout), else (None, None)."""
    if not saved_names or not key.startswith(KEY_PREFIX):
        return None, None
    path, _, tensor = key[len(KEY_PREFIX):].rpartition(".")
    if path.endswith(MTS_INFIX):
        path = path[: -len(MTS_INFIX)]
    if not any(path == n or path.endswith("." + n) for n in saved_names):
        return None, None
    try:
        return from_peft_module(path), tensor
    except PeftFormatError:
        return None, None


def take_saved_modules(raw: dict, config: dict, cfg_path, w_path, error=PeftFormatError):
    """Split a PEFT file's tensors into ``(the rest by key, the saved modules' tensors by our
    name "<module>.<tensor>", their module paths)``: the modules the config's ``modules_to_save``
    names, in either key layout (:func:`saved_module_key`). One clear error (class ``error``) for
    a list that is not one, or one whose modules the file holds no tensor of."""
    names = config.get("modules_to_save") or []
    if isinstance(names, str) or not isinstance(names, list):
        raise error(f"{str(cfg_path)!r}: modules_to_save must be a list of module names")
    rest, saved, paths = {}, {}, []
    for key, a in raw.items():
        module, tensor = saved_module_key(key, names)
        if module is None:
            rest[key] = a
            continue
        saved[f"{module}.{tensor}"] = a
        if module not in paths:
            paths.append(module)
    if names and not paths:
        raise error(f"{str(cfg_path)!r}: modules_to_save names {names} but {str(w_path)!r} holds "
                    "none of their tensors")
    return rest, saved, paths
