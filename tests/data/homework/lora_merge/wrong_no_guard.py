# Planted mistake: merge() has no guard, so a second merge() silently adds ΔW again.
# expect-fail: test_double_merge_refused: should raise ValueError, but returned normally
# expect-pass: test_merge_adds_delta_w
import warnings


class MergeableLoRA:
    def __init__(self, W0, b, A, B, scaling):
        self.W = W0.copy()
        self.b, self.A, self.B = b, A, B
        self.scaling = scaling
        self.merged = False

    def delta_weight(self):
        return self.scaling * (self.B @ self.A)

    def forward(self, x):
        y = x @ self.W.T + self.b
        if not self.merged:
            y = y + self.scaling * (x @ self.A.T) @ self.B.T
        return y

    def merge(self):
        self.W += self.delta_weight()
        self.merged = True

    def unmerge(self):
        if not self.merged:
            warnings.warn("not merged", UserWarning)
            return
        self.W -= self.delta_weight()
        self.merged = False
