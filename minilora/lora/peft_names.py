"""The names of a PEFT LoRA file: its two file names, the key prefix, minilora's module paths
mapped to LLaMA-style ones and back, and the error a bad file raises.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from minilora.errors import MiniloraError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."

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

# PEFT config fields that must keep their default for the adapter to mean what we compute.
UNSUPPORTED_KEYS = {"fan_in_fan_out": False, "lora_bias": False,
                "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": None, "layer_replication": None}


#: relative tolerance of a saved base-layer copy vs the model's weight (bfloat16 rounding, 2^-8)


class PeftFormatError(MiniloraError, ValueError):
    """A PEFT adapter directory is missing, malformed, or uses a feature minilora lacks."""


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


def read_peft_dir(path_dir, error=None) -> tuple[dict, Path, Path]:
    """Open a PEFT adapter directory: ``(adapter_config.json as a dict, its path, the weights
    file's path)``, with one clear ``error`` (default :class:`PeftFormatError`) if either file is
    missing or the config is not a JSON object. The caller checks ``peft_type`` and the keys."""
    error = error or PeftFormatError
    path_dir = Path(path_dir)
    cfg_path, w_path = path_dir / CONFIG_NAME, path_dir / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise error(f"{str(p)!r} does not exist: not a PEFT adapter directory")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{str(cfg_path)!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{str(cfg_path)!r} must hold a JSON object")
    return d, cfg_path, w_path
