"""Houlsby bottleneck adapters: h -> h + up(gelu(down(h))) after attn.o and mlp.down.

Each adapter adds 2md + d + m numbers (m = bottleneck); the up-projection starts at zero, so step 0
is the base model exactly. :class:`HoulsbyAdapter` wraps the block's Linear (it adopts the base's
``weight`` / ``bias`` arrays under the same names, so a base checkpoint still loads by name) and
adds two child Linears ``adapter_down`` / ``adapter_up``; the model stays a GPT.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, JsonConfig, _check_float, _check_int
from minilora.errors import PeftError
from minilora.nn import ops, ops_fast
from minilora.nn.layers import Linear, Module
from minilora.peft.common import _truncated_normal

ADAPTER_TARGETS = ("o", "down")  # Houlsby: after the attention output projection and the MLP

@dataclass(frozen=True)
class AdapterConfig(JsonConfig):
    """Houlsby bottleneck adapters (Houlsby et al. 2019).

    adapter(h) = h + up(gelu(down(h)))       down (m, d) + bias (m,), up (d, m) + bias (d,)

    Attributes:
        bottleneck: m, the adapter's inner width (1 <= m <= n_embd). Houlsby's code default 64.
        targets: after which Linears of each block: ``"o"`` (attention output projection) and
            ``"down"`` (MLP output projection), the paper's two places; either alone is allowed.
        init_std: std of the truncated (at 2 std) normal init of the adapter weights (the
            paper's 1e-2; biases start at zero).
        zero_up: start the up projection at exactly zero, so the adapter is exactly the identity
            at step 0 (as LoRA's B = 0); False draws it like ``down`` (the paper: near-identity).
        train_layernorm: also train every LayerNorm's weight and bias, as Houlsby et al. do
            ("we also train new layer normalization parameters per task"); off by default so
            the comparison with LoRA trains adapters only.
        seed: seeds the CPU generator of the initial weights.
    """

    bottleneck: int = field(default=16, metadata={"help": "adapter inner width m"})
    targets: tuple = field(default=ADAPTER_TARGETS, metadata={"help": "o and/or down"})
    init_std: float = field(default=1e-2, metadata={"help": "std of the truncated normal init"})
    zero_up: bool = field(default=True, metadata={"help": "up projection starts at zero"})
    train_layernorm: bool = field(default=False, metadata={"help": "train the LayerNorms too"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights"})

    def __post_init__(self):
        _check_int("bottleneck", self.bottleneck)
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if (not isinstance(targets, (tuple, list)) or not targets
                or any(t not in ADAPTER_TARGETS for t in targets)):
            raise ConfigError(f"adapter targets must be a non-empty subset of "
                              f"{list(ADAPTER_TARGETS)}; got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        _check_float("init_std", self.init_std, lo=0.0, lo_open=True)
        for name in ("zero_up", "train_layernorm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_int("seed", self.seed, lo=0)

class AdapterCache(NamedTuple):
    """What :meth:`HoulsbyAdapter.backward` needs from the forward pass."""
    base: tuple  # the wrapped linear's cache
    down: tuple  # adapter_down's
    gelu: tuple
    up: tuple  # adapter_up's


class HoulsbyAdapter(Module):
    """A frozen :class:`~minilora.nn.layers.Linear` followed by a bottleneck adapter.

    y   = x @ W0.T + b                      (..., d)    the wrapped sub-layer output
    h   = y @ W_down.T + b_down             (..., m)
    out = y + gelu(h) @ W_up.T + b_up       (..., d)    the adapter's internal skip connection

    It wraps rather than subclasses: it adopts the base's ``weight`` and ``bias`` arrays under the
    same names and adds the children ``adapter_down`` (Linear (m, d)) and ``adapter_up`` (Linear
    (d, m)). The adapter cannot be merged into W0 (gelu sits between the projections), so it adds
    two sequential GEMMs per wrapped layer at inference: the latency cost the LoRA paper measures
    (``minilora bench``, section ``peft_latency``).

    Args:
        base: the Linear to wrap (d_out = d).
        bottleneck: m.
        init_std: std of the truncated normal init of ``W_down`` (and ``W_up`` unless zero_up).
        zero_up: W_up = 0 and b_up = 0, so ``out == y`` exactly at step 0.
        rng: int seed or NumPy Generator (drawn on the CPU).

    Chapter: chapters/04-lora-notes.ipynb
    """

    def __init__(self, base: Linear, bottleneck: int, init_std: float = 1e-2,
                 zero_up: bool = True, rng=0):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"HoulsbyAdapter wraps a minilora Linear, got {type(base).__name__}")
        _check_int("bottleneck", bottleneck)
        w = base.params["weight"]
        d = w.shape[0]
        if bottleneck > d:
            raise ConfigError(f"bottleneck m={bottleneck} is wider than the layer's output d={d}: "
                              f"an adapter projects down to m < d; use bottleneck <= {d}")
        rng = backend.cpu_rng(rng)
        self.params["weight"] = w
        if "bias" in base.params:
            self.params["bias"] = base.params["bias"]
        dt = w.dtype
        w_down = backend.asarray(_truncated_normal(rng, (bottleneck, d), init_std), dtype=dt)
        w_up = (xp.zeros((d, bottleneck), dtype=dt) if zero_up else
                backend.asarray(_truncated_normal(rng, (d, bottleneck), init_std), dtype=dt))
        self.adapter_down = self.add("adapter_down",
                                     Linear(w_down, xp.zeros((bottleneck,), dtype=dt)))
        self.adapter_up = self.add("adapter_up", Linear(w_up, xp.zeros((d,), dtype=dt)))
        self.bottleneck = bottleneck
        self.trainable = set()  # the wrapped W0, b are frozen; the children train

    def forward(self, x):
        """x (..., d_in) -> out (..., d), cache (:class:`AdapterCache`)."""
        y, c_base = ops.linear_forward(x, self.params["weight"], self.params.get("bias"),
                                       keep_x=self.needs_grad("weight"))
        h, c_down = self.adapter_down.forward(y)  # (..., m)
        g, c_gelu = ops_fast.gelu_forward_fast(h)
        out, c_up = self.adapter_up.forward(g)  # (..., d), a fresh array
        out += y  # the adapter's skip connection
        return out, AdapterCache(c_base, c_down, c_gelu, c_up)

    def backward(self, dout, cache, need_dx: bool = True):
        """dout (..., d) -> dx (..., d_in) or None; adds into the trainable parameters' grads.

        forward: out = y + up(g)   -> dy = dout + d(up(g))/dy,  g = gelu(h),  h = down(y)
        dg = dout @ W_up;  dh = gelu'(h) * dg;  dy = dout + dh @ W_down;  dx = dy @ W0
        """
        dg = self.adapter_up.backward(dout, cache.up)  # (..., m)
        dh = ops_fast.gelu_backward_fast(dg, cache.gelu)
        dy = self.adapter_down.backward(dh, cache.down)  # (..., d)
        dy += dout  # skip connection
        dx, dw, db = ops.linear_backward(dy, cache.base, need_dx=need_dx,
                                         need_dw=self.needs_grad("weight"),
                                         need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        return dx


def adapter_layers(model: Module) -> dict:
    """``{module name: HoulsbyAdapter}`` for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HoulsbyAdapter)}


def adapter_trainable(config: AdapterConfig):
    """name -> bool: the adapters' own parameters (and the LayerNorms with ``train_layernorm``)."""
    def pred(name):
        parts = name.split(".")
        return (any(p.startswith("adapter_") for p in parts)
                or (config.train_layernorm and any(p in ("ln_1", "ln_2", "ln_f") for p in parts)))
    return pred


def inject_adapters(model: Module, config: AdapterConfig) -> dict:
    """Wrap ``attn.o`` and/or ``mlp.down`` of every block in a :class:`HoulsbyAdapter`, in place,
    and freeze everything else (LayerNorms train too with ``config.train_layernorm``).

    Weights are drawn from one CPU generator seeded with ``config.seed``, in block order.
    Returns ``{"trainable", "total", "percent", "targets"}`` like :func:`minilora.lora.inject_lora`.
    Raises :class:`PeftError` if the model already has adapters or has no such layers.

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise PeftError("the model already has Houlsby adapters; inject once per model")
    modules = dict(model.named_modules())
    targets = [n for n, m in modules.items()
               if n.startswith("blocks.") and n.rsplit(".", 1)[-1] in config.targets]
    if not targets:
        raise PeftError(f"no module named {list(config.targets)} inside blocks.* of this model")
    for name in targets:
        if not isinstance(modules[name], Linear):
            raise PeftError(f"module {name!r} is a {type(modules[name]).__name__}, not a plain "
                            "Linear (another method already wraps it?); adapters wrap Linears")
        d = modules[name].params["weight"].shape[0]
        if config.bottleneck > d:
            raise ConfigError(f"bottleneck={config.bottleneck} exceeds the output width {d} of "
                              f"{name!r}: use bottleneck <= {d}")
    rng = backend.cpu_rng(config.seed)
    for name in targets:
        parent, _, child = name.rpartition(".")
        modules[parent].replace(child, HoulsbyAdapter(modules[name], config.bottleneck,
                                                      config.init_std, config.zero_up, rng))
    model.set_trainable(adapter_trainable(config))
    return model.trainable_report(targets)
