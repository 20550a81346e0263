"""The SVD toolkit on matrices whose spectra are known by construction (float64, seeded)."""
import numpy as np
import pytest

from minilora.analysis import (
    AnalysisError,
    effective_rank,
    energy_captured,
    energy_curve,
    lowrank_frobenius_norm,
    lowrank_svd,
    numerical_rank,
    randomized_svd,
    rank_for_energy,
    singular_values,
    stable_rank,
    truncate,
    truncation_errors,
)
from minilora.backend import xp


def with_spectrum(rng, m, n, s):
    """A random (m, n) matrix U diag(s) Vᵀ with exactly the singular values s (len <= min(m, n))."""
    U, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (U * s) @ V.T


def test_singular_values_of_diagonal_and_orthogonal(rng):
    d = np.array([3.0, -5.0, 0.5, 2.0])
    assert np.allclose(singular_values(np.diag(d)), [5.0, 3.0, 2.0, 0.5])
    Q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    assert np.allclose(singular_values(Q), np.ones(7))
    assert np.allclose(singular_values(2.5 * Q[:, :3]), 2.5 * np.ones(3))


def test_rank_k_product_has_k_nonzero_singular_values(rng):
    W = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 15))
    s = singular_values(W)
    assert s.shape == (15,)
    assert numerical_rank(s) == 3
    assert np.all(s[3:] < 1e-12 * s[0])


def test_energy_on_known_spectrum():
    s = np.array([3.0, 2.0, 1.0, 0.0])           # squares 9, 4, 1, 0: total 14
    assert energy_captured(s, 1) == pytest.approx(9 / 14)
    assert energy_captured(s, 2) == pytest.approx(13 / 14)
    assert energy_captured(s, 3) == 1.0 and energy_captured(s, 10) == 1.0
    assert energy_captured(s, 0) == 0.0
    assert np.allclose(energy_curve(s), [9 / 14, 13 / 14, 1.0, 1.0])
    assert rank_for_energy(s, 0.9) == 2 and rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(np.zeros(4)) == 0
    assert np.isnan(energy_captured(np.zeros(3), 1))          # undefined, not "all of it"


def test_effective_rank_limits():
    # n equal values: p uniform, H = ln n, erank = n; one non-zero value: erank = 1
    assert effective_rank(np.ones(6)) == pytest.approx(6.0)
    assert effective_rank(np.array([4.0, 0.0, 0.0])) == pytest.approx(1.0)
    # two values 3 and 1: p = (3/4, 1/4), erank = exp(-(.75 ln .75 + .25 ln .25))
    expect = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert effective_rank([3.0, 1.0]) == pytest.approx(expect)
    assert 1.0 < effective_rank([3.0, 1.0]) < 2.0
    assert effective_rank(np.zeros(3)) == 0.0


def test_stable_rank():
    assert stable_rank(np.ones(5)) == pytest.approx(5.0)
    assert stable_rank([2.0, 1.0]) == pytest.approx(5 / 4)     # (4 + 1) / 4
    assert stable_rank(np.zeros(2)) == 0.0


def test_truncation_error_equals_the_spectrum_tail(rng):
    s = np.array([10.0, 5.0, 2.0, 1.0, 0.5])
    W = with_spectrum(rng, 12, 9, s)
    for k in range(6):
        W_k, fro, spec = truncate(W, k)
        tail = s[k:]
        assert fro == pytest.approx(np.sqrt(np.sum(tail ** 2)), rel=1e-10, abs=1e-12)
        assert spec == pytest.approx(tail[0] if tail.size else 0.0, abs=1e-12)
        # the errors are the real distances of the returned matrix
        assert np.linalg.norm(W - W_k) == pytest.approx(fro, rel=1e-9, abs=1e-12)
        assert np.linalg.norm(W - W_k, 2) == pytest.approx(spec, rel=1e-9, abs=1e-12)
        assert np.linalg.matrix_rank(W_k, tol=1e-9) == min(k, 5)
    assert truncation_errors(s, 2) == pytest.approx((np.sqrt(4 + 1 + 0.25), 2.0))


def test_truncation_is_exact_when_the_rank_is_reached(rng):
    W = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 6))
    W_2, fro, spec = truncate(W, 2)
    assert np.allclose(W_2, W, atol=1e-12) and fro < 1e-12 and spec < 1e-12


def test_truncate_rejects_bad_k(rng):
    with pytest.raises(AnalysisError, match="k must be in"):
        truncate(rng.standard_normal((4, 3)), 4)
    with pytest.raises(AnalysisError, match="NaN"):
        singular_values(np.array([[1.0, np.nan]]))


@pytest.mark.parametrize("d_out,r,d_in,scale", [(40, 4, 30, 2.0), (12, 6, 50, -0.5), (5, 8, 7, 1.0)])
def test_lowrank_svd_equals_dense_svd(rng, d_out, r, d_in, scale):
    B, A = rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in))
    delta_w = scale * B @ A
    U, s, Vh = lowrank_svd(B, A, scale)
    p = min(r, d_out, d_in)
    assert U.shape == (d_out, p) and s.shape == (p,) and Vh.shape == (p, d_in)
    assert np.allclose(s, np.linalg.svd(delta_w, compute_uv=False)[:p], rtol=1e-12, atol=1e-12)
    assert np.allclose((U * s) @ Vh, delta_w, atol=1e-12)
    assert np.allclose(U.T @ U, np.eye(p)) and np.allclose(Vh @ Vh.T, np.eye(p))
    # the top singular vectors agree with the dense ones up to sign
    Ud, _, Vhd = np.linalg.svd(delta_w)
    assert abs(Ud[:, 0] @ U[:, 0]) == pytest.approx(1.0) and abs(Vhd[0] @ Vh[0]) == pytest.approx(1.0)
    assert lowrank_frobenius_norm(B, A, scale) == pytest.approx(np.linalg.norm(delta_w))


def test_lowrank_svd_of_a_zero_b_is_zero(rng):
    s = lowrank_svd(np.zeros((10, 3)), rng.standard_normal((3, 8)), 2.0).s
    assert np.all(s == 0.0)


def test_lowrank_svd_shape_mismatch(rng):
    with pytest.raises(AnalysisError, match="share r"):
        lowrank_svd(rng.standard_normal((5, 3)), rng.standard_normal((4, 6)))


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
def test_randomized_svd_error_on_a_slowly_decaying_spectrum(rng):
    # the matrix of the module docstring: 1000 x 600, σ_i = 1/i, no gap
    m, n, k = 1000, 600, 10
    sig = 1.0 / np.arange(1, n + 1)
    W = with_spectrum(rng, m, n, sig)
    U, s, Vh = randomized_svd(W, k, rng=np.random.default_rng(0))
    assert U.shape == (m, k) and s.shape == (k,) and Vh.shape == (k, n)
    assert np.max(np.abs(s - sig[:k]) / sig[:k]) < 1e-5
    assert np.linalg.norm(W - (U * s) @ Vh, 2) < (1 + 1e-6) * sig[k]      # Eckart-Young optimum
    # without power iterations the same sketch is visibly worse: what q buys
    s0 = randomized_svd(W, k, power_iters=0, rng=np.random.default_rng(0)).s
    assert np.max(np.abs(s0 - sig[:k]) / sig[:k]) > 1e-2


def test_randomized_svd_is_exact_for_low_rank_and_deterministic(rng):
    W = rng.standard_normal((80, 5)) @ rng.standard_normal((5, 60))
    U, s, Vh = randomized_svd(W, 5, rng=np.random.default_rng(3))
    assert np.allclose((U * s) @ Vh, W, atol=1e-9)
    assert np.array_equal(randomized_svd(W, 5).s, randomized_svd(W, 5).s)
    with pytest.raises(AnalysisError, match="k must be in"):
        randomized_svd(W, 61)


def test_accepts_arrays_of_the_active_backend(xpb, rng):
    W = rng.standard_normal((6, 4))
    assert np.allclose(singular_values(xp.asarray(W)), np.linalg.svd(W, compute_uv=False))
    B, A = rng.standard_normal((6, 2)), rng.standard_normal((2, 4))
    assert isinstance(lowrank_svd(xp.asarray(B), xp.asarray(A)).s, np.ndarray)
