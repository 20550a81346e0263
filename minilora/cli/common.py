"""What every command shares: the formatter, the backend flag, loading a checkpoint, flag checks.

Errors: a user mistake raises a :class:`minilora.errors.MiniloraError` (here :class:`UsageError`
for a bad flag, naming it); :func:`minilora.cli.main` prints it as one line and exits 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from minilora import backend
from minilora.adapters import AdapterRegistry
from minilora.checkpoint import load_checkpoint
from minilora.experiments.paths import base_model_path


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_backend(p):
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: $MINILORA_BACKEND or numpy)")


def _use_backend(args):
    if getattr(args, "backend", None):
        backend.set_backend(args.backend)


def _load(path):
    return load_checkpoint(path or base_model_path())


def _adapter_registry(model, paths):
    """An AdapterRegistry on ``model`` holding the adapter files ``paths``; returns (registry,
    labels). A label is the file stem, or the folder name for finetune's ``adapter.safetensors``."""

    reg, labels = AdapterRegistry(model), []
    for path in paths:
        p = Path(path)
        label = p.parent.name if p.stem == "adapter" and p.parent.name else p.stem
        base, k = label, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        reg.load(label, p)
        labels.append(label)
    return reg, labels
