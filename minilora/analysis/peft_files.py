"""Read anyone's PEFT LoRA adapter directory (no torch): the factors of each module, lazily.

A PEFT LoRA adapter is ``adapter_config.json`` + ``adapter_model.safetensors``. Keys are
``base_model.model.<module path>.<part>``, for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (LLaMA, Mistral),
``base_model.model.transformer.h.0.attn.c_attn.lora_B.weight`` (GPT-2); files saved from a live
model may keep the adapter name (``.lora_A.default.weight``). The parts:

=================================  ===================  =========================================
part                               stored shape         meaning
=================================  ===================  =========================================
``lora_A[.name].weight``           (r, d_in)            Linear: ΔW = s · B A, W (d_out, d_in)
``lora_B[.name].weight``           (d_out, r)
``lora_embedding_A[.name]``        (r, V)               Embedding (V tokens, C channels): PEFT
``lora_embedding_B[.name]``        (C, r)               adds s · (B A)ᵀ to the (V, C) table
``lora_magnitude_vector[.name]``   (d_out,)             DoRA's magnitude m
(4-D ``lora_A`` / ``lora_B``)      (r, c_in, kh, kw)    Conv: flattened to (r, c_in·kh·kw)
=================================  ===================  =========================================

This module returns every update in the orientation of y = ΔW x, i.e. ΔW = s · B A with
B (d_out, r) and A (r, d_in). For an embedding that means B = ``lora_embedding_B`` (C, r),
A = ``lora_embedding_A`` (r, V), so ΔW is (C, V): the transpose of PEFT's (V, C) delta, the map
from a one-hot token to its vector.

Scaling (PEFT ``LoraLayer.update_layer``): s = lora_alpha / r, or lora_alpha / sqrt(r) with
``use_rslora``. ``rank_pattern`` and ``alpha_pattern`` override r and lora_alpha per module: a
pattern key ``p`` applies to module path ``m`` (without ``base_model.model.``) when
``re.match(rf"(.*\\.)?({p})$", m)`` succeeds (PEFT's ``get_pattern_key``: the key, as a regex,
matches a dot-separated suffix of the path); the first matching key in the dict's order wins.

A legacy ``adapter_model.bin`` is a pickle (it can run code when loaded) and is refused.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minilora.analysis.module_paths import natural_key, natural_sorted
from minilora.analysis.safetensors_lazy import (
    AdapterFileError,
    SafetensorsFile,
    is_lfs_pointer,
    lfs_pointer_error,
)
from minilora.peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    PeftFormatError,
    lora_scaling,
    read_peft_config,
)
#: key part -> (role, layer kind)
PARTS = {"lora_A": ("A", "linear"), "lora_B": ("B", "linear"),
         "lora_embedding_A": ("A", "embedding"), "lora_embedding_B": ("B", "embedding"),
         "lora_magnitude_vector": ("m", None)}


def _with_shape(shape, module, reason):
    return module, tuple(shape), reason


class LoraModule(NamedTuple):
    """One adapted module of a PEFT adapter (names and sizes only; tensors are read on demand)."""
    name: str              # path without "base_model.model.", e.g. model.layers.0.self_attn.q_proj
    kind: str              # "linear", "embedding" or "conv"
    d_out: int             # rows of ΔW in y = ΔW x (C for an embedding)
    d_in: int              # columns of ΔW (V for an embedding; c_in·kh·kw for a conv)
    r: int
    lora_alpha: float
    scale: float           # s in ΔW = s · B A
    a_key: str
    b_key: str
    magnitude_key: str | None   # DoRA's m, when present


def match_pattern(patterns, module: str) -> str | None:
    """The first key of ``patterns`` that PEFT would apply to ``module`` (see module doc), or None."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as e:
            raise AdapterFileError(f"pattern {key!r} of rank_pattern / alpha_pattern is not a "
                                   f"regular expression ({e})") from None
    return None


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """(r, lora_alpha) of ``module`` from an adapter config, honouring rank/alpha_pattern."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key, a_key = match_pattern(rank_pattern, module), match_pattern(alpha_pattern, module)
    r = rank_pattern[r_key] if r_key is not None else config.get("r", 8)
    alpha = alpha_pattern[a_key] if a_key is not None else config.get("lora_alpha", 8)
    return int(r), float(alpha)


def _split_key(key: str):
    """(module path, role, kind, adapter name or None) of a LoRA key, or None for other keys."""
    parts = key.split(".")
    hits = [i for i, p in enumerate(parts) if p in PARTS]
    if not hits:
        return None
    i = hits[-1]
    rest = parts[i + 1:]
    if rest and rest[-1] == "weight":
        rest = rest[:-1]
    if rest == ["bias"] or len(rest) > 1:      # lora_B.bias (lora_bias=True) or not ours
        return None
    module = _strip_prefix(".".join(parts[:i]))
    role, kind = PARTS[parts[i]]
    return module, role, kind, (rest[0] if rest else None)


def _strip_prefix(path: str) -> str:
    return path[len(KEY_PREFIX):] if path.startswith(KEY_PREFIX) else path


#: path components of PEFT's ``ModulesToSaveWrapper`` (a module listed in ``modules_to_save``)
WRAPPER_PARTS = ("modules_to_save", "original_module")


class SkippedTensor(NamedTuple):
    """A tensor of the adapter file that is not analysed, and why."""
    key: str          # the tensor's name in adapter_model.safetensors
    module: str       # the module it belongs to (path without "base_model.model.")
    shape: tuple
    reason: str


def _skip_reason(key: str, config: dict, lora_modules) -> tuple[str, str]:
    """(module, reason) for a tensor that is not a LoRA factor (or a factor inside PEFT's
    modules_to_save wrapper)."""
    parts = _strip_prefix(key).split(".")
    if WRAPPER_PARTS[0] in parts or WRAPPER_PARTS[1] in parts:
        i = min(parts.index(w) for w in WRAPPER_PARTS if w in parts)
        return (".".join(parts[:i]),
                f"inside PEFT's modules_to_save wrapper ({parts[i]}): the module is trained and "
                f"saved in full, so a LoRA under it is not its update (older PEFT versions wrote "
                f"these paths)")
    leaf = parts[-1]
    if len(parts) >= 2 and parts[-2] == "lora_B" and leaf == "bias" or (
            len(parts) >= 3 and parts[-3] == "lora_B" and leaf == "bias"):
        module = ".".join(parts[:parts.index("lora_B")])
        return module, ("lora_bias: a trained bias added to the layer's output beside s·B·A; "
                        "it is not part of ΔW = s·B·A")
    module = ".".join(parts[:-1])
    owner = module[:-len(".base_layer")] if module.endswith(".base_layer") else module
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    if any(owner == m or owner.endswith("." + m) for m in saved):
        return owner, ("modules_to_save: a fully trained copy of the module (a full update, "
                       "not a low-rank one)")
    if owner in lora_modules:
        return owner, ("a full copy of the base weight of an adapted module (PEFT's "
                       "save_embedding_layers, e.g. after resizing the vocabulary): not a "
                       "low-rank update")
    if leaf == "bias":
        return owner, "a trained bias (bias='all' or 'lora_only'): not part of ΔW = s·B·A"
    if owner.split(".")[-1] in ("lm_head", "embed_tokens", "wte", "embed_out", "shared",
                                "word_embeddings", "embed_in"):
        return owner, ("a full copy of an embedding or output layer (PEFT's "
                       "save_embedding_layers): not a low-rank update")
    return owner, "not a LoRA factor (no lora_A / lora_B / lora_embedding_A / B in its name)"


class PeftAdapter:
    """An opened PEFT LoRA adapter: config, module table, and lazy access to each module's factors.

    Attributes:
        path: the adapter directory.
        config: the parsed ``adapter_config.json`` (unknown keys kept, ignored).
        modules: module name -> :class:`LoraModule`, in natural order (layer 2 before 10).
        skipped: :class:`SkippedTensor` for every tensor that is not analysed, with its reason
            (``modules_to_save`` copies, ``lora_B.bias``, embedding copies, PEFT's wrapper
            paths, other adapters' tensors), in natural order.
        other_keys: the keys of ``skipped``.
    """

    def __init__(self, path, adapter_name: str | None = None):
        path = Path(path)
        if path.is_file() and path.name == WEIGHTS_NAME:
            path = path.parent
        if not path.is_dir():
            raise AdapterFileError(f"{path}: not an adapter directory (expected a directory with "
                                   f"{CONFIG_NAME} and {WEIGHTS_NAME})")
        weights, cfg = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.is_file():
            if (path / LEGACY_WEIGHTS_NAME).is_file():
                raise AdapterFileError(
                    f"{path}: only {LEGACY_WEIGHTS_NAME} is there, a pickle, which minilora never "
                    f"loads (unpickling can run code); re-save the adapter with PEFT's "
                    f"save_pretrained(..., safe_serialization=True) to get {WEIGHTS_NAME}")
            raise AdapterFileError(f"{path}: no {WEIGHTS_NAME} (adapters not named 'default' "
                                   f"are saved in a subfolder named after the adapter: pass it)")
        if not cfg.is_file():
            raise AdapterFileError(f"{path}: no {CONFIG_NAME}; it holds r and lora_alpha, "
                                   f"without which the scaling of ΔW is unknown")
        if is_lfs_pointer(cfg):
            raise lfs_pointer_error(cfg)
        # every field we use checked (type, range, null): one line naming the file and field
        config = read_peft_config(cfg, ("LORA",), AdapterFileError)
        self.path, self.config = path, config
        self.weights = SafetensorsFile(weights)
        self.modules, self.skipped = self._group(adapter_name)
        self.other_keys = [t.key for t in self.skipped]

    def _group(self, adapter_name):
        found, other = {}, []
        splits = {key: _split_key(key) for key in self.weights.keys()}
        for key, split in splits.items():     # LoRA under PEFT's wrapper: reported, not analysed
            if split is not None and set(split[0].split(".")) & set(WRAPPER_PARTS):
                splits[key] = None
        names = {s[3] for s in splits.values() if s is not None} - {None}
        if adapter_name is None and len(names) > 1:
            raise AdapterFileError(f"{self.weights.path}: holds several adapters "
                                   f"({', '.join(sorted(names))}); pass adapter_name")
        elsewhere = []
        for key, split in splits.items():
            if split is None:
                other.append(key)
                continue
            module, role, kind, name = split
            if adapter_name is not None and name not in (adapter_name, None):
                elsewhere.append((key, module, name))
                continue
            entry = found.setdefault(module, {})
            if role in entry:
                raise AdapterFileError(f"{self.weights.path}: module {module!r} has two {role} "
                                       f"tensors ({entry[role][0]!r}, {key!r}); pass "
                                       f"adapter_name to pick one adapter")
            entry[role] = (key, kind)
        if not found:
            raise AdapterFileError(f"{self.weights.path}: no LoRA tensors (keys with lora_A / "
                                   f"lora_B / lora_embedding_A / lora_embedding_B)")
        use_rslora = bool(self.config.get("use_rslora", False))
        modules = {}
        for module, entry in found.items():
            if "A" not in entry or "B" not in entry:
                have = ", ".join(k for k, _ in entry.values())
                raise AdapterFileError(f"{self.weights.path}: module {module!r} lacks its "
                                       f"{'lora_A' if 'A' not in entry else 'lora_B'} (has {have})")
            (a_key, kind), (b_key, _) = entry["A"], entry["B"]
            a_shape, b_shape = self.weights.shape(a_key), self.weights.shape(b_key)
            if len(a_shape) < 2 or len(b_shape) < 2:
                raise AdapterFileError(f"{self.weights.path}: {a_key!r} {a_shape} and {b_key!r} "
                                       f"{b_shape} must be matrices")
            r_file = a_shape[0]
            if kind == "linear" and len(a_shape) > 2:
                kind = "conv"
            d_out, d_in = b_shape[0], int(np.prod(a_shape[1:]))
            if int(np.prod(b_shape[1:])) != r_file:
                raise AdapterFileError(f"{self.weights.path}: module {module!r}: lora_A {a_shape} "
                                       f"and lora_B {b_shape} disagree on r")
            r, alpha = module_rank_alpha(self.config, module)
            if r != r_file:
                raise AdapterFileError(
                    f"{CONFIG_NAME} gives module {module!r} rank {r} (r / rank_pattern) but its "
                    f"tensors have rank {r_file}: the config does not describe these weights")
            try:
                scale = lora_scaling(r, alpha, use_rslora)
            except PeftFormatError as e:
                raise AdapterFileError(f"{cfg_name(self.path)}: module {module!r}: {e}") from None
            modules[module] = LoraModule(module, kind, d_out, d_in, r, alpha, scale, a_key, b_key,
                                         entry["m"][0] if "m" in entry else None)
        skipped = [SkippedTensor(key, *_with_shape(self.weights.shape(key),
                                                   *_skip_reason(key, self.config, modules)))
                   for key in other]
        skipped += [SkippedTensor(key, module, self.weights.shape(key),
                                  f"belongs to adapter {name!r}, not to {adapter_name!r}")
                    for key, module, name in elsewhere]
        skipped.sort(key=lambda t: natural_key(t.key))
        return {n: modules[n] for n in natural_sorted(modules)}, skipped

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(B (d_out, r), A (r, d_in)) of module ``name`` in float64, y = ΔW x orientation, ΔW = s·B A.
        Only these two tensors are read from disk."""
        m = self._module(name)
        A = self._finite(m.a_key, name).reshape(m.r, m.d_in)
        B = self._finite(m.b_key, name).reshape(m.d_out, m.r)
        return B, A

    def _finite(self, key: str, module: str) -> np.ndarray:
        a = self.weights.read(key)
        bad = ~np.isfinite(a)
        if bad.any():
            raise AdapterFileError(
                f"{self.weights.path}: module {module}: tensor {key!r} holds "
                f"{int(np.isnan(a).sum())} NaN and {int(np.isinf(a).sum())} infinite value(s) "
                f"of {a.size} (first at index {np.unravel_index(int(np.argmax(bad)), a.shape)})")
        return a

    def check_module(self, name: str) -> None:
        """Read module ``name``'s tensors and raise :class:`AdapterFileError` naming the file,
        the module and the tensor if one holds NaN or inf (the DoRA magnitude included)."""
        m = self._module(name)
        for key in (m.a_key, m.b_key, m.magnitude_key):
            if key is not None:
                self._finite(key, name)

    def magnitude(self, name: str) -> np.ndarray | None:
        """DoRA's magnitude vector m (d_out,) of module ``name``, or None for plain LoRA."""
        m = self._module(name)
        return None if m.magnitude_key is None else self._finite(m.magnitude_key,
                                                                 name).reshape(-1)

    def delta_weight(self, name: str) -> np.ndarray:
        """The dense ΔW = s · B A (d_out, d_in) of one module (for small modules and tests)."""
        B, A = self.factors(name)
        return self._module(name).scale * (B @ A)

    def _module(self, name: str) -> LoraModule:
        try:
            return self.modules[name]
        except KeyError:
            raise AdapterFileError(f"{self.path}: no LoRA module named {name!r}") from None


def cfg_name(path) -> str:
    return str(Path(path) / CONFIG_NAME)


def read_peft_adapter(path, adapter_name: str | None = None) -> PeftAdapter:
    """Open a PEFT LoRA adapter directory (see :class:`PeftAdapter`); reads only the config and
    the safetensors header, and checks every module's factors and rank before returning."""
    return PeftAdapter(path, adapter_name)
