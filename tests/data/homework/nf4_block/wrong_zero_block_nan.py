# Planted mistake: no special case for an all-zero block: 0 / 0 gives NaN, and ties go to the
# upper level (argmin over the reversed table).
# expect-fail: test_zero_block: q differs from code 7
# expect-fail: test_ties_and_edges: (ties to the lower index)
import numpy as np


def quantize_block(x, code):
    absmax = float(np.abs(x).max())
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = x / np.float32(absmax)
    dist = np.abs(scaled[:, None] - code[None, ::-1])
    q = (len(code) - 1 - np.nan_to_num(dist, nan=0.0).argmin(axis=1)).astype(np.uint8)
    return q, absmax


def dequantize_block(q, absmax, code):
    return code[q] * np.float32(absmax)


def pack_codes(q):
    q = q.astype(np.uint8)
    return (q[0::2] << 4) | q[1::2]
