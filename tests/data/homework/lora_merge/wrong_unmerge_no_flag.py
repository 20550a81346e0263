# Planted mistake: unmerge() subtracts ΔW but forgets to reset the merged flag, and a needless
# unmerge() subtracts anyway (no check, no warning).
# expect-fail: test_unmerge_restores: after unmerge(), merged should be False
# expect-fail: test_unmerge_when_not_merged: unmerge() on a layer that is not merged should warn

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
        if self.merged:
            raise ValueError("already merged")
        self.W += self.delta_weight()
        self.merged = True

    def unmerge(self):
        self.W -= self.delta_weight()
