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

import json
import math
from pathlib import Path

import numpy as np

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, JsonConfig, check_float, check_int, option
from minilora.methods.lora.layers import LoRAError, all_finite
from minilora.methods.base import Method, Tuned, target_linears, unwrap_linears
from minilora.nn import ops
from minilora.nn.layers import Linear, Module
from minilora.nn.modules_to_save import (
    check_saved_modules,
    load_saved_modules,
    modules_to_save_state_dict,
)
from minilora.peft_format import (
    KEY_PREFIX,
    PeftFormatError,
    from_peft_module,
    peft_config,
    peft_key,
    read_peft_dir,
    saved_modules_peft_tensors,
    take_saved_modules,
    to_peft_module,
    write_peft_dir,
)

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

    init_r: int = option(12, "triplets per layer at the start", range=(1, None))
    target_r: int = option(8, "average triplets per layer at the end, <= --init-r",
                           range=(1, None))
    lora_alpha: float = option(8, "scaling c = lora_alpha / init_r (24 = 2 x 12 matches LoRA's "
                               "16 / 8)", flag="alpha", range=(0, None, True, False))
    lora_dropout: float = option(0.0, "dropout on the adapter input", flag="dropout",
                                 range=(0, 1, False, True))
    target_modules: tuple = option(("q", "v"), "comma-separated layers to adapt: q,k,v,o,up,down",
                                   flag="targets")
    tinit: int = option(0, "warm-up steps without pruning (default: a tenth of --steps)",
                        range=(0, None))
    tfinal: int = option(0, "final steps at a fixed allocation (default: a fifth of --steps)",
                         range=(0, None))
    deltaT: int = option(1, "prune every deltaT steps (default: a fortieth of --steps)",
                         flag="delta-t", range=(1, None))
    beta1: float = option(0.85, "smoothing of the sensitivity", range=(0, 1, True, True))
    beta2: float = option(0.85, "smoothing of the uncertainty", range=(0, 1, True, True))
    orth_reg_weight: float = option(0.5, "weight of the orthogonality regulariser",
                                    range=(0, None))
    total_step: int = option(200, "training steps T (the harness: --steps)", cli=False)
    seed: int = option(0, "seed of A and B", cli=False)

    def __post_init__(self):
        for name in ("init_r", "target_r", "deltaT", "total_step"):
            check_int(name, getattr(self, name))
        check_int("tinit", self.tinit, lo=0)
        check_int("tfinal", self.tfinal, lo=0)
        check_int("seed", self.seed, lo=0)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} is above init_r={self.init_r}: the rank "
                              "budget only shrinks during training; use target_r <= init_r")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(f"tinit + tfinal = {self.tinit + self.tfinal} must be less than "
                              f"total_step = {self.total_step}: no step would be left to prune")
        check_float("lora_alpha", self.lora_alpha, lo=0.0, lo_open=True)
        check_float("lora_dropout", self.lora_dropout, lo=0.0)
        if self.lora_dropout >= 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            check_float(name, v, lo=0.0, lo_open=True)
            if v >= 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {v!r}")
        check_float("orth_reg_weight", self.orth_reg_weight, lo=0.0)
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
        check_int("r", r, lo=0)
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
        if not all_finite(merged_w):
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

    def draws_random(self) -> bool:
        """The forward draws dropout masks (training with ``lora_dropout`` > 0)."""
        return bool(self.training) and self.lora_dropout > 0

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


# ----------------------------------------------------------------------------------------------
# the orthogonality regulariser
# ----------------------------------------------------------------------------------------------
def _fro_and_grad(G, want_grad: bool):
    norm = math.sqrt(backend.to_scalar(xp.vdot(G.reshape(-1), G.reshape(-1))))
    return norm, (G / norm if want_grad and norm > 0 else None)


def orth_regularizer(model: Module) -> float:
    """R = (1 / N) Σ (||A A^T - I||_F + ||B^T B - I||_F), N = 2 x layers (PEFT's ``regu_loss``).

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = adalora_layers(model)
    total = 0.0
    for m in layers.values():
        A, B = m.params["lora_A"], m.params["lora_B"]
        total += _fro_and_grad(A @ A.T - xp.eye(A.shape[0], dtype=A.dtype), False)[0]
        total += _fro_and_grad(B.T @ B - xp.eye(B.shape[1], dtype=B.dtype), False)[0]
    return total / (2 * len(layers)) if layers else 0.0


def orth_regularizer_backward(model, weight: float = 1.0) -> None:
    """Add ``weight * dR/dA`` and ``weight * dR/dB`` into the layers' gradients (trainable only);
    ``model``: a model, or its ``{name: AdaLoRALinear}``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = model if isinstance(model, dict) else adalora_layers(model)
    n = 2 * len(layers)
    for m in layers.values():
        A, B = m.params["lora_A"], m.params["lora_B"]
        if m.needs_grad("lora_A"):
            _, g = _fro_and_grad(A @ A.T - xp.eye(A.shape[0], dtype=A.dtype), True)
            if g is not None:
                m._accumulate("lora_A", (2.0 * weight / n) * (g @ A))
        if m.needs_grad("lora_B"):
            _, g = _fro_and_grad(B.T @ B - xp.eye(B.shape[1], dtype=B.dtype), True)
            if g is not None:
                m._accumulate("lora_B", (2.0 * weight / n) * (B @ g))


# ----------------------------------------------------------------------------------------------
# the rank allocator
# ----------------------------------------------------------------------------------------------
class RankAllocator:
    """Importance scores and the budget schedule (PEFT's ``RankAllocator``, in NumPy/CuPy), and
    AdaLoRA's per-step work as a training callback (:class:`minilora.train.Callback`):

    * :meth:`after_backward`: add the orthogonality regulariser's gradient (PEFT adds R to the
      loss; the loss the harness reports stays the task loss);
    * :meth:`after_step`: :meth:`update_and_allocate` with the 0-based step, the parameters
      updated and that step's gradients still in the layers' ``grads`` (where PEFT's training
      loop calls ``model.update_and_allocate(step)``).

    Chapter: chapters/04-lora-notes.ipynb
    """

    def __init__(self, layers: dict, config: AdaLoraConfig):
        self.layers = layers
        self.config = config
        self.init_bgt = sum(m.r for m in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.rank_pattern: dict | None = None  # layer name -> list of bools (kept triplets)
        self.history: list = []  # (step, budget, kept) after every masking
        self.reset_ipt()

    # -- the training callback ---------------------------------------------------------------------
    def after_backward(self) -> None:
        """orth_reg_weight · dR/dA and dR/dB into the factors' gradients."""
        if self.config.orth_reg_weight:
            orth_regularizer_backward(self.layers, self.config.orth_reg_weight)

    def after_step(self, step: int) -> None:
        """Score and prune after the optimizer step of 0-based ``step``."""
        self.update_and_allocate(step)

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict = {}
        self.exp_avg_unc: dict = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, mask now?) at 0-based ``step`` (cubic decrease between tinit and T - tfinal)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * mul ** 3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    def update_ipt(self) -> None:
        """Ī, U from |p ⊙ grad| of every A, E, B (a parameter without gradient counts as 0)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, m in self.layers.items():
            for k in ("lora_A", "lora_E", "lora_B"):
                p = m.params[k]
                g = m.grads.get(k)
                ipt = xp.abs(p * g) if g is not None else xp.zeros_like(p)
                key = f"{name}.{k}"
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key] = xp.zeros_like(p)
                    self.exp_avg_unc[key] = xp.zeros_like(p)
                avg = self.exp_avg_ipt[key]
                avg *= b1
                avg += (1 - b1) * ipt
                unc = self.exp_avg_unc[key]
                unc *= b2
                unc += (1 - b2) * xp.abs(ipt - avg)

    def triplet_scores(self) -> dict:
        """``{layer name: (r,) scores}``: s(E_k) + mean_j s(A_kj) + mean_i s(B_ik)."""
        out = {}
        for name in self.layers:
            s = {k: self.exp_avg_ipt[f"{name}.{k}"] * self.exp_avg_unc[f"{name}.{k}"]
                 for k in ("lora_A", "lora_E", "lora_B")}
            out[name] = (s["lora_E"].reshape(-1)
                         + (s["lora_A"].mean(axis=1) + s["lora_B"].mean(axis=0)))
        return out

    def mask_to_budget(self, budget: int) -> dict:
        """Zero E for the ``init - budget`` lowest-scoring triplets (ties at the threshold are
        masked too, so never more than ``budget`` survive); returns the rank pattern."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:
            threshold = -math.inf
        else:
            flat = np.sort(np.concatenate([backend.to_numpy(s) for s in scores.values()]))
            threshold = float(flat[k - 1])
        pattern = {}
        for name, s in scores.items():
            keep = backend.to_numpy(s) > threshold
            self.layers[name].params["lora_E"] *= backend.asarray(keep[:, None],
                                                                  dtype=s.dtype)
            pattern[name] = keep.tolist()
        return pattern

    def mask_using_rank_pattern(self) -> None:
        for name, keep in self.rank_pattern.items():
            m = self.layers[name]
            m.params["lora_E"] *= backend.asarray(np.asarray(keep)[:, None],
                                                  dtype=m.params["lora_E"].dtype)

    def update_and_allocate(self, step: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(step)``: score, then prune to the schedule's
        budget; at T - tfinal fix the allocation; afterwards keep re-applying it."""
        c = self.config
        final = c.total_step - c.tfinal
        if step < final:
            self.update_ipt()
            budget, mask = self.budget_schedule(step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
                self.history.append((step, budget, self.kept()))
        elif step == final:
            budget, _ = self.budget_schedule(step)
            self.rank_pattern = self.mask_to_budget(budget)
            self.history.append((step, budget, self.kept()))
            self.reset_ipt()
        elif self.rank_pattern is not None:
            self.mask_using_rank_pattern()

    def kept(self) -> int:
        """Non-zero E entries in all layers (the rank in use)."""
        return int(sum(int(backend.to_scalar(xp.sum(m.params["lora_E"] != 0)))
                       for m in self.layers.values()))

    def ranks(self) -> dict:
        """``{layer name: kept triplets}`` by the current rank pattern (init_r if none yet)."""
        if self.rank_pattern is None:
            return {n: m.r for n, m in self.layers.items()}
        return {n: int(sum(k)) for n, k in self.rank_pattern.items()}


def inject_adalora(model: Module, config: AdaLoraConfig) -> dict:
    """Wrap the targeted Linears of ``model`` in :class:`AdaLoRALinear` (init_r triplets each)
    and freeze the rest; returns ``{"trainable", "total", "percent", "targets"}``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"config must be an AdaLoraConfig, got {type(config).__name__}")
    if adalora_layers(model):
        raise LoRAError("the model already has AdaLoRA layers; inject once per model")
    modules = dict(model.named_modules())
    targets = target_linears(modules, config.target_modules, LoRAError)
    for n in targets:
        d_out, d_in = modules[n].params["weight"].shape
        if config.init_r > min(d_in, d_out):
            raise ConfigError(f"init_r={config.init_r} is above min(d_in, d_out) = "
                              f"{min(d_in, d_out)} of {n!r}")
    rng = backend.cpu_rng(config.seed)
    for n in targets:
        parent, _, child = n.rpartition(".")
        modules[parent].replace(child, AdaLoRALinear(modules[n], config.init_r, config.lora_alpha,
                                                     config.lora_dropout, rng=rng))
    model.set_trainable(lambda p: p.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B"))
    return model.trainable_report(targets)


# ----------------------------------------------------------------------------------------------
# files: PEFT's ADALORA directory (the kept triplets only, rank_pattern in the config)
# ----------------------------------------------------------------------------------------------
def export_adalora_peft(path_dir, model: Module, config: AdaLoraConfig,
                        rank_pattern: dict | None = None, modules_to_save=()) -> Path:
    """Write PEFT's AdaLoRA directory: per layer only the kept triplets, keys
    ``base_model.model.<path>.lora_A`` (r_M, d_in), ``.lora_E`` (r_M, 1), ``.lora_B``
    (d_out, r_M) (no ``.weight``), and ``rank_pattern`` ``{"<path>.lora_E": [bools]}`` in the
    config (PEFT's saved form). ``rank_pattern``: ours (layer name -> bools); None keeps every
    triplet with a non-zero E. ``modules_to_save``: module paths trained whole beside the
    triplets, saved under their own keys (``base_model.model.lm_head.weight``) and named in the
    config, as peft 0.21 does.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = adalora_layers(model)
    if not layers or any(m.merged for m in layers.values()):
        raise LoRAError("export_adalora_peft: the model needs unmerged AdaLoRA layers")
    tensors, pattern = {}, {}
    for name, m in layers.items():
        E = backend.to_numpy(m.params["lora_E"]).reshape(-1)
        keep = np.asarray(rank_pattern[name] if rank_pattern else E != 0, dtype=bool)
        peft = to_peft_module(name)
        # PEFT's pattern has init_r entries; a layer imported from a file holds only the kept
        # triplets, so its pattern is padded (which slots they fill does not change ΔW)
        pattern[f"{peft}.lora_E"] = keep.tolist() + [False] * (config.init_r - keep.size)
        A, E2, B = (backend.to_numpy(m.params[k]) for k in ("lora_A", "lora_E", "lora_B"))
        for k, a in (("lora_A", A[keep]), ("lora_E", E2[keep]), ("lora_B", B[:, keep])):
            tensors[peft_key(name, k)] = a
    tensors.update(saved_modules_peft_tensors(
        {n: backend.to_numpy(a) for n, a in modules_to_save_state_dict(model, modules_to_save).items()}))
    fields = {"r": 8, "bias": "none", "init_lora_weights": True, "use_dora": False,
              "use_rslora": False, "rank_pattern": pattern,
              **{k: v for k, v in config.to_dict().items() if k not in ("target_modules", "seed")}}
    try:
        return write_peft_dir(path_dir, tensors, peft_config(
            "ADALORA", fields, config.target_modules, modules_to_save))
    except PeftFormatError as e:
        raise LoRAError(f"export_adalora_peft: {e}") from None


def import_adalora_peft(path_dir, model: Module, return_modules: bool = False):
    """Load PEFT's AdaLoRA directory into a fresh base GPT; returns ``(config, ranks)``, ranks
    ``{layer name: kept triplets}`` (with ``return_modules``: ``(config, ranks, the module paths
    saved whole)``). A layer AdaLoRA pruned to rank 0 holds no triplet and is the base layer. Each layer holds the file's rows; ``ranknum`` stays
    ``init_r`` (so c = lora_alpha / (init_r + 1e-5), as PEFT computes after reloading).

    Chapter: chapters/04-lora-notes.ipynb
    """
    d, raw, _, cfg_path, w_path = read_peft_dir(path_dir, ("ADALORA",), LoRAError)
    if d.get("fan_in_fan_out") or d.get("use_dora"):
        raise LoRAError(f"{str(cfg_path)!r}: fan_in_fan_out / use_dora are not supported for "
                        "AdaLoRA files")
    fields = {k: d[k] for k in ("init_r", "target_r", "lora_alpha", "lora_dropout", "tinit",
                                "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                                "total_step") if d.get(k) is not None}
    config = AdaLoraConfig(target_modules=tuple(d.get("target_modules") or ()), **fields)
    raw, saved, saved_paths = take_saved_modules(raw, d, str(cfg_path), LoRAError)
    arrays = {}
    for key, a in raw.items():
        path, _, tensor = key[len(KEY_PREFIX):].rpartition(".")
        if not key.startswith(KEY_PREFIX) or tensor not in ("lora_A", "lora_E", "lora_B"):
            raise LoRAError(f"{str(w_path)!r}: key {key!r} is not an AdaLoRA factor")
        arrays.setdefault(from_peft_module(path), {})[tensor] = a
    check_saved_modules(model, saved_paths, saved, str(w_path), error=LoRAError)
    inject_adalora(model, config)
    layers = adalora_layers(model)
    if set(arrays) != set(layers):
        raise LoRAError(f"{str(w_path)!r} adapts {sorted(arrays)[:4]} but the config targets "
                        f"{sorted(layers)[:4]}")
    for name, t in arrays.items():
        m = layers[name]
        d_out, d_in = m.params["weight"].shape
        r = t["lora_A"].shape[0]
        if (t["lora_A"].shape != (r, d_in) or t["lora_E"].shape != (r, 1)
                or t["lora_B"].shape != (d_out, r) or r > config.init_r):
            raise LoRAError(f"{str(w_path)!r}: {name} has shapes A {t['lora_A'].shape}, E "
                            f"{t['lora_E'].shape}, B {t['lora_B'].shape}; want (r, {d_in}), "
                            f"(r, 1), ({d_out}, r) with r <= init_r = {config.init_r}")
    for name, t in arrays.items():
        m = layers[name]
        for k, a in t.items():
            m.params[k] = backend.asarray(a, dtype=m.params["weight"].dtype)
    if saved_paths:
        load_saved_modules(model, saved_paths, saved, str(w_path), error=LoRAError)
    ranks = {n: m.r for n, m in layers.items()}
    return (config, ranks, saved_paths) if return_modules else (config, ranks)


class AdaLoraMethod(Method):
    """AdaLoRA: SVD-form LoRA whose rank budget moves to the layers that need it; its per-step
    work is the training callback :class:`RankAllocator`."""

    name = "adalora"
    example = "--init-r 12 --target-r 8"
    config_cls = AdaLoraConfig
    summary = "AdaLoRA: LoRA in SVD form P Λ Q pruned to a rank budget by importance"
    weights_file = "adalora/adapter_model.safetensors"   # our file is PEFT's folder
    peft_type = "ADALORA"
    lr = (5e-3, 5e-4)
    resumable = False
    resumable_why = ("the checkpoint does not hold the rank allocator's importance scores; start "
                     "the run again")

    def default_config(self, steps=None):
        """init_r 12 -> target_r 8 (the average rank of method "lora"), lora_alpha 24 (c =
        24/12 = 2 = LoRA's 16/8) on q, v; the schedule from the run's ``steps`` (default 200):
        warm-up a tenth (tinit), a fixed allocation for the last fifth (tfinal), pruning every
        fortieth (deltaT)."""
        steps = 200 if steps is None else steps
        return AdaLoraConfig(init_r=12, target_r=8, lora_alpha=24, target_modules=("q", "v"),
                             tinit=steps // 10, tfinal=steps // 5, deltaT=max(1, steps // 40),
                             total_step=steps)

    def _apply(self, model, config) -> Tuned:
        report = inject_adalora(model, config)
        allocator = RankAllocator(adalora_layers(model), config)
        return Tuned(model, config, self, callbacks=(allocator,), report=report)

    @staticmethod
    def _allocator(tuned):
        return next((c for c in tuned.callbacks if isinstance(c, RankAllocator)), None)

    def record(self, tuned: Tuned) -> dict:
        """The config, the final rank per layer and the pruning history."""
        alloc = self._allocator(tuned)
        extra = {} if alloc is None else {"final_ranks": alloc.ranks(),
                                          "rank_history": [list(h) for h in alloc.history]}
        return {**tuned.config.to_dict(), **extra}

    def extra_files(self, tuned: Tuned) -> dict:
        """``adalora_ranks.json``: the final rank per layer and the pruning history."""
        alloc = self._allocator(tuned)
        if alloc is None:
            return {}
        return {"adalora_ranks.json": json.dumps(
            {"final_ranks": alloc.ranks(), "history": [list(h) for h in alloc.history]},
            indent=1) + "\n"}

    @staticmethod
    def _folder(path) -> Path:
        path = Path(path)
        return path.parent if path.name == "adapter_model.safetensors" else path

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        """PEFT's AdaLoRA folder (the kept triplets; ``path``: the folder or its weights file)."""
        alloc = self._allocator(tuned)
        export_adalora_peft(self._folder(path), tuned.model, tuned.config,
                            alloc.rank_pattern if alloc is not None else None,
                            tuned.modules_to_save)

    def load(self, path, model) -> Tuned:
        config, _, paths = import_adalora_peft(self._folder(path), model, return_modules=True)
        return Tuned(model, config, self, tuple(paths))

    def export_peft(self, path_dir, tuned: Tuned, base_model_name_or_path=None):
        self.save(path_dir, tuned)
        return Path(path_dir)

    def import_peft(self, path_dir, model) -> Tuned:
        return self.load(path_dir, model)

    def merge(self, tuned: Tuned):
        layers = adalora_layers(tuned.model)
        for m in layers.values():
            m.merge()
        return unwrap_linears(tuned.model, layers)


ADALORA = AdaLoraMethod()
