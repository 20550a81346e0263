"""Houlsby bottleneck adapters: h -> h + up(gelu(down(h))) after attn.o and mlp.down.

Each adapter adds 2md + d + m numbers (m = bottleneck); the up-projection starts at zero, so step 0
is the base model exactly. :class:`HoulsbyLinear` wraps the block's Linear (it adopts the base's
``weight`` / ``bias`` arrays under the same names, so a base checkpoint still loads by name) and
adds two child Linears ``houlsby_down`` / ``houlsby_up``; the model stays a GPT.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from minilora import backend
from minilora.backend import xp
from minilora.config import ConfigError, JsonConfig, check_float, check_int, option
from minilora.errors import PeftError
from minilora.nn import ops, ops_fast
from minilora.nn.layers import Linear, Module
from minilora.methods.base import truncated_normal
from minilora.methods.base import (
    METHOD_FILE_FORMAT,
    Method,
    Tuned,
    copy_in,
    read_tensors_file,
    save_tensors_file,
)

HOULSBY_TARGETS = ("o", "down")  # Houlsby: after the attention output projection and the MLP

@dataclass(frozen=True)
class HoulsbyConfig(JsonConfig):
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

    bottleneck: int = option(16, "Houlsby bottleneck width m", range=(1, None))
    targets: tuple = option(HOULSBY_TARGETS, "after which Linears: o and/or down")
    init_std: float = option(1e-2, "std of the truncated normal init", range=(0, None, True, False))
    zero_up: bool = option(True, "the up projection starts at zero (identity at step 0)")
    train_layernorm: bool = option(False, "train the LayerNorms too (Houlsby et al. do)")
    seed: int = option(0, "seed of the initial weights", cli=False)

    def __post_init__(self):
        check_int("bottleneck", self.bottleneck)
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if (not isinstance(targets, (tuple, list)) or not targets
                or any(t not in HOULSBY_TARGETS for t in targets)):
            raise ConfigError(f"adapter targets must be a non-empty subset of "
                              f"{list(HOULSBY_TARGETS)}; got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        check_float("init_std", self.init_std, lo=0.0, lo_open=True)
        for name in ("zero_up", "train_layernorm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_int("seed", self.seed, lo=0)

class HoulsbyCache(NamedTuple):
    """What :meth:`HoulsbyLinear.backward` needs from the forward pass."""
    base: tuple  # the wrapped linear's cache
    down: tuple  # houlsby_down's
    gelu: tuple
    up: tuple  # houlsby_up's


class HoulsbyLinear(Module):
    """A frozen :class:`~minilora.nn.layers.Linear` followed by a bottleneck adapter.

    y   = x @ W0.T + b                      (..., d)    the wrapped sub-layer output
    h   = y @ W_down.T + b_down             (..., m)
    out = y + gelu(h) @ W_up.T + b_up       (..., d)    the adapter's internal skip connection

    It wraps rather than subclasses: it adopts the base's ``weight`` and ``bias`` arrays under the
    same names and adds the children ``houlsby_down`` (Linear (m, d)) and ``houlsby_up`` (Linear
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
            raise TypeError(f"HoulsbyLinear wraps a minilora Linear, got {type(base).__name__}")
        check_int("bottleneck", bottleneck)
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
        w_down = backend.asarray(truncated_normal(rng, (bottleneck, d), init_std), dtype=dt)
        w_up = (xp.zeros((d, bottleneck), dtype=dt) if zero_up else
                backend.asarray(truncated_normal(rng, (d, bottleneck), init_std), dtype=dt))
        self.houlsby_down = self.add("houlsby_down",
                                     Linear(w_down, xp.zeros((bottleneck,), dtype=dt)))
        self.houlsby_up = self.add("houlsby_up", Linear(w_up, xp.zeros((d,), dtype=dt)))
        self.bottleneck = bottleneck
        self.trainable = set()  # the wrapped W0, b are frozen; the children train

    def forward(self, x):
        """x (..., d_in) -> out (..., d), cache (:class:`HoulsbyCache`)."""
        y, c_base = ops.linear_forward(x, self.params["weight"], self.params.get("bias"),
                                       keep_x=self.needs_grad("weight"))
        h, c_down = self.houlsby_down.forward(y)  # (..., m)
        g, c_gelu = ops_fast.gelu_forward_fast(h)
        out, c_up = self.houlsby_up.forward(g)  # (..., d), a fresh array
        out += y  # the adapter's skip connection
        return out, HoulsbyCache(c_base, c_down, c_gelu, c_up)

    def backward(self, dout, cache, need_dx: bool = True):
        """dout (..., d) -> dx (..., d_in) or None; adds into the trainable parameters' grads.

        forward: out = y + up(g)   -> dy = dout + d(up(g))/dy,  g = gelu(h),  h = down(y)
        dg = dout @ W_up;  dh = gelu'(h) * dg;  dy = dout + dh @ W_down;  dx = dy @ W0
        """
        dg = self.houlsby_up.backward(dout, cache.up)  # (..., m)
        dh = ops_fast.gelu_backward_fast(dg, cache.gelu)
        dy = self.houlsby_down.backward(dh, cache.down)  # (..., d)
        dy += dout  # skip connection
        dx, dw, db = ops.linear_backward(dy, cache.base, need_dx=need_dx,
                                         need_dw=self.needs_grad("weight"),
                                         need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        return dx


def houlsby_layers(model: Module) -> dict:
    """``{module name: HoulsbyLinear}`` for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HoulsbyLinear)}


def houlsby_trainable(config: HoulsbyConfig):
    """name -> bool: the adapters' own parameters (and the LayerNorms with ``train_layernorm``)."""
    def pred(name):
        parts = name.split(".")
        return (any(p.startswith("houlsby_") for p in parts)
                or (config.train_layernorm and any(p in ("ln_1", "ln_2", "ln_f") for p in parts)))
    return pred


def inject_houlsby(model: Module, config: HoulsbyConfig) -> dict:
    """Wrap ``attn.o`` and/or ``mlp.down`` of every block in a :class:`HoulsbyLinear`, in place,
    and freeze everything else (LayerNorms train too with ``config.train_layernorm``).

    Weights are drawn from one CPU generator seeded with ``config.seed``, in block order.
    Returns ``{"trainable", "total", "percent", "targets"}`` like :func:`minilora.methods.lora.inject_lora`.
    Raises :class:`PeftError` if the model already has adapters or has no such layers.

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, HoulsbyConfig):
        raise TypeError(f"config must be an HoulsbyConfig, got {type(config).__name__}")
    if houlsby_layers(model):
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
        modules[parent].replace(child, HoulsbyLinear(modules[name], config.bottleneck,
                                                      config.init_std, config.zero_up, rng))
    model.set_trainable(houlsby_trainable(config))
    return model.trainable_report(targets)


def count_houlsby_parameters(config: HoulsbyConfig, model_config) -> int:
    """Closed form: L len(targets) (2 m C + C + m) (Houlsby: 2md + d + m per adapter), plus
    L 2 (2C) + 2C with ``train_layernorm`` (gain and bias of ln_1, ln_2 per block, and ln_f).

    Chapter: chapters/04-lora-notes.ipynb
    """
    L, C, m = model_config.n_layer, model_config.n_embd, config.bottleneck
    n = L * len(config.targets) * (2 * m * C + C + m)
    return n + (L * 2 * 2 * C + 2 * C if config.train_layernorm else 0)


#: Houlsby's parameter names before the method was named "houlsby" (old files are renamed on load)
_OLD_NAMES = (".adapter_down.", ".houlsby_down."), (".adapter_up.", ".houlsby_up.")


class HoulsbyMethod(Method):
    """Houlsby bottleneck adapters after attn.o and mlp.down (:class:`HoulsbyLinear`)."""

    name = "houlsby"
    example = "--bottleneck 16"
    config_cls = HoulsbyConfig
    summary = "Houlsby adapters: bottleneck MLPs h + up(gelu(down(h))) after attn.o, mlp.down"
    weights_file = "houlsby.safetensors"
    file_format = METHOD_FILE_FORMAT
    lr = (5e-3, 5e-4)
    #: the name in this format's header of files written before the rename
    file_names = ("houlsby", "adapter")

    def _apply(self, model, config) -> Tuned:
        return Tuned(model, config, self, report=inject_houlsby(model, config))

    def count_parameters(self, config, model_config) -> int:
        return count_houlsby_parameters(config, model_config)

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        save_tensors_file(path, self.file_format, tuned, self.trainable(tuned),
                          {"method": self.name, "config": tuned.config.to_dict()})

    def load(self, path, model) -> Tuned:
        config, arrays, saved, paths = read_tensors_file(
            path, self.file_format, "Houlsby file", model, "config", self.config_cls)
        for old, new in _OLD_NAMES:
            arrays = {k.replace(old, new): a for k, a in arrays.items()}
        tuned = self.apply(model, config)
        copy_in(tuned.model, arrays, self.trainable(tuned), str(path), saved, paths)
        return tuned._replace(modules_to_save=tuple(paths))


HOULSBY = HoulsbyMethod()
