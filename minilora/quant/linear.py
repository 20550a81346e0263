"""A frozen linear layer whose weight is held only as 4-bit codes: QLoRA's storage/compute split.

QLoRA (Dettmers et al. 2023, §3) keeps one *storage* type (NF4 codes + block scales, optionally
double-quantised) and one *compute* type: "whenever a QLORA weight tensor is used, we dequantize
the tensor ... and then perform a matrix multiplication". So a 4-bit layer computes::

    W_hat = dequant(packed, state)            (d_out, d_in), rebuilt on every call
    out   = x @ W_hat.T + b                   (..., d_out)                      forward
    dx    = dout @ W_hat                      (..., d_in)   W_hat rebuilt again   backward
    db    = sum(dout)                         (d_out,)      only if the bias trains

and never a dW: the weight is frozen (only the LoRA factors around it train). Nothing float is
kept between the forward and the backward pass (the cache holds the packed weight itself), so
the layer costs ~4.13 bits per weight at rest (NF4 + double quantisation, blocksize 64), plus
one transient float copy of one matrix while it is being used. ``keep_dequantized=True`` trades
that back: dequantise once, hold the float32 copy (for timing comparisons).

The dequantisation is :func:`minilora.quant.blockwise.dequantize_packed` on ``xp``, so the same
layer runs on NumPy and CuPy. The quantisation itself (setup, once) is the CPU/``xp`` code of
:mod:`minilora.quant.nf4`.

Chapter: chapters/05-lora-and-qlora.ipynb
"""
from __future__ import annotations

import hashlib

from minilora import backend
from minilora.backend import xp
from minilora.nn import ops_fast
from minilora.nn.layers import Linear, Module
from minilora.quant.blockwise import dequantize_packed
from minilora.quant.checks import QuantError
from minilora.quant.double import measured_bits_per_param
from minilora.quant.nf4 import check_packed_matches, get_code, quantize_4bit
from minilora.quant.state import QuantState


def check_finite_weight(w, name: str = "weight"):
    """Return ``w`` as an ``xp`` float array; raise one clear error for NaN/inf or a non-matrix.

    Args:
        w: (d_out, d_in) floating array.
        name: what to call it in the message (e.g. ``"blocks.0.attn.q.weight"``).
    """
    w = xp.asarray(w)
    if w.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point matrix; got dtype {w.dtype}")
    if w.ndim != 2:
        raise QuantError(f"{name} must be a (d_out, d_in) matrix; got shape {tuple(w.shape)}")
    bad = ~xp.isfinite(w)
    if bool(bad.any()):
        i, j = (int(v) for v in xp.argwhere(bad)[0])
        raise QuantError(f"{name} holds {int(bad.sum())} NaN/inf value(s) (first at [{i}, {j}]); "
                         "a non-finite weight cannot be quantised (absmax would be NaN/inf)")
    return w


class QuantWeight:
    """A frozen 4-bit (d_out, d_in) matrix: ``packed`` codes + :class:`QuantState`.

        W_hat = code[q] * absmax[block]            absmax restored first if double-quantised

    Attributes:
        packed: uint8 (ceil(d_out d_in / 2),), two codes per byte (high nibble first).
        state: the QuantState (shape (d_out, d_in), code, absmax, ...).
        keep_dequantized: if True, the first :meth:`dequantize` keeps its float32 result and
            later calls reuse it (faster, but the float copy is held: no memory saving).

    Chapter: chapters/05-lora-and-qlora.ipynb
    """

    def __init__(self, packed, state: QuantState, keep_dequantized: bool = False):
        packed = check_packed_matches(packed, state)  # type, size and state consistency
        if len(state.shape) != 2:
            raise QuantError(f"a 4-bit linear weight must be a (d_out, d_in) matrix; the state "
                             f"describes shape {state.shape}")
        self.packed, self.state = packed.reshape(-1), state
        self.keep_dequantized = bool(keep_dequantized)
        self._kept = None

    @classmethod
    def quantize(cls, w, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 keep_dequantized: bool = False, name: str = "weight") -> "QuantWeight":
        """Quantise a float (d_out, d_in) matrix (:func:`minilora.quant.nf4.quantize_4bit`).

        Args:
            w: finite float matrix; quant_type: 'nf4', 'fp4' or 'int4'; blocksize: first-level
            block size; double_quant: 8-bit block scales (bnb ``compress_statistics``).
        """
        w = check_finite_weight(w, name)
        packed, state = quantize_4bit(w, get_code(quant_type), blocksize, double_quant,
                                      quant_type=quant_type)
        return cls(packed, state, keep_dequantized)

    @property
    def shape(self) -> tuple:
        return self.state.shape

    def dequantize(self, dtype=None):
        """W_hat (d_out, d_in), in float32 (as stored) or cast to ``dtype`` (float64 for checks).

        Without ``keep_dequantized`` this is a fresh array every call, freed by the caller.
        """
        w = self._kept
        if w is None:
            s = self.state
            w = dequantize_packed(self.packed, s.get_absmax(), s.code, s.blocksize, s.n,
                                  shape=s.shape)
            if self.keep_dequantized:
                self._kept = w
        return w if dtype is None else w.astype(dtype, copy=False)

    def nbytes(self) -> dict:
        """Bytes held: ``packed`` codes, ``scales`` (absmax, or q8 + absmax2 + offset), the kept
        float copy (``dequantized``, 0 unless ``keep_dequantized``), and their ``total``.
        The shared 16/256-entry code tables are not counted (as in ``bits_per_param``)."""
        s = self.state
        packed = int(self.packed.nbytes)
        scales = round(measured_bits_per_param(self.packed, s) * s.n / 8) - packed
        kept = 0 if self._kept is None else int(self._kept.nbytes)
        return {"packed": packed, "scales": scales, "dequantized": kept,
                "total": packed + scales + kept}

    def digest(self) -> str:
        """sha256 of the stored codes and scales (identifies the quantised matrix exactly)."""
        h = hashlib.sha256()
        tensors, meta = self.state.to_tensors_and_meta()
        h.update(backend.to_numpy(self.packed).tobytes())
        for k in sorted(tensors):
            h.update(k.encode())
            h.update(tensors[k].tobytes())
        h.update(repr(sorted((k, str(v)) for k, v in meta.items())).encode())
        return h.hexdigest()


def quant_linear_forward(x, qweight: QuantWeight, b=None):
    """``out = x @ dequant(Q).T + b`` with the weight rebuilt for this call only.

    Args:
        x: (..., d_in); qweight: the 4-bit (d_out, d_in) weight; b: (d_out,) or None.
    Returns:
        out (..., d_out), cache = (qweight, has_bias): the packed weight, not W_hat, so no float
        copy of the weight lives until the backward pass.
    """
    d_out, d_in = qweight.shape
    if x.shape[-1] != d_in:
        raise QuantError(f"input has {x.shape[-1]} features but this 4-bit layer's weight is "
                         f"(d_out, d_in) = ({d_out}, {d_in})")
    w = qweight.dequantize(x.dtype)  # (d_out, d_in), transient
    out, _ = ops_fast.linear_forward_fast(x, w, b)
    return out, (qweight, b is not None)


def quant_linear_backward(dout, cache, need_dx: bool = True, need_db: bool = True):
    """Gradients of ``out = x @ dequant(Q).T + b`` for a frozen Q.

    dx = dout @ W_hat      (..., d_in)     W_hat dequantised again here (QLoRA: nothing cached)
    db = sum(dout)         (d_out,)
    There is no dW: the codes cannot be trained. Returns (dx or None, db or None).
    """
    qweight, has_bias = cache
    dx = db = None
    if need_dx:
        w = qweight.dequantize(dout.dtype)  # (d_out, d_in), transient
        # forward: out = x @ w.T  ->  dx = dout @ w   (x itself is not needed: no dW)
        dx, _, _ = ops_fast.linear_backward_fast(dout, (None, w, has_bias), need_dx=True,
                                                 need_dw=False, need_db=False)
    if need_db and has_bias:
        db = dout.reshape(-1, dout.shape[-1]).sum(axis=0)  # (d_out,)
    return dx, db


class QuantLinear(Module):
    """A frozen 4-bit :class:`~minilora.nn.layers.Linear`: ``y = x @ dequant(Q).T + b``.

    ``params`` holds only ``bias`` (d_out,) (float, trainable only if selected, e.g. LoRA's
    ``bias="all"``); the weight is the :class:`QuantWeight` ``qweight``, not a parameter, so it
    gets no gradient, no optimizer state and is not cast by ``astype`` (the dequantised copy is
    cast to the input's dtype instead, which is how a float64 gradient check runs through it).

    Chapter: chapters/05-lora-and-qlora.ipynb
    """

    def __init__(self, qweight: QuantWeight, bias=None):
        super().__init__()
        if not isinstance(qweight, QuantWeight):
            raise TypeError(f"qweight must be a QuantWeight; got {type(qweight).__name__}")
        self.qweight = qweight
        if bias is not None:
            bias = xp.asarray(bias)
            if tuple(bias.shape) != (qweight.shape[0],):
                raise QuantError(f"bias has shape {tuple(bias.shape)} but the 4-bit weight has "
                                 f"d_out = {qweight.shape[0]}: they do not belong together")
            self.params["bias"] = bias
        self.trainable = set(self.params)

    @classmethod
    def from_linear(cls, linear: Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, keep_dequantized: bool = False,
                    name: str = "weight") -> "QuantLinear":
        """Quantise a float Linear's weight; its bias array is adopted as is."""
        if not isinstance(linear, Linear):
            raise TypeError(f"from_linear needs a minilora Linear; got {type(linear).__name__}")
        q = QuantWeight.quantize(linear.params["weight"], quant_type, blocksize, double_quant,
                                 keep_dequantized, name)
        return cls(q, linear.params.get("bias"))

    @property
    def d_in(self) -> int:
        return self.qweight.shape[1]

    @property
    def d_out(self) -> int:
        return self.qweight.shape[0]

    def buffer_bytes(self) -> int:
        """Bytes of the 4-bit weight (codes + scales + any kept float copy), which is not a
        parameter; :func:`minilora.memory.weight_bytes` adds it to the parameters' bytes."""
        return self.qweight.nbytes()["total"]

    def forward(self, x):
        return quant_linear_forward(x, self.qweight, self.params.get("bias"))

    def backward(self, dout, cache, need_dx: bool = True):
        dx, db = quant_linear_backward(dout, cache, need_dx, self.needs_grad("bias"))
        self._accumulate("bias", db)
        return dx


def quant_weights(model: Module) -> dict:
    """``{module name: QuantWeight}`` for every 4-bit layer of ``model`` (tree order)."""
    return {n: m.qweight for n, m in model.named_modules()
            if isinstance(getattr(m, "qweight", None), QuantWeight)}


def quantized_parameter_count(model: Module) -> int:
    """Number of weights held as 4-bit codes (not in ``model.num_parameters()``, which counts
    float ``params`` only)."""
    return sum(q.state.n for q in quant_weights(model).values())


__all__ = ["QuantWeight", "QuantLinear", "quant_linear_forward", "quant_linear_backward",
           "check_finite_weight", "quant_weights", "quantized_parameter_count"]
