# A wrapper of minilora's own implementation: correct, and it must score zero (NumPy only).
# expect-zero: the graded functions may use NumPy only
import numpy as np

from minilora.nn import ops


def layernorm_backward(dout, x, w, eps=1e-5):
    _, cache = ops.layernorm_forward(x, w, np.zeros_like(w), eps)
    return ops.layernorm_backward(dout, cache)
