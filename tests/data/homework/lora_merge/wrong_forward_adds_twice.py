# Planted mistake: forward() always adds the adapter path, so a merged layer applies ΔW twice.
# expect-fail: test_forward_same_after_merge: y (merged) differs from the output before merge()
# expect-fail: test_double_merge_refused: y after the refused second merge() differs
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
        return x @ self.W.T + self.b + self.scaling * (x @ self.A.T) @ self.B.T

    def merge(self):
        if self.merged:
            raise ValueError("already merged")
        self.W += self.delta_weight()
        self.merged = True

    def unmerge(self):
        if not self.merged:
            warnings.warn("not merged", UserWarning)
            return
        self.W -= self.delta_weight()
        self.merged = False
