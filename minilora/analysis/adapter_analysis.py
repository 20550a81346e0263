"""Analyse a LoRA adapter module by module: ΔW's spectrum, φ against another adapter, and (with
the base weights) the amplification factor and intruder dimensions. No printing, no files
written (except the base-SVD cache, when one is given): one :class:`ModuleRecord` per module,
for tables and figures built elsewhere.

Per module, with ΔW = s · B A (B (d_out, r), A (r, d_in)):

* always (from the r × r core, :func:`lowrank_svd`; nothing d_out × d_in is formed): the
  singular values of ΔW, ||ΔW||_F, ||ΔW||_2, the energy of the top direction, the ranks holding
  90 / 95 / 99 % of the energy, the knee, the effective and stable ranks, and the utilisation
  stable rank / r;
* with ``other`` (a second adapter with the same module names): the grid φ(i, j) between the two
  modules' subspaces (by default the right singular vectors of A, as the LoRA paper's §7.2), the
  random expectation max(i, j)/d and the null's 95th / 97.5th percentiles at the same width d;
* with ``base`` (the pre-trained weights): ||W||_F, ||W||_2 and ||ΔW||_2 / ||W||_2,
  ||U_rᵀ W V_r||_F for ΔW's top-r vectors, for W's own top-r vectors and for random ones (the LoRA
  paper's Table 7 columns), the amplification factor ||ΔW||_F / ||U_rᵀ W V_r||_F, and the
  intruder dimensions of W_0 + ΔW against W_0.

Intruders (``intruders=``): "exact" (the default) is the paper's count against W_0's full
spectrum at any size, from W_0's SVD (computed once per base matrix and kept in a
:class:`~minilora.analysis.exact_intruders.BaseSvdCache`) and a certified low-rank update
(:mod:`.exact_intruders`); "approx" is a randomized SVD of the top ``base_rank`` vectors of W_0
for matrices wider than ``full_svd_max_dim`` (the record then holds a range,
``intruder_count_min`` .. ``intruder_count_max``, and ``intruder_count`` is None unless they
agree); "off" skips them. DoRA modules use the merged DoRA weight m · (W_0 + ΔW) /
||W_0 + ΔW||_row (not a low-rank update: two dense SVDs).

How the base weight is laid out (``base_orientation``): y = W x needs W (d_out, d_in); GPT-2's
Conv1D and embeddings store the transpose. A non-square weight shows its layout by its shape; a
square one cannot, and follows the adapter's non-square modules when they all agree, else the
``model_type`` of a ``config.json`` beside the base (GPT-2's linears are Conv1D), else the
``fan_in_fan_out`` flag, with a warning whenever the flag disagrees with the evidence or stands
alone (real GPT-2 adapters carry ``fan_in_fan_out: false``). A module whose
weight the base does not hold under its own name may share a tied one (``lm_head`` and the
token embedding): ``base_note`` says so.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from scipy.sparse.linalg import svds

from minilora.analysis.exact_intruders import MemoryCache, intruders_lowrank
from minilora.analysis.intruders import intruder_dimensions
from minilora.analysis.lowrank import lowrank_svd
from minilora.analysis.module_paths import layer_index, module_type
from minilora.analysis.peft_files import PeftAdapter, read_peft_adapter
from minilora.analysis.randomized import randomized_svd
from minilora.analysis.safetensors_lazy import AdapterFileError, BaseWeights
from minilora.analysis.subspace import phi_grid, phi_null_quantiles, phi_random_expectation
from minilora.analysis.svd import (
    AnalysisError,
    as_float64,
    effective_rank,
    energy_captured,
    knee_rank,
    rank_for_energy,
    stable_rank,
    svd,
)

#: the bases φ can compare: name -> (which factor, which side)
SUBSPACES = ("A", "B", "delta_in", "delta_out")
#: how intruders are counted (see the module docstring)
INTRUDER_MODES = ("exact", "approx", "off")


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
    module_type: str = ""       # the path with the layer replaced by "*": one matrix, all layers
    delta_fro: float = 0.0      # ||ΔW||_F
    delta_spectral: float = 0.0  # ||ΔW||_2 = largest singular value
    energy_top1: float = 0.0    # σ_1² / Σ σ_i²
    rank_90: int = 0            # smallest k with Σ_{i<=k} σ_i² >= 0.9 Σ σ_i²
    rank_95: int = 0            # the same for 95 %
    rank_99: int = 0            # and 99 %
    knee: int = 0               # the knee of the energy curve (svd.knee_rank)
    effective_rank: float = 0.0  # exp(entropy of σ / Σσ) (Roy & Vetterli)
    stable_rank: float = 0.0    # Σ σ_i² / σ_1²
    utilisation: float = 0.0    # stable_rank / r: the share of the rank budget in use
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
    phi_null95_top1: float | None = None     # the null's 95th percentile of φ(1, 1)
    phi_null975_top1: float | None = None    # ... and 97.5th
    phi_null95_full: float | None = None     # the null's 95th percentile of φ(r, other_r)
    phi_null975_full: float | None = None    # ... and 97.5th
    # -- with `base` ---------------------------------------------------------------------------
    base_key: str | None = None       # the base weight's name in the base file(s)
    base_orientation: str | None = None  # "same" or "transposed" (stored (d_in, d_out))
    orientation_source: str | None = None  # what decided it: "shape", "adapter", "flag", ...
    base_note: str | None = None      # e.g. "tied: lm_head uses transformer.wte.weight"
    w_fro: float | None = None        # ||W||_F
    w_spectral: float | None = None   # ||W||_2
    spectral_ratio: float | None = None  # ||ΔW||_2 / ||W||_2
    w_proj_delta: float | None = None  # ||U_rᵀ W V_r||_F, U_r, V_r = top-r singular vectors of ΔW
    w_proj_top: float | None = None   # same with W's own top-r vectors = sqrt(Σ_{i<=r} σ_i(W)²)
    w_proj_random: float | None = None  # same for random U, V (expected): r ||W||_F / sqrt(d_out d_in)
    amplification: float | None = None  # ||ΔW||_F / w_proj_delta (LoRA §7.3)
    intruder_k: int | None = None     # fine-tuned singular vectors examined (top k)
    intruder_eps: float | None = None  # cosine threshold ε
    intruder_count: int | None = None  # how many of the top k have max |cos| < ε (None: a range)
    intruder_count_min: int | None = None  # the count's certain bounds (equal when exact)
    intruder_count_max: int | None = None
    intruder_indices: np.ndarray | None = field(default=None, repr=False)  # their ranks (0-based)
    intruder_similarities: np.ndarray | None = field(default=None, repr=False)  # (k,) max |cos|
    intruder_uncertain: int | None = None  # intruder_count_max - intruder_count_min
    intruder_method: str | None = None  # "dense", "lanczos (certified)", "dense (full SVDs)",
                                        # "randomized (bounds)"
    intruder_certificate: float | None = None  # Lanczos: the largest error bound on a max |cos|
    svd_method: str | None = None     # how W_0's spectrum was had: "full" (computed or read
                                      # from the cache), "randomized(...)", "top-1 (Lanczos)"

    def row(self) -> dict:
        """The scalar fields (name -> value) for a CSV/Markdown row; arrays are left out except
        ``intruder_indices``, written as a space-separated string."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        if self.intruder_indices is not None:
            out["intruder_indices"] = " ".join(str(int(i)) for i in self.intruder_indices)
        return out

    @property
    def intruder_text(self) -> str | None:
        """"3/10" for an exact count, "2-5/10" for a range; None without intruders."""
        if self.intruder_k is None or self.intruder_count_min is None:
            return None
        lo, hi = self.intruder_count_min, self.intruder_count_max
        return f"{lo}/{self.intruder_k}" if lo == hi else f"{lo}-{hi}/{self.intruder_k}"


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


def spectrum_fields(s, r: int) -> dict:
    """The spectrum columns of a record from ΔW's singular values ``s`` and the rank ``r``."""
    st = stable_rank(s)
    return dict(singular_values=s, delta_fro=float(np.sqrt(np.sum(s ** 2))),
                delta_spectral=float(s[0]) if s.size else 0.0,
                energy_top1=energy_captured(s, 1), rank_90=rank_for_energy(s, 0.9),
                rank_95=rank_for_energy(s, 0.95), rank_99=rank_for_energy(s, 0.99),
                knee=knee_rank(s), effective_rank=effective_rank(s), stable_rank=st,
                utilisation=st / r if r else 0.0)


def phi_fields(B, A, scale, B2, A2, scale2, subspace: str, name: str) -> dict:
    """φ between two modules' ``subspace`` bases, its random expectation and null percentiles."""
    U1 = subspace_basis(B, A, scale, subspace)
    U2 = subspace_basis(B2, A2, scale2, subspace)
    if U1.shape[0] != U2.shape[0]:
        raise AnalysisError(f"module {name}: the two adapters' {subspace} spaces differ in "
                            f"width ({U1.shape[0]} vs {U2.shape[0]})")
    grid = phi_grid(U1, U2)
    d, r1, r2 = U1.shape[0], U1.shape[1], U2.shape[1]
    q1 = phi_null_quantiles(1, 1, d)
    qf = phi_null_quantiles(r1, r2, d)
    return dict(other_r=int(np.asarray(A2).shape[0]), phi_subspace=subspace, phi_dim=d,
                phi_grid=grid, phi_top1=float(grid[0, 0]), phi_full=float(grid[-1, -1]),
                phi_baseline_top1=phi_random_expectation(1, 1, d),
                phi_baseline_full=phi_random_expectation(r1, r2, d),
                phi_null95_top1=q1[0], phi_null975_top1=q1[1],
                phi_null95_full=qf[0], phi_null975_full=qf[1])


def analyze_lora_module(name: str, B, A, scale: float, *, kind: str = "linear",
                        lora_alpha: float | None = None, other=None, W=None, magnitude=None,
                        dora: bool | None = None, base_key: str | None = None,
                        top_k: int = 10, eps: float = 0.5, subspace: str = "A",
                        intruders: str = "exact", cache=None, full_svd_max_dim: int = 1024,
                        base_rank: int = 64, oversample: int = 10, power_iters: int = 4,
                        seed: int = 0, base_info: dict | None = None) -> ModuleRecord:
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
        intruders: "exact" (default), "approx" or "off" (:data:`INTRUDER_MODES`).
        cache: where W_0's SVD is kept for "exact": a :class:`BaseSvdCache` (on disk), or None
            for one that keeps nothing (:class:`MemoryCache`).
        full_svd_max_dim, base_rank, oversample, power_iters, seed: "approx" only: matrices whose
            larger side exceeds ``full_svd_max_dim`` use a randomized SVD keeping the top
            ``base_rank`` vectors of W_0 (p, q and the seed of its Gaussian sketch).
        base_info: orientation fields to record (``base_orientation``, ``orientation_source``,
            ``base_note``), from :func:`plan_base`.
    """
    if intruders not in INTRUDER_MODES:
        raise AnalysisError(f"intruders must be one of {', '.join(INTRUDER_MODES)}, "
                            f"got {intruders!r}")
    B, A = as_float64(B, "B", 2), as_float64(A, "A", 2)
    dec = lowrank_svd(B, A, scale)
    d_out, r, d_in = B.shape[0], A.shape[0], A.shape[1]
    rec = dict(module=name, layer=layer_index(name), kind=kind, d_out=d_out, d_in=d_in, r=r,
               lora_alpha=float(scale * r if lora_alpha is None else lora_alpha),
               scale=float(scale), module_type=module_type(name),
               dora=bool(magnitude is not None if dora is None else dora),
               **spectrum_fields(dec.s, r))
    if other is not None:
        B2, A2, scale2 = other
        rec.update(phi_fields(B, A, scale, as_float64(B2, "B", 2), as_float64(A2, "A", 2),
                              scale2, subspace, name))
    if W is not None:
        rec.update(_with_base(dec, as_float64(W, "W", 2), B, A, scale, magnitude, top_k, eps,
                              intruders, cache, full_svd_max_dim, base_rank, oversample,
                              power_iters, seed, name))
        rec["base_key"] = base_key
        rec.update(base_info or {})
    return ModuleRecord(**rec)


def _with_base(dec, W, B, A, scale, magnitude, top_k, eps, intruders, cache, full_svd_max_dim,
               base_rank, oversample, power_iters, seed, name) -> dict:
    U, s, Vh = dec
    if W.shape != (U.shape[0], Vh.shape[1]):
        raise AnalysisError(f"module {name}: base weight {W.shape} does not fit ΔW "
                            f"{(U.shape[0], Vh.shape[1])}")
    r = s.size
    w_fro = float(np.linalg.norm(W))
    WV = W @ Vh.T                                                  # (d_out, p)
    proj = float(np.linalg.norm(U.T @ WV))                         # ||U_rᵀ W V_r||_F
    k = min(top_k, min(W.shape))
    total = float(np.sqrt(np.sum(s ** 2)))
    out = dict(w_fro=w_fro, w_proj_delta=proj,
               w_proj_random=float(r * w_fro / np.sqrt(W.shape[0] * W.shape[1])),
               amplification=(float("nan") if total == 0 else
                              float("inf") if proj == 0 else total / proj))
    s0 = None
    if intruders == "off":
        out["svd_method"] = "top-1 (Lanczos)"
        s0 = _top_singular_value(W)
    elif magnitude is not None:                      # DoRA: not a low-rank update of W_0
        W_t = dora_weight(W, scale * (B @ A), magnitude)
        U0, s0, _ = np.linalg.svd(W, full_matrices=False)
        Ut = np.linalg.svd(W_t, full_matrices=False)[0]
        found = intruder_dimensions(U0, Ut, k, eps)
        out.update(_intruder_fields(found, found.count, found.count, "dense (full SVDs)", None))
        out["svd_method"] = "full"
    elif intruders == "exact" or max(W.shape) <= full_svd_max_dim:
        cache = MemoryCache() if cache is None else cache
        base = cache.get(W)
        s0 = base.s
        res = intruders_lowrank(W, base, dec, k, eps)
        out.update(_intruder_fields(res.found, res.found.count, res.found.count, res.method,
                                    res.max_error))
        out["svd_method"] = "full"          # cached or not: the same numbers (the run says which)
    else:                                            # "approx": randomized, a certain range
        m = min(max(base_rank, r, k), min(W.shape))
        U0, s0, _ = randomized_svd(W, m, oversample=oversample, power_iters=power_iters,
                                   rng=np.random.default_rng(seed))
        W_t = W + scale * (B @ A)
        Ut = randomized_svd(W_t, k, oversample=oversample, power_iters=power_iters,
                            rng=np.random.default_rng(seed + 1)).U
        found = intruder_dimensions(U0, Ut, k, eps)
        uncertain = int(np.sum(found.tail_bound[found.indices] >= eps))
        out.update(_intruder_fields(found, found.count - uncertain, found.count,
                                    "randomized (bounds)", None))
        out["svd_method"] = f"randomized(base_rank={m}, k={k}, p={oversample}, q={power_iters})"
    if s0 is not None:
        out["w_spectral"] = float(s0[0])
        out["spectral_ratio"] = float(s[0] / s0[0]) if s0[0] > 0 else float("inf")
        if intruders != "off":
            out["w_proj_top"] = float(np.sqrt(np.sum(s0[:r] ** 2)))
    return out


def _intruder_fields(found, lo: int, hi: int, method: str, certificate) -> dict:
    return dict(intruder_k=found.k, intruder_eps=found.eps,
                intruder_count=found.count if lo == hi else None,
                intruder_count_min=int(lo), intruder_count_max=int(hi),
                intruder_indices=found.indices, intruder_similarities=found.similarities,
                intruder_uncertain=int(hi - lo), intruder_method=method,
                intruder_certificate=certificate)


def _top_singular_value(W) -> np.ndarray:
    """(σ_1,) of W: dense for small matrices, else Lanczos to machine precision (a largest
    singular value is well conditioned: its error is at most the residual)."""
    if min(W.shape) <= 512:
        return np.linalg.svd(W, compute_uv=False)[:1]
    return svds(W, k=1, tol=0, v0=np.random.default_rng(0).standard_normal(min(W.shape)),
                return_singular_vectors=False)[:1]


# ----------------------------------------------------------------------------------------------
# where each module's base weight is, and how it is laid out
# ----------------------------------------------------------------------------------------------
class BasePlan(NamedTuple):
    """Where module's W_0 is and how to read it as (d_out, d_in)."""
    key: str              # the base weight's name
    how: str              # "same" or "transposed"
    source: str           # "shape", "adapter", "flag", "embedding"
    note: str | None      # e.g. a tied weight


#: names of a model's token embedding, which a tied output layer (lm_head) shares
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared", "tok_embeddings",
                   "embeddings")
OUTPUT_NAMES = ("lm_head", "embed_out", "output")


def _tied_key(base, mod) -> str | None:
    """The token embedding's key that an output layer without its own weight shares (tied), or
    the output layer's that an embedding shares; None if none fits."""
    last = mod.name.split(".")[-1]
    if last in OUTPUT_NAMES:
        names = EMBEDDING_NAMES
    elif last in EMBEDDING_NAMES:
        names = OUTPUT_NAMES
    else:
        return None
    fits = [k for k in base.keys() if len(base.shape(k)) == 2 and k.endswith(".weight")
            and k[:-len(".weight")].split(".")[-1] in names
            and tuple(base.shape(k)) in ((mod.d_out, mod.d_in), (mod.d_in, mod.d_out))]
    return fits[0] if len(fits) == 1 else None


def _layout(shape, mod) -> str | None:
    """"same" / "transposed" when the shape decides it, "square" when it cannot, None if the
    weight does not fit the module."""
    want, shape = (mod.d_out, mod.d_in), tuple(shape)
    if mod.kind == "conv":
        return "same" if shape[0] == mod.d_out and int(np.prod(shape[1:])) == mod.d_in else None
    if len(shape) != 2:
        return None
    if mod.kind == "embedding":
        return "transposed" if shape == want[::-1] else None
    if shape == want and want[0] == want[1]:
        return "square"
    if shape == want:
        return "same"
    return "transposed" if shape == want[::-1] else None


#: Hugging Face model types whose linear layers are ``Conv1D`` (weights stored (d_in, d_out))
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt")


def base_model_type(base) -> str | None:
    """``model_type`` from a ``config.json`` beside the base weights (in their directory), or
    None when there is none or it does not say."""
    path = Path(getattr(base, "path", "") or "")
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    try:
        value = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def plan_base(adapter: PeftAdapter, base: BaseWeights, names) -> tuple[dict, list, dict]:
    """Where each module's base weight is and how it is laid out (module docstring).

    Returns (plan: {module: :class:`BasePlan`}, warnings: [str], problems: {module: message})
    for the modules of ``names``; a module in ``problems`` has no usable base weight.
    """
    plan, problems, warnings, square = {}, {}, [], []
    for n in names:
        mod = adapter.modules[n]
        if mod.magnitude_key is not None and mod.kind == "embedding":
            problems[n] = (f"module {n}: DoRA on an embedding is not supported with base weights "
                           f"(run without --base for its ΔW spectrum)")
            continue
        note = None
        try:
            key = base.find(n)
        except AdapterFileError as e:
            key = _tied_key(base, mod)
            if key is None:
                problems[n] = str(e)
                continue
            note = f"tied: {n} has no weight of its own in the base; it shares {key}"
        layout = _layout(base.shape(key), mod)
        if layout is None:
            problems[n] = (f"{base.path}: base weight {key!r} has shape {base.shape(key)}, "
                           f"which does not fit module {n}'s ΔW ({mod.d_out}, {mod.d_in})")
            continue
        if note is not None and layout == "square" and mod.kind == "linear":
            layout = "same"                     # an output layer (V, C) shares the (V, C) table
        if layout == "square":
            square.append((n, key, note))
            continue
        source = "embedding" if mod.kind == "embedding" else "shape"
        plan[n] = BasePlan(key, layout, source, note)
    flag = bool(adapter.config.get("fan_in_fan_out", False))
    evidence = {p.how for n, p in plan.items()
                if adapter.modules[n].kind == "linear" and p.source == "shape"}
    if square:
        shown = ", ".join(n for n, _, _ in square[:3]) + (" ..." if len(square) > 3 else "")
        model_type = base_model_type(base)
        if len(evidence) == 1:
            how, source = evidence.pop(), "adapter"
            why = ("the base stores every non-square adapted weight "
                   + ("transposed (d_in, d_out), as GPT-2 Conv1D does" if how == "transposed"
                      else "as (d_out, d_in)"))
        elif model_type is not None:
            how = "transposed" if model_type in CONV1D_MODEL_TYPES else "same"
            source = "base config"
            why = (f"the base's config.json says model_type {model_type!r}, whose linear layers "
                   + ("are Conv1D, stored (d_in, d_out)" if how == "transposed"
                      else "are stored (d_out, d_in)"))
        else:
            how, source, why = ("transposed" if flag else "same"), "flag", None
            warnings.append(
                f"{adapter.path}: the square modules ({shown}) are read as "
                f"{'(d_in, d_out)' if flag else '(d_out, d_in)'} on the word of "
                f"fan_in_fan_out={str(flag).lower()} alone: no non-square module and no "
                f"config.json beside the base confirm it (real GPT-2 adapters often carry a "
                f"wrong flag)")
        if why is not None and (how == "transposed") != flag:
            warnings.append(f"{adapter.path}: adapter_config.json says fan_in_fan_out="
                            f"{str(flag).lower()}, but {why}; the square modules ({shown}) are "
                            f"read the same way")
        for n, key, note in square:
            plan[n] = BasePlan(key, how, source, note)
    return {n: plan[n] for n in names if n in plan}, warnings, problems


def read_base(base: BaseWeights, plan: BasePlan, mod) -> np.ndarray:
    """Module ``mod``'s W_0 as (d_out, d_in) float64, following its :class:`BasePlan`."""
    W = base.read(plan.key)
    if mod.kind == "conv":
        W = W.reshape(-1, mod.d_in)
    W = W.T if plan.how == "transposed" else W
    if not np.isfinite(W).all():
        raise AdapterFileError(f"{base.path}: module {mod.name}: base tensor {plan.key!r} holds "
                               f"{int(np.sum(~np.isfinite(W)))} NaN or infinite value(s)")
    return np.ascontiguousarray(W)


def base_info(plan: BasePlan) -> dict:
    return dict(base_orientation=plan.how, orientation_source=plan.source, base_note=plan.note)


def _open(obj, cls, opener):
    return obj if isinstance(obj, cls) or obj is None else opener(obj)


def analyze_adapter(path, other=None, base=None, *, modules: str | None = None,
                    adapter_name: str | None = None, top_k: int = 10, eps: float = 0.5,
                    subspace: str = "A", intruders: str = "exact", cache=None,
                    full_svd_max_dim: int = 1024, base_rank: int = 64, oversample: int = 10,
                    power_iters: int = 4, seed: int = 0,
                    progress: Callable[[int, int, str], None] | None = None,
                    warnings: list | None = None) -> list[ModuleRecord]:
    """Analyse every module of a PEFT LoRA adapter; one :class:`ModuleRecord` per module, in
    natural layer order.

    Args:
        path: the adapter directory (or an open :class:`PeftAdapter`).
        other: a second adapter (directory or PeftAdapter) for φ; modules are matched by name
            and those missing from it get no φ fields (``adapter_name`` applies to both).
        base: the pre-trained weights (a .safetensors file, a directory with
            model.safetensors or a sharded index, or an open :class:`BaseWeights`).
        modules: a regular expression; only module paths where ``re.search`` finds it are kept.
        adapter_name: pick one adapter in a file that holds several.
        top_k, eps, subspace, intruders, cache, full_svd_max_dim, base_rank, oversample,
            power_iters, seed: see :func:`analyze_lora_module`.
        progress: called as ``progress(done, total, module)`` after each module.
        warnings: a list that receives the warnings (the orientation of square modules).

    Everything that can be checked (files, config, module names, base weights present and of
    the right shape, arguments) is checked before the first module is analysed. Tensors are read
    one module at a time; only the base weights of the current module are in memory.
    """
    if subspace not in SUBSPACES:
        raise AnalysisError(f"subspace must be one of {', '.join(SUBSPACES)}, got {subspace!r}")
    if intruders not in INTRUDER_MODES:
        raise AnalysisError(f"intruders must be one of {', '.join(INTRUDER_MODES)}, "
                            f"got {intruders!r}")
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
    plan = {}
    if base is not None:
        plan, found_warnings, problems = plan_base(adapter, base, names)
        if problems:
            raise AdapterFileError(next(iter(problems.values())))
        if warnings is not None:
            warnings.extend(found_warnings)
    cache = MemoryCache() if cache is None else cache
    records = []
    for i, n in enumerate(names):
        mod = adapter.modules[n]
        B, A = adapter.factors(n)
        oth = None
        if other is not None and n in other.modules:
            oth = (*other.factors(n), other.modules[n].scale)
        W = read_base(base, plan[n], mod) if n in plan else None
        records.append(analyze_lora_module(
            n, B, A, mod.scale, kind=mod.kind, lora_alpha=mod.lora_alpha, other=oth, W=W,
            magnitude=adapter.magnitude(n) if W is not None else None,
            dora=mod.magnitude_key is not None,
            base_key=plan[n].key if n in plan else None, top_k=top_k, eps=eps,
            subspace=subspace, intruders=intruders, cache=cache,
            full_svd_max_dim=full_svd_max_dim, base_rank=base_rank, oversample=oversample,
            power_iters=power_iters, seed=seed,
            base_info=base_info(plan[n]) if n in plan else None))
        del W
        if progress is not None:
            progress(i + 1, len(names), n)
    return records
