"""Where the experiments floor reads the shipped base model and writes its outputs.

* the base model: ``<data dir>/base_model/shakespeare_char.safetensors`` (the data directory
  follows one rule: :func:`minilora.data.data_dir`);
* ``results/``: records (JSON, tables) that are committed; ``figures/``: PNGs drawn from them;
* ``runs/``: weights and scratch output of runs (git-ignored). Commands write there by default and
  update the committed ``results/`` only when asked (``--out results/...``).
"""
from __future__ import annotations

from pathlib import Path

from minilora.data import data_dir
from minilora.io import CheckpointError

BASE_MODEL_FILE = "base_model/shakespeare_char.safetensors"
RESULTS = Path("results")
FIGURES = Path("figures")
RUNS = Path("runs")


def base_model_path() -> Path:
    """The shipped pretrained Shakespeare model (``<data dir>/base_model/...``)."""
    p = data_dir() / BASE_MODEL_FILE
    if not p.exists():
        raise CheckpointError(
            f"the shipped base model {str(p)!r} is missing. It is committed with the repository; "
            "re-create it with the command in data/SOURCES.md (`minilora pretrain --preset base "
            "...`), or pass --ckpt PATH")
    return p
