"""Figure of the base model's pre-training run."""
from __future__ import annotations

from pathlib import Path

from minilora.experiments.figures.common import pyplot, read_jsonl, save_figure


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
