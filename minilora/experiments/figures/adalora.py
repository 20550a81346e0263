"""AdaLoRA's final rank allocation per layer (which layers kept rank), next to the rank ablation."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minilora.experiments.figures.common import (
    MIN_FONT,
    MissingResults,
    book_axes,
    pyplot,
    read_json,
    save_figure,
)

RUNS = ("milton-adalora-lr2e-2", "milton-adalora", "python-adalora")


def fig_adalora_ranks(results: Path, figures: Path) -> list:
    """Final rank of each adapted matrix after AdaLoRA's budget schedule: q and v side by side per
    block, one panel per saved run (``results/finetune/<run>/adalora_ranks.json``)."""
    runs = []
    for run in RUNS:
        try:
            runs.append((run, read_json(Path(results) / "finetune" / run / "adalora_ranks.json",
                                        f"minilora finetune --method adalora --out "
                                        f"results/finetune/{run}")))
        except MissingResults:
            continue
    if not runs:
        raise MissingResults("no results/finetune/*-adalora*/adalora_ranks.json; make one with: "
                             "minilora finetune --method adalora --task milton --out "
                             "results/finetune/milton-adalora")
    plt = pyplot()
    fig, axes = book_axes(plt, len(runs), 3.4)
    for ax, (run, rec) in zip(axes, runs):
        ranks = rec["final_ranks"]
        blocks = sorted({int(k.split(".")[1]) for k in ranks})
        kinds = sorted({k.rsplit(".", 1)[-1] for k in ranks})
        width = 0.8 / len(kinds)
        for j, kind in enumerate(kinds):
            vals = [ranks.get(f"blocks.{b}.attn.{kind}", ranks.get(f"blocks.{b}.mlp.{kind}", 0))
                    for b in blocks]
            ax.bar(np.array(blocks) + (j - (len(kinds) - 1) / 2) * width, vals, width,
                   label=f"{kind} (total {sum(vals)})")
        ax.set_xticks(blocks)
        ax.set_xlabel("block")
        ax.set_ylabel("final rank (kept triplets)")
        ax.set_title(run, fontsize=9)
        ax.legend(fontsize=MIN_FONT)
    fig.suptitle("AdaLoRA: where the rank budget went", fontsize=10)
    return [save_figure(fig, Path(figures) / "adalora_ranks.png")]
