"""DoRA: weight-decomposed LoRA, a magnitude per output unit times the direction of W0 + s B A.

DoRA (Liu et al., ICML 2024, Eq. 5) writes the adapted weight as a magnitude times a unit
direction::

    V   = W0 + s · B A                        (d_out, d_in)   s = scaling, B A as in LoRA
    n   = ||V||_row                           (d_out,)  one norm per output unit (over d_in)
    W'  = (m / n)[:, None] · V                (d_out, d_in)
    out = x @ W'.T + b                        (..., d_out)

with a trainable magnitude ``m`` (d_out,) besides A and B. At the start ``m = ||W0 + s B A||_row``
(= ||W0||_row with the default B = 0), so W' = W0: DoRA starts exactly at the base.

Orientation. The paper stores W as (d, k) with ``y = W^T x`` and takes the norm "across each
column" (one per output unit). Our weight is (d_out, d_in) (PyTorch's and PEFT's layout), so the
same norm is over each *row*: ``lora_magnitude_vector`` has d_out entries, as in PEFT's files.

Gradient trick (the paper's §4.3, and PEFT's code): the norm n is treated as a constant in the
backward pass (``detach``), so no gradient flows through ``||V||``. That saves the memory of the
(d_out, d_in) gradient through the norm and changes accuracy by at most 0.2 points in the paper.
This layer does the same by default (``detach_norm=True``); ``detach_norm=False`` gives the exact
gradient, which the tests check against finite differences. With n constant and g = m / n::

    out  = x @ W0.T + b + (g - 1) ⊙ (x_d @ W0.T) + g ⊙ s (x_d @ A.T) @ B.T     (PEFT's form)
    dm   = Σ_batch dout ⊙ (x_d @ W0.T + s u) / n          u = (x_d @ A.T) @ B.T
    du   = s g ⊙ dout,  dB = du^T h,  dh = du @ B,  dA = dh^T x_d                 h = x_d @ A.T
    dx   = dout @ W0 + dropout_backward((g - 1) ⊙ dout @ W0 + dh @ A)

where x_d is the dropped-out input (x itself without dropout; then out = g ⊙ (x @ V.T) + b).
The exact gradient adds the path through n: with c_i = Σ_batch dout_i (x_d @ V.T)_i m_i / n_i^2,
dV = -(c / n)[:, None] ⊙ V, so dA += s B^T dV and dB += s dV A^T.

Merge: W0 <- W' (the norm is kept, as PEFT keeps it, so unmerge restores W0 = W' · n / m - s B A).

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

from typing import NamedTuple

from minilora.backend import xp
from minilora.methods.lora.layers import LoRAError, LoRALinear, all_finite
from minilora.nn import ops


class DoRALinearCache(NamedTuple):
    base: tuple  # linear_forward cache of the frozen path x @ W0.T + b
    drop: object  # dropout mask or None
    a: object  # linear_forward cache of h = x_d @ A.T (None while merged)
    b: object  # linear_forward cache of u = h @ B.T
    y0: object  # x_d @ W0.T (..., d_out), without bias
    u: object  # (x_d @ A.T) @ B.T (..., d_out), unscaled
    norm: object  # n = ||W0 + s B A||_row (d_out,), a constant of this pass


class DoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose adapted weight is ``m / ||W0 + s B A||_row · (W0 + s B A)``.

    Parameters: those of :class:`LoRALinear` plus ``lora_magnitude_vector`` m (d_out,)
    (PEFT's name; trainable, like the factors). See the module docstring for the formulas.

    Args:
        base, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, rng, dropout_rng: as
            for :class:`LoRALinear`.
        detach_norm: treat the norm as a constant in backward (the paper's trick, PEFT's code);
            False gives the exact gradient.

    Chapter: chapters/04-lora-notes.ipynb
    """

    kind = "DoRALinear"

    def __init__(self, base, r, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                 init_lora_weights=True, rng=0, dropout_rng=None, detach_norm: bool = True):
        super().__init__(base, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, rng,
                         dropout_rng)
        if init_lora_weights == "loftq":
            raise LoRAError("DoRA needs a float base weight; it does not combine with LoftQ")
        self.detach_norm = bool(detach_norm)
        # m = ||W0 + s B A|| per output unit: the adapted weight equals W0 + s B A at step 0
        self.params["lora_magnitude_vector"] = self.weight_norm()
        self.trainable = {"lora_A", "lora_B", "lora_magnitude_vector"}
        self._merged_norm = None

    def lora_weight(self):
        """V = W0 + s B A (d_out, d_in), from the unmerged W0."""
        v = xp.matmul(self.params["lora_B"], self.params["lora_A"])
        v *= self.scaling
        v += self.params["weight"]
        return v

    def weight_norm(self):
        """n = ||W0 + s B A|| over d_in, one per output unit: (d_out,)."""
        v = self.lora_weight()
        return xp.sqrt(xp.sum(v * v, axis=1))

    def delta_weight(self):
        """ΔW = W' - W0 = (m / n)[:, None] (W0 + s B A) - W0, (d_out, d_in); from the unmerged
        W0 (what :meth:`merge` adds)."""
        v = self.lora_weight()
        g = self.params["lora_magnitude_vector"] / xp.sqrt(xp.sum(v * v, axis=1))
        v *= g[:, None]
        v -= self.params["weight"]
        return v

    def merge(self, safe_merge: bool = False) -> None:
        """W0 <- W' = (m / n)[:, None] (W0 + s B A); n is kept for :meth:`unmerge`."""
        if self.merged:
            raise LoRAError(f"this {self.kind} adapter is already merged into its base weight; "
                            "merging again would rescale twice. Call unmerge() first")
        norm = self.weight_norm()
        merged_w = self.params["weight"] + self.delta_weight()
        if safe_merge and not all_finite(merged_w):
            raise LoRAError("refusing to merge: the DoRA weight m / ||V|| · V holds NaN or inf; "
                            "the base weight is unchanged")
        self.params["weight"][...] = merged_w
        self._merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        """W0 = W' · (n / m)[:, None] - s B A, with the n saved at merge time."""
        if not self.merged:
            super().unmerge()  # warns
            return
        w = self.params["weight"]
        w *= (self._merged_norm / self.params["lora_magnitude_vector"])[:, None]
        ba = xp.matmul(self.params["lora_B"], self.params["lora_A"])
        ba *= self.scaling
        w -= ba
        self._merged_norm = None
        self.merged = False

    def forward(self, x):
        """x (..., d_in) -> out (..., d_out), cache (:class:`DoRALinearCache`)."""
        out, c_base = self._base_forward(x)
        if self.merged:
            return out, DoRALinearCache(c_base, None, None, None, None, None, None)
        p = self.lora_dropout if self.training else 0.0
        x_d, c_drop = ops.dropout_forward(x, p, self.dropout_rng)
        if c_drop is None:  # no dropout: the base path already holds x @ W0.T (+ b)
            y0 = out - self.params["bias"] if "bias" in self.params else out.copy()
        else:
            y0, _ = ops.linear_forward(x_d, self.params["weight"])
        h, c_a = ops.linear_forward(x_d, self.params["lora_A"])  # (..., r)
        u, c_b = ops.linear_forward(h, self.params["lora_B"])  # (..., d_out)
        norm = self.weight_norm()  # a constant of this pass (the gradient trick)
        g = self.params["lora_magnitude_vector"] / norm  # (d_out,)
        out += (g - 1.0) * y0
        out += (g * self.scaling) * u
        return out, DoRALinearCache(c_base, c_drop, c_a, c_b, y0, u, norm)

    def backward(self, dout, cache: DoRALinearCache, need_dx: bool = True):
        """Backpropagate dout (..., d_out); returns dx (..., d_in) or None (formulas above)."""
        if cache.a is None:
            dx = self._base_backward(dout, cache.base, need_dx)
            self._check_backward(False)
            return dx
        m, s, n = self.params["lora_magnitude_vector"], self.scaling, cache.norm
        g = m / n
        batch_axes = tuple(range(dout.ndim - 1))
        dx = self._base_backward(dout, cache.base, need_dx)  # dout @ W0 (+ db)
        if self.needs_grad("lora_magnitude_vector"):
            # out_i = m_i / n_i (y0 + s u)_i + ...: dm = Σ dout ⊙ (y0 + s u) / n
            self._accumulate("lora_magnitude_vector",
                             xp.sum(dout * (cache.y0 + s * cache.u), axis=batch_axes) / n)
        need_a, need_b = self.needs_grad("lora_A"), self.needs_grad("lora_B")
        du = dout * (g * s)  # (..., d_out)
        dh, dB, _ = ops.linear_backward(du, cache.b, need_dx=need_dx or need_a, need_dw=need_b,
                                        need_db=False)
        if not self.detach_norm and (need_a or need_b):
            # exact: n_i = ||V_i|| also depends on A and B; dn_i = V_i / n_i dV_i
            c = xp.sum(dout * (cache.y0 + s * cache.u), axis=batch_axes) * m / (n * n)
            dV = self.lora_weight() * (-c / n)[:, None]  # (d_out, d_in)
            if need_b:
                dB = dB + s * xp.matmul(dV, self.params["lora_A"].T)
        self._accumulate("lora_B", dB)
        dx_d, dA, _ = (ops.linear_backward(dh, cache.a, need_dx=need_dx, need_dw=need_a,
                                           need_db=False) if dh is not None else (None, None, None))
        if dA is not None and not self.detach_norm:
            dA = dA + s * xp.matmul(self.params["lora_B"].T, dV)
        self._accumulate("lora_A", dA)
        if need_dx:
            # the (g - 1) W0 x_d path
            dx_d = dx_d + xp.matmul(dout * (g - 1.0), self.params["weight"])
            dx += ops.dropout_backward(dx_d, cache.drop)
        return dx


__all__ = ["DoRALinear", "DoRALinearCache"]
