"""Comparing subspaces: principal angles, the LoRA paper's φ, its random baseline, amplification.

Notation: a subspace of R^d of dimension i is given by a basis ``U`` (d, i) with orthonormal
columns, e.g. the top-i right singular vectors of a LoRA ``A`` (``Vh[:i].T``). Columns are
ordered by importance (singular value), so "the top i" is ``U[:, :i]``.

* Normalised subspace similarity (LoRA, Hu et al. 2021, Eq. 4):

      φ(U_A, U_B, i, j) = ||U_A[:, :i]ᵀ U_B[:, :j]||_F² / min(i, j)   in [0, 1];

  1 when the smaller subspace lies inside the larger, 0 when they are orthogonal. It is the mean
  of cos² of the min(i, j) principal angles between the two subspaces.
* Random baseline: for a Haar-random i-dimensional subspace and any fixed j-dimensional one in
  R^d, E||P_i Q_j||_F² = i·j/d (each of the i·j squared cosines u_aᵀ w_b has mean 1/d, because
  E[u uᵀ] = I/d for a uniform unit vector u), hence

      E φ = i·j / (d · min(i, j)) = max(i, j) / d.

  φ between adapters of a narrow model is only meaningful against this number: at d = 64,
  φ(·, ·, 8, 64) = 1 whatever the matrices are.
* Amplification (LoRA §7.3, App. H.4): with U_r (d_out, r) and V_r (d_in, r) the top-r left and
  right singular vectors of ΔW, the projection of W onto ΔW's subspace is U_rᵀ W V_r (r × r), and

      amplification = ||ΔW||_F / ||U_rᵀ W V_r||_F.

  For orthonormal U (d_out, r), V (d_in, r) drawn uniformly at random,
  E||Uᵀ W V||_F² = r² ||W||_F² / (d_out d_in) (each entry uᵀWv has E(uᵀWv)² = ||W||_F²/(d_out d_in));
  this is the "random matrix" column of the paper's Table 7, where W_q of GPT-3 (12288 × 12288,
  ||W_q||_F = 61.95) gives r/12288 · 61.95 = 0.020 at r = 4 and 0.323 at r = 64 (printed: 0.02
  and 0.33; the top singular vectors of a Gaussian matrix are uniformly random).

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import functools

import numpy as np

from minilora.analysis.svd import AnalysisError, as_float64


def orthonormal_basis(M) -> np.ndarray:
    """An orthonormal basis (d, k) of the column span of ``M`` (d, k), via thin QR (M full rank)."""
    Q, _ = np.linalg.qr(as_float64(M, "M", 2))
    return Q


def _basis(U, name: str) -> np.ndarray:
    U = as_float64(U, name, 2)
    if U.shape[1] > U.shape[0]:
        raise AnalysisError(f"{name} must be (d, k) with k <= d (columns are basis vectors), got "
                            f"{U.shape}")
    gram = U.T @ U
    if not np.allclose(gram, np.eye(U.shape[1]), atol=1e-6):
        raise AnalysisError(f"{name} must have orthonormal columns (max |UᵀU - I| = "
                            f"{np.abs(gram - np.eye(U.shape[1])).max():.2e}); use "
                            f"orthonormal_basis() or singular vectors")
    return U


def _pair(U_a, U_b):
    U_a, U_b = _basis(U_a, "U_a"), _basis(U_b, "U_b")
    if U_a.shape[0] != U_b.shape[0]:
        raise AnalysisError(f"the two bases must live in the same space: U_a has {U_a.shape[0]} "
                            f"rows, U_b {U_b.shape[0]}")
    return U_a, U_b


def principal_angles(U_a, U_b) -> np.ndarray:
    """Principal angles (radians, ascending, length min(i, j)) between span(U_a) and span(U_b).

    cos θ_k are the singular values of U_aᵀ U_b (U_a (d, i), U_b (d, j), orthonormal columns).
    0 means a shared direction, π/2 an orthogonal one.
    """
    U_a, U_b = _pair(U_a, U_b)
    cos = np.linalg.svd(U_a.T @ U_b, compute_uv=False)
    return np.arccos(np.clip(cos, 0.0, 1.0))


def subspace_similarity(U_a, U_b, i: int, j: int) -> float:
    """The LoRA paper's φ(A, B, i, j) = ||U_a[:, :i]ᵀ U_b[:, :j]||_F² / min(i, j) (module doc)."""
    U_a, U_b = _pair(U_a, U_b)
    if not (1 <= i <= U_a.shape[1] and 1 <= j <= U_b.shape[1]):
        raise AnalysisError(f"need 1 <= i <= {U_a.shape[1]} and 1 <= j <= {U_b.shape[1]}, "
                            f"got i={i}, j={j}")
    M = U_a[:, :i].T @ U_b[:, :j]
    return float(np.sum(M ** 2) / min(i, j))


def phi_grid(U_a, U_b) -> np.ndarray:
    """φ(i, j) for every i = 1..k_a, j = 1..k_b: an array G (k_a, k_b) with G[i-1, j-1] = φ(i, j).

    With M = U_aᵀ U_b (k_a, k_b), ||U_a[:, :i]ᵀ U_b[:, :j]||_F² is the sum of M² over the top-left
    i × j block, i.e. a 2-D cumulative sum; the paper's heat maps (Figs. 3-4) plot this grid.
    """
    U_a, U_b = _pair(U_a, U_b)
    cum = np.cumsum(np.cumsum((U_a.T @ U_b) ** 2, axis=0), axis=1)
    i = np.arange(1, cum.shape[0] + 1)[:, None]
    j = np.arange(1, cum.shape[1] + 1)[None, :]
    return cum / np.minimum(i, j)


def phi_random_expectation(i, j, d: int):
    """E φ(i, j) = max(i, j) / d for a Haar-random subspace against any fixed one in R^d.

    ``i`` and ``j`` may be integers or broadcastable integer arrays (e.g. ``arange(1, 9)[:, None]``
    and ``arange(1, 65)[None, :]`` for the baseline of a whole :func:`phi_grid`); 1 <= i, j <= d.
    """
    i, j = np.asarray(i), np.asarray(j)
    if d < 1 or np.any(i < 1) or np.any(j < 1) or np.any(i > d) or np.any(j > d):
        raise AnalysisError(f"need 1 <= i, j <= d, got i={i}, j={j}, d={d}")
    out = np.maximum(i, j) / d
    return float(out) if out.ndim == 0 else out


#: draws behind :func:`phi_null_quantiles` (fixed seed: the same numbers every run)
NULL_DRAWS = 20_000
NULL_SIMULATE_MAX = 16
NULL_LEVELS = (0.95, 0.975)


def _bartlett(a: int, dof: int, n: int, rng) -> np.ndarray:
    """n draws of a Wishart_a(dof, I) matrix (a × a), dof >= a, by Bartlett's decomposition."""
    L = np.zeros((n, a, a))
    L[:, np.arange(a), np.arange(a)] = np.sqrt(rng.chisquare(dof - np.arange(a), size=(n, a)))
    rows, cols = np.tril_indices(a, -1)
    L[:, rows, cols] = rng.standard_normal((n, rows.size))
    return L @ np.swapaxes(L, 1, 2)


@functools.lru_cache(maxsize=256)
def phi_null_quantiles(i: int, j: int, d: int, levels: tuple = NULL_LEVELS) -> tuple:
    """Percentiles of φ(i, j) between a Haar-random i-dimensional subspace of R^d and any fixed
    j-dimensional one (the null a measured φ is read against): by default (95th, 97.5th).

    * min(i, j) = 1: exact. φ = ||P u||² for a uniform unit vector u and a projection P of rank
      b = max(i, j), which is Beta(b/2, (d - b)/2) (1 when b = d).
    * 2 <= min(i, j) <= :data:`NULL_SIMULATE_MAX`: a fixed-seed simulation of
      :data:`NULL_DRAWS` draws (kept in memory per (i, j, d)): with a = min(i, j), b = max(i, j),
      a Gaussian G (d × a) spans a Haar-random subspace and ||Q[:b]||_F² = tr((GᵀG)⁻¹ G_bᵀ G_b),
      where G_bᵀ G_b ~ Wishart_a(b) and the rest ~ Wishart_a(d - b) are independent: O(a³) per
      draw whatever d is. The Monte-Carlo error of a 95th percentile is about 1 % of its
      distance to the mean.
    * larger min(i, j): the Beta distribution with φ's exact mean b/d and variance
      2(d - a)(d - b) b / (a d² (d - 1)(d + 2)) (the variance of tr(P_a P_b) for two random
      projections), whose percentiles agree with the simulation to 0.1 % there (0.5 % already
      at a = 4; tests/test_svd_decisions.py); simulating would cost seconds per (i, j, d).
    """
    phi_random_expectation(i, j, d)            # validates
    a, b = min(i, j), max(i, j)
    if b >= d or a + b > d and a == d:
        return tuple(1.0 for _ in levels)
    if a == 1 or a > NULL_SIMULATE_MAX:
        from scipy.stats import beta  # lazy: scipy.stats takes ~0.3 s to import
        if a == 1:
            return tuple(float(beta.ppf(q, b / 2, (d - b) / 2)) for q in levels)
        mean = b / d
        var = 2.0 * (d - a) * (d - b) * b / (a * d * d * (d - 1) * (d + 2))
        c = mean * (1 - mean) / var - 1
        return tuple(float(beta.ppf(q, mean * c, (1 - mean) * c)) for q in levels)
    rng = np.random.default_rng([i, j, d])
    vals = []
    batch = max(1, min(NULL_DRAWS, 2_000_000 // (a * a)))
    for start in range(0, NULL_DRAWS, batch):
        n = min(batch, NULL_DRAWS - start)
        A = _bartlett(a, b, n, rng)
        if d - b >= a:
            Bm = _bartlett(a, d - b, n, rng)
        else:
            G = rng.standard_normal((n, d - b, a))
            Bm = np.swapaxes(G, 1, 2) @ G
        X = np.linalg.solve(A + Bm, A)
        vals.append(np.trace(X, axis1=1, axis2=2) / a)
    v = np.concatenate(vals)
    return tuple(float(np.quantile(v, q)) for q in levels)


def random_orthonormal(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthonormal basis (d, k): QR of a Gaussian matrix, signs fixed by diag(R)."""
    if not 1 <= k <= d:
        raise AnalysisError(f"need 1 <= k <= d, got k={k}, d={d}")
    Q, R = np.linalg.qr(rng.standard_normal((d, k)))
    return Q * np.sign(np.diag(R))


def phi_random_sampled(i: int, j: int, d: int, rng: np.random.Generator,
                       n_samples: int = 200) -> tuple[float, float]:
    """Sampled φ(i, j) between two independent Haar-random subspaces of R^d: (mean, std).

    The mean estimates :func:`phi_random_expectation` (standard error std / sqrt(n_samples)); the
    std is the spread one pair of unrelated adapters would show.
    """
    phi_random_expectation(i, j, d)   # validates i, j, d
    if n_samples < 2:
        raise AnalysisError(f"n_samples must be >= 2, got {n_samples}")
    vals = np.empty(n_samples)
    for t in range(n_samples):
        M = random_orthonormal(d, i, rng).T @ random_orthonormal(d, j, rng)
        vals[t] = np.sum(M ** 2) / min(i, j)
    return float(vals.mean()), float(vals.std(ddof=1))


def project_onto(W, U, Vh) -> np.ndarray:
    """``Uᵀ W Vhᵀ`` (k_u, k_v): W (d_out, d_in) seen through U (d_out, k_u) and the rows of
    Vh (k_v, d_in), as the LoRA paper writes it (U^T W V^T with V the right singular vectors as
    rows). ||Uᵀ W Vhᵀ||_F is how much of W lives in that pair of subspaces."""
    W = as_float64(W, "W", 2)
    U, Vh = as_float64(U, "U", 2), as_float64(Vh, "Vh", 2)
    if U.shape[0] != W.shape[0] or Vh.shape[1] != W.shape[1]:
        raise AnalysisError(f"U (d_out, k) and Vh (k, d_in) must fit W {W.shape}: got U "
                            f"{U.shape}, Vh {Vh.shape}")
    return U.T @ (W @ Vh.T)


def amplification_factor(W, delta_U, delta_s, delta_Vh, r: int | None = None) -> float:
    """The LoRA paper's feature amplification factor ``||ΔW||_F / ||U_rᵀ W V_r||_F``.

    Args:
        W: (d_out, d_in) the pre-trained weight.
        delta_U, delta_s, delta_Vh: the SVD of ΔW (e.g. from :func:`lowrank_svd`), U (d_out, p),
            s (p,), Vh (p, d_in).
        r: how many top singular directions of ΔW span "its subspace" (default: all p given,
            which is the LoRA rank for :func:`lowrank_svd`).

    ||ΔW||_F is taken from all of ``delta_s``. Large values mean ΔW boosts directions that W
    barely uses (GPT-3 layer 48, Wq: about 21.5 at r = 4 and 1.9 at r = 64). Returns inf when W
    has no component at all in that subspace, nan when ΔW = 0.
    """
    s = as_float64(delta_s, "delta_s", 1)
    r = s.size if r is None else r
    if not 1 <= r <= s.size:
        raise AnalysisError(f"r must be in [1, {s.size}], got {r}")
    U = as_float64(delta_U, "delta_U", 2)
    Vh = as_float64(delta_Vh, "delta_Vh", 2)
    P = project_onto(W, U[:, :r], Vh[:r])                      # (r, r)
    num, den = float(np.sqrt(np.sum(s ** 2))), float(np.linalg.norm(P))
    if num == 0.0:
        return float("nan")
    return float("inf") if den == 0.0 else num / den


def random_projection_expectation(W, r: int) -> float:
    """sqrt(E||Uᵀ W V||_F²) = r ||W||_F / sqrt(d_out d_in) for Haar-random orthonormal U (d_out, r),
    V (d_in, r): the paper's "random matrix" baseline for ||U_rᵀ W V_r||_F (module docstring)."""
    W = as_float64(W, "W", 2)
    d_out, d_in = W.shape
    if not 1 <= r <= min(d_out, d_in):
        raise AnalysisError(f"r must be in [1, {min(d_out, d_in)}], got {r}")
    return float(r * np.linalg.norm(W) / np.sqrt(d_out * d_in))
