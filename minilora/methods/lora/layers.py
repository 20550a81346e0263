"""LoRA: a frozen weight plus a trainable low-rank update, with hand-written backward passes.

For a linear layer with frozen weight W0 (d_out, d_in)::

    out     = x @ W0.T + b + scaling * (dropout(x) @ A.T) @ B.T      # (..., d_out)
    delta_w = scaling * B @ A                                         # ΔW, (d_out, d_in)
    A (r, d_in), B (d_out, r), scaling = lora_alpha / r   (or lora_alpha / sqrt(r): rsLoRA)

Only A and B are trained: r (d_in + d_out) numbers instead of d_in d_out. The wrappers
(:class:`LoRALinear`, :class:`LoRAEmbedding`) *wrap* a base layer rather than subclass it (as
loralib's layers do): they adopt the base's arrays under the same names (``weight``, ``bias``), so a base
checkpoint still loads by name, and add ``lora_A`` / ``lora_B``. Trainable = the ``lora_`` prefix
(loralib's rule), so a frozen base weight gets no gradient buffer and no dW matmul.

Model-level helpers (:mod:`minilora.methods.lora.inject`, :mod:`minilora.methods.lora.files`)::

    report = inject_lora(model, LoraConfig(r=4, target_modules=("q", "v")))
    ...train...                                     # only lora_A / lora_B receive gradients
    save_adapter("adapter.safetensors", model, config)     # kilobytes: the factors only
    merge_lora(model)                               # W0 += ΔW: inference at the base's cost

Names: ΔW is ``delta_w`` in code, never ``dW`` (that would read as a gradient).

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

from minilora import backend
from minilora.backend import xp
from minilora.methods.lora.config import LORA_INITS
from minilora.config import ConfigError, check_float, check_int
from minilora.errors import MiniloraError
from minilora.methods.lora.init import embedding_factors, linear_factors
from minilora.nn import ops, ops_fast
from minilora.peft_format import lora_scaling  # PEFT's meaning of r, lora_alpha
from minilora.nn.layers import Embedding, Linear, Module


class LoRAError(MiniloraError, ValueError):
    """A LoRA operation cannot be done as asked (merge state, shapes, non-finite values)."""


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
def check_rank(r, d_in: int, d_out: int, what: str) -> None:
    check_int("r", r)
    if r > min(d_in, d_out):
        raise ConfigError(f"r={r} is larger than min(d_in, d_out) = min({d_in}, {d_out}) of "
                          f"{what}: B A cannot have rank above {min(d_in, d_out)}, so the extra "
                          "columns only cost memory. Use r <= "
                          f"{min(d_in, d_out)} or leave this layer out of target_modules")


def _check_init(init) -> None:
    if not (isinstance(init, bool) or (isinstance(init, str) and init in LORA_INITS)):
        raise ConfigError(f"init_lora_weights must be one of "
                          f"{', '.join(repr(v) for v in LORA_INITS)}; got {init!r}")


def all_finite(a) -> bool:
    return bool(xp.isfinite(a).all())


class _LoRABase(Module):
    """What both wrappers share: scaling, merge/unmerge, delta_weight, merged-state guards."""

    kind = "?"

    def _setup(self, r, lora_alpha, use_rslora):
        check_float("lora_alpha", lora_alpha, lo=0.0, lo_open=True)
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
        if safe_merge and not all_finite(merged_w):
            raise LoRAError(f"refusing to merge: W0 + ΔW holds NaN or inf (lora_A finite: "
                            f"{all_finite(self.params['lora_A'])}, lora_B finite: "
                            f"{all_finite(self.params['lora_B'])}); the base weight is unchanged")
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

    Chapter: chapters/04-lora-notes.ipynb
    """

    kind = "LoRALinear"

    def __init__(self, base: Linear, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, rng=0, dropout_rng=None):
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"LoRALinear wraps a minilora Linear, got {type(base).__name__}")
        w = base.params["weight"]
        d_out, d_in = w.shape
        check_rank(r, d_in, d_out, f"a Linear of shape (d_out, d_in) = ({d_out}, {d_in})")
        _check_init(init_lora_weights)
        check_float("lora_dropout", lora_dropout, lo=0.0)
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
        """Initial (A, B) as CPU float64 arrays (:mod:`minilora.methods.lora.init`); "pissa" also swaps
        W0 for its residual."""
        if init == "loftq":
            raise LoRAError("init_lora_weights='loftq' needs a 4-bit base (it splits W0 into "
                            "NF4 codes + a low-rank part): use minilora.methods.qlora.inject_qlora or "
                            "`minilora finetune --method qlora --init loftq`")
        A, B, residual = linear_factors(init, self.r, d_in, d_out, rng, self.params["weight"],
                                        self.scaling)
        if residual is not None:
            self.params["weight"] = backend.asarray(residual, dtype=self.params["weight"].dtype)
        return A, B

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
        (:class:`minilora.methods.qlora.QLoRALinear`) overrides this pair with a 4-bit W0."""
        return ops_fast.linear_forward_fast(x, self.params["weight"], self.params.get("bias"),
                                            keep_x=self.needs_grad("weight"))

    def _base_backward(self, dout, cache, need_dx: bool):
        """dx of the base path (None if not needed); accumulates dW0 / db only if they train."""
        dx, dw, db = ops_fast.linear_backward_fast(dout, cache, need_dx=need_dx,
                                                   need_dw=self.needs_grad("weight"),
                                                   need_db=self.needs_grad("bias"))
        self._accumulate("weight", dw)
        self._accumulate("bias", db)
        return dx

    def draws_random(self) -> bool:
        """The forward draws dropout masks (training with ``lora_dropout`` > 0)."""
        return bool(self.training) and self.lora_dropout > 0

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

    Chapter: chapters/04-lora-notes.ipynb
    """

    kind = "LoRAEmbedding"

    def __init__(self, base: Embedding, r: int, lora_alpha: float = 8, use_rslora: bool = False,
                 init_lora_weights=True, rng=0):
        super().__init__()
        if not isinstance(base, Embedding):
            raise TypeError(f"LoRAEmbedding wraps a minilora Embedding, got {type(base).__name__}")
        w = base.params["weight"]
        V, C = w.shape
        check_rank(r, V, C, f"an Embedding of shape (V, C) = ({V}, {C})")
        _check_init(init_lora_weights)
        self._setup(r, lora_alpha, use_rslora)
        rng = backend.cpu_rng(rng)
        self.params["weight"] = w
        A, B, residual = embedding_factors(init_lora_weights, r, V, C, rng, w, self.scaling)
        if residual is not None:
            self.params["weight"] = backend.asarray(residual, dtype=w.dtype)
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
