"""Input checks for the quantisers, one clear :class:`QuantError` each: block sizes, code tables,
float32 inputs, block counts (step 1 of the recipe in :mod:`minilora.quant.blockwise`).

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

import math
import numbers

from minilora.backend import cpu_module, xp
from minilora.errors import MiniloraError

F32_MAX = 3.4028234663852886e38  # largest finite float32


class QuantError(MiniloraError, ValueError):
    """Quantisation input that cannot be handled: a bad block size, code table, shape, dtype,
    non-finite value, or a state that does not match its packed codes."""


# ---------------------------------------------------------------------------------------------
# input checks (one clear error each)
# ---------------------------------------------------------------------------------------------

def check_blocksize(blocksize, name: str = "blocksize") -> int:
    """Return ``blocksize`` as a Python int, or raise if it is not a positive integer.

    Args:
        blocksize: any positive integer (bool is refused). bitsandbytes itself only allows the
            powers of two 32..4096 for 4-bit; minilora accepts any size so blocks can be studied.
    Returns:
        int.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer (e.g. 64); got {blocksize!r} "
                        f"of type {type(blocksize).__name__}")
    if blocksize <= 0:
        raise QuantError(f"{name} must be a positive integer (e.g. 64); got {int(blocksize)}")
    return int(blocksize)


def check_code(code, n_entries: int | None = None, require_sorted: bool = True, name: str = "code"):
    """Validate a code table and return it as a float32 ``xp`` array.

    Args:
        code: 1-D table of levels in [-1, 1], shape (K,), 2 <= K <= 256 (codes are stored as uint8).
        n_entries: if given, the exact K required (16 for a 4-bit code).
        require_sorted: the nearest-code search uses midpoints of adjacent entries, so it needs
            the table in non-decreasing order.
    Returns:
        float32 array of shape (K,).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    c = xp.asarray(code)
    if c.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric 1-D table; got dtype {c.dtype}")
    c = c.astype(xp.float32, copy=False)
    if c.ndim != 1:
        raise QuantError(f"{name} must be 1-D; got shape {tuple(c.shape)}")
    k = int(c.shape[0])
    if n_entries is not None and k != n_entries:
        raise QuantError(f"{name} must have exactly {n_entries} entries "
                         f"({n_entries} = 2**{n_entries.bit_length() - 1} codes); got {k}")
    if not 2 <= k <= 256:
        raise QuantError(f"{name} must have between 2 and 256 entries (codes are stored as uint8); "
                         f"got {k}")
    if not bool(xp.isfinite(c).all()):
        raise QuantError(f"{name} must contain only finite values")
    if require_sorted and bool((c[1:] < c[:-1]).any()):
        raise QuantError(f"{name} must be sorted in non-decreasing order (the nearest-code search "
                         "uses midpoints of neighbours); sort it, or use quantize_4bit, which "
                         "accepts a table in any order")
    return c


def as_float32_flat(x, name: str = "x"):
    """Flatten ``x`` (C order) to a float32 ``xp`` array, refusing non-float or empty input.

    Args:
        x: floating array of any shape (float16, float32 or float64), at least one element.
    Returns:
        float32 array of shape (n,); a view of ``x`` when it already is contiguous float32.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    a = xp.asarray(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array (float16, float32 or float64); "
                        f"got dtype {a.dtype}")
    if a.size == 0:
        raise QuantError(f"{name} is empty (shape {tuple(a.shape)}); quantisation needs at least "
                         "one element")
    if a.dtype.itemsize > 4:  # float64: a finite value could overflow to inf in float32
        big = float(xp.abs(a).max())
        if math.isfinite(big) and big > F32_MAX:
            raise QuantError(f"{name} has values beyond float32's range (max |{name}| = "
                             f"{big:.3g} > 3.4e38); quantisation computes in float32")
    return a.astype(xp.float32, copy=False).reshape(-1)


def _raise_not_finite(x, name: str = "x"):
    flat = xp.asarray(x).reshape(-1)
    bad = flat[~xp.isfinite(flat)]
    i = int(xp.flatnonzero(~xp.isfinite(flat))[0])
    kinds = "NaN" if bool(xp.isnan(bad).all()) else ("inf" if not bool(xp.isnan(bad).any())
                                                     else "NaN and inf")
    raise QuantError(f"{name} contains {kinds} ({int(bad.size)} value(s), first at flat "
                     f"index {i}); only finite values can be quantised")


def n_blocks(n: int, blocksize: int) -> int:
    """Number of blocks for ``n`` elements; the last one may be partial.

        n_blocks = ceil(n / blocksize) = -(-n // blocksize)

    Args:
        n: number of elements; blocksize: elements per block.
    Returns:
        int.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    return -(-n // blocksize)


def linspace_float32(start: float, stop: float, num: int):
    """``num`` evenly spaced float32 values, rounded exactly as torch's CPU ``linspace`` does.

    bitsandbytes builds its tables from ``torch.linspace``; NumPy's ``linspace`` differs from it
    by one float32 ulp in some entries (22 of the 256 dynamic-map levels). Torch steps *forward*
    from ``start`` for the first half and *backward* from ``stop`` for the second half, with a
    float32 step and one fused multiply-add (a single rounding) per value:

        step = fl32((stop - start) / (num - 1))
        v_i  = fl32(start + step * i)              for i <  num // 2
        v_i  = fl32(stop - step * (num - 1 - i))   for i >= num // 2

    The product of a float32 and a small integer is exact in float64, so float64 arithmetic
    followed by one cast to float32 reproduces the fused operation. CPU-only setup (NumPy).

    Args:
        start, stop: end points (rounded to float32 first); num: number of points (>= 2).
    Returns:
        NumPy float32 array of shape (num,).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    np = cpu_module()
    f32, f64 = np.float32, np.float64
    a, b = f32(start), f32(stop)
    step = f64(f32((b - a) / f32(num - 1)))
    i = np.arange(num, dtype=f64)
    fwd = f64(a) + step * i                      # exact in float64; rounded once below
    bwd = f64(b) - step * (num - 1 - i)
    return np.where(i < num // 2, fwd, bwd).astype(f32)
