"""4-bit code tables (NF4, FP4, int4) and 4-bit quantise / dequantise of whole tensors.

A 4-bit code is a table of 16 levels in [-1, 1]. A weight is stored as the 4-bit *index* of the
level nearest to ``w / absmax`` of its block (see :mod:`minilora.quant.blockwise`); the table
decides where the 16 levels sit:

* **NF4** (NormalFloat4, QLoRA): levels at quantiles of N(0, 1), dense near 0 where weights are,
  asymmetric (7 negative, an exact 0, 8 positive), with both -1 and +1.
* **FP4** (E2M1 float, bitsandbytes' ``"fp4"``): sign bit + 2 exponent bits + 1 mantissa bit.
* **int4** (symmetric absmax integers): 15 evenly spaced levels k/7, k = -7..7.

Naming follows bitsandbytes: ``code`` (table), ``absmax`` (one scale per block), ``blocksize=64``,
``q`` (indices), ``packed`` (uint8, two codes per byte, high nibble first), ``QuantState``.

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

from minilora.backend import cpu_module, xp
from minilora.config import QUANT_TYPES
from minilora.quant.blockwise import dequantize_packed, midpoints, quantize_blockwise
from minilora.quant.checks import (
    QuantError,
    as_float32_flat,
    check_blocksize,
    check_code,
    linspace_float32,
)
from minilora.quant.double import DOUBLE_QUANT_BLOCKSIZE, double_quantize
from minilora.quant.packing import pack_nibbles
from minilora.quant.state import QuantState

_np = cpu_module()  # CPU-side constants only; all array maths below goes through xp


def _frozen(values):
    a = _np.array(values, dtype=_np.float32)
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------

#: The NF4 table, index = 4-bit code (0b0000 .. 0b1111). Exact float32 values, identical to
#: bitsandbytes' hard-coded table; sorted, code 7 is the exact zero. (16,) float32, read-only.
NF4_CODE = _frozen([
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
])

#: bitsandbytes' FP4 (E2M1) magnitudes before normalisation, in *bit-pattern* order: bit 3 is
#: the sign, the low 3 bits pick the magnitude (0b001 = 0.0625 is the subnormal; exponent bias 2).
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
           -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

#: The FP4 table bitsandbytes uses: FP4_RAW / max|FP4_RAW| = FP4_RAW / 12, in float32. NOT
#: sorted (index = bit pattern); it has two zeros, +0 (code 0x0) and -0 (code 0x8). (16,) float32.
FP4_CODE = _frozen(_np.array(FP4_RAW, dtype=_np.float32) / _np.float32(12.0))


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True):
    """Derive the NF4 levels from N(0, 1) quantiles, the way bitsandbytes builds them.

    Each half is built on its own, at evenly spaced probabilities between ``offset`` and 0.5
    (float32 ``linspace``, the last point 0.5 dropped because Phi^-1(0.5) = 0):

        positive: Phi^-1(p), p = linspace(offset, 0.5, 9)[:-1]   -> 8 values (1.848 .. 0.147)
        negative: -Phi^-1(p), p = linspace(offset, 0.5, 8)[:-1]  -> 7 values
        levels  = sort(positive + [0] + negative) / max          -> 16 values in [-1, 1]

    One more level on the positive side makes the table asymmetric and keeps an exact zero
    (a symmetric 16-level table has no zero). Both halves share the outer probability
    ``offset``, so after dividing by the positive maximum the table has both -1 and +1.
    ``offset`` = 0.9677083 is "empirically optimised" per bitsandbytes; it is close to
    929/960 = mean(1 - 1/30, 1 - 1/32), half a bin in from the end for 15 and 16 levels
    (a mnemonic, not a documented derivation). This is not the paper's Eq. 4 (which needs
    Phi^-1(0) = -inf). bitsandbytes pads the result to 256 entries with zeros and the 16 levels
    are ``code[:8] + code[-8:]``; we return the 16 directly.

    With torch's float32 linspace rounding (:func:`linspace_float32`) the result equals
    :data:`NF4_CODE` bit for bit. CPU-only (NumPy + scipy), run once to build a table.

    Args:
        offset: the outermost probability, in (0.5, 1).
        use_extra_value: True for NF4 (8 positive + 0 + 7 negative); False gives a symmetric
            table (7 + 0 + 7 = 15 levels).
    Returns:
        NumPy float32 array, shape (16,) (or (15,) with ``use_extra_value=False``), sorted.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    # lazy: scipy.stats takes ~0.3 s to import, and only building the table needs it
    from scipy.stats import norm

    if not 0.5 < float(offset) < 1.0:
        raise QuantError(f"offset must be a probability in (0.5, 1); got {offset!r}")
    n_pos = 9 if use_extra_value else 8
    p_pos = linspace_float32(offset, 0.5, n_pos)[:-1]        # (8,) or (7,)
    p_neg = linspace_float32(offset, 0.5, 8)[:-1]            # (7,)
    positive = norm.ppf(p_pos.astype(_np.float64))
    negative = -norm.ppf(p_neg.astype(_np.float64))
    levels = _np.sort(_np.concatenate([negative, [0.0], positive]).astype(_np.float32))
    return levels / levels.max()                             # float32 / float32, as bnb


def int4_symmetric_code():
    """The symmetric absmax int4 table: k / 7 for k = -7 .. 7, plus the unused int4 value -8.

        q = round(7 * x / absmax)   (an integer in -7..7),   x_hat = q / 7 * absmax

    A signed 4-bit integer holds -8..7 (16 values), but symmetric absmax quantisation uses
    only the **15 levels** -7..7: it maps the block's largest |x| to +-1 = +-7/7, so both signs
    reach the same magnitude and 0 is exact, and -8/7 lies outside [-1, 1] and is never chosen.
    We keep it at index 0 so that index = k + 8 (the int4 value in offset-binary) and the table
    has the 16 entries every 4-bit code has. One code is wasted; NF4 spends it on an extra
    positive level instead. Nearest-level rounding is round-half-down on the midpoints, i.e. the
    same rule as for NF4.

    Returns:
        NumPy float32 array of shape (16,): [-8/7, -1, -6/7, ..., 6/7, 1], sorted.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    return (_np.arange(-8, 8, dtype=_np.float32) / _np.float32(7.0)).astype(_np.float32)


INT4_CODE = _frozen(int4_symmetric_code())

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}
assert tuple(_CODES) == QUANT_TYPES


def get_code(quant_type: str):
    """The 4-bit table for a named type: NF4_CODE, FP4_CODE or INT4_CODE.

    Args:
        quant_type: 'nf4', 'fp4' or 'int4'.
    Returns:
        read-only NumPy float32 array of shape (16,), index = 4-bit code.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    if quant_type not in _CODES:
        raise QuantError(f"quant_type must be one of {', '.join(QUANT_TYPES)}; got {quant_type!r}")
    return _CODES[quant_type]


# ---------------------------------------------------------------------------------------------
# whole tensors
# ---------------------------------------------------------------------------------------------

def quantize_4bit(x, code, blocksize: int = 64, double_quant: bool = False,
                  quant_type: str = "custom", blocksize2: int = DOUBLE_QUANT_BLOCKSIZE):
    """Quantise a tensor to 4-bit indices into ``code`` with one absmax per block, packed.

        absmax[b] = max |x_b|,   q_i = nearest(code, x_i / absmax[b])
        packed[j] = q[2j] << 4 | q[2j+1]

    ``code`` may be in any order (FP4 is in bit-pattern order): the search runs on the sorted
    table and maps back through a stable argsort, as bitsandbytes does. An odd element count is
    padded with the code of 0.0. With ``double_quant`` the absmax vector is itself quantised
    to 8 bits (:func:`minilora.quant.double.double_quantize`); the 4-bit codes do not change.

    Args:
        x: float array (float16/32/64) of any shape, n >= 1 finite elements.
        code: 16 finite levels, shape (16,).
        blocksize: elements per block (bnb default 64), any positive integer.
        double_quant: also quantise absmax (bnb ``compress_statistics``).
        quant_type: label stored in the state ('nf4', 'fp4', 'int4' or 'custom').
        blocksize2: block size of the second (8-bit) level, default 256.
    Returns:
        packed: uint8 array of shape (ceil(n / 2),).
        state: :class:`QuantState` with what dequantisation needs.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False; got {double_quant!r}")
    if quant_type not in QUANT_TYPES + ("custom",):
        raise QuantError(f"quant_type must be one of {', '.join(QUANT_TYPES)} or 'custom'; "
                         f"got {quant_type!r}")
    table = check_code(code, n_entries=16, require_sorted=False)      # (16,) bit-pattern order
    order = xp.argsort(table, kind="stable")                          # sorted position -> code
    flat = as_float32_flat(x)
    q_sorted, absmax = quantize_blockwise(flat, table[order], blocksize)
    if bool((order == xp.arange(16)).all()):                         # NF4, int4: already sorted
        q = q_sorted
    else:                                                             # FP4: back to bit patterns
        q = xp.take(order.astype(xp.uint8), q_sorted)
    zero = xp.zeros(1, dtype=xp.float32)
    zero_pos = int(xp.searchsorted(midpoints(table[order]), zero, side="left")[0])
    pad = int(order[zero_pos])                                        # code of 0.0
    packed = pack_nibbles(q, pad=pad)
    dtype = xp.asarray(x).dtype.name
    shape = tuple(int(s) for s in xp.asarray(x).shape)
    if double_quant:
        q8, absmax2, offset = double_quantize(absmax, blocksize=blocksize2)
        state = QuantState(absmax=q8, shape=shape, code=table, blocksize=blocksize,
                           quant_type=quant_type, dtype=dtype, offset=offset,
                           absmax2=absmax2, blocksize2=blocksize2)
    else:
        state = QuantState(absmax=absmax, shape=shape, code=table, blocksize=blocksize,
                           quant_type=quant_type, dtype=dtype)
    return packed, state


def check_packed_matches(packed, state: QuantState):
    """Check that ``packed`` can be the 4-bit codes that ``state`` describes.

        packed.size == ceil(prod(state.shape) / 2),  packed.dtype == uint8,  state consistent

    Args:
        packed: uint8 array (any shape); state: a QuantState.
    Returns:
        ``packed`` as an ``xp`` array.
    Raises:
        TypeError for a wrong type / dtype, ValueError for a size mismatch or a broken state.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState; got {type(state).__name__}")
    packed = xp.asarray(packed)
    if packed.dtype != xp.uint8:
        raise TypeError(f"packed must be a uint8 array; got dtype {packed.dtype}")
    n = state.n
    if packed.size != (n + 1) // 2:
        raise QuantError(f"packed has {packed.size} bytes but the state describes shape "
                         f"{state.shape} ({n} elements -> {(n + 1) // 2} bytes): "
                         "packed and state do not belong together")
    state.validate()
    return packed


def dequantize_4bit(packed, state: QuantState):
    """Undo :func:`quantize_4bit`: unpack, look up the levels, rescale by each block's absmax.

        x_hat_i = code[q_i] * absmax[i // blocksize]
        absmax  = dynamic_map[absmax_q8] * absmax2[b // blocksize2] + offset   (double_quant)

    Args:
        packed: uint8 array with ceil(n / 2) bytes (any shape).
        state: the :class:`QuantState` returned with it.
    Returns:
        array of shape ``state.shape`` and dtype ``state.dtype``.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    packed = check_packed_matches(packed, state)
    # = dequantize_blockwise(unpack_nibbles(packed, n), absmax, code, ...), one lookup per byte
    return dequantize_packed(packed, state.get_absmax(), state.code, state.blocksize, state.n,
                             shape=state.shape, dtype=state.dtype)


def _check_type(state, quant_type):
    if isinstance(state, QuantState) and state.quant_type != quant_type:
        raise QuantError(f"this state holds {state.quant_type!r} codes; use dequantize_4bit or "
                         f"dequantize_{state.quant_type} instead of dequantize_{quant_type}")


def quantize_nf4(x, blocksize: int = 64, double_quant: bool = False):
    """NF4 quantisation: :func:`quantize_4bit` with :data:`NF4_CODE`.

    Args:
        x: float array of any shape, n >= 1 finite elements.
        blocksize: elements per block (default 64).
        double_quant: also quantise absmax to 8 bits (QLoRA's "double quantization").
    Returns:
        packed: uint8 (ceil(n / 2),);  state: QuantState (quant_type 'nf4').

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    return quantize_4bit(x, NF4_CODE, blocksize, double_quant, quant_type="nf4")


def dequantize_nf4(packed, state: QuantState):
    """Inverse of :func:`quantize_nf4`; returns an array of ``state.shape``, ``state.dtype``.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    _check_type(state, "nf4")
    return dequantize_4bit(packed, state)


def quantize_fp4(x, blocksize: int = 64, double_quant: bool = False):
    """FP4 (E2M1) quantisation: :func:`quantize_4bit` with :data:`FP4_CODE`.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    return quantize_4bit(x, FP4_CODE, blocksize, double_quant, quant_type="fp4")


def dequantize_fp4(packed, state: QuantState):
    """Inverse of :func:`quantize_fp4`.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    _check_type(state, "fp4")
    return dequantize_4bit(packed, state)


def quantize_int4(x, blocksize: int = 64, double_quant: bool = False):
    """Symmetric absmax int4 quantisation: :func:`quantize_4bit` with :data:`INT4_CODE`.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    return quantize_4bit(x, INT4_CODE, blocksize, double_quant, quant_type="int4")


def dequantize_int4(packed, state: QuantState):
    """Inverse of :func:`quantize_int4`.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    _check_type(state, "int4")
    return dequantize_4bit(packed, state)


__all__ = ["NF4_CODE", "FP4_RAW", "FP4_CODE", "INT4_CODE", "QUANT_TYPES", "create_normal_map",
           "int4_symmetric_code", "get_code", "quantize_4bit", "dequantize_4bit",
           "check_packed_matches", "quantize_nf4", "dequantize_nf4", "quantize_fp4",
           "dequantize_fp4", "quantize_int4", "dequantize_int4"]
