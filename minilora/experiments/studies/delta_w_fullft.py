"""Full fine-tuning vs LoRA: effective rank of ΔW, truncating the full-FT ΔW to rank r, intruder
dimensions (the null, counts, their link to forgetting, scaling them down) and the fixed-budget
table. Part of ``minilora delta-w`` (:mod:`minilora.experiments.studies.delta_w`).
"""
from __future__ import annotations

import statistics

import numpy as np

from minilora.analysis import (
    intruder_dimensions,
    perturbed_similarities,
    random_orthonormal,
    rank_for_energy,
    scale_singular_directions,
    svd,
)
from minilora.checkpoint import load_checkpoint
from minilora.experiments.ablate_records import (
    DEFAULT_RUNS,
    LINEARS,
    intruder_count,
    target_label,
)
from minilora.experiments.paths import base_model_path
from minilora.experiments.studies.delta_w_common import (
    INTRUDER_MODULES,
    Evaluator,
    StudyError,
    adapter_factors,
    find_cells,
    full_weights,
    linear_names,
    lora_weights,
    rounded,
)

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
                     ev: Evaluator | None = None, bar=None) -> dict:
    """Task loss and forgetting of the base with each block linear's full-FT ΔW replaced by its
    best rank-r approximation (other parameters at the base), for each full-FT seed, beside LoRA
    trained at rank r on all linears (records). Also: the full-FT ΔW untruncated on the linears
    only, and the whole fine-tuned model (the record)."""
    ev = ev or Evaluator()
    fulls = find_cells(records, method="full", steps=steps)
    if not fulls:
        raise StudyError("the sweep has no full fine-tuning cell", add=dict(full=True))
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
            if bar is not None:
                bar.update(1)
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
        got = ev(lora_weights(factors, scale, ev.base))
        out["check"] = {"cell": cell[0]["key"], "record_task_loss":
                        cell[0]["result"]["task_metric"], "evaluated_task_loss": got["task_loss"],
                        "record_forgetting": cell[0]["result"]["forgetting"],
                        "evaluated_forgetting": got["forgetting"]}
    return out


# ----------------------------------------------------------------------------------------------
# 5. intruder dimensions


def intruder_null(records, eps_grid=(0.3, 0.4, 0.5, 0.6, 0.7), k_max: int = 20,
                  n_draws: int = 3, seed: int = 0, steps=None, base=None, bar=None) -> dict:
    """The null distribution of the intruder similarities: every W (of :data:`INTRUDER_MODULES`)
    against W + N, N Gaussian with ||N||_F / ||W||_F = the median relative size of full
    fine-tuning's ΔW (and half and twice that). Returns the similarities' quantiles per rank j,
    the false-positive rate per (ε, k), the random-vector floor in R^d, and the chosen ε, k."""
    model, _, _ = load_checkpoint(base or base_model_path())
    params = {n: np.asarray(p, np.float64) for n, p in model.named_parameters()}
    k_max = min(k_max, min(params[n + ".weight"].shape[0] for n in linear_names(model)))
    fulls = find_cells(records, method="full", steps=steps)
    if not fulls:
        raise StudyError("the sweep has no full fine-tuning cell", add=dict(full=True))
    rel = float(np.median([v["fro"] / v["w_fro"] for x in fulls for v in x["delta_w"].values()]))
    rng = np.random.default_rng(seed)
    names = [n for n in linear_names(model) if n.split(".")[-1] in INTRUDER_MODULES]
    levels = {}
    for factor in (0.5, 1.0, 2.0):
        sims = []
        for n in names:
            sims.append(perturbed_similarities(params[n + ".weight"], rel * factor, k_max, rng,
                                               n_draws))
            if bar is not None:
                bar.update(1)
        sims = np.concatenate(sims)                                            # (M, k)
        fp = {f"{eps:g}": [float(np.mean(np.any(sims[:, :k] < eps, axis=1)))
                           for k in range(1, k_max + 1)] for eps in eps_grid}
        levels[f"{factor:g}"] = {
            "relative_noise": rel * factor,
            "quantiles_by_rank": {q: rounded(np.quantile(sims, float(q), axis=0), 4)
                                  for q in ("0.01", "0.05", "0.5")},
            "min_by_rank": rounded(sims.min(axis=0), 4),
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
                     lambdas=(0.5, 0.0), steps=None, ev: Evaluator | None = None,
                     bar=None) -> list[dict]:
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
        Wt = lora_weights(factors, scale, ev.base)
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
            if bar is not None:
                bar.update(1)
        out.append(row)
    return out


def spearman(xs, ys) -> dict:
    """Spearman's ρ and its p-value (scipy), or nan when a variable is constant."""
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"rho": float("nan"), "p": float("nan"), "n": len(xs)}
    from scipy.stats import spearmanr  # lazy: scipy.stats takes ~0.4 s to import (every CLI start paid it)
    res = spearmanr(xs, ys)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": len(xs)}


# ----------------------------------------------------------------------------------------------
# all of it


def budget_table(records, budget_targets=("q",), budget_r: int = 8, tolerance: float = 0.15) -> dict:
    """The LoRA paper's Table 5 shape: every LoRA cell whose trainable parameters are within
    ``tolerance`` of the budget of (``budget_targets``, r = ``budget_r``), mean ± std over seeds
    of the task loss and forgetting, best first."""
    ref = find_cells(records, targets=",".join(budget_targets), r=budget_r)
    if not ref:
        raise StudyError(f"the sweep has no {','.join(budget_targets)} r={budget_r} cell to set "
                         "the budget", add=dict(pairs=f"{','.join(budget_targets)}:{budget_r};"
                                                      "q,v:4;q,k,v,o:2"))
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
