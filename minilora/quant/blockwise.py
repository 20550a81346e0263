"""Blockwise absmax quantisation against a code table: the machinery under NF4, FP4, int4 and
the 8-bit second level of double quantisation.

The recipe, in the order a reader meets it (bitsandbytes' ``quantize_blockwise`` /
``quantize_4bit`` do the same steps):

1. flatten ``x`` in C order and cut it into blocks of ``blocksize`` consecutive elements
   (blocks ignore row boundaries; the last block may be partial);
2. ``absmax[b] = max |x|`` over block ``b``                             -> :func:`absmax_per_block`
3. ``scaled = clip(x * (1 / absmax[b]), -1, 1)``                       -> :func:`scale_to_unit`
4. ``q = index of the nearest entry of code`` (ties go to the lower code) -> :func:`nearest_code`
5. for 4-bit codes, two ``q`` per byte, first element in the high nibble -> :func:`pack_nibbles`

and back: ``x_hat = code[q] * absmax[b]``  -> :func:`dequantize_blockwise` (or, from packed
bytes, :func:`dequantize_packed`)

All array maths goes through ``xp`` (NumPy or CuPy). Nothing here loops over blocks in Python;
on NumPy the work is done in slices of ~128 K elements (a whole number of blocks each) so that the
float32 temporaries stay in the CPU cache (1.5-2x faster than whole-array passes), and the slices
are shared out over the CPU's cores (:func:`minilora.threads.parallel_chunks`).

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

import math
import numbers

from minilora.backend import is_cupy, xp
from minilora.quant.checks import (
    QuantError,
    _raise_not_finite,
    as_float32_flat,
    check_blocksize,
    check_code,
    n_blocks,
)
from minilora.quant.kernel import TINY, _scale_nearest_fused
from minilora.threads import parallel_chunks

# Elements per slice on NumPy (cache blocking); CuPy does the whole tensor in one go.
_SLICE = 1 << 17


# ---------------------------------------------------------------------------------------------
# step 2: one scale per block
# ---------------------------------------------------------------------------------------------

def _block_max(a, blocksize: int):
    """Max over consecutive blocks of a non-negative 1-D array; last block may be partial."""
    n = a.shape[0]
    if not is_cupy():
        # reduceat is ~2x faster than reshape(-1, bs).max(1) on NumPy and handles the tail too.
        # For |x| >= 0 (sign bit clear) the order of float32 values is the order of their bit
        # patterns read as int32 (inf and NaN sort above every finite value, so the caller's
        # isfinite check still sees them), and the integer reduceat is another ~2x faster.
        idx = xp.arange(0, n, blocksize)
        if a.dtype == xp.float32 and a.flags.c_contiguous:
            return xp.maximum.reduceat(a.view(xp.int32), idx).view(xp.float32)
        return xp.maximum.reduceat(a, idx)
    full = (n // blocksize) * blocksize
    parts = [a[:full].reshape(-1, blocksize).max(axis=1)] if full else []
    if full < n:
        parts.append(a[full:].max(keepdims=True))
    return xp.concatenate(parts) if len(parts) > 1 else parts[0]


def absmax_per_block(x, blocksize: int):
    """The scale of each block: its largest absolute value.

        absmax[b] = max_{i in block b} |x_i|,   block b = x[b*blocksize : (b+1)*blocksize]

    Args:
        x: float array of any shape, n elements (flattened in C order).
        blocksize: elements per block, any positive integer.
    Returns:
        float32 array of shape (ceil(n / blocksize),).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    blocksize = check_blocksize(blocksize)
    flat = as_float32_flat(x)
    return _block_max(xp.abs(flat), blocksize)


# ---------------------------------------------------------------------------------------------
# step 3: normalise each block into [-1, 1]
# ---------------------------------------------------------------------------------------------

def scale_to_unit(x, absmax, blocksize: int, out=None):
    """Divide every block by its absmax and clip into [-1, 1].

        scaled_i = clip(x_i * (1 / max(absmax[b], 1e-38)), -1, 1)

    Multiplying by the float32 reciprocal (not dividing) is what bitsandbytes does, so the
    rounding, and therefore which side of a midpoint a value lands on, matches it. The 1e-38
    floor makes an all-zero block scale to exact zeros instead of 0/0 = NaN. The clip catches
    ``absmax * (1/absmax)`` rounding to 1 + 1 ulp.

    Args:
        x: float32 array of shape (n_blocks * blocksize,): whole blocks only.
        absmax: float32 array of shape (n_blocks,).
        blocksize: elements per block.
        out: optional float32 array of shape (n_blocks * blocksize,) to write into.
    Returns:
        float32 array of shape (n_blocks * blocksize,), values in [-1, 1].

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    x = xp.asarray(x, dtype=xp.float32)
    if out is None:
        out = xp.empty(x.shape, dtype=xp.float32)
    inv = xp.float32(1.0) / xp.maximum(xp.asarray(absmax, dtype=xp.float32), xp.float32(TINY))
    xp.multiply(x.reshape(-1, blocksize), inv[:, None], out=out.reshape(-1, blocksize))
    return xp.clip(out, -1.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------
# step 4: nearest code, ties to the lower code
# ---------------------------------------------------------------------------------------------

def midpoints(code):
    """Decision thresholds between neighbouring levels of a sorted code (float32, as bnb).

        mid_k = (code[k] + code[k+1]) / 2,   k = 0 .. K-2

    Args:
        code: sorted table, shape (K,).
    Returns:
        float32 array of shape (K-1,).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    c = xp.asarray(code, dtype=xp.float32)
    return (c[:-1] + c[1:]) / xp.float32(2.0)


def _nearest_from_midpoints(scaled, mids, out=None, scratch=None):
    """Index of the first midpoint >= value (= number of midpoints strictly below the value).

    ``scratch`` is an optional bool buffer at least as long as ``scaled`` (reused across slices).
    """
    if out is None:
        out = xp.empty(scaled.shape, dtype=xp.uint8)
    if mids.shape[0] <= 15 and not is_cupy():
        # For a 16-entry code, 15 vectorised comparisons beat NumPy's binary search ~10x.
        # Counting the midpoints below the value is exactly searchsorted(..., side="left").
        greater, add, flat_out = xp.greater, xp.add, out.reshape(-1)
        s = scaled.reshape(-1)
        hit = xp.empty(s.shape, dtype=xp.bool_) if scratch is None else scratch[: s.shape[0]]
        hit_u8 = hit.view(xp.uint8)
        m = mids.tolist()                                   # Python floats, exact float32 values
        greater(s, m[0], out=flat_out.view(xp.bool_))
        for t in m[1:]:
            greater(s, t, out=hit)
            add(flat_out, hit_u8, out=flat_out)
        return out
    out[...] = xp.searchsorted(mids, scaled, side="left")
    return out


def nearest_code(scaled, code, out=None):
    """For each value, the index of the nearest code level; a tie goes to the lower index.

        q = #{k : mid_k < scaled}   ==   searchsorted(mid, scaled, side="left")

    A value exactly on a midpoint ``mid_k`` is *not* counted (``<`` is strict), so it gets
    code ``k``, the lower neighbour. This is bitsandbytes' rule in all its backends
    (CUDA ``x > t`` trees, ``torch.bucketize(right=False)``).

    Args:
        scaled: float array of any shape, usually in [-1, 1].
        code: sorted table of K <= 256 levels, shape (K,).
        out: optional uint8 array of the same shape as ``scaled``.
    Returns:
        uint8 array of the same shape as ``scaled``, values in 0..K-1.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    c = check_code(code)
    s = xp.asarray(scaled, dtype=xp.float32)
    return _nearest_from_midpoints(s, midpoints(c), out=out)


# ---------------------------------------------------------------------------------------------
# the whole round trip
# ---------------------------------------------------------------------------------------------

def _slice_len(blocksize: int, n: int) -> int:
    """Elements per slice: a whole, even number of blocks near _SLICE (or everything on CuPy)."""
    if is_cupy():
        return max(n, 1)
    k = max(2, (_SLICE // blocksize) // 2 * 2)  # even block count keeps slices byte-aligned
    return k * blocksize


def quantize_blockwise(x, code, blocksize: int):
    """Blockwise absmax quantisation of ``x`` to indices into ``code``.

        absmax[b] = max |x_b|,   q_i = nearest(code, clip(x_i / absmax[b(i)], -1, 1))

    Full blocks multiply by the float32 reciprocal of absmax; the partial last block divides
    (bitsandbytes' pure-PyTorch backend does exactly this, and rounding decides ties). An
    all-zero block stores absmax = 0 and the code of 0.0 (bnb stores 1e-38 for an all-zero
    *partial* block; every other absmax is the same).

    Args:
        x: float array (float16/32/64, computed in float32) of any shape, n >= 1 elements, finite.
        code: sorted table of K <= 256 levels in [-1, 1], shape (K,).
        blocksize: elements per block, any positive integer.
    Returns:
        q: uint8 array of shape (n,), indices into ``code``.
        absmax: float32 array of shape (ceil(n / blocksize),).
    Raises:
        TypeError / ValueError for a non-float, empty or non-finite ``x``, a bad ``blocksize``
        or an unsorted ``code``.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    blocksize = check_blocksize(blocksize)
    c = check_code(code)
    flat = as_float32_flat(x)                        # (n,)
    mids = midpoints(c)                              # (K-1,)
    n = flat.shape[0]
    n_full = (n // blocksize) * blocksize
    absmax = xp.empty(n_blocks(n, blocksize), dtype=xp.float32)
    q = xp.empty(n, dtype=xp.uint8)
    step = _slice_len(blocksize, n_full)

    def slices(i0, i1):                              # slices i0..i1-1, with their own scratch
        buf = xp.empty(min(step, n_full), dtype=xp.float32)
        hit = xp.empty(min(step, n_full), dtype=xp.bool_)
        for start in range(i0 * step, min(i1 * step, n_full), step):  # whole blocks each
            stop = min(start + step, n_full)
            b0, b1 = start // blocksize, stop // blocksize
            work = buf[: stop - start]
            xp.abs(flat[start:stop], out=work)
            am = _block_max(work, blocksize)         # (b1 - b0,)
            if not bool(xp.isfinite(am).all()):
                _raise_not_finite(x)
            absmax[b0:b1] = am
            if not _scale_nearest_fused(flat[start:stop], am, mids, q[start:stop], blocksize):
                scale_to_unit(flat[start:stop], am, blocksize, out=work)
                _nearest_from_midpoints(work, mids, out=q[start:stop], scratch=hit)

    parallel_chunks(-(-n_full // step), slices, min_per_thread=4)  # CPU cores; CuPy: 1 call
    if n_full < n:                                   # the partial last block
        tail = flat[n_full:]
        am = xp.abs(tail).max(keepdims=True)         # (1,)
        if not bool(xp.isfinite(am).all()):
            _raise_not_finite(x)
        absmax[-1:] = am
        scaled = xp.clip(tail / xp.maximum(am, xp.float32(TINY)), -1.0, 1.0)
        _nearest_from_midpoints(scaled, mids, out=q[n_full:])
    return q, absmax


def _take_valid(table, idx, out, axis=None):
    """``table[idx]`` along ``axis`` into ``out``, for indices already known to be in range.

    NumPy's default ``mode="raise"`` always buffers ``out`` (its documented behaviour) and is
    about 10x slower here; ``mode="wrap"`` gives the same result for valid indices. CuPy's
    ``take`` has no ``mode`` (it wraps).
    """
    if is_cupy():
        return xp.take(table, idx, axis=axis, out=out)
    return xp.take(table, idx, axis=axis, out=out, mode="wrap")


def _rescale_in_place(vals, absmax, blocksize: int, start: int):
    """Multiply ``vals`` (= out[start:start+m], start a multiple of blocksize) by block scales."""
    m = vals.shape[0]
    b0 = start // blocksize
    full = (m // blocksize) * blocksize
    if full:
        v = vals[:full].reshape(-1, blocksize)                       # (blocks, blocksize)
        xp.multiply(v, absmax[b0:b0 + full // blocksize, None], out=v)
    if full < m:                                                     # partial last block
        xp.multiply(vals[full:], absmax[b0 + full // blocksize], out=vals[full:])


def _check_absmax(absmax, n: int, blocksize: int):
    absmax = xp.asarray(absmax, dtype=xp.float32).reshape(-1)
    if absmax.shape[0] != n_blocks(n, blocksize):
        raise QuantError(f"absmax has {absmax.shape[0]} entries but {n} elements in blocks of "
                         f"{blocksize} need ceil({n}/{blocksize}) = {n_blocks(n, blocksize)}")
    return absmax


def _check_out_shape(shape, n: int):
    out_shape = tuple(int(s) for s in shape)
    if math.prod(out_shape) != n:
        raise QuantError(f"shape {out_shape} holds {math.prod(out_shape)} elements but there "
                         f"are {n} codes")
    return out_shape


def dequantize_blockwise(q, absmax, code, blocksize: int, shape=None, dtype="float32"):
    """Map indices back to levels and rescale each block: ``x_hat_i = code[q_i] * absmax[b(i)]``.

    Computed in float32 (as bnb), then cast to ``dtype``. A block with absmax 0 gives exact zeros.

    Args:
        q: integer array of indices into ``code``, n elements (any shape).
        absmax: float array of shape (ceil(n / blocksize),).
        code: table of K levels, shape (K,) (any order: it is only looked up).
        blocksize: elements per block.
        shape: output shape (default: q's shape); must hold n elements.
        dtype: output dtype name, e.g. "float32" (default) or "float16".
    Returns:
        array of shape ``shape`` and dtype ``dtype``.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    blocksize = check_blocksize(blocksize)
    c = check_code(code, require_sorted=False)
    q = xp.asarray(q)
    if q.dtype.kind not in "iu":
        raise TypeError(f"q must be an integer array of code indices; got dtype {q.dtype}")
    q = q.reshape(-1)
    n = q.shape[0]
    if n == 0:
        raise QuantError("q is empty; nothing to dequantise")
    out_shape = _check_out_shape(q.shape if shape is None else shape, n)
    absmax = _check_absmax(absmax, n, blocksize)
    if int(q.min()) < 0:
        raise QuantError(f"q holds the negative index {int(q.min())}; code indices are 0..{c.shape[0] - 1}")
    if int(q.max()) >= c.shape[0]:
        raise QuantError(f"q holds index {int(q.max())} but code has only {c.shape[0]} entries")
    out = xp.empty(n, dtype=xp.float32)
    step = _slice_len(blocksize, n)

    def slices(i0, i1):                              # slices keep the index temporaries in cache
        for start in range(i0 * step, min(i1 * step, n), step):
            stop = min(start + step, n)
            _take_valid(c, q[start:stop], out[start:stop])         # q < K checked above
            _rescale_in_place(out[start:stop], absmax, blocksize, start)

    parallel_chunks(-(-n // step), slices, min_per_thread=4)
    return out.reshape(out_shape).astype(dtype, copy=False)


def dequantize_packed(packed, absmax, code, blocksize: int, n: int, shape=None,
                      dtype="float32"):
    """Dequantise packed 4-bit codes directly: one table lookup per *byte*.

        pairs[b] = (code[b >> 4], code[b & 0xF])   for b = 0..255        (256, 2) table
        x_hat[2j], x_hat[2j+1] = pairs[packed[j]] * absmax of their blocks

    Same result as ``dequantize_blockwise(unpack_nibbles(packed, n), absmax, code, ...)``,
    without materialising the unpacked codes (about twice as fast on NumPy).

    Args:
        packed: uint8 array with ceil(n / 2) bytes (any shape).
        absmax: float array of shape (ceil(n / blocksize),).
        code: 16-entry table, shape (16,).
        blocksize: elements per block; n: number of elements.
        shape: output shape (default (n,)); dtype: output dtype name (default "float32").
    Returns:
        array of shape ``shape`` and dtype ``dtype``.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    blocksize = check_blocksize(blocksize)
    c = check_code(code, n_entries=16, require_sorted=False)
    packed = xp.asarray(packed)
    if packed.dtype != xp.uint8:
        raise TypeError(f"packed must be a uint8 array; got dtype {packed.dtype}")
    packed = packed.reshape(-1)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise QuantError(f"n must be a positive integer; got {n!r}")
    if packed.shape[0] != (n + 1) // 2:
        raise QuantError(f"packed has {packed.shape[0]} bytes but {n} codes need "
                         f"ceil({n}/2) = {(n + 1) // 2}")
    out_shape = _check_out_shape((n,) if shape is None else shape, n)
    absmax = _check_absmax(absmax, n, blocksize)
    byte = xp.arange(256)
    pairs = xp.stack([c[byte >> 4], c[byte & 15]], axis=1)         # (256, 2) float32
    out = xp.empty(2 * packed.shape[0], dtype=xp.float32)           # (n rounded up to even,)
    step = _slice_len(blocksize, n)                                 # even, whole blocks

    def slices(i0, i1):
        for start in range(i0 * step, min(i1 * step, n), step):
            stop = min(start + step, n)
            j0, j1 = start // 2, (stop + 1) // 2
            _take_valid(pairs, packed[j0:j1], out[2 * j0:2 * j1].reshape(-1, 2),
                        axis=0)                                      # bytes < 256
            _rescale_in_place(out[start:stop], absmax, blocksize, start)

    parallel_chunks(-(-n // step), slices, min_per_thread=4)        # over the CPU's cores
    return out[:n].reshape(out_shape).astype(dtype, copy=False)
