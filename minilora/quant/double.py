"""Double quantisation: quantise the per-block absmax values themselves, to 8 bits.

With NF4 and ``blocksize=64`` each block of 64 weights carries one float32 absmax: 32/64 = 0.5
extra bits per weight. QLoRA's *double quantisation* stores those scales in 8 bits instead:

    offset  = mean(absmax)                                  one float32 for the whole tensor
    q8, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC_MAP, blocksize=256)
    absmax ~= DYNAMIC_MAP[q8] * absmax2[b // 256] + offset

so the scales cost 8/64 + 32/(64*256) = 0.127 bits per weight (4.127 in total instead of 4.5).
The absmax values are all positive, so the mean is subtracted first to centre them around zero
and use the signed 8-bit map symmetrically. The 4-bit codes are computed with the exact float32
absmax and are identical with and without double quantisation; only the scale used at
dequantisation time changes (by well under 1 %).

One name per idea: minilora says ``double_quant`` everywhere. The same switch is called
``compress_statistics`` in bitsandbytes' ``quantize_4bit`` / ``Params4bit`` (and a state with it
is ``QuantState.nested``, its second level ``state2``), and ``bnb_4bit_use_double_quant`` in
transformers' ``BitsAndBytesConfig``. The paper calls the 8-bit type "FP8"; the code uses
bitsandbytes' *dynamic* 8-bit map, built here by :func:`create_dynamic_map`.

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

import math
import numbers

from minilora.backend import cpu_module, xp
from minilora.quant.blockwise import dequantize_blockwise, quantize_blockwise
from minilora.quant.checks import (
    QuantError,
    check_blocksize,
    linspace_float32,
    n_blocks,
)

_np = cpu_module()  # CPU-side table building only

#: Block size of the second (8-bit) level, as in bitsandbytes and the QLoRA paper.
DOUBLE_QUANT_BLOCKSIZE = 256


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8):
    """bitsandbytes' 8-bit *dynamic* code (Dettmers 2015): a float-like table with a decimal
    exponent, dense near zero.

    For i = 0 .. max_exponent_bits-1 (7 "decades" for the defaults):

        b     = linspace(0.1, 1, 2**i + 1)        float32, 2**(i+1)+1 points when unsigned
        means = (b[:-1] + b[1:]) / 2              2**i midpoints in (0.1, 1)
        add  +-10**(i - (max_exponent_bits-1)) * means

    then append 0 and 1.0 and sort. For the signed 8-bit default: 127 negative values, one 0,
    128 positive values (1 + 2 + ... + 64 = 127 per sign, plus the +1.0). The smallest nonzero
    magnitude is 5.5e-7 and the most negative level is -0.99297: there is no -1, so a block's
    most negative entry comes back 0.7 % small.

    Built in float32 with torch's CPU linspace rounding (:func:`linspace_float32`), which makes
    it equal, bit for bit, to the table bitsandbytes 0.50 prints (a NumPy ``linspace`` would be
    one ulp off in 22 entries). CPU-only setup.

    Args:
        signed: include the negative levels (default True).
        max_exponent_bits: number of decades (default 7).
        total_bits: bits per code (default 8).
    Returns:
        NumPy float32 array of shape (2**total_bits,), sorted.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    f32 = _np.float32
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data = []
    i = 0
    for i in range(max_exponent_bits):
        n_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed \
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        b = linspace_float32(0.1, 1.0, n_items)
        means = (b[:-1] + b[1:]) / f32(2.0)                          # float32
        scale = f32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    if additional_items > 0:  # only for total_bits > max_exponent_bits + 1 (mirrors bnb, last i)
        b = linspace_float32(0.1, 1.0, additional_items + 1)
        means = (b[:-1] + b[1:]) / f32(2.0)
        scale = f32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    values = _np.concatenate(data + [_np.array([0.0, 1.0], dtype=f32)]).astype(f32)
    if values.size != 2 ** total_bits:
        raise QuantError(f"these settings give {values.size} levels, not 2**{total_bits}")
    return _np.sort(values)


DYNAMIC_MAP = create_dynamic_map()
DYNAMIC_MAP.setflags(write=False)


def double_quantize(absmax, blocksize: int = DOUBLE_QUANT_BLOCKSIZE, code=None):
    """Quantise a vector of block scales to 8 bits (QLoRA double quantisation).

        offset = mean(absmax)   (float32 scalar over the whole tensor)
        q8, absmax2 = quantize_blockwise(absmax - offset, code, blocksize)

    ``double_quant`` = bnb ``compress_statistics`` = transformers ``bnb_4bit_use_double_quant``.

    Args:
        absmax: float array of shape (n_blocks,), the first-level scales.
        blocksize: second-level block size (default 256).
        code: 8-bit table, shape (256,); default :data:`DYNAMIC_MAP`.
    Returns:
        q8: uint8 array of shape (n_blocks,).
        absmax2: float32 array of shape (ceil(n_blocks / blocksize),).
        offset: float32 scalar (0-d array).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    blocksize = check_blocksize(blocksize)
    a = xp.asarray(absmax)
    if a.dtype.kind != "f":
        raise TypeError(f"absmax must be a floating-point array; got dtype {a.dtype}")
    a = a.astype(xp.float32, copy=False).reshape(-1)
    if a.size == 0:
        raise QuantError("absmax is empty; there is nothing to double-quantise")
    if not bool(xp.isfinite(a).all()):
        raise QuantError("absmax contains NaN or inf; only finite scales can be double-quantised")
    offset = xp.mean(a, dtype=xp.float32)                            # () float32
    q8, absmax2 = quantize_blockwise(a - offset, DYNAMIC_MAP if code is None else code, blocksize)
    return q8, absmax2, offset.astype(xp.float32)


def double_dequantize(q8, absmax2, offset, blocksize: int = DOUBLE_QUANT_BLOCKSIZE, code=None):
    """Restore the first-level scales from their 8-bit codes.

        absmax[b] = code[q8[b]] * absmax2[b // blocksize] + offset

    Args:
        q8: uint8 array of shape (n_blocks,).
        absmax2: float32 array of shape (ceil(n_blocks / blocksize),).
        offset: float32 scalar, the mean that was subtracted.
        blocksize: second-level block size (default 256).
        code: 8-bit table, shape (256,); default :data:`DYNAMIC_MAP`.
    Returns:
        float32 array of shape (n_blocks,).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    out = dequantize_blockwise(q8, absmax2, DYNAMIC_MAP if code is None else code, blocksize)
    out += xp.asarray(offset, dtype=xp.float32)  # a 0-d device array on CuPy: no float32() of it
    return out.reshape(-1)


def bits_per_param(blocksize: int = 64, double_quant: bool = False,
                   blocksize2: int = DOUBLE_QUANT_BLOCKSIZE, n: int | None = None) -> float:
    """Storage cost of 4-bit blockwise quantisation, in bits per weight.

    Without ``n`` (a very large tensor):

        4 + 32 / blocksize                               = 4.5     (blocksize 64)
        4 + 8 / blocksize + 32 / (blocksize*blocksize2)  = 4.126953125 (64, 256, double_quant)

    With ``n``, exactly what is stored for an n-element tensor (see
    :func:`measured_bits_per_param`): ceil(n/2) packed bytes, then either one float32 absmax
    per block, or one uint8 per block + one float32 per second-level block + the float32 offset.
    The code tables (16 and 256 float32) are shared by every tensor and not counted.

    Args:
        blocksize: first-level block size; double_quant: 8-bit scales or not;
        blocksize2: second-level block size; n: number of elements, or None for the limit.
    Returns:
        float, bits per element.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    blocksize = check_blocksize(blocksize)
    blocksize2 = check_blocksize(blocksize2, "blocksize2")
    if n is None:
        if double_quant:
            return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
        return 4 + 32 / blocksize
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise QuantError(f"n must be a positive integer number of elements; got {n!r}")
    nb = n_blocks(int(n), blocksize)
    bits = 8 * ((n + 1) // 2)
    if double_quant:
        bits += 8 * nb + 32 * n_blocks(nb, blocksize2) + 32
    else:
        bits += 32 * nb
    return bits / n


def measured_bits_per_param(packed, state) -> float:
    """Bits per weight actually held in memory: bytes of ``packed`` and of the state's
    per-tensor arrays (absmax, or q8 + absmax2 + offset), times 8, over the element count.

    Args:
        packed: uint8 array, shape (ceil(n / 2),); state: its QuantState.
    Returns:
        float; equals ``bits_per_param(state.blocksize, state.double_quant, state.blocksize2,
        n=state.n)``.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    nbytes = xp.asarray(packed).nbytes + state.absmax.nbytes
    if state.double_quant:
        nbytes += state.absmax2.nbytes + xp.asarray(state.offset, dtype=xp.float32).nbytes
    return 8 * nbytes / math.prod(state.shape)
