# Planted mistake: absmax = max(x) instead of max(|x|), so a block whose largest magnitude is
# negative is scaled outside [-1, 1]; and the low nibble is packed first.
# expect-fail: test_absmax: absmax differs from the expected absmax, 4 (max |x|, not max x)
# expect-fail: test_pack: packed differs from the expected bytes (first code in the high nibble)
import numpy as np


def quantize_block(x, code):
    absmax = float(x.max())
    scaled = x / np.float32(absmax) if absmax != 0 else np.zeros_like(x)
    q = np.abs(scaled[:, None] - code[None, :]).argmin(axis=1).astype(np.uint8)
    return q, absmax


def dequantize_block(q, absmax, code):
    return code[q] * np.float32(absmax)


def pack_codes(q):
    q = q.astype(np.uint8)
    return q[0::2] | (q[1::2] << 4)
