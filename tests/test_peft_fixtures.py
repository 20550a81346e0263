"""The real-PEFT fixtures in tests/data/peft/ agree with themselves (NumPy only, no torch, no PEFT).

tests/data/make_peft_fixtures.py made them with Hugging Face PEFT 0.21.2 and documents every
file. This module checks the fixtures, not minilora: each formula below is PEFT's, written out
in NumPy, and is checked in float64 against PEFT's own numbers. Later tests can then rely on
these numbers:

* LoRA ΔW = s·B A (for an embedding, s·(B A)ᵀ). s = lora_alpha / r, or lora_alpha / sqrt(r)
  with use_rslora; r and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a key matches.
* DoRA merge: W' = m / ‖W0 + s·B A‖_row · (W0 + s·B A).
* (IA)³ merge: l scales the output rows (and bias) of k/v and the input columns of down.
* AdaLoRA: ΔW = B (A ⊙ E) · alpha / (ranknum + 1e-5).
* modules_to_save: the merged lm_head is the saved copy.
* A NumPy forward pass of minilora's GPT reproduces PEFT's logits from ``base/`` and ``merged/``.

safetensors.numpy cannot hand out bfloat16, so the base files are decoded from their raw bytes
here (:func:`read_raw_safetensors`), independently of minilora's readers.
"""
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

DATA = Path(__file__).resolve().parent / "data" / "peft"
PREFIX = "base_model.model."
LLAMA = ("llama_lora", "llama_lora_b", "llama_lora_rs")
GPT = ("gpt_dora", "gpt_ia3", "gpt_adalora", "gpt_lora_mts")
LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# float64 all the way: only summation order differs from PEFT's float64 numbers
RTOL, ATOL = 1e-12, 1e-13


def read_raw_safetensors(path) -> dict:
    """{key: float64 array} from a safetensors file: an 8-byte little-endian header length, a JSON
    header {key: {dtype, shape, data_offsets}} and the raw bytes. BF16 is the top 16 bits of a
    float32, so it widens exactly."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    for key, info in header.items():
        start, stop = info["data_offsets"]
        buf = data[start:stop]
        if info["dtype"] == "BF16":
            a = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(buf, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[info["dtype"]])
        out[key] = a.astype(np.float64).reshape(info["shape"])
    return out


def adapter(name):
    """(config dict, {module path: {tensor suffix: float64 array}}) of one fixture directory."""
    config = json.loads((DATA / name / "adapter_config.json").read_text())
    modules = {}
    for key, a in load_file(str(DATA / name / "adapter_model.safetensors")).items():
        assert key.startswith(PREFIX), key
        module, tensor = re.match(r"(.+?)\.((?:lora_|ia3_l|weight).*)$", key[len(PREFIX):]).groups()
        modules.setdefault(module, {})[tensor] = a.astype(np.float64)
    return config, modules


def reference(name):
    with np.load(DATA / name / "reference.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: key K matches a path by ``(.*\\.)?(K)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def minilora_name(module: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``blocks.0.attn.q`` (the exporter's naming)."""
    module = re.sub(r"^model\.layers\.(\d+)\.self_attn\.", r"blocks.\1.attn.", module)
    module = re.sub(r"^model\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.", module)
    return re.sub(r"_proj$", "", module)


# ---------------------------------------------------------------------------------------------
# LLaMA-style base and LoRA adapters
# ---------------------------------------------------------------------------------------------
def test_base_single_file_and_sharded_hold_the_same_llama_weights():
    single = read_raw_safetensors(DATA / "base.safetensors")
    index = json.loads((DATA / "base_sharded" / "model.safetensors.index.json").read_text())
    shards = {}
    for f in sorted(set(index["weight_map"].values())):
        part = read_raw_safetensors(DATA / "base_sharded" / f)
        assert all(index["weight_map"][k] == f for k in part)
        shards.update(part)
    assert set(single) == set(shards) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == 2 * sum(a.size for a in shards.values())  # fp16
    for k in single:
        np.testing.assert_array_equal(single[k], shards[k], err_msg=k)  # bf16 == fp16, exactly
    assert single["model.embed_tokens.weight"].shape == (80, 32)
    assert single["lm_head.weight"].shape == (80, 32)
    assert single["model.layers.2.self_attn.k_proj.weight"].shape == (16, 32)
    assert single["model.layers.0.mlp.down_proj.weight"].shape == (32, 48)
    assert single["model.norm.weight"].shape == (32,)
    assert len(single) == 3 * 9 + 3


@pytest.mark.parametrize("name", LLAMA)
def test_llama_adapter_keys_and_shapes_match_the_base(name):
    config, modules = adapter(name)
    base = read_raw_safetensors(DATA / "base.safetensors")
    want = {f"model.layers.{i}.{part}.{t}" for i in range(3) for t in LLAMA_TARGETS
            for part in (("self_attn",) if t[0] in "qkvo" else ("mlp",))}
    if name == "llama_lora_rs":
        want.add("model.embed_tokens")
    assert set(modules) == want
    assert set(config["target_modules"]) == {m.rsplit(".", 1)[-1] for m in want}
    for module, t in modules.items():
        w = base[module + ".weight"]
        if module.endswith("embed_tokens"):  # (r, V) and (C, r); no ".weight"
            assert set(t) == {"lora_embedding_A", "lora_embedding_B"}
            A, B = t["lora_embedding_A"], t["lora_embedding_B"]
            assert (B.shape[0], A.shape[1]) == w.shape[::-1]
        else:
            assert set(t) == {"lora_A.weight", "lora_B.weight"}
            A, B = t["lora_A.weight"], t["lora_B.weight"]
            assert (B.shape[0], A.shape[1]) == w.shape  # (d_out, r) @ (r, d_in)
        r = pattern_value(config["rank_pattern"], module, config["r"])
        assert A.shape[0] == B.shape[1] == r
    assert modules["model.layers.1.mlp.down_proj"]["lora_A.weight"].shape == (8, 48)


@pytest.mark.parametrize("name", LLAMA)
def test_llama_reference_delta_is_scale_times_B_A(name):
    config, modules = adapter(name)
    ref = reference(name)
    assert set(ref) == {f"{kind}/{m}" for m in modules for kind in ("delta", "scale", "rank")}
    for module, t in modules.items():
        r = pattern_value(config["rank_pattern"], module, config["r"])
        alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        s = alpha / np.sqrt(r) if config["use_rslora"] else alpha / r
        assert ref[f"scale/{module}"] == pytest.approx(s, rel=1e-15)
        assert ref[f"rank/{module}"] == r
        if "lora_A.weight" in t:
            delta = s * t["lora_B.weight"] @ t["lora_A.weight"]
        else:
            delta = (s * t["lora_embedding_B"] @ t["lora_embedding_A"]).T  # (V, C)
        np.testing.assert_allclose(ref[f"delta/{module}"], delta, rtol=RTOL, atol=ATOL,
                                   err_msg=module)
    scales = {m.split(".", 1)[1] if m.startswith("model.") else m: float(ref[f"scale/{m}"])
              for m in modules}
    rs = config["use_rslora"]
    assert scales["layers.1.mlp.down_proj"] == pytest.approx(8 / np.sqrt(8) if rs else 1.0)
    assert scales["layers.2.self_attn.o_proj"] == pytest.approx(16.0 if rs else 8.0)
    assert scales["layers.0.self_attn.q_proj"] == pytest.approx(4.0 if rs else 2.0)


def test_llama_phi_pair_shares_exactly_the_first_two_rows_of_A():
    _, a = adapter("llama_lora")
    _, b = adapter("llama_lora_b")
    assert set(a) == set(b)
    for module in a:
        A1, A2 = a[module]["lora_A.weight"], b[module]["lora_A.weight"]
        np.testing.assert_array_equal(A1[:2], A2[:2])
        assert not np.any(np.isclose(A1[2:], A2[2:]).all(axis=1))
        assert not np.allclose(a[module]["lora_B.weight"], b[module]["lora_B.weight"])
        # the row spaces of the two ΔW share exactly two directions: rank([A1; A2]) = 2r - 2
        assert np.linalg.matrix_rank(np.vstack([A1, A2])) == 2 * A1.shape[0] - 2


# ---------------------------------------------------------------------------------------------
# GPT replica: DoRA, (IA)³, AdaLoRA, LoRA + modules_to_save
# ---------------------------------------------------------------------------------------------
def layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def gpt_logits(w: dict, ids: np.ndarray, n_head: int = 2) -> np.ndarray:
    """minilora's GPT (pre-LayerNorm blocks, causal attention, tanh-GELU MLP, untied lm_head) in
    NumPy: (B, T) token ids -> (B, T, V) logits, weights by minilora parameter name."""
    B, T = ids.shape
    x = w["wte.weight"][ids] + w["wpe.weight"][:T]
    C, hs = x.shape[-1], x.shape[-1] // n_head
    causal = np.triu(np.full((T, T), -np.inf), k=1)
    n_layer = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    def lin(h, name):
        return h @ w[name + ".weight"].T + w[name + ".bias"]

    for i in range(n_layer):
        p = f"blocks.{i}."
        h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        q, k, v = (lin(h, f"{p}attn.{n}").reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
                   for n in "qkv")
        att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + lin(y, p + "attn.o")
        h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        x = x + lin(gelu_tanh(lin(h, p + "mlp.up")), p + "mlp.down")
    return layer_norm(x, w["ln_f.weight"], w["ln_f.bias"]) @ w["lm_head.weight"].T


def split(ref, prefix):
    return {k[len(prefix) + 1:]: v for k, v in ref.items() if k.startswith(prefix + "/")}


def test_gpt_fixtures_share_base_and_input():
    first = reference(GPT[0])
    for name in GPT[1:]:
        ref = reference(name)
        np.testing.assert_array_equal(ref["input_ids"], first["input_ids"])
        assert split(ref, "base").keys() == split(first, "base").keys()
        for k, v in split(ref, "base").items():
            np.testing.assert_array_equal(v, first[f"base/{k}"])
        np.testing.assert_array_equal(ref["logits_base"], first["logits_base"])
    assert first["input_ids"].dtype == np.int64 and first["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("name", GPT)
def test_gpt_numpy_forward_reproduces_peft_logits(name):
    ref = reference(name)
    base, merged, ids = split(ref, "base"), split(ref, "merged"), ref["input_ids"]
    assert set(merged) <= set(base) and merged
    np.testing.assert_allclose(gpt_logits(base, ids), ref["logits_base"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(gpt_logits({**base, **merged}, ids), ref["logits"], rtol=0,
                               atol=1e-10)
    np.testing.assert_allclose(ref["logits_merged"], ref["logits"], rtol=0, atol=1e-10)
    assert np.abs(ref["logits"] - ref["logits_base"]).max() > 0.1  # the adapter matters


def test_gpt_dora_file_and_merge():
    config, modules = adapter("gpt_dora")
    ref = reference("gpt_dora")
    assert config["use_dora"] and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert set(modules) == {f"model.layers.{i}.self_attn.{t}" for i in range(2)
                            for t in ("q_proj", "v_proj")}
    s = config["lora_alpha"] / config["r"]
    for module, t in modules.items():
        assert set(t) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
        ours = minilora_name(module)
        W0, b0 = ref[f"base/{ours}.weight"], ref[f"base/{ours}.bias"]
        m = t["lora_magnitude_vector"]
        assert m.shape == (W0.shape[0],)
        delta = s * t["lora_B.weight"] @ t["lora_A.weight"]
        np.testing.assert_allclose(ref[f"delta/{module}"], delta, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ref[f"magnitude_init/{module}"], np.linalg.norm(W0, axis=1),
                                   rtol=RTOL)
        norm = np.linalg.norm(W0 + delta, axis=1)  # one per output feature
        np.testing.assert_allclose(ref[f"weight_norm/{module}"], norm, rtol=RTOL)
        assert 0 < np.abs(m / norm - 1).max() < 0.5  # perturbed, not trivial
        np.testing.assert_allclose(ref[f"merged/{ours}.weight"],
                                   (m / norm)[:, None] * (W0 + delta), rtol=1e-12, atol=ATOL)
        np.testing.assert_array_equal(ref[f"merged/{ours}.bias"], b0)


def test_gpt_ia3_file_and_merge():
    config, modules = adapter("gpt_ia3")
    ref = reference("gpt_ia3")
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    assert set(modules) == {f"model.layers.{i}.{t}" for i in range(2)
                            for t in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    for module, t in modules.items():
        assert set(t) == {"ia3_l"}
        ours, l = minilora_name(module), t["ia3_l"]
        W0, b0 = ref[f"base/{ours}.weight"], ref[f"base/{ours}.bias"]
        W, b = ref[f"merged/{ours}.weight"], ref[f"merged/{ours}.bias"]
        if module.endswith("down_proj"):  # scales the input: the MLP's inner activation
            assert l.shape == (1, W0.shape[1])
            np.testing.assert_allclose(W, W0 * l, rtol=1e-15)
            np.testing.assert_array_equal(b, b0)
        else:  # scales the output: keys and values
            assert l.shape == (W0.shape[0], 1)
            np.testing.assert_allclose(W, l * W0, rtol=1e-15)
            np.testing.assert_allclose(b, l[:, 0] * b0, rtol=1e-15)
        assert not np.allclose(l, 1.0)


def test_gpt_adalora_file_rank_budget_and_delta():
    config, modules = adapter("gpt_adalora")
    ref = reference("gpt_adalora")
    assert config["peft_type"] == "ADALORA"
    init_r, alpha = config["init_r"], config["lora_alpha"]
    assert len(modules) == 12
    kept_total = 0
    for module, t in modules.items():
        assert set(t) == {"lora_A", "lora_B", "lora_E"}  # ParameterDicts: no ".weight"
        mask = config["rank_pattern"][f"{module}.lora_E"]
        r = sum(mask)
        assert len(mask) == init_r and ref[f"rank_kept/{module}"] == r
        A, B, E = t["lora_A"], t["lora_B"], t["lora_E"]
        ours = minilora_name(module)
        W0 = ref[f"base/{ours}.weight"]
        assert A.shape == (r, W0.shape[1]) and B.shape == (W0.shape[0], r) and E.shape == (r, 1)
        assert ref[f"ranknum/{module}"] == init_r  # not the kept rank
        delta = B @ (A * E) * alpha / (init_r + 1e-5)
        np.testing.assert_allclose(ref[f"delta/{module}"], delta, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ref[f"merged/{ours}.weight"], W0 + delta, rtol=RTOL,
                                   atol=ATOL)
        kept_total += r
    assert kept_total == config["target_r"] * len(modules)  # the final budget, spent exactly
    assert len({int(ref[f"rank_kept/{m}"]) for m in modules}) > 2  # a non-trivial allocation
    assert ref["loss_total"] > ref["loss_ce"] > 0  # + orth_reg_weight · regulariser


def test_gpt_lora_modules_to_save_file_and_merge():
    config, modules = adapter("gpt_lora_mts")
    ref = reference("gpt_lora_mts")
    assert config["modules_to_save"] == ["lm_head"]
    assert set(modules["lm_head"]) == {"weight"}  # base_model.model.lm_head.weight
    assert not any("modules_to_save" in m for m in modules)
    head = modules.pop("lm_head")["weight"]
    np.testing.assert_array_equal(ref["merged/lm_head.weight"], head)
    assert 0 < np.abs(head - ref["base/lm_head.weight"]).max() < 0.5
    s = config["lora_alpha"] / config["r"]
    assert len(modules) == 4
    for module, t in modules.items():
        ours = minilora_name(module)
        delta = s * t["lora_B.weight"] @ t["lora_A.weight"]
        np.testing.assert_allclose(ref[f"delta/{module}"], delta, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(ref[f"merged/{ours}.weight"],
                                   ref[f"base/{ours}.weight"] + delta, rtol=RTOL, atol=ATOL)
