"""Figures of the many-adapter study."""
from __future__ import annotations

from pathlib import Path

from minilora.experiments.figures.common import (
    pyplot,
    read_json,
    save_figure,
)
from minilora.experiments.studies.claim import CLAIM_COMMAND


def fig_claim(results: Path, figures: Path) -> list:
    """Bar chart of ``results/multi_adapter/claim.json``: base / general / per-task per task."""

    rec = read_json(Path(results) / "multi_adapter" / "claim.json", CLAIM_COMMAND)
    plt = pyplot()
    tasks = rec["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        v = rec["results"][t]
        names, vals = ["base", "general", f"{t}\n(own)"], [v["base"], v["general"], v["per_task"]]
        bars = ax.bar(names, vals, color=["#999999", "#d08c3c", "#3c78d0"])
        for b, val in zip(bars, vals):
            ax.annotate(f"{val:.3f}", (b.get_x() + b.get_width() / 2, val), ha="center",
                        va="bottom", fontsize=8)
        lo = min(vals)
        if not v["higher_is_better"]:
            ax.set_ylim(lo * 0.9, max(vals) * 1.03)
        ax.set_title(t)
        ax.set_ylabel(v["metric"] + (" ↑" if v["higher_is_better"] else " ↓"))
    fig.suptitle(f"Per-task LoRA (hot-swapped) vs one general LoRA, r={rec['lora_config']['r']}, "
                 f"{rec['steps_per_task']} steps/task: claim "
                 f"{'holds' if rec['holds_here'] else 'does not hold'}", fontsize=9)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "multi_adapter_claim.png")]
