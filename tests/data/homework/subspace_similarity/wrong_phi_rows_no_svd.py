# Planted mistake: phi uses the rows of A directly (normalised to unit length) instead of an
# orthonormal basis from the SVD.
# expect-fail: test_phi_same_and_orthogonal: phi(A, 5 A, 4, 4) differs from 1 (same subspace)
# expect-fail: test_phi_principal_angles: differs from the expected value (mean cos^2 of the principal angles)
import numpy as np


def phi(A1, A2, i, j):
    U1 = (A1[:i] / np.linalg.norm(A1[:i], axis=1, keepdims=True)).T
    U2 = (A2[:j] / np.linalg.norm(A2[:j], axis=1, keepdims=True)).T
    return float(np.sum((U1.T @ U2) ** 2) / min(i, j))


def count_intruders(W0, W_tuned, k=10, eps=0.5):
    U0 = np.linalg.svd(W0, full_matrices=False)[0]
    Ut = np.linalg.svd(W_tuned, full_matrices=False)[0]
    return int((np.abs(Ut[:, :k].T @ U0).max(axis=1) < eps).sum())
