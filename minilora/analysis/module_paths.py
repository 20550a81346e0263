"""Module paths of an adapter: their natural order, their layer, their type and a short label.

A LoRA module is named by its path in the model, e.g. ``model.layers.12.self_attn.q_proj``
(LLaMA), ``transformer.h.3.attn.c_proj`` and ``transformer.h.3.mlp.c_proj`` (GPT-2: two different
matrices with the same last name), ``encoder.block.2.layer.0.SelfAttention.q`` and
``decoder.block.2.layer.0.SelfAttention.q`` (T5: two stacks with the same inner names).

* the **layer** is the first all-digit component (12, 3, 2); None for a module outside the
  blocks (``model.embed_tokens``, ``lm_head``);
* the **type** is the path with that component replaced by ``*``
  (``transformer.h.*.mlp.c_proj``): modules of one type are the same matrix in different layers,
  so per-layer figures draw one line per type and no two matrices share one;
* the **label** of a type is the shortest readable name that tells it from the adapter's other
  types: the stack components that differ between stacks (``encoder`` / ``decoder``) and the
  shortest suffix that is unique (``c_attn``, ``attn.c_proj``, ``mlp.c_proj``);
* the **natural order** sorts paths component by component, numbers as numbers, so layer 2 comes
  before layer 10 (file order, which is alphabetical in a safetensors file, runs 0, 1, 10, 11, 2).

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import re

_SPLIT = re.compile(r"(\d+)")


def layer_index(module: str) -> int | None:
    """The first all-digit component of a module path (``model.layers.12.mlp`` -> 12), or None."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def natural_key(module: str) -> tuple:
    """A sort key that orders numbers inside a path by value: ``h.2.attn`` before ``h.10.attn``."""
    key = []
    for part in module.split("."):
        key.append(tuple((0, int(t)) if t.isdigit() else (1, t)
                         for t in _SPLIT.split(part) if t != ""))
    return tuple(key)


def natural_sorted(modules) -> list[str]:
    """``modules`` in natural order (see :func:`natural_key`)."""
    return sorted(modules, key=natural_key)


def module_type(module: str) -> str:
    """The path with its layer component replaced by ``*`` (the path itself without a layer)."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i] + ["*"] + parts[i + 1:])
    return module


def type_labels(types) -> dict[str, str]:
    """{type: short label} for the types of one adapter (or of several on the same model).

    The label keeps the stack components in which the stacks differ (``encoder``, ``decoder``)
    and the shortest suffix of the rest that no other type of the same stack shares; a type
    without a layer keeps its full path.
    """
    types = list(dict.fromkeys(types))
    split = {}
    for t in types:
        parts = t.split(".")
        if "*" in parts:
            i = parts.index("*")
            split[t] = (parts[:i], parts[i + 1:])
    stacks = list(dict.fromkeys(tuple(s) for s, _ in split.values()))
    width = max((len(s) for s in stacks), default=0)
    differs = [j for j in range(width)
               if len({s[j] if j < len(s) else None for s in stacks}) > 1]
    out = {}
    for t in types:
        if t not in split:
            out[t] = t
            continue
        stack, rest = split[t]
        same_stack = [r for s, r in split.values() if s == stack]
        n = 1
        while n < len(rest) and sum(r[-n:] == rest[-n:] for r in same_stack) > 1:
            n += 1
        prefix = ".".join(stack[j] for j in differs if j < len(stack))
        name = ".".join(rest[-n:]) if rest else "*"
        out[t] = f"{prefix} {name}" if prefix else name
    # two different types can still end up with one label (e.g. a stack without a distinct
    # component): fall back to the full type for those
    seen = {}
    for t, label in out.items():
        seen.setdefault(label, []).append(t)
    for label, ts in seen.items():
        if len(ts) > 1:
            for t in ts:
                out[t] = t
    return out


__all__ = ["layer_index", "module_type", "natural_key", "natural_sorted", "type_labels"]
