"""Hugging Face PEFT's on-disk format, in one place: file names, key names, ``adapter_config.json``
(read with every field we use checked, written with PEFT's defaults), the ``modules_to_save``
layouts, and the directory itself (read and written atomically). Every method's PEFT import and
export (:mod:`minilora.methods`) and the analysis of anyone's adapter (:mod:`minilora.analysis`)
use it.

A PEFT adapter is a directory with two files::

    adapter_model.safetensors   the tensors, keyed base_model.model.<module path>.<tensor>
    adapter_config.json         peft_type ("LORA", "ADALORA", "IA3", ...), the method's fields

Keys carry no adapter name (PEFT strips ``.default`` on save). A module trained whole beside
the method (``modules_to_save``) is saved under its own path (``base_model.model.lm_head.weight``,
peft >= 0.21) and named in the config; older PEFT wrote
``base_model.model.lm_head.modules_to_save.default.weight``: both are read
(:func:`take_saved_modules`). PEFT also writes a full copy of an adapted embedding's base weight
(``...embed_tokens.base_layer.weight``, ``save_embedding_layers="auto"``); it carries nothing new
when it equals the base's weight and is checked and dropped (:func:`check_base_copy`).

Module paths of our GPT are written LLaMA-style (:data:`PEFT_MODULE_MAP`), so that
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` is our
``blocks.0.attn.q.lora_A`` (the double ``model.`` is PEFT's wrapper attribute followed by the HF
model's own ``.model``):

==========================  ==========================================
minilora module             LLaMA-style module
==========================  ==========================================
``wte``                     ``model.embed_tokens``
``blocks.{i}.attn.q``       ``model.layers.{i}.self_attn.q_proj`` (k, v, o alike)
``blocks.{i}.mlp.up``       ``model.layers.{i}.mlp.up_proj`` (down alike)
``blocks.{i}.ln_1``         ``model.layers.{i}.input_layernorm``
``blocks.{i}.ln_2``         ``model.layers.{i}.post_attention_layernorm``
``ln_f``                    ``model.norm``
``lm_head``                 ``lm_head``
==========================  ==========================================

The names line up; the architectures do not (LLaMA has a gated MLP, RMSNorm and rotary
positions), so the files are PEFT-shaped, not loadable into a LLaMA checkpoint.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from minilora.errors import MiniloraError
from minilora.io import atomic_write_bytes, atomic_write_json, first_nonfinite

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
#: a pickle: never read (unpickling can run code)
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
#: the key infix of a module saved whole in older PEFT files (and in minilora's own files):
#: PEFT's name for the trained copy of a module (``ModulesToSaveWrapper.modules_to_save.default``)
MTS_INFIX = ".modules_to_save.default"
#: relative / absolute tolerance of a saved base-layer copy vs the model's weight (bfloat16)
BASE_COPY_RTOL = 2.0 ** -8
BASE_COPY_ATOL = 1e-8


class PeftFormatError(MiniloraError, ValueError):
    """A PEFT adapter directory is missing, malformed, or uses a feature minilora lacks."""


# ----------------------------------------------------------------------------------------------
# names: our module paths <-> LLaMA-style ones, our target names <-> PEFT's
# ----------------------------------------------------------------------------------------------
#: minilora module path -> LLaMA-style module path ("{i}" is the block index).
PEFT_MODULE_MAP = {
    "wte": "model.embed_tokens",
    "blocks.{i}.attn.q": "model.layers.{i}.self_attn.q_proj",
    "blocks.{i}.attn.k": "model.layers.{i}.self_attn.k_proj",
    "blocks.{i}.attn.v": "model.layers.{i}.self_attn.v_proj",
    "blocks.{i}.attn.o": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.mlp.up": "model.layers.{i}.mlp.up_proj",
    "blocks.{i}.mlp.down": "model.layers.{i}.mlp.down_proj",
    "blocks.{i}.ln_1": "model.layers.{i}.input_layernorm",
    "blocks.{i}.ln_2": "model.layers.{i}.post_attention_layernorm",
    "ln_f": "model.norm",
    "lm_head": "lm_head",
}

#: our target name -> the name PEFT's ``target_modules`` uses for it.
PEFT_TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                     "up": "up_proj", "down": "down_proj", "wte": "embed_tokens",
                     "lm_head": "lm_head"}


def _template_regex(template: str):
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_TO_PEFT = [(_template_regex(ours), peft) for ours, peft in PEFT_MODULE_MAP.items()]
_FROM_PEFT = [(_template_regex(peft), ours) for ours, peft in PEFT_MODULE_MAP.items()]


def _map_name(name: str, table, direction: str) -> str:
    for pattern, template in table:
        hit = pattern.match(name)
        if hit:
            return template.replace("{i}", hit.group(1)) if hit.groups() else template
    raise PeftFormatError(f"module {name!r} has no {direction} name in PEFT_MODULE_MAP")


def to_peft_module(name: str) -> str:
    """``blocks.0.attn.q`` -> ``model.layers.0.self_attn.q_proj`` (see :data:`PEFT_MODULE_MAP`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    return _map_name(name, _TO_PEFT, "LLaMA-style")


def from_peft_module(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``blocks.0.attn.q``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    return _map_name(name, _FROM_PEFT, "minilora")


def peft_key(module: str, tensor: str) -> str:
    """The key of our module's tensor in a PEFT file: ``base_model.model.<LLaMA path>.<tensor>``."""
    return f"{KEY_PREFIX}{to_peft_module(module)}.{tensor}"


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """What PEFT's ``r``, ``lora_alpha`` and ``use_rslora`` mean: the factor s in ΔW = s · B A,
    ``lora_alpha / r`` or, with rsLoRA (Kalajdzievski 2023), ``lora_alpha / sqrt(r)``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise PeftFormatError(f"r must be an integer >= 1, got {r!r}")
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


# ----------------------------------------------------------------------------------------------
# adapter_config.json: every field we use, checked (type, range, null) with one line each
# ----------------------------------------------------------------------------------------------
class _Rule(NamedTuple):
    what: str             # "an integer >= 1": for the message
    ok: object            # value -> bool
    nullable: bool = False


def _is_int(v, lo=None):
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _is_number(v, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return hi is None or (v < hi if hi_open else v <= hi)


def _is_names(v):
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


_BOOL = _Rule("true or false", lambda v: isinstance(v, bool))
_TEXT = _Rule("a string or null", lambda v: isinstance(v, str), nullable=True)
_NAMES = _Rule("a module name, a regex or a list of names (or null)", _is_names, nullable=True)
_INT1 = _Rule("an integer >= 1", lambda v: _is_int(v, 1))
_INT0 = _Rule("an integer >= 0", lambda v: _is_int(v, 0))
_UNIT = _Rule("a number in (0, 1)", lambda v: _is_number(v, 0, 1, True, True))

#: the fields of ``adapter_config.json`` that minilora reads, by the peft_type they belong to
#: (unknown fields are kept and ignored, as PEFT does)
CONFIG_RULES = {
    "*": {
        "peft_type": _Rule("a string", lambda v: isinstance(v, str)),
        "task_type": _TEXT, "base_model_name_or_path": _TEXT, "revision": _TEXT,
        "inference_mode": _BOOL,
        "target_modules": _NAMES,
        "modules_to_save": _Rule("a list of module names or null",
                                 lambda v: isinstance(v, list) and all(isinstance(x, str)
                                                                       for x in v),
                                 nullable=True),
        "fan_in_fan_out": _BOOL,
    },
    "LORA": {
        "r": _INT1,
        "lora_alpha": _Rule("a finite number", _is_number),
        "lora_dropout": _Rule("a number in [0, 1)", lambda v: _is_number(v, 0, 1, hi_open=True)),
        "bias": _Rule("'none', 'all' or 'lora_only'", lambda v: v in ("none", "all", "lora_only")),
        "use_rslora": _BOOL, "use_dora": _BOOL, "lora_bias": _BOOL,
        "init_lora_weights": _Rule("true, false or a method name",
                                   lambda v: isinstance(v, (bool, str))),
        "rank_pattern": _Rule("an object of module patterns -> integers >= 1",
                              lambda v: isinstance(v, dict) and all(_is_int(x, 1)
                                                                     for x in v.values()),
                              nullable=True),
        "alpha_pattern": _Rule("an object of module patterns -> numbers",
                               lambda v: isinstance(v, dict) and all(_is_number(x)
                                                                      for x in v.values()),
                               nullable=True),
        "layers_to_transform": _Rule("an integer, a list of integers or null",
                                     lambda v: _is_int(v, 0) or (isinstance(v, list) and all(
                                         _is_int(x, 0) for x in v)), nullable=True),
        "layers_pattern": _NAMES,
        "exclude_modules": _NAMES,
    },
    "ADALORA": {
        "init_r": _INT1, "target_r": _INT1, "tinit": _INT0, "tfinal": _INT0, "deltaT": _INT1,
        "beta1": _UNIT, "beta2": _UNIT,
        "orth_reg_weight": _Rule("a number >= 0", lambda v: _is_number(v, 0)),
        "total_step": _Rule("an integer >= 1 or null", lambda v: _is_int(v, 1), nullable=True),
        "lora_alpha": _Rule("a finite number", _is_number),
        "lora_dropout": _Rule("a number in [0, 1)", lambda v: _is_number(v, 0, 1, hi_open=True)),
        "use_dora": _BOOL,
        "rank_pattern": _Rule("an object of module paths -> lists of true/false",
                              lambda v: isinstance(v, dict) and all(
                                  isinstance(x, list) and all(isinstance(b, bool) for b in x)
                                  for x in v.values()), nullable=True),
    },
    "IA3": {
        "feedforward_modules": _NAMES,
        "init_ia3_weights": _BOOL,
    },
}


def _show(v) -> str:
    if isinstance(v, str):
        return repr(v)
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def check_peft_config(d, where, peft_types=None, error=None) -> dict:
    """Check an ``adapter_config.json`` object: a JSON object whose ``peft_type`` (PEFT's "LORA"
    when absent) is one of ``peft_types`` (None: any), and whose every field in
    :data:`CONFIG_RULES` for that type has the right type and range (null only where PEFT
    writes null). One line (class ``error``, default :class:`PeftFormatError`) naming ``where``
    and the field; returns ``d``."""
    error = error or PeftFormatError
    if not isinstance(d, dict):
        raise error(f"{where}: must hold a JSON object, got {type(d).__name__}")
    peft_type = d.get("peft_type", "LORA")
    if peft_types is not None and peft_type not in peft_types:
        raise error(f"{where}: peft_type is {_show(peft_type)}; minilora reads "
                    f"{' or '.join(repr(t) for t in peft_types)} here")
    rules = {**CONFIG_RULES["*"], **CONFIG_RULES.get(peft_type, {})}
    for name, rule in rules.items():
        if name not in d:
            continue
        v = d[name]
        if v is None and rule.nullable:
            continue
        if v is None or not rule.ok(v):
            raise error(f"{where}: {name} must be {rule.what}, got {_show(v)}")
    return d


def read_peft_config(path, peft_types=None, error=None) -> dict:
    """Read and check ``adapter_config.json`` (see :func:`check_peft_config`): one line naming
    the file for a missing file, bad JSON, or a field of the wrong type or range."""
    error = error or PeftFormatError
    path = Path(path)
    if not path.is_file():
        raise error(f"{str(path)!r} does not exist: not a PEFT adapter directory")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{str(path)!r} is not valid JSON ({e})") from None
    return check_peft_config(d, repr(str(path)), peft_types, error)


def peft_config(peft_type: str, fields: dict, target_modules=(), modules_to_save=(),
                base_model_name_or_path=None) -> dict:
    """An ``adapter_config.json`` object as PEFT writes one: the fields every type has, then the
    method's ``fields``; target and saved module names in PEFT's spelling; checked like a read
    one (so we never write what we would refuse to read)."""
    d = {"peft_type": peft_type, "task_type": "CAUSAL_LM",
         "base_model_name_or_path": base_model_name_or_path, "revision": None,
         "inference_mode": True,
         "target_modules": [PEFT_TARGET_NAMES.get(t, t) for t in target_modules],
         "exclude_modules": None, "fan_in_fan_out": False,
         "modules_to_save": [to_peft_module(p) for p in modules_to_save] or None,
         **fields}
    return check_peft_config(d, f"the {peft_type} config being written", (peft_type,))


# ----------------------------------------------------------------------------------------------
# the directory
# ----------------------------------------------------------------------------------------------
class PeftDir(NamedTuple):
    """A PEFT adapter directory as read by :func:`read_peft_dir`."""
    config: dict           # adapter_config.json, checked
    tensors: dict          # key -> NumPy array (every tensor of the weights file)
    metadata: dict         # the safetensors header's string metadata
    config_path: Path
    weights_path: Path


def read_peft_dir(path_dir, peft_types=None, error=None) -> PeftDir:
    """Read a PEFT adapter directory: the config (checked, :func:`read_peft_config`) and every
    tensor, refusing a missing or truncated weights file, a pickle (``adapter_model.bin``) and
    NaN / inf, each with one line naming the file."""
    error = error or PeftFormatError
    path_dir = Path(path_dir)
    if not path_dir.is_dir():
        raise error(f"{str(path_dir)!r} is not a directory (a PEFT adapter directory holds "
                    f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg_path, w_path = path_dir / CONFIG_NAME, path_dir / WEIGHTS_NAME
    config = read_peft_config(cfg_path, peft_types, error)
    if not w_path.is_file():
        if (path_dir / LEGACY_WEIGHTS_NAME).is_file():
            raise error(f"{str(path_dir)!r} holds only {LEGACY_WEIGHTS_NAME}, a pickle, which "
                        "minilora never loads (unpickling can run code); re-save it with "
                        "PEFT's save_pretrained(..., safe_serialization=True)")
        raise error(f"{str(w_path)!r} does not exist: not a PEFT adapter directory")
    try:
        with safe_open(str(w_path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, an unsupported dtype: one line
        raise error(f"{str(w_path)!r} is truncated or not a safetensors file NumPy can read "
                    f"({type(e).__name__}: {e})") from None
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise error(f"{str(w_path)!r}: tensor {bad!r} holds NaN or inf")
    return PeftDir(config, tensors, metadata, cfg_path, w_path)


def write_peft_dir(path_dir, tensors: dict, config: dict, metadata: dict | None = None,
                   error=None) -> Path:
    """Write ``adapter_model.safetensors`` (``tensors``: key -> NumPy array) and
    ``adapter_config.json``, each atomically, the weights first (so a crash never leaves a new
    config describing old weights); NaN / inf is refused before anything is written. Returns
    the directory."""
    error = error or PeftFormatError
    tensors = {k: np.ascontiguousarray(a) for k, a in tensors.items()}
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise error(f"refusing to write {bad!r}: it holds NaN or inf")
    path_dir = Path(path_dir)
    atomic_write_bytes(path_dir / WEIGHTS_NAME,
                       save(tensors, metadata={"format": "pt", **(metadata or {})}))
    atomic_write_json(path_dir / CONFIG_NAME, config)
    return path_dir


# ----------------------------------------------------------------------------------------------
# modules saved whole (modules_to_save) and base-layer copies
# ----------------------------------------------------------------------------------------------
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


def take_saved_modules(raw: dict, config: dict, where, error=None):
    """Split a PEFT file's tensors into ``(the rest by key, the saved modules' tensors by our
    name "<module>.<tensor>", their module paths)``: the modules the config's ``modules_to_save``
    names, in either key layout (:func:`saved_module_key`). One clear error (class ``error``)
    for modules the file holds no tensor of."""
    error = error or PeftFormatError
    names = config.get("modules_to_save") or []
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
        raise error(f"{where}: modules_to_save names {names} but the weights hold none of their "
                    "tensors")
    return rest, saved, paths


def saved_modules_peft_tensors(arrays: dict) -> dict:
    """Our saved modules' tensors (``{"lm_head.weight": array}``) under the keys PEFT >= 0.21
    writes (``base_model.model.lm_head.weight``)."""
    out = {}
    for name, a in arrays.items():
        module, _, tensor = name.rpartition(".")
        out[peft_key(module, tensor)] = a
    return out


def check_base_copy(name: str, saved, ours, where: str) -> None:
    """Accept a saved copy of the base weight ``name`` (PEFT's ``save_embedding_layers``) only if
    it equals ``ours`` (the model's array, or None if it has none) within
    ``BASE_COPY_RTOL |W| + BASE_COPY_ATOL`` (the rounding of a bfloat16 copy)."""
    what = (f"{where}: {name!r} is a full copy of the base layer's weight (PEFT writes one with "
            "save_embedding_layers when an embedding layer is a LoRA target)")
    if ours is None:
        raise PeftFormatError(f"{what}, but this model has no parameter {name!r}")
    ours = np.asarray(ours, dtype=np.float64)
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


__all__ = ["BASE_COPY_ATOL", "BASE_COPY_RTOL", "CONFIG_NAME", "CONFIG_RULES", "KEY_PREFIX",
           "LEGACY_WEIGHTS_NAME", "MTS_INFIX", "PEFT_MODULE_MAP", "PEFT_TARGET_NAMES", "PeftDir",
           "PeftFormatError", "WEIGHTS_NAME", "check_base_copy", "check_peft_config",
           "from_peft_module", "lora_scaling", "peft_config", "peft_key", "read_peft_config",
           "read_peft_dir", "saved_module_key", "saved_modules_peft_tensors",
           "take_saved_modules", "to_peft_module", "write_peft_dir"]
