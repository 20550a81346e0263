"""Figure of the paged-optimizer demo."""
from __future__ import annotations

from pathlib import Path

from minilora.experiments.figures.common import (
    pyplot,
    read_json,
    save_figure,
)
from minilora.experiments.studies.paged_demo import DEMO_MADE_BY
from minilora.paged import MiB


def fig_paged(results: Path, figures: Path) -> list[Path]:
    """Memory use against the budget per step, and the page traffic, of the tight demo run."""

    data = read_json(Path(results) / "paged" / "trace.json", DEMO_MADE_BY)
    run = data["runs"]["tight"]
    recs = run["steps"]
    steps = [r["step"] for r in recs]
    mib = float(MiB)
    wg = [(r["fixed_bytes_at_peak"] - r["activation_bytes"]) / mib for r in recs]
    act = [r["activation_bytes"] / mib for r in recs]
    res = [r["resident_state_bytes_at_peak"] / mib for r in recs]
    host = [r["host_state_bytes_at_peak"] / mib for r in recs]
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 2]})
    ax.bar(steps, wg, color="0.6", label="weights + gradients")
    ax.bar(steps, act, bottom=wg, color="tab:orange", label="activations")
    bottom = [a + b for a, b in zip(wg, act)]
    ax.bar(steps, res, bottom=bottom, color="tab:blue", label="optimizer state on device")
    top = [a + b for a, b in zip(bottom, res)]
    ax.bar(steps, host, bottom=top, color="none", edgecolor="tab:blue", hatch="//",
           label="optimizer state paged to host")
    ax.axhline(run["budget_bytes"] / mib, color="k", ls="--", lw=1, label="device budget")
    ax.set_ylabel("MiB at the step's peak")
    ax.set_title("Paged AdamW: a long-sequence batch pushes optimizer state to the host")
    ax.set_ylim(0, max(t + h for t, h in zip(top, host)) * 1.45)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    bx.bar([s - 0.2 for s in steps], [r["page_outs"] for r in recs], width=0.4,
           color="tab:red", label="page-outs (device -> host)")
    bx.bar([s + 0.2 for s in steps], [r["page_ins"] for r in recs], width=0.4,
           color="tab:green", label="page-ins (host -> device)")
    for r in recs:
        if r["page_ins"] or r["page_outs"]:
            bx.annotate(f"{r['modelled_transfer_s'] * 1e3:.2f} ms", (r["step"],
                        max(r["page_ins"], r["page_outs"])), ha="center", va="bottom", fontsize=8)
    page_mib = data["config"]["page_bytes"] / mib
    bw = data["config"]["bandwidth_bytes_per_s"] / 1e9
    bx.set_ylabel(f"pages ({page_mib:g} MiB)")
    bx.set_xlabel(f"step and window length T (modelled transfer time at {bw:g} GB/s)")
    bx.set_xticks(steps, [f"{r['step']}\nT={r['T']}" for r in recs], fontsize=8)
    bx.set_ylim(0, max([1] + [max(r["page_ins"], r["page_outs"]) for r in recs]) * 1.6)
    bx.legend(fontsize=8, loc="upper left", ncol=2)
    return [save_figure(fig, Path(figures) / "paged_trace.png")]
