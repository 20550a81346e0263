"""Figures, made only from saved results: ``minilora figures`` reads ``results/`` and writes PNGs
into ``figures/``.

Every figure is a function ``f(results: Path, figures: Path) -> list[Path]`` registered in
:data:`FIGURES` as ``"module:function"`` (imported lazily, so each track keeps its plotting code
next to its analysis). A figure whose results are missing raises :class:`MissingResults` naming
the command that makes them; :func:`make_figures` reports it and goes on with the others.

Matplotlib runs with the non-interactive "Agg" backend; files are written atomically.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from minilora.errors import MiniloraError


class MissingResults(MiniloraError, FileNotFoundError):
    """A figure's input is not in ``results/`` yet; the message says which command makes it."""


def read_json(path: Path, made_by: str):
    """Load a results JSON file, or raise :class:`MissingResults` naming ``made_by``."""
    path = Path(path)
    if not path.exists():
        raise MissingResults(f"{path} not found; make it with: {made_by}")
    return json.loads(path.read_text())


def read_jsonl(path: Path, made_by: str) -> list[dict]:
    """Load a JSON-lines results file (one record a line)."""
    path = Path(path)
    if not path.exists():
        raise MissingResults(f"{path} not found; make it with: {made_by}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically (temp file + rename) and close it."""
    import io

    from minilora.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def fig_base_pretrain(results: Path, figures: Path) -> list[Path]:
    """Training and validation loss of the shipped base model against the step."""
    recs = read_jsonl(results / "base_pretrain_metrics.jsonl",
                      "minilora pretrain --preset base --out runs/base (then copy "
                      "runs/base/metrics.jsonl to results/base_pretrain_metrics.jsonl)")
    plt = pyplot()
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*tr), lw=0.6, alpha=0.7, label="train (one batch)")
    if va:
        ax.plot(*zip(*va), "o-", ms=3, label="validation (held-out plays)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title("Base model pre-training on Shakespeare")
    ax.legend()
    return [save_figure(fig, figures / "base_pretrain.png")]


# name -> "module:function"; add one line per figure.
FIGURES = {
    "base_pretrain": "minilora.plots:fig_base_pretrain",
    "quant_error_vs_blocksize": "minilora.quant.compare:fig_error_vs_blocksize",
    "quant_code_histogram": "minilora.quant.compare:fig_code_histogram",
    "paged": "minilora.paged:fig_paged",
    "multi_adapter_claim": "minilora.multi_adapter:fig_claim",
    "loftq_residuals": "minilora.qlora:fig_loftq_residuals",
    "qlora_compare": "minilora.qlora:fig_qlora_compare",
}


def make_figures(names=None, results="results", figures="figures", log=print) -> dict:
    """Make the named figures (default: all). Returns ``{name: [paths] or "skipped: why"}``."""
    results, figures = Path(results), Path(figures)
    names = list(FIGURES) if not names else list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; allowed: {', '.join(FIGURES)}")
    figures.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        module, func = FIGURES[name].split(":")
        try:
            paths = getattr(importlib.import_module(module), func)(results, figures)
            out[name] = [str(p) for p in paths]
            log(f"{name}: " + ", ".join(out[name]))
        except MissingResults as e:
            out[name] = f"skipped: {e}"
            log(f"{name}: skipped: {e}")
    return out
