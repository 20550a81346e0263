"""LoRA layers and model helpers: gradients, ΔW = 0 at step 0, merge, counts, freezing, errors.

Gradient checks run in float64 with centred differences (``minilora.gradcheck``): a correct
backward agrees to ~1e-8 relative, so ``tol=1e-6`` leaves two orders of margin while a wrong
gradient is off by O(1).
"""
import math

import numpy as np
import pytest
from helpers import batch, lora_layer_gradcheck, np_, randn

from minilora import backend
from minilora.backend import xp
from minilora.checkpoint import CheckpointError
from minilora.config import ConfigError, GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.gradcheck import check, format_table, model_check
from minilora.methods.lora import (
    LoRAEmbedding,
    LoRAError,
    LoRALinear,
    count_lora_parameters,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_scaling,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    save_adapter,
    set_lora_training,
    unmerge_lora,
)
from minilora.model import GPT
from minilora.nn.layers import Embedding, Linear, Module
from minilora.optim import AdamW

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)
ALL = ("q", "k", "v", "o", "up", "down", "wte", "lm_head")


def make_linear(rng, d_in, d_out, bias=True, dtype="float64"):
    return Linear(randn(rng, d_out, d_in, dtype=dtype),
                  randn(rng, d_out, dtype=dtype) if bias else None)


def tiny_model(seed=0, dtype="float64", config=TINY):
    return GPT(config, seed, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# gradient checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_gradcheck(xpb, rng, dropout, bias):
    base = make_linear(rng, 5, 4, bias)
    layer = LoRALinear(base, r=3, lora_alpha=6, lora_dropout=dropout, init_lora_weights=False,
                       rng=1)
    layer.trainable = {"lora_A", "lora_B", "weight"} | ({"bias"} if bias else set())
    x = randn(rng, 2, 3, 5)
    dout = randn(rng, 2, 3, 4)
    rows = lora_layer_gradcheck(layer, x, dout)
    assert all(r["ok"] for r in rows), format_table(rows)


def test_lora_linear_dropout_is_really_applied(rng):
    layer = LoRALinear(make_linear(rng, 6, 6), r=2, lora_dropout=0.5, init_lora_weights=False)
    x = randn(rng, 4, 6)
    a, _ = layer.forward(x)
    b, _ = layer.forward(x)
    assert not np.allclose(a, b)  # fresh masks each call
    assert layer.training is True  # the default
    layer.training = False  # evaluation: no dropout, deterministic, equals the p = 0 formula
    c, _ = layer.forward(x)
    d, _ = layer.forward(x)
    np.testing.assert_array_equal(c, d)
    w, bias = layer.params["weight"], layer.params["bias"]
    ref = x @ w.T + bias + layer.scaling * (x @ layer.params["lora_A"].T) @ layer.params["lora_B"].T
    np.testing.assert_allclose(c, ref, rtol=1e-12)


def test_lora_embedding_gradcheck(xpb, rng):
    layer = LoRAEmbedding(Embedding(randn(rng, 7, 5)), r=3, lora_alpha=4, init_lora_weights=False,
                          rng=2)
    layer.trainable = {"lora_A", "lora_B", "weight"}
    idx = backend.asarray(np.array([[0, 3, 3, 6], [1, 3, 0, 2]]))  # repeated ids: scatter-add
    dout = randn(rng, 2, 4, 5)

    def f():
        return xp.sum(layer.forward(idx)[0] * dout)

    out, cache = layer.forward(idx)
    assert layer.backward(dout, cache) is None
    rows = [check("dlora_A", layer.grads["lora_A"], f, layer.params["lora_A"]),
            check("dlora_B", layer.grads["lora_B"], f, layer.params["lora_B"]),
            check("dweight", layer.grads["weight"], f, layer.params["weight"])]
    assert all(r["ok"] for r in rows), format_table(rows)


def test_whole_model_gradcheck_after_inject(xpb):
    model = tiny_model()
    report = inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=ALL,
                                           init_lora_weights=False, seed=3))
    names = [n for n, _, _ in model.named_trainable()]
    assert names and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in names)
    assert len(report["targets"]) == 2 * 6 + 2
    idx, tgt = batch()
    rows = model_check(model, idx, tgt)
    assert len(rows) == len(names)
    assert all(r["ok"] for r in rows), format_table(rows)


# ----------------------------------------------------------------------------------------------
# initialisation: ΔW = 0 at step 0, PiSSA, distributions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, "gaussian", "swap"])
def test_zero_init_gives_base_output_exactly(xpb, init):
    model = tiny_model()
    idx, _ = batch()
    base_logits = np_(model.forward(idx)[0]).copy()
    inject_lora(model, LoraConfig(r=2, target_modules=ALL, init_lora_weights=init))
    for m in lora_layers(model).values():
        assert float(xp.abs(m.delta_weight()).max()) == 0.0
    np.testing.assert_array_equal(np_(model.forward(idx)[0]), base_logits)


def test_init_false_changes_output():
    model = tiny_model()
    idx, _ = batch()
    base_logits = np_(model.forward(idx)[0]).copy()
    inject_lora(model, LoraConfig(r=2, target_modules=("q", "v"), init_lora_weights=False))
    assert not np.allclose(np_(model.forward(idx)[0]), base_logits)


def test_init_distributions(rng):
    d_in, d_out, r = 400, 300, 16
    base = make_linear(rng, d_in, d_out)
    A = LoRALinear(base, r, init_lora_weights=True, rng=0).params["lora_A"]
    assert float(abs(A).max()) <= 1 / math.sqrt(d_in)  # kaiming-uniform(a=√5) bound
    assert abs(float(A.std()) - 1 / math.sqrt(3 * d_in)) < 0.05 / math.sqrt(3 * d_in)
    g = LoRALinear(make_linear(rng, d_in, d_out), r, init_lora_weights="gaussian", rng=0)
    assert abs(float(g.params["lora_A"].std()) - 1 / r) < 0.05 / r  # PEFT: std = 1/r
    s = LoRALinear(make_linear(rng, d_in, d_out), r, init_lora_weights="swap", rng=0)
    assert float(abs(s.params["lora_A"]).max()) == 0.0
    assert float(abs(s.params["lora_B"]).max()) > 0.0
    e = LoRAEmbedding(Embedding(randn(rng, 50, 16)), 4, init_lora_weights=True, rng=0)
    assert float(abs(e.params["lora_A"]).max()) == 0.0  # PEFT's embedding: A = 0, B ~ N(0, 1)
    assert e.params["lora_A"].shape == (4, 50) and e.params["lora_B"].shape == (16, 4)


def test_swap_init_moves_the_other_factor_first(rng):
    """Default: A random, B = 0 -> dL/dA = 0 and only B moves on step 1. "swap" mirrors it."""
    x, dout = randn(rng, 3, 6), randn(rng, 3, 5)
    grads = {}
    for init in (True, "swap"):
        layer = LoRALinear(make_linear(rng, 6, 5), r=2, init_lora_weights=init, rng=0)
        out, cache = layer.forward(x)
        layer.backward(dout, cache)
        grads[init] = {k: float(abs(g).max()) for k, g in layer.grads.items()}
    assert grads[True]["lora_A"] == 0.0 and grads[True]["lora_B"] > 0.0
    assert grads["swap"]["lora_B"] == 0.0 and grads["swap"]["lora_A"] > 0.0


def test_pissa_keeps_output_and_takes_top_singular_part(rng):
    w = randn(rng, 6, 9)
    base = Linear(w.copy(), randn(rng, 6))
    x = randn(rng, 4, 9)
    before, _ = base.forward(x)
    for use_rslora in (False, True):
        layer = LoRALinear(Linear(w.copy(), base.params["bias"]), r=2, lora_alpha=3,
                           use_rslora=use_rslora, init_lora_weights="pissa")
        np.testing.assert_allclose(layer.forward(x)[0], before, rtol=1e-12, atol=1e-12)
        S = np.linalg.svd(np_(w), compute_uv=False)
        np.testing.assert_allclose(np.linalg.svd(np_(layer.params["weight"]), compute_uv=False)[:4],
                                   S[2:], rtol=1e-10, atol=1e-12)  # residual = the tail of W
        np.testing.assert_allclose(np.linalg.svd(np_(layer.delta_weight()), compute_uv=False)[:2],
                                   S[:2], rtol=1e-10)


def test_pissa_embedding_and_model(rng):
    model = tiny_model()
    idx, _ = batch()
    before = np_(model.forward(idx)[0]).copy()
    inject_lora(model, LoraConfig(r=2, target_modules=ALL, init_lora_weights="pissa"))
    np.testing.assert_allclose(np_(model.forward(idx)[0]), before, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# counts, freezing, bias modes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets,bias,model_bias", [
    (("q", "v"), "none", True), (("q", "k", "v", "o"), "none", True), (ALL, "none", True),
    (("up", "down"), "all", True), (("q", "lm_head"), "lora_only", True),
    (("wte", "up"), "lora_only", True), (("q", "v"), "all", False), (("v",), "lora_only", False)])
def test_trainable_count_matches_formula(targets, bias, model_bias):
    cfg = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, bias=model_bias)
    lc = LoraConfig(r=3, target_modules=targets, bias=bias)
    model = GPT(cfg, 0)
    report = inject_lora(model, lc)
    assert report["trainable"] == count_lora_parameters(lc, cfg)
    assert report["total"] == cfg.num_parameters() + sum(
        m.params["lora_A"].size + m.params["lora_B"].size for m in lora_layers(model).values())
    assert math.isclose(report["percent"], 100 * report["trainable"] / report["total"])


def test_per_layer_count_is_r_times_din_plus_dout(rng):
    d, r = 16, 4
    sq = LoRALinear(make_linear(rng, d, d), r)
    assert sq.params["lora_A"].size + sq.params["lora_B"].size == 2 * d * r
    rect = LoRALinear(make_linear(rng, d, 3 * d), r)
    assert rect.params["lora_A"].size + rect.params["lora_B"].size == d * r + r * 3 * d


def test_bias_modes():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=2, target_modules=("q", "lm_head"), bias="lora_only"))
    names = {n for n, _, _ in model.named_trainable()}
    assert "blocks.0.attn.q.bias" in names and "blocks.0.attn.k.bias" not in names
    assert "blocks.0.ln_1.bias" not in names
    mark_only_lora_as_trainable(model, "all")
    names = {n for n, _, _ in model.named_trainable()}
    assert {"blocks.0.attn.k.bias", "blocks.1.ln_1.bias", "ln_f.bias"} <= names
    assert not any(n.endswith(".weight") for n in names)
    mark_only_lora_as_trainable(model, "none")
    assert all(n.rsplit(".", 1)[-1].startswith("lora_") for n, _, _ in model.named_trainable())
    sd = lora_state_dict(model, "lora_only")
    assert "blocks.1.attn.q.bias" in sd and "lm_head.lora_B" in sd and "ln_f.bias" not in sd
    with pytest.raises(ConfigError, match="bias"):
        mark_only_lora_as_trainable(model, "some")


def test_frozen_base_unchanged_after_adamw_steps():
    model = tiny_model(dtype="float32")
    inject_lora(model, LoraConfig(r=2, target_modules=ALL))
    frozen = {n: np_(p).copy() for n, p in model.named_parameters()
              if not n.rsplit(".", 1)[-1].startswith("lora_")}
    lora0 = {n: np_(p).copy() for n, p in lora_state_dict(model).items()}
    opt = AdamW(model, lr=1e-2)
    idx, tgt = batch()
    for _ in range(3):
        model.forward_backward(idx, tgt)
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(np_(p), frozen[n], err_msg=n)
    moved = [n for n, p in lora_state_dict(model).items() if not np.array_equal(np_(p), lora0[n])]
    assert len(moved) == len(lora0)
    assert set(opt.m) == set(lora0)  # optimizer state only for the factors


def test_no_gradient_buffer_for_frozen_params(rng):
    layer = LoRALinear(make_linear(rng, 4, 4), r=2)
    out, cache = layer.forward(randn(rng, 3, 4))
    layer.backward(randn(rng, 3, 4), cache)
    assert set(layer.grads) == {"lora_A", "lora_B"}
    model = tiny_model()
    inject_lora(model, LoraConfig(r=2, target_modules=("q", "wte")))
    model.forward_backward(*batch())
    q = model.blocks[0].attn.q
    assert "weight" not in q.grads and "bias" not in q.grads and "weight" not in model.wte.grads
    assert model.blocks[0].attn.k.grads == {}


def test_wrapper_replaces_children_and_attributes():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=2, target_modules=ALL))
    blk = model.blocks[1]
    assert blk.attn.q is blk.attn.children["q"] and isinstance(blk.attn.q, LoRALinear)
    assert blk.mlp.down is blk.mlp.children["down"] and isinstance(blk.mlp.down, LoRALinear)
    assert model.lm_head is model.children["lm_head"] and isinstance(model.lm_head, LoRALinear)
    assert model.wte is model.children["wte"] and isinstance(model.wte, LoRAEmbedding)
    names = dict(model.named_parameters())
    assert {"blocks.1.attn.q.weight", "blocks.1.attn.q.bias", "blocks.1.attn.q.lora_A",
            "blocks.1.attn.q.lora_B", "wte.weight", "wte.lora_A"} <= set(names)


def test_base_checkpoint_still_loads_by_name():
    donor = tiny_model(seed=5)
    model = tiny_model(seed=0)
    inject_lora(model, LoraConfig(r=2, target_modules=("q", "v", "wte")))
    model.load_state_dict(donor.state_dict(), strict=False)
    idx, _ = batch()
    np.testing.assert_array_equal(np_(model.forward(idx)[0]), np_(donor.forward(idx)[0]))


# ----------------------------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------------------------
def _randomise_b(model, seed=9, scale=0.3):
    rng = np.random.default_rng(seed)
    for m in lora_layers(model).values():
        m.params["lora_B"] = randn(rng, *m.params["lora_B"].shape, scale=scale,
                                   dtype=m.params["lora_B"].dtype)
        if float(abs(m.params["lora_A"]).max()) == 0.0:  # embeddings start with A = 0
            m.params["lora_A"] = randn(rng, *m.params["lora_A"].shape, scale=scale,
                                       dtype=m.params["lora_A"].dtype)


def test_merged_equals_unmerged_and_adapter_matters(xpb):
    model = tiny_model()
    idx, _ = batch()
    base = np_(model.forward(idx)[0]).copy()
    inject_lora(model, LoraConfig(r=2, target_modules=ALL))
    _randomise_b(model)
    logits = np_(model.forward(idx)[0]).copy()
    assert not np.allclose(logits, base)  # the adapter really changes the output
    merged_names = merge_lora(model, safe_merge=True)
    assert len(merged_names) == 14 and all(m.merged for m in lora_layers(model).values())
    np.testing.assert_allclose(np_(model.forward(idx)[0]), logits, rtol=1e-10, atol=1e-10)
    unmerge_lora(model)
    np.testing.assert_allclose(np_(model.forward(idx)[0]), logits, rtol=1e-10, atol=1e-10)


def test_merge_unmerge_round_trips_float32_drift(rng):
    w0 = randn(rng, 64, 48, scale=0.02, dtype="float32")
    layer = LoRALinear(Linear(w0.copy()), r=8, lora_alpha=16, rng=0)
    layer.params["lora_B"] = randn(rng, 64, 8, scale=0.1, dtype="float32")
    for _ in range(1000):
        layer.merge()
        layer.unmerge()
    assert float(abs(layer.params["weight"] - w0).max()) < 1e-4


def test_embedding_merge(rng):
    layer = LoRAEmbedding(Embedding(randn(rng, 9, 4)), r=2, init_lora_weights=False)
    idx = backend.asarray(np.array([[1, 8, 1]]))
    out, _ = layer.forward(idx)
    assert layer.delta_weight().shape == (9, 4)
    layer.merge()
    np.testing.assert_allclose(layer.forward(idx)[0], out, rtol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.forward(idx)[0], out, rtol=1e-12)


def test_merge_twice_raises_and_unmerge_warns(rng):
    layer = LoRALinear(make_linear(rng, 4, 4), r=2)
    layer.merge()
    with pytest.raises(LoRAError, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    model = tiny_model()
    inject_lora(model, LoraConfig(r=2))
    merge_lora(model)
    with pytest.raises(LoRAError, match="already merged"):
        merge_lora(model)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 = nan
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_adapter(rng, bad):
    layer = LoRALinear(make_linear(rng, 4, 4), r=2, init_lora_weights=False)
    layer.params["lora_B"][0, 0] = bad
    w_before = np_(layer.params["weight"]).copy()
    with pytest.raises(LoRAError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    np.testing.assert_array_equal(np_(layer.params["weight"]), w_before)
    assert not layer.merged
    model = tiny_model()
    inject_lora(model, LoraConfig(r=2, target_modules=("q", "v")))
    model.blocks[1].attn.v.params["lora_A"][0, 0] = bad
    model.blocks[1].attn.v.params["lora_B"][...] = 1.0
    q_before = np_(model.blocks[0].attn.q.params["weight"]).copy()
    with pytest.raises(LoRAError, match="blocks.1.attn.v"):
        merge_lora(model, safe_merge=True)
    np.testing.assert_array_equal(np_(model.blocks[0].attn.q.params["weight"]), q_before)


def test_backward_through_merged_layer_is_refused(rng):
    layer = LoRALinear(make_linear(rng, 4, 4), r=2)
    layer.merge()
    out, cache = layer.forward(randn(rng, 2, 4))
    with pytest.raises(LoRAError, match="unmerge"):
        layer.backward(randn(rng, 2, 4), cache)


def test_rslora_scaling(rng):
    assert lora_scaling(4, 8) == 2.0 and lora_scaling(16, 8, use_rslora=True) == 2.0
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling == 2.0
    layer = LoRALinear(make_linear(rng, 20, 20), r=16, lora_alpha=8, use_rslora=True,
                       init_lora_weights=False)
    assert layer.scaling == 2.0
    np.testing.assert_allclose(layer.delta_weight(),
                               2.0 * layer.params["lora_B"] @ layer.params["lora_A"])
    model = tiny_model()
    inject_lora(model, LoraConfig(r=4, lora_alpha=6, use_rslora=True))
    assert all(m.scaling == 3.0 for m in lora_layers(model).values())


# ----------------------------------------------------------------------------------------------
# adapter files
# ----------------------------------------------------------------------------------------------
def test_save_and_load_adapter_round_trip(tmp_path):
    model = tiny_model(seed=0, dtype="float32")
    lc = LoraConfig(r=2, target_modules=("q", "v", "wte"), bias="lora_only", seed=4)
    inject_lora(model, lc)
    _randomise_b(model)
    model.blocks[0].attn.q.params["bias"] += 0.5  # a trained bias travels with the adapter
    idx, _ = batch()
    want = np_(model.forward(idx)[0]).copy()
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, model, lc)
    from helpers import load_arrays
    saved, _ = load_arrays(path)
    assert set(saved) == set(lora_state_dict(model, "lora_only"))  # no base weight in the file
    assert path.stat().st_size < 4 * TINY.num_parameters()  # even this tiny base is larger
    fresh = tiny_model(seed=0, dtype="float32")
    got_config = load_adapter(path, fresh)
    assert got_config == lc
    np.testing.assert_array_equal(np_(fresh.forward(idx)[0]), want)
    assert {n for n, _, _ in fresh.named_trainable()} == set(lora_state_dict(model, "lora_only"))
    again = load_adapter(path, fresh)  # into a model that already has the same LoRA layers
    assert again == lc


def test_load_adapter_built_for_another_base_shape(tmp_path):
    small = tiny_model()
    lc = LoraConfig(r=2)
    inject_lora(small, lc)
    save_adapter(tmp_path / "a.safetensors", small, lc)
    wide = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=16), 0)
    with pytest.raises(LoRAError, match="another base model"):
        load_adapter(tmp_path / "a.safetensors", wide)
    inject_lora(wide, lc)
    with pytest.raises(LoRAError, match=r"shape \(2, 8\).*\(2, 16\)"):
        load_lora_state_dict(wide, lora_state_dict(small))


def test_load_lora_state_dict_errors():
    model = tiny_model()
    with pytest.raises(LoRAError, match="inject_lora"):
        load_lora_state_dict(model, {})
    inject_lora(model, LoraConfig(r=2, target_modules=("q",)))
    sd = {n: np_(p) for n, p in lora_state_dict(model).items()}
    with pytest.raises(LoRAError, match="match no LoRA factor"):
        load_lora_state_dict(model, {**sd, "blocks.0.attn.k.lora_A": sd["blocks.0.attn.q.lora_A"]})
    with pytest.raises(LoRAError, match="lacks"):
        load_lora_state_dict(model, {"blocks.0.attn.q.lora_A": sd["blocks.0.attn.q.lora_A"]})
    with pytest.raises(LoRAError, match="match no LoRA factor"):
        load_lora_state_dict(model, {**sd, "blocks.0.attn.q.weight": np.zeros((8, 8))})
    merge_lora(model)
    with pytest.raises(LoRAError, match="merged"):
        load_lora_state_dict(model, sd)


def test_load_adapter_rejects_other_files(tmp_path):
    from helpers import save_arrays
    save_arrays(tmp_path / "x.safetensors", {"a": np.zeros(2)}, {"format": "something-else"})
    with pytest.raises(CheckpointError, match="not a minilora adapter"):
        load_adapter(tmp_path / "x.safetensors", tiny_model())


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -1, 2.0, True, "4"])
def test_bad_rank(rng, r):
    with pytest.raises(ConfigError, match="r must be an integer"):
        LoraConfig(r=r)
    with pytest.raises(ConfigError, match="r must be an integer"):
        LoRALinear(make_linear(rng, 4, 4), r=r)


def test_rank_above_min_dim(rng):
    with pytest.raises(ConfigError, match=r"min\(d_in, d_out\) = min\(6, 3\)"):
        LoRALinear(make_linear(rng, 6, 3), r=4)
    with pytest.raises(ConfigError, match="larger than min"):
        LoRAEmbedding(Embedding(randn(rng, 3, 8)), r=4)
    model = tiny_model()
    with pytest.raises(ConfigError, match="'blocks.0.attn.q'"):
        inject_lora(model, LoraConfig(r=9, target_modules=("q",)))
    assert not lora_layers(model)  # nothing was replaced


def test_unknown_target_module_and_aliases():
    with pytest.raises(ConfigError, match=r"unknown target module 'qkv'.*q, k, v, o, up, down"):
        LoraConfig(target_modules=("q", "qkv"))
    assert LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"]).target_modules == \
        ("q", "v", "wte")
    assert LoraConfig(target_modules="all-linear").target_modules == \
        ("q", "k", "v", "o", "up", "down")


def test_no_module_matched_lists_available():
    tree = Module()
    tree.add("proj", Linear(backend.asarray(np.ones((3, 3)))))
    with pytest.raises(LoRAError, match="can be adapted: proj"):
        inject_lora(tree, LoraConfig(r=1, target_modules=("q",)))


def test_inject_twice_raises():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=2))
    with pytest.raises(LoRAError, match="already has LoRA layers"):
        inject_lora(model, LoraConfig(r=2))


@pytest.mark.parametrize("kw,match", [
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(lora_dropout=-0.5), "lora_dropout"),
    (dict(bias="some"), "bias must be one of"), (dict(init_lora_weights="kaiming"), "init_lora"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(seed=-1), "seed"), (dict(use_rslora=1), "use_rslora"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kw)


def test_config_json_round_trip_and_unknown_fields():
    lc = LoraConfig(r=4, lora_alpha=16, target_modules=("q", "k", "lm_head"), use_rslora=True,
                    init_lora_weights="pissa", bias="all", seed=3)
    assert LoraConfig.from_json(lc.to_json()) == lc
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['peft_type'\]"):
        LoraConfig.from_json('{"r": 4, "peft_type": "LORA"}')


def test_wrappers_reject_wrong_base(rng):
    with pytest.raises(TypeError, match="wraps a minilora Linear"):
        LoRALinear(Embedding(randn(rng, 4, 4)), r=1)
    with pytest.raises(TypeError, match="wraps a minilora Embedding"):
        LoRAEmbedding(make_linear(rng, 4, 4), r=1)


def test_set_lora_training_toggles_dropout():
    model = tiny_model()
    inject_lora(model, LoraConfig(r=2, lora_dropout=0.5, init_lora_weights=False))
    idx, _ = batch()
    set_lora_training(model, False)
    a, b = np_(model.forward(idx)[0]), np_(model.forward(idx)[0])
    np.testing.assert_array_equal(a, b)
    set_lora_training(model, True)
    assert not np.allclose(np_(model.forward(idx)[0]), np_(model.forward(idx)[0]))
