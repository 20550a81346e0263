"""How LoRA factors start: PEFT's initialisations, drawn on the CPU in float64 (by design).

Every draw comes from one ``numpy.random.Generator`` on the CPU, so a NumPy and a CuPy run start
from the same factors; the wrappers in :mod:`minilora.methods.lora.layers` then move them with
``backend.asarray``.

* ``True`` (default): A like ``torch.nn.Linear(d_in, r)`` (kaiming-uniform, a = √5: U(±1/√d_in)),
  B = 0, so ΔW = scaling · B A = 0 at step 0;
* ``"gaussian"``: A ~ N(0, (1/r)²), B = 0;
* ``False``: B random too (PEFT's debugging init: ΔW ≠ 0 at step 0);
* ``"swap"``: A = 0, B random (the "other way round" init the articles ask about);
* ``"pissa"``: the top-r singular part of W0 (below), and W0 replaced by the residual.

For an Embedding PEFT starts the other way round: A (r, V) = 0 and B (C, r) ~ N(0, 1).

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import math

import numpy as np

from minilora import backend


def pissa_factors(w, r: int, scaling: float):
    """PiSSA factors of a (d_out, d_in) matrix, computed on the CPU in float64.

    W = U S Vh;  A = sqrt(S_r / scaling) Vh_r (r, d_in);  B = U_r sqrt(S_r / scaling) (d_out, r);
    residual = W - scaling B A = U[:, r:] S[r:] Vh[r:]. Dividing S_r by ``scaling`` (as PEFT does)
    makes ``scaling B A`` the top-r part of W for any lora_alpha. Returns float64 arrays
    (A, B, residual); the residual does not depend on the signs the SVD picks.
    """
    w = np.asarray(backend.to_numpy(w), dtype=np.float64)
    U, S, Vh = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(S[:r] / scaling)  # (r,)
    A = root[:, None] * Vh[:r]  # (r, d_in)
    B = U[:, :r] * root[None, :]  # (d_out, r)
    return A, B, w - scaling * (B @ A)


def linear_factors(init, r: int, d_in: int, d_out: int, rng, w=None, scaling: float = 1.0):
    """Initial (A (r, d_in), B (d_out, r), residual or None) for a Linear; "pissa" needs ``w``."""
    if init == "pissa":
        return pissa_factors(w, r, scaling)
    bound_a, bound_b = 1.0 / math.sqrt(d_in), 1.0 / math.sqrt(r)  # nn.Linear's kaiming(a=√5)
    if init == "swap":
        return np.zeros((r, d_in)), rng.uniform(-bound_b, bound_b, (d_out, r)), None
    if init == "gaussian":
        A = rng.normal(0.0, 1.0 / r, (r, d_in))  # PEFT: std = 1/r
    else:  # True and False both start A like torch's nn.Linear(d_in, r)
        A = rng.uniform(-bound_a, bound_a, (r, d_in))
    if init is False:  # PEFT's debug init: B random too, so ΔW != 0 at step 0
        return A, rng.uniform(-bound_b, bound_b, (d_out, r)), None
    return A, np.zeros((d_out, r)), None


def embedding_factors(init, r: int, V: int, C: int, rng, w=None, scaling: float = 1.0):
    """Initial (A (r, V), B (C, r), residual (V, C) or None) for an Embedding (ΔW = s (B A).T)."""
    if init == "pissa":
        # ΔW = scaling (B A).T, so B A approximates W0.T (C, V): the Linear recipe on W0.T
        A, B, residual_t = pissa_factors(backend.to_numpy(w).T, r, scaling)
        return A, B, np.ascontiguousarray(residual_t.T)
    if init == "swap":
        return rng.standard_normal((r, V)), np.zeros((C, r)), None
    if init is False:
        return rng.standard_normal((r, V)), rng.standard_normal((C, r)), None
    return np.zeros((r, V)), rng.standard_normal((C, r)), None  # True, "gaussian"
