"""The registry: every method by name, read by every consumer (the fine-tuning harness,
``minilora finetune`` and its generated flags, ``adapter export-peft / import-peft / merge``, the
results table, the bench, the chapters). Adding a method = its home + one line in :data:`METHODS`.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from pathlib import Path

from minilora.errors import PeftError, UsageError
from minilora.io import read_header
from minilora.methods.adalora import ADALORA
from minilora.methods.base import Method, Tuned
from minilora.methods.bitfit import BITFIT
from minilora.methods.full import FULL
from minilora.methods.houlsby import HOULSBY
from minilora.methods.ia3 import IA3
from minilora.methods.lora import DORA, LORA
from minilora.methods.prefix import PREFIX
from minilora.methods.prompt import PROMPT
from minilora.methods.qlora import QLORA
from minilora.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_peft_config

#: every method by name, in the order tables list them: the one registry.
METHODS: dict[str, Method] = {m.name: m for m in (
    FULL, LORA, QLORA, DORA, ADALORA, HOULSBY, PREFIX, PROMPT, BITFIT, IA3,
)}

#: names a method had before, refused with one line naming the new one
RENAMED = {"adapter": "houlsby"}


def get_method(name: str) -> Method:
    """The registered method ``name``; one clear error for an unknown (or renamed) one."""
    if name in RENAMED and RENAMED[name] in METHODS:
        raise UsageError(f"method {name!r} is now called {RENAMED[name]!r} (\"adapter\" means a "
                         f"trained adapter file of any method); use {RENAMED[name]!r}")
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def method_of_file(path) -> Method:
    """The method whose trained weights ``path`` holds: one of our typed files (the format id in
    its header, and the method it names), or a PEFT adapter directory (its ``peft_type``)."""
    path = Path(path)
    if path.is_dir() or path.name == WEIGHTS_NAME:
        folder = path if path.is_dir() else path.parent
        if not (folder / CONFIG_NAME).is_file():
            raise PeftError(f"{str(path)!r} is a directory without {CONFIG_NAME}: neither one of "
                            "minilora's adapter files nor a PEFT adapter directory")
        return method_of_peft_config(read_peft_config(folder / CONFIG_NAME), folder)
    header = read_header(path, "adapter file")
    fmt, named = header.get("format"), header.get("method")
    lora_config = header.get("lora_config") or {}
    hits = [m for m in METHODS.values() if m.file_format == fmt and fmt is not None
            and (named is None or named in getattr(m, "file_names", (m.name,)))
            and getattr(m, "use_dora", False) == bool(lora_config.get("use_dora", False))]
    if len(hits) != 1:
        kinds = sorted({m.file_format for m in METHODS.values() if m.file_format})
        raise PeftError(f"{str(path)!r} is a {fmt!r} file{f' of method {named!r}' if named else ''}"
                        f", which no registered method reads (formats: {', '.join(kinds)})")
    return hits[0]


def method_of_peft_config(config: dict, where) -> Method:
    """The method of a PEFT ``adapter_config.json`` (its ``peft_type``; LoRA with ``use_dora``
    is DoRA)."""
    peft_type = config.get("peft_type", "LORA")
    hits = [m for m in METHODS.values() if m.peft_type == peft_type
            and getattr(m, "use_dora", False) == bool(config.get("use_dora", False))
            and m.name != "qlora"]
    if not hits:
        have = sorted({m.peft_type for m in METHODS.values() if m.peft_type})
        raise PeftError(f"{str(where)!r}: peft_type {peft_type!r} is not one minilora reads "
                        f"({', '.join(have)})")
    return hits[0]


__all__ = ["METHODS", "Method", "RENAMED", "Tuned", "get_method", "method_of_file",
           "method_of_peft_config"]
