# Planted mistake: eps is hard-coded to 1e-5 instead of the argument, so only the test with
# eps = 0.1 notices.
# expect-fail: test_expected_values_3d: dx differs from the expected values (eps = 0.1)
# expect-fail: test_dx_finite_differences: (hidden test: a (2, 3, 7) input, eps = 0.3)
# expect-pass: test_shapes
import numpy as np


def layernorm_backward(dout, x, w, eps=1e-5):
    C = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                 - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    dw = (dout * norm).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    return dx, dw, db
