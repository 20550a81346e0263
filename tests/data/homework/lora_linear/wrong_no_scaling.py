# Planted mistake: the scaling factor is left out of the adapter path (forward and dA, dB).
# expect-fail: test_forward_expected: y differs from the expected values (scaling 8 / 2)
# expect-fail: test_dA_dB_finite_differences: dA differs from finite differences
# expect-pass: test_forward_B_zero

def lora_forward(x, W0, b, A, B, scaling):
    return x @ W0.T + b + (x @ A.T) @ B.T


def lora_backward(dout, x, W0, A, B, scaling):
    d_in, d_out = x.shape[-1], W0.shape[0]
    x2, dout2 = x.reshape(-1, d_in), dout.reshape(-1, d_out)
    h = x2 @ A.T
    dB = dout2.T @ h
    dh = dout2 @ B
    dA = dh.T @ x2
    dx = (dout2 @ W0 + scaling * dh @ A).reshape(x.shape)
    return dx, dA, dB
