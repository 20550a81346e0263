"""The whole GPT: gradcheck through the loss, causality, overfitting, freezing, configs."""
import json

import numpy as np
import pytest

from minilora import backend, gradcheck
from minilora.config import ConfigError, GPTConfig, TrainConfig
from minilora.model import GPT, InputError
from minilora.nn import ops
from minilora.optim import AdamW

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def test_whole_tiny_model_gradcheck_every_parameter(xpb):
    rows = gradcheck.tiny_model_check(seed=0)
    n_params = len(list(GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2,
                                      n_embd=8)).named_parameters()))
    assert len(rows) == n_params  # every parameter was checked
    bad = [f"{r['name']} rel={r['rel_error']:.2e}" for r in rows if not r["ok"]]
    assert not bad, "; ".join(bad)


def test_parameter_count_matches_closed_form():
    for cfg in [TINY, GPTConfig(bias=False), GPTConfig(n_layer=3, n_embd=96, n_head=3)]:
        assert GPT(cfg).num_parameters() == cfg.num_parameters()


def test_changing_a_future_token_never_changes_an_earlier_logit(xpb, rng):
    model = GPT(TINY, rng=1)
    idx = rng.integers(0, 11, size=(2, 8))
    base, _ = model.forward(backend.asarray(idx))
    for t in range(8):
        idx2 = idx.copy()
        idx2[:, t] = (idx2[:, t] + 3) % 11
        out, _ = model.forward(backend.asarray(idx2))
        np.testing.assert_array_equal(backend.to_numpy(out[:, :t]), backend.to_numpy(base[:, :t]))
        assert not np.allclose(backend.to_numpy(out[:, t]), backend.to_numpy(base[:, t]))


def test_overfits_one_batch(rng):
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32), rng=0)
    opt = AdamW(model, lr=3e-3, weight_decay=0.0)
    x = rng.integers(0, 11, size=(4, 16))
    y = rng.integers(0, 11, size=(4, 16))
    first = model.forward_backward(x, y)
    for _ in range(300):
        loss = model.forward_backward(x, y)
        opt.step()
    assert first > 2.0 and loss < 0.05, (first, loss)


def test_frozen_parameters_get_no_gradient_and_do_not_move(rng):
    model = GPT(TINY, rng=0)
    model.set_trainable(lambda n: n.startswith("blocks.1.mlp"))
    before = {n: p.copy() for n, p in model.named_parameters()}
    opt = AdamW(model, lr=1e-2)
    x = rng.integers(0, 11, size=(2, 8))
    model.forward_backward(x, x)
    trainable = {n for n, _, g in model.named_trainable() if g is not None}
    assert trainable == {n for n in before if n.startswith("blocks.1.mlp")}
    for _, m in model.named_modules():
        assert set(m.grads) <= m.trainable  # no gradient buffer for a frozen parameter
    opt.step()
    for n, p in model.named_parameters():
        moved = not np.array_equal(p, before[n])
        assert moved == n.startswith("blocks.1.mlp"), n
    assert set(opt.m) == trainable  # optimizer state only for trainable parameters


def test_same_seed_same_weights_different_seed_different():
    a, b, c = GPT(TINY, rng=5), GPT(TINY, rng=5), GPT(TINY, rng=6)
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                         c.named_parameters()):
        np.testing.assert_array_equal(pa, pb)
        if pa.ndim == 2:
            assert not np.array_equal(pa, pc), n


def test_numpy_and_cupy_start_from_identical_weights_and_agree():
    pytest.importorskip("cupy")
    try:
        backend.set_backend("cupy")
    except backend.BackendError as e:
        pytest.skip(str(e))
    try:
        g = GPT(TINY, rng=3)
        w_gpu = {n: backend.to_numpy(p) for n, p in g.named_parameters()}
        idx = np.random.default_rng(0).integers(0, 11, size=(2, 8))
        out_gpu = backend.to_numpy(g.forward(backend.asarray(idx))[0])
    finally:
        backend.set_backend("numpy")
    c = GPT(TINY, rng=3)
    for n, p in c.named_parameters():
        np.testing.assert_array_equal(p, w_gpu[n])  # bit-identical initial weights
    # float32 GEMMs differ in summation order: agree to ~1e-5 relative
    np.testing.assert_allclose(c.forward(idx)[0], out_gpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(n_embd=10, n_head=3), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(block_size=-4), "block_size"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(init_std=0.0), "init_std"),
    (dict(bias="yes"), "bias"),
])
def test_invalid_model_configs_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**bad)


@pytest.mark.parametrize("bad, match", [
    (dict(lr=-1.0), "lr"), (dict(min_lr=1.0, lr=0.1), "min_lr"), (dict(beta2=1.0), "beta"),
    (dict(dtype="float16"), "dtype"), (dict(max_steps=0), "max_steps"),
])
def test_invalid_train_configs_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_config_json_round_trip_and_unknown_fields():
    cfg = GPTConfig(n_layer=3, n_embd=48, n_head=4)
    assert GPTConfig.from_json(cfg.to_json()) == cfg
    t = TrainConfig(max_steps=7)
    assert TrainConfig.from_json(t.to_json()) == t
    d = json.loads(cfg.to_json())
    d["n_layers"] = 3  # a typo must not be ignored
    with pytest.raises(ConfigError, match="unknown field.*n_layers"):
        GPTConfig.from_dict(d)
    with pytest.raises(ConfigError, match="not valid JSON"):
        GPTConfig.from_json("{n_layer: 3")


@pytest.mark.parametrize("idx, match", [
    (np.zeros((1, 9), dtype=np.int64), "longer than block_size"),
    (np.full((1, 4), 11), r"\[0, 11\)"),
    (np.full((1, 4), -1), r"\[0, 11\)"),
    (np.zeros((4,), dtype=np.int64), r"shape \(B, T\)"),
    (np.zeros((1, 4), dtype=np.float32), "integer"),
    (np.zeros((1, 0), dtype=np.int64), "empty"),
    ([[1, 2, 3]], "array"),
])
def test_bad_model_input_gets_one_clear_error(idx, match):
    with pytest.raises(InputError, match=match):
        GPT(TINY).forward(idx)


def test_float64_model_and_loss_value():
    model = GPT(TINY, rng=0, dtype="float64")
    assert model.dtype == np.float64
    idx = np.random.default_rng(0).integers(0, 11, size=(2, 8))
    loss = model.loss(idx, idx)
    assert abs(loss - np.log(11)) < 0.1  # near-uniform predictions at init
    logits, _ = model.forward(idx)
    assert float(ops.cross_entropy_forward(logits, idx)[0]) == pytest.approx(loss)


def test_backward_skips_input_gradients_nothing_below_needs(rng):
    """With frozen embeddings the lowest blocks skip their input gradient; the trainable
    parameters' gradients are the same as when everything below is kept alive (float64)."""
    from minilora.methods.lora.config import LoraConfig
    from minilora.methods.lora import inject_lora

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8)
    x = backend.asarray(rng.integers(0, 11, (2, 8)))
    y = backend.asarray(rng.integers(0, 11, (2, 8)))

    def grads(train_wte, targets):
        m = GPT(cfg, rng=3, dtype="float64")
        inject_lora(m, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
        for _, p in m.named_parameters():
            p += 0.01  # B != 0 so every LoRA factor gets a gradient
        if train_wte:
            m.wte.trainable = {"weight"}
        m.forward_backward(x, y)
        return {n: g for n, _, g in m.named_trainable() if n != "wte.weight"}

    for targets in [("q", "v"), ("lm_head",), ("up",)]:
        fast, ref = grads(False, targets), grads(True, targets)
        assert fast.keys() == ref.keys() and fast
        for n in fast:
            np.testing.assert_allclose(fast[n], ref[n], rtol=1e-12, atol=1e-14, err_msg=n)
