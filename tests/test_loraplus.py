"""LoRA+: B's learning rate is ratio x A's in AdamW's per-parameter scale; unused, AdamW is
bit-identical to before; bad ratios are one clear error."""
import math

import numpy as np
import pytest
from helpers import batch, np_

from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.errors import UsageError
from minilora.methods.lora import inject_lora, lora_layers
from minilora.model import GPT
from minilora.optim import AdamW, ParamGroup, group_scale, loraplus_group

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)


def lora_model():
    model = GPT(TINY, 0, dtype="float64")
    inject_lora(model, LoraConfig(r=2, target_modules=("q", "v"), init_lora_weights=False))
    return model


def run(model, steps=3, **kw):
    opt = AdamW(model, lr=1e-2, **kw)
    for i in range(steps):
        x, y = batch(i, B=2, T=5, V=11)
        model.forward_backward(x, y)
        opt.step(grad_clip=1.0)
    return {n: np_(p).copy() for n, p, _ in model.named_trainable()}


def test_unused_scale_is_bit_identical_and_matches_the_formula():
    plain = run(lora_model())
    ones = run(lora_model(), groups=[loraplus_group(1.0)])
    for n in plain:
        np.testing.assert_array_equal(plain[n], ones[n])
    # one step by the textbook formula (bias corrections at t = 1 make m_hat = g, v_hat = g^2)
    model = lora_model()
    before = {n: np_(p).copy() for n, p, _ in model.named_trainable()}
    x, y = batch(0, B=2, T=5, V=11)
    model.forward_backward(x, y)
    grads = {n: np_(g).copy() for n, _, g in model.named_trainable()}
    AdamW(model, lr=1e-2, weight_decay=0.1).step()
    for n, p, _ in model.named_trainable():
        g, p0 = grads[n], before[n]
        want = p0 * (1 - 1e-2 * 0.1) - 1e-2 * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(np_(p), want, rtol=1e-12, atol=1e-15)


def test_b_moves_ratio_times_as_far_as_with_plain_lora():
    ratio = 4.0
    model = lora_model()
    start = {n: np_(p).copy() for n, p, _ in model.named_trainable()}
    one = run(lora_model(), steps=1, weight_decay=0.0)
    plus = run(model, steps=1, weight_decay=0.0, groups=[loraplus_group(ratio)])
    names = list(lora_layers(model))
    for layer in names:
        for factor, k in (("lora_A", 1.0), ("lora_B", ratio)):
            n = f"{layer}.{factor}"
            np.testing.assert_allclose(plus[n] - start[n], k * (one[n] - start[n]), rtol=1e-12,
                                       atol=1e-16)


def test_groups_are_the_optimizers_and_the_model_knows_no_method():
    model = lora_model()
    opt = AdamW(model, groups=[loraplus_group(8), ParamGroup("head", "lm_head.weight".__eq__, 0.5)])
    assert opt.lr_scale("blocks.0.attn.q.lora_B") == 8.0
    assert opt.lr_scale("blocks.0.attn.q.lora_A") == 1.0
    assert opt.lr_scale("lm_head.weight") == 0.5
    assert AdamW(model).lr_scale is None            # no groups: the plain update, bit for bit
    model.lr_scale = group_scale([loraplus_group(8)])  # an attribute on the model is not read
    assert AdamW(model).lr_scale is None
    with pytest.raises(UsageError, match="lr_scale must be a finite number > 0"):
        AdamW(model, groups=[ParamGroup("bad", bool, 0.0)])


@pytest.mark.parametrize("ratio", [-1.0, 0, math.inf, math.nan, "16", True])
def test_bad_ratio(ratio):
    with pytest.raises(UsageError, match="loraplus ratio must be a finite number > 0"):
        loraplus_group(ratio)
