"""Memory accounting: categories equal their formulas, the measured peak agrees with the count,
freezing a weight frees its input, and the account never changes the weights."""
import numpy as np
import pytest

from minilora import backend
from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora import inject_lora
from minilora.memory import adam_training_bytes, memory_account, tree_bytes
from minilora.model import GPT
from minilora.nn import ops

CFG = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)


def _batch(rng, B=4, T=64):
    return rng.integers(0, 97, (B, T)), rng.integers(0, 97, (B, T))


def test_tree_bytes_counts_each_buffer_once_and_skips_excluded():
    a = np.zeros((10, 4), np.float32)  # 160 bytes
    b = np.ones(5, np.float64)  # 40 bytes
    tree = (a, [a[2:], {"k": a.T, "b": b}], None, 3)
    assert tree_bytes(tree) == 200
    assert tree_bytes(tree, exclude=[a]) == 40


def test_categories_match_the_formulas_and_weights_stay_put(rng):
    model = GPT(CFG, rng=0)
    before = {n: p.copy() for n, p in model.named_parameters()}
    x, y = _batch(rng)
    acc = memory_account(model, x, y)
    n = model.num_parameters()
    assert acc["weights"] == 4 * n
    assert acc["gradients"] == 4 * n and acc["optimizer"] == 8 * n
    # activations: at least the per-layer inputs the backward pass needs, (B, T, C) floats each
    assert acc["activations"] >= CFG.n_layer * 10 * 4 * 64 * 64 * 4
    assert acc["computed_total"] == sum(acc[k] for k in ("weights", "gradients", "optimizer",
                                                          "activations"))
    # the measured peak (gradients + activations + temporaries) is of the counted size
    assert 0.7 < acc["measured_total"] / acc["computed_total"] < 1.6
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p, before[name], err_msg=name)


def test_lora_needs_less_and_frozen_inputs_are_not_kept(rng):
    x, y = _batch(rng)
    full = memory_account(GPT(CFG, rng=0), x, y)
    model = GPT(CFG, rng=0)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q", "v")))
    lora = memory_account(model, x, y)
    n_lora = model.num_parameters(trainable_only=True)
    assert n_lora == CFG.n_layer * 2 * 2 * 64 * 4
    assert lora["gradients"] == 4 * n_lora and lora["optimizer"] == 8 * n_lora
    # frozen o, up and down keep no input for a dW: at least (1 + 1 + 4) x (B, T, C) per layer
    saved = full["activations"] - lora["activations"]
    assert saved >= CFG.n_layer * 6 * 4 * 64 * 64 * 4
    assert lora["measured_total"] < 0.8 * full["measured_total"]


def test_dw_after_a_frozen_forward_is_a_clear_error(rng):
    x = backend.asarray(rng.standard_normal((3, 5)))
    w = backend.asarray(rng.standard_normal((2, 5)))
    out, cache = ops.linear_forward(x, w, keep_x=False)
    assert cache[0] is None
    dx, dw, db = ops.linear_backward(out, cache, need_dw=False)
    assert dw is None and dx.shape == x.shape
    with pytest.raises(ValueError, match="keep_x=False"):
        ops.linear_backward(out, cache, need_dw=True)


def test_paper_scale_count():
    # float32 AdamW: 16 bytes/param full, 4 bytes/param frozen: the 4x bound without activations
    n = 175_000_000_000
    full = adam_training_bytes(n, n)
    lora = adam_training_bytes(n, 96 * 2 * 2 * 12288 * 4)  # GPT-3, r=4 on q, v: 18.9 M
    assert full == 16 * n
    assert 3.9 < full / lora < 4.0
    with pytest.raises(ValueError, match="n_trainable"):
        adam_training_bytes(10, 11)
