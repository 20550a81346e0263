# A wrapper of minilora's own blockwise quantiser: correct, and it must score zero (NumPy only).
# expect-zero: the graded functions may use NumPy only
import numpy as np

from minilora.quant import dequantize_blockwise, pack_nibbles, quantize_blockwise


def quantize_block(x, code):
    q, absmax = quantize_blockwise(x, code, x.size)
    return q, float(absmax[0])


def dequantize_block(q, absmax, code):
    return dequantize_blockwise(q, np.array([absmax], dtype=np.float32), code, q.size)


def pack_codes(q):
    return pack_nibbles(q)
