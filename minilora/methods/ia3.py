"""(IA)³: learned vectors that rescale the keys, the values and the MLP's inner activation.

(IA)³ ("Infused Adapter by Inhibiting and Amplifying Inner Activations", Liu et al. 2022, the
T-Few paper) trains one vector per adapted layer and multiplies it in elementwise::

    k   = l_k ⊙ (x @ W_k.T + b_k)               l_k (C,)    the keys
    v   = l_v ⊙ (x @ W_v.T + b_v)               l_v (C,)    the values
    out = (l_ff ⊙ gelu(up(x))) @ W_down.T + b   l_ff (4C,)  the MLP's inner activation

so a layer gets d_out numbers (d_in for the feed-forward one): 2 C + 4 C = 6 C per block, 0.05 %
of the shipped model. At ``l = 1`` every layer is exactly the base (the default start).

Layouts follow Hugging Face PEFT (``tuners/ia3/layer.py``) so the files load there: the vector is
``ia3_l``, shaped (d_out, 1) for a layer whose *output* is scaled and (1, d_in) for a
"feed-forward" layer whose *input* is scaled; an output-scaled layer scales its bias too. PEFT's
default for LLaMA names is exactly ours: targets k_proj, v_proj, down_proj, feed-forward
down_proj.

Backward (y = x @ W0.T + b the base output, g = dout)::

    output-scaled:  dl = Σ_batch g ⊙ y         dx = (g ⊙ l) @ W0
    input-scaled:   dl = Σ_batch (g @ W0) ⊙ x   dx = (g @ W0) ⊙ l

Merge folds the vector into the weight: rows of W0 (and b) times l for output scaling, columns of
W0 times l for input scaling; unmerge divides again (refused if some l is 0).

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from minilora import backend
from minilora.backend import xp
from minilora.methods.lora.config import LORA_TARGET_ALIASES
from minilora.config import ConfigError, JsonConfig, option
from minilora.errors import PeftError
from minilora.io import (
    check_same_base,
    config_from_meta,
    read_typed,
    write_typed,
)

from minilora.nn import ops
from minilora.nn.layers import Linear, Module
from minilora.nn.modules_to_save import (
    check_saved_modules,
    load_saved_modules,
    modules_to_save_state_dict,
    saved_modules_tensors,
    split_saved_modules,
)
from minilora.peft_format import (
    KEY_PREFIX,
    PEFT_TARGET_NAMES,
    PeftFormatError,
    from_peft_module,
    peft_config,
    peft_key,
    read_peft_dir,
    saved_modules_peft_tensors,
    take_saved_modules,
    write_peft_dir,
)
from minilora.methods.base import Method, Tuned, target_linears, unwrap_linears

IA3_TARGETS = ("q", "k", "v", "o", "up", "down")
IA3_FORMAT = "minilora-ia3-v1"


def _names(value, what: str) -> tuple:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"{what} must be a list of layer names, got {value!r}")
    out = []
    for t in value:
        t = LORA_TARGET_ALIASES.get(t, t)
        if t not in IA3_TARGETS:
            raise ConfigError(f"unknown {what} entry {t!r}; allowed: {', '.join(IA3_TARGETS)} "
                              "(or their PEFT names q_proj ... down_proj)")
        if t not in out:
            out.append(t)
    return tuple(out)


@dataclass(frozen=True)
class IA3Config(JsonConfig):
    """Which Linears get an (IA)³ vector, and which of them scale their input.

    Attributes:
        target_modules: layer names (last name component) to rescale; default k, v, down
            (the paper's keys, values and feed-forward activation; PEFT's LLaMA default).
        feedforward_modules: the targets whose *input* is scaled (default down: its input is the
            MLP's inner GELU activation); the others scale their output. Must be targets.
        init_ia3_weights: start every vector at 1 (the identity, PEFT's default); False draws
            1 + N(0, 0.1^2) (tests only).
        seed: for ``init_ia3_weights=False``.
    """

    target_modules: tuple = option(("k", "v", "down"), "comma-separated layers to rescale: "
                                   "q,k,v,o,up,down", flag="targets")
    feedforward_modules: tuple = option(("down",), "targets whose input is scaled (the others "
                                        "scale their output)")
    init_ia3_weights: bool = option(True, "start at 1 (identity)", cli=False)
    seed: int = option(0, "seed of a random start", cli=False)

    def __post_init__(self):
        targets = _names(self.target_modules, "target_modules")
        if not targets:
            raise ConfigError("target_modules must name at least one layer")
        ff = _names(self.feedforward_modules, "feedforward_modules")
        if not set(ff) <= set(targets):
            raise ConfigError(f"feedforward_modules {list(ff)} must be among target_modules "
                              f"{list(targets)} (PEFT's rule)")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "feedforward_modules", ff)
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be true or false, got "
                              f"{self.init_ia3_weights!r}")


class IA3Linear(Module):
    """A frozen :class:`~minilora.nn.layers.Linear` whose output (or input) is rescaled by a
    trainable vector ``ia3_l``: (d_out, 1) output scaling, (1, d_in) input scaling (PEFT's
    shapes). Adopts the base's ``weight`` and ``bias`` arrays. See the module docstring.

    Chapter: chapters/04-lora-notes.ipynb
    """

    def __init__(self, base: Linear, feedforward: bool, l0=None):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"IA3Linear wraps a minilora Linear, got {type(base).__name__}")
        w = base.params["weight"]
        self.params["weight"] = w
        if "bias" in base.params:
            self.params["bias"] = base.params["bias"]
        self.feedforward = bool(feedforward)
        shape = (1, w.shape[1]) if self.feedforward else (w.shape[0], 1)
        self.params["ia3_l"] = (xp.ones(shape, dtype=w.dtype) if l0 is None
                                else backend.asarray(l0, dtype=w.dtype).reshape(shape))
        self.trainable = {"ia3_l"}
        self.merged = False

    def forward(self, x):
        """x (..., d_in) -> out (..., d_out), cache."""
        l = self.params["ia3_l"].reshape(-1)
        if self.merged:
            return ops.linear_forward(x, self.params["weight"], self.params.get("bias"),
                                      keep_x=self.needs_grad("weight"))
        if self.feedforward:
            out, c = ops.linear_forward(x * l, self.params["weight"], self.params.get("bias"),
                                        keep_x=self.needs_grad("weight"))
            return out, (c, x)
        y, c = ops.linear_forward(x, self.params["weight"], self.params.get("bias"),
                                  keep_x=self.needs_grad("weight"))
        return y * l, (c, y)

    def backward(self, dout, cache, need_dx: bool = True):
        """dout (..., d_out) -> dx (..., d_in) or None; accumulates d ia3_l (formulas above)."""
        if self.merged:
            if self.needs_grad("ia3_l"):
                raise PeftError("this (IA)³ layer is merged, so ia3_l gets no gradient; unmerge "
                                "before training")
            dx, dw, db = ops.linear_backward(dout, cache, need_dx=need_dx,
                                             need_dw=self.needs_grad("weight"),
                                             need_db=self.needs_grad("bias"))
            self._accumulate("weight", dw)
            self._accumulate("bias", db)
            return dx
        c, saved = cache
        l = self.params["ia3_l"].reshape(-1)
        axes = tuple(range(dout.ndim - 1))
        if self.feedforward:
            need_l = self.needs_grad("ia3_l")
            dxs, dw, db = ops.linear_backward(dout, c, need_dx=need_dx or need_l,
                                              need_dw=self.needs_grad("weight"),
                                              need_db=self.needs_grad("bias"))
            self._accumulate("weight", dw)
            self._accumulate("bias", db)
            if need_l:
                self._accumulate("ia3_l", xp.sum(dxs * saved, axis=axes).reshape(1, -1))
            return dxs * l if need_dx else None
        if self.needs_grad("ia3_l"):
            self._accumulate("ia3_l", xp.sum(dout * saved, axis=axes).reshape(-1, 1))
        dx, dw, db = ops.linear_backward(dout * l, c, need_dx=need_dx,
                                         need_dw=self.needs_grad("weight"),
                                         need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        return dx

    def merge(self) -> None:
        """Fold ia3_l into W0 (rows and bias for output scaling, columns for input scaling)."""
        if self.merged:
            raise PeftError("this (IA)³ layer is already merged; unmerge() first")
        l = self.params["ia3_l"]
        self.params["weight"] *= l  # (d_out, 1) scales rows, (1, d_in) scales columns
        if not self.feedforward and "bias" in self.params:
            self.params["bias"] *= l.reshape(-1)
        self.merged = True

    def unmerge(self) -> None:
        """Divide the vector out again (exact up to rounding); refused if some entry is 0."""
        if not self.merged:
            warnings.warn("unmerge(): this (IA)³ layer is not merged; nothing to do", UserWarning,
                          stacklevel=2)
            return
        l = self.params["ia3_l"]
        if not bool((l != 0).all()):
            raise PeftError("cannot unmerge: an ia3_l entry is 0, so the base weight it scaled "
                            "is lost; reload the base model")
        self.params["weight"] /= l
        if not self.feedforward and "bias" in self.params:
            self.params["bias"] /= l.reshape(-1)
        self.merged = False


def ia3_layers(model: Module) -> dict:
    """``{module name: IA3Linear}`` in tree order.

    Chapter: chapters/04-lora-notes.ipynb
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def inject_ia3(model: Module, config: IA3Config) -> dict:
    """Wrap every targeted Linear of ``model`` in an :class:`IA3Linear`, freeze everything else;
    returns ``{"trainable", "total", "percent", "targets"}``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, IA3Config):
        raise TypeError(f"config must be an IA3Config, got {type(config).__name__}")
    if ia3_layers(model):
        raise PeftError("the model already has (IA)³ layers; inject once per model")
    modules = dict(model.named_modules())
    targets = target_linears(modules, config.target_modules)
    rng = backend.cpu_rng(config.seed)
    for name in targets:
        old = modules[name]
        ff = name.rsplit(".", 1)[-1] in config.feedforward_modules
        n = old.params["weight"].shape[1 if ff else 0]
        l0 = None if config.init_ia3_weights else 1.0 + 0.1 * rng.standard_normal(n)
        parent, _, child = name.rpartition(".")
        modules[parent].replace(child, IA3Linear(old, ff, l0))
    model.set_trainable(lambda p: p.rsplit(".", 1)[-1] == "ia3_l")
    return model.trainable_report(targets)


def merge_ia3(model: Module) -> list:
    """Merge every (IA)³ layer; returns their names.

    Chapter: chapters/04-lora-notes.ipynb
    """
    layers = ia3_layers(model)
    for m in layers.values():
        m.merge()
    return list(layers)


def unmerge_ia3(model: Module) -> list:
    """Unmerge every merged (IA)³ layer; returns their names.

    Chapter: chapters/04-lora-notes.ipynb
    """
    names = [n for n, m in ia3_layers(model).items() if m.merged]
    for n in names:
        ia3_layers(model)[n].unmerge()
    return names


def count_ia3_parameters(config: IA3Config, model_config) -> int:
    """Closed form: per block C for each of q, k, v, o, down (output-scaled; 4C for up) or,
    input-scaled, C (q, k, v, o, up) / 4C (down). Default k, v, down-input: L (C + C + 4C).

    Chapter: chapters/04-lora-notes.ipynb
    """
    C, L = model_config.n_embd, model_config.n_layer
    d_in = {"q": C, "k": C, "v": C, "o": C, "up": C, "down": 4 * C}
    d_out = {"q": C, "k": C, "v": C, "o": C, "up": 4 * C, "down": C}
    return L * sum(d_in[t] if t in config.feedforward_modules else d_out[t]
                   for t in config.target_modules)


# ----------------------------------------------------------------------------------------------
# files: ours (typed safetensors) and PEFT's (adapter_model.safetensors + adapter_config.json)
# ----------------------------------------------------------------------------------------------
def ia3_state_dict(model: Module) -> dict:
    """``{name: ia3_l}`` of every (IA)³ layer."""
    return {f"{n}.ia3_l": m.params["ia3_l"] for n, m in ia3_layers(model).items()}


def _check_unmerged(model, what):
    if any(m.merged for m in ia3_layers(model).values()):
        raise PeftError(f"{what}: (IA)³ layers are merged; unmerge_ia3(model) first")


def save_ia3(path, model: Module, config: IA3Config, modules_to_save=()) -> None:
    """Write the vectors with the config and the base's shape; atomic. ``modules_to_save``:
    module paths trained whole beside the vectors, stored in the same file
    (:mod:`minilora.nn.modules_to_save`).

    Chapter: chapters/04-lora-notes.ipynb
    """
    _check_unmerged(model, "save_ia3")
    arrays = ia3_state_dict(model)
    if not arrays:
        raise PeftError("save_ia3: the model has no (IA)³ layers")
    meta = {"ia3_config": config.to_dict(), "model_config": model.config.to_dict(),
            "modules_to_save": list(modules_to_save)}
    write_typed(path, IA3_FORMAT, {**arrays, **saved_modules_tensors(model, modules_to_save)},
                meta)


def load_ia3(path, model: Module) -> IA3Config:
    """Inject a file from :func:`save_ia3` into a fresh base GPT; returns its config. Saved
    whole modules (``modules_to_save``) are copied in after the vectors and stay trainable.

    Chapter: chapters/04-lora-notes.ipynb
    """
    arrays, meta = read_typed(path, IA3_FORMAT, "(IA)³ file")
    config = config_from_meta(path, meta, "ia3_config", IA3Config, "(IA)³ file")
    check_same_base(path, meta.get("model_config"), model.config, error=PeftError)
    arrays, saved, paths = split_saved_modules(arrays)
    inject_ia3(model, config)
    check_saved_modules(model, paths, saved, str(path))
    _load_arrays(model, arrays, str(path))
    if paths:
        load_saved_modules(model, paths, saved, str(path))
    return config


def _load_arrays(model, arrays, where):
    slots = {n: (m, k) for n, m, k in model._slots()}
    for n, a in arrays.items():
        if (not n.endswith(".ia3_l") or n not in slots
                or tuple(a.shape) != tuple(slots[n][0].params[slots[n][1]].shape)):
            raise PeftError(f"{where}: tensor {n!r} {tuple(a.shape)} matches no (IA)³ vector of "
                            "this model (another base or other targets?)")
    for n, a in arrays.items():
        m, k = slots[n]
        m.params[k] = backend.asarray(backend.to_numpy(a), dtype=m.params[k].dtype)


def export_ia3_peft(path_dir, model: Module, config: IA3Config, modules_to_save=()) -> Path:
    """Write PEFT's IA3 adapter directory: keys ``base_model.model.<path>.ia3_l`` (no
    ``.weight``) and a config with ``peft_type "IA3"``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    _check_unmerged(model, "export_ia3_peft")
    tensors = {peft_key(n.rpartition('.')[0], "ia3_l"): backend.to_numpy(a)
               for n, a in ia3_state_dict(model).items()}
    tensors.update(saved_modules_peft_tensors(
        {n: backend.to_numpy(a) for n, a in modules_to_save_state_dict(model, modules_to_save).items()}))
    config_d = peft_config("IA3", {
        "feedforward_modules": [PEFT_TARGET_NAMES[t] for t in config.feedforward_modules],
        "init_ia3_weights": config.init_ia3_weights}, config.target_modules, modules_to_save)
    try:
        return write_peft_dir(path_dir, tensors, config_d)
    except PeftFormatError as e:
        raise PeftError(f"export_ia3_peft: {e}") from None


def import_ia3_peft(path_dir, model: Module, return_modules: bool = False):
    """Load PEFT's IA3 adapter directory into a fresh base GPT; returns the config (with
    ``return_modules``: ``(config, the module paths saved whole)``).

    Chapter: chapters/04-lora-notes.ipynb
    """
    d, raw, _, cfg_path, w_path = read_peft_dir(path_dir, ("IA3",), PeftError)
    if d.get("fan_in_fan_out"):
        raise PeftError(f"{str(cfg_path)!r}: fan_in_fan_out is not supported for (IA)³ files")
    raw, saved, paths = take_saved_modules(raw, d, str(cfg_path), PeftError)
    config = IA3Config(target_modules=tuple(d.get("target_modules") or ()),
                       feedforward_modules=tuple(d.get("feedforward_modules") or ()))
    arrays = {}
    for key, a in raw.items():
        if not (key.startswith(KEY_PREFIX) and key.endswith(".ia3_l")):
            raise PeftError(f"{str(w_path)!r}: key {key!r} is not an (IA)³ vector")
        module = from_peft_module(key[len(KEY_PREFIX):-len(".ia3_l")])
        arrays[module + ".ia3_l"] = a
    inject_ia3(model, config)
    missing = sorted(set(ia3_state_dict(model)) - set(arrays))
    if missing:
        raise PeftError(f"{str(w_path)!r} lacks (IA)³ vectors {missing[:4]}")
    check_saved_modules(model, paths, saved, str(w_path))
    _load_arrays(model, arrays, str(w_path))
    if paths:
        load_saved_modules(model, paths, saved, str(w_path))
    return (config, paths) if return_modules else config


class IA3Method(Method):
    """(IA)³: vectors rescaling keys, values and the MLP's inner activation."""

    name = "ia3"
    example = ""
    config_cls = IA3Config
    summary = "(IA)3: trained vectors rescaling keys, values and the MLP's inner activation"
    weights_file = "ia3.safetensors"
    file_format = IA3_FORMAT
    peft_type = "IA3"
    lr = (1e-2, 1e-3)   # like BitFit (no sweep)

    def _apply(self, model, config) -> Tuned:
        return Tuned(model, config, self, report=inject_ia3(model, config))

    def count_parameters(self, config, model_config) -> int:
        return count_ia3_parameters(config, model_config)

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        save_ia3(path, tuned.model, tuned.config, tuned.modules_to_save)

    def load(self, path, model) -> Tuned:
        arrays, _ = read_typed(path, IA3_FORMAT, "(IA)³ file")
        _, _, paths = split_saved_modules(arrays)
        return Tuned(model, load_ia3(path, model), self, tuple(paths))

    def export_peft(self, path_dir, tuned: Tuned, base_model_name_or_path=None):
        return export_ia3_peft(path_dir, tuned.model, tuned.config, tuned.modules_to_save)

    def import_peft(self, path_dir, model) -> Tuned:
        config, paths = import_ia3_peft(path_dir, model, return_modules=True)
        return Tuned(model, config, self, tuple(paths))

    def merge(self, tuned: Tuned):
        layers = ia3_layers(tuned.model)
        merge_ia3(tuned.model)
        return unwrap_linears(tuned.model, layers)


IA3 = IA3Method()

__all__ = ["IA3", "IA3Config", "IA3Linear", "IA3Method", "IA3_FORMAT", "IA3_TARGETS",
           "count_ia3_parameters", "export_ia3_peft", "ia3_layers", "ia3_state_dict",
           "import_ia3_peft", "inject_ia3", "load_ia3", "merge_ia3", "save_ia3", "unmerge_ia3"]
