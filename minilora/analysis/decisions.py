"""Decisions from a ΔW analysis: how much of its rank an adapter uses, what rank each module
needs, the best rank-K version of an adapter, and whether two adapters can be merged.

Every decision rests on a number with a baseline beside it:

* **utilisation** = stable rank / r (stable rank ‖ΔW‖_F² / ‖ΔW‖_2², in [1, r]): near 1/r the update
  is nearly rank one and most of the rank budget is idle;
* **rank suggestions** per module: the ranks holding 90 / 95 / 99 % of ‖ΔW‖_F² (Eckart-Young:
  the best rank-k approximation keeps exactly that energy), the effective rank and the knee, and
  a PEFT ``rank_pattern`` that realises one of them (:func:`rank_pattern`);
* **truncation** (:func:`truncate_factors`): B_k, A_k with B_k A_k = the best rank-k
  approximation of s·B·A, split evenly (B_k = U_k √S_k, A_k = √S_k V_kᵀ, scale 1);
* **merge triage** for a pair of adapters on the same model (:func:`compare_modules`): per
  module, the magnitude ratio ‖ΔW_a‖_F / ‖ΔW_b‖_F, the overlap φ of their input and output
  subspaces at the energy ranks k_a, k_b (rank_90) against the null's 95th percentile at the
  same (k_a, k_b, d), and the cosine ⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖_F ‖ΔW_b‖_F). The verdict takes all
  three; no single cosine decides it:

  - "independent": neither side's overlap exceeds the null: the updates live in unrelated
    directions and merging adds them with no interference;
  - "shared, aligned" / "shared, opposed": both sides overlap beyond the null and the updates
    point the same way (cosine > 0.1) or opposite ways (< -0.1): merging reinforces them (scale
    down) or cancels them (a conflict);
  - "shared, mixed": the subspaces overlap but the cosine is near 0 (the shared directions carry
    different maps);
  - "partly shared (input)" / "(output)": only one side beyond the null;
  - "one dominates": the magnitude ratio is beyond 10 (either way), whatever the overlaps: a merge
    is mostly the larger update.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from minilora.analysis.adapter_analysis import subspace_basis
from minilora.analysis.lowrank import lowrank_svd
from minilora.analysis.module_paths import layer_index, module_type
from minilora.analysis.subspace import phi_grid, phi_null_quantiles, phi_random_expectation
from minilora.analysis.svd import AnalysisError, rank_for_energy

#: the energy levels of the rank suggestions
ENERGY_LEVELS = (0.90, 0.95, 0.99)
#: what a rank_pattern can be built from (a record's field)
RANK_CRITERIA = ("rank_90", "rank_95", "rank_99", "effective_rank", "knee")
DOMINANCE = 10.0
ALIGNED = 0.1


@dataclass(frozen=True)
class PairRecord:
    """Two adapters' ΔW of one module side by side (adapters named by their index in the run)."""
    module: str
    module_type: str
    layer: int | None
    a: int
    b: int
    subspace: str              # the basis of phi_top1 / phi_full (as ModuleRecord.phi_subspace)
    d: int                     # its width
    r_a: int
    r_b: int
    phi_top1: float
    phi_full: float
    phi_baseline_full: float   # max(r_a, r_b) / d
    phi_null95_top1: float
    phi_null95_full: float
    phi_null975_full: float
    magnitude_ratio: float     # ‖ΔW_a‖_F / ‖ΔW_b‖_F
    k_a: int                   # rank_90 of each
    k_b: int
    overlap_in: float          # φ(k_a, k_b) of ΔW's right singular vectors (input side)
    overlap_in_null95: float   # the null's 95th percentile at (k_a, k_b, d_in)
    overlap_out: float         # φ(k_a, k_b) of the left singular vectors (output side)
    overlap_out_null95: float  # ... at (k_a, k_b, d_out)
    cosine: float              # <ΔW_a, ΔW_b>_F / (‖ΔW_a‖_F ‖ΔW_b‖_F)
    verdict: str

    def row(self) -> dict:
        return asdict(self)


def _phi_at(U1, U2, i, j) -> float:
    return float(phi_grid(U1[:, :i], U2[:, :j])[-1, -1])


def compare_modules(name: str, a: int, b: int, fa, fb, subspace: str = "A") -> PairRecord:
    """A :class:`PairRecord` for module ``name`` of adapters ``a`` and ``b``; ``fa``, ``fb`` are
    (B, A, scale) in y = ΔW x orientation (module docstring for the verdict)."""
    (Ba, Aa, sa), (Bb, Ab, sb) = fa, fb
    Ua, Ub = subspace_basis(Ba, Aa, sa, subspace), subspace_basis(Bb, Ab, sb, subspace)
    if Ua.shape[0] != Ub.shape[0]:
        raise AnalysisError(f"module {name}: the two adapters' {subspace} spaces differ in width")
    grid = phi_grid(Ua, Ub)
    d, ra, rb = Ua.shape[0], Ua.shape[1], Ub.shape[1]
    da, db = lowrank_svd(Ba, Aa, sa), lowrank_svd(Bb, Ab, sb)
    na, nb = float(np.sqrt(np.sum(da.s ** 2))), float(np.sqrt(np.sum(db.s ** 2)))
    ka, kb = max(1, rank_for_energy(da.s, 0.9)), max(1, rank_for_energy(db.s, 0.9))
    d_out, d_in = Ba.shape[0], Aa.shape[1]
    if na == 0 or nb == 0:
        ov_in = ov_out = cos = float("nan")
        verdict = "untrained (ΔW = 0 in one adapter)"
        q_in = q_out = float("nan")
    else:
        ov_in = _phi_at(da.Vh.T, db.Vh.T, ka, kb)
        ov_out = _phi_at(da.U, db.U, ka, kb)
        q_in = phi_null_quantiles(ka, kb, d_in)[0]
        q_out = phi_null_quantiles(ka, kb, d_out)[0]
        # <s_a B_a A_a, s_b B_b A_b>_F = s_a s_b Σ (B_aᵀ B_b) ∘ (A_a A_bᵀ)
        inner = sa * sb * float(np.sum((Ba.T @ Bb) * (Aa @ Ab.T)))
        cos = inner / (na * nb)
        verdict = merge_verdict(na / nb, ov_in > q_in, ov_out > q_out, cos)
    return PairRecord(
        module=name, module_type=module_type(name), layer=layer_index(name), a=a, b=b,
        subspace=subspace, d=d, r_a=ra, r_b=rb, phi_top1=float(grid[0, 0]),
        phi_full=float(grid[-1, -1]), phi_baseline_full=phi_random_expectation(ra, rb, d),
        phi_null95_top1=phi_null_quantiles(1, 1, d)[0],
        phi_null95_full=phi_null_quantiles(ra, rb, d)[0],
        phi_null975_full=phi_null_quantiles(ra, rb, d)[1],
        magnitude_ratio=na / nb if nb else float("inf"), k_a=ka, k_b=kb,
        overlap_in=ov_in, overlap_in_null95=q_in, overlap_out=ov_out,
        overlap_out_null95=q_out, cosine=cos, verdict=verdict)


def merge_verdict(ratio: float, shared_in: bool, shared_out: bool, cosine: float) -> str:
    """The triage verdict from the magnitude ratio, the two overlaps (beyond the null or not)
    and the Frobenius cosine (module docstring)."""
    if not (1 / DOMINANCE <= ratio <= DOMINANCE):
        return "one dominates"
    if not shared_in and not shared_out:
        return "independent"
    if shared_in and shared_out:
        if cosine > ALIGNED:
            return "shared, aligned"
        if cosine < -ALIGNED:
            return "shared, opposed"
        return "shared, mixed"
    return "partly shared (input)" if shared_in else "partly shared (output)"


# ----------------------------------------------------------------------------------------------
# one adapter: utilisation, energy per layer, rank suggestions
# ----------------------------------------------------------------------------------------------
def adapter_summary(records, wasteful: int = 3) -> dict:
    """The adapter-level view of its module records (one adapter):

    modules, the total ‖ΔW‖_F, the stable rank's and the utilisation's min / median / max,
    each layer's share of Σ‖ΔW‖_F² (layer None: modules outside the blocks), and the
    ``wasteful`` modules: the lowest rank_95 / r (the rank that 95 % of the energy needs, as a
    share of the budget), then the lowest utilisation."""
    recs = list(records)
    if not recs:
        return {"modules": 0}
    energy = np.array([r.delta_fro ** 2 for r in recs])
    total = float(energy.sum())
    by_layer: dict = {}
    for r, e in zip(recs, energy):
        by_layer[r.layer] = by_layer.get(r.layer, 0.0) + float(e)
    layers = sorted((x for x in by_layer if x is not None)) + ([None] if None in by_layer else [])
    stable = np.array([r.stable_rank for r in recs])
    util = np.array([r.utilisation for r in recs])
    spare = np.array([r.rank_95 / r.r if r.r else 1.0 for r in recs])
    order = sorted(range(len(recs)), key=lambda i: (spare[i], util[i], recs[i].module))
    return {
        "modules": len(recs), "total_fro": float(np.sqrt(total)),
        "ranks": sorted({r.r for r in recs}),
        "stable_rank": _spread(stable), "utilisation": _spread(util),
        "layer_energy_share": [{"layer": x, "share": (by_layer[x] / total if total else None)}
                               for x in layers],
        "wasteful": [{"module": recs[i].module, "r": recs[i].r,
                      "stable_rank": float(stable[i]), "utilisation": float(util[i]),
                      "rank_95": recs[i].rank_95} for i in order[:wasteful]],
    }


def _spread(x) -> dict:
    return {"min": float(np.min(x)), "median": float(np.median(x)), "max": float(np.max(x))}


def rank_suggestions(record) -> dict:
    """{criterion: rank} for one module record: rank_90 / 95 / 99, the effective rank rounded up,
    the knee (all at least 1 for a non-zero ΔW, 0 for ΔW = 0)."""
    if record.delta_fro == 0:
        return {c: 0 for c in RANK_CRITERIA}
    return {"rank_90": record.rank_90, "rank_95": record.rank_95, "rank_99": record.rank_99,
            "effective_rank": int(np.ceil(record.effective_rank - 1e-9)),
            "knee": record.knee}


def rank_pattern(records, criterion: str = "rank_95") -> dict:
    """A PEFT ``rank_pattern`` ({module path: rank}) giving each module the rank ``criterion``
    suggests (:data:`RANK_CRITERIA`); PEFT matches a key against a module path's dotted suffix,
    so full paths name exactly one module each. Modules with ΔW = 0 are left out."""
    if criterion not in RANK_CRITERIA:
        raise AnalysisError(f"criterion must be one of {', '.join(RANK_CRITERIA)}, "
                            f"got {criterion!r}")
    out = {}
    for r in records:
        k = rank_suggestions(r)[criterion]
        if k > 0:
            out[r.module] = int(k)
    return out


# ----------------------------------------------------------------------------------------------
# truncation
# ----------------------------------------------------------------------------------------------
def truncate_factors(B, A, scale: float, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(B_k (d_out, k), A_k (k, d_in), energy kept) with B_k A_k the best rank-k approximation
    of ΔW = scale · B A (Eckart-Young, both norms), split evenly between the factors; energy kept
    = Σ_{i<=k} σ_i² / Σ σ_i² (1.0 for ΔW = 0). 1 <= k <= r."""
    U, s, Vh = lowrank_svd(B, A, scale)
    if not 1 <= k <= s.size:
        raise AnalysisError(f"k must be in [1, {s.size}], got {k}")
    root = np.sqrt(s[:k])
    total = float(np.sum(s ** 2))
    kept = float(np.sum(s[:k] ** 2) / total) if total > 0 else 1.0
    return U[:, :k] * root, root[:, None] * Vh[:k], kept


def rank_for_energy_target(B, A, scale: float, energy: float) -> int:
    """The smallest k whose truncation keeps ``energy`` of ‖ΔW‖_F² (at least 1)."""
    s = lowrank_svd(B, A, scale).s
    return max(1, rank_for_energy(s, energy))


__all__ = ["ENERGY_LEVELS", "RANK_CRITERIA", "PairRecord", "adapter_summary", "compare_modules",
           "merge_verdict", "rank_for_energy_target", "rank_pattern", "rank_suggestions",
           "truncate_factors"]
