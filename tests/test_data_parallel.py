"""The data-parallel training step (``forward_backward`` on micro-batches, one thread each):
its gradients are the serial micro-batches' exactly, the one-pass ones to float32 rounding,
the same floats on 1 or 2 threads, for the GPT and every method; dropout keeps one pass."""
import numpy as np
import pytest
from helpers import small_method_config

from minilora import backend, threads
from minilora import model as model_mod
from minilora.config import GPTConfig
from minilora.methods.registry import METHODS
from minilora.model import GPT, data_parallel_pieces, set_recompute
from minilora.nn import ops

CFG = GPTConfig(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(autouse=True)
def small_batches_split(monkeypatch):
    """The tiny batches here take the data-parallel path (the default needs 256 tokens)."""
    monkeypatch.setattr(model_mod, "MIN_DATA_PARALLEL_TOKENS", 0)


def _batch(B=5, T=12, seed=0, ignore=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CFG.vocab_size, (B, T))
    y = rng.integers(0, CFG.vocab_size, (B, T))
    if ignore:  # the first micro-batch scores few tokens, the second many
        y[: B // 2, 2:] = ops.IGNORE_INDEX
    return backend.asarray(x), backend.asarray(y)


def _grads(model):
    return {n: backend.to_numpy(g).copy() for n, _, g in model.named_trainable() if g is not None}


def _step(model, x, y, pool):
    with threads.phase("train", pool=pool):
        loss = model.forward_backward(x, y)
    return loss, _grads(model)


def _one_pass(model, x, y):
    logits, cache = model.forward(x)
    loss, d = ops.cross_entropy(logits, y)
    model.zero_grad()
    model.backward(d, cache)
    return float(loss), _grads(model)


def _serial_pieces(model, x, y):
    """Each micro-batch's forward and backward on its own, one after the other on one thread,
    weighted by its share of the scored tokens, then summed in order."""
    pieces = data_parallel_pieces(model, x, y)
    total = sum(n for _, n in pieces)
    loss, acc = 0.0, None
    with threads.serial():
        for sl, n in pieces:
            logits, cache = model.forward(x[sl])
            l, ce = ops.cross_entropy_forward(logits, y[sl])
            model.zero_grad()
            model.backward(ops.cross_entropy_backward(n / total, ce), cache)
            g = _grads(model)
            acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
            loss += float(l) * (n / total)
    return loss, acc


def _close(a, b, rtol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(float(np.abs(b[k]).max()), 1e-3)
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=rtol * scale, err_msg=k)


@pytest.mark.parametrize("ignore", [False, True])
def test_gradients_are_the_serial_micro_batches_exactly_and_the_one_pass_ones(ignore):
    model = GPT(CFG, rng=1)
    x, y = _batch(ignore=ignore)
    assert [p[0] for p in data_parallel_pieces(model, x, y)] == [slice(0, 2), slice(2, 5)]
    loss, g = _step(model, x, y, pool=2)
    s_loss, s_g = _serial_pieces(model, x, y)
    for k in s_g:
        np.testing.assert_array_equal(g[k], s_g[k], err_msg=k)
    assert loss == pytest.approx(s_loss, rel=1e-12)
    o_loss, o_g = _one_pass(model, x, y)
    assert loss == pytest.approx(o_loss, rel=1e-6)
    _close(g, o_g)


def test_same_floats_on_one_and_two_threads_and_across_repeats():
    model = GPT(CFG, rng=2)
    x, y = _batch(B=4)
    l1, g1 = _step(model, x, y, pool=1)
    l2, g2 = _step(model, x, y, pool=2)
    l3, g3 = _step(model, x, y, pool=2)
    assert l1 == l2 == l3
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
        np.testing.assert_array_equal(g2[k], g3[k], err_msg=k)


def test_one_pass_for_one_sequence_a_small_batch_and_cupy_free_paths(monkeypatch):
    model = GPT(CFG, rng=0)
    x, y = _batch(B=1)
    assert data_parallel_pieces(model, x, y) is None
    monkeypatch.setattr(model_mod, "MIN_DATA_PARALLEL_TOKENS", 256)
    x, y = _batch(B=4)  # 48 tokens
    assert data_parallel_pieces(model, x, y) is None
    y2 = backend.asarray(np.full(y.shape, ops.IGNORE_INDEX))
    monkeypatch.setattr(model_mod, "MIN_DATA_PARALLEL_TOKENS", 0)
    y2[2:, 0] = 1  # the first micro-batch scores nothing: one pass (its mean is undefined)
    assert data_parallel_pieces(model, x, y2) is None


def _method_model(name, dropout=0.0):
    m = METHODS[name]
    config = small_method_config(name, **({"lora_dropout": dropout} if name == "lora" else {}))
    saved = () if name == "full" else ("lm_head",)
    return m.apply(GPT(CFG, rng=3), config, saved)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_data_parallel_equals_one_pass(name):
    tuned = _method_model(name)
    model = tuned.model
    x, y = _batch(B=4, T=10)
    assert data_parallel_pieces(model, x, y) is not None
    l1, g1 = _step(model, x, y, pool=1)
    l2, g2 = _step(model, x, y, pool=2)
    assert l1 == l2 and g1.keys() == g2.keys() and g1
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    for cb in tuned.callbacks:  # AdaLoRA's allocator reads the summed gradients
        cb.after_backward()
    o_loss, o_g = _one_pass(model, x, y)
    assert l2 == pytest.approx(o_loss, rel=1e-6)
    _close(g2, o_g)


@pytest.mark.parametrize("chunk", [None, 1])
def test_recomputation_wrapper_data_parallel(chunk):
    model = GPT(CFG, rng=4)
    x, y = _batch(B=4)
    _, plain = _step(model, x, y, pool=2)
    set_recompute(model, True, chunk=chunk)
    _, rec = _step(model, x, y, pool=2)
    if chunk is None:  # the same ops on the same micro-batches
        for k in plain:
            np.testing.assert_array_equal(rec[k], plain[k], err_msg=k)
    else:
        _close(rec, plain)


def test_dropout_keeps_one_pass_and_its_masks_order():
    tuned = _method_model("lora", dropout=0.1)
    x, y = _batch(B=4)
    assert data_parallel_pieces(tuned.model, x, y) is None  # masks drawn in one order
    for _, m in tuned.model.named_modules():
        if hasattr(m, "training"):
            m.training = False
    assert data_parallel_pieces(tuned.model, x, y) is not None  # no draws: split
