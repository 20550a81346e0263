"""PEFT adapter directories: key names, shapes, config fields, round trip, clear errors.

The expected key forms come from PEFT's saved files as recorded in
``shared/facts/nf4-and-peft-format.md`` §3.1-§3.5 (Linear ``.lora_A.weight`` (r, in), embedding
``.lora_embedding_A`` (r, V) with no ``.weight``, prefix ``base_model.model.``, no adapter name).
"""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minilora import backend
from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora import LoRAError, inject_lora, lora_layers, merge_lora
from minilora.methods.lora.peft_io import export_peft, import_peft
from minilora.peft_format import CONFIG_NAME, PEFT_MODULE_MAP, WEIGHTS_NAME, PeftFormatError, from_peft_module, to_peft_module
from minilora.model import GPT

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)
ALL = ("q", "k", "v", "o", "up", "down", "wte", "lm_head")


def tiny_model(seed=0, dtype="float64", config=TINY):
    return GPT(config, seed, dtype=dtype)


def idx_batch(seed=0):
    rng = np.random.default_rng(seed)
    return backend.asarray(rng.integers(0, 11, size=(2, 6)))


def trained_adapter(config, seed=0, dtype="float64"):
    """A model with the adapter injected and every factor set to random values (as if trained)."""
    model = tiny_model(seed, dtype)
    inject_lora(model, config)
    rng = np.random.default_rng(42)
    for m in lora_layers(model).values():
        for k in ("lora_A", "lora_B"):
            m.params[k] = backend.asarray(rng.standard_normal(m.params[k].shape) * 0.2,
                                          dtype=m.params[k].dtype)
    return model


def test_module_map_round_trips():
    for ours in ["wte", "lm_head", "ln_f", "blocks.0.attn.q", "blocks.3.attn.o", "blocks.12.mlp.up",
                 "blocks.1.mlp.down", "blocks.2.ln_1", "blocks.2.ln_2"]:
        assert from_peft_module(to_peft_module(ours)) == ours
    assert to_peft_module("blocks.0.attn.q") == "model.layers.0.self_attn.q_proj"
    assert to_peft_module("blocks.7.mlp.down") == "model.layers.7.mlp.down_proj"
    assert to_peft_module("wte") == "model.embed_tokens"
    assert len(set(PEFT_MODULE_MAP.values())) == len(PEFT_MODULE_MAP)  # one-to-one
    with pytest.raises(PeftFormatError, match="wpe"):
        to_peft_module("wpe")
    with pytest.raises(PeftFormatError, match="gate_proj"):
        from_peft_module("model.layers.0.mlp.gate_proj")


def test_export_key_names_and_shapes(tmp_path):
    lc = LoraConfig(r=4, target_modules=("q", "up", "wte", "lm_head"))
    model = trained_adapter(lc)
    export_peft(tmp_path, model, lc)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    C, V, r = 8, 11, 4
    want = {}
    for i in range(2):
        p = f"base_model.model.model.layers.{i}"
        want[f"{p}.self_attn.q_proj.lora_A.weight"] = (r, C)
        want[f"{p}.self_attn.q_proj.lora_B.weight"] = (C, r)
        want[f"{p}.mlp.up_proj.lora_A.weight"] = (r, C)
        want[f"{p}.mlp.up_proj.lora_B.weight"] = (4 * C, r)
    want["base_model.model.model.embed_tokens.lora_embedding_A"] = (r, V)
    want["base_model.model.model.embed_tokens.lora_embedding_B"] = (C, r)
    want["base_model.model.lm_head.lora_A.weight"] = (r, C)
    want["base_model.model.lm_head.lora_B.weight"] = (V, r)
    assert {k: a.shape for k, a in tensors.items()} == want
    assert not any(".default" in k for k in tensors)
    # the factors are ours, untransposed
    np.testing.assert_array_equal(
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"],
        backend.to_numpy(model.wte.params["lora_A"]))


def test_export_config_fields(tmp_path):
    lc = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=("q", "v", "wte"),
                    use_rslora=True, init_lora_weights="gaussian", bias="none")
    export_peft(tmp_path, trained_adapter(lc), lc, base_model_name_or_path="minilora/tiny")
    d = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert d["peft_type"] == "LORA" and d["task_type"] == "CAUSAL_LM"
    assert d["r"] == 4 and d["lora_alpha"] == 16 and d["lora_dropout"] == 0.1
    assert d["target_modules"] == ["q_proj", "v_proj", "embed_tokens"]
    assert d["use_rslora"] is True and d["init_lora_weights"] == "gaussian"
    assert d["bias"] == "none" and d["fan_in_fan_out"] is False and d["use_dora"] is False
    assert d["base_model_name_or_path"] == "minilora/tiny" and d["inference_mode"] is True
    assert "seed" not in d  # not a PEFT field; kept in the safetensors metadata instead


@pytest.mark.parametrize("lc", [
    LoraConfig(r=2, target_modules=ALL),
    LoraConfig(r=3, lora_alpha=5, target_modules=("q", "v"), use_rslora=True, seed=7),
    LoraConfig(r=2, target_modules=("k", "down", "wte"), bias="all", init_lora_weights="swap"),
    LoraConfig(r=2, target_modules=("o", "up"), bias="lora_only", lora_dropout=0.2),
])
def test_round_trip(tmp_path, lc):
    model = trained_adapter(lc)
    if lc.bias != "none":
        for n, p, _ in model.named_trainable():
            if n.endswith(".bias"):
                p += 0.25  # as if trained
    for m in lora_layers(model).values():
        m.training = False
    idx = idx_batch()
    want = backend.to_numpy(model.forward(idx)[0]).copy()
    export_peft(tmp_path, model, lc)
    fresh = tiny_model()
    got = import_peft(tmp_path, fresh)
    assert got == lc  # swap and seed survive through the metadata
    for m in lora_layers(fresh).values():
        m.training = False
    np.testing.assert_array_equal(backend.to_numpy(fresh.forward(idx)[0]), want)
    assert {n for n, _, _ in fresh.named_trainable()} == {n for n, _, _ in model.named_trainable()}
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # atomic writes left no temp


def test_round_trip_on_backend(tmp_path, xpb):
    lc = LoraConfig(r=2, target_modules=("q", "wte"))
    model = trained_adapter(lc, dtype="float32")
    idx = idx_batch()
    want = backend.to_numpy(model.forward(idx)[0]).copy()
    export_peft(tmp_path, model, lc)
    fresh = tiny_model(dtype="float32")
    import_peft(tmp_path, fresh)
    np.testing.assert_array_equal(backend.to_numpy(fresh.forward(idx)[0]), want)


def test_bias_keys(tmp_path):
    lc = LoraConfig(r=2, target_modules=("q",), bias="all")
    export_peft(tmp_path, trained_adapter(lc), lc)
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys  # wrapped
    assert "base_model.model.model.layers.0.self_attn.k_proj.bias" in keys  # not wrapped
    assert "base_model.model.model.layers.1.input_layernorm.bias" in keys
    assert "base_model.model.model.norm.bias" in keys


def test_pissa_round_trip_recomputes_residual(tmp_path):
    lc = LoraConfig(r=2, target_modules=("q", "v", "wte"), init_lora_weights="pissa")
    model = tiny_model()
    inject_lora(model, lc)
    for m in lora_layers(model).values():
        m.params["lora_B"] += 0.05  # a training step's worth of change
    idx = idx_batch()
    want = backend.to_numpy(model.forward(idx)[0]).copy()
    export_peft(tmp_path, model, lc)
    fresh = tiny_model()  # the original W0: import re-derives W0 - ΔW0 from it
    import_peft(tmp_path, fresh)
    np.testing.assert_allclose(backend.to_numpy(fresh.forward(idx)[0]), want, rtol=1e-12,
                               atol=1e-12)


def test_into_model_with_same_layers(tmp_path):
    lc = LoraConfig(r=2, target_modules=("q", "v"))
    model = trained_adapter(lc)
    export_peft(tmp_path, model, lc)
    other = tiny_model()
    inject_lora(other, lc)
    import_peft(tmp_path, other)
    idx = idx_batch()
    np.testing.assert_array_equal(backend.to_numpy(other.forward(idx)[0]),
                                  backend.to_numpy(model.forward(idx)[0]))
    mismatched = tiny_model()
    inject_lora(mismatched, LoraConfig(r=4, target_modules=("q", "v")))
    with pytest.raises(LoRAError, match="r=4"):
        import_peft(tmp_path, mismatched)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def _exported(tmp_path, lc=None):
    lc = lc or LoraConfig(r=2, target_modules=("q", "v"))
    export_peft(tmp_path, trained_adapter(lc), lc)
    return tmp_path


def _edit_config(path, **changes):
    d = json.loads((path / CONFIG_NAME).read_text())
    d.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(d))


def test_missing_files(tmp_path):
    with pytest.raises(PeftFormatError, match="adapter_config.json.*does not exist"):
        import_peft(tmp_path, tiny_model())


def test_not_json_and_truncated_weights(tmp_path):
    path = _exported(tmp_path)
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(PeftFormatError, match="truncated or not a safetensors"):
        import_peft(path, tiny_model())
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(PeftFormatError, match="not valid JSON"):
        import_peft(path, tiny_model())


@pytest.mark.parametrize("changes,match", [
    (dict(peft_type="IA3"), "peft_type"), (dict(use_dora=True), "use_dora"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"), (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=".*attn.*"), "regex"), (dict(target_modules=["gate_proj"]), "gate_proj"),
    (dict(r=0), "r must be"), (dict(target_modules=["q_proj"]), "the weights adapt"),
])
def test_bad_config(tmp_path, changes, match):
    path = _exported(tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(PeftFormatError, match=match):
        import_peft(path, tiny_model())


def test_unknown_config_keys_are_ignored(tmp_path):
    path = _exported(tmp_path)
    _edit_config(path, peft_version="0.21.2", eva_config=None, some_future_field=3)
    assert import_peft(path, tiny_model()).r == 2


def test_adapter_for_another_base_shape(tmp_path):
    path = _exported(tmp_path)
    wide = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=16), 0)
    with pytest.raises(LoRAError, match=r"shape \(2, 8\) but this model's is \(2, 16\)"):
        import_peft(path, wide)


def test_bad_keys(tmp_path):
    path = _exported(tmp_path)
    tensors = load_file(str(path / WEIGHTS_NAME))
    save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 8))},
              str(path / WEIGHTS_NAME))
    with pytest.raises(PeftFormatError, match="does not start with 'base_model.model.'"):
        import_peft(path, tiny_model())
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
               np.zeros(8)}, str(path / WEIGHTS_NAME))
    with pytest.raises(PeftFormatError, match="not a LoRA factor"):
        import_peft(path, tiny_model())


def test_embedding_factor_stored_as_linear(tmp_path):
    lc = LoraConfig(r=2, target_modules=("wte",))
    path = _exported(tmp_path, lc)
    t = load_file(str(path / WEIGHTS_NAME))
    renamed = {k.replace("lora_embedding_A", "lora_A.weight").replace("lora_embedding_B",
                                                                      "lora_B.weight"): a
               for k, a in t.items()}
    save_file(renamed, str(path / WEIGHTS_NAME))
    with pytest.raises(PeftFormatError, match="stored as a linear factor"):
        import_peft(path, tiny_model())


def test_export_refuses_merged_or_empty(tmp_path):
    lc = LoraConfig(r=2)
    with pytest.raises(LoRAError, match="no LoRA layers"):
        export_peft(tmp_path, tiny_model(), lc)
    model = trained_adapter(lc)
    with pytest.raises(LoRAError, match="do not match"):
        export_peft(tmp_path, model, LoraConfig(r=2, target_modules=("q", "k")))
    merge_lora(model)
    with pytest.raises(LoRAError, match="merged"):
        export_peft(tmp_path, model, lc)
