"""ΔW under the microscope on the shipped model: the LoRA paper's §7 and full fine-tuning vs LoRA.

Reads the ablation sweep (``results/ablate/cells/*.json``, :mod:`minilora.experiments.ablate`) and
the weights its cells kept under ``runs/ablate/<key>/``; writes one JSON per study under
``results/delta_w/`` (figures are drawn from those alone, :mod:`minilora.experiments.figures.delta_w`):

* ``pretrained_spectra.json``: the singular spectrum of each of the 36 block linears W of the base,
  its effective / stable rank and the rank holding 90 % of its energy, beside a Gaussian matrix of
  the same shape and norm (is W itself rank-deficient?);
* ``phi.json``: the LoRA paper's φ(i, j) between the A subspaces (right singular vectors of A, in
  R^160) of r = 8 vs r = 64 adapters and of two seeds at r = 8 and at r = 64, for q and v of every
  layer, with the random baseline: E φ = max(i, j)/d exactly, and the mean and std of φ between
  pairs of Haar-random subspaces (sampled);
* ``amplification.json``: Table 7's rows per rank and layer: ||U_rᵀ W V_r||_F for ΔW's own top-r
  directions, W's top-r directions and random ones, ||ΔW||_F, and the amplification
  ||ΔW||_F / ||U_rᵀ W V_r||_F for each choice;
* ``full_vs_lora.json``: effective rank of ΔW for full fine-tuning and each LoRA rank; the task loss
  and forgetting after replacing the full-FT ΔW (all 36 linears) by its rank-r truncation, beside
  LoRA trained at rank r;
* ``intruders.json``: the null distribution (W vs W + a Gaussian perturbation as large as full
  fine-tuning's ΔW) that fixes ε and k, intruder counts per layer and cell, their Spearman
  correlation with forgetting, and the task loss / forgetting after scaling each matrix's top
  intruder by λ = 0.5 and 0 (control: the same for its nearest non-intruder direction).

Evaluations use the harness's own fixed windows (:func:`minilora.experiments.finetune.finetune`:
seed 12345, the same batch shapes), and each study first checks that it reproduces the record's
task loss for the trained weights.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from minilora.analysis import (
    analyze_lora_module,
    effective_rank,
    phi_grid,
    phi_random_expectation,
    random_orthonormal,
    rank_for_energy,
    singular_values,
    stable_rank,
    subspace_basis,
)
from minilora.checkpoint import load_checkpoint
from minilora.experiments.ablate_records import DEFAULT_RUNS, load_records, target_label
from minilora.experiments.paths import base_model_path
from minilora.experiments.studies.delta_w_common import (
    OUT,
    Evaluator,
    StudyError,
    adapter_factors,
    find_cells,
    linear_names,
    one_cell,
    rounded,
    sweep_command,
)
from minilora.experiments.studies.delta_w_fullft import (
    budget_table,
    effective_rank_table,
    intruder_counts,
    intruder_null,
    intruder_scaling,
    spearman,
    truncation_study,
)
from minilora.io import atomic_write_json

# ----------------------------------------------------------------------------------------------
# 1. the pretrained spectra


def pretrained_spectra(base=None, seed: int = 0) -> dict:
    """The spectrum of each block linear of the base, beside a Gaussian matrix of the same shape
    and Frobenius norm (its effective rank is what "not rank-deficient" looks like)."""
    model, _, _ = load_checkpoint(base or base_model_path())
    params = dict(model.named_parameters())
    rng = np.random.default_rng(seed)
    out = []
    for n in linear_names(model):
        W = np.asarray(params[n + ".weight"], np.float64)
        s = singular_values(W)
        G = rng.standard_normal(W.shape)
        g = singular_values(G * np.linalg.norm(W) / np.linalg.norm(G))
        out.append({"module": n, "shape": list(W.shape), "singular_values": rounded(s),
                    "effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
                    "rank_90": rank_for_energy(s, 0.9), "gaussian_effective_rank": effective_rank(g),
                    "gaussian_rank_90": rank_for_energy(g, 0.9),
                    "gaussian_singular_values": rounded(g, 4)})
    return {"matrices": out, "note": "gaussian_*: one N(0,1) matrix of the same shape scaled to "
            f"||W||_F (seed {seed})"}


# ----------------------------------------------------------------------------------------------
# 2. φ between adapters, with its random baseline


def random_phi_grid(d: int, i: int, j: int, n_samples: int = 200, seed: int = 0):
    """Mean and std over ``n_samples`` pairs of Haar-random subspaces of R^d of φ(i', j') for every
    i' <= i, j' <= j (:func:`phi_grid` of random bases)."""
    rng = np.random.default_rng(seed)
    grids = np.stack([phi_grid(random_orthonormal(d, i, rng), random_orthonormal(d, j, rng))
                      for _ in range(n_samples)])
    return grids.mean(axis=0), grids.std(axis=0, ddof=1)


def phi_study(records, runs=DEFAULT_RUNS, steps=None, modules=("q", "v"),
              n_samples: int = 200, small: int = 8, large: int = 64, show: int = 16,
              bar=None, explain=str) -> dict:
    """φ(i, j) between A subspaces for r=small vs r=large (seed 0), r=small seed 0 vs seed 1,
    and r=large seed 0 vs seed 1, for ``modules`` of every layer, with the random baseline
    (module docstring). The large-vs-large grid is kept for i, j <= ``show`` (and its diagonal).
    A comparison whose cells the sweep lacks is left out (``"skipped"``: which cells, in the
    words of ``explain(error)``); with none left, :class:`StudyError`."""
    pairs = {f"r{small}_vs_r{large}": ((small, 0), (large, 0)),
             f"r{small}_seed0_vs_seed1": ((small, 0), (small, 1)),
             f"r{large}_seed0_vs_seed1": ((large, 0), (large, 1))}
    loaded, skipped, first = {}, {}, None
    for label, ((ra, sa), (rb, sb)) in pairs.items():
        try:
            for r, s in ((ra, sa), (rb, sb)):
                if (r, s) not in loaded:
                    loaded[(r, s)] = adapter_factors(one_cell(records, targets="q,v", r=r,
                                                              seed=s, steps=steps), runs)
        except StudyError as e:
            skipped[label] = explain(e)
            first = first or e
    out = {"subspace": "A (right singular vectors of A, in R^d_in)", "comparisons": {}}
    d = None
    for label, ((ra, sa), (rb, sb)) in pairs.items():
        if label in skipped:
            continue
        (fa, sca), (fb, scb) = loaded[(ra, sa)], loaded[(rb, sb)]
        rows = []
        for n in sorted(fa):
            if n.split(".")[-1] not in modules:
                continue
            Ua = subspace_basis(*fa[n], sca, "A")
            Ub = subspace_basis(*fb[n], scb, "A")
            d = Ua.shape[0]
            g = phi_grid(Ua, Ub)
            keep = g[:show, :show] if ra == rb == large else g
            rows.append({"module": n, "layer": int(n.split(".")[1]), "kind": n.split(".")[-1],
                         "grid": rounded(keep, 4), "diagonal": rounded(np.diag(g), 4),
                         "phi_11": float(g[0, 0]), "phi_full": float(g[-1, -1])})
            if bar is not None:
                bar.update(1)
        if not rows:
            skipped[label] = f"the adapters adapt none of {', '.join(modules)}"
            continue
        ia, jb = (min(ra, show), min(rb, show)) if ra == rb == large else (ra, rb)
        mean, std = random_phi_grid(d, ia, jb, n_samples)
        # the diagonal φ(k, k) of two random r-dim subspaces, for the full-rank comparisons
        dmean, dstd = random_phi_grid(d, ra, rb, 50, seed=1) if ra == rb == large else (mean, std)
        out["comparisons"][label] = {
            "a": {"r": ra, "seed": sa}, "b": {"r": rb, "seed": sb}, "d": d,
            "grid_shape": [ia, jb], "modules": rows,
            "baseline_exact": rounded(phi_random_expectation(np.arange(1, ia + 1)[:, None],
                                                        np.arange(1, jb + 1)[None, :], d), 4),
            "baseline_sampled_mean": rounded(mean, 4), "baseline_sampled_std": rounded(std, 4),
            "baseline_diagonal_mean": rounded(np.diag(dmean), 4),
            "baseline_diagonal_std": rounded(np.diag(dstd), 4),
            "n_samples": n_samples}
    if not out["comparisons"]:
        raise StudyError(f"{first or 'no comparison could run'} (φ compares q,v adapters at "
                         f"r={small} and r={large}, seeds 0 and 1)",
                         add=dict(ranks=(small, large), targets="q,v", seeds=(0, 1)))
    if skipped:
        out["skipped"] = skipped
    return out


# ----------------------------------------------------------------------------------------------
# 3. Table 7: projection of W onto ΔW's subspace and the amplification factor


def amplification_study(records, runs=DEFAULT_RUNS, steps=None, modules=("q", "v"),
                        n_random: int = 50, base=None, bar=None) -> dict:
    """Per rank, layer and module: ||U_rᵀ W V_r||_F for ΔW's top-r singular vectors, W's own
    top-r and random orthonormal U, V (exact expectation and sampled mean ± std), ||ΔW||_F,
    ||W||_F, and ||ΔW||_F divided by each projection."""
    model, _, _ = load_checkpoint(base or base_model_path())
    base = {n: np.asarray(p, np.float64) for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    rows = []
    for rec in find_cells(records, targets="q,v", steps=steps):
        factors, scale = adapter_factors(rec, runs)
        for n, (B, A) in sorted(factors.items()):
            if n.split(".")[-1] not in modules:
                continue
            W = base[n + ".weight"]
            m = analyze_lora_module(n, B, A, scale, W=W)
            r = m.r
            rand = [np.linalg.norm(random_orthonormal(W.shape[0], r, rng).T @ W
                                   @ random_orthonormal(W.shape[1], r, rng))
                    for _ in range(n_random)]
            rows.append({"r": r, "seed": rec["config"]["seed"], "module": n,
                         "layer": m.layer, "kind": n.split(".")[-1], "w_fro": m.w_fro,
                         "delta_fro": m.delta_fro, "proj_delta": m.w_proj_delta,
                         "proj_top": m.w_proj_top, "proj_random_exact": m.w_proj_random,
                         "proj_random_mean": float(np.mean(rand)),
                         "proj_random_std": float(np.std(rand, ddof=1)),
                         "amp_delta": m.amplification, "amp_top": m.delta_fro / m.w_proj_top,
                         "amp_random": m.delta_fro / m.w_proj_random})
            if bar is not None:
                bar.update(1)
    if not rows:
        raise StudyError("the sweep has no q,v LoRA cell",
                         add=dict(ranks=(1, 2, 4, 8, 16, 64), targets="q,v"))
    table = []
    for r in sorted({x["r"] for x in rows}):
        for kind in modules:
            sel = [x for x in rows if x["r"] == r and x["kind"] == kind]
            if sel:
                table.append({"r": r, "kind": kind, "n": len(sel),
                              **{k: statistics.fmean(x[k] for x in sel) for k in
                                 ("w_fro", "delta_fro", "proj_delta", "proj_top",
                                  "proj_random_exact", "amp_delta", "amp_top", "amp_random")}})
    return {"rows": rows, "table": table,
            "note": "means over layers and seeds; U, V: top-r left / right singular vectors of "
                    "ΔW ('delta'), of W ('top'), or Haar-random ('random': exact r||W||/sqrt(d_out "
                    "d_in), sampled per row)"}


STUDIES = ("spectra", "phi", "amplification", "full_vs_lora", "intruders", "budget")


def sweep_setting(records, steps=None) -> tuple[list[dict], dict]:
    """The Milton records of one step count and one base, and the settings the studies reuse:
    ``{"base": path or None, "eval": Evaluator kwargs, "steps", "ranks"}``."""
    recs = [x for x in records if x["config"]["task"] == "milton"
            and (steps is None or x["config"]["steps"] == steps)]
    if not recs:
        raise StudyError(f"no Milton records{'' if steps is None else f' of {steps} steps'} in "
                         "the sweep (the ΔW studies run on Milton cells)",
                         add=dict(ranks=(1, 2, 4, 8), targets="q,v;all-linear", full=True))
    step_counts = sorted({x["config"]["steps"] for x in recs})
    bases = sorted({x["config"]["base"] for x in recs})
    if len(step_counts) > 1 or len(bases) > 1:
        raise StudyError(f"the sweep mixes step counts {step_counts} or bases {bases}; choose "
                         "one with steps=... (--steps)")
    c = recs[0]["config"]
    lora = [x["config"] for x in recs if x["config"]["method"] == "lora"]
    # the truncation's ranks: those of the all-linear LoRAs it is compared with (else every
    # LoRA rank of the sweep, else the usual grid)
    ranks = (sorted({x["r"] for x in lora if target_label(x["targets"]) == "all-linear"})
             or sorted({x["r"] for x in lora}) or [1, 2, 4, 8, 16, 64])
    return recs, {"base": None if c["base"] == "shipped" else c["base"], "steps": c["steps"],
                  "cell": c,
                  "eval": dict(eval_batches=c["eval_batches"], batch_size=c["batch_size"],
                               block_size=c["block_size"]), "ranks": ranks}


def run_delta_w_study(sweep="results/ablate", out=OUT, runs=DEFAULT_RUNS, only=None, steps=None,
                      phi_ranks=(8, 64), budget=(("q",), 8), log=print, made_by=None,
                      progress: bool = True) -> dict:
    """Run the studies named in ``only`` (default: all of :data:`STUDIES`) that the sweep
    supports, each written to ``<out>/<name>.json``, on the Milton cells of ``sweep`` (one step
    count: ``steps``). ``phi_ranks``: the (small, large) ranks φ compares; ``budget``: (targets,
    r) whose trainable parameters are the fixed budget of the budget table; ``made_by``: the
    command that ran this (recorded in each file; default: this call). A study whose cells are
    missing is skipped with one line saying which cells (and the ``minilora ablate`` command
    that adds them to this sweep); parts of a study likewise (``"skipped"`` in its JSON). Returns
    ``{name: path}`` of the studies written; raises :class:`StudyError` if none could run."""
    only = list(STUDIES) if not only else list(only)
    bad = [s for s in only if s not in STUDIES]
    if bad:
        raise StudyError(f"unknown study {', '.join(bad)}; allowed: {', '.join(STUDIES)}")
    try:
        records, st = sweep_setting(load_records(sweep), steps)
    except StudyError as e:
        raise StudyError(_why(e, sweep, steps or 100, None)) from None
    base = st["base"]
    out = Path(out)
    made_by = made_by or (f"run_delta_w_study(sweep={str(sweep)!r}, out={str(out)!r}, "
                          f"only={only!r}, steps={steps!r}, phi_ranks={tuple(phi_ranks)!r})")
    written, skipped = {}, {}
    ev = None
    for name in only:
        t0 = time.perf_counter()
        log(f"{name}: running")
        bar = tqdm(desc=name, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True,
                   disable=not progress or not sys.stderr.isatty())
        try:
            if name == "spectra":
                data, path = pretrained_spectra(base), out / "pretrained_spectra.json"
            elif name == "phi":
                data = phi_study(records, runs, small=phi_ranks[0], large=phi_ranks[1], bar=bar,
                                 explain=lambda e: _why(e, sweep, st["steps"], st["cell"]))
                path = out / "phi.json"
            elif name == "amplification":
                data = amplification_study(records, runs, base=base, bar=bar)
                path = out / "amplification.json"
            elif name == "full_vs_lora":
                data = {"effective_rank": effective_rank_table(records), "skipped": {}}
                try:
                    ev = ev or Evaluator(base, **st["eval"])
                    data["truncation"] = truncation_study(records, runs, st["ranks"], ev=ev,
                                                          bar=bar)
                except StudyError as e:
                    bar.clear()
                    data["truncation"] = None
                    data["skipped"]["truncation"] = _why(e, sweep, st["steps"], st["cell"])
                    log(f"{name}: truncation skipped: {data['skipped']['truncation']}")
                path = out / "full_vs_lora.json"
            elif name == "budget":
                data, path = budget_table(records, *budget), out / "budget.json"
            else:
                ev = ev or Evaluator(base, **st["eval"])
                null = intruder_null(records, base=base, bar=bar)
                counts = intruder_counts(records, null["eps"], null["k"])
                lora = [x for x in counts if x["method"] == "lora"]
                corr = {"all_cells": spearman([x["total"] for x in counts],
                                              [x["forgetting"] for x in counts]),
                        "lora_cells": spearman([x["total"] for x in lora],
                                               [x["forgetting"] for x in lora]),
                        "lora_cells_task_loss": spearman([x["total"] for x in lora],
                                                         [x["task_loss"] for x in lora])}
                data = {"null": null, "counts": counts, "spearman": corr,
                        "scaling": intruder_scaling(records, null["eps"], null["k"], runs, ev=ev,
                                                    bar=bar)}
                path = out / "intruders.json"
        except StudyError as e:
            bar.close()                  # before the line, so the two do not share a row
            skipped[name] = _why(e, sweep, st["steps"], st["cell"])
            log(f"{name}: skipped: {skipped[name]}")
            continue
        finally:
            bar.close()
        for part, why in (data.get("skipped") or {}).items():
            if name != "full_vs_lora":
                log(f"{name}: {part} skipped: {why}")
        data["sweep"] = str(sweep)
        data["steps"] = st["steps"]
        data["made_by"] = made_by
        atomic_write_json(path, data)
        written[name] = str(path)
        log(f"{name}: {path} ({time.perf_counter() - t0:.1f} s)")
    if not written:
        raise StudyError(f"no study could run on {sweep}: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if skipped:
        log(f"{len(written)} stud{'y' if len(written) == 1 else 'ies'} written, "
            f"{len(skipped)} skipped ({', '.join(skipped)}: see above)")
    return written


def _why(e: StudyError, sweep, steps, like) -> str:
    """A study's missing cells, with the command that adds them to this sweep (``like``: one of
    its cells, whose settings the new ones share)."""
    text = str(e)
    if getattr(e, "add", None):
        text += f"; add them with: {sweep_command(sweep, steps, like=like, **e.add)}"
    return text
