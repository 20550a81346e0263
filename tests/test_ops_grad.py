"""Every op's backward against centred finite differences (float64), on each backend.

The cases live in the library (``minilora.gradcheck.op_suite``) so that `minilora gradcheck` and
these tests check exactly the same things; each case is its own test id, named after the
gradient, so a failure says which one broke.
"""
import numpy as np
import pytest

from minilora import backend, gradcheck
from minilora.nn import ops


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_op_backward_matches_finite_differences(xpb, seed):
    rows = gradcheck.op_suite(seed)
    bad = [f"{r['name']} rel={r['rel_error']:.2e}" for r in rows if not r["ok"]]
    assert len(rows) >= 30
    assert not bad, "gradients that disagree with finite differences: " + "; ".join(bad)


def test_gradcheck_detects_a_wrong_gradient(rng):
    """The checker itself must fail a wrong backward (else every test above is vacuous)."""
    x = backend.asarray(rng.standard_normal((3, 4)))
    out, cache = ops.gelu_forward(x)
    dout = backend.asarray(rng.standard_normal(out.shape))
    wrong = ops.gelu_backward(dout, cache) * 1.01
    row = gradcheck.check("gelu (scaled by 1.01)", wrong,
                          lambda: (ops.gelu_forward(x)[0] * dout).sum(), x)
    assert not row["ok"] and row["rel_error"] > 5e-3


def test_numerical_grad_refuses_float32(rng):
    x = rng.standard_normal(3).astype(np.float32)
    with pytest.raises(TypeError, match="float64"):
        gradcheck.numerical_grad(lambda: x.sum(), x)


def test_vectorised_attention_equals_naive_loop(rng):
    for (B, T, P, C, NH) in [(2, 5, 0, 8, 2), (1, 4, 3, 6, 3)]:
        q = rng.standard_normal((B, T, C))
        k = rng.standard_normal((B, T + P, C))
        v = rng.standard_normal((B, T + P, C))
        y, _ = ops.attention_forward(q, k, v, NH)
        np.testing.assert_allclose(y, ops.attention_forward_naive(q, k, v, NH), atol=1e-12)


def test_cross_entropy_value_and_ignore_index(rng):
    logits = rng.standard_normal((4, 6))
    t = np.array([1, 0, ops.IGNORE_INDEX, 5])
    loss, _ = ops.cross_entropy_forward(logits, t)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.mean(np.log(p[[0, 1, 3], [1, 0, 5]]))
    assert abs(float(loss) - expected) < 1e-12
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        ops.cross_entropy_forward(logits, np.full(4, ops.IGNORE_INDEX))


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    loss, d = ops.cross_entropy(logits, np.array([0]))
    assert np.isfinite(float(loss)) and np.isfinite(d).all()


def test_ops_do_not_mutate_inputs(rng):
    x = rng.standard_normal((2, 3, 4))
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    x0 = x.copy()
    ops.layernorm_forward(x, w, b)
    ops.softmax_forward(x)
    ops.gelu_forward(x)
    ops.attention_forward(x, x, x, 2)
    np.testing.assert_array_equal(x, x0)
