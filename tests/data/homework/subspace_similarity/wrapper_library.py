# A wrapper of minilora's own analysis (subspace_similarity, intruders_from_weights): correct, and
# it must score zero (NumPy only).
# expect-zero: the graded functions may use NumPy only
import numpy as np

from minilora.analysis import intruders_from_weights, subspace_similarity


def phi(A1, A2, i, j):
    U1 = np.linalg.svd(A1, full_matrices=False)[2].T
    U2 = np.linalg.svd(A2, full_matrices=False)[2].T
    return subspace_similarity(U1, U2, i, j)


def count_intruders(W0, W_tuned, k=10, eps=0.5):
    return int(intruders_from_weights(W0, W_tuned, k=k, eps=eps).count)
