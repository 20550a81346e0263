"""DoRA: gradients (detached norm as in the paper and PEFT, and the exact one), start at the base,
magnitude = row norms of W0, merge / unmerge, files (ours and PEFT's), and the real-PEFT fixture."""
import numpy as np
import pytest
from helpers import lora_layer_gradcheck, np_, randn
from peft_gpt import PEFT_DIR, fixture_gpt, logits_of, reference

from minilora import backend
from minilora.config import ConfigError, GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.gradcheck import format_table
from minilora.methods.lora import (
    DoRALinear,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from minilora.methods.lora.peft_io import export_peft, import_peft
from minilora.model import GPT
from minilora.nn.layers import Linear

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)


def make_dora(rng, d_in=5, d_out=4, bias=True, dropout=0.0, detach=True):
    base = Linear(randn(rng, d_out, d_in), randn(rng, d_out) if bias else None)
    layer = DoRALinear(base, r=3, lora_alpha=6, lora_dropout=dropout, init_lora_weights=False,
                       rng=1, detach_norm=detach)
    # a magnitude away from the norm, so every term of the gradient matters
    layer.params["lora_magnitude_vector"] *= backend.asarray(1 + 0.3 * rng.standard_normal(d_out))
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_gradient_matches_finite_differences(xpb, rng, dropout, bias):
    layer = make_dora(rng, bias=bias, dropout=dropout, detach=False)
    rows = lora_layer_gradcheck(layer, randn(rng, 2, 3, 5), randn(rng, 2, 3, 4))
    assert {r["name"] for r in rows} == {"dx", "dlora_A", "dlora_B", "dlora_magnitude_vector"}
    assert all(r["ok"] for r in rows), format_table(rows)


def test_detached_gradient_is_the_gradient_with_the_norm_held_constant(xpb, rng):
    """The paper's trick: d/dA, d/dB as if n = ||W0 + sBA|| were a constant. Check it against
    finite differences of a forward whose norm is frozen at its current value, and check that it
    differs from the exact gradient."""
    layer = make_dora(rng, detach=True)
    x, dout = randn(rng, 2, 3, 5), randn(rng, 2, 3, 4)
    frozen = layer.weight_norm().copy()
    layer.weight_norm = lambda: frozen  # the forward now sees a constant norm
    rows = lora_layer_gradcheck(layer, x, dout)
    assert all(r["ok"] for r in rows), format_table(rows)
    detached = {k: np_(v).copy() for k, v in layer.grads.items()}
    del layer.weight_norm
    layer.detach_norm = False
    _, cache = layer.forward(x)
    layer.zero_grad()
    layer.backward(dout, cache)
    assert not np.allclose(detached["lora_A"], np_(layer.grads["lora_A"]))
    np.testing.assert_allclose(detached["lora_magnitude_vector"],
                               np_(layer.grads["lora_magnitude_vector"]), rtol=1e-12)


def test_starts_at_the_base_with_magnitude_the_row_norms_of_w0(xpb, rng):
    base = Linear(randn(rng, 6, 5), randn(rng, 6))
    w0 = np_(base.params["weight"]).copy()
    layer = DoRALinear(base, r=2, lora_alpha=4)
    # one norm per output unit (a row of the (d_out, d_in) weight), PEFT's orientation
    np.testing.assert_allclose(np_(layer.params["lora_magnitude_vector"]),
                               np.linalg.norm(w0, axis=1), rtol=1e-14)
    x = randn(rng, 3, 5)
    out, _ = layer.forward(x)
    # g = m / n = 1 exactly and B = 0: exactly the base layer's output
    np.testing.assert_array_equal(np_(out), np_(Linear(base.params["weight"],
                                                       base.params["bias"]).forward(x)[0]))


def test_merge_unmerge_round_trip_and_merged_forward(xpb, rng):
    layer = make_dora(rng, d_in=7, d_out=6)
    w0 = np_(layer.params["weight"]).copy()
    x = randn(rng, 4, 7)
    out, _ = layer.forward(x)
    layer.merge()
    merged, _ = layer.forward(x)
    np.testing.assert_allclose(np_(merged), np_(out), rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(np_(layer.params["weight"]), w0, rtol=1e-12, atol=1e-13)
    assert not np.allclose(np_(out), np_(x) @ w0.T)  # the adapter matters


def test_inject_with_use_dora_counts_the_magnitude_and_saves_it(tmp_path):
    model = GPT(TINY, 0, dtype="float64")
    cfg = LoraConfig(r=2, target_modules=("q", "v"), use_dora=True)
    report = inject_lora(model, cfg)
    layers = lora_layers(model)
    assert all(isinstance(m, DoRALinear) for m in layers.values())
    C, L = TINY.n_embd, TINY.n_layer
    assert report["trainable"] == L * 2 * (2 * C * 2 + C)  # r (d_in + d_out) + d_out per layer
    for m in layers.values():
        m.params["lora_B"] += 0.1
        m.params["lora_magnitude_vector"] *= 1.1
    idx = backend.asarray(np.arange(12).reshape(2, 6) % 11)
    want = np_(model.forward(idx)[0])
    save_adapter(tmp_path / "a.safetensors", model, cfg)
    fresh = GPT(TINY, 0, dtype="float64")
    assert load_adapter(tmp_path / "a.safetensors", fresh).use_dora
    np.testing.assert_allclose(np_(fresh.forward(idx)[0]), want, rtol=1e-12)
    merge_lora(fresh)
    np.testing.assert_allclose(np_(fresh.forward(idx)[0]), want, rtol=1e-10, atol=1e-12)
    unmerge_lora(fresh)


def test_bad_dora_configs():
    with pytest.raises(ConfigError, match="Linear layers only"):
        LoraConfig(target_modules=("q", "wte"), use_dora=True)
    with pytest.raises(ConfigError, match="use_dora must be"):
        LoraConfig(use_dora="yes")


# ----------------------------------------------------------------------------------------------
# the real-PEFT fixture (peft 0.21.2, LoRA r=4 alpha 8 use_dora on q_proj, v_proj)
# ----------------------------------------------------------------------------------------------
def test_peft_dora_file_loads_and_reproduces_peft_logits():
    ref = reference("gpt_dora")
    model = fixture_gpt(ref)
    np.testing.assert_allclose(logits_of(model, ref), ref["logits_base"], rtol=0, atol=1e-10)
    config = import_peft(PEFT_DIR / "gpt_dora", model)
    assert config.use_dora and config.r == 4 and set(config.target_modules) == {"q", "v"}
    np.testing.assert_allclose(logits_of(model, ref), ref["logits"], rtol=0, atol=1e-8)
    for name, m in lora_layers(model).items():
        module = {"q": "q_proj", "v": "v_proj"}[name.rsplit(".", 1)[1]]
        peft_name = f"model.layers.{name.split('.')[1]}.self_attn.{module}"
        np.testing.assert_allclose(np_(m.weight_norm()), ref[f"weight_norm/{peft_name}"],
                                   rtol=1e-12)
        np.testing.assert_allclose(np_(m.delta_weight() + m.params["weight"]),
                                   ref[f"merged/{name}.weight"], rtol=1e-12, atol=1e-14)
    merge_lora(model)
    np.testing.assert_allclose(logits_of(model, ref), ref["logits_merged"], rtol=0, atol=1e-8)


def test_peft_magnitude_at_init_is_our_magnitude_at_init():
    ref = reference("gpt_dora")
    model = fixture_gpt(ref)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q", "v"), use_dora=True))
    for name, m in lora_layers(model).items():
        module = {"q": "q_proj", "v": "v_proj"}[name.rsplit(".", 1)[1]]
        key = f"magnitude_init/model.layers.{name.split('.')[1]}.self_attn.{module}"
        np.testing.assert_allclose(np_(m.params["lora_magnitude_vector"]), ref[key], rtol=1e-13)


def test_dora_export_round_trips_through_peft_layout(tmp_path):
    ref = reference("gpt_dora")
    model = fixture_gpt(ref)
    config = import_peft(PEFT_DIR / "gpt_dora", model)
    export_peft(tmp_path / "out", model, config)
    from safetensors.numpy import load_file
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    theirs = load_file(str(PEFT_DIR / "gpt_dora" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    import json
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is True
