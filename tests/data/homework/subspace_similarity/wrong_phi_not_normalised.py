# Planted mistake: phi is ||U1^T U2||_F^2 without the division by min(i, j).
# expect-fail: test_phi_same_and_orthogonal: phi(A, 5 A, 4, 4) differs from 1 (same subspace)
# expect-fail: test_phi_principal_angles: phi(A1, A2, 2, 5) differs
import numpy as np


def phi(A1, A2, i, j):
    U1 = np.linalg.svd(A1, full_matrices=False)[2][:i].T
    U2 = np.linalg.svd(A2, full_matrices=False)[2][:j].T
    return float(np.sum((U1.T @ U2) ** 2))


def count_intruders(W0, W_tuned, k=10, eps=0.5):
    U0 = np.linalg.svd(W0, full_matrices=False)[0]
    Ut = np.linalg.svd(W_tuned, full_matrices=False)[0]
    return int((np.abs(Ut[:, :k].T @ U0).max(axis=1) < eps).sum())
