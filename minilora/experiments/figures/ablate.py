"""Figures of the rank ablation (``minilora ablate``): the Pareto view of task loss against
forgetting, loss against rank per target set, and the fixed-parameter-budget table as bars."""

from __future__ import annotations

import statistics
from pathlib import Path

from minilora.experiments.ablate_records import summary_rows
from minilora.experiments.figures.common import (
    pyplot,
    read_json,
    save_figure,
)
from minilora.experiments.figures.delta_w import (
    seeds_label,
    sweep_cells,
    target_color,
)
from minilora.experiments.studies.delta_w_common import (
    BUDGET_COMMAND,
    STUDY_COMMAND,
)


def fig_pareto(results: Path, figures: Path) -> list:
    """Task loss vs forgetting for full fine-tuning and every LoRA (targets, r) of the sweep."""
    rows = [x for x in summary_rows(sweep_cells(results)) if x["task"] == "milton"]
    base = statistics.fmean(r["result"]["task_metric_base"] for r in sweep_cells(results)
                            if r["config"]["task"] == "milton")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5))
    seen = set()
    for x in rows:
        lab = x["targets"]
        ax.errorbar(x["forgetting"], x["task_metric"], xerr=x["forgetting_std"],
                    yerr=x["task_metric_std"], fmt="s" if lab == "full" else "o",
                    color=target_color(lab), ms=7 if lab == "full" else 5, capsize=2,
                    label=None if lab in seen else (f"LoRA {lab}" if lab != "full" else
                                                    "full fine-tuning"))
        seen.add(lab)
        if x["r"]:
            ax.annotate(f"r={x['r']}", (x["forgetting"], x["task_metric"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=target_color(lab))
    ax.axhline(base, color="#999999", ls=":", lw=1, label=f"base model ({base:.3f})")
    ax.axvline(0, color="#999999", lw=0.6)
    ax.set_xlabel("forgetting: Shakespeare loss change (nats/char) →  more forgetting")
    ax.set_ylabel("Milton test loss (nats/char, lower is better)")
    steps = rows[0]["steps"] if rows else "?"
    ax.set_title(f"Learns less, forgets less? Milton, {steps} steps; mean ± std over seeds",
                 fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "ablate_pareto.png")]


def fig_rank(results: Path, figures: Path) -> list:
    """Task loss and forgetting vs LoRA rank per target set, full fine-tuning as a band."""
    rows = [x for x in summary_rows(sweep_cells(results)) if x["task"] == "milton"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, lab in (("task_metric", axes[0], "Milton test loss (nats/char)"),
                         ("forgetting", axes[1], "forgetting (Δ Shakespeare loss, nats/char)")):
        for tl in ("q,v", "all-linear"):
            sel = sorted((x for x in rows if x["targets"] == tl and x["r"]), key=lambda x: x["r"])
            if sel:
                ax.errorbar([x["r"] for x in sel], [x[key] for x in sel],
                            yerr=[x[key + "_std"] for x in sel], marker="o", capsize=3,
                            color=target_color(tl), label=f"LoRA {tl} ({seeds_label(sel)})")
        for x in rows:
            if x["targets"] == "full":
                ax.axhspan(x[key] - x[key + "_std"], x[key] + x[key + "_std"], color=target_color("full"),
                           alpha=0.15)
                ax.axhline(x[key], color=target_color("full"), ls="--",
                           label=f"full fine-tuning ({seeds_label([x])})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r (lora_alpha = 2r)")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    fig.suptitle("Rank ablation on Milton (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "ablate_rank.png")]


def fig_budget(results: Path, figures: Path) -> list:
    """The fixed trainable-parameter budget (the LoRA paper's Table 5 shape) as bars."""
    d = read_json(Path(results) / "delta_w" / "budget.json",
                  f"{BUDGET_COMMAND}; then {STUDY_COMMAND} --only budget")
    rows = d["rows"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [f"{x['targets']}\nr={x['r']}" for x in rows]
    for ax, key, lab in ((axes[0], "task_loss", "Milton test loss (nats/char) ↓"),
                         (axes[1], "forgetting", "forgetting (nats/char) ↓")):
        vals = [x[key] for x in rows]
        ax.bar(names, vals, yerr=[x[key + "_std"] for x in rows], capsize=3,
               color=[target_color(x["targets"]) for x in rows])
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.6 + 1e-3
        if key == "task_loss":
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(lab)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"Same budget, different targets: {d['budget']:,} trainable parameters "
                 f"(± {100 * d['tolerance']:.0f} %); {seeds_label(rows)}, std as error bars",
                 fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "ablate_budget.png")]


# ----------------------------------------------------------------------------------------------
# the studies
