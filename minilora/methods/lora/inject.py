"""LoRA on a whole model: wrap the targeted layers, freeze the rest, merge and unmerge.

    report = inject_lora(model, LoraConfig(r=4, target_modules=("q", "v")))
    merge_lora(model)      # W0 += ΔW in every wrapper: inference at the base's cost
    unmerge_lora(model)    # W0 -= ΔW: the factors train again

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import math

from minilora import backend
from minilora.config import ConfigError
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora.dora import DoRALinear
from minilora.methods.lora.layers import (
    LORA_LAYERS,
    LoRAEmbedding,
    LoRAError,
    LoRALinear,
    check_rank,
    all_finite,
)
from minilora.nn.layers import Embedding, Linear, Module


def lora_layers(model: Module) -> dict:
    """``{module name: wrapper}`` for every LoRA layer in ``model``, in tree order.

    Chapter: chapters/04-lora-notes.ipynb
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def bias_names(model: Module, bias: str):
    """The names of biases that ``bias`` ('none' | 'all' | 'lora_only') makes trainable."""
    if bias == "none":
        return set()
    if bias == "all":
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if bias == "lora_only":
        return {f"{n}.bias" for n, m in lora_layers(model).items() if "bias" in m.params}
    raise ConfigError(f"bias must be 'none', 'all' or 'lora_only'; got {bias!r}")


def mark_only_lora_as_trainable(model: Module, bias: str = "none") -> None:
    """Freeze everything except the ``lora_`` factors (and the biases that ``bias`` selects).

    Frozen parameters lose their gradient buffers, so they cost neither memory nor a dW matmul.

    Args:
        model: a model after :func:`inject_lora`.
        bias: 'none' (no bias trains), 'all' (every bias, LayerNorm biases included) or
            'lora_only' (the biases of the adapted layers).

    Chapter: chapters/04-lora-notes.ipynb
    """
    biases = bias_names(model, bias)
    model.set_trainable(lambda name: name.rsplit(".", 1)[-1].startswith("lora_") or name in biases)


def inject_lora(model: Module, config: LoraConfig) -> dict:
    """Wrap every targeted Linear / Embedding of ``model`` in place and freeze the rest.

    A module is a target when the last component of its name (``blocks.0.attn.q`` -> ``q``) is in
    ``config.target_modules``. Each target is replaced in its parent's ``children`` and in the
    parent's attribute (``attn.q``, ``model.lm_head``), so the forward code calls the wrapper.
    Factors are drawn from one CPU generator seeded with ``config.seed``, in tree order, so the
    same config on the same model gives the same adapter on NumPy and CuPy. Prints nothing.

    Args:
        model: a :class:`minilora.model.GPT` (or any Module tree with Linear/Embedding leaves).
        config: a :class:`minilora.config.LoraConfig`.
    Returns:
        ``{"trainable": n, "total": n, "percent": 100 n_trainable / n_total,
        "targets": [module names]}``.
    Raises:
        LoRAError: if the model already holds LoRA layers, or no module matches.
        ConfigError: if r exceeds min(d_in, d_out) of a target.

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    existing = lora_layers(model)
    if existing:
        raise LoRAError(f"the model already has LoRA layers ({', '.join(list(existing)[:4])}"
                        f"{' ...' if len(existing) > 4 else ''}); inject once per model")
    modules = dict(model.named_modules())
    targets = []
    for name, m in modules.items():
        last = name.rsplit(".", 1)[-1]
        if name and last in config.target_modules:
            if not isinstance(m, (Linear, Embedding)):
                raise LoRAError(f"module {name!r} matches target {last!r} but is a "
                                f"{type(m).__name__}; LoRA wraps Linear and Embedding only")
            targets.append(name)
    if not targets:
        adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                            if n and isinstance(m, (Linear, Embedding))})
        raise LoRAError(f"no module of the model matches target_modules "
                        f"{list(config.target_modules)}; module names that can be adapted: "
                        f"{', '.join(adaptable) or '(none)'}")
    for name in targets:  # check every rank before changing anything
        shape = tuple(modules[name].params["weight"].shape)
        check_rank(config.r, *(shape[::-1] if isinstance(modules[name], Linear) else shape),
                    f"{name!r} (weight shape {shape})")
    rng = backend.cpu_rng(config.seed)
    for name in targets:
        old = modules[name]
        if isinstance(old, Linear):
            cls = DoRALinear if config.use_dora else LoRALinear
            new = cls(old, config.r, config.lora_alpha, config.lora_dropout,
                      config.use_rslora, config.init_lora_weights, rng=rng)
        else:
            new = LoRAEmbedding(old, config.r, config.lora_alpha, config.use_rslora,
                                config.init_lora_weights, rng=rng)
        parent_name, _, child = name.rpartition(".")
        modules[parent_name].replace(child, new)
    mark_only_lora_as_trainable(model, config.bias)
    return model.trainable_report(targets)


def set_lora_training(model: Module, training: bool) -> None:
    """Switch LoRA dropout on (training) or off (evaluation) in every LoRALinear of ``model``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    for m in lora_layers(model).values():
        if isinstance(m, LoRALinear):
            m.training = bool(training)


def merge_lora(model: Module, safe_merge: bool = False) -> list:
    """Merge every LoRA layer (``W0 += ΔW``); returns the merged module names.

    With ``safe_merge`` every ΔW is checked before any weight is written, so a NaN anywhere leaves
    the whole model untouched.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("merge_lora: the model has no LoRA layers (call inject_lora first)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise LoRAError(f"merge_lora: {merged[:4]} already merged; call unmerge_lora first")
    for m in layers.values():
        if "weight" not in m.params:  # no float W0 to merge into (a 4-bit base): its own error
            m.merge()
    if safe_merge:
        bad = [n for n, m in layers.items() if not all_finite(m.params["weight"] + m.delta_weight())]
        if bad:
            raise LoRAError(f"refusing to merge: W0 + ΔW is not finite in {bad}; no weight changed")
    for m in layers.values():
        m.merge(safe_merge=False)
    return list(layers)


def unmerge_lora(model: Module) -> list:
    """Unmerge every merged LoRA layer (``W0 -= ΔW``); returns the unmerged module names.

    Chapter: chapters/04-lora-notes.ipynb
    """
    names = []
    for n, m in lora_layers(model).items():
        if m.merged:
            m.unmerge()
            names.append(n)
    return names

def prepare_for_adapter(model: Module, config: LoraConfig) -> None:
    """Make ``model`` ready to receive an adapter built with ``config``.

    A model without LoRA layers is injected with ``config``. One that has them must match it:
    the same adapted layer names and, in every layer, the same r and scaling; its trainable set
    is then reset for ``config.bias``. Raises :class:`LoRAError` naming the first mismatch.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        inject_lora(model, config)
        return
    kinds = {n.rsplit(".", 1)[-1] for n in layers}
    if kinds != set(config.target_modules):
        raise LoRAError(f"the model's LoRA layers adapt {sorted(kinds)} but the adapter adapts "
                        f"{sorted(config.target_modules)}; load into a model without LoRA "
                        "layers to inject the adapter's own config")
    for name, m in layers.items():
        if isinstance(m, DoRALinear) != config.use_dora:
            raise LoRAError(f"LoRA layer {name!r} is a {type(m).__name__} but the adapter has "
                            f"use_dora={config.use_dora}; load into a model without LoRA layers")
        if m.r != config.r or not math.isclose(m.scaling, config.scaling):
            raise LoRAError(f"LoRA layer {name!r} has r={m.r}, scaling={m.scaling:g} but the "
                            f"adapter has r={config.r}, scaling={config.scaling:g}")
    mark_only_lora_as_trainable(model, config.bias)


def count_lora_parameters(config: LoraConfig, model_config) -> int:
    """Closed-form number of trainable parameters after ``inject_lora(GPT(model_config), config)``.

    Each adapted (d_out, d_in) matrix adds r (d_in + d_out): 2 C r for a square (C, C) projection
    (q, k, v, o), 5 C r for ``up`` (4C, C) and ``down`` (C, 4C), r (V + C) for ``wte`` and
    ``lm_head``. Bias modes add, with ``model_config.bias``: 'all' every bias (per block 4C (q, k,
    v, o) + 4C (up) + C (down) + 2C (LayerNorms), plus C for ln_f); 'lora_only' the biases of the
    adapted Linears (C for q/k/v/o/down, 4C for up; wte and lm_head have none).

    Chapter: chapters/04-lora-notes.ipynb
    """
    C, V, L, r = model_config.n_embd, model_config.vocab_size, model_config.n_layer, config.r
    per_block = {"q": 2 * C, "k": 2 * C, "v": 2 * C, "o": 2 * C, "up": 5 * C, "down": 5 * C}
    whole = {"wte": V + C, "lm_head": C + V}
    n = sum(r * L * per_block[t] for t in config.target_modules if t in per_block)
    n += sum(r * whole[t] for t in config.target_modules if t in whole)
    if model_config.bias and config.bias == "all":
        n += L * (4 * C + 4 * C + C + 2 * C) + C
    elif config.bias == "all":  # bias-free Linears: only the LayerNorm biases
        n += L * 2 * C + C
    elif model_config.bias and config.bias == "lora_only":
        bias_size = {"q": C, "k": C, "v": C, "o": C, "up": 4 * C, "down": C}
        n += sum(L * bias_size[t] for t in config.target_modules if t in bias_size)
    return n
