"""Reading safetensors lazily (F32/F16/BF16 upcast exactly), PEFT adapter directories, scaling
patterns, refusing pickles, and finding base weights in single and sharded checkpoints."""
import json
import math
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minilora.analysis import (
    AdapterFileError,
    BaseWeights,
    SafetensorsFile,
    float32_to_bf16,
    lora_scaling,
    match_pattern,
    module_rank_alpha,
    read_peft_adapter,
    write_safetensors,
)


def raw_safetensors(path, entries):
    """Write a safetensors file by hand: entries = [(name, dtype string, shape, raw bytes)]."""
    header, offset, blobs = {}, 0, []
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_lazy_reader_upcasts_f32_f16_bf16_exactly(tmp_path):
    vals = np.array([[1.5, -2.0, 0.15625], [3.0, -0.0078125, 57344.0]])   # exact in all three
    f32 = vals.astype("<f4")
    # bf16 bits by hand: the top half of each float32's bits (exact here: low halves are zero)
    bits = f32.view("<u4")
    assert np.all(bits & 0xFFFF == 0)
    bf16 = (bits >> 16).astype("<u2")
    raw_safetensors(tmp_path / "t.safetensors", [
        ("a32", "F32", (2, 3), f32.tobytes()),
        ("a16", "F16", (2, 3), vals.astype("<f2").tobytes()),
        ("abf", "BF16", (2, 3), bf16.tobytes()),
        ("a64", "F64", (3,), np.array([1e-300, 2.0, -3.5]).tobytes()),
    ])
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert set(f.keys()) == {"a32", "a16", "abf", "a64"} and f.shape("abf") == (2, 3)
    for name in ("a32", "a16", "abf"):
        got = f.read(name)
        assert got.dtype == np.float64 and got.shape == (2, 3)
        assert np.array_equal(got, vals), name
    assert np.array_equal(f.read("a64"), [1e-300, 2.0, -3.5])


def test_bf16_upcast_keeps_the_float32_value_of_the_top_bits(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    top = (x.view(np.uint32) >> 16).astype("<u2")
    raw_safetensors(tmp_path / "b.safetensors", [("x", "BF16", (1000,), top.tobytes())])
    expect = (x.view(np.uint32) & 0xFFFF0000).view(np.float32).astype(np.float64)
    assert np.array_equal(SafetensorsFile(tmp_path / "b.safetensors").read("x"), expect)


def test_reader_agrees_with_safetensors_numpy(tmp_path, rng):
    arrays = {"w": rng.standard_normal((5, 7)).astype(np.float32),
              "h": rng.standard_normal(4).astype(np.float16)}
    save_file(arrays, str(tmp_path / "s.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "s.safetensors")
    assert f.metadata == {"format": "pt"}
    for k, v in arrays.items():
        assert np.array_equal(f.read(k), v.astype(np.float64))


def test_writer_rounds_bf16_to_nearest_even_and_is_readable_elsewhere(tmp_path, rng):
    # bf16 has 7 mantissa bits: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 (even: 1.0),
    # 1 + 3·2^-8 a tie between 1 + 2^-7 and 1 + 2^-6 (even: 1 + 2^-6)
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -7 + 2 ** -10, -2.0], dtype=np.float32)
    write_safetensors(tmp_path / "w.safetensors", {"x": x}, dtype="BF16")
    got = SafetensorsFile(tmp_path / "w.safetensors").read("x")
    assert np.array_equal(got, [1.0, 1 + 2 ** -6, 1 + 2 ** -7, -2.0])
    assert float32_to_bf16(np.array([np.nan], dtype=np.float32))[0] == 0x7FC0
    a = rng.standard_normal((3, 4)).astype(np.float32)
    write_safetensors(tmp_path / "f.safetensors", {"a": a}, dtype="F32", metadata={"k": "v"})
    assert np.array_equal(load_file(str(tmp_path / "f.safetensors"))["a"], a)


def test_reader_rejects_broken_files(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(AdapterFileError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "short.safetensors")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 10 ** 6) + b"{}")
    with pytest.raises(AdapterFileError, match="header length"):
        SafetensorsFile(tmp_path / "long.safetensors")
    raw_safetensors(tmp_path / "bad.safetensors", [("x", "F32", (4,), b"\0" * 12)])
    with pytest.raises(AdapterFileError, match="needs 16"):
        SafetensorsFile(tmp_path / "bad.safetensors")
    raw_safetensors(tmp_path / "i8.safetensors", [("x", "I8", (4,), b"\0" * 4)])
    with pytest.raises(AdapterFileError, match="only F64, F32, F16, BF16"):
        SafetensorsFile(tmp_path / "i8.safetensors").read("x")
    with pytest.raises(AdapterFileError, match="no such file"):
        SafetensorsFile(tmp_path / "missing.safetensors")


# ---- PEFT adapter directories ---------------------------------------------------------------

def make_adapter(path, tensors, config=None, dtype="F32"):
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "adapter_model.safetensors", tensors, dtype=dtype,
                      metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def llama_tensors(rng, layers=2, d=16, r=4, ff=24, adapter_name=None):
    mid = f".{adapter_name}" if adapter_name else ""
    t = {}
    for i in range(layers):
        for proj, (o, n) in {"self_attn.q_proj": (d, d), "self_attn.v_proj": (d, d),
                             "mlp.down_proj": (d, ff)}.items():
            p = f"base_model.model.model.layers.{i}.{proj}"
            t[f"{p}.lora_A{mid}.weight"] = rng.standard_normal((r, n))
            t[f"{p}.lora_B{mid}.weight"] = rng.standard_normal((o, r))
    return t


def test_peft_adapter_groups_llama_modules_and_reads_one_at_a_time(tmp_path, rng):
    tensors = llama_tensors(rng)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = np.zeros(16)
    tensors["base_model.model.score.weight"] = rng.standard_normal((2, 16))
    ad = read_peft_adapter(make_adapter(tmp_path / "ad", tensors, dtype="F64"))
    assert sorted(ad.modules) == sorted(
        f"model.layers.{i}.{p}" for i in range(2)
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    m = ad.modules["model.layers.1.mlp.down_proj"]
    assert (m.kind, m.d_out, m.d_in, m.r, m.lora_alpha, m.scale) == ("linear", 16, 24, 4, 8.0, 2.0)
    assert sorted(ad.other_keys) == ["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
                                     "base_model.model.score.weight"]
    B, A = ad.factors("model.layers.1.mlp.down_proj")
    p = "base_model.model.model.layers.1.mlp.down_proj"
    assert np.array_equal(B, tensors[f"{p}.lora_B.weight"])
    assert np.array_equal(A, tensors[f"{p}.lora_A.weight"])
    assert np.allclose(ad.delta_weight("model.layers.1.mlp.down_proj"), 2.0 * B @ A)


def test_adapter_name_in_keys(tmp_path, rng):
    ad = read_peft_adapter(make_adapter(tmp_path / "ad", llama_tensors(rng, adapter_name="default")))
    assert "model.layers.0.self_attn.v_proj" in ad.modules
    two = {**llama_tensors(rng, 1, adapter_name="one"), **llama_tensors(rng, 1, adapter_name="two")}
    path = make_adapter(tmp_path / "two", two)
    with pytest.raises(AdapterFileError, match="several adapters"):
        read_peft_adapter(path)
    assert len(read_peft_adapter(path, adapter_name="two").modules) == 3


def test_gpt2_embedding_and_dora_keys(tmp_path, rng):
    t = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": rng.standard_normal((4, 12)),
         "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": rng.standard_normal((36, 4)),
         "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector": rng.random(36) + 1,
         "base_model.model.transformer.wte.lora_embedding_A": rng.standard_normal((4, 50)),
         "base_model.model.transformer.wte.lora_embedding_B": rng.standard_normal((12, 4))}
    ad = read_peft_adapter(make_adapter(tmp_path / "g", t, {"fan_in_fan_out": True}, dtype="F64"))
    att, wte = ad.modules["transformer.h.0.attn.c_attn"], ad.modules["transformer.wte"]
    assert (att.kind, att.d_out, att.d_in, att.magnitude_key is not None) == ("linear", 36, 12, True)
    assert np.allclose(ad.magnitude("transformer.h.0.attn.c_attn"),
                       t["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"])
    # embedding: ΔW in y = ΔW x orientation is (C, V) = s · B A; PEFT's table delta is its transpose
    assert (wte.kind, wte.d_out, wte.d_in) == ("embedding", 12, 50)
    B, A = ad.factors("transformer.wte")
    peft_delta = (t["base_model.model.transformer.wte.lora_embedding_B"]
                  @ t["base_model.model.transformer.wte.lora_embedding_A"]).T * 2.0     # (V, C)
    assert np.allclose(ad.delta_weight("transformer.wte").T, peft_delta, rtol=1e-6)
    assert ad.magnitude("transformer.wte") is None


def test_scaling_rules():
    assert lora_scaling(4, 8) == 2.0
    assert lora_scaling(16, 8, use_rslora=True) == 2.0
    assert lora_scaling(9, 6, use_rslora=True) == 2.0


def test_pattern_matching_follows_peft():
    m = "model.layers.0.self_attn.q_proj"
    assert match_pattern({"q_proj": 8}, m) == "q_proj"
    assert match_pattern({"proj": 8}, m) is None                # a suffix must start after a dot
    assert match_pattern({"self_attn.q_proj": 8}, m) == "self_attn.q_proj"
    assert match_pattern({m: 8}, m) == m                        # the whole path matches too
    assert match_pattern({r"layers\.[0-3]\.self_attn\.q_proj": 8}, m) is not None
    assert match_pattern({r"layers\.[4-7]\.self_attn\.q_proj": 8}, m) is None
    assert match_pattern({"k_proj": 2, "q_proj": 4, r".*proj": 8}, m) == "q_proj"   # first match
    assert match_pattern({r".*_proj": 8, "q_proj": 4}, m) == r".*_proj"
    with pytest.raises(AdapterFileError, match="not a regular expression"):
        match_pattern({"q_proj(": 8}, m)


def test_rank_and_alpha_patterns_and_rslora(tmp_path, rng):
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
           "alpha_pattern": {"q_proj": 32}, "use_rslora": True}
    assert module_rank_alpha(cfg, "model.layers.0.self_attn.v_proj") == (2, 8.0)
    assert module_rank_alpha(cfg, "model.layers.0.self_attn.q_proj") == (4, 32.0)
    t = llama_tensors(rng, layers=2, r=4)
    for i in range(2):
        p = f"base_model.model.model.layers.{i}.self_attn.v_proj"
        t[f"{p}.lora_A.weight"] = rng.standard_normal((2, 16))
        t[f"{p}.lora_B.weight"] = rng.standard_normal((16, 2))
    p = "base_model.model.model.layers.1.mlp.down_proj"
    t[f"{p}.lora_A.weight"] = rng.standard_normal((6, 24))
    t[f"{p}.lora_B.weight"] = rng.standard_normal((16, 6))
    ad = read_peft_adapter(make_adapter(tmp_path / "p", t, cfg))
    mods = ad.modules
    assert mods["model.layers.0.self_attn.v_proj"].scale == pytest.approx(8 / math.sqrt(2))
    assert mods["model.layers.0.self_attn.q_proj"].scale == pytest.approx(32 / 2)
    assert mods["model.layers.1.mlp.down_proj"].scale == pytest.approx(8 / math.sqrt(6))
    assert mods["model.layers.0.mlp.down_proj"].scale == pytest.approx(8 / 2)
    # the same adapter without the rank pattern no longer describes its weights
    cfg_bad = {k: v for k, v in cfg.items() if k != "rank_pattern"}
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **cfg_bad}))
    with pytest.raises(AdapterFileError, match="rank 4 .* tensors have rank 2"):
        read_peft_adapter(tmp_path / "p")


def test_legacy_bin_and_other_mistakes_are_refused(tmp_path, rng):
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(AdapterFileError, match="pickle"):
        read_peft_adapter(d)
    good = make_adapter(tmp_path / "noconf", llama_tensors(rng, 1))
    (good / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match="no adapter_config.json"):
        read_peft_adapter(good)
    with pytest.raises(AdapterFileError, match="peft_type is 'LOHA'"):
        read_peft_adapter(make_adapter(tmp_path / "loha", llama_tensors(rng, 1), {"peft_type": "LOHA"}))
    t = llama_tensors(rng, 1)
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    with pytest.raises(AdapterFileError, match="lacks its lora_B"):
        read_peft_adapter(make_adapter(tmp_path / "half", t))
    with pytest.raises(AdapterFileError, match="no LoRA tensors"):
        read_peft_adapter(make_adapter(tmp_path / "empty", {"x.weight": np.ones(2)}))
    with pytest.raises(AdapterFileError, match="not an adapter directory"):
        read_peft_adapter(tmp_path / "nowhere")


# ---- base weights ---------------------------------------------------------------------------

def test_sharded_base_index_and_module_lookup(tmp_path, rng):
    w = {f"model.layers.{i}.self_attn.q_proj.weight": rng.standard_normal((16, 16)) for i in range(3)}
    w["model.embed_tokens.weight"] = rng.standard_normal((50, 16))
    names = sorted(w)
    shard1, shard2 = names[:2], names[2:]
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {k: w[k] for k in shard1}, "BF16")
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {k: w[k] for k in shard2}, "F32")
    index = {"metadata": {"total_size": 0},
             "weight_map": {**{k: "model-00001-of-00002.safetensors" for k in shard1},
                            **{k: "model-00002-of-00002.safetensors" for k in shard2}}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    base = BaseWeights(tmp_path)
    assert sorted(base.keys()) == names
    key = base.find("model.layers.2.self_attn.q_proj")
    assert key == "model.layers.2.self_attn.q_proj.weight"
    assert np.array_equal(base.read(key), w[key].astype(np.float32).astype(np.float64))
    bf = base.read(shard1[0])                  # bf16 shard: within bf16 rounding
    assert np.allclose(bf, w[shard1[0]], rtol=2 ** -8, atol=0)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="missing"):
        BaseWeights(tmp_path)


def test_base_lookup_variants(tmp_path, rng):
    w = {"h.0.attn.c_attn.weight": np.ones((4, 12)),                          # GPT-2: no prefix
         "model.layers.0.self_attn.q_proj.base_layer.weight": np.ones((4, 4)),  # PEFT-wrapped
         "language_model.model.layers.1.mlp.up_proj.weight": np.ones((4, 4)),  # extra prefix
         "model.layers.0.mlp.up_proj.weight": np.ones((4, 4)),
         "model.layers.1.mlp.up_proj.weight": np.ones((4, 4))}
    write_safetensors(tmp_path / "m.safetensors", w)
    base = BaseWeights(tmp_path / "m.safetensors")
    assert base.find("transformer.h.0.attn.c_attn") == "h.0.attn.c_attn.weight"
    assert (base.find("model.layers.0.self_attn.q_proj")
            == "model.layers.0.self_attn.q_proj.base_layer.weight")
    assert base.find("model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(AdapterFileError, match="several"):
        base.find("layers.1.mlp.up_proj")
    with pytest.raises(AdapterFileError, match="no base weight"):
        base.find("model.layers.7.self_attn.q_proj")     # never falls back to another layer
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterFileError, match="pickled"):
        BaseWeights(tmp_path / "pytorch_model.bin")
    with pytest.raises(AdapterFileError, match="no model.safetensors.index.json"):
        BaseWeights(tmp_path)            # a directory without model.safetensors or an index
