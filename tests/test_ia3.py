"""(IA)³: gradients in float64, identity at ones, merge/unmerge, counts, files (ours and PEFT's),
config errors, and the real-PEFT fixture (peft 0.21.2: k, v and down_proj's input)."""
import numpy as np
import pytest
from helpers import batch, lora_layer_gradcheck, np_, randn
from peft_gpt import PEFT_DIR, fixture_gpt, logits_of, reference

from minilora import backend
from minilora.config import ConfigError, GPTConfig
from minilora.gradcheck import format_table, model_check
from minilora.model import GPT
from minilora.nn.layers import Linear
from minilora.errors import PeftError
from minilora.nn.modules_to_save import add_modules_to_save
from minilora.methods.ia3 import (
    IA3Config,
    IA3Linear,
    count_ia3_parameters,
    export_ia3_peft,
    ia3_layers,
    import_ia3_peft,
    inject_ia3,
    load_ia3,
    merge_ia3,
    save_ia3,
    unmerge_ia3,
)

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_gradcheck(xpb, rng, feedforward, bias):
    base = Linear(randn(rng, 4, 5), randn(rng, 4) if bias else None)
    layer = IA3Linear(base, feedforward, l0=1 + 0.3 * rng.standard_normal(5 if feedforward else 4))
    layer.trainable = {"ia3_l", "weight"} | ({"bias"} if bias else set())
    rows = lora_layer_gradcheck(layer, randn(rng, 2, 3, 5), randn(rng, 2, 3, 4))
    assert all(r["ok"] for r in rows), format_table(rows)


def test_whole_model_gradcheck(xpb):
    model = GPT(TINY, 0, dtype="float64")
    inject_ia3(model, IA3Config(init_ia3_weights=False))
    x, y = batch(0, B=2, T=5, V=11)
    rows = model_check(model, x, y)
    assert rows and all(r["ok"] for r in rows), format_table(rows)


def test_ones_are_the_identity_and_shapes_follow_peft(xpb):
    model = GPT(TINY, 0, dtype="float64")
    idx = backend.asarray(np.arange(10).reshape(2, 5))
    base = np_(model.forward(idx)[0]).copy()
    report = inject_ia3(model, IA3Config())
    np.testing.assert_array_equal(np_(model.forward(idx)[0]), base)
    C, L = TINY.n_embd, TINY.n_layer
    assert report["trainable"] == L * (C + C + 4 * C) == count_ia3_parameters(IA3Config(), TINY)
    shapes = {n.split(".", 2)[2]: tuple(m.params["ia3_l"].shape)
              for n, m in ia3_layers(model).items() if n.startswith("blocks.0")}
    assert shapes == {"attn.k": (C, 1), "attn.v": (C, 1), "mlp.down": (1, 4 * C)}


def test_merge_unmerge_round_trip_and_files(tmp_path, xpb):
    model = GPT(TINY, 0, dtype="float64")
    w0 = {k: np_(v).copy() for k, v in model.state_dict().items()}
    inject_ia3(model, IA3Config(target_modules=("q", "k", "v", "up", "down"),
                                feedforward_modules=("down", "q"), init_ia3_weights=False))
    idx = backend.asarray(np.arange(10).reshape(2, 5))
    out = np_(model.forward(idx)[0]).copy()
    assert not np.allclose(out, np_(GPT(TINY, 0, dtype="float64").forward(idx)[0]))
    save_ia3(tmp_path / "ia3.safetensors", model, IA3Config(
        target_modules=("q", "k", "v", "up", "down"), feedforward_modules=("down", "q")))
    merge_ia3(model)
    np.testing.assert_allclose(np_(model.forward(idx)[0]), out, rtol=1e-12, atol=1e-12)
    unmerge_ia3(model)
    for k, v in model.state_dict().items():
        if k in w0:
            np.testing.assert_allclose(np_(v), w0[k], rtol=1e-14, atol=1e-15)
    fresh = GPT(TINY, 0, dtype="float64")
    load_ia3(tmp_path / "ia3.safetensors", fresh)
    np.testing.assert_allclose(np_(fresh.forward(idx)[0]), out, rtol=1e-14)


@pytest.mark.parametrize("kw,match", [
    (dict(target_modules=("k", "gate")), "unknown target_modules"),
    (dict(feedforward_modules=("up",)), "must be among target_modules"),
    (dict(init_ia3_weights="yes"), "init_ia3_weights"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        IA3Config(**kw)


def test_saving_an_adapted_module_whole_is_refused():
    model = GPT(TINY, 0)
    inject_ia3(model, IA3Config())
    with pytest.raises(PeftError, match="already adapted"):
        add_modules_to_save(model, ("down",))


def test_peft_ia3_file_reproduces_peft_logits_merge_and_round_trips(tmp_path):
    ref = reference("gpt_ia3")
    model = fixture_gpt(ref)
    config = import_ia3_peft(PEFT_DIR / "gpt_ia3", model)
    assert config.target_modules == ("v", "k", "down") or set(config.target_modules) == {
        "k", "v", "down"}
    assert config.feedforward_modules == ("down",)
    np.testing.assert_allclose(logits_of(model, ref), ref["logits"], rtol=0, atol=1e-8)
    export_ia3_peft(tmp_path, model, config)
    from safetensors.numpy import load_file
    ours, theirs = (load_file(str(p / "adapter_model.safetensors")) for p in
                    (tmp_path, PEFT_DIR / "gpt_ia3"))
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    merge_ia3(model)
    np.testing.assert_allclose(logits_of(model, ref), ref["logits_merged"], rtol=0, atol=1e-8)
    sd = model.state_dict()
    for k in ref:
        if k.startswith("merged/"):
            np.testing.assert_allclose(np_(sd[k[len("merged/"):]]), ref[k], rtol=1e-13,
                                       atol=1e-15)
