# A wrapper of minilora's own LoRALinear: correct, and it must score zero (NumPy only).
# expect-zero: the graded functions may use NumPy only
from minilora.methods.lora import LoRALinear
from minilora.nn.layers import Linear


def _layer(W0, b, A, B, scaling):
    r = A.shape[0]
    layer = LoRALinear(Linear(W0.copy(), b.copy()), r=r, lora_alpha=scaling * r,
                       init_lora_weights=False)
    layer.params["lora_A"], layer.params["lora_B"] = A.copy(), B.copy()
    return layer


def lora_forward(x, W0, b, A, B, scaling):
    return _layer(W0, b, A, B, scaling).forward(x)[0]


def lora_backward(dout, x, W0, A, B, scaling):
    layer = _layer(W0, W0[:, 0] * 0, A, B, scaling)
    dx = layer.backward(dout, layer.forward(x)[1])
    return dx, layer.grads["lora_A"], layer.grads["lora_B"]
