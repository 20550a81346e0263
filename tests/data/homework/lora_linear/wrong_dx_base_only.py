# Planted mistake: dx only goes back through the frozen W0 and forgets the adapter path (dh @ A).
# expect-fail: test_dx_finite_differences: dx differs from finite differences
# expect-fail: test_backward_expected: dx differs from the expected values
# expect-pass: test_dA_dB_finite_differences

def lora_forward(x, W0, b, A, B, scaling):
    return x @ W0.T + b + scaling * (x @ A.T) @ B.T


def lora_backward(dout, x, W0, A, B, scaling):
    d_in, d_out = x.shape[-1], W0.shape[0]
    x2, dout2 = x.reshape(-1, d_in), dout.reshape(-1, d_out)
    h = x2 @ A.T
    dB = scaling * dout2.T @ h
    dA = (scaling * dout2 @ B).T @ x2
    dx = (dout2 @ W0).reshape(x.shape)
    return dx, dA, dB
