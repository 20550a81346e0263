# Planted mistake: dx forgets that the variance depends on x (the norm * mean(dnorm * norm) term).
# expect-fail: test_dx_finite_differences: dx differs from finite differences
# expect-fail: test_expected_values_3d: dx differs from the expected values
import numpy as np


def layernorm_backward(dout, x, w, eps=1e-5):
    C = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(axis=-1, keepdims=True))
    dw = (dout * norm).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    return dx, dw, db
