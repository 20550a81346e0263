"""Activation recomputation (``set_recompute``): the forward keeps only each block's input, the
backward runs each block again; the gradients must be the plain path's, bit for bit, for full
training, LoRA with dropout (replayed masks), prefix and prompt tuning, AdaLoRA and QLoRA."""
import numpy as np
import pytest
from helpers import batch, np_

from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.errors import MiniloraError
from minilora.methods.adalora import ADALORA, AdaLoraConfig
from minilora.methods.lora import inject_lora
from minilora.model import GPT, RecomputeCache, Recomputed, set_recompute
from minilora.nn.layers import Module
from minilora.methods.prefix import PrefixConfig
from minilora.methods.prompt import PromptConfig
from helpers import apply_method

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8, init_std=0.3)


def _grads(model, x, y):
    loss = model.forward_backward(x, y)
    return loss, {n: np_(g).copy() for n, _, g in model.named_trainable()}


def _full(dtype):
    return GPT(TINY, 0, dtype=dtype)


def _lora_dropout(dtype):
    gpt = GPT(TINY, 0, dtype=dtype)
    inject_lora(gpt, LoraConfig(r=2, lora_dropout=0.3, target_modules=("q", "v", "up"),
                                init_lora_weights="gaussian"))
    return gpt


def _prefix(dtype):
    return apply_method(GPT(TINY, 0, dtype=dtype), PrefixConfig(prefix_len=2))


def _prompt(dtype):
    return apply_method(GPT(TINY, 0, dtype=dtype), PromptConfig(prompt_len=2))


def _adalora(dtype):
    return ADALORA.apply(GPT(TINY, 0, dtype=dtype),
                         AdaLoraConfig(init_r=3, target_r=2, target_modules=("q", "v"),
                                       total_step=10)).model


@pytest.mark.parametrize("make", [_full, _lora_dropout, _prefix, _prompt, _adalora])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gradients_equal_the_plain_path_exactly(make, dtype):
    x, y = batch(3, B=2, T=6, V=11)
    plain, recomputed = make(dtype), make(dtype)
    set_recompute(recomputed, True)
    for step in range(2):  # twice: dropout generators must continue as in the plain run
        loss_a, ga = _grads(plain, x, y)
        loss_b, gb = _grads(recomputed, x, y)
        assert loss_a == loss_b and ga.keys() == gb.keys() and ga
        for n in ga:
            np.testing.assert_array_equal(ga[n], gb[n], err_msg=f"{n} at step {step}")


def test_forward_keeps_block_inputs_only():
    model = _full("float64")
    x, _ = batch(0, B=2, T=6, V=11)
    set_recompute(model)
    _, cache = model.forward(x)
    assert all(isinstance(c, RecomputeCache) for c in cache.stack.blocks)
    assert all(c.x.shape == (2, 6, TINY.n_embd) for c in cache.stack.blocks)
    assert all(isinstance(b, Recomputed) for b in model.blocks)   # a wrapper: the GPT knows none
    names = [n for n, _ in model.named_parameters()]
    set_recompute(model, False)
    assert [n for n, _ in model.named_parameters()] == names      # the same names either way
    _, cache = model.forward(x)
    assert not any(isinstance(c, RecomputeCache) for c in cache.stack.blocks)


def test_recomputation_needs_a_gpt():
    with pytest.raises(MiniloraError, match="is not a GPT and wraps none"):
        set_recompute(Module())


def test_qlora_gradients_equal_the_plain_path():
    from minilora.methods.qlora import inject_qlora
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=64)
    x, y = batch(1, B=2, T=6, V=11)
    models = []
    for _ in range(2):
        m = GPT(cfg, 0)
        inject_qlora(m, LoraConfig(r=2, init_lora_weights="gaussian"))
        models.append(m)
    set_recompute(models[1])
    (la, ga), (lb, gb) = (_grads(m, x, y) for m in models)
    assert la == lb
    for n in ga:
        np.testing.assert_array_equal(ga[n], gb[n])


def test_without_the_replayed_masks_lora_dropout_gradients_would_differ(monkeypatch):
    """The check above has teeth: recomputing with fresh dropout masks changes the gradients."""
    import minilora.model as model_mod
    x, y = batch(3, B=2, T=6, V=11)
    plain, recomputed = _lora_dropout("float64"), _lora_dropout("float64")
    set_recompute(recomputed)
    monkeypatch.setattr(model_mod, "_dropout_rngs", lambda block: [])
    ga, gb = _grads(plain, x, y)[1], _grads(recomputed, x, y)[1]
    assert any(not np.array_equal(ga[n], gb[n]) for n in ga)


@pytest.mark.parametrize("make", [_full, _adalora])
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_recomputation_equals_the_plain_gradients_to_rounding(make, chunk):
    x, y = batch(4, B=5, T=6, V=11)
    plain, chunked = make("float64"), make("float64")
    set_recompute(chunked, True, chunk=chunk)
    (la, ga), (lb, gb) = _grads(plain, x, y), _grads(chunked, x, y)
    assert la == pytest.approx(lb, rel=1e-13)
    for n in ga:
        np.testing.assert_allclose(gb[n], ga[n], rtol=1e-11, atol=1e-14, err_msg=n)


def test_chunked_recomputation_with_dropout_is_the_gradient_of_its_own_loss():
    """With dropout the pieces draw their masks piece by piece (valid dropout, other masks than
    the whole batch draws); the backward replays them, so the gradient is exact for the loss the
    forward computed: a centred finite difference along a random direction agrees."""
    from minilora.model import _dropout_rngs
    x, y = batch(5, B=4, T=6, V=11)
    model = _lora_dropout("float64")
    set_recompute(model, True, chunk=1)
    rngs = [g for blk in model.blocks for g in _dropout_rngs(blk)]
    start = [g.bit_generator.state for g in rngs]

    def loss():
        for g, s in zip(rngs, start):
            g.bit_generator.state = s
        return model.loss(x, y)
    for g, s in zip(rngs, start):
        g.bit_generator.state = s
    model.forward_backward(x, y)
    rng = np.random.default_rng(0)
    params = [(a, np_(g).copy()) for _, a, g in model.named_trainable()]
    dirs = [rng.standard_normal(a.shape) for a, _ in params]
    analytic = sum(float((g * d).sum()) for (_, g), d in zip(params, dirs))
    eps = 1e-6
    for a, d in zip([a for a, _ in params], dirs):
        a += eps * d
    up = loss()
    for a, d in zip([a for a, _ in params], dirs):
        a -= 2 * eps * d
    down = loss()
    assert (up - down) / (2 * eps) == pytest.approx(analytic, rel=1e-6)


def test_prefix_tuning_recomputes_the_whole_batch_and_chunk_is_checked():
    x, y = batch(3, B=4, T=6, V=11)
    plain, chunked = _prefix("float64"), _prefix("float64")
    set_recompute(chunked, True, chunk=1)  # the prefix is shared: whole batch, bit for bit
    (_, ga), (_, gb) = _grads(plain, x, y), _grads(chunked, x, y)
    for n in ga:
        np.testing.assert_array_equal(ga[n], gb[n])
    for bad in (0, 2.5, True):
        with pytest.raises(MiniloraError, match="chunk must be an integer"):
            set_recompute(plain, True, chunk=bad)


def test_cli_recompute_chunk_needs_recompute(tmp_path, capsys):
    from minilora import cli
    assert cli.main(["pretrain", "--preset", "tiny", "--max-steps", "1", "--recompute-chunk",
                     "2", "--out", str(tmp_path / "r")]) == 2
    assert "--recompute-chunk only applies with --recompute" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # checked before any work
