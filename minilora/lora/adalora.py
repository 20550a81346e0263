"""AdaLoRA: LoRA in SVD form, P Λ Q, whose rank budget is moved to the layers that need it.

AdaLoRA (Zhang et al., ICLR 2023) writes each update like a singular value decomposition::

    ΔW = c · B (A ⊙ E)      B = P (d_out, r),  E = Λ (r, 1),  A = Q (r, d_in)
    c  = lora_alpha / (ranknum + 1e-5)          ranknum = init_r, fixed (PEFT's constant)
    out = x @ W0.T + b + c · (dropout(x) @ (A ⊙ E).T) @ B.T

E starts at 0 (so the model starts exactly at the base) and A, B ~ N(0, 0.02^2) (PEFT's init).
Every layer starts with ``init_r`` triplets (B[:, k], E[k], A[k]); a budget schedule then lowers
the total number of non-zero E entries from ``init_r x n_layers`` to ``target_r x n_layers``,
zeroing the least important triplets wherever they are. So the *total* rank is fixed and each
layer ends with the rank its importance earned.

Importance (the paper's sensitivity x uncertainty, PEFT's ``RankAllocator``), per entry of A, B
and E after each optimizer step t::

    I_t   = |p ⊙ dL/dp|                                  sensitivity
    Ī_t   = beta1 Ī_{t-1} + (1 - beta1) I_t              smoothed
    U_t   = beta2 U_{t-1} + (1 - beta2) |I_t - Ī_t|      uncertainty
    s     = Ī_t ⊙ U_t
    S_k   = s(E_k) + mean_j s(A_kj) + mean_i s(B_ik)     one score per triplet k

Budget (step t, 0-based; T = total_step)::

    t <= tinit:                 b = init budget, no masking (warm-up)
    tinit < t <= T - tfinal:    b = target + (init - target) (1 - (t - tinit) / (T - tfinal - tinit))^3,
                                mask every deltaT steps: E_k = 0 for the init - b lowest S_k
    t > T - tfinal:             the final allocation is kept (E re-masked every step)

so the number of kept triplets never exceeds the budget. Orthogonality regulariser (P, Q should
stay near-orthonormal, as singular vectors are), added to the loss with weight
``orth_reg_weight``::

    R = (1 / N) Σ_layers ( ||A A^T - I||_F + ||B^T B - I||_F )       N = 2 x layers
    dR/dA = 2 (A A^T - I) A / (N ||A A^T - I||_F),   dR/dB = 2 B (B^T B - I) / (N ||B^T B - I||_F)

Backward of the layer (u = h @ B.T, h = x_d @ P.T, P = A ⊙ E)::

    dB = c dout^T h,  dh = c dout @ B,  dP = dh^T x_d,  dA = dP ⊙ E,  dE = Σ_j (dP ⊙ A)_{:, j},
    dx = dout @ W0 + dropout_backward(dh @ P)

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, JsonConfig, _check_float, _check_int
from minilora.lora.layers import LoRAError, _finite
from minilora.nn import ops
from minilora.nn.layers import Linear, Module

ADALORA_TARGETS = ("q", "k", "v", "o", "up", "down")


@dataclass(frozen=True)
class AdaLoraConfig(JsonConfig):
    """AdaLoRA's options (names and defaults as PEFT's ``AdaLoraConfig``).

    Attributes:
        init_r: triplets per layer at the start.
        target_r: average triplets per layer at the end; the total budget is target_r x layers.
            Must not exceed init_r.
        lora_alpha, lora_dropout: as LoRA; c = lora_alpha / (init_r + 1e-5).
        target_modules: layers to adapt (q, k, v, o, up, down or their PEFT names).
        tinit, tfinal: warm-up steps without pruning, and final steps with a fixed allocation.
        deltaT: prune every deltaT steps during the schedule.
        beta1, beta2: smoothing of sensitivity and uncertainty, in (0, 1).
        orth_reg_weight: weight of the orthogonality regulariser (>= 0).
        total_step: training steps T (the schedule needs them); tinit + tfinal < T.
        seed: seeds the draws of A and B.
    """

    init_r: int = field(default=12, metadata={"help": "triplets per layer at the start"})
    target_r: int = field(default=8, metadata={"help": "average triplets per layer at the end"})
    lora_alpha: float = field(default=8, metadata={"help": "scaling numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: tuple = field(default=("q", "v"), metadata={"help": "layers to adapt"})
    tinit: int = field(default=0, metadata={"help": "warm-up steps without pruning"})
    tfinal: int = field(default=0, metadata={"help": "final steps with a fixed allocation"})
    deltaT: int = field(default=1, metadata={"help": "prune every deltaT steps"})
    beta1: float = field(default=0.85, metadata={"help": "sensitivity smoothing"})
    beta2: float = field(default=0.85, metadata={"help": "uncertainty smoothing"})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "orthogonality weight"})
    total_step: int = field(default=200, metadata={"help": "training steps T"})
    seed: int = field(default=0, metadata={"help": "seed of A and B"})

    def __post_init__(self):
        for name in ("init_r", "target_r", "deltaT", "total_step"):
            _check_int(name, getattr(self, name))
        _check_int("tinit", self.tinit, lo=0)
        _check_int("tfinal", self.tfinal, lo=0)
        _check_int("seed", self.seed, lo=0)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} is above init_r={self.init_r}: the rank "
                              "budget only shrinks during training; use target_r <= init_r")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(f"tinit + tfinal = {self.tinit + self.tfinal} must be less than "
                              f"total_step = {self.total_step}: no step would be left to prune")
        _check_float("lora_alpha", self.lora_alpha, lo=0.0, lo_open=True)
        _check_float("lora_dropout", self.lora_dropout, lo=0.0)
        if self.lora_dropout >= 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check_float(name, v, lo=0.0, lo_open=True)
            if v >= 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {v!r}")
        _check_float("orth_reg_weight", self.orth_reg_weight, lo=0.0)
        aliases = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                   "up_proj": "up", "down_proj": "down"}
        targets = (self.target_modules,) if isinstance(self.target_modules, str) \
            else tuple(self.target_modules)
        targets = tuple(dict.fromkeys(aliases.get(t, t) for t in targets))
        bad = [t for t in targets if t not in ADALORA_TARGETS]
        if bad or not targets:
            raise ConfigError(f"target_modules {list(bad) or targets} not allowed; AdaLoRA adapts "
                              f"{', '.join(ADALORA_TARGETS)}")
        object.__setattr__(self, "target_modules", targets)


class AdaLoRALinear(Module):
    """A frozen Linear plus the SVD-form update ``c · B (A ⊙ E)`` (see the module docstring).

    Parameters: ``weight``, ``bias`` (adopted), ``lora_A`` (r, d_in), ``lora_E`` (r, 1),
    ``lora_B`` (d_out, r) -- PEFT's names and shapes. ``ranknum`` (the divisor of the scale)
    stays at the initial rank even when a file holds fewer rows, as in PEFT.

    Chapter: chapters/04-lora-notes.ipynb
    """

    kind = "AdaLoRALinear"

    def __init__(self, base: Linear, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 rng=0, ranknum: int | None = None, dropout_rng=None):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"AdaLoRALinear wraps a minilora Linear, got {type(base).__name__}")
        _check_int("r", r, lo=0)
        w = base.params["weight"]
        d_out, d_in = w.shape
        rng = backend.cpu_rng(rng)
        self.params["weight"] = w
        if "bias" in base.params:
            self.params["bias"] = base.params["bias"]
        self.params["lora_A"] = backend.asarray(rng.normal(0.0, 0.02, (r, d_in)), dtype=w.dtype)
        self.params["lora_E"] = xp.zeros((r, 1), dtype=w.dtype)
        self.params["lora_B"] = backend.asarray(rng.normal(0.0, 0.02, (d_out, r)), dtype=w.dtype)
        self.ranknum = r if ranknum is None else ranknum
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / (self.ranknum + 1e-5)
        self.lora_dropout = float(lora_dropout)
        self.training = True
        self.dropout_rng = backend.cpu_rng(int(rng.integers(1 << 62)) if dropout_rng is None
                                           else dropout_rng)
        self.trainable = {"lora_A", "lora_E", "lora_B"}
        self.merged = False

    @property
    def r(self) -> int:
        return self.params["lora_A"].shape[0]

    def delta_weight(self):
        """ΔW = c · B (A ⊙ E), (d_out, d_in) (PEFT's ``get_delta_weight``)."""
        p = self.params["lora_A"] * self.params["lora_E"]
        return xp.matmul(self.params["lora_B"], p) * self.scaling

    def merge(self) -> None:
        if self.merged:
            raise LoRAError("this AdaLoRA layer is already merged; unmerge() first")
        merged_w = self.params["weight"] + self.delta_weight()
        if not _finite(merged_w):
            raise LoRAError("refusing to merge: W0 + ΔW holds NaN or inf")
        self.params["weight"][...] = merged_w
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("unmerge(): this AdaLoRA layer is not merged; nothing to do",
                          UserWarning, stacklevel=2)
            return
        self.params["weight"] -= self.delta_weight()
        self.merged = False

    def forward(self, x):
        """x (..., d_in) -> out (..., d_out), cache."""
        out, c_base = ops.linear_forward(x, self.params["weight"], self.params.get("bias"),
                                         keep_x=self.needs_grad("weight"))
        if self.merged:
            return out, (c_base, None, None, None, None)
        p = self.lora_dropout if self.training else 0.0
        x_d, c_drop = ops.dropout_forward(x, p, self.dropout_rng)
        P = self.params["lora_A"] * self.params["lora_E"]  # (r, d_in)
        h, c_a = ops.linear_forward(x_d, P)  # (..., r)
        u, c_b = ops.linear_forward(h, self.params["lora_B"])  # (..., d_out)
        out += self.scaling * u
        return out, (c_base, c_drop, c_a, c_b, P)

    def backward(self, dout, cache, need_dx: bool = True):
        """dout (..., d_out) -> dx (..., d_in) or None (formulas in the module docstring)."""
        c_base, c_drop, c_a, c_b, P = cache
        dx, dw, db = ops.linear_backward(dout, c_base, need_dx=need_dx,
                                         need_dw=self.needs_grad("weight"),
                                         need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        if c_a is None:
            if self.trainable & {"lora_A", "lora_E", "lora_B"}:
                raise LoRAError("this AdaLoRA layer was merged during the forward pass; "
                                "unmerge() before training")
            return dx
        need_p = self.needs_grad("lora_A") or self.needs_grad("lora_E")
        du = dout * self.scaling
        dh, dB, _ = ops.linear_backward(du, c_b, need_dx=need_dx or need_p,
                                        need_dw=self.needs_grad("lora_B"), need_db=False)
        self._accumulate("lora_B", dB)
        if dh is None:
            return dx
        dx_d, dP, _ = ops.linear_backward(dh, c_a, need_dx=need_dx, need_dw=need_p, need_db=False)
        if dP is not None:
            if self.needs_grad("lora_A"):
                self._accumulate("lora_A", dP * self.params["lora_E"])
            if self.needs_grad("lora_E"):
                self._accumulate("lora_E", xp.sum(dP * self.params["lora_A"], axis=1,
                                                  keepdims=True))
        if need_dx:
            dx += ops.dropout_backward(dx_d, c_drop)
        return dx


def adalora_layers(model: Module) -> dict:
    """``{module name: AdaLoRALinear}`` in tree order.

    Chapter: chapters/04-lora-notes.ipynb
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
