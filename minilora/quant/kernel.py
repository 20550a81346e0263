"""Steps 3 and 4 of the recipe in one pass on the GPU: scale, clip and nearest code as one CuPy
``ElementwiseKernel`` (the NumPy path, and CuPy without the kernel, use
:func:`minilora.quant.blockwise.scale_to_unit` then :func:`~minilora.quant.blockwise.nearest_code`).

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

from minilora.backend import is_cupy, xp

# bitsandbytes clamps the divisor at 1e-38 so that an all-zero block scales to 0 instead of 0/0
# (the same constant as minilora.quant.blockwise.TINY, which imports it from here).
TINY = 1e-38



# On CuPy, scaling, clipping and the nearest-code count are one kernel over the tensor instead of
# three passes through GPU memory. The same float32 operations as scale_to_unit followed by
# _nearest_from_midpoints (one multiply by the reciprocal, a clip, strict comparisons with the
# midpoints), so the codes are bit-identical; a test compares them where a GPU is present.
NEAREST_KERNEL_SOURCE = r"""
    float s = x * inv;                  // inv = 1 / max(absmax of the block, 1e-38), float32
    s = fminf(fmaxf(s, -1.0f), 1.0f);   // clip into [-1, 1] (input is finite: checked before)
    unsigned int k = 0;
    for (int j = 0; j < n_mids; ++j) {  // the number of midpoints strictly below s
        k += (s > mids[j]) ? 1u : 0u;
    }
    q = (unsigned char)k;
"""
USE_NEAREST_KERNEL = True   # False: the CuPy path uses the array functions (for comparisons)
_kernels: dict = {}         # array class -> compiled ElementwiseKernel, or None if unavailable


def _nearest_kernel():
    """The fused scale + nearest-code kernel of the active CuPy, or None.

    None on NumPy, with ``USE_NEAREST_KERNEL = False``, or where the array module cannot build
    kernels (the strict CuPy stand-in the tests use raises NotImplementedError): the caller
    then takes the array-function path.
    """
    if not is_cupy() or not USE_NEAREST_KERNEL:
        return None
    key = xp.ndarray
    if key not in _kernels:
        try:
            _kernels[key] = xp.ElementwiseKernel(
                "float32 x, float32 inv, raw float32 mids, int32 n_mids", "uint8 q",
                NEAREST_KERNEL_SOURCE, "minilora_scale_nearest_code")
        except NotImplementedError:
            _kernels[key] = None
    return _kernels[key]


def _scale_nearest_fused(x, absmax, mids, out, blocksize: int) -> bool:
    """``out = nearest(mids, clip(x * (1 / max(absmax, 1e-38)), -1, 1))`` in one kernel.

    x: float32 (m,) of whole blocks; absmax: float32 (m / blocksize,); out: uint8 (m,).
    Returns False (nothing written) when there is no kernel to run.
    """
    kernel = _nearest_kernel()
    if kernel is None:
        return False
    inv = xp.float32(1.0) / xp.maximum(absmax, xp.float32(TINY))     # (blocks,), as scale_to_unit
    kernel(x.reshape(-1, blocksize), inv[:, None], mids, int(mids.shape[0]),
           out.reshape(-1, blocksize))
    return True
