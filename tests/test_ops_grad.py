"""Every op's backward against centred finite differences (float64), on each backend.

The cases live in the library (``minilora.gradcheck.op_suite``) so that `minilora gradcheck` and
these tests check exactly the same things; each case is its own test id, named after the
gradient, so a failure says which one broke.
"""
import numpy as np
import pytest

from minilora import backend, gradcheck
from minilora.nn import ops, ops_fast


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


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("need_dx,need_dw", [(True, True), (True, False), (False, True)])
def test_fast_layernorm_equals_the_plain_one(rng, dtype, tol, need_dx, need_dw, monkeypatch):
    """The BLAS-reduction LayerNorm in row blocks over two threads (used by the layers) against
    the plain NumPy-reduction one (the chapters' formula), forward and backward."""
    monkeypatch.setattr(ops_fast, "BLOCK_FLOATS", 64)  # 4 rows a block: many blocks
    monkeypatch.setattr(ops_fast, "SMALL_FLOATS", -1)  # the blocked code even on tiny arrays
    monkeypatch.setenv("MINILORA_THREADS", "2")
    x = rng.standard_normal((3, 5, 16)).astype(dtype) * 3 + 1
    w, b = rng.standard_normal(16).astype(dtype), rng.standard_normal(16).astype(dtype)
    d = rng.standard_normal(x.shape).astype(dtype)
    out, cache = ops_fast.layernorm_forward_fast(x, w, b)
    out_p, cache_p = ops.layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, out_p, rtol=tol, atol=tol)
    for a, p in zip(ops_fast.layernorm_backward_fast(d, cache, need_dx, need_dw),
                    ops.layernorm_backward(d, cache_p, need_dx, need_dw)):
        assert (a is None) == (p is None)
        if a is not None:
            assert a.shape == p.shape and a.dtype == p.dtype
            np.testing.assert_allclose(a, p, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-13), ("float32", 1e-5)])
@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 3000, 64), (7,)])
def test_blocked_gelu_equals_the_plain_one(rng, dtype, tol, shape, monkeypatch):
    """Blocked GELU (several blocks, two threads) against the whole-tensor version."""
    monkeypatch.setattr(ops_fast, "BLOCK_FLOATS", 4096)  # many blocks even on small tensors
    monkeypatch.setattr(ops_fast, "SMALL_FLOATS", -1)
    monkeypatch.setenv("MINILORA_THREADS", "2")
    x = backend.asarray(rng.standard_normal(shape).astype(dtype) * 2)
    d = backend.asarray(rng.standard_normal(shape).astype(dtype))
    out, cache = ops_fast.gelu_forward_fast(x)
    out_p, cache_p = ops.gelu_forward(x)
    np.testing.assert_allclose(backend.to_numpy(out), backend.to_numpy(out_p), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(ops_fast.gelu_backward_fast(d, cache)),
                               backend.to_numpy(ops.gelu_backward(d, cache_p)), rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("tile", [1, 2, 3, 32])
@pytest.mark.parametrize("B,T,P,C,NH", [(2, 5, 0, 8, 2), (1, 7, 3, 6, 3), (2, 1, 4, 4, 2)])
def test_tiled_attention_equals_the_full_square(rng, tile, B, T, P, C, NH, monkeypatch):
    """Query tiles that skip the masked keys give the full square's outputs and gradients
    (prefix keys included; T = 1 is a decoding step)."""
    monkeypatch.setattr(ops_fast, "SMALL_FLOATS", -1)  # the tiles even on tiny arrays
    q, k, v = (backend.asarray(rng.standard_normal(s)) for s in ((B, T, C), (B, T + P, C),
                                                                  (B, T + P, C)))
    d = backend.asarray(rng.standard_normal((B, T, C)))
    y, cache = ops.attention_forward(q, k, v, NH)
    y_t, cache_t = ops_fast.attention_forward_fast(q, k, v, NH, tile=tile)
    np.testing.assert_allclose(backend.to_numpy(y_t), backend.to_numpy(y), rtol=1e-12, atol=1e-13)
    for a, b in zip(ops_fast.attention_backward_fast(d, cache_t), ops.attention_backward(d, cache)):
        assert a.shape == b.shape
        np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=1e-12,
                                   atol=1e-13)


def test_small_inputs_take_the_plain_ops_and_the_switch_is_exact(rng):
    """A decoding step's (1, 1, C) rows go to the plain op (cheaper in Python time); the caches
    are the same, so either backward reads either forward's cache."""
    x = rng.standard_normal((1, 1, 16)); w, b = rng.standard_normal(16), rng.standard_normal(16)
    out, cache = ops_fast.layernorm_forward_fast(x, w, b)
    out_p, _ = ops.layernorm_forward(x, w, b)
    np.testing.assert_array_equal(out, out_p)  # the same function ran
    with ops_fast.blocked_always():
        out_b, cache_b = ops_fast.layernorm_forward_fast(x, w, b)
        assert ops_fast.SMALL_FLOATS == -1
    assert ops_fast.SMALL_FLOATS > 0  # restored
    q = rng.standard_normal((1, 1, 8))  # a decoding step: the plain attention and its cache
    y, c = ops_fast.attention_forward_fast(q, q, q, 2)
    assert isinstance(c, ops.AttentionCache)
    k = rng.standard_normal((2, 9, 8))  # one query over cached keys: the plain op's floats
    y1, c1 = ops_fast.attention_forward_fast(k[:, -1:], k, k[::-1], 2)
    y0, c0 = ops.attention_forward(k[:, -1:], k, k[::-1], 2)
    np.testing.assert_array_equal(y1, y0)
    for a, p in zip(c1, c0):
        np.testing.assert_array_equal(a, p)
    np.testing.assert_array_equal(ops_fast.attention_backward_fast(q, c)[0],
                                  ops.attention_backward(q, c)[0])
    d = rng.standard_normal(x.shape)
    for a, p in zip(ops_fast.layernorm_backward_fast(d, cache_b), ops.layernorm_backward(d, cache)):
        np.testing.assert_allclose(a, p, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", ["1", "3"])
def test_linear_with_rows_over_threads_equals_the_plain_one(rng, monkeypatch, bias, threads):
    """The linear layer's GEMMs shared over threads (rows of x for out and dx, rows of dW):
    the plain op's results, every gradient."""
    monkeypatch.setenv("MINILORA_THREADS", threads)
    monkeypatch.setattr(ops_fast, "MIN_ROWS_PER_THREAD", 4)
    x = backend.asarray(rng.standard_normal((3, 11, 6)))
    w = backend.asarray(rng.standard_normal((5, 6)))
    b = backend.asarray(rng.standard_normal(5)) if bias else None
    d = backend.asarray(rng.standard_normal((3, 11, 5)))
    y, c = ops_fast.linear_forward_fast(x, w, b)
    y0, c0 = ops.linear_forward(x, w, b)
    np.testing.assert_allclose(backend.to_numpy(y), backend.to_numpy(y0), rtol=1e-13, atol=1e-13)
    for a, p in zip(ops_fast.linear_backward_fast(d, c), ops.linear_backward(d, c0)):
        assert (a is None) == (p is None)
        if a is not None:
            np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(p), rtol=1e-12,
                                       atol=1e-12)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_residual_add_over_threads_equals_numpy(rng, monkeypatch, threads):
    monkeypatch.setenv("MINILORA_THREADS", threads)
    monkeypatch.setattr(ops_fast, "SMALL_FLOATS", -1)
    monkeypatch.setattr(ops_fast, "BLOCK_FLOATS", 64)
    a, b = rng.standard_normal((3, 50, 16)), rng.standard_normal((3, 50, 16))
    np.testing.assert_array_equal(ops_fast.add(a, b), a + b)
    c = a.copy()
    assert ops_fast.add(c, b, out=c) is c
    np.testing.assert_array_equal(c, a + b)
