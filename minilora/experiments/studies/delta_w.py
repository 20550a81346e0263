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

Chapter: chapters/05-delta-w-analysis.ipynb
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from scipy import stats

from minilora.analysis import (
    analyze_lora_module,
    effective_rank,
    intruder_dimensions,
    perturbed_similarities,
    phi_grid,
    phi_random_expectation,
    random_orthonormal,
    rank_for_energy,
    scale_singular_directions,
    singular_values,
    stable_rank,
    subspace_basis,
    svd,
)
from minilora.checkpoint import load_checkpoint
from minilora.data import encode_corpus, load_shakespeare
from minilora.errors import MiniloraError
from minilora.experiments.ablate import (
    DEFAULT_RUNS,
    LINEARS,
    intruder_count,
    load_records,
    target_label,
)
from minilora.experiments.finetune import FORGETTING_BATCH, FORGETTING_BLOCK
from minilora.experiments.paths import RESULTS, base_model_path
from minilora.experiments.tasks import task_splits
from minilora.io import atomic_write_json
from minilora.lora import lora_scaling, read_adapter
from minilora.train import evaluate, fixed_batches

SWEEP_COMMAND = ("minilora ablate --ranks 1,2,4,8,16,64 --targets 'q,v;all-linear' --seeds 0 "
                 "--full --steps 100 --out results/ablate && minilora ablate --ranks 8,64 "
                 "--targets q,v --seeds 1 --full --steps 100 --out results/ablate")
BUDGET_COMMAND = ("minilora ablate --pairs 'q:8;k:8;v:8;o:8;q,k:4;q,v:4;q,k,v,o:2' --seeds 0 "
                  "--steps 100 --out results/ablate")
STUDY_COMMAND = "minilora delta-w --sweep results/ablate --out results/delta_w"
OUT = RESULTS / "delta_w"
#: matrices whose left singular vectors of W_0 span R^d_out (d_out <= d_in): the intruder test is
#: well posed there; mlp.up (640 x 160) has only 160 of 640 output directions, so any new
#: direction has a small max |cos| by construction and is left out of the intruder counts
INTRUDER_MODULES = ("q", "k", "v", "o", "down")


class StudyError(MiniloraError):
    """The sweep lacks the cells (or their weights) a study needs; the message says which."""


def _r(x, digits=5):
    """Round floats (and nested lists of them) for compact JSON."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_r(v, digits) for v in x]
    return float(f"{float(x):.{digits}g}")


# ----------------------------------------------------------------------------------------------
# reading the sweep


def find_cells(records, method="lora", targets=None, r=None, seed=None, task="milton",
               steps=None) -> list[dict]:
    """The records matching every given field (``targets`` as a label: "q,v", "all-linear")."""
    out = []
    for rec in records:
        c = rec["config"]
        if c["task"] != task or c["method"] != method:
            continue
        if targets is not None and target_label(c["targets"]) != targets:
            continue
        if (r is not None and c["r"] != r) or (seed is not None and c["seed"] != seed):
            continue
        if steps is not None and c["steps"] != steps:
            continue
        out.append(rec)
    return sorted(out, key=lambda x: (x["config"]["r"] or 0, x["config"]["seed"]))


def _one(records, **kw) -> dict:
    found = find_cells(records, **kw)
    if not found:
        raise StudyError(f"the sweep has no cell {kw}; run: {SWEEP_COMMAND}")
    return found[0]


def adapter_factors(rec, runs=DEFAULT_RUNS) -> tuple[dict, float]:
    """``({module: (B, A)}, scale)`` of a LoRA cell's adapter, float64."""
    path = Path(runs) / rec["key"] / "adapter.safetensors"
    if not path.exists():
        raise StudyError(f"weights of cell {rec['key']} missing ({path}); re-create them with "
                         f"the sweep command and --runs {runs} (cells without weights re-run)")
    arrays, cfg = read_adapter(path)
    scale = lora_scaling(cfg.r, cfg.lora_alpha, cfg.use_rslora)
    names = sorted(n[:-len(".lora_A")] for n in arrays if n.endswith(".lora_A"))
    return {n: (np.asarray(arrays[n + ".lora_B"], np.float64),
                np.asarray(arrays[n + ".lora_A"], np.float64)) for n in names}, scale


def full_weights(rec, runs=DEFAULT_RUNS) -> dict:
    """``{parameter: array}`` of a full fine-tuning cell's model, float64."""
    path = Path(runs) / rec["key"] / "model.safetensors"
    if not path.exists():
        raise StudyError(f"weights of cell {rec['key']} missing ({path}); re-run the sweep")
    return {n: np.asarray(p, np.float64) for n, p in load_checkpoint(path)[0].named_parameters()}


def linear_names(model) -> list[str]:
    """The block linears of the model, ``blocks.{i}.attn.q`` ... ``blocks.{i}.mlp.down``."""
    return [n[:-len(".weight")] for n, _ in model.named_parameters()
            if n.endswith(".weight") and n.split(".")[-2] in LINEARS]


# ----------------------------------------------------------------------------------------------
# evaluating modified weights on the harness's windows


class Evaluator:
    """Task loss and Shakespeare loss of the base with some weights replaced, on the same fixed
    windows as the harness (so numbers compare with the records')."""

    def __init__(self, base=None, task="milton", eval_batches=16, batch_size=8,
                 block_size=128):
        self.model, tok, _ = load_checkpoint(base or base_model_path())
        self.modules = dict(self.model.named_modules())
        self.base = {n: np.array(p) for n, p in self.model.named_parameters()}
        _, test = task_splits(task)
        self.task_batches = fixed_batches(encode_corpus(test, tok), eval_batches, batch_size,
                                          block_size, seed=12345)
        sh = encode_corpus(load_shakespeare()["val"], tok)
        self.sh_batches = fixed_batches(sh, eval_batches, FORGETTING_BATCH,
                                        min(FORGETTING_BLOCK, self.model.config.block_size),
                                        seed=12345)
        self.sh_base = evaluate(self.model, self.sh_batches)
        self.evals = 0

    def __call__(self, weights: dict) -> dict:
        """``weights``: {module name: W (d_out, d_in)} replacing ``<name>.weight``; other
        parameters stay at the base. Returns task loss and forgetting."""
        try:
            for n, W in weights.items():
                m = self.modules[n]
                m.params["weight"] = np.asarray(W, dtype=m.params["weight"].dtype)
            task = evaluate(self.model, self.task_batches)
            sh = evaluate(self.model, self.sh_batches)
        finally:
            for n in weights:
                self.modules[n].params["weight"] = self.base[n + ".weight"]
        self.evals += 1
        return {"task_loss": task, "forgetting": sh - self.sh_base}


def _lora_weights(factors, scale, base) -> dict:
    return {n: base[n + ".weight"].astype(np.float64) + scale * (B @ A)
            for n, (B, A) in factors.items()}


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
        out.append({"module": n, "shape": list(W.shape), "singular_values": _r(s),
                    "effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
                    "rank_90": rank_for_energy(s, 0.9), "gaussian_effective_rank": effective_rank(g),
                    "gaussian_rank_90": rank_for_energy(g, 0.9),
                    "gaussian_singular_values": _r(g, 4)})
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
              n_samples: int = 200, small: int = 8, large: int = 64, show: int = 16) -> dict:
    """φ(i, j) between A subspaces for r=small vs r=large (seed 0), r=small seed 0 vs seed 1,
    and r=large seed 0 vs seed 1, for ``modules`` of every layer, with the random baseline
    (module docstring). The large-vs-large grid is kept for i, j <= ``show`` (and its diagonal)."""
    pairs = {f"r{small}_vs_r{large}": ((small, 0), (large, 0)),
             f"r{small}_seed0_vs_seed1": ((small, 0), (small, 1)),
             f"r{large}_seed0_vs_seed1": ((large, 0), (large, 1))}
    loaded = {}
    for (ra, sa), (rb, sb) in pairs.values():
        for r, s in ((ra, sa), (rb, sb)):
            if (r, s) not in loaded:
                loaded[(r, s)] = adapter_factors(_one(records, targets="q,v", r=r, seed=s,
                                                      steps=steps), runs)
    out = {"subspace": "A (right singular vectors of A, in R^d_in)", "comparisons": {}}
    d = None
    for label, ((ra, sa), (rb, sb)) in pairs.items():
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
                         "grid": _r(keep, 4), "diagonal": _r(np.diag(g), 4),
                         "phi_11": float(g[0, 0]), "phi_full": float(g[-1, -1])})
        ia, jb = (min(ra, show), min(rb, show)) if ra == rb == large else (ra, rb)
        mean, std = random_phi_grid(d, ia, jb, n_samples)
        # the diagonal φ(k, k) of two random r-dim subspaces, for the full-rank comparisons
        dmean, dstd = random_phi_grid(d, ra, rb, 50, seed=1) if ra == rb == large else (mean, std)
        out["comparisons"][label] = {
            "a": {"r": ra, "seed": sa}, "b": {"r": rb, "seed": sb}, "d": d,
            "grid_shape": [ia, jb], "modules": rows,
            "baseline_exact": _r(phi_random_expectation(np.arange(1, ia + 1)[:, None],
                                                        np.arange(1, jb + 1)[None, :], d), 4),
            "baseline_sampled_mean": _r(mean, 4), "baseline_sampled_std": _r(std, 4),
            "baseline_diagonal_mean": _r(np.diag(dmean), 4),
            "baseline_diagonal_std": _r(np.diag(dstd), 4),
            "n_samples": n_samples}
    return out


# ----------------------------------------------------------------------------------------------
# 3. Table 7: projection of W onto ΔW's subspace and the amplification factor


def amplification_study(records, runs=DEFAULT_RUNS, steps=None, modules=("q", "v"),
                        n_random: int = 50, base=None) -> dict:
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
    if not rows:
        raise StudyError(f"no q,v LoRA cells in the sweep; run: {SWEEP_COMMAND}")
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


# ----------------------------------------------------------------------------------------------
# 4. full fine-tuning vs LoRA: effective rank and truncation


def effective_rank_table(records, steps=None) -> list[dict]:
    """Mean effective rank (and rank holding 90 % of the energy) of ΔW per module kind, for full
    fine-tuning and each LoRA (targets, r), over layers and seeds (from the records alone)."""
    rows = []
    groups = {}
    for rec in records:
        c = rec["config"]
        if c["task"] != "milton" or (steps is not None and c["steps"] != steps):
            continue
        groups.setdefault((target_label(c["targets"]), c["r"]), []).append(rec)
    for (tl, r), recs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0],
                                                                kv[0][1] or 0)):
        for kind in LINEARS:
            vals = [(v["effective_rank"], _rank90(v["singular_values"]))
                    for x in recs for n, v in x["delta_w"].items() if n.split(".")[-1] == kind]
            if vals:
                rows.append({"targets": tl, "r": r, "kind": kind, "n": len(vals),
                             "effective_rank": statistics.fmean(v[0] for v in vals),
                             "rank_90": statistics.fmean(v[1] for v in vals)})
    return rows


def _rank90(s):
    s = np.asarray(s, np.float64)
    return rank_for_energy(s, 0.9) if np.any(s > 0) else 0


def truncation_study(records, runs=DEFAULT_RUNS, ranks=(1, 2, 4, 8, 16, 64), steps=None,
                     ev: Evaluator | None = None) -> dict:
    """Task loss and forgetting of the base with each block linear's full-FT ΔW replaced by its
    best rank-r approximation (other parameters at the base), for each full-FT seed, beside LoRA
    trained at rank r on all linears (records). Also: the full-FT ΔW untruncated on the linears
    only, and the whole fine-tuned model (the record)."""
    ev = ev or Evaluator()
    fulls = find_cells(records, method="full", steps=steps)
    if not fulls:
        raise StudyError(f"no full fine-tuning cell in the sweep; run: {SWEEP_COMMAND}")
    out = {"ranks": list(ranks), "full": [], "lora_all_linear": [], "lora_qv": []}
    for rec in fulls:
        W1 = full_weights(rec, runs)
        names = [n[:-len(".weight")] for n in W1 if n.endswith(".weight")
                 and n.split(".")[-2] in LINEARS]
        dec = {n: svd(W1[n + ".weight"] - ev.base[n + ".weight"]) for n in names}
        rows = []
        for r in list(ranks) + [None]:
            weights = {}
            for n, (U, s, Vh) in dec.items():
                k = len(s) if r is None else r
                weights[n] = ev.base[n + ".weight"] + (U[:, :k] * s[:k]) @ Vh[:k]
            rows.append({"r": r, **ev(weights)})
        out["full"].append({"seed": rec["config"]["seed"], "rows": rows,
                            "record_task_loss": rec["result"]["task_metric"],
                            "record_forgetting": rec["result"]["forgetting"],
                            "base_task_loss": rec["result"]["task_metric_base"]})
    for tl, key in (("all-linear", "lora_all_linear"), ("q,v", "lora_qv")):
        for r in ranks:
            cells = find_cells(records, targets=tl, r=r, steps=steps)
            if cells:
                t = [x["result"]["task_metric"] for x in cells]
                f = [x["result"]["forgetting"] for x in cells]
                out[key].append({"r": r, "seeds": len(cells), "task_loss": statistics.fmean(t),
                                 "task_loss_std": statistics.stdev(t) if len(t) > 1 else 0.0,
                                 "forgetting": statistics.fmean(f),
                                 "forgetting_std": statistics.stdev(f) if len(f) > 1 else 0.0})
    # check: the evaluator reproduces a LoRA record from its merged weights
    cell = find_cells(records, targets="all-linear", steps=steps)
    if cell:
        factors, scale = adapter_factors(cell[0], runs)
        got = ev(_lora_weights(factors, scale, ev.base))
        out["check"] = {"cell": cell[0]["key"], "record_task_loss":
                        cell[0]["result"]["task_metric"], "evaluated_task_loss": got["task_loss"],
                        "record_forgetting": cell[0]["result"]["forgetting"],
                        "evaluated_forgetting": got["forgetting"]}
    return out


# ----------------------------------------------------------------------------------------------
# 5. intruder dimensions


def intruder_null(records, eps_grid=(0.3, 0.4, 0.5, 0.6, 0.7), k_max: int = 20,
                  n_draws: int = 3, seed: int = 0, steps=None, base=None) -> dict:
    """The null distribution of the intruder similarities: every W (of :data:`INTRUDER_MODULES`)
    against W + N, N Gaussian with ||N||_F / ||W||_F = the median relative size of full
    fine-tuning's ΔW (and half and twice that). Returns the similarities' quantiles per rank j,
    the false-positive rate per (ε, k), the random-vector floor in R^d, and the chosen ε, k."""
    model, _, _ = load_checkpoint(base or base_model_path())
    params = {n: np.asarray(p, np.float64) for n, p in model.named_parameters()}
    k_max = min(k_max, min(params[n + ".weight"].shape[0] for n in linear_names(model)))
    fulls = find_cells(records, method="full", steps=steps)
    if not fulls:
        raise StudyError(f"no full fine-tuning cell in the sweep; run: {SWEEP_COMMAND}")
    rel = float(np.median([v["fro"] / v["w_fro"] for x in fulls for v in x["delta_w"].values()]))
    rng = np.random.default_rng(seed)
    names = [n for n in linear_names(model) if n.split(".")[-1] in INTRUDER_MODULES]
    levels = {}
    for factor in (0.5, 1.0, 2.0):
        sims = np.concatenate([perturbed_similarities(params[n + ".weight"], rel * factor, k_max,
                                                      rng, n_draws) for n in names])  # (M, k)
        fp = {f"{eps:g}": [float(np.mean(np.any(sims[:, :k] < eps, axis=1)))
                           for k in range(1, k_max + 1)] for eps in eps_grid}
        levels[f"{factor:g}"] = {
            "relative_noise": rel * factor,
            "quantiles_by_rank": {q: _r(np.quantile(sims, float(q), axis=0), 4)
                                  for q in ("0.01", "0.05", "0.5")},
            "min_by_rank": _r(sims.min(axis=0), 4),
            "false_positive_rate": fp}
    d = params[names[0] + ".weight"].shape[0]
    U = random_orthonormal(d, d, rng)
    v = rng.standard_normal((d, 4000))
    v /= np.linalg.norm(v, axis=0)
    floor = np.abs(U.T @ v).max(axis=0)
    # the choice: ε above the random-direction floor's 99th percentile (a new, random-like
    # direction is caught) and k the largest (<= 10) with no false positive at ε in the null
    # of full fine-tuning's size
    eps = next((e for e in eps_grid if e >= float(np.quantile(floor, 0.99)) + 0.05),
               max(eps_grid))
    fp1 = levels["1"]["false_positive_rate"][f"{eps:g}"]
    k = max([k for k in range(1, 11) if fp1[k - 1] == 0.0] or [1])
    return {"relative_noise_full_ft": rel, "n_draws": n_draws, "matrices": len(names),
            "modules": list(INTRUDER_MODULES), "levels": levels, "d": d,
            "random_floor": {"mean": float(floor.mean()),
                             "q01": float(np.quantile(floor, 0.01)),
                             "q99": float(np.quantile(floor, 0.99)),
                             "lower_bound": 1 / np.sqrt(d)},
            "eps": eps, "k": k,
            "rule": "eps: the first of the grid at least 0.05 above the 99th percentile of the "
                    "max |cos| of a random unit vector against an orthonormal basis of R^d; k: "
                    "the largest k <= 10 whose false-positive rate at eps is 0 for W vs W + N, "
                    "||N|| = the median ||ΔW_full|| / ||W||"}


def intruder_counts(records, eps: float, k: int, steps=None) -> list[dict]:
    """Per cell: intruders per layer (summed over :data:`INTRUDER_MODULES` matrices it adapted)
    at (ε, k), the total, the matrices examined, and the cell's forgetting and task loss."""
    rows = []
    for rec in records:
        c = rec["config"]
        if c["task"] != "milton" or (steps is not None and c["steps"] != steps):
            continue
        per_layer, total, n_mat = {}, 0, 0
        for n, v in rec["delta_w"].items():
            if n.split(".")[-1] not in INTRUDER_MODULES:
                continue
            cnt = intruder_count(v, eps, k)
            layer = int(n.split(".")[1])
            per_layer[layer] = per_layer.get(layer, 0) + cnt
            total += cnt
            n_mat += 1
        rows.append({"key": rec["key"], "method": c["method"], "targets": target_label(c["targets"]),
                     "r": c["r"], "seed": c["seed"], "per_layer": per_layer, "total": total,
                     "matrices": n_mat, "forgetting": rec["result"]["forgetting"],
                     "task_loss": rec["result"]["task_metric"],
                     "by_eps": {f"{e:g}": sum(intruder_count(v, e, k) for n, v in
                                              rec["delta_w"].items()
                                              if n.split(".")[-1] in INTRUDER_MODULES)
                                for e in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}})
    return rows


def intruder_scaling(records, eps: float, k: int, runs=DEFAULT_RUNS, cells=None,
                     lambdas=(0.5, 0.0), steps=None, ev: Evaluator | None = None) -> list[dict]:
    """For each chosen LoRA cell: scale the top intruder of every adapted matrix (of
    :data:`INTRUDER_MODULES`) by λ, W = W_t + (λ - 1) σ_j u_j v_jᵀ (all matrices at once), and
    measure task loss and forgetting; control: the same for the nearest-ranked non-intruder
    direction of each of those matrices."""
    ev = ev or Evaluator()
    cells = cells or [("q,v", 1), ("q,v", 8), ("q,v", 64), ("all-linear", 8), ("k", 8)]
    out = []
    for tl, r in cells:
        found = find_cells(records, targets=tl, r=r, seed=0, steps=steps)
        if not found:
            continue
        rec = found[0]
        factors, scale = adapter_factors(rec, runs)
        Wt = _lora_weights(factors, scale, ev.base)
        plan = {}
        for n, W in Wt.items():
            if n.split(".")[-1] not in INTRUDER_MODULES:
                continue
            dec = svd(W)
            found_i = intruder_dimensions(svd(ev.base[n + ".weight"]).U, dec.U, k, eps)
            if found_i.count:
                j = int(found_i.indices[0])
                flagged = set(found_i.indices.tolist())
                others = [i for i in range(dec.s.size) if i not in flagged]
                ctrl = min(others, key=lambda i: (abs(i - j), i)) if others else None
                plan[n] = (dec, j, ctrl)
        row = {"key": rec["key"], "targets": tl, "r": r, "matrices_with_intruders": len(plan),
               "unchanged": ev(Wt), "record_task_loss": rec["result"]["task_metric"],
               "record_forgetting": rec["result"]["forgetting"], "scaled": []}
        for lam in lambdas:
            if not plan:
                break
            w_int = dict(Wt)
            w_ctl = dict(Wt)
            for n, (dec, j, ctrl) in plan.items():
                w_int[n] = scale_singular_directions(Wt[n], [j], lam, dec)
                if ctrl is not None:
                    w_ctl[n] = scale_singular_directions(Wt[n], [ctrl], lam, dec)
            row["scaled"].append({"lambda": lam, "intruder": ev(w_int), "control": ev(w_ctl)})
        out.append(row)
    return out


def spearman(xs, ys) -> dict:
    """Spearman's ρ and its p-value (scipy), or nan when a variable is constant."""
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"rho": float("nan"), "p": float("nan"), "n": len(xs)}
    res = stats.spearmanr(xs, ys)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": len(xs)}


# ----------------------------------------------------------------------------------------------
# all of it


def budget_table(records, budget_targets=("q",), budget_r: int = 8, tolerance: float = 0.15) -> dict:
    """The LoRA paper's Table 5 shape: every LoRA cell whose trainable parameters are within
    ``tolerance`` of the budget of (``budget_targets``, r = ``budget_r``), mean ± std over seeds
    of the task loss and forgetting, best first."""
    ref = find_cells(records, targets=",".join(budget_targets), r=budget_r)
    if not ref:
        raise StudyError(f"no {','.join(budget_targets)} r={budget_r} cell for the budget; run: "
                         f"{BUDGET_COMMAND}")
    budget = ref[0]["result"]["trainable_params"]
    groups = {}
    for rec in records:
        c = rec["config"]
        n = rec["result"]["trainable_params"]
        if c["method"] == "lora" and abs(n - budget) <= tolerance * budget:
            groups.setdefault((target_label(c["targets"]), c["r"]), []).append(rec)
    rows = []
    for (tl, r), recs in groups.items():
        t = [x["result"]["task_metric"] for x in recs]
        f = [x["result"]["forgetting"] for x in recs]
        rows.append({"targets": tl, "r": r, "trainable_params": recs[0]["result"]["trainable_params"],
                     "seeds": len(recs), "task_loss": statistics.fmean(t),
                     "task_loss_std": statistics.stdev(t) if len(t) > 1 else 0.0,
                     "forgetting": statistics.fmean(f),
                     "forgetting_std": statistics.stdev(f) if len(f) > 1 else 0.0})
    rows.sort(key=lambda x: x["task_loss"])
    lines = ["| targets | r | trainable | seeds | task loss (nats/char) | forgetting |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {x['targets']} | {x['r']} | {x['trainable_params']:,} | {x['seeds']} | "
              f"{x['task_loss']:.4f} ± {x['task_loss_std']:.4f} | {x['forgetting']:+.4f} ± "
              f"{x['forgetting_std']:.4f} |" for x in rows]
    return {"budget": budget, "tolerance": tolerance, "rows": rows, "markdown": "\n".join(lines)}


STUDIES = ("spectra", "phi", "amplification", "full_vs_lora", "intruders", "budget")


def sweep_setting(records, steps=None) -> tuple[list[dict], dict]:
    """The Milton records of one step count and one base, and the settings the studies reuse:
    ``{"base": path or None, "eval": Evaluator kwargs, "steps", "ranks"}``."""
    recs = [x for x in records if x["config"]["task"] == "milton"
            and (steps is None or x["config"]["steps"] == steps)]
    if not recs:
        raise StudyError(f"no Milton records{'' if steps is None else f' of {steps} steps'} in "
                         f"the sweep; run: {SWEEP_COMMAND}")
    step_counts = sorted({x["config"]["steps"] for x in recs})
    bases = sorted({x["config"]["base"] for x in recs})
    if len(step_counts) > 1 or len(bases) > 1:
        raise StudyError(f"the sweep mixes step counts {step_counts} or bases {bases}; choose "
                         "one with steps=... (--steps)")
    c = recs[0]["config"]
    ranks = sorted({x["config"]["r"] for x in recs if x["config"]["method"] == "lora"
                    and target_label(x["config"]["targets"]) == "all-linear"})
    return recs, {"base": None if c["base"] == "shipped" else c["base"], "steps": c["steps"],
                  "eval": dict(eval_batches=c["eval_batches"], batch_size=c["batch_size"],
                               block_size=c["block_size"]), "ranks": ranks}


def run_delta_w_study(sweep="results/ablate", out=OUT, runs=DEFAULT_RUNS, only=None, steps=None,
                      phi_ranks=(8, 64), budget=(("q",), 8), log=print) -> dict:
    """Run the studies named in ``only`` (default: all of :data:`STUDIES`), each written to
    ``<out>/<name>.json``, on the Milton cells of ``sweep`` (one step count: ``steps``).
    ``phi_ranks``: the (small, large) ranks φ compares; ``budget``: (targets, r) whose trainable
    parameters are the fixed budget of the budget table. Returns ``{name: path}``."""
    only = list(STUDIES) if not only else list(only)
    bad = [s for s in only if s not in STUDIES]
    if bad:
        raise StudyError(f"unknown study {', '.join(bad)}; allowed: {', '.join(STUDIES)}")
    records, st = sweep_setting(load_records(sweep), steps)
    base = st["base"]
    out = Path(out)
    written = {}
    ev = None
    for name in only:
        t0 = time.perf_counter()
        if name == "spectra":
            data, path = pretrained_spectra(base), out / "pretrained_spectra.json"
        elif name == "phi":
            data = phi_study(records, runs, small=phi_ranks[0], large=phi_ranks[1])
            path = out / "phi.json"
        elif name == "amplification":
            data, path = amplification_study(records, runs, base=base), out / "amplification.json"
        elif name == "full_vs_lora":
            ev = ev or Evaluator(base, **st["eval"])
            data = {"effective_rank": effective_rank_table(records),
                    "truncation": truncation_study(records, runs, st["ranks"], ev=ev)}
            path = out / "full_vs_lora.json"
        elif name == "budget":
            data, path = budget_table(records, *budget), out / "budget.json"
        else:
            ev = ev or Evaluator(base, **st["eval"])
            null = intruder_null(records, base=base)
            counts = intruder_counts(records, null["eps"], null["k"])
            lora = [x for x in counts if x["method"] == "lora"]
            corr = {"all_cells": spearman([x["total"] for x in counts],
                                          [x["forgetting"] for x in counts]),
                    "lora_cells": spearman([x["total"] for x in lora],
                                           [x["forgetting"] for x in lora]),
                    "lora_cells_task_loss": spearman([x["total"] for x in lora],
                                                     [x["task_loss"] for x in lora])}
            data = {"null": null, "counts": counts, "spearman": corr,
                    "scaling": intruder_scaling(records, null["eps"], null["k"], runs, ev=ev)}
            path = out / "intruders.json"
        data["sweep"] = str(sweep)
        data["steps"] = st["steps"]
        data["made_by"] = STUDY_COMMAND + f" --only {name}"
        atomic_write_json(path, data)
        written[name] = str(path)
        log(f"{name}: {path} ({time.perf_counter() - t0:.1f} s)")
    return written
