# Planted mistake: q is the first level >= the scaled value (searchsorted on the levels), not the
# nearest level.
# expect-fail: test_nearest_code: q differs from the expected codes
# expect-pass: test_absmax
import numpy as np


def quantize_block(x, code):
    absmax = float(np.abs(x).max())
    scaled = x / np.float32(absmax) if absmax > 0 else np.zeros_like(x)
    q = np.searchsorted(code, scaled).astype(np.uint8)
    return q, absmax


def dequantize_block(q, absmax, code):
    return code[q] * np.float32(absmax)


def pack_codes(q):
    q = q.astype(np.uint8)
    return (q[0::2] << 4) | q[1::2]
