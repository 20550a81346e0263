# Planted mistake: dB is computed from the layer input x instead of the adapter's hidden h = x A^T,
# which cannot even have the shape of B.
# expect-fail: test_dA_dB_finite_differences: dB has shape (5, 6), expected (5, 2)
# expect-fail: test_backward_expected: dB has shape (3, 4), expected (3, 2)

def lora_forward(x, W0, b, A, B, scaling):
    return x @ W0.T + b + scaling * (x @ A.T) @ B.T


def lora_backward(dout, x, W0, A, B, scaling):
    d_in, d_out = x.shape[-1], W0.shape[0]
    x2, dout2 = x.reshape(-1, d_in), dout.reshape(-1, d_out)
    dB = scaling * dout2.T @ x2
    dh = scaling * dout2 @ B
    dA = dh.T @ x2
    dx = (dout2 @ W0 + dh @ A).reshape(x.shape)
    return dx, dA, dB
