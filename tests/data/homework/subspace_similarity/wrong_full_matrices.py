# Planted mistake: NumPy's default np.linalg.svd(W, full_matrices=True). For a 24 x 12 W0, U0 then
# has 24 columns: 12 of them span directions W0 never uses, and one of the planted directions is
# close enough to one of those to look familiar. The test's hint names the fix.
# expect-fail: test_intruders_planted: hint: W0 (24 x 12) has 12 singular vectors
# expect-fail: test_intruders_planted: use full_matrices=False
# expect-pass: test_intruders_none_for_noise
# expect-pass: test_phi_principal_angles
import numpy as np


def phi(A1, A2, i, j):
    U1 = np.linalg.svd(A1)[2][:i].T
    U2 = np.linalg.svd(A2)[2][:j].T
    return float(np.sum((U1.T @ U2) ** 2) / min(i, j))


def count_intruders(W0, W_tuned, k=10, eps=0.5):
    U0 = np.linalg.svd(W0)[0]
    Ut = np.linalg.svd(W_tuned)[0]
    best = np.abs(Ut[:, :k].T @ U0).max(axis=1)
    return int((best < eps).sum())
