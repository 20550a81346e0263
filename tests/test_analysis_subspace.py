"""φ, principal angles, the random baseline, amplification and intruder dimensions (float64, seeded)."""
import numpy as np
import pytest

from minilora.analysis import (
    AnalysisError,
    amplification_factor,
    intruder_dimensions,
    intruders_from_weights,
    lowrank_svd,
    perturbed_similarities,
    phi_grid,
    phi_random_expectation,
    phi_random_sampled,
    principal_angles,
    project_onto,
    random_orthonormal,
    random_projection_expectation,
    scale_singular_directions,
    singular_values,
    subspace_similarity,
    svd,
)


def with_spectrum(rng, m, n, s):
    U, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (U * s) @ V.T


def test_phi_is_one_for_identical_and_nested_subspaces(rng):
    U = random_orthonormal(30, 6, rng)
    for i in range(1, 7):
        assert subspace_similarity(U, U, i, i) == pytest.approx(1.0)
    assert np.allclose(phi_grid(U, U), 1.0)             # the smaller is always inside the larger
    # a rotation inside the same span keeps φ(6, 6) = 1, not φ(1, 1)
    R, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    assert subspace_similarity(U, U @ R, 6, 6) == pytest.approx(1.0)


def test_phi_is_zero_for_orthogonal_subspaces(rng):
    Q = random_orthonormal(20, 10, rng)
    assert np.allclose(phi_grid(Q[:, :4], Q[:, 4:]), 0.0, atol=1e-14)
    assert np.allclose(principal_angles(Q[:, :4], Q[:, 4:]), np.pi / 2)


def test_phi_grid_matches_the_definition(rng):
    Ua, Ub = random_orthonormal(25, 4, rng), random_orthonormal(25, 7, rng)
    G = phi_grid(Ua, Ub)
    assert G.shape == (4, 7)
    for i in range(1, 5):
        for j in range(1, 8):
            direct = np.linalg.norm(Ua[:, :i].T @ Ub[:, :j]) ** 2 / min(i, j)
            assert G[i - 1, j - 1] == pytest.approx(direct)
            assert G[i - 1, j - 1] == pytest.approx(subspace_similarity(Ua, Ub, i, j))


def test_principal_angle_of_two_lines():
    theta = 0.3
    e1 = np.array([[1.0], [0.0], [0.0]])
    u = np.array([[np.cos(theta)], [np.sin(theta)], [0.0]])
    assert principal_angles(e1, u) == pytest.approx([theta])
    assert subspace_similarity(e1, u, 1, 1) == pytest.approx(np.cos(theta) ** 2)


def test_random_phi_expectation_by_sampling(rng):
    # E φ(i, j) = max(i, j) / d, derived in the module docstring; check it two ways
    d, i, j, n = 40, 3, 7, 2000
    mean, std = phi_random_sampled(i, j, d, rng, n_samples=n)
    assert abs(mean - phi_random_expectation(i, j, d)) < 4 * std / np.sqrt(n)
    # one subspace fixed, the other random: same expectation
    fixed = random_orthonormal(d, j, np.random.default_rng(99))
    vals = [subspace_similarity(random_orthonormal(d, i, rng), fixed, i, j) for _ in range(n)]
    assert abs(np.mean(vals) - 7 / 40) < 4 * np.std(vals) / np.sqrt(n)
    # the facts that make φ hard to read in a narrow model
    assert phi_random_expectation(8, 64, 64) == 1.0
    assert phi_random_expectation(8, 64, 768) == pytest.approx(0.0833, abs=1e-4)
    grid = phi_random_expectation(np.arange(1, 9)[:, None], np.arange(1, 65)[None, :], 128)
    assert grid.shape == (8, 64) and grid[-1, -1] == 0.5
    with pytest.raises(AnalysisError):
        phi_random_expectation(3, 70, 64)


def test_phi_rejects_non_orthonormal_bases(rng):
    with pytest.raises(AnalysisError, match="orthonormal"):
        subspace_similarity(rng.standard_normal((10, 2)), random_orthonormal(10, 2, rng), 1, 1)
    with pytest.raises(AnalysisError, match="same space"):
        phi_grid(random_orthonormal(10, 2, rng), random_orthonormal(11, 2, rng))


def test_amplification_aligned_vs_random_direction(rng):
    # W with known spectrum; ΔW = c u1 v1ᵀ along W's own top direction projects onto σ_1,
    # so the factor is c / σ_1 (small); a random rank-1 ΔW sees only ~||W||_F / sqrt(d_out d_in)
    # of W, so its factor is far larger: ΔW that re-uses W's top direction amplifies nothing new.
    s = np.linspace(10.0, 0.5, 40)
    W = with_spectrum(rng, 60, 40, s)
    U, sw, Vh = svd(W)
    c = 2.0
    aligned = lowrank_svd(c * U[:, :1], Vh[:1])
    amp_aligned = amplification_factor(W, *aligned)
    assert amp_aligned == pytest.approx(c / s[0])
    u, v = random_orthonormal(60, 1, rng), random_orthonormal(40, 1, rng)
    amp_random = amplification_factor(W, *lowrank_svd(c * u, v.T))
    assert amp_random > 10 * amp_aligned
    # ||U_rᵀ W V_r|| with W's own top-r vectors is sqrt(Σ_{i<=r} σ_i²)
    assert np.linalg.norm(project_onto(W, U[:, :3], Vh[:3])) == pytest.approx(
        np.sqrt(np.sum(s[:3] ** 2)))


def test_random_projection_expectation_by_sampling(rng):
    W = with_spectrum(rng, 30, 20, np.linspace(5, 1, 20))
    r, n = 3, 3000
    vals = [np.linalg.norm(random_orthonormal(30, r, rng).T @ W @ random_orthonormal(20, r, rng)) ** 2
            for _ in range(n)]
    expect = random_projection_expectation(W, r) ** 2          # r² ||W||_F² / (d_out d_in)
    assert abs(np.mean(vals) - expect) < 4 * np.std(vals) / np.sqrt(n)


@pytest.mark.slow  # an end-to-end run; CI runs -m slow
def test_intruders_found_when_planted(rng):
    # App. A.2 of the intruder paper: add λ u wᵀ with random unit u, w and λ > σ_max(W)
    d = 128
    W0 = with_spectrum(rng, d, d, np.linspace(5.0, 0.1, d))
    u, w = random_orthonormal(d, 1, rng), random_orthonormal(d, 1, rng)
    W_t = W0 + 15.0 * u @ w.T
    found = intruders_from_weights(W0, W_t, k=10, eps=0.5)
    assert found.count >= 1 and 0 in found.indices
    assert found.similarities[0] < 0.5
    assert np.all(found.tail_bound == 0.0)
    # the new top vector is essentially u
    assert abs(svd(W_t).U[:, 0] @ u[:, 0]) > 0.95


def test_no_intruders_for_a_small_perturbation(rng):
    d = 64
    W0 = with_spectrum(rng, d, d, 10.0 * 0.9 ** np.arange(d))
    noise = rng.standard_normal((d, d))
    W_t = W0 + 1e-3 * np.linalg.norm(W0) * noise / np.linalg.norm(noise)
    found = intruders_from_weights(W0, W_t, k=10, eps=0.5)
    assert found.count == 0 and found.indices.size == 0
    assert np.all(found.similarities > 0.9)
    null = perturbed_similarities(W0, 1e-3, 10, rng, n_draws=3)
    assert null.shape == (3, 10) and np.all(null > 0.9)


def test_intruder_tail_bound_with_a_truncated_base(rng):
    d = 50
    W0 = with_spectrum(rng, d, d, np.linspace(4, 1, d))
    U0 = svd(W0).U
    Ut = random_orthonormal(d, 5, rng)
    part = intruder_dimensions(U0[:, :10], Ut, k=5, eps=0.5)
    true_rest = np.abs(U0[:, 10:].T @ Ut).max(axis=0)
    assert np.all(part.tail_bound >= true_rest - 1e-12)
    full = intruder_dimensions(U0, Ut, k=5, eps=0.5)
    assert np.all(full.similarities >= part.similarities)


def test_intruder_arguments_checked(rng):
    U = random_orthonormal(10, 10, rng)
    with pytest.raises(AnalysisError, match="eps"):
        intruder_dimensions(U, U, k=3, eps=0.0)
    with pytest.raises(AnalysisError, match="k must be"):
        intruder_dimensions(U, U[:, :2], k=3)


def test_scale_singular_directions(rng):
    s = np.array([6.0, 4.0, 3.0, 1.0])
    W = with_spectrum(rng, 8, 6, s)
    assert np.allclose(scale_singular_directions(W, [], 0.0), W)
    assert np.allclose(scale_singular_directions(W, [1], 1.0), W)
    assert np.allclose(singular_values(scale_singular_directions(W, [1], 0.5))[:4], [6, 3, 2, 1])
    removed = scale_singular_directions(W, [0, 2], 0.0)
    assert np.allclose(singular_values(removed)[:2], [4.0, 1.0])
    assert np.allclose(singular_values(scale_singular_directions(W, [0, 3], [0.5, 2.0]))[:4],
                       [4, 3, 3, 2])
    with pytest.raises(AnalysisError, match="indices"):
        scale_singular_directions(W, [6], 0.5)


@pytest.mark.parametrize("n,mean", [(64, 0.33), (256, 0.19)])
def test_typical_max_cosine_of_a_random_vector_quoted_in_the_intruder_docstring(rng, n, mean):
    # against any orthonormal basis (here the identity) a random unit vector's best |cos| is
    # max_i |x_i|: about 0.33 at n = 64 and 0.19 at n = 256, far above the floor 1/sqrt(n)
    x = rng.standard_normal((2000, n))
    best = np.abs(x).max(axis=1) / np.linalg.norm(x, axis=1)
    assert best.mean() == pytest.approx(mean, abs=0.01)
    assert best.min() >= 1 / np.sqrt(n)
