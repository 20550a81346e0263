"""Analyse a LoRA adapter module by module: ΔW's spectrum, φ against another adapter, and (with
the base weights) the amplification factor and intruder dimensions. No printing, no files
written: one :class:`ModuleRecord` per module, for tables and figures built elsewhere.

Per module, with ΔW = s · B A (B (d_out, r), A (r, d_in)):

* always (from the r × r core, :func:`lowrank_svd`; nothing d_out × d_in is formed): the
  singular values of ΔW, ||ΔW||_F, ||ΔW||_2, the energy of the top direction, the rank holding
  90 % of the energy, the effective and stable ranks;
* with ``other`` (a second adapter with the same module names): the grid φ(i, j) between the two
  modules' subspaces (by default the right singular vectors of A, as the LoRA paper's §7.2) and
  the random baseline max(i, j)/d at the same width d;
* with ``base`` (the pre-trained weights): ||W||_F, ||U_rᵀ W V_r||_F for ΔW's top-r vectors, for
  W's own top-r vectors and for random ones (the LoRA paper's Table 7 columns), the amplification
  factor ||ΔW||_F / ||U_rᵀ W V_r||_F, and the intruder dimensions of W_0 + ΔW against W_0.
  Matrices wider than ``full_svd_max_dim`` use a randomized SVD (top ``base_rank`` of W_0, top k
  of W_0 + ΔW); the record says which (``svd_method``) and how many intruders that leaves
  uncertain (``intruder_uncertain``). DoRA modules use the merged DoRA weight
  m · (W_0 + ΔW) / ||W_0 + ΔW||_row for the intruders.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from minilora.analysis.intruders import intruder_dimensions
from minilora.analysis.lowrank import lowrank_svd
from minilora.analysis.peft_files import PeftAdapter, read_peft_adapter
from minilora.analysis.randomized import randomized_svd
from minilora.analysis.safetensors_lazy import AdapterFileError, BaseWeights
from minilora.analysis.subspace import phi_grid, phi_random_expectation, project_onto
from minilora.analysis.svd import (
    AnalysisError,
    as_float64,
    effective_rank,
    energy_captured,
    rank_for_energy,
    stable_rank,
    svd,
)

#: the bases φ can compare: name -> (which factor, which side)
SUBSPACES = ("A", "B", "delta_in", "delta_out")


@dataclass(frozen=True)
class ModuleRecord:
    """Everything measured on one adapted module. Fields that need ``other`` or ``base`` are None
    without them. Arrays are float64 NumPy; :meth:`row` gives the scalar columns for a table."""
    module: str                 # module path, e.g. "model.layers.3.self_attn.q_proj"
    layer: int | None           # first integer in the path (the block index), None if none
    kind: str                   # "linear", "embedding" or "conv"
    d_out: int                  # ΔW is (d_out, d_in), y = ΔW x
    d_in: int
    r: int                      # LoRA rank
    lora_alpha: float
    scale: float                # s in ΔW = s · B A
    dora: bool                  # a DoRA magnitude vector is present (the ΔW fields then describe
                                # the directional update s·B A; intruders use the merged weight)
    singular_values: np.ndarray = field(repr=False)   # (min(r, d_out, d_in),) of ΔW, descending
    delta_fro: float = 0.0      # ||ΔW||_F
    delta_spectral: float = 0.0  # ||ΔW||_2 = largest singular value
    energy_top1: float = 0.0    # σ_1² / Σ σ_i²
    rank_90: int = 0            # smallest k with Σ_{i<=k} σ_i² >= 0.9 Σ σ_i²
    effective_rank: float = 0.0  # exp(entropy of σ / Σσ) (Roy & Vetterli)
    stable_rank: float = 0.0    # Σ σ_i² / σ_1²
    # -- with `other` --------------------------------------------------------------------------
    other_r: int | None = None
    phi_subspace: str | None = None   # "A": right sing. vectors of A (paper); "B": left of B;
                                      # "delta_in"/"delta_out": right/left of ΔW
    phi_dim: int | None = None        # d, the dimension of the space compared (d_in or d_out)
    phi_grid: np.ndarray | None = field(default=None, repr=False)  # (r, other_r), φ(i, j) at [i-1, j-1]
    phi_top1: float | None = None     # φ(1, 1): |cos| ² of the two top directions
    phi_full: float | None = None     # φ(r, other_r)
    phi_baseline_top1: float | None = None   # E φ(1, 1) for random subspaces = 1 / d
    phi_baseline_full: float | None = None   # E φ(r, other_r) = max(r, other_r) / d
    # -- with `base` ---------------------------------------------------------------------------
    base_key: str | None = None       # the base weight's name in the base file(s)
    w_fro: float | None = None        # ||W||_F
    w_proj_delta: float | None = None  # ||U_rᵀ W V_r||_F, U_r, V_r = top-r singular vectors of ΔW
    w_proj_top: float | None = None   # same with W's own top-r vectors = sqrt(Σ_{i<=r} σ_i(W)²)
    w_proj_random: float | None = None  # same for random U, V (expected): r ||W||_F / sqrt(d_out d_in)
    amplification: float | None = None  # ||ΔW||_F / w_proj_delta (LoRA §7.3)
    intruder_k: int | None = None     # fine-tuned singular vectors examined (top k)
    intruder_eps: float | None = None  # cosine threshold ε
    intruder_count: int | None = None  # how many of the top k have max |cos| < ε
    intruder_indices: np.ndarray | None = field(default=None, repr=False)  # their ranks (0-based)
    intruder_similarities: np.ndarray | None = field(default=None, repr=False)  # (k,) max |cos|
    intruder_uncertain: int | None = None  # intruders a full SVD of W_0 could overturn (0 if full)
    svd_method: str | None = None     # "full" or "randomized(base_rank=.., k=.., p=.., q=..)"

    def row(self) -> dict:
        """The scalar fields (name -> value) for a CSV/Markdown row; arrays are left out except
        ``intruder_indices``, written as a space-separated string."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        if self.intruder_indices is not None:
            out["intruder_indices"] = " ".join(str(int(i)) for i in self.intruder_indices)
        return out


def layer_index(module: str) -> int | None:
    """The first all-digit component of a module path (``model.layers.12.mlp`` -> 12), or None."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def subspace_basis(B, A, scale: float, subspace: str = "A") -> np.ndarray:
    """An orthonormal basis (d, r) ordered by importance, of the side of ΔW = s·B A named by
    ``subspace`` (see :data:`SUBSPACES`): "A" = right singular vectors of A (the LoRA paper's
    choice, in R^d_in), "B" = left singular vectors of B (R^d_out), "delta_in" / "delta_out" =
    right / left singular vectors of ΔW itself."""
    if subspace not in SUBSPACES:
        raise AnalysisError(f"subspace must be one of {', '.join(SUBSPACES)}, got {subspace!r}")
    if subspace == "A":
        return svd(A).Vh.T
    if subspace == "B":
        return svd(B).U
    U, _, Vh = lowrank_svd(B, A, scale)
    return Vh.T if subspace == "delta_in" else U


def dora_weight(W, delta_w, magnitude) -> np.ndarray:
    """DoRA's merged weight m · (W + ΔW) / ||W + ΔW||_row: W, ΔW (d_out, d_in), m (d_out,); each
    output row is rescaled to norm m_i (PEFT's ``weight_norm`` over dim 1)."""
    V = W + delta_w
    return V * (np.asarray(magnitude, dtype=np.float64) / np.linalg.norm(V, axis=1))[:, None]


def analyze_lora_module(name: str, B, A, scale: float, *, kind: str = "linear",
                        lora_alpha: float | None = None, other=None, W=None, magnitude=None,
                        dora: bool | None = None, base_key: str | None = None,
                        top_k: int = 10, eps: float = 0.5, subspace: str = "A",
                        full_svd_max_dim: int = 1024, base_rank: int = 64,
                        oversample: int = 10, power_iters: int = 4, seed: int = 0) -> ModuleRecord:
    """Analyse one module's ΔW = scale · B A (see the module docstring); arrays of any backend.

    Args:
        name: module path (recorded, and its first integer becomes ``layer``).
        B, A: (d_out, r) and (r, d_in), y = ΔW x orientation.
        scale: LoRA scaling s.
        kind, lora_alpha: recorded as given (lora_alpha defaults to scale · r).
        other: optional (B2, A2, scale2) of the same module in a second adapter, for φ.
        W: optional (d_out, d_in) pre-trained weight, for amplification and intruders.
        magnitude: DoRA's m (d_out,) when the module is DoRA (then intruders use the merged
            DoRA weight).
        dora: record the module as DoRA (default: ``magnitude is not None``).
        top_k, eps: intruder parameters (k is capped at min(d_out, d_in); the record says k).
        subspace: which basis φ compares (:data:`SUBSPACES`).
        full_svd_max_dim: matrices whose larger side exceeds this use a randomized SVD.
        base_rank, oversample, power_iters, seed: the randomized SVD's m (top vectors of W_0
            kept), p, q and the seed of its Gaussian sketch.
    """
    B, A = as_float64(B, "B", 2), as_float64(A, "A", 2)
    dec = lowrank_svd(B, A, scale)
    s = dec.s
    d_out, r, d_in = B.shape[0], A.shape[0], A.shape[1]
    rec = dict(module=name, layer=layer_index(name), kind=kind, d_out=d_out, d_in=d_in, r=r,
               lora_alpha=float(scale * r if lora_alpha is None else lora_alpha),
               scale=float(scale),
               dora=bool(magnitude is not None if dora is None else dora), singular_values=s,
               delta_fro=float(np.sqrt(np.sum(s ** 2))), delta_spectral=float(s[0]),
               energy_top1=energy_captured(s, 1), rank_90=rank_for_energy(s, 0.9),
               effective_rank=effective_rank(s), stable_rank=stable_rank(s))
    if other is not None:
        B2, A2, scale2 = other
        U1 = subspace_basis(B, A, scale, subspace)
        U2 = subspace_basis(B2, A2, scale2, subspace)
        if U1.shape[0] != U2.shape[0]:
            raise AnalysisError(f"module {name}: the two adapters' {subspace} spaces differ in "
                                f"width ({U1.shape[0]} vs {U2.shape[0]})")
        grid = phi_grid(U1, U2)
        d, r2 = U1.shape[0], U2.shape[1]
        rec.update(other_r=int(np.asarray(A2).shape[0]), phi_subspace=subspace, phi_dim=d,
                   phi_grid=grid, phi_top1=float(grid[0, 0]), phi_full=float(grid[-1, -1]),
                   phi_baseline_top1=phi_random_expectation(1, 1, d),
                   phi_baseline_full=phi_random_expectation(U1.shape[1], r2, d))
    if W is not None:
        rec.update(_with_base(dec, as_float64(W, "W", 2), B, A, scale, magnitude, top_k, eps,
                              full_svd_max_dim, base_rank, oversample, power_iters, seed, name))
        rec["base_key"] = base_key
    return ModuleRecord(**rec)


def _with_base(dec, W, B, A, scale, magnitude, top_k, eps, full_svd_max_dim, base_rank,
               oversample, power_iters, seed, name) -> dict:
    U, s, Vh = dec
    if W.shape != (U.shape[0], Vh.shape[1]):
        raise AnalysisError(f"module {name}: base weight {W.shape} does not fit ΔW "
                            f"{(U.shape[0], Vh.shape[1])}")
    r = s.size
    w_fro = float(np.linalg.norm(W))
    proj = float(np.linalg.norm(project_onto(W, U, Vh)))          # ||U_rᵀ W V_r||_F
    delta_w = scale * (B @ A)                                      # (d_out, d_in)
    W_t = W + delta_w if magnitude is None else dora_weight(W, delta_w, magnitude)
    k = min(top_k, min(W.shape))
    if max(W.shape) <= full_svd_max_dim:
        (U0, s0, _), Ut = svd(W), svd(W_t).U
        method = "full"
    else:
        m = min(max(base_rank, r, k), min(W.shape))
        U0, s0, _ = randomized_svd(W, m, oversample=oversample, power_iters=power_iters,
                                   rng=np.random.default_rng(seed))
        Ut = randomized_svd(W_t, k, oversample=oversample, power_iters=power_iters,
                            rng=np.random.default_rng(seed + 1)).U
        method = f"randomized(base_rank={m}, k={k}, p={oversample}, q={power_iters})"
    found = intruder_dimensions(U0, Ut, k, eps)
    uncertain = int(np.sum(found.tail_bound[found.indices] >= eps))
    total = float(np.sqrt(np.sum(s ** 2)))
    return dict(w_fro=w_fro, w_proj_delta=proj,
                w_proj_top=float(np.sqrt(np.sum(s0[:r] ** 2))),
                w_proj_random=float(r * w_fro / np.sqrt(W.shape[0] * W.shape[1])),
                amplification=(float("nan") if total == 0 else
                               float("inf") if proj == 0 else total / proj),
                intruder_k=k, intruder_eps=float(eps), intruder_count=found.count,
                intruder_indices=found.indices, intruder_similarities=found.similarities,
                intruder_uncertain=uncertain,
                svd_method=method)


def _open(obj, cls, opener):
    return obj if isinstance(obj, cls) or obj is None else opener(obj)


def _orientation(shape, mod, fan_in_fan_out: bool) -> str | None:
    """How a stored base weight of ``shape`` maps to module ``mod``'s ΔW (d_out, d_in):
    "same", "transposed" (embeddings, GPT-2 Conv1D / fan_in_fan_out) or None (does not fit)."""
    want = (mod.d_out, mod.d_in)
    shape = tuple(shape)
    if mod.kind == "conv":
        return "same" if shape[0] == mod.d_out and int(np.prod(shape[1:])) == mod.d_in else None
    if mod.kind == "embedding":
        return "transposed" if shape == want[::-1] else None
    if shape == want and (want[0] != want[1] or not fan_in_fan_out):
        return "same"
    return "transposed" if shape == want[::-1] else None


def analyze_adapter(path, other=None, base=None, *, modules: str | None = None,
                    adapter_name: str | None = None, top_k: int = 10, eps: float = 0.5,
                    subspace: str = "A", full_svd_max_dim: int = 1024, base_rank: int = 64,
                    oversample: int = 10, power_iters: int = 4, seed: int = 0,
                    progress: Callable[[int, int, str], None] | None = None) -> list[ModuleRecord]:
    """Analyse every module of a PEFT LoRA adapter; one :class:`ModuleRecord` per module.

    Args:
        path: the adapter directory (or an open :class:`PeftAdapter`).
        other: a second adapter (directory or PeftAdapter) for φ; modules are matched by name
            and those missing from it get no φ fields (``adapter_name`` applies to both).
        base: the pre-trained weights (a .safetensors file, a directory with
            model.safetensors or a sharded index, or an open :class:`BaseWeights`).
        modules: a regular expression; only module paths where ``re.search`` finds it are kept.
        adapter_name: pick one adapter in a file that holds several.
        top_k, eps, subspace, full_svd_max_dim, base_rank, oversample, power_iters, seed: see
            :func:`analyze_lora_module`.
        progress: called as ``progress(done, total, module)`` after each module.

    Everything that can be checked (files, config, module names, base weights present and of
    the right shape, arguments) is checked before the first module is analysed. Tensors are read
    one module at a time; only the base weights of the current module are in memory.
    """
    if subspace not in SUBSPACES:
        raise AnalysisError(f"subspace must be one of {', '.join(SUBSPACES)}, got {subspace!r}")
    if top_k < 1 or not 0.0 < eps <= 1.0 or base_rank < 1 or full_svd_max_dim < 1:
        raise AnalysisError(f"need top_k >= 1, 0 < eps <= 1, base_rank >= 1 and "
                            f"full_svd_max_dim >= 1; got {top_k}, {eps}, {base_rank}, "
                            f"{full_svd_max_dim}")
    try:
        pattern = re.compile(modules) if modules is not None else None
    except re.error as e:
        raise AnalysisError(f"modules={modules!r} is not a regular expression ({e})") from None
    adapter = _open(path, PeftAdapter, lambda p: read_peft_adapter(p, adapter_name))
    other = _open(other, PeftAdapter, lambda p: read_peft_adapter(p, adapter_name))
    base = _open(base, BaseWeights, BaseWeights)
    names = [n for n in adapter.modules if pattern is None or pattern.search(n)]
    if not names:
        raise AnalysisError(f"no module of {adapter.path} matches modules={modules!r} "
                            f"(first modules: {', '.join(list(adapter.modules)[:3])})")
    if other is not None:
        if not set(names) & set(other.modules):
            raise AnalysisError(f"{adapter.path} and {other.path} share no module name")
        for n in set(names) & set(other.modules):
            a, b = adapter.modules[n], other.modules[n]
            if (a.d_out, a.d_in) != (b.d_out, b.d_in):
                raise AnalysisError(f"module {n} is ({a.d_out}, {a.d_in}) in {adapter.path} but "
                                    f"({b.d_out}, {b.d_in}) in {other.path}: not the same model")
    base_plan = {}
    if base is not None:
        fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
        for n in names:
            mod = adapter.modules[n]
            if mod.magnitude_key is not None and mod.kind == "embedding":
                raise AnalysisError(f"module {n}: DoRA on an embedding is not supported with "
                                    f"base weights (run without base for its ΔW spectrum)")
            key = base.find(n)
            how = _orientation(base.shape(key), mod, fan_in_fan_out)
            if how is None:
                raise AdapterFileError(f"base weight {key!r} has shape {base.shape(key)}, which "
                                       f"does not fit module {n}'s ΔW ({mod.d_out}, {mod.d_in})")
            base_plan[n] = (key, how)
    records = []
    for i, n in enumerate(names):
        mod = adapter.modules[n]
        B, A = adapter.factors(n)
        oth = None
        if other is not None and n in other.modules:
            oth = (*other.factors(n), other.modules[n].scale)
        W = None
        if n in base_plan:
            key, how = base_plan[n]
            W = base.read(key).reshape(-1, mod.d_in) if mod.kind == "conv" else base.read(key)
            W = W.T if how == "transposed" else W
        records.append(analyze_lora_module(
            n, B, A, mod.scale, kind=mod.kind, lora_alpha=mod.lora_alpha, other=oth, W=W,
            magnitude=adapter.magnitude(n) if W is not None else None,
            dora=mod.magnitude_key is not None,
            base_key=base_plan.get(n, (None,))[0], top_k=top_k, eps=eps, subspace=subspace,
            full_svd_max_dim=full_svd_max_dim, base_rank=base_rank, oversample=oversample,
            power_iters=power_iters, seed=seed))
        del W
        if progress is not None:
            progress(i + 1, len(names), n)
    return records
