"""The layer contract, layer by layer (nn/layers.py):

    out, cache = layer.forward(x)       # no hidden state: the caller keeps the cache
    dx = layer.backward(dout, cache)    # adds (+=) into grads of *trainable* parameters only

Frozen parameters get no gradient buffer; gradients accumulate over backward calls until
``zero_grad``; a layer holds nothing between forward and backward (two forwards, then the
backwards in the other order, give each input's own gradients); earlier keys/values reach
attention through a PastKV and their gradient goes back to it, while backward returns dx.
"""
import numpy as np
import pytest
from helpers import np_, randn

from minilora import backend
from minilora.backend import xp
from minilora.config import GPTConfig
from minilora.errors import UsageError
from minilora.gradcheck import check, format_table
from minilora.model import GPT
from minilora.nn import ops
from minilora.nn.layers import (
    MLP,
    Block,
    CausalSelfAttention,
    Embedding,
    LayerNorm,
    Linear,
    Module,
    PastKV,
)

C = 6


def make(kind, rng):
    """(layer, input, dout) for each kind of layer, float64."""
    def lin(d_out, d_in):
        return Linear(randn(rng, d_out, d_in, scale=0.5), randn(rng, d_out, scale=0.1))

    def ln():
        return LayerNorm(1 + randn(rng, C, scale=0.1), randn(rng, C, scale=0.1))

    x = randn(rng, 2, 3, C)
    if kind == "linear":
        return lin(4, C), x, randn(rng, 2, 3, 4)
    if kind == "embedding":
        return (Embedding(randn(rng, 7, C)),
                backend.asarray(rng.integers(0, 7, size=(2, 3))), randn(rng, 2, 3, C))
    if kind == "layernorm":
        return ln(), x, randn(rng, 2, 3, C)
    if kind == "mlp":
        return MLP(lin(4 * C, C), lin(C, 4 * C)), x, randn(rng, 2, 3, C)
    attn = CausalSelfAttention(lin(C, C), lin(C, C), lin(C, C), lin(C, C), n_head=2)
    if kind == "attention":
        return attn, x, randn(rng, 2, 3, C)
    mlp = MLP(lin(4 * C, C), lin(C, 4 * C))
    return Block(ln(), attn, ln(), mlp), x, randn(rng, 2, 3, C)


KINDS = ["linear", "embedding", "layernorm", "mlp", "attention", "block"]


def grads_of(layer):
    return {n: np_(g).copy() for n, _, g in layer.named_trainable() if g is not None}


def run(layer, x, dout):
    _, cache = layer.forward(x)
    return layer.backward(dout, cache)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parameters_get_no_buffer_trainable_ones_do(kind, rng):
    layer, x, dout = make(kind, rng)
    names = [n for n, _ in layer.named_parameters()]
    frozen = set(names[::2])  # every other parameter frozen
    layer.set_trainable(lambda n: n not in frozen)
    layer.zero_grad()
    run(layer, x, dout)
    got = {n for n, _, g in layer.named_trainable() if g is not None}
    assert got == set(names) - frozen
    for _, m in layer.named_modules():  # no buffer anywhere for a frozen parameter
        assert not (set(m.grads) - m.trainable)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_accumulate_until_zero_grad(kind, rng):
    layer, x, dout = make(kind, rng)
    layer.zero_grad()
    run(layer, x, dout)
    once = grads_of(layer)
    assert once and all(np.abs(g).max() > 0 for g in once.values())
    run(layer, x, 2.0 * dout)  # the maps are linear in dout: grads add up to 3x
    twice = grads_of(layer)
    for n in once:
        np.testing.assert_allclose(twice[n], 3.0 * once[n], rtol=1e-12, atol=1e-14)
    layer.zero_grad()
    assert all(not m.grads for _, m in layer.named_modules())
    run(layer, x, dout)
    for n, g in grads_of(layer).items():
        np.testing.assert_allclose(g, once[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_no_hidden_state_between_forward_and_backward(kind, rng):
    """Forward x1, forward x2, then backward with x1's cache: x1's gradients, exactly."""
    layer, x1, dout = make(kind, rng)
    _, x2, _ = make(kind, np.random.default_rng(99))
    before = {n: (type(v), id(v)) for n, v in vars(layer).items()}
    layer.zero_grad()
    ref_dx = run(layer, x1, dout)
    ref = grads_of(layer)

    layer.zero_grad()
    _, c1 = layer.forward(x1)
    layer.forward(x2)  # a second forward in between: the layer must not keep it
    dx = layer.backward(dout, c1)
    assert {n: (type(v), id(v)) for n, v in vars(layer).items()} == before  # nothing kept
    for n, g in grads_of(layer).items():
        np.testing.assert_array_equal(g, ref[n])
    if ref_dx is None:
        assert dx is None  # embedding: integer ids have no gradient
    else:
        np.testing.assert_array_equal(np_(dx), np_(ref_dx))


def test_linear_frozen_weight_keeps_no_input_and_costs_no_dw(rng):
    lin = Linear(randn(rng, 4, C), randn(rng, 4))
    lin.trainable = {"bias"}
    x = randn(rng, 2, 3, C)
    _, cache = lin.forward(x)
    assert cache[0] is None  # x not kept: only dW needs it
    dx = lin.backward(randn(rng, 2, 3, 4), cache)
    assert dx.shape == x.shape and set(lin.grads) == {"bias"}
    lin.trainable = {"weight"}
    with pytest.raises(UsageError, match="keep_x=False"):
        lin.backward(randn(rng, 2, 3, 4), cache)  # frozen at forward time: no dW possible


def test_block_without_need_dx_returns_none_and_still_fills_grads(rng):
    blk, x, dout = make("block", rng)
    blk.set_trainable(lambda n: "mlp" in n)
    blk.zero_grad()
    _, cache = blk.forward(x)
    assert blk.backward(dout, cache, need_dx=False) is None
    assert {n for n, _, g in blk.named_trainable() if g is not None} == {
        "mlp.up.weight", "mlp.up.bias", "mlp.down.weight", "mlp.down.bias"}


class RecordingPast(PastKV):
    """Fixed earlier keys/values (B, Tp, C); remembers the gradient attention hands back."""

    def __init__(self, k, v):
        self.k, self.v, self.grad = k, v, None

    def extend(self, k, v):
        return xp.concatenate([self.k, k], axis=1), xp.concatenate([self.v, v], axis=1)

    def backward(self, dk, dv):
        self.grad = (dk, dv)


def test_attention_hands_the_earlier_keys_gradient_to_the_past_and_returns_dx(rng):
    attn, x, dout = make("attention", rng)
    pk, pv = randn(rng, 2, 4, C), randn(rng, 2, 4, C)

    def f():
        return xp.sum(attn.forward(x, RecordingPast(pk, pv))[0] * dout)

    past = RecordingPast(pk, pv)
    _, cache = attn.forward(x, past)
    attn.zero_grad()
    dx = attn.backward(dout, cache)
    assert backend.is_array(dx) and dx.shape == x.shape
    dpk, dpv = past.grad
    assert dpk.shape == dpv.shape == (2, 4, C)
    rows = [check("dx", dx, f, x), check("dpast_k", dpk, f, pk), check("dpast_v", dpv, f, pv)]
    assert all(r["ok"] for r in rows), format_table(rows)


def test_attention_with_past_equals_attention_over_the_concatenated_sequence(rng):
    """Earlier keys that are the layer's own keys of earlier inputs: the same outputs as one
    causal pass over [earlier; x] (what a KV cache relies on)."""
    attn, x, _ = make("attention", rng)
    early = randn(rng, 2, 4, C)
    whole, _ = attn.forward(xp.concatenate([early, x], axis=1))
    k, _ = attn.k.forward(early)
    v, _ = attn.v.forward(early)
    part, _ = attn.forward(x, RecordingPast(k, v))
    np.testing.assert_allclose(np_(part), np_(whole[:, 4:]), rtol=0, atol=1e-13)


def test_caches_with_more_than_three_fields_are_named(rng, monkeypatch):
    from minilora.nn import ops_fast
    monkeypatch.setattr(ops_fast, "SMALL_FLOATS", -1)  # the tiled attention even on tiny input
    blk, x, _ = make("block", rng)
    _, cache = blk.forward(x)
    assert cache._fields == ("ln_1", "attn", "ln_2", "mlp")
    assert cache.attn._fields == ("q", "k", "v", "attn", "o", "past")
    assert cache.attn.attn._fields == ("qh", "kh", "vh", "tiles", "z")
    gpt = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, n_embd=C), 0,
              dtype="float64")
    _, gcache = gpt.forward(backend.asarray(rng.integers(0, 7, size=(1, 3))))
    assert gcache._fields == ("tok", "pos", "stack")
    assert gcache.stack.has_past is False and len(gcache.stack.blocks) == 1
    _, ce = ops.cross_entropy_forward(randn(rng, 2, 5), backend.asarray(np.array([1, 2])))
    assert len(ce._fields) == 5


def test_module_tree_names_and_state_dict_errors(rng):
    blk, _, _ = make("block", rng)
    names = [n for n, _ in blk.named_parameters()]
    assert names[:4] == ["ln_1.weight", "ln_1.bias", "attn.q.weight", "attn.q.bias"]
    assert blk.num_parameters() == sum(int(p.size) for _, p in blk.named_parameters())
    blk.freeze()
    assert blk.num_parameters(trainable_only=True) == 0
    state = {n: np_(p) for n, p in blk.named_parameters()}
    with pytest.raises(UsageError, match="missing \\['attn.k.bias'\\]"):
        blk.load_state_dict({n: a for n, a in state.items() if n != "attn.k.bias"})
    with pytest.raises(UsageError, match="checkpoint shape \\(3,\\)"):
        blk.load_state_dict({**state, "ln_2.bias": np.zeros(3)})
    parent = Module()
    old = parent.add("x", Linear(randn(rng, 2, 2)))
    parent.attr = old
    new = parent.replace("x", Linear(randn(rng, 2, 2)))
    assert parent.children["x"] is new and parent.attr is new
