"""AdaLoRA's training-time machinery: the orthogonality regulariser R = ‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F²
(with its gradient), the importance-scored :class:`RankAllocator` that prunes triplets to the budget
schedule, and :class:`AdaLoraModel`, the GPT wrapper that runs both (:func:`inject_adalora`).

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import math

import numpy as np

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError
from minilora.lora.adalora import (
    AdaLoraConfig,
    AdaLoRALinear,
    adalora_layers,
)
from minilora.lora.layers import LoRAError
from minilora.model import LanguageModelMixin
from minilora.nn.layers import Linear, Module


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


def orth_regularizer_backward(model: Module, weight: float = 1.0) -> None:
    """Add ``weight * dR/dA`` and ``weight * dR/dB`` into the layers' gradients (trainable only).

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = adalora_layers(model)
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
    """Importance scores and the budget schedule (PEFT's ``RankAllocator``, in NumPy/CuPy).

    Call :meth:`update_and_allocate` after every optimizer step with the 0-based step, while the
    gradients of that step are still in the layers' ``grads``.

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


# ----------------------------------------------------------------------------------------------
# a GPT with AdaLoRA layers: the regulariser in backward, the allocator after each step
# ----------------------------------------------------------------------------------------------
class AdaLoraModel(LanguageModelMixin, Module):
    """A GPT whose targeted Linears are :class:`AdaLoRALinear`; trains like the GPT.

    ``backward`` adds ``orth_reg_weight · dR`` to the factors' gradients (the loss the harness
    reports is the task loss alone), and ``after_optimizer_step`` (called by
    :class:`minilora.optim.AdamW` after every update) runs the :class:`RankAllocator`. Shares the
    GPT's children, so parameter names are the GPT's.

    Chapter: chapters/04-lora-notes.ipynb
    """

    def __init__(self, gpt, config: AdaLoraConfig):
        super().__init__()
        self.gpt = gpt
        self.adalora_config = config
        self.report = inject_adalora(gpt, config)
        self.children = dict(gpt.children)
        self.config = gpt.config
        self.allocator = RankAllocator(adalora_layers(gpt), config)

    @property
    def dtype(self):
        return self.gpt.dtype

    def check_input(self, idx) -> None:
        self.gpt.check_input(idx)

    def forward(self, idx, check: bool = True, **kw):
        return self.gpt.forward(idx, check=check, **kw)

    def kv_cache(self, batch_size: int, keep: int | None = None):
        """A generation cache of the wrapped GPT (the AdaLoRA layers sit inside its blocks)."""
        return self.gpt.kv_cache(batch_size, keep)

    def forward_incremental(self, idx, kv, check: bool = True):
        """:meth:`minilora.model.GPT.forward_incremental` of the wrapped GPT."""
        return self.gpt.forward_incremental(idx, kv, check=check)

    def backward(self, dlogits, cache):
        extra = self.gpt.backward(dlogits, cache)
        if self.adalora_config.orth_reg_weight:
            orth_regularizer_backward(self.gpt, self.adalora_config.orth_reg_weight)
        return extra

    def after_optimizer_step(self, t: int) -> None:
        """Run the allocator for 0-based step ``t - 1`` (AdamW counts from 1)."""
        self.allocator.update_and_allocate(t - 1)


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
    targets = [n for n, m in modules.items()
               if n and n.rsplit(".", 1)[-1] in config.target_modules and isinstance(m, Linear)]
    if not targets:
        raise LoRAError(f"no Linear of the model matches target_modules "
                        f"{list(config.target_modules)}")
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
