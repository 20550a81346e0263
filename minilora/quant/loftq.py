"""LoftQ: start QLoRA from W ≈ dequant(Q) + s B A instead of dequant(Q) alone (Li et al. 2023).

CPU by design: the SVDs run in float64 NumPy; the quantisation itself runs on ``xp``.

Chapter: chapters/05-lora-and-qlora.ipynb
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from minilora import backend
from minilora.errors import UsageError
from minilora.methods.lora.init import pissa_factors
from minilora.quant.linear import QuantWeight, check_finite_weight


class LoftQResult(NamedTuple):
    """What :func:`loftq_init` returns.

    Attributes:
        qweight: the 4-bit Q_T (:class:`QuantWeight`).
        A: (r, d_in) and B: (d_out, r) float64 NumPy factors, scaling * B A ~ W - dequant(Q_T).
        residual_norms: [||W - dequant(Q_t) - scaling B_t A_t||_F for t = 1..T].
        quant_error_norm: ||W - dequant(quant(W))||_F, the plain QLoRA start (B A = 0).
        weight_norm: ||W||_F (to make the norms relative).
    """
    qweight: QuantWeight
    A: object
    B: object
    residual_norms: list
    quant_error_norm: float
    weight_norm: float


def loftq_init(w, r: int, n_iter: int = 5, quant_type: str = "nf4", blocksize: int = 64,
               double_quant: bool = True, scaling: float = 1.0, name: str = "weight"):
    """LoftQ: alternate 4-bit quantisation and a rank-r SVD of the residual (Algorithm 1).

        t = 1..T:  Q_t = quant(W - s B_{t-1} A_{t-1});   R_t = W - dequant(Q_t)
                   A_t = sqrt(S_r / s) Vh_r,  B_t = U_r sqrt(S_r / s)   (svd of R_t)
        residual_t = ||W - dequant(Q_t) - s B_t A_t||_F = sqrt(sum_{i > r} S_i^2)

    T = 1 is "quantise as QLoRA does, then put the top-r part of the quantisation error into
    the adapter". The SVD step is optimal for the given Q, but the quantisation step is not the
    best Q for the given B A (absmax is recomputed from its input, then nearest codes), so the
    residual is not guaranteed to fall every step (``minilora loftq`` records, per matrix of the
    base model, whether it did: ``results/quant/loftq_residuals.json``). The SVD runs on
    the CPU in float64; the quantisation on ``xp`` in float32.

    Args:
        w: (d_out, d_in) finite float weight W.
        r: rank, 1 <= r <= min(d_out, d_in).
        n_iter: T >= 1.
        quant_type, blocksize, double_quant: the 4-bit format of Q.
        scaling: the LoRA layer's scaling s (lora_alpha / r); the factors are divided by it
            so that ``s * B @ A`` is the low-rank part.
        name: used in error messages.
    Returns:
        :class:`LoftQResult`.

    Chapter: chapters/05-lora-and-qlora.ipynb
    """
    w = check_finite_weight(w, name)
    d_out, d_in = w.shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(d_out, d_in):
        raise UsageError(f"LoftQ rank r must be an integer in [1, min(d_out, d_in) = "
                         f"{min(d_out, d_in)}] for {name} {tuple(w.shape)}; got {r!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise UsageError(f"LoftQ n_iter must be an integer >= 1; got {n_iter!r}")
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
        raise UsageError(f"scaling must be a positive finite number; got {scaling!r}")
    w64 = np.asarray(backend.to_numpy(w), dtype=np.float64)
    lowrank = np.zeros_like(w64)  # s B A, (d_out, d_in)
    residuals, quant_error = [], None
    A = B = q = None
    for _ in range(n_iter):
        q = QuantWeight.quantize(backend.asarray(w64 - lowrank, dtype="float32"), quant_type,
                                 blocksize, double_quant, name=name)
        r_t = w64 - backend.to_numpy(q.dequantize()).astype(np.float64)  # R_t = W - deq(Q_t)
        if quant_error is None:
            quant_error = float(np.linalg.norm(r_t))
        A, B, rest = pissa_factors(r_t, r, scaling)  # rest = R_t - s B A
        lowrank = r_t - rest
        residuals.append(float(np.linalg.norm(rest)))
    return LoftQResult(q, A, B, residuals, quant_error, float(np.linalg.norm(w64)))
