"""The SVD of a LoRA update ΔW = s·B·A from its r×r core, without forming the d_out × d_in matrix.

With B (d_out, r) and A (r, d_in), take the thin QR factorisations

    B = Q_B R_B,      Q_B (d_out, r), R_B (r, r)
    Aᵀ = Q_A R_A,     Q_A (d_in, r),  R_A (r, r)

so that ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ. The middle factor is only r × r; its SVD
s·R_B R_Aᵀ = U_c diag(σ) V_cᵀ gives the SVD of ΔW exactly (Q_B and Q_A have orthonormal columns):

    ΔW = (Q_B U_c) diag(σ) (Q_A V_c)ᵀ.

Cost: O((d_out + d_in) r²) time and memory, against O(d_out d_in min(d_out, d_in)) for the dense
SVD: for d = 4096 and r = 16 that is about 2 MB of float64 instead of a 128 MB matrix.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import numpy as np

from minilora.analysis.svd import SVD, AnalysisError, as_float64


def lowrank_svd(B, A, scale: float = 1.0) -> SVD:
    """The thin SVD of ``ΔW = scale · B @ A`` from its core (see the module docstring).

    Args:
        B: (d_out, r) LoRA ``lora_B`` (any backend; used in float64).
        A: (r, d_in) LoRA ``lora_A``.
        scale: the LoRA scaling s (lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA).

    Returns:
        SVD(U (d_out, p), s (p,), Vh (p, d_in)) with p = min(r, d_out, d_in), s descending and
        non-negative (a negative ``scale`` flips the sign of U, not of s). Singular values past
        the rank of B·A are 0 (up to rounding) and their vectors are an arbitrary orthonormal
        completion inside the span of B (left) and of Aᵀ (right).
    """
    B = as_float64(B, "B", 2)
    A = as_float64(A, "A", 2)
    if B.shape[1] != A.shape[0]:
        raise AnalysisError(f"B (d_out, r) and A (r, d_in) must share r: got B {B.shape}, "
                            f"A {A.shape}")
    Q_B, R_B = np.linalg.qr(B)                 # (d_out, p_B), (p_B, r)
    Q_A, R_A = np.linalg.qr(A.T)               # (d_in, p_A), (p_A, r)
    core = float(scale) * (R_B @ R_A.T)        # (p_B, p_A)
    U_c, s, Vh_c = np.linalg.svd(core, full_matrices=False)
    return SVD(Q_B @ U_c, s, Vh_c @ Q_A.T)


def lowrank_singular_values(B, A, scale: float = 1.0) -> np.ndarray:
    """Only the singular values of ``scale · B @ A`` (descending, length min(r, d_out, d_in))."""
    return lowrank_svd(B, A, scale).s


def lowrank_frobenius_norm(B, A, scale: float = 1.0) -> float:
    """``||scale · B @ A||_F = |scale| · ||R_B R_Aᵀ||_F``, from the core (no d_out × d_in matrix)."""
    return float(np.sqrt(np.sum(lowrank_singular_values(B, A, scale) ** 2)))
