"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

A left singular vector y_j of the fine-tuned W_t (among its top k, by singular value) is an
*intruder dimension* when it resembles no singular vector x_i of the pre-trained W_0:

    max_i |cos(y_j, x_i)| = max_i |x_iᵀ y_j| < ε.

The absolute value is the reference code's choice (a sign flip of a singular vector is not "new").
The paper's defaults are k = 10 and ε = 0.5. What "small" means depends on the width: a random
unit vector of R^n has a typical max |cos| against a fixed basis of about 0.33 at n = 64, 0.19
at n = 256 and 0.06 at n = 4096 (never below 1/sqrt(n)), so choose ε against that null (see
:func:`perturbed_similarities` for the null of W against W plus a small random perturbation).

Vectors are columns of U (d_out, ·), the output side of y = W x, with W stored (d_out, d_in) as
PyTorch's ``nn.Linear`` stores it (the side the reference code compares).

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minilora.analysis.svd import SVD, AnalysisError, as_float64, svd


class Intruders(NamedTuple):
    """The result of :func:`intruder_dimensions`."""
    count: int                 # how many of the top k are intruders
    indices: np.ndarray        # (count,) int: their ranks j (0 = largest singular value)
    similarities: np.ndarray   # (k,) max_i |cos(y_j, x_i)| for every examined j
    tail_bound: np.ndarray     # (k,) upper bound on |cos| with pre-trained vectors NOT given
                               #      (0 when U_base is a full basis of R^d_out)
    k: int
    eps: float


def max_cosines(U_base, U_tuned) -> np.ndarray:
    """max_i |U_base[:, i] · U_tuned[:, j]| for every column j: shape (k,) for U_tuned (d, k)."""
    U_base, U_tuned = as_float64(U_base, "U_base", 2), as_float64(U_tuned, "U_tuned", 2)
    if U_base.shape[0] != U_tuned.shape[0]:
        raise AnalysisError(f"U_base and U_tuned must have the same number of rows (d_out): got "
                            f"{U_base.shape} and {U_tuned.shape}")
    return np.abs(U_base.T @ U_tuned).max(axis=0)


def intruder_dimensions(U_base, U_tuned, k: int = 10, eps: float = 0.5) -> Intruders:
    """Count the intruders among the top ``k`` columns of ``U_tuned`` (module docstring).

    Args:
        U_base: (d_out, m) left singular vectors of W_0, orthonormal columns; all of them
            (m = min(d_out, d_in)) for the paper's definition, or only the top m (e.g. from a
            randomized SVD of a large W_0), in which case ``tail_bound`` says how far the
            answer can be trusted.
        U_tuned: (d_out, >= k) left singular vectors of W_t = W_0 + ΔW, by descending value.
        k: how many top fine-tuned vectors to examine (paper: 10).
        eps: the cosine threshold ε in (0, 1] (paper: 0.5).

    A pre-trained vector x outside the given m has |x · y| <= sqrt(1 - Σ_{i<=m} (x_i · y)²),
    since the squared cosines of y against a full orthonormal basis sum to 1. That bound is
    ``tail_bound``: when it is below ε too, the intruder is certain; when U_base spans R^d_out it
    is 0 (up to rounding, clipped).
    """
    U_base, U_tuned = as_float64(U_base, "U_base", 2), as_float64(U_tuned, "U_tuned", 2)
    if not 1 <= k <= U_tuned.shape[1]:
        raise AnalysisError(f"k must be in [1, {U_tuned.shape[1]}] (fine-tuned vectors given), "
                            f"got {k}")
    if not 0.0 < eps <= 1.0:
        raise AnalysisError(f"eps (a cosine threshold) must be in (0, 1], got {eps}")
    if U_base.shape[0] != U_tuned.shape[0]:
        raise AnalysisError(f"U_base and U_tuned must have the same number of rows (d_out): got "
                            f"{U_base.shape} and {U_tuned.shape}")
    C = np.abs(U_base.T @ U_tuned[:, :k])        # (m, k) |cos| of every pair
    sims = C.max(axis=0)
    if U_base.shape[1] >= U_base.shape[0]:
        tail = np.zeros(k)
    else:
        tail = np.sqrt(np.clip(1.0 - np.sum(C ** 2, axis=0), 0.0, 1.0))
    idx = np.flatnonzero(sims < eps)
    return Intruders(int(idx.size), idx, sims, tail, k, float(eps))


def intruders_from_weights(W_base, W_tuned, k: int = 10, eps: float = 0.5) -> Intruders:
    """:func:`intruder_dimensions` with full SVDs of W_0 and W_t (both (d_out, d_in))."""
    W_base, W_tuned = as_float64(W_base, "W_base", 2), as_float64(W_tuned, "W_tuned", 2)
    if W_base.shape != W_tuned.shape:
        raise AnalysisError(f"W_base {W_base.shape} and W_tuned {W_tuned.shape} differ in shape")
    return intruder_dimensions(svd(W_base).U, svd(W_tuned).U, k, eps)


def scale_singular_directions(W, indices, lam, W_svd: SVD | None = None) -> np.ndarray:
    """W with chosen singular directions rescaled: W + Σ_{j in indices} (λ_j - 1) σ_j u_j v_jᵀ.

    λ = 0 removes a direction, 1 leaves it, 0.5 halves it (the paper's causal test scales the
    top intruder of each matrix this way and measures forgetting).

    Args:
        W: (d_out, d_in) typically the fine-tuned weight W_0 + ΔW.
        indices: ranks j (0 = largest) of the directions to scale, e.g. ``Intruders.indices``.
        lam: one factor for all, or one per index.
        W_svd: the SVD of W if already computed (may be truncated, as long as it covers indices).

    Returns:
        a new (d_out, d_in) float64 array; W itself is not modified.
    """
    W = as_float64(W, "W", 2)
    U, s, Vh = svd(W) if W_svd is None else W_svd
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), idx.shape)
    if idx.size and (idx.min() < 0 or idx.max() >= s.size):
        raise AnalysisError(f"indices must be in [0, {s.size}), got {idx.tolist()}")
    return W + (U[:, idx] * ((lam - 1.0) * s[idx])) @ Vh[idx]


def perturbed_similarities(W, relative_noise: float, k: int, rng: np.random.Generator,
                           n_draws: int = 1) -> np.ndarray:
    """The null distribution of intruder similarities: W against W + N, N Gaussian with
    ||N||_F = relative_noise · ||W||_F. Returns (n_draws, k) max |cos| of the top k of W + N.

    A threshold ε well below these values flags no intruder in a mere perturbation.
    """
    W = as_float64(W, "W", 2)
    if relative_noise < 0 or n_draws < 1:
        raise AnalysisError(f"need relative_noise >= 0 and n_draws >= 1, got {relative_noise}, "
                            f"{n_draws}")
    U0 = svd(W).U
    out = np.empty((n_draws, k))
    for t in range(n_draws):
        N = rng.standard_normal(W.shape)
        N *= relative_noise * np.linalg.norm(W) / np.linalg.norm(N)
        out[t] = intruder_dimensions(U0, svd(W + N).U, k).similarities
    return out
