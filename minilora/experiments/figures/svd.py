"""Figures of one adapter's ΔW analysis (``minilora svd``), drawn from its module records.

Each function takes a list of :class:`~minilora.analysis.ModuleRecord` (from the analysis, or read
back from ``records.json`` with :func:`minilora.experiments.svd_tables.read_records`) and the PNG
path to write, and returns that path:

* :func:`fig_svd_spectrum`: the singular values σ_i of ΔW = s·B A, one panel per layer, one line
  per module type (q, v, down_proj, ...);
* :func:`fig_svd_phi`: φ(1, 1) and φ(r, r') per layer and module type as heat maps, each beside the
  same map for random subspaces of the same width (E φ = 1/d and max(r, r')/d) and their ratio;
* :func:`fig_svd_phi_grids`: the LoRA paper's Figure 3 view, φ(i, j) for i <= r, j <= r', one
  panel per layer for one module type;
* :func:`fig_svd_intruders`: intruder dimensions per layer and module type;
* :func:`fig_svd_amplification`: the amplification factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F per layer and
  module type, beside what random directions of the same rank would give;
* :func:`fig_svd_layers`: for one module type, ‖ΔW‖_F, effective rank, amplification and
  intruders against the layer, one line per adapter (many adapters side by side);
* :func:`fig_svd_pairs`: φ(r, r') between every pair of adapters, per module type and layer, as
  a multiple of the null's 95th percentile.

Modules are keyed by their type (the full path with the layer replaced by ``*``), labelled by
the shortest name that tells the types apart (``attn.c_proj`` / ``mlp.c_proj``, ``encoder q`` /
``decoder SelfAttention.q``), and layers run in numeric order.

:func:`svd_figures` draws those that the records allow (φ needs a second adapter, amplification
and intruders need the base weights); :func:`fig_svd_milton` is the ``minilora figures`` entry
that redraws the committed Milton run from ``results/svd/milton-lora/records.json``.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from minilora.analysis import module_type as path_type
from minilora.analysis import type_labels
from minilora.experiments.figures.common import (
    BOOK_WIDTH,
    MIN_FONT,
    MissingResults,
    book_axes,
    pyplot,
    save_figure,
)
from minilora.experiments.svd_report import RECORDS_JSON
from minilora.experiments.svd_tables import run_from_json

SVD_MILTON_COMMAND = ("minilora svd chapters/assets/milton-lora/adapter.safetensors "
                      "--out results/svd/milton-lora")
MAX_PANELS = 16    # per-layer figures show at most this many layers (evenly spaced)


def module_type(rec) -> str:
    """A record's type key (the path with the layer replaced by ``*``)."""
    return getattr(rec, "module_type", "") or path_type(rec.module)


def _layer_label(layer) -> str:
    return "no layer" if layer is None else str(layer)


def _layers(records) -> list:
    """Layer indices in numeric order, with None (modules outside the blocks) last."""
    found = {r.layer for r in records}
    return sorted(x for x in found if x is not None) + ([None] if None in found else [])


def _types(records) -> list[str]:
    seen = []
    for r in records:
        t = module_type(r)
        if t not in seen:
            seen.append(t)
    return seen


def _labels(records) -> dict:
    return type_labels(_types(records))


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in label).strip("_") or "module"


def _spaced(items: list, n: int = MAX_PANELS) -> list:
    """At most ``n`` of ``items``, evenly spaced, first and last kept."""
    if len(items) <= n:
        return items
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def _grid(plt, n: int, size=(2.6, 2.2), sharey: bool = False, layout=None):
    ncols = n if n <= 4 else 3 if n in (5, 6, 9) else 4
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols + 0.6, size[1] * nrows + 0.8),
                             squeeze=False, sharey=sharey, layout=layout)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _colors(plt, types):
    cmap = plt.get_cmap("tab10")
    return {t: cmap(i % 10) for i, t in enumerate(types)}


def _matrix(records, field: str):
    """(layers × types) array of ``field`` (NaN where a module is missing or the field is None)."""
    layers, types = _layers(records), _types(records)
    M = np.full((len(layers), len(types)), np.nan)
    for r in records:
        v = getattr(r, field)
        if v is not None:
            M[layers.index(r.layer), types.index(module_type(r))] = v
    return M, layers, types


def fig_svd_spectrum(records, path, title: str = "") -> Path:
    """Singular values σ_i of ΔW (log scale) against i, one panel per layer, one line per module
    type. A flat spectrum means ΔW uses all r directions; a steep one means a few dominate."""
    plt = pyplot()
    layers, types = _spaced(_layers(records)), _types(records)
    labels = _labels(records)
    colors = _colors(plt, types)
    fig, axes = _grid(plt, len(layers), sharey=True)
    positive = [s for r in records for s in r.singular_values if s > 0]
    for ax, layer in zip(axes, layers):
        for r in (r for r in records if r.layer == layer):
            s = np.asarray(r.singular_values, float)
            ax.plot(np.arange(1, s.size + 1), np.where(s > 0, s, np.nan), "o-", ms=3, lw=1.2,
                    color=colors[module_type(r)], label=labels[module_type(r)])
        if positive:
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(f"layer {_layer_label(layer)}", fontsize=9)
        ax.set_xlabel("index i", fontsize=8)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("σ_i(ΔW) (log scale)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[t], marker="o", ms=3, label=labels[t])
               for t in types]
    fig.legend(handles=handles, loc="upper right", fontsize=8, title="module", title_fontsize=8)
    total = len(_layers(records))
    shown = "" if len(layers) == total else f" ({len(layers)} of {total} layers shown)"
    fig.suptitle(f"{title + ': ' if title else ''}singular values of ΔW = s·B·A per layer{shown}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    return save_figure(fig, Path(path))


def _heat(ax, M, layers, types, vmax, cmap, annotate: bool, xlabels: bool = True,
          names: dict | None = None):
    im = ax.imshow(M, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    shown = [(names or {}).get(t, t) for t in types]
    ax.set_xticks(range(len(types)), shown if xlabels else [], rotation=45, ha="right",
                  fontsize=MIN_FONT)
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [_layer_label(layers[i])
                                                for i in range(0, len(layers), step)],
                  fontsize=MIN_FONT)
    if xlabels:
        ax.set_xlabel("module", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    if annotate:
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                if np.isfinite(M[i, j]):
                    ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=MIN_FONT,
                            color="white" if M[i, j] < 0.6 * vmax else "black")
    return im


def fig_svd_phi(records, path, title: str = "") -> Path:
    """φ per layer (rows) and module type (columns): measured, the null, and their ratio.

    Left column: φ(1, 1) (|cos|² of the two adapters' top directions); right column: φ(r, r')
    (the whole subspaces). The first row is the measured φ, the second the 95th percentile of φ
    between random subspaces of the same width and ranks (the null: a pair of unrelated adapters
    exceeds it 5 % of the time), both on one colour scale, [0, 1]; the third is measured / null
    p95: above 1, more alike than 95 % of random pairs. It stays readable at large d, where both
    φ values are small. Two columns keep it within the book's column (``BOOK_WIDTH``)."""
    plt = pyplot()
    recs = [r for r in records if r.phi_full is not None]
    pairs = [("phi_top1", "phi_null95_top1", "φ(1,1)"),
             ("phi_full", "phi_null95_full", "φ(r,r')")]
    _, layers, types = _matrix(recs, "phi_full")
    names = _labels(recs)
    annotate = len(layers) * len(types) <= 48
    per_layer = 0.22 if len(layers) <= 16 else 0.12
    fig, axes = plt.subplots(3, 2, figsize=(min(BOOK_WIDTH, 2 * (1.1 + 0.45 * len(types)) + 2.2),
                                            3 * (1.0 + per_layer * len(layers)) + 1.4),
                             squeeze=False, layout="constrained")
    ratios = [_matrix(recs, m)[0] / _matrix(recs, b)[0] for m, b, _ in pairs]
    rmax = max(2.0, float(np.nanmax([np.nanmax(x) for x in ratios])))
    im = im_ratio = None
    for k, (col, (meas, base, name)) in enumerate(zip(axes.T, pairs)):
        for ax, field, label in ((col[0], meas, f"{name}, measured"),
                                 (col[1], base, f"{name}, random: 95th percentile")):
            M, _, _ = _matrix(recs, field)
            im = _heat(ax, M, layers, types, 1.0, "viridis", annotate, xlabels=False,
                       names=names)
            ax.set_title(label, fontsize=MIN_FONT)
        im_ratio = _heat(col[2], ratios[k], layers, types, rmax, "magma", annotate,
                         xlabels=True, names=names)
        col[2].set_title(f"{name}, measured / null p95", fontsize=MIN_FONT)
    fig.colorbar(im, ax=axes[:2, :].ravel().tolist(), shrink=0.8,
                 label="φ (0: orthogonal, 1: same)")
    fig.colorbar(im_ratio, ax=axes[2, :].tolist(), shrink=0.8,
                 label="φ / null p95 (> 1: beyond chance)")
    ranks = sorted({(r.r, r.other_r) for r in recs})
    rank_text = (f" (r={ranks[0][0]}, r'={ranks[0][1]})" if len(ranks) == 1 else "")
    fig.suptitle(f"{title + ': ' if title else ''}subspace similarity φ of the two adapters' "
                 f"'{recs[0].phi_subspace}' subspaces{rank_text}", fontsize=9)
    return save_figure(fig, Path(path))


def fig_svd_phi_grids(records, path, mtype: str, title: str = "") -> Path:
    """The LoRA paper's Figure 3 view for one module type: φ(i, j) between the top-i directions
    of the first adapter and the top-j of the second, one panel per layer; each panel's title
    gives the random expectation of φ(r, r') = max(r, r')/d to read it against."""
    plt = pyplot()
    recs = {r.layer: r for r in records
            if module_type(r) == mtype and r.phi_grid is not None}
    label = _labels(records).get(mtype, mtype)
    layers = _spaced(_layers(list(recs.values())))
    fig, axes = _grid(plt, len(layers), size=(2.2, 2.1), layout="constrained")
    im = None
    for ax, layer in zip(axes, layers):
        r = recs[layer]
        G = np.asarray(r.phi_grid, float)
        im = ax.imshow(G, origin="lower", cmap="viridis", vmin=0, vmax=1,
                       extent=(0.5, G.shape[1] + 0.5, 0.5, G.shape[0] + 0.5))
        ax.set_title(f"layer {_layer_label(layer)} (null p95 {r.phi_null95_full:.2g})",
                     fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("j (other adapter)", fontsize=7)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("i (this adapter)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8, label="φ(i, j)")
    total = len(_layers(list(recs.values())))
    shown = "" if len(layers) == total else f" ({len(layers)} of {total} layers shown)"
    fig.suptitle(f"{title + ': ' if title else ''}φ(i, j) of {label}, per layer{shown}",
                 fontsize=9)
    return save_figure(fig, Path(path))


def _bars(ax, records, field, colors, types, layers, hatch_field=None, names=None):
    width = 0.8 / len(types)
    names = names or {}
    for k, t in enumerate(types):
        xs, ys, unc = [], [], []
        for r in records:
            if module_type(r) == t and getattr(r, field) is not None:
                xs.append(layers.index(r.layer) + (k - (len(types) - 1) / 2) * width)
                ys.append(getattr(r, field))
                unc.append(getattr(r, hatch_field) or 0 if hatch_field else 0)
        ax.bar(xs, ys, width, color=colors[t], label=names.get(t, t))
        if any(unc):
            ax.bar(xs, unc, width, bottom=np.asarray(ys) - np.asarray(unc), color="none",
                   edgecolor="black", hatch="///", lw=0)
    ax.set_xticks(range(len(layers)), [_layer_label(x) for x in layers], fontsize=7)


def fig_svd_intruders(records, path, title: str = "") -> Path:
    """Intruder dimensions per layer (bars per module type): of the top k singular vectors of
    W0 + ΔW, how many have max |cos| < ε with every singular vector of W0 (the paper's count).
    Where only bounds are known (``--intruders approx``), the bar reaches the upper bound and
    the hatched part is the range the count lies in."""
    plt = pyplot()
    recs = [r for r in records if r.intruder_count_min is not None]
    layers, types = _layers(recs), _types(recs)
    colors = _colors(plt, types)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(layers) * max(1, len(types) / 2) + 2),
                                    3.4))
    _bars(ax, recs, "intruder_count_max", colors, types, layers, "intruder_uncertain",
          names=_labels(recs))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"intruder dimensions (of top {recs[0].intruder_k})")
    ax.set_ylim(0, max(1, max(r.intruder_count_max for r in recs)) * 1.1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    handles, _ = ax.get_legend_handles_labels()
    if any(r.intruder_uncertain for r in recs):
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="black",
                                     hatch="///", lw=0, label="range (bounds only)"))
    ax.legend(handles=handles, fontsize=7, title="module", title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{title + ': ' if title else ''}intruder dimensions per layer "
                 f"(k={recs[0].intruder_k}, ε={recs[0].intruder_eps:g})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def fig_svd_amplification(records, path, title: str = "") -> Path:
    """The LoRA paper's amplification factor ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F per layer (solid, one line
    per module type, U_r and V_r ΔW's own top-r singular vectors) and the same ratio for random
    directions of rank r, ‖ΔW‖_F / (r ‖W‖_F / sqrt(d_out d_in)) (dashed): ΔW amplifies directions
    W already holds when the solid line lies well below the dashed one."""
    plt = pyplot()
    recs = [r for r in records if r.amplification is not None]
    layers, types = _layers(recs), _types(recs)
    names = _labels(recs)
    colors = _colors(plt, types)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(layers) + 3), 3.6))
    for t in types:
        rs = [r for r in recs if module_type(r) == t]
        x = [layers.index(r.layer) for r in rs]
        ax.plot(x, [r.amplification for r in rs], "o-", color=colors[t], ms=4, label=names[t])
        ax.plot(x, [r.delta_fro / r.w_proj_random if r.w_proj_random else np.nan for r in rs],
                "--", color=colors[t], alpha=0.7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [_layer_label(x) for x in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("‖ΔW‖F / ‖UᵀWV‖F (ratio)")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="gray", ls="-", marker="o", ms=4,
                           label="U, V: ΔW's top-r"),
                plt.Line2D([], [], color="gray", ls="--", label="U, V: random, rank r")]
    ax.legend(handles=handles, fontsize=7, title="module", title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    ranks = sorted({r.r for r in recs})
    ax.set_title(f"{title + ': ' if title else ''}amplification factor per layer "
                 f"(r={'/'.join(str(x) for x in ranks)})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def fig_svd_layers(run, mtype: str, path, title: str = "") -> Path:
    """One module type across layers (x axis), one line per adapter: ‖ΔW‖_F, the effective
    rank (of r), and with base weights the amplification factor and the intruder count (a
    range drawn as a band where only bounds are known)."""
    plt = pyplot()
    groups = [(a.label, [r for r in a.records if module_type(r) == mtype]) for a in run.adapters]
    groups = [(lab, rs) for lab, rs in groups if rs]
    allrecs = [r for _, rs in groups for r in rs]
    layers = _layers(allrecs)
    with_base = any(r.amplification is not None for r in allrecs)
    panels = [("delta_fro", "‖ΔW‖F"), ("effective_rank", "effective rank")]
    if with_base:
        panels += [("amplification", "amplification"), ("intruder_count", "intruders")]
    fig, axes = book_axes(plt, len(panels), 2.5)   # two panels a row, the book's width
    cmap = plt.get_cmap("tab10")
    for ax, (field, name) in zip(axes, panels):
        for k, (lab, rs) in enumerate(groups):
            x = [layers.index(r.layer) for r in rs]
            if field == "intruder_count":
                lo = [r.intruder_count_min for r in rs]
                hi = [r.intruder_count_max for r in rs]
                ax.plot(x, hi, "o-", color=cmap(k % 10), ms=3, label=lab)
                if lo != hi:
                    ax.fill_between(x, lo, hi, color=cmap(k % 10), alpha=0.2)
            else:
                y = [np.nan if getattr(r, field) is None else getattr(r, field) for r in rs]
                ax.plot(x, y, "o-", color=cmap(k % 10), ms=3, label=lab)
        if field == "amplification":
            ax.set_yscale("log")
        if field == "intruder_count":
            ax.set_ylim(-0.3, max(r.intruder_k or 1 for r in allrecs) + 0.3)
            ax.yaxis.get_major_locator().set_params(integer=True)
        if field == "effective_rank":
            ranks = sorted({r.r for r in allrecs})
            ax.set_title(f"{name} (r = {'/'.join(map(str, ranks))})", fontsize=MIN_FONT + 1)
        else:
            ax.set_title(name, fontsize=MIN_FONT + 1)
        step = max(1, math.ceil(len(layers) / 10))
        ax.set_xticks(range(0, len(layers), step),
                      [_layer_label(layers[i]) for i in range(0, len(layers), step)])
        ax.set_xlabel("layer", fontsize=MIN_FONT)
        ax.tick_params(labelsize=MIN_FONT)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    ncol = min(len(names), 4)
    rows = math.ceil(len(names) / ncol) if ncol else 0
    fig.legend(handles, names, loc="lower center", ncol=max(ncol, 1), fontsize=MIN_FONT,
               title="adapter", title_fontsize=MIN_FONT, frameon=False)
    label = type_labels(_types([r for a in run.adapters for r in a.records])).get(mtype, mtype)
    fig.suptitle(f"{title + ': ' if title else ''}{label} ({mtype}) across layers",
                 fontsize=MIN_FONT + 1)
    # room at the bottom for the legend: its title and rows, ~0.22 in each
    fig.tight_layout(rect=(0, min(0.4, 0.22 * (rows + 1) / fig.get_size_inches()[1]), 1, 1))
    return save_figure(fig, Path(path))


def fig_svd_pairs(run, path, title: str = "") -> Path:
    """φ(r, r') of every pair of adapters as a multiple of the null's 95th percentile, one panel
    per module type, pairs as rows and layers as columns (> 1: beyond 95 % of random pairs)."""
    plt = pyplot()
    labels = [a.label for a in run.adapters]
    types = list(dict.fromkeys(p.module_type for p in run.pairs))
    names = type_labels(types)
    pairs = list(dict.fromkeys((p.a, p.b) for p in run.pairs))
    layers = _layers(run.pairs)
    # the book's width, two panels a row; the pairs' names on the first column only
    ncols = 1 if len(types) == 1 else 2
    nrows = math.ceil(len(types) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(BOOK_WIDTH, nrows * (0.3 * len(pairs) + 1.2)
                                                    + 0.6), squeeze=False, layout="constrained")
    flat = list(grid.ravel())
    for ax in flat[len(types):]:
        ax.set_visible(False)
    axes = flat[:len(types)]
    vals = [p.phi_full / p.phi_null95_full for p in run.pairs if p.phi_null95_full]
    vmax = max(2.0, float(np.nanmax(vals))) if vals else 2.0
    im = None
    for ax, t in zip(axes, types):
        M = np.full((len(pairs), len(layers)), np.nan)
        for p in run.pairs:
            if p.module_type == t and p.phi_null95_full:
                M[pairs.index((p.a, p.b)), layers.index(p.layer)] = p.phi_full / p.phi_null95_full
        im = ax.imshow(M, aspect="auto", cmap="magma", vmin=0, vmax=vmax,
                       interpolation="nearest")
        first = ax.get_subplotspec().is_first_col()
        ax.set_yticks(range(len(pairs)), [f"{labels[a]} / {labels[b]}" for a, b in pairs]
                      if first else [], fontsize=MIN_FONT)
        step = max(1, math.ceil(len(layers) / 8))
        ax.set_xticks(range(0, len(layers), step),
                      [_layer_label(layers[i]) for i in range(0, len(layers), step)],
                      fontsize=MIN_FONT)
        ax.set_xlabel("layer", fontsize=MIN_FONT)
        ax.set_title(names[t], fontsize=MIN_FONT + 1)
    bar = fig.colorbar(im, ax=axes, shrink=0.8)
    bar.set_label("φ(r,r') / null p95", fontsize=MIN_FONT)
    bar.ax.tick_params(labelsize=MIN_FONT)
    fig.suptitle(f"{title + ': ' if title else ''}φ between adapters against the random null",
                 fontsize=MIN_FONT + 1)
    return save_figure(fig, Path(path))


def svd_figures(run, out_dir, title: str = "", prefix: str = "svd") -> list[Path]:
    """Every figure a run allows, written into ``out_dir`` as ``<prefix>_<name>.png``.

    One adapter: the spectrum always; φ (heat map, and one φ(i, j) grid figure per module type,
    ``<prefix>_phi_<type>.png``) with ``--other``; intruders and amplification with base
    weights. Several adapters: per module type, ``<prefix>_layers_<type>.png``, and the pairs'
    φ against the null, ``<prefix>_pairs.png``. A run may also be a plain list of records (one
    adapter)."""
    out_dir = Path(out_dir)
    adapters = getattr(run, "adapters", None)
    records = adapters[0].records if adapters is not None else list(run)
    paths = []
    if adapters is not None and len(adapters) > 1:
        allrecs = [r for a in adapters for r in a.records]
        labels = _labels(allrecs)
        for t in _types(allrecs):
            paths.append(fig_svd_layers(run, t, out_dir / f"{prefix}_layers_{_slug(labels[t])}"
                                                          f".png", title))
        if run.pairs:
            paths.append(fig_svd_pairs(run, out_dir / f"{prefix}_pairs.png", title))
        return paths
    if not records:
        return paths
    paths.append(fig_svd_spectrum(records, out_dir / f"{prefix}_spectrum.png", title))
    if any(r.phi_full is not None for r in records):
        paths.append(fig_svd_phi(records, out_dir / f"{prefix}_phi.png", title))
        recs = [r for r in records if r.phi_grid is not None]
        labels = _labels(recs)
        for t in _types(recs):
            paths.append(fig_svd_phi_grids(records, out_dir / f"{prefix}_phi_{_slug(labels[t])}"
                                                              f".png", t, title))
    if any(r.intruder_count_min is not None for r in records):
        paths.append(fig_svd_intruders(records, out_dir / f"{prefix}_intruders.png", title))
    if any(r.amplification is not None for r in records):
        paths.append(fig_svd_amplification(records, out_dir / f"{prefix}_amplification.png",
                                           title))
    return paths


def fig_svd_milton(results: Path, figures: Path) -> list:
    """The figures of ``results/svd/milton-lora/records.json`` (the Milton LoRA against the
    shipped base) as ``figures/svd_milton_lora_*.png``: a ``minilora figures`` entry."""
    path = Path(results) / "svd" / "milton-lora" / RECORDS_JSON
    if not path.exists():
        raise MissingResults(f"{path} not found; make it with: {SVD_MILTON_COMMAND}")
    return svd_figures(run_from_json(path), Path(figures), "milton-lora",
                       prefix="svd_milton_lora")


__all__ = ["SVD_MILTON_COMMAND", "fig_svd_amplification", "fig_svd_intruders", "fig_svd_layers",
           "fig_svd_milton", "fig_svd_pairs", "fig_svd_phi", "fig_svd_phi_grids",
           "fig_svd_spectrum", "module_type", "svd_figures"]
