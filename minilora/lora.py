"""LoRA: a frozen weight plus a trainable low-rank update, with hand-written backward passes.

For a linear layer with frozen weight W0 (d_out, d_in)::

    out     = x @ W0.T + b + scaling * (dropout(x) @ A.T) @ B.T      # (..., d_out)
    delta_w = scaling * B @ A                                         # ΔW, (d_out, d_in)
    A (r, d_in), B (d_out, r), scaling = lora_alpha / r   (or lora_alpha / sqrt(r): rsLoRA)

Only A and B are trained: r (d_in + d_out) numbers instead of d_in d_out. The wrappers
(:class:`LoRALinear`, :class:`LoRAEmbedding`) *wrap* a base layer rather than subclass it (STYLE
§2.3 item 4): they adopt the base's arrays under the same names (``weight``, ``bias``), so a base
checkpoint still loads by name, and add ``lora_A`` / ``lora_B``. Trainable = the ``lora_`` prefix
(loralib's rule), so a frozen base weight gets no gradient buffer and no dW matmul.

Model-level helpers::

    report = inject_lora(model, LoraConfig(r=4, target_modules=("q", "v")))
    ...train...                                     # only lora_A / lora_B receive gradients
    save_adapter("adapter.safetensors", model, config)     # kilobytes: the factors only
    merge_lora(model)                               # W0 += ΔW: inference at the base's cost

Names: ΔW is ``delta_w`` in code, never ``dW`` (that would read as a gradient).

Chapter: chapters/02-lora-notes.ipynb
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

from minilora import backend
from minilora.backend import xp
from minilora.config import (LORA_INITS, LORA_TARGETS, ConfigError, LoraConfig, _check_float,
                             _check_int)
from minilora.nn import ops
from minilora.nn.layers import Embedding, Linear, Module
from minilora.errors import MiniloraError

ADAPTER_FORMAT = "minilora-adapter-v1"


class LoRAError(MiniloraError, ValueError):
    """A LoRA operation cannot be done as asked (merge state, shapes, non-finite values)."""


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023).

    Chapter: chapters/02-lora-notes.ipynb
    """
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def _check_rank(r, d_in: int, d_out: int, what: str) -> None:
    _check_int("r", r)
    if r > min(d_in, d_out):
        raise ConfigError(f"r={r} is larger than min(d_in, d_out) = min({d_in}, {d_out}) of "
                          f"{what}: B A cannot have rank above {min(d_in, d_out)}, so the extra "
                          "columns only cost memory. Use r <= "
                          f"{min(d_in, d_out)} or leave this layer out of target_modules")


def _check_init(init) -> None:
    if not (isinstance(init, bool) or (isinstance(init, str) and init in LORA_INITS)):
        raise ConfigError(f"init_lora_weights must be one of "
                          f"{', '.join(repr(v) for v in LORA_INITS)}; got {init!r}")


def _pissa_factors(w, r: int, scaling: float):
    """PiSSA factors of a (d_out, d_in) matrix, computed on the CPU in float64.

    W = U S Vh;  A = sqrt(S_r / scaling) Vh_r (r, d_in);  B = U_r sqrt(S_r / scaling) (d_out, r);
    residual = W - scaling B A = U[:, r:] S[r:] Vh[r:]. Dividing S_r by ``scaling`` (as PEFT does)
    makes ``scaling B A`` the top-r part of W for any lora_alpha. Returns NumPy float64 arrays
    (A, B, residual); the residual does not depend on the signs the SVD picks.
    """
    np_ = backend.cpu_module()
    w = np_.asarray(backend.to_numpy(w), dtype=np_.float64)
    U, S, Vh = np_.linalg.svd(w, full_matrices=False)
    root = np_.sqrt(S[:r] / scaling)  # (r,)
    A = root[:, None] * Vh[:r]  # (r, d_in)
    B = U[:, :r] * root[None, :]  # (d_out, r)
    return A, B, w - scaling * (B @ A)


def _finite(a) -> bool:
    return bool(xp.isfinite(a).all())


class _LoRABase(Module):
    """What both wrappers share: scaling, merge/unmerge, delta_weight, merged-state guards."""

    kind = "?"

    def _setup(self, r, lora_alpha, use_rslora):
        _check_float("lora_alpha", lora_alpha, lo=0.0, lo_open=True)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.merged = False
        self.trainable = {"lora_A", "lora_B"}  # the base is frozen: no dW buffer, no dW matmul

    def delta_weight(self):
        """ΔW in the layout of the base weight (see the subclass); a new array."""
        raise NotImplementedError

    def merge(self, safe_merge: bool = False) -> None:
        """Fold the update into the base weight: ``W0 += ΔW``; forward then skips the adapter.

        Args:
            safe_merge: compute ``W0 + ΔW`` first and raise :class:`LoRAError`, leaving W0
                untouched, if it holds NaN or inf (e.g. an adapter that diverged).
        Raises:
            LoRAError: if already merged (merging twice would add ΔW twice).
        """
        if self.merged:
            raise LoRAError(f"this {self.kind} adapter is already merged into its base weight; "
                            "merging again would add ΔW twice. Call unmerge() first")
        w = self.params["weight"]
        merged_w = w + self.delta_weight()
        if safe_merge and not _finite(merged_w):
            raise LoRAError(f"refusing to merge: W0 + ΔW holds NaN or inf (lora_A finite: "
                            f"{_finite(self.params['lora_A'])}, lora_B finite: "
                            f"{_finite(self.params['lora_B'])}); the base weight is unchanged")
        w[...] = merged_w  # in place: the same array object stays in params
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W0 -= ΔW``. Warns (as PEFT does) and does nothing if not merged.

        Exact up to float rounding: one merge/unmerge round trip moves W0 by about one ulp.
        """
        if not self.merged:
            warnings.warn(f"unmerge(): this {self.kind} adapter is not merged; nothing to do",
                          UserWarning, stacklevel=2)
            return
        self.params["weight"] -= self.delta_weight()
        self.merged = False

    def _check_backward(self, ran_adapter: bool) -> None:
        if not ran_adapter and (self.needs_grad("lora_A") or self.needs_grad("lora_B")):
            raise LoRAError(f"this {self.kind} adapter was merged during the forward pass, so the "
                            "adapter path did not run and lora_A / lora_B get no gradient. Merged "
                            "weights are for inference: unmerge() before training")


# ----------------------------------------------------------------------------------------------
# LoRALinear
# ----------------------------------------------------------------------------------------------
class LoRALinearCache(NamedTuple):
    base: tuple  # _base_forward cache: (x (..., d_in) or None, W0, has_bias); 4-bit: (Q, has_bias)
    drop: object  # dropout mask (..., d_in) scaled by 1/(1-p), or None (no dropout)
    a: object  # linear_forward cache of h = x_drop @ A.T: (x_drop (..., d_in), A, False); None if merged
    b: object  # linear_forward cache of u = h @ B.T: (h (..., r), B, False); None if merged


class LoRALinear(_LoRABase):
    """A :class:`~minilora.nn.layers.Linear` plus a low-rank update.

    out = x @ W0.T + b + scaling * (dropout(x) @ A.T) @ B.T              (..., d_out)

    Parameters (``params``): ``weight`` W0 (d_out, d_in) and ``bias`` (d_out,) taken from the
    base layer (the same arrays, not copies), ``lora_A`` (r, d_in), ``lora_B`` (d_out, r).
    ``trainable`` starts as {lora_A, lora_B}. The dropout mask is drawn on the CPU from
    ``dropout_rng`` (a NumPy Generator) only when ``lora_dropout > 0`` and ``training`` is True.

    Args:
        base: the Linear to wrap; its arrays are adopted, the object itself is not used again.
        r: rank, 1 <= r <= min(d_in, d_out).
        lora_alpha: scaling numerator.
        lora_dropout: dropout probability on the adapter's input, in [0, 1).
        use_rslora: scaling = lora_alpha / sqrt(r).
        init_lora_weights: True | False | "gaussian" | "swap" | "pissa" (see
            :class:`minilora.config.LoraConfig`); "pissa" replaces W0 by its residual.
        rng: int seed or NumPy Generator for the factors' initial values (drawn on the CPU).
        dropout_rng: int seed or Generator for the dropout masks (default: drawn from ``rng``).

    Chapter: chapters/02-lora-notes.ipynb
    """

    kind = "LoRALinear"

    def __init__(self, base: Linear, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, rng=0, dropout_rng=None):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps a minilora Linear, got {type(base).__name__}")
        w = base.params["weight"]
        d_out, d_in = w.shape
        _check_rank(r, d_in, d_out, f"a Linear of shape (d_out, d_in) = ({d_out}, {d_in})")
        _check_init(init_lora_weights)
        _check_float("lora_dropout", lora_dropout, lo=0.0)
        if lora_dropout >= 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self._setup(r, lora_alpha, use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.training = True
        rng = backend.cpu_rng(rng)
        self.params["weight"] = w
        if "bias" in base.params:
            self.params["bias"] = base.params["bias"]
        A, B = self._init_factors(rng, init_lora_weights, d_in, d_out)
        self.params["lora_A"] = backend.asarray(A, dtype=w.dtype)
        self.params["lora_B"] = backend.asarray(B, dtype=w.dtype)
        self.dropout_rng = backend.cpu_rng(int(rng.integers(1 << 62)) if dropout_rng is None
                                           else dropout_rng)

    def _init_factors(self, rng, init, d_in, d_out):
        """Initial (A, B) as CPU float64 arrays; "pissa" also swaps W0 for its residual."""
        r = self.r
        np_ = backend.cpu_module()
        bound_a, bound_b = 1.0 / math.sqrt(d_in), 1.0 / math.sqrt(r)  # nn.Linear's kaiming(a=√5)
        if init == "loftq":
            raise LoRAError("init_lora_weights='loftq' needs a 4-bit base (it splits W0 into "
                            "NF4 codes + a low-rank part): use minilora.qlora.inject_qlora or "
                            "`minilora finetune --method qlora --init loftq`")
        if init == "pissa":
            A, B, residual = _pissa_factors(self.params["weight"], r, self.scaling)
            self.params["weight"] = backend.asarray(residual, dtype=self.params["weight"].dtype)
            return A, B
        if init == "swap":
            return np_.zeros((r, d_in)), rng.uniform(-bound_b, bound_b, (d_out, r))
        if init == "gaussian":
            A = rng.normal(0.0, 1.0 / r, (r, d_in))  # PEFT: std = 1/r
        else:  # True and False both start A like torch's nn.Linear(d_in, r)
            A = rng.uniform(-bound_a, bound_a, (r, d_in))
        if init is False:  # PEFT's debug init: B random too, so ΔW != 0 at step 0
            return A, rng.uniform(-bound_b, bound_b, (d_out, r))
        return A, np_.zeros((d_out, r))

    @property
    def d_in(self) -> int:
        return self.params["weight"].shape[1]

    @property
    def d_out(self) -> int:
        return self.params["weight"].shape[0]

    def delta_weight(self):
        """ΔW = scaling * B @ A, shape (d_out, d_in) like W0 (PEFT's ``get_delta_weight``)."""
        delta_w = xp.matmul(self.params["lora_B"], self.params["lora_A"])  # (d_out, d_in)
        delta_w *= self.scaling
        return delta_w

    def _base_forward(self, x):
        """The frozen path ``x @ W0.T + b`` -> (out, cache). QLoRA's layer
        (:class:`minilora.qlora.QLoRALinear`) overrides this pair with a 4-bit W0."""
        return ops.linear_forward(x, self.params["weight"], self.params.get("bias"),
                                  keep_x=self.needs_grad("weight"))

    def _base_backward(self, dout, cache, need_dx: bool):
        """dx of the base path (None if not needed); accumulates dW0 / db only if they train."""
        dx, dw, db = ops.linear_backward(dout, cache, need_dx=need_dx,
                                         need_dw=self.needs_grad("weight"),
                                         need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        return dx

    def forward(self, x):
        """x (..., d_in) -> out (..., d_out), cache (:class:`LoRALinearCache`).

        While merged, W0 already holds ΔW and only the base path runs.
        """
        out, c_base = self._base_forward(x)
        if self.merged:
            return out, LoRALinearCache(c_base, None, None, None)
        p = self.lora_dropout if self.training else 0.0
        x_drop, c_drop = ops.dropout_forward(x, p, self.dropout_rng)  # (..., d_in)
        h, c_a = ops.linear_forward(x_drop, self.params["lora_A"])  # (..., r)
        u, c_b = ops.linear_forward(h, self.params["lora_B"])  # (..., d_out)
        u *= self.scaling
        out += u
        return out, LoRALinearCache(c_base, c_drop, c_a, c_b)

    def backward(self, dout, cache: LoRALinearCache, need_dx: bool = True):
        """Backpropagate dout (..., d_out); returns dx (..., d_in) or None.

        forward: out = x @ W0.T + b + scaling * u,  u = h @ B.T,  h = x_drop @ A.T
        dB = scaling * dout^T h          (d_out, r)
        dh = scaling * dout @ B          (..., r)     (scaled here, where it is small)
        dA = dh^T x_drop                 (r, d_in)
        dx = dout @ W0 + dropout_backward(dh @ A)
        The frozen W0 costs only its dx matmul: no dW buffer, no dW matmul.
        """
        dx = self._base_backward(dout, cache.base, need_dx)
        self._check_backward(cache.a is not None)
        if cache.a is None:
            return dx
        need_a = self.needs_grad("lora_A")
        # forward: u = h @ B.T
        dh, dB, _ = ops.linear_backward(dout, cache.b, need_dx=need_dx or need_a,
                                        need_dw=self.needs_grad("lora_B"), need_db=False)
        if dB is not None:
            dB *= self.scaling
            self._accumulate("lora_B", dB)
        if dh is None:
            return dx
        dh *= self.scaling
        # forward: h = x_drop @ A.T
        dx_drop, dA, _ = ops.linear_backward(dh, cache.a, need_dx=need_dx, need_dw=need_a,
                                             need_db=False)
        self._accumulate("lora_A", dA)
        if need_dx:
            dx += ops.dropout_backward(dx_drop, cache.drop)
        return dx


# ----------------------------------------------------------------------------------------------
# LoRAEmbedding
# ----------------------------------------------------------------------------------------------
class LoRAEmbedding(_LoRABase):
    """An :class:`~minilora.nn.layers.Embedding` plus a low-rank update, in PEFT's layout.

    out     = W0[idx] + scaling * A.T[idx] @ B.T                     (B, T, C)
    delta_w = scaling * (B @ A).T                                    (V, C), like W0

    Parameters: ``weight`` W0 (V, C) from the base, ``lora_A`` (r, V) and ``lora_B`` (C, r):
    PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` (in_features = V, out_features = C). So
    A.T is a small (V, r) table looked up like the embedding, and B maps r -> C.
    Init follows PEFT's embedding convention, the reverse of Linear: A = 0 and B ~ N(0, 1) for
    ``True`` and ``"gaussian"``; ``"swap"`` gives A ~ N(0, 1), B = 0; ``False`` both N(0, 1);
    ``"pissa"`` takes the top-r SVD of W0.T and leaves the residual in W0. As in PEFT there is no
    dropout on embeddings (the input is integer ids).

    Args:
        base: the Embedding to wrap (its weight array is adopted).
        r, lora_alpha, use_rslora, init_lora_weights, rng: as for :class:`LoRALinear`.

    Chapter: chapters/02-lora-notes.ipynb
    """

    kind = "LoRAEmbedding"

    def __init__(self, base: Embedding, r: int, lora_alpha: float = 8, use_rslora: bool = False,
                 init_lora_weights=True, rng=0):
        super().__init__()
        if not isinstance(base, Embedding):
            raise TypeError(f"LoRAEmbedding wraps a minilora Embedding, got {type(base).__name__}")
        w = base.params["weight"]
        V, C = w.shape
        _check_rank(r, V, C, f"an Embedding of shape (V, C) = ({V}, {C})")
        _check_init(init_lora_weights)
        self._setup(r, lora_alpha, use_rslora)
        rng = backend.cpu_rng(rng)
        np_ = backend.cpu_module()
        self.params["weight"] = w
        init = init_lora_weights
        if init == "pissa":
            # ΔW = scaling (B A).T, so B A approximates W0.T (C, V): the Linear recipe on W0.T
            A, B, residual_t = _pissa_factors(backend.to_numpy(w).T, r, self.scaling)
            self.params["weight"] = backend.asarray(np_.ascontiguousarray(residual_t.T),
                                                    dtype=w.dtype)
        elif init == "swap":
            A, B = rng.standard_normal((r, V)), np_.zeros((C, r))
        elif init is False:
            A, B = rng.standard_normal((r, V)), rng.standard_normal((C, r))
        else:  # True, "gaussian"
            A, B = np_.zeros((r, V)), rng.standard_normal((C, r))
        self.params["lora_A"] = backend.asarray(A, dtype=w.dtype)
        self.params["lora_B"] = backend.asarray(B, dtype=w.dtype)

    def delta_weight(self):
        """ΔW = scaling * (B @ A).T, shape (V, C) like W0."""
        delta_w = xp.matmul(self.params["lora_B"], self.params["lora_A"]).T  # (V, C)
        return xp.ascontiguousarray(delta_w * self.scaling)

    def forward(self, idx):
        """idx (B, T) int -> out (B, T, C), cache = (c_base, c_a, c_b) (c_a, c_b None if merged)."""
        out, c_base = ops.embedding_forward(idx, self.params["weight"])  # (B, T, C)
        if self.merged:
            return out, (c_base, None, None)
        h, c_a = ops.embedding_forward(idx, self.params["lora_A"].T)  # rows of A.T: (B, T, r)
        u, c_b = ops.linear_forward(h, self.params["lora_B"])  # (B, T, C)
        u *= self.scaling
        out = out + u  # W0[idx] may be a view of W0 on some backends: never add in place
        return out, (c_base, c_a, c_b)

    def backward(self, dout, cache):
        """Backpropagate dout (B, T, C); ids have no gradient, so returns None.

        forward: out = W0[idx] + scaling * u,  u = h @ B.T,  h = A.T[idx]
        dB   = scaling * dout^T h                               (C, r)
        dh   = scaling * dout @ B                               (B, T, r)
        dA.T = scatter-add of dh into the rows idx              (V, r) -> dA (r, V)
        """
        c_base, c_a, c_b = cache
        if self.needs_grad("weight"):
            self._accumulate("weight", ops.embedding_backward(dout, c_base))
        self._check_backward(c_a is not None)
        if c_a is None:
            return None
        need_a = self.needs_grad("lora_A")
        dh, dB, _ = ops.linear_backward(dout, c_b, need_dx=need_a,
                                        need_dw=self.needs_grad("lora_B"), need_db=False)
        if dB is not None:
            dB *= self.scaling
            self._accumulate("lora_B", dB)
        if need_a:
            dh *= self.scaling
            dA_t = ops.embedding_backward(dh, c_a)  # (V, r)
            self._accumulate("lora_A", xp.ascontiguousarray(dA_t.T))  # (r, V)
        return None


LORA_LAYERS = (LoRALinear, LoRAEmbedding)


# ----------------------------------------------------------------------------------------------
# model-level: inject, freeze, merge, state dicts, adapter files
# ----------------------------------------------------------------------------------------------
def lora_layers(model: Module) -> dict:
    """``{module name: wrapper}`` for every LoRA layer in ``model``, in tree order.

    Chapter: chapters/02-lora-notes.ipynb
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def _bias_predicate(model: Module, bias: str):
    """The names of biases that ``bias`` ('none' | 'all' | 'lora_only') makes trainable."""
    if bias == "none":
        return set()
    if bias == "all":
        return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if bias == "lora_only":
        return {f"{n}.bias" for n, m in lora_layers(model).items() if "bias" in m.params}
    raise ConfigError(f"bias must be 'none', 'all' or 'lora_only'; got {bias!r}")


def mark_only_lora_as_trainable(model: Module, bias: str = "none") -> None:
    """Freeze everything except the ``lora_`` factors (and the biases that ``bias`` selects).

    Frozen parameters lose their gradient buffers, so they cost neither memory nor a dW matmul.

    Args:
        model: a model after :func:`inject_lora`.
        bias: 'none' (no bias trains), 'all' (every bias, LayerNorm biases included) or
            'lora_only' (the biases of the adapted layers).

    Chapter: chapters/02-lora-notes.ipynb
    """
    biases = _bias_predicate(model, bias)
    model.set_trainable(lambda name: name.rsplit(".", 1)[-1].startswith("lora_") or name in biases)


def inject_lora(model: Module, config: LoraConfig) -> dict:
    """Wrap every targeted Linear / Embedding of ``model`` in place and freeze the rest.

    A module is a target when the last component of its name (``blocks.0.attn.q`` -> ``q``) is in
    ``config.target_modules``. Each target is replaced in its parent's ``children`` and in the
    parent's attribute (``attn.q``, ``model.lm_head``), so the forward code calls the wrapper.
    Factors are drawn from one CPU generator seeded with ``config.seed``, in tree order, so the
    same config on the same model gives the same adapter on NumPy and CuPy. Prints nothing.

    Args:
        model: a :class:`minilora.model.GPT` (or any Module tree with Linear/Embedding leaves).
        config: a :class:`minilora.config.LoraConfig`.
    Returns:
        ``{"trainable": n, "total": n, "percent": 100 n_trainable / n_total,
        "targets": [module names]}``.
    Raises:
        LoRAError: if the model already holds LoRA layers, or no module matches.
        ConfigError: if r exceeds min(d_in, d_out) of a target.

    Chapter: chapters/02-lora-notes.ipynb
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    existing = lora_layers(model)
    if existing:
        raise LoRAError(f"the model already has LoRA layers ({', '.join(list(existing)[:4])}"
                        f"{' ...' if len(existing) > 4 else ''}); inject once per model")
    modules = dict(model.named_modules())
    targets = []
    for name, m in modules.items():
        last = name.rsplit(".", 1)[-1]
        if name and last in config.target_modules:
            if not isinstance(m, (Linear, Embedding)):
                raise LoRAError(f"module {name!r} matches target {last!r} but is a "
                                f"{type(m).__name__}; LoRA wraps Linear and Embedding only")
            targets.append(name)
    if not targets:
        adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                            if n and isinstance(m, (Linear, Embedding))})
        raise LoRAError(f"no module of the model matches target_modules "
                        f"{list(config.target_modules)}; module names that can be adapted: "
                        f"{', '.join(adaptable) or '(none)'}")
    for name in targets:  # check every rank before changing anything
        shape = tuple(modules[name].params["weight"].shape)
        _check_rank(config.r, *(shape[::-1] if isinstance(modules[name], Linear) else shape),
                    f"{name!r} (weight shape {shape})")
    rng = backend.cpu_rng(config.seed)
    for name in targets:
        old = modules[name]
        if isinstance(old, Linear):
            new = LoRALinear(old, config.r, config.lora_alpha, config.lora_dropout,
                             config.use_rslora, config.init_lora_weights, rng=rng)
        else:
            new = LoRAEmbedding(old, config.r, config.lora_alpha, config.use_rslora,
                                config.init_lora_weights, rng=rng)
        parent_name, _, child = name.rpartition(".")
        modules[parent_name].replace(child, new)
    mark_only_lora_as_trainable(model, config.bias)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total,
            "targets": targets}


def set_lora_training(model: Module, training: bool) -> None:
    """Switch LoRA dropout on (training) or off (evaluation) in every LoRALinear of ``model``.

    Chapter: chapters/02-lora-notes.ipynb
    """
    for m in lora_layers(model).values():
        if isinstance(m, LoRALinear):
            m.training = bool(training)


def merge_lora(model: Module, safe_merge: bool = False) -> list:
    """Merge every LoRA layer (``W0 += ΔW``); returns the merged module names.

    With ``safe_merge`` every ΔW is checked before any weight is written, so a NaN anywhere leaves
    the whole model untouched.

    Chapter: chapters/02-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("merge_lora: the model has no LoRA layers (call inject_lora first)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise LoRAError(f"merge_lora: {merged[:4]} already merged; call unmerge_lora first")
    for m in layers.values():
        if "weight" not in m.params:  # no float W0 to merge into (a 4-bit base): its own error
            m.merge()
    if safe_merge:
        bad = [n for n, m in layers.items() if not _finite(m.params["weight"] + m.delta_weight())]
        if bad:
            raise LoRAError(f"refusing to merge: W0 + ΔW is not finite in {bad}; no weight changed")
    for m in layers.values():
        m.merge(safe_merge=False)
    return list(layers)


def unmerge_lora(model: Module) -> list:
    """Unmerge every merged LoRA layer (``W0 -= ΔW``); returns the unmerged module names.

    Chapter: chapters/02-lora-notes.ipynb
    """
    names = []
    for n, m in lora_layers(model).items():
        if m.merged:
            m.unmerge()
            names.append(n)
    return names


def lora_state_dict(model: Module, bias: str = "none") -> dict:
    """The adapter's tensors: every ``lora_`` parameter, plus the biases ``bias`` selects.

    Same dotted names as ``model.named_parameters()`` (``blocks.0.attn.q.lora_A``), on the
    active backend (not copies).

    Chapter: chapters/02-lora-notes.ipynb
    """
    biases = _bias_predicate(model, bias)
    return {n: p for n, p in model.named_parameters()
            if n.rsplit(".", 1)[-1].startswith("lora_") or n in biases}


def load_lora_state_dict(model: Module, arrays: dict, strict: bool = True) -> None:
    """Copy adapter tensors (from :func:`lora_state_dict`) into an injected model.

    Every name must be a ``lora_`` factor or a bias of ``model`` and every shape must match; an
    adapter trained for another base shape (other n_embd, vocab or r) gets one error naming the
    first mismatching tensor. With ``strict`` every LoRA factor of the model must be present.
    All checks run before any parameter is written.

    Chapter: chapters/02-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA layers: call inject_lora(model, config) with the "
                        "adapter's config first (load_adapter does this for you)")
    if any(m.merged for m in layers.values()):
        raise LoRAError("cannot load adapter weights while LoRA layers are merged (W0 holds the "
                        "old ΔW); call unmerge_lora(model) first")
    slots = {n: (m, k) for n, m, k in model._slots()}
    unexpected = [n for n in arrays
                  if n not in slots or not (n.rsplit(".", 1)[-1].startswith("lora_")
                                            or n.endswith(".bias"))]
    if unexpected:
        raise LoRAError(f"adapter tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} "
                        f"match no LoRA factor or bias of this model; its LoRA layers are "
                        f"{list(layers)[:6]}. Was the adapter built with other target_modules?")
    if strict:
        missing = [f"{n}.{k}" for n, m in layers.items() for k in ("lora_A", "lora_B")
                   if f"{n}.{k}" not in arrays]
        if missing:
            raise LoRAError(f"adapter lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
                            "it was built for other target_modules, or for a base model with "
                            "fewer layers (n_layer) (or pass strict=False)")
    for n, a in arrays.items():
        m, k = slots[n]
        if tuple(a.shape) != tuple(m.params[k].shape):
            raise LoRAError(f"adapter tensor {n!r} has shape {tuple(a.shape)} but this model's is "
                            f"{tuple(m.params[k].shape)}: the adapter was built for a base model "
                            "of another shape (n_embd / vocab_size) or another r")
    for n, a in arrays.items():
        m, k = slots[n]
        m.params[k] = backend.asarray(backend.to_numpy(a), dtype=m.params[k].dtype)


def save_adapter(path, model: Module, config: LoraConfig) -> None:
    """Write the adapter alone (factors + selected biases, kilobytes) to one safetensors file.

    The JSON metadata holds the :class:`LoraConfig` and, if the model has one, its
    ``GPTConfig``, so :func:`load_adapter` can rebuild the wrappers and check the base. Atomic
    (via :func:`minilora.checkpoint.save_arrays`). Saved unmerged: a merged model is refused.

    Chapter: chapters/02-lora-notes.ipynb
    """
    from minilora.checkpoint import save_arrays

    layers = lora_layers(model)
    if not layers:
        raise LoRAError("save_adapter: the model has no LoRA layers")
    if any(m.merged for m in layers.values()):
        raise LoRAError("save_adapter: LoRA layers are merged; unmerge_lora(model) first so the "
                        "saved factors and the base weight stay separable")
    meta = {"format": ADAPTER_FORMAT, "lora_config": config.to_dict(), "targets": list(layers)}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        meta["model_config"] = model_config.to_dict()
    save_arrays(path, lora_state_dict(model, config.bias), meta)


def read_adapter(path, model: Module | None = None) -> tuple[dict, LoraConfig]:
    """Read a file from :func:`save_adapter` without touching any model.

    Returns ``(arrays, config)``: the tensors (NumPy, by parameter name) and the adapter's
    :class:`LoraConfig`. Checks the format and the config; given ``model``, also that the adapter
    was built for a base of the same shape (vocab_size, n_embd, n_layer, bias), one clear error
    otherwise. Used by :func:`load_adapter` and by the many-adapter registry
    (:mod:`minilora.multi_adapter`).

    Chapter: chapters/02-lora-notes.ipynb
    """
    from minilora.checkpoint import CheckpointError, load_arrays

    arrays, meta = load_arrays(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a minilora adapter (format "
                              f"{meta.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    try:
        config = LoraConfig.from_dict(meta["lora_config"])
    except (KeyError, ConfigError, TypeError) as e:
        raise CheckpointError(f"adapter {str(path)!r} has an invalid LoRA config: {e}") from None
    saved_mc = meta.get("model_config")
    model_config = getattr(model, "config", None)
    if saved_mc is not None and model_config is not None and hasattr(model_config, "to_dict"):
        ours = model_config.to_dict()
        diff = {k: (v, ours.get(k)) for k, v in saved_mc.items()
                if k in ("vocab_size", "n_embd", "n_layer", "bias") and ours.get(k) != v}
        if diff:
            raise LoRAError(f"adapter {str(path)!r} was built for another base model: "
                            + ", ".join(f"{k} {a} (adapter) vs {b} (model)"
                                        for k, (a, b) in diff.items()))
    return arrays, config


def load_adapter(path, model: Module) -> LoraConfig:
    """Load a file from :func:`save_adapter` into ``model``; returns the adapter's config.

    A model without LoRA layers is injected first with the saved config (for ``"pissa"`` that
    recomputes the same residual base from the same W0). A model that already has LoRA layers
    must have exactly the saved targets. Shapes are checked with clear errors.

    Chapter: chapters/02-lora-notes.ipynb
    """
    arrays, config = read_adapter(path, model)
    prepare_for_adapter(model, config)
    load_lora_state_dict(model, arrays)
    return config


def prepare_for_adapter(model: Module, config: LoraConfig) -> None:
    """Make ``model`` ready to receive an adapter built with ``config``.

    A model without LoRA layers is injected with ``config``. One that has them must match it:
    the same adapted layer names and, in every layer, the same r and scaling; its trainable set
    is then reset for ``config.bias``. Raises :class:`LoRAError` naming the first mismatch.

    Chapter: chapters/02-lora-notes.ipynb
    """
    layers = lora_layers(model)
    if not layers:
        inject_lora(model, config)
        return
    kinds = {n.rsplit(".", 1)[-1] for n in layers}
    if kinds != set(config.target_modules):
        raise LoRAError(f"the model's LoRA layers adapt {sorted(kinds)} but the adapter adapts "
                        f"{sorted(config.target_modules)}; load into a model without LoRA "
                        "layers to inject the adapter's own config")
    for name, m in layers.items():
        if m.r != config.r or not math.isclose(m.scaling, config.scaling):
            raise LoRAError(f"LoRA layer {name!r} has r={m.r}, scaling={m.scaling:g} but the "
                            f"adapter has r={config.r}, scaling={config.scaling:g}")
    mark_only_lora_as_trainable(model, config.bias)


def count_lora_parameters(config: LoraConfig, model_config) -> int:
    """Closed-form number of trainable parameters after ``inject_lora(GPT(model_config), config)``.

    Each adapted (d_out, d_in) matrix adds r (d_in + d_out): 2 C r for a square (C, C) projection
    (q, k, v, o), 5 C r for ``up`` (4C, C) and ``down`` (C, 4C), r (V + C) for ``wte`` and
    ``lm_head``. Bias modes add, with ``model_config.bias``: 'all' every bias (per block 4C (q, k,
    v, o) + 4C (up) + C (down) + 2C (LayerNorms), plus C for ln_f); 'lora_only' the biases of the
    adapted Linears (C for q/k/v/o/down, 4C for up; wte and lm_head have none).

    Chapter: chapters/02-lora-notes.ipynb
    """
    C, V, L, r = model_config.n_embd, model_config.vocab_size, model_config.n_layer, config.r
    per_block = {"q": 2 * C, "k": 2 * C, "v": 2 * C, "o": 2 * C, "up": 5 * C, "down": 5 * C}
    whole = {"wte": V + C, "lm_head": C + V}
    n = sum(r * L * per_block[t] for t in config.target_modules if t in per_block)
    n += sum(r * whole[t] for t in config.target_modules if t in whole)
    if model_config.bias and config.bias == "all":
        n += L * (4 * C + 4 * C + C + 2 * C) + C
    elif config.bias == "all":  # bias-free Linears: only the LayerNorm biases
        n += L * 2 * C + C
    elif model_config.bias and config.bias == "lora_only":
        bias_size = {"q": C, "k": C, "v": C, "o": C, "up": 4 * C, "down": C}
        n += sum(L * bias_size[t] for t in config.target_modules if t in bias_size)
    return n


__all__ = ["LoRAError", "LoRALinear", "LoRAEmbedding", "LoRALinearCache", "lora_scaling",
           "lora_layers", "inject_lora", "mark_only_lora_as_trainable", "set_lora_training",
           "merge_lora", "unmerge_lora", "lora_state_dict", "load_lora_state_dict",
           "save_adapter", "read_adapter", "load_adapter", "prepare_for_adapter",
           "count_lora_parameters", "LORA_TARGETS"]
