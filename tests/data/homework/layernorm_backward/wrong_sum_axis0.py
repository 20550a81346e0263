# Planted mistake: dw and db are summed over axis 0 only, which is right for a (N, C) input but
# leaves a (T, C) array for a (B, T, C) one.
# expect-fail: test_shapes: dw has shape (3, 5), expected (5,)
# expect-fail: test_expected_values_3d: dw has shape (3, 4), expected (4,)
import numpy as np


def layernorm_backward(dout, x, w, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                 - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    dw = (dout * norm).sum(axis=0)
    db = dout.sum(axis=0)
    return dx, dw, db
