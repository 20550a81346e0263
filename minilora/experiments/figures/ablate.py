"""Figures of the rank ablation (``minilora ablate``): the Pareto view of task loss against
forgetting, loss against rank per target set, and the fixed-parameter-budget table as bars."""

from __future__ import annotations

import statistics
from pathlib import Path

from minilora.experiments.ablate_records import summary_rows
from minilora.experiments.figures.common import (
    BOOK_WIDTH,
    MIN_FONT,
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
    study_command,
)

#: order of the target sets in legends (the sweep's), then anything else
TARGET_ORDER = ("q", "k", "v", "o", "q,v", "q,k,v,o", "all-linear", "full")
TASK_LABEL = {"milton": "Milton", "python": "Python"}


def _lm_tasks(results: Path) -> list:
    """The sweep's tasks, Milton first, each with its rows and mean base loss."""
    cells = sweep_cells(results)
    rows = summary_rows(cells)
    out = []
    for task in sorted({x["task"] for x in rows}, key=lambda t: (t != "milton", t)):
        base = statistics.fmean(r["result"]["task_metric_base"] for r in cells
                                if r["config"]["task"] == task)
        out.append((task, [x for x in rows if x["task"] == task], base))
    return out


def _order(label: str) -> int:
    return TARGET_ORDER.index(label) if label in TARGET_ORDER else len(TARGET_ORDER)


def fig_pareto(results: Path, figures: Path) -> list:
    """Task loss vs forgetting for full fine-tuning and every LoRA (targets, r) of the sweep,
    one panel per task; seeds as error bars (sample std)."""
    tasks = _lm_tasks(results)
    plt = pyplot()
    fig, axes = plt.subplots(len(tasks), 1, figsize=(BOOK_WIDTH, 5.6 * len(tasks)),
                             squeeze=False)
    for ax, (task, rows, base) in zip(axes[:, 0], tasks):
        seen = set()
        for x in sorted(rows, key=lambda x: (_order(x["targets"]), x["r"] or 0)):
            lab = x["targets"]
            ax.errorbar(x["forgetting"], x["task_metric"], xerr=x["forgetting_std"],
                        yerr=x["task_metric_std"], fmt="s" if lab == "full" else "o",
                        color=target_color(lab), ms=7 if lab == "full" else 4, capsize=2,
                        label=None if lab in seen else (f"LoRA {lab}" if lab != "full" else
                                                        "full fine-tuning"))
            seen.add(lab)
            if x["r"] and lab in ("q,v", "all-linear"):
                ax.annotate(f"r={x['r']}", (x["forgetting"], x["task_metric"]), fontsize=MIN_FONT,
                            xytext=(3, 3), textcoords="offset points", color=target_color(lab))
        for lab in sorted(seen - {"full"}, key=_order):  # each set's ranks joined in order
            # (sorted: a set's order changes with the process's hash seed, and so would the PNG)
            sel = sorted((x for x in rows if x["targets"] == lab), key=lambda x: x["r"])
            ax.plot([x["forgetting"] for x in sel], [x["task_metric"] for x in sel], lw=0.6,
                    color=target_color(lab), alpha=0.6)
        ax.axhline(base, color="#999999", ls=":", lw=1, label=f"base model ({base:.3f})")
        ax.axvline(0, color="#999999", lw=0.6)
        ax.set_xlabel("forgetting: Shakespeare loss change (nats/char) →  more forgetting")
        name = TASK_LABEL.get(task, task)
        ax.set_ylabel(f"{name} test loss (nats/char, lower is better)")
        steps = rows[0]["steps"] if rows else "?"
        ax.set_title(f"{name}, {steps} steps: ranks 1-64 joined per target set; "
                     f"{seeds_label(rows)}, mean ± std", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: _order(labels[i].replace("LoRA ", "")
                                                                 .replace("full fine-tuning", "full")))
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=MIN_FONT,
                  loc="best")
    fig.suptitle("Learns less, forgets less? Task loss against forgetting", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "ablate_pareto.png")]


def fig_rank(results: Path, figures: Path) -> list:
    """Task loss and forgetting vs LoRA rank per target set, full fine-tuning as a band; one
    row of panels per task."""
    tasks = _lm_tasks(results)
    plt = pyplot()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(BOOK_WIDTH, 3.8 * len(tasks)),
                             squeeze=False)
    for (task, rows, _), pair in zip(tasks, axes):
        name = TASK_LABEL.get(task, task)
        for key, ax, lab in (("task_metric", pair[0], f"{name} test loss (nats/char)"),
                             ("forgetting", pair[1],
                              "forgetting (Δ Shakespeare loss, nats/char)")):
            for tl in sorted({x["targets"] for x in rows if x["r"]}, key=_order):
                sel = sorted((x for x in rows if x["targets"] == tl and x["r"]),
                             key=lambda x: x["r"])
                ax.errorbar([x["r"] for x in sel], [x[key] for x in sel],
                            yerr=[x[key + "_std"] for x in sel], marker="o", ms=3, capsize=2,
                            lw=1.2 if tl in ("q,v", "all-linear") else 0.8,
                            color=target_color(tl), label=f"LoRA {tl} ({seeds_label(sel)})")
            for x in rows:
                if x["targets"] == "full":
                    ax.axhspan(x[key] - x[key + "_std"], x[key] + x[key + "_std"],
                               color=target_color("full"), alpha=0.15)
                    ax.axhline(x[key], color=target_color("full"), ls="--",
                               label=f"full fine-tuning ({seeds_label([x])})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("LoRA rank r (lora_alpha = 2r)")
            ax.set_ylabel(lab)
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=MIN_FONT, ncol=2)
    fig.suptitle("Rank ablation per target set (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "ablate_rank.png")]


def fig_budget(results: Path, figures: Path) -> list:
    """The fixed trainable-parameter budget (the LoRA paper's Table 5 shape) as bars."""
    d = read_json(Path(results) / "delta_w" / "budget.json",
                  f"{BUDGET_COMMAND}; then "
                  + study_command(Path(results) / "ablate", Path(results) / "delta_w", "budget"))
    rows = d["rows"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(BOOK_WIDTH, 3.8))
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
        ax.tick_params(axis="x", labelsize=MIN_FONT)
    fig.suptitle(f"Same budget, different targets: {d['budget']:,} trainable parameters "
                 f"(± {100 * d['tolerance']:.0f} %); {seeds_label(rows)}, std as error bars",
                 fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "ablate_budget.png")]


# ----------------------------------------------------------------------------------------------
# the studies
