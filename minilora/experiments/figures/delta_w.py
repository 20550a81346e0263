"""Figures of the rank ablation (``results/ablate/cells``) and the ΔW studies (``results/delta_w``).

Every figure is drawn from those records alone; the commands that make them are in
:mod:`minilora.experiments.studies.delta_w` (``SWEEP_COMMAND``, ``BUDGET_COMMAND``,
``study_command``). Seeds are error bars (sample std); random baselines are drawn beside the
measured values.
"""
from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

import numpy as np

from minilora.experiments.ablate_records import load_records
from minilora.experiments.figures.common import (
    BOOK_WIDTH,
    MIN_FONT,
    MissingResults,
    book_axes,
    pyplot,
    read_json,
    save_figure,
)
from minilora.experiments.studies.delta_w_common import (
    SWEEP_COMMAND,
    study_command,
)

_KINDS = ("q", "k", "v", "o", "up", "down")
_TARGET_COLORS = {"q,v": "#3c78d0", "all-linear": "#d08c3c", "full": "#c0392b", "q": "#7f8c8d",
                  "k": "#16a085", "v": "#8e44ad", "o": "#2c3e50", "q,k": "#27ae60",
                  "q,k,v,o": "#b8338f"}


def study_record(results: Path, name: str) -> dict:
    only = {"pretrained_spectra": "spectra"}.get(name, name)
    return read_json(Path(results) / "delta_w" / f"{name}.json",
                     study_command(Path(results) / "ablate", Path(results) / "delta_w", only))


def sweep_cells(results: Path) -> list[dict]:
    recs = load_records(Path(results) / "ablate")
    if not recs:
        raise MissingResults(f"{Path(results) / 'ablate' / 'cells'} holds no records; make them "
                             f"with: {SWEEP_COMMAND}")
    return recs


def integer_ticks(ax):
    from matplotlib.ticker import (
        MaxNLocator,  # lazy: matplotlib is optional, needed only to draw
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    ax.tick_params(labelsize=MIN_FONT)


def first_label():
    """``once(text)``: ``text`` the first time it is called with it, None after (one legend
    entry per kind of bar)."""
    seen = set()

    def once(text):
        if text in seen:
            return None
        seen.add(text)
        return text
    return once


def seeds_label(rows) -> str:
    """'1 seed', '2 seeds' or '1-2 seeds' for rows carrying a ``seeds`` count."""
    n = sorted({x["seeds"] for x in rows})
    text = str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"
    return f"{text} seed{'s' if n[-1] > 1 else ''}"


def target_color(label: str) -> str:
    return _TARGET_COLORS.get(label, "#555555")


# ----------------------------------------------------------------------------------------------
# the sweep: Pareto, rank, budget


def fig_pretrained_spectra(results: Path, figures: Path) -> list:
    """The singular spectrum of each of the base's block linears, one panel per kind."""
    d = study_record(results, "pretrained_spectra")
    plt = pyplot()
    fig, axes = plt.subplots(3, 2, figsize=(BOOK_WIDTH, 9.6), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes.ravel(), _KINDS):
        mats = [m for m in d["matrices"] if m["module"].split(".")[-1] == kind]
        for i, m in enumerate(mats):
            s = m["singular_values"]
            ax.semilogy(np.arange(1, len(s) + 1), s, color=cmap(i / max(1, len(mats) - 1)),
                        lw=1.2, label=f"layer {m['module'].split('.')[1]} (erank "
                                      f"{m['effective_rank']:.0f})")
        if mats:
            g = mats[0]["gaussian_singular_values"]
            ax.semilogy(np.arange(1, len(g) + 1), g, color="#999999", ls="--", lw=1,
                        label=f"Gaussian, same shape & norm (erank "
                              f"{mats[0]['gaussian_effective_rank']:.0f})")
            ax.set_title(f"{kind} {tuple(mats[0]['shape'])}", fontsize=9)
        ax.set_xlabel("index i")
        ax.legend(fontsize=MIN_FONT)
    for ax in axes[:, 0]:
        ax.set_ylabel("singular value σ_i")
    fig.suptitle("Spectra of the 36 pre-trained block matrices W (erank: Roy & Vetterli "
                 "effective rank)", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "delta_w_pretrained_spectra.png")]


def fig_phi(results: Path, figures: Path) -> list:
    """φ(i, j) heat maps per layer for q and v, one figure per comparison, with the random
    baseline's sampled mean as the last column."""
    d = study_record(results, "phi")
    plt = pyplot()
    paths = []
    for label, comp in d["comparisons"].items():
        layers = sorted({m["layer"] for m in comp["modules"]})
        kinds = sorted({m["kind"] for m in comp["modules"]}, key=_KINDS.index)
        # each kind's panels (its layers, then the baseline) in rows of at most 4
        ncols = min(4, len(layers) + 1)
        per_kind = -(-(len(layers) + 1) // ncols)
        fig, grid = plt.subplots(len(kinds) * per_kind, ncols,
                                 figsize=(BOOK_WIDTH, 2.3 * len(kinds) * per_kind + 0.7),
                                 squeeze=False, constrained_layout=True)
        for row in range(len(kinds)):
            for i in range(len(layers) + 1, per_kind * ncols):
                grid[row * per_kind + i // ncols, i % ncols].set_axis_off()

        def slot(row, i):
            return grid[row * per_kind + i // ncols, i % ncols]
        ia, jb = comp["grid_shape"]
        ext = (0.5, jb + 0.5, ia + 0.5, 0.5)
        im = None
        for row, kind in enumerate(kinds):
            for col, layer in enumerate(layers):
                m = next(x for x in comp["modules"] if x["kind"] == kind and x["layer"] == layer)
                ax = slot(row, col)
                im = ax.imshow(np.asarray(m["grid"]), vmin=0, vmax=1, cmap="magma",
                               aspect="auto", extent=ext, interpolation="nearest")
                ax.set_title(f"ΔW_{kind}, layer {layer}\nφ(1,1)={m['phi_11']:.2f}",
                             fontsize=MIN_FONT)
                integer_ticks(ax)
                if col % ncols == 0:
                    ax.set_ylabel(f"i (r={comp['a']['r']}, seed {comp['a']['seed']})",
                                  fontsize=MIN_FONT)
                ax.set_xlabel(f"j (r={comp['b']['r']}, seed {comp['b']['seed']})",
                              fontsize=MIN_FONT)
            ax = slot(row, len(layers))
            ax.imshow(np.asarray(comp["baseline_sampled_mean"]), vmin=0, vmax=1, cmap="magma",
                      aspect="auto", extent=ext, interpolation="nearest")
            ax.set_title(f"random subspaces\n(mean of {comp['n_samples']}; E φ = max(i,j)/"
                         f"{comp['d']})", fontsize=MIN_FONT)
            integer_ticks(ax)
        fig.colorbar(im, ax=grid.ravel().tolist(), shrink=0.8, label="φ(i, j) ∈ [0, 1]")
        fig.suptitle(f"Normalised subspace similarity of the A subspaces: {label.replace('_', ' ')}"
                     f"\n(each matrix's last panel: the random baseline)", fontsize=9)
        paths.append(save_figure(fig, Path(figures) / f"delta_w_phi_{label}.png"))
    # the top-direction overlap per layer against its random spread (one summary panel)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for k, (label, comp) in enumerate(d["comparisons"].items()):
        for kind, mk in (("q", "o"), ("v", "s")):
            sel = sorted((m for m in comp["modules"] if m["kind"] == kind),
                         key=lambda m: m["layer"])
            ax.plot([m["layer"] + 0.08 * k for m in sel], [m["phi_11"] for m in sel], marker=mk,
                    ls="-", color=f"C{k}", label=f"{label.replace('_', ' ')}, ΔW_{kind}")
    comp0 = next(iter(d["comparisons"].values()))
    mean, std = comp0["baseline_sampled_mean"][0][0], comp0["baseline_sampled_std"][0][0]
    ax.axhspan(0, mean + 3 * std, color="#999999", alpha=0.25,
               label=f"random: E φ(1,1) = 1/{comp0['d']}, +3 std")
    ax.set_xlabel("layer")
    ax.set_ylabel("φ(1, 1) = cos² of the top directions")
    ax.set_ylim(0, 1.02)
    ax.set_title("Do the top directions of two adapters agree? (φ(1,1) per layer)", fontsize=9)
    ax.legend(fontsize=MIN_FONT, ncol=2)
    fig.tight_layout()
    paths.append(save_figure(fig, Path(figures) / "delta_w_phi_top.png"))
    return paths


def fig_amplification(results: Path, figures: Path) -> list:
    """Table 7's rows vs rank: ||UᵀWVᵀ||_F for ΔW's, W's and random directions, ||ΔW||_F, and
    the amplification factors (mean ± std over layers and seeds)."""
    d = study_record(results, "amplification")
    rows = d["rows"]
    ranks = sorted({x["r"] for x in rows})
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(BOOK_WIDTH, 7.6))
    styles = {"proj_delta": ("ΔW's top-r", "-"), "proj_top": ("W's top-r", "--"),
              "proj_random_exact": ("random (expected)", ":"), "delta_fro": ("||ΔW||_F", "-.")}
    for kind, color in (("q", "C0"), ("v", "C3")):
        for key, (lab, ls) in styles.items():
            m = [statistics.fmean(x[key] for x in rows if x["r"] == r and x["kind"] == kind)
                 for r in ranks]
            s = [statistics.pstdev([x[key] for x in rows if x["r"] == r and x["kind"] == kind])
                 for r in ranks]
            axes[0].errorbar(ranks, m, yerr=s, ls=ls, marker="o", ms=3, capsize=2, color=color,
                             label=f"{kind}: {lab}")
        for key, lab, ls in (("amp_delta", "ΔW's directions", "-"), ("amp_top", "W's top-r", "--"),
                             ("amp_random", "random", ":")):
            m = [statistics.fmean(x[key] for x in rows if x["r"] == r and x["kind"] == kind)
                 for r in ranks]
            s = [statistics.pstdev([x[key] for x in rows if x["r"] == r and x["kind"] == kind])
                 for r in ranks]
            axes[1].errorbar(ranks, m, yerr=s, ls=ls, marker="o", ms=3, capsize=2, color=color,
                             label=f"{kind}: {lab}")
    axes[0].set_ylabel("||Uᵀ W Vᵀ||_F  (and ||ΔW||_F)")
    axes[0].set_title("W projected onto r-dim subspaces", fontsize=9)
    axes[1].set_ylabel("||ΔW||_F / ||Uᵀ W Vᵀ||_F")
    axes[1].set_title("amplification factor (LoRA §7.3)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("LoRA rank r (q,v adapters)")
        ax.legend(fontsize=MIN_FONT, ncol=2)
    fig.suptitle("Does ΔW amplify directions W already has? (mean ± std over layers and seeds)",
                 fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "delta_w_amplification.png")]


def fig_full_vs_lora(results: Path, figures: Path) -> list:
    """Effective rank of ΔW per module kind vs rank (full FT as lines), and the task loss /
    forgetting of the full-FT ΔW truncated to rank r beside LoRA trained at rank r."""
    d = study_record(results, "full_vs_lora")
    plt = pyplot()
    fig, axes = book_axes(plt, 3, 4.0, top=0)
    er = d["effective_rank"]
    ax = axes[0]
    # the LoRAs on every linear (else the sweep's widest target set) against full FT
    sets = [x["targets"] for x in er if x["targets"] != "full"]
    lora_tl = "all-linear" if "all-linear" in sets else max(
        sorted(set(sets)), key=lambda t: (len(t.split(",")), sets.count(t)), default=None)
    for i, kind in enumerate(_KINDS):
        sel = sorted((x for x in er if x["targets"] == lora_tl and x["kind"] == kind),
                     key=lambda x: x["r"])
        if sel:
            ax.plot([x["r"] for x in sel], [x["effective_rank"] for x in sel], marker="o",
                    color=f"C{i}", label=f"LoRA {lora_tl}, {kind}")
        full = [x for x in er if x["targets"] == "full" and x["kind"] == kind]
        if full:
            ax.axhline(full[0]["effective_rank"], color=f"C{i}", ls="--", lw=1,
                       label=f"full FT, {kind}")
    rs = sorted({x["r"] for x in er if x["r"]})
    ax.plot(rs, rs, color="#999999", ls=":", label="erank = r (the most a rank-r ΔW can have)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("effective rank of ΔW (Roy & Vetterli)")
    ax.set_title("ΔW's effective rank: LoRA vs full fine-tuning", fontsize=9)
    ax.legend(fontsize=MIN_FONT, ncol=2)
    tr = d["truncation"]
    for ax, key, lab in ((axes[1], "task_loss", "Milton test loss (nats/char)"),
                         (axes[2], "forgetting", "forgetting (Δ Shakespeare loss, nats/char)")):
        if tr is None:  # a sweep without full fine-tuning: nothing to truncate
            why = (d.get("skipped") or {}).get("truncation", "the sweep has no full FT cell")
            ax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"not drawn: {why}", 48)),
                    ha="center", va="center", fontsize=MIN_FONT, transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ranks = tr["ranks"]
        vals = np.array([[row[key] for row in f["rows"] if row["r"] is not None]
                         for f in tr["full"]])
        ax.errorbar(ranks, vals.mean(axis=0), yerr=vals.std(axis=0, ddof=1) if len(vals) > 1
                    else None, marker="s", capsize=3, color=target_color("full"),
                    label=f"full-FT ΔW truncated to rank r (n={len(vals)} seeds)")
        untr = statistics.fmean(row[key] for f in tr["full"] for row in f["rows"]
                                if row["r"] is None)
        ax.axhline(untr, color=target_color("full"), ls=":", label="full-FT ΔW on the linears, untruncated")
        rec_key = "record_task_loss" if key == "task_loss" else "record_forgetting"
        ax.axhline(statistics.fmean(f[rec_key] for f in tr["full"]), color=target_color("full"),
                   ls="--", label="full fine-tuning (every parameter)")
        for tl, lk in (("all-linear", "lora_all_linear"), ("q,v", "lora_qv")):
            sel = tr[lk]
            if sel:
                ax.errorbar([x["r"] for x in sel], [x[key] for x in sel],
                            yerr=[x[key + "_std"] for x in sel], marker="o", capsize=3,
                            color=target_color(tl), label=f"LoRA {tl} trained at rank r")
        if key == "task_loss":
            ax.axhline(tr["full"][0]["base_task_loss"], color="#999999", ls="-.", lw=1,
                       label="base model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(lab)
        ax.legend(fontsize=MIN_FONT)
    axes[1].set_title("Truncated full-FT ΔW vs LoRA at the same rank", fontsize=9)
    if tr is None:
        axes[1].set_title("Truncated full-FT ΔW vs LoRA (needs full fine-tuning)", fontsize=9)
    axes[2].set_title("... and what each forgets", fontsize=9)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "delta_w_full_vs_lora.png")]


def fig_intruders(results: Path, figures: Path) -> list:
    """The null that fixes ε and k; intruder counts per layer vs rank and full FT; count vs ε."""
    d = study_record(results, "intruders")
    null, counts = d["null"], d["counts"]
    eps, k = null["eps"], null["k"]
    plt = pyplot()
    fig, axes = book_axes(plt, 3, 4.2, top=1)
    ax = axes[0]
    for i, (lev, v) in enumerate(null["levels"].items()):
        q = v["quantiles_by_rank"]
        j = np.arange(1, len(q["0.5"]) + 1)
        ax.plot(j, q["0.5"], color=f"C{i}", label=f"W vs W+N, ||N||/||W|| = "
                                                 f"{v['relative_noise']:.3f}: median")
        ax.fill_between(j, v["min_by_rank"], q["0.5"], color=f"C{i}", alpha=0.15)
    fl = null["random_floor"]
    ax.axhspan(fl["q01"], fl["q99"], color="#999999", alpha=0.3,
               label=f"random unit vector vs a basis of R^{null['d']} (1-99 %)")
    ax.axhline(eps, color="k", ls="--", label=f"chosen ε = {eps:g}")
    ax.axvline(k + 0.5, color="k", ls=":", label=f"chosen k = {k}")
    ax.set_xlabel("rank j of the perturbed singular vector")
    ax.set_ylabel("max_i |cos(y_j, x_i)|")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Null distribution ({null['matrices']} matrices × {null['n_draws']} draws; "
                 "band: min to median)", fontsize=MIN_FONT)
    ax.legend(fontsize=MIN_FONT)
    ax = axes[1]
    groups = {}
    for c in counts:
        groups.setdefault((c["targets"], c["r"]), []).append(c)
    layers = sorted({int(lay) for c in counts for lay in c["per_layer"]})
    order = sorted(groups, key=lambda g: (g[0] != "full", g[0], g[1] or 0))
    width = 0.8 / max(1, len(layers))
    for li, layer in enumerate(layers):
        vals = [statistics.fmean(c["per_layer"].get(str(layer), c["per_layer"].get(layer, 0))
                                 for c in groups[g]) for g in order]
        ax.bar(np.arange(len(order)) + li * width, vals, width,
               color=pyplot().get_cmap("viridis")(li / max(1, len(layers) - 1)),
               label=f"layer {layer}")
    ax.set_xticks(np.arange(len(order)) + 0.4 - width / 2)
    ax.set_xticklabels([("full FT" if t == "full" else f"{t} r={r}") for t, r in order],
                       fontsize=MIN_FONT, rotation=90)
    ax.set_ylabel(f"intruders per layer (ε={eps:g}, k={k}; mean over seeds)")
    ax.set_title(f"Intruder dimensions per layer ({', '.join(null['modules'])} matrices)",
                 fontsize=MIN_FONT)
    ax.legend(fontsize=MIN_FONT, ncol=2)
    ax = axes[2]
    eps_grid = [float(e) for e in counts[0]["by_eps"]]
    for g in order:
        if g[0] not in ("q,v", "all-linear", "full"):
            continue
        vals = [statistics.fmean(c["by_eps"][f"{e:g}"] / max(1, c["matrices"]) for c in groups[g])
                for e in eps_grid]
        ax.plot(eps_grid, vals, marker="o", ms=3, color=target_color(g[0]),
                alpha=1.0 if g[0] == "full" else 0.35 + 0.65 * np.log2(g[1] or 1) / 6,
                ls="--" if g[0] == "full" else "-",
                label="full FT" if g[0] == "full" else f"{g[0]} r={g[1]}")
    ax.axvline(eps, color="k", ls="--", lw=0.8)
    ax.set_xlabel("ε (cosine threshold)")
    ax.set_ylabel(f"intruders per adapted matrix among the top {k}")
    ax.set_title("Intruders vs ε (the paper's Fig. 4 view)", fontsize=MIN_FONT)
    ax.legend(fontsize=MIN_FONT, ncol=2)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "delta_w_intruders.png")]


def fig_intruders_forgetting(results: Path, figures: Path) -> list:
    """Total intruders vs forgetting per cell (Spearman ρ), and scaling the intruders down."""
    d = study_record(results, "intruders")
    counts, sc = d["counts"], d["scaling"]
    plt = pyplot()
    fig, axes = book_axes(plt, 3, 4.2, top=0)
    ax = axes[0]
    seen = set()
    for c in counts:
        lab = c["targets"]
        ax.scatter(c["total"] / max(1, c["matrices"]), c["forgetting"], color=target_color(lab),
                   marker="s" if lab == "full" else "o", s=22,
                   label=None if lab in seen else ("full FT" if lab == "full" else f"LoRA {lab}"))
        seen.add(lab)
    rho = d["spearman"]
    ax.set_xlabel(f"intruders per examined matrix (ε={d['null']['eps']:g}, k={d['null']['k']})")
    ax.set_ylabel("forgetting (Δ Shakespeare loss, nats/char)")
    ax.set_title(f"Spearman ρ (intruder total vs forgetting): all cells "
                 f"{rho['all_cells']['rho']:.2f} (p={rho['all_cells']['p']:.2g}); LoRA only "
                 f"{rho['lora_cells']['rho']:.2f} (p={rho['lora_cells']['p']:.2g})",
                 fontsize=MIN_FONT)
    ax.legend(fontsize=MIN_FONT)
    for ax, key, lab in ((axes[1], "forgetting", "forgetting (nats/char)"),
                         (axes[2], "task_loss", "Milton test loss (nats/char)")):
        names, width = [], 0.25
        once = first_label()
        for i, row in enumerate(sc):
            names.append(f"{row['targets']} r={row['r']}\n({row['matrices_with_intruders']} "
                         "matrices)")
            ax.bar(i - width, row["unchanged"][key], width, color="#999999",
                   label=once("λ = 1 (as trained)"))
            for s_i, s in enumerate(row["scaled"]):
                ax.bar(i + s_i * width, s["intruder"][key], width * 0.5,
                       color=("C3", "C1")[s_i % 2],
                       label=once(f"top intruder × {s['lambda']:g}"))
                ax.bar(i + s_i * width + width * 0.5, s["control"][key], width * 0.5,
                       color=("C0", "C9")[s_i % 2],
                       label=once(f"control (nearest non-intruder) × {s['lambda']:g}"))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=MIN_FONT)
        ax.set_ylabel(lab)
        if key == "task_loss":
            vals = [row["unchanged"][key] for row in sc] + [s[w][key] for row in sc
                                                           for s in row["scaled"]
                                                           for w in ("intruder", "control")]
            if vals:
                lo, hi = min(vals), max(vals)
                ax.set_ylim(lo - 0.2 * (hi - lo) - 1e-3, hi + 0.2 * (hi - lo) + 1e-3)
        ax.legend(fontsize=MIN_FONT)
    axes[1].set_title("Scaling each matrix's top intruder: forgetting", fontsize=MIN_FONT)
    axes[2].set_title("... and the task loss", fontsize=MIN_FONT)
    fig.tight_layout()
    return [save_figure(fig, Path(figures) / "delta_w_intruders_forgetting.png")]
