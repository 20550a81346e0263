"""AdaLoRA in Hugging Face PEFT's folder format, both ways (``lora_A``, ``lora_B``, ``lora_E``;
the kept ranks in ``rank_pattern``; whole modules trained beside it in ``modules_to_save``, in
PEFT 0.21's layout, ``base_model.model.lm_head.weight``, the older one read too).

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minilora import backend
from minilora.lora.adalora import AdaLoraConfig, adalora_layers
from minilora.lora.adalora_train import inject_adalora
from minilora.lora.layers import LoRAError
from minilora.nn.layers import Module
from minilora.nn.modules_to_save import (
    check_saved_modules,
    load_saved_modules,
    modules_to_save_state_dict,
)
from minilora.peft_format import (
    KEY_PREFIX,
    PeftFormatError,
    from_peft_module,
    peft_config,
    peft_key,
    read_peft_dir,
    saved_modules_peft_tensors,
    take_saved_modules,
    to_peft_module,
    write_peft_dir,
)


# ----------------------------------------------------------------------------------------------
# files: PEFT's ADALORA directory (the kept triplets only, rank_pattern in the config)
# ----------------------------------------------------------------------------------------------
def export_adalora_peft(path_dir, model: Module, config: AdaLoraConfig,
                        rank_pattern: dict | None = None, modules_to_save=()) -> Path:
    """Write PEFT's AdaLoRA directory: per layer only the kept triplets, keys
    ``base_model.model.<path>.lora_A`` (r_M, d_in), ``.lora_E`` (r_M, 1), ``.lora_B``
    (d_out, r_M) (no ``.weight``), and ``rank_pattern`` ``{"<path>.lora_E": [bools]}`` in the
    config (PEFT's saved form). ``rank_pattern``: ours (layer name -> bools); None keeps every
    triplet with a non-zero E. ``modules_to_save``: module paths trained whole beside the
    triplets, saved under their own keys (``base_model.model.lm_head.weight``) and named in the
    config, as peft 0.21 does.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = adalora_layers(model)
    if not layers or any(m.merged for m in layers.values()):
        raise LoRAError("export_adalora_peft: the model needs unmerged AdaLoRA layers")
    tensors, pattern = {}, {}
    for name, m in layers.items():
        E = backend.to_numpy(m.params["lora_E"]).reshape(-1)
        keep = np.asarray(rank_pattern[name] if rank_pattern else E != 0, dtype=bool)
        peft = to_peft_module(name)
        # PEFT's pattern has init_r entries; a layer imported from a file holds only the kept
        # triplets, so its pattern is padded (which slots they fill does not change ΔW)
        pattern[f"{peft}.lora_E"] = keep.tolist() + [False] * (config.init_r - keep.size)
        A, E2, B = (backend.to_numpy(m.params[k]) for k in ("lora_A", "lora_E", "lora_B"))
        for k, a in (("lora_A", A[keep]), ("lora_E", E2[keep]), ("lora_B", B[:, keep])):
            tensors[peft_key(name, k)] = a
    tensors.update(saved_modules_peft_tensors(
        {n: backend.to_numpy(a) for n, a in modules_to_save_state_dict(model, modules_to_save).items()}))
    fields = {"r": 8, "bias": "none", "init_lora_weights": True, "use_dora": False,
              "use_rslora": False, "rank_pattern": pattern,
              **{k: v for k, v in config.to_dict().items() if k not in ("target_modules", "seed")}}
    try:
        return write_peft_dir(path_dir, tensors, peft_config(
            "ADALORA", fields, config.target_modules, modules_to_save))
    except PeftFormatError as e:
        raise LoRAError(f"export_adalora_peft: {e}") from None


def import_adalora_peft(path_dir, model: Module) -> tuple[AdaLoraConfig, dict]:
    """Load PEFT's AdaLoRA directory into a fresh base GPT; returns ``(config, ranks)``, ranks
    ``{layer name: kept triplets}``. Each layer holds the file's rows; ``ranknum`` stays
    ``init_r`` (so c = lora_alpha / (init_r + 1e-5), as PEFT computes after reloading).

    Chapter: chapters/04-lora-notes.ipynb
    """
    d, raw, _, cfg_path, w_path = read_peft_dir(path_dir, ("ADALORA",), LoRAError)
    if d.get("fan_in_fan_out") or d.get("use_dora"):
        raise LoRAError(f"{str(cfg_path)!r}: fan_in_fan_out / use_dora are not supported for "
                        "AdaLoRA files")
    fields = {k: d[k] for k in ("init_r", "target_r", "lora_alpha", "lora_dropout", "tinit",
                                "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                                "total_step") if d.get(k) is not None}
    config = AdaLoraConfig(target_modules=tuple(d.get("target_modules") or ()), **fields)
    raw, saved, saved_paths = take_saved_modules(raw, d, str(cfg_path), LoRAError)
    arrays = {}
    for key, a in raw.items():
        path, _, tensor = key[len(KEY_PREFIX):].rpartition(".")
        if not key.startswith(KEY_PREFIX) or tensor not in ("lora_A", "lora_E", "lora_B"):
            raise LoRAError(f"{str(w_path)!r}: key {key!r} is not an AdaLoRA factor")
        arrays.setdefault(from_peft_module(path), {})[tensor] = a
    check_saved_modules(model, saved_paths, saved, str(w_path), error=LoRAError)
    inject_adalora(model, config)
    layers = adalora_layers(model)
    if set(arrays) != set(layers):
        raise LoRAError(f"{str(w_path)!r} adapts {sorted(arrays)[:4]} but the config targets "
                        f"{sorted(layers)[:4]}")
    for name, t in arrays.items():
        m = layers[name]
        d_out, d_in = m.params["weight"].shape
        r = t["lora_A"].shape[0]
        if (t["lora_A"].shape != (r, d_in) or t["lora_E"].shape != (r, 1)
                or t["lora_B"].shape != (d_out, r) or r > config.init_r):
            raise LoRAError(f"{str(w_path)!r}: {name} has shapes A {t['lora_A'].shape}, E "
                            f"{t['lora_E'].shape}, B {t['lora_B'].shape}; want (r, {d_in}), "
                            f"(r, 1), ({d_out}, r) with r <= init_r = {config.init_r}")
    for name, t in arrays.items():
        m = layers[name]
        for k, a in t.items():
            m.params[k] = backend.asarray(a, dtype=m.params["weight"].dtype)
    if saved_paths:
        load_saved_modules(model, saved_paths, saved, str(w_path), error=LoRAError)
    return config, {n: m.r for n, m in layers.items()}
