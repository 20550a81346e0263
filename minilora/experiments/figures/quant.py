"""Figures of the quantisation track: error vs block size, codes used, LoftQ residuals, QLoRA vs
LoRA vs full fine-tuning."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minilora.experiments.figures.common import (
    BOOK_WIDTH,
    MIN_FONT,
    MissingResults,
    pyplot,
    read_json,
    save_figure,
)
from minilora.experiments.studies.quant_compare import MADE_BY, RESULTS_SUBDIR

_COLOURS = {"nf4": "C0", "fp4": "C1", "int4": "C2"}
_DATA_TITLES = {"gaussian": "N(0, 1) samples", "base_model": "base-model linear weights"}


def fig_error_vs_blocksize(results: Path, figures: Path) -> list[Path]:
    """Relative RMSE of NF4, FP4 and int4 against the block size, Gaussian and model weights."""

    res = read_json(Path(results) / RESULTS_SUBDIR / "error_vs_blocksize.json", MADE_BY)
    labels = [str(b) for b in res["blocksizes"]]
    plt = pyplot()
    datas = list(dict.fromkeys(r["data"] for r in res["rows"]))
    fig, axes = plt.subplots(1, len(datas), figsize=(min(BOOK_WIDTH, 5.2 * len(datas)), 3.6),
                             sharey=True)
    axes = np.atleast_1d(axes)
    for ax, data in zip(axes, datas):
        for qt in dict.fromkeys(r["quant_type"] for r in res["rows"]):
            by_bs = {str(r["blocksize"]): r["relative_rmse"] for r in res["rows"]
                     if r["data"] == data and r["quant_type"] == qt}
            ax.plot(range(len(labels)), [by_bs[b] for b in labels], "o-", ms=4,
                    color=_COLOURS.get(qt), label=qt)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("block size (elements per absmax)")
        ax.set_title(_DATA_TITLES.get(data, data))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("RMSE / RMS of the data")
    axes[0].legend()
    fig.suptitle("4-bit round-trip error vs block size", y=1.02)
    return [save_figure(fig, Path(figures) / "quant_error_vs_blocksize.png")]


def fig_code_histogram(results: Path, figures: Path) -> list[Path]:
    """Fraction of values per 4-bit code (block 64), levels in value order, one panel per type."""

    res = read_json(Path(results) / RESULTS_SUBDIR / "code_histogram.json", MADE_BY)
    hists = res["histograms"]
    types = list(dict.fromkeys(h["quant_type"] for h in hists))
    datas = list(dict.fromkeys(h["data"] for h in hists))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(types), figsize=(min(BOOK_WIDTH, 3 * len(types)), 3.6),
                             sharey=True)
    axes = np.atleast_1d(axes)
    width = 0.8 / len(datas)
    for ax, qt in zip(axes, types):
        for j, data in enumerate(datas):
            h = next(h for h in hists if h["quant_type"] == qt and h["data"] == data)
            order = np.argsort(np.asarray(h["levels"]), kind="stable")   # value order
            frac = np.asarray(h["fraction"])[order]
            ax.bar(np.arange(16) + (j - (len(datas) - 1) / 2) * width, frac, width,
                   label=_DATA_TITLES.get(data, data))
        levels = np.asarray(h["levels"])[order]
        ax.set_xticks(range(16), [f"{v:.2f}" for v in levels], rotation=90, fontsize=MIN_FONT)
        ax.axhline(1 / 16, color="k", lw=0.8, ls="--")
        ax.set_title(f"{qt} (levels in value order)", fontsize=9)
        ax.set_xlabel("level")
    axes[0].set_ylabel("fraction of values (block 64)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Which 4-bit codes are used (dashed: equal use, 1/16)", y=1.02)
    return [save_figure(fig, Path(figures) / "quant_code_histogram.png")]






def fig_loftq_residuals(results: Path, figures: Path) -> list:
    """Mean relative residual ||W - dequant(Q_t) - s B_t A_t||_F / ||W||_F over the base model's
    36 block matrices against the LoftQ step t (t = 0: plain NF4, B A = 0), one line per rank."""

    d = read_json(Path(results) / "quant" / "loftq_residuals.json",
                  "minilora loftq --out results/quant/loftq_residuals.json")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r, v in d["ranks"].items():
        rel = v["mean_relative_residual"]
        ax.plot(range(len(rel)), rel, "o-", ms=3,
                label=f"r = {r} ({v['monotone_layers']}/{v['n_layers']} layers non-increasing)")
    q = d["quant_config"]
    ax.set_xlabel("LoftQ step t (0 = plain quantisation, B A = 0)")
    ax.set_ylabel("mean ||W - Q - sBA|| / ||W||")
    ax.set_title(f"LoftQ on the base model: {q['quant_type']}, block {q['blocksize']}, "
                 f"double quant {'on' if q['double_quant'] else 'off'}")
    ax.legend(fontsize=8)
    return [save_figure(fig, Path(figures) / "loftq_residuals.png")]


def fig_qlora_compare(results: Path, figures: Path) -> list:
    """Milton test loss and Shakespeare forgetting: full fine-tuning, LoRA, QLoRA, QLoRA+LoftQ,
    with r=8 on q, v and (where run) on all block linears; the same 200-step harness
    (results/finetune/milton-*/result.json). Red ticks: the 4-bit model at step 0."""

    runs = [("full", "milton-full", "0.6"), ("LoRA\nq,v", "milton-lora", "C0"),
            ("QLoRA\nq,v", "milton-qlora", "C1"), ("+LoftQ\nq,v", "milton-qlora-loftq", "C2"),
            ("LoRA\nall", "milton-lora-all", "C0"), ("QLoRA\nall", "milton-qlora-all", "C1"),
            ("+LoftQ\nall", "milton-qlora-loftq-all", "C2")]
    recs = []
    for label, run, colour in runs:
        try:
            rec = read_json(Path(results) / "finetune" / run / "result.json",
                            f"minilora finetune --out results/finetune/{run} ...")
        except MissingResults:
            if run == "milton-qlora":
                raise
            continue
        recs.append((label, rec, colour))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(BOOK_WIDTH, 3.6))
    x = range(len(recs))
    for ax, key, title in ((axes[0], "task_loss", "Milton test loss (nats/char)"),
                           (axes[1], "forgetting", "forgetting: Shakespeare loss change")):
        vals = [rec[key] for _, rec, _ in recs]
        ax.bar(x, vals, color=[c for _, _, c in recs])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=MIN_FONT)
        if key == "task_loss":
            ax.axhline(recs[0][1]["task_loss_base"], ls="--", c="k", lw=0.8, label="float base")
            for i, (_, rec, _) in enumerate(recs):
                if "task_metric_init" in rec:
                    ax.plot([i - 0.4, i + 0.4], [rec["task_metric_init"]] * 2, c="r", lw=1.2)
            ax.set_ylim(1.4, None)
            ax.legend(fontsize=MIN_FONT, title="red: 4-bit model at step 0", title_fontsize=MIN_FONT,
                      loc="center right")
        ax.set_xticks(list(x), [lab for lab, _, _ in recs], fontsize=MIN_FONT)
        ax.set_title(title, fontsize=10)
    return [save_figure(fig, Path(figures) / "qlora_compare.png")]
