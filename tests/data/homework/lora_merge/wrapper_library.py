# A wrapper of minilora's own LoRALinear (merge, unmerge, delta_weight): correct, and it must score
# zero (NumPy only).
# expect-zero: the graded functions may use NumPy only
from minilora.methods.lora import LoRALinear
from minilora.nn.layers import Linear


class MergeableLoRA:
    def __init__(self, W0, b, A, B, scaling):
        r = A.shape[0]
        self.layer = LoRALinear(Linear(W0.copy(), b.copy()), r=r, lora_alpha=scaling * r,
                                init_lora_weights=False)
        self.layer.params["lora_A"], self.layer.params["lora_B"] = A.copy(), B.copy()

    @property
    def W(self):
        return self.layer.params["weight"]

    @property
    def merged(self):
        return self.layer.merged

    def delta_weight(self):
        return self.layer.delta_weight()

    def forward(self, x):
        return self.layer.forward(x)[0]

    def merge(self):
        self.layer.merge()

    def unmerge(self):
        self.layer.unmerge()
