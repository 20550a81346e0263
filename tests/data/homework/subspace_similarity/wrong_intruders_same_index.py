# Planted mistake: each fine-tuned singular vector is compared only with the pretrained one of the
# same rank, not with all of them, so every vector pushed down by a new direction looks new.
# expect-fail: test_intruders_planted: found 5 intruder(s) among the top 5, expected the 2 planted
# expect-pass: test_intruders_none_for_noise
import numpy as np


def phi(A1, A2, i, j):
    U1 = np.linalg.svd(A1, full_matrices=False)[2][:i].T
    U2 = np.linalg.svd(A2, full_matrices=False)[2][:j].T
    return float(np.sum((U1.T @ U2) ** 2) / min(i, j))


def count_intruders(W0, W_tuned, k=10, eps=0.5):
    U0 = np.linalg.svd(W0, full_matrices=False)[0]
    Ut = np.linalg.svd(W_tuned, full_matrices=False)[0]
    cos = np.abs(np.sum(Ut[:, :k] * U0[:, :k], axis=0))
    return int((cos < eps).sum())
