"""The singular spectrum of a weight matrix and what it says: energy, effective rank, truncation.

Every function takes a matrix ``W`` of shape ``(d_out, d_in)`` (NumPy or CuPy: it is copied to
the CPU in float64 first, see :func:`as_float64`) or its singular values ``s`` (descending, length
``min(d_out, d_in)``), and returns plain floats or float64 NumPy arrays. The SVD is

    W = U diag(s) Vh,   U (d_out, p), s (p,), Vh (p, d_in),   p = min(d_out, d_in),
    s[0] >= s[1] >= ... >= s[p-1] >= 0.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minilora.backend import to_numpy
from minilora.errors import MiniloraError


class AnalysisError(MiniloraError, ValueError):
    """An argument of an analysis function is out of range (a rank k above the matrix's rank,
    a threshold outside [0, 1], matrices of mismatched shapes, ...)."""


class SVD(NamedTuple):
    """A thin or truncated SVD ``W ≈ U diag(s) Vh``: U (d_out, k), s (k,) descending, Vh (k, d_in)."""
    U: np.ndarray
    s: np.ndarray
    Vh: np.ndarray


class Truncation(NamedTuple):
    """The best rank-k approximation and its Eckart-Young errors (see :func:`truncate`)."""
    W_k: np.ndarray           # (d_out, d_in), rank <= k
    frobenius_error: float    # ||W - W_k||_F = sqrt(sum_{i>k} s_i^2)
    spectral_error: float     # ||W - W_k||_2 = s_{k+1} (0 when k >= rank)


def as_float64(a, name: str = "array", ndim: int | None = None) -> np.ndarray:
    """``a`` (NumPy or CuPy) as a float64 CPU NumPy array, checked for ``ndim`` and finiteness."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise AnalysisError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise AnalysisError(f"{name} holds NaN or inf; the analysis needs finite values")
    return a


def svd(W) -> SVD:
    """The thin SVD of ``W`` (d_out, d_in) in float64: U (d_out, p), s (p,), Vh (p, d_in)."""
    U, s, Vh = np.linalg.svd(as_float64(W, "W", 2), full_matrices=False)
    return SVD(U, s, Vh)


def singular_values(W) -> np.ndarray:
    """The singular values of ``W`` (d_out, d_in), descending, shape (min(d_out, d_in),)."""
    return np.linalg.svd(as_float64(W, "W", 2), compute_uv=False)


def _spectrum(s) -> np.ndarray:
    s = as_float64(s, "s", 1)
    if (s < 0).any():
        raise AnalysisError("singular values must be >= 0")
    return np.sort(s)[::-1]


def energy_captured(s, k: int) -> float:
    """Fraction of the squared Frobenius norm held by the top k singular values:

        E(k) = sum_{i<=k} s_i^2 / sum_i s_i^2      (nan for the zero matrix: undefined).

    ``s`` are singular values (any order); ``0 <= k``; k past the length counts every value.
    """
    s = _spectrum(s)
    if k < 0:
        raise AnalysisError(f"k must be >= 0, got {k}")
    total = float(np.sum(s ** 2))
    return float("nan") if total == 0.0 else float(np.sum(s[:k] ** 2) / total)


def energy_curve(s) -> np.ndarray:
    """E(k) for k = 1..len(s) (see :func:`energy_captured`), shape (len(s),), ending at 1
    (all nan for the zero matrix)."""
    s = _spectrum(s)
    total = float(np.sum(s ** 2))
    return np.full_like(s, np.nan) if total == 0.0 else np.cumsum(s ** 2) / total


def rank_for_energy(s, fraction: float = 0.9) -> int:
    """The smallest k with E(k) >= ``fraction`` (the "rank needed to explain 90 % of the variance"
    when variance is read as squared singular values); 0 for the zero matrix."""
    if not 0.0 < fraction <= 1.0:
        raise AnalysisError(f"fraction must be in (0, 1], got {fraction}")
    s = _spectrum(s)
    if not np.any(s > 0):
        return 0
    # a relative 1e-12 slack so that fraction = 1.0 is reached despite rounding in cumsum
    return int(np.searchsorted(energy_curve(s), fraction - 1e-12) + 1)


def knee_rank(s) -> int:
    """The knee of the energy curve: the k (1-based) where E(k) lies farthest above the chord from
    (1, E(1)) to (n, 1), n the number of non-zero values (the "kneedle" rule on the normalised
    curve). 1 for a rank-one matrix or a curve that rises no faster than the chord; 0 for the zero
    matrix. A suggestion for where extra rank stops paying, to read beside the energy ranks."""
    s = _spectrum(s)
    s = s[s > 0]
    if s.size == 0:
        return 0
    if s.size <= 2:
        return 1
    e = np.cumsum(s ** 2) / np.sum(s ** 2)
    x = np.arange(1, s.size + 1)
    chord = e[0] + (1.0 - e[0]) * (x - 1) / (s.size - 1)
    above = e - chord
    return int(np.argmax(above) + 1) if above.max() > 1e-12 else 1


def effective_rank(s) -> float:
    """Roy & Vetterli's (2007) entropy-based effective rank:

        p_i = s_i / sum_j s_j,   H = -sum_i p_i ln p_i,   erank = exp(H),

    with 0 ln 0 = 0. It lies in [1, number of non-zero s_i]: 1 for rank one, n for n equal values.
    Returns 0.0 for the zero matrix.
    """
    s = _spectrum(s)
    total = float(np.sum(s))
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(s) -> float:
    """Stable (numerical) rank ``||W||_F^2 / ||W||_2^2 = sum_i s_i^2 / s_1^2``, in [1, rank(W)];
    0.0 for the zero matrix."""
    s = _spectrum(s)
    return 0.0 if s[0] == 0.0 else float(np.sum(s ** 2) / s[0] ** 2)


def numerical_rank(s, rtol: float | None = None) -> int:
    """How many s_i exceed ``rtol * s_1``; rtol defaults to NumPy's ``max(d_out, d_in) * eps``
    rule, applied here to the length of ``s`` (a lower bound on max(d_out, d_in))."""
    s = _spectrum(s)
    if s.size == 0 or s[0] == 0.0:
        return 0
    rtol = s.size * np.finfo(np.float64).eps if rtol is None else rtol
    return int(np.sum(s > rtol * s[0]))


def truncation_errors(s, k: int) -> tuple[float, float]:
    """Eckart-Young errors of the best rank-k approximation, from the spectrum alone:

        ||W - W_k||_F = sqrt(sum_{i>k} s_i^2),   ||W - W_k||_2 = s_{k+1}   (0 when k >= len(s)).
    """
    s = _spectrum(s)
    if k < 0:
        raise AnalysisError(f"k must be >= 0, got {k}")
    tail = s[k:]
    return float(np.sqrt(np.sum(tail ** 2))), float(tail[0]) if tail.size else 0.0


def truncate(W, k: int) -> Truncation:
    """The best rank-k approximation of ``W`` (d_out, d_in) in both norms (Eckart-Young-Mirsky):

        W_k = U[:, :k] diag(s[:k]) Vh[:k],

    with the errors of :func:`truncation_errors`. ``0 <= k <= min(d_out, d_in)``.
    """
    U, s, Vh = svd(W)
    if not 0 <= k <= s.size:
        raise AnalysisError(f"k must be in [0, {s.size}] for a matrix of shape "
                            f"{(U.shape[0], Vh.shape[1])}, got {k}")
    W_k = (U[:, :k] * s[:k]) @ Vh[:k]
    fro, spec = truncation_errors(s, k)
    return Truncation(W_k, fro, spec)
