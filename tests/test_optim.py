"""AdamW, the schedule and clipping on their own (the model tests use them end to end).

AdamW is checked against the update written out from its formula in float64:
m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²;  p -= lr wd p (2-D only);
p -= lr/(1-b1^t) · m / (sqrt(v)/sqrt(1-b2^t) + eps).
"""
import math

import numpy as np
import pytest

from minilora.nn.layers import Module
from minilora.optim import AdamW, NonFiniteError, clip_grad_norm, lr_at


class Two(Module):
    def __init__(self, rng):
        super().__init__()
        self.params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
        self.trainable = {"w", "b"}


def reference_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if p.ndim >= 2:
        p = p * (1 - lr * wd)
    p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
    return p, m, v


def test_adamw_matches_its_formula_over_three_steps():
    rng = np.random.default_rng(0)
    mod = Two(rng)
    opt = AdamW(mod, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = {k: (v.copy(), np.zeros_like(v), np.zeros_like(v)) for k, v in mod.params.items()}
    for t in range(1, 4):
        grads = {k: rng.standard_normal(v.shape) for k, v in mod.params.items()}
        mod.grads = {k: g.copy() for k, g in grads.items()}
        opt.step()
        for k in ref:
            p, m, v = ref[k]
            ref[k] = reference_adamw(p, grads[k], m, v, t, 1e-2, 0.9, 0.99, 1e-8, 0.1)
            np.testing.assert_allclose(mod.params[k], ref[k][0], rtol=1e-13, atol=1e-15, err_msg=k)


def test_nonfinite_gradient_leaves_parameters_untouched():
    rng = np.random.default_rng(1)
    mod = Two(rng)
    before = {k: v.copy() for k, v in mod.params.items()}
    mod.grads = {"w": np.full((3, 4), np.nan), "b": np.zeros(4)}
    with pytest.raises(NonFiniteError):
        AdamW(mod).step()
    for k in before:
        assert np.array_equal(mod.params[k], before[k])


def test_clip_grad_norm_scales_to_just_below_max_and_returns_the_old_norm():
    g = [np.full(4, 3.0), np.full(9, 4.0 / 3.0)]  # norm sqrt(36 + 16) = sqrt(52)
    norm = clip_grad_norm(g, 1.0)
    assert math.isclose(norm, math.sqrt(52))
    new = math.sqrt(sum(float((x * x).sum()) for x in g))
    assert new < 1.0 and math.isclose(new, math.sqrt(52) / (math.sqrt(52) + 1e-6))
    assert clip_grad_norm([np.ones(2)], 0.0) == math.sqrt(2)  # max_norm 0: no clipping


def test_schedule_warmup_then_cosine_to_min_lr():
    assert lr_at(0, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0.1, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_the_update_shared_over_threads_equals_one_thread(monkeypatch):
    """AdamW updates its parameters on several threads (each parameter on one thread): the
    result must be the single-threaded one, bit for bit."""
    from helpers import batch

    from minilora.config import GPTConfig
    from minilora.model import GPT
    x, y = batch(0, B=2, T=6, V=11)
    models = []
    for threads in ("1", "3"):
        monkeypatch.setenv("MINILORA_THREADS", threads)
        m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), 0)
        opt = AdamW(m, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            m.forward_backward(x, y)
            opt.step(grad_clip=1.0)
        models.append(m)
    a, b = (dict(m.named_parameters()) for m in models)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def test_the_update_of_a_large_parameter_slice_by_slice_equals_its_formula():
    """A parameter of more than UPDATE_BLOCK elements is updated slice by slice (in the cache):
    the floats of one pass over the whole tensor (whose formula the first test checks),
    float32 and float64."""
    from minilora import optim
    rng = np.random.default_rng(2)
    for dtype in (np.float64, np.float32):
        mod = Two(rng)
        mod.params = {"w": rng.standard_normal((3, optim.UPDATE_BLOCK + 5)).astype(dtype)}
        mod.trainable = {"w"}
        opt = AdamW(mod, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        one = AdamW(Two(rng), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        p, m, v = mod.params["w"].copy(), np.zeros_like(mod.params["w"]), np.zeros_like(mod.params["w"])
        one.model.params, one.model.trainable = {"w": p}, {"w"}
        one.m["w"], one.v["w"] = m, v
        for t in range(1, 3):
            g = rng.standard_normal(p.shape).astype(dtype)
            mod.grads = {"w": g.copy()}
            opt.step()
            one._update_kernel(p, g, m, v, g * (1.0 - 0.9), 1.0 - 1e-2 * 0.1, 1.0 - 0.99 ** t,
                               1e-2 / (1.0 - 0.9 ** t), 1.0)  # the whole tensor in one pass
            np.testing.assert_array_equal(mod.params["w"], p)
