"""The analysis reader against adapters saved by the real PEFT (tests/data/peft, made by
tests/data/make_peft_fixtures.py): ΔW, scaling and rank as PEFT computed them, bf16 / fp16 bases,
φ of a pair sharing two directions, DoRA's merge, and the non-LoRA adapters refused."""
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from minilora.analysis import (
    AdapterFileError,
    BaseWeights,
    analyze_adapter,
    dora_weight,
    principal_angles,
    read_peft_adapter,
    subspace_basis,
    write_safetensors,
)

DATA = Path(__file__).parent / "data" / "peft"
pytestmark = pytest.mark.skipif(not (DATA / "llama_lora").is_dir(), reason="no PEFT fixtures")


def reference(name):
    return np.load(DATA / name / "reference.npz", allow_pickle=False)


@pytest.mark.parametrize("name", ["llama_lora", "llama_lora_b", "llama_lora_rs", "gpt_lora_mts"])
def test_delta_scale_and_rank_match_peft(name):
    ad, ref = read_peft_adapter(DATA / name), reference(name)
    modules = {k.split("/", 1)[1] for k in ref.keys() if k.startswith("delta/")}
    assert set(ad.modules) == modules
    for m, mod in ad.modules.items():
        delta = ad.delta_weight(m)                    # (d_out, d_in), y = ΔW x
        peft_delta = ref[f"delta/{m}"]                # shaped as the base weight
        assert np.allclose(delta.T if mod.kind == "embedding" else delta, peft_delta,
                           rtol=1e-6, atol=1e-7), m
        assert mod.scale == pytest.approx(float(ref[f"scale/{m}"]))
        if f"rank/{m}" in ref:
            assert mod.r == int(ref[f"rank/{m}"])


def test_rank_and_alpha_patterns_and_rslora_as_peft_applied_them():
    plain = read_peft_adapter(DATA / "llama_lora").modules
    down = plain["model.layers.1.mlp.down_proj"]
    assert (down.r, down.scale) == (8, 1.0)
    assert plain["model.layers.2.self_attn.o_proj"].scale == 8.0
    assert plain["model.layers.0.self_attn.o_proj"].scale == 2.0
    rs = read_peft_adapter(DATA / "llama_lora_rs").modules
    assert rs["model.layers.1.mlp.down_proj"].scale == pytest.approx(np.sqrt(8))
    assert rs["model.embed_tokens"].kind == "embedding" and rs["model.embed_tokens"].scale == 4.0


def test_gpt_lora_with_modules_to_save_keeps_lm_head_aside():
    ad = read_peft_adapter(DATA / "gpt_lora_mts")
    assert ad.other_keys == ["base_model.model.lm_head.weight"]


@pytest.mark.parametrize("name,kind", [("gpt_adalora", "ADALORA"), ("gpt_ia3", "IA3")])
def test_other_peft_methods_are_refused(name, kind):
    with pytest.raises(AdapterFileError, match=f"peft_type is '{kind}'"):
        read_peft_adapter(DATA / name)


def test_bf16_single_and_fp16_sharded_bases_read_identically():
    single, sharded = BaseWeights(DATA / "base.safetensors"), BaseWeights(DATA / "base_sharded")
    assert sorted(single.keys()) == sorted(sharded.keys())
    fp16 = {**load_file(str(DATA / "base_sharded" / "model-00001-of-00002.safetensors")),
            **load_file(str(DATA / "base_sharded" / "model-00002-of-00002.safetensors"))}
    for k in single.keys():
        assert np.array_equal(single.read(k), sharded.read(k)), k
        assert np.array_equal(sharded.read(k), fp16[k].astype(np.float64)), k


def test_analysis_of_the_fixture_with_base_and_pair():
    ref = reference("llama_lora")
    recs = analyze_adapter(DATA / "llama_lora", other=DATA / "llama_lora_b",
                           base=DATA / "base_sharded", top_k=5)
    base = BaseWeights(DATA / "base.safetensors")
    assert len(recs) == 21
    for rec in recs:
        delta = ref[f"delta/{rec.module}"]
        U, s, Vh = np.linalg.svd(delta)
        assert np.allclose(rec.singular_values, s[:rec.r], rtol=1e-6)
        W = base.read(rec.module + ".weight")
        proj = np.linalg.norm(U[:, :rec.r].T @ W @ Vh[:rec.r].T)
        assert rec.amplification == pytest.approx(np.linalg.norm(delta) / proj, rel=1e-6)
        # the pair shares exactly two lora_A rows: φ(r, r') >= 2 / min(r, r') and two zero angles
        assert rec.phi_full >= 2 / min(rec.r, rec.other_r) - 1e-9
    a, b = read_peft_adapter(DATA / "llama_lora"), read_peft_adapter(DATA / "llama_lora_b")
    m = "model.layers.0.self_attn.q_proj"
    angles = principal_angles(subspace_basis(*a.factors(m), 2.0, "A"),
                              subspace_basis(*b.factors(m), 2.0, "A"))
    assert np.allclose(angles[:2], 0.0, atol=1e-6) and np.all(angles[2:] > 1e-3)


def test_dora_merge_matches_peft(tmp_path):
    ad, ref = read_peft_adapter(DATA / "gpt_dora"), reference("gpt_dora")
    names = {f"model.layers.{i}.self_attn.{p}_proj": f"blocks.{i}.attn.{p}"
             for i in range(2) for p in "qv"}
    assert set(ad.modules) == set(names) and all(m.magnitude_key for m in ad.modules.values())
    for m, ours in names.items():
        W0 = ref[f"base/{ours}.weight"]
        merged = dora_weight(W0, ad.delta_weight(m), ad.magnitude(m))
        assert np.allclose(merged, ref[f"merged/{ours}.weight"], atol=1e-10), m
    write_safetensors(tmp_path / "base.safetensors",
                      {m + ".weight": ref[f"base/{o}.weight"] for m, o in names.items()}, "F64")
    recs = analyze_adapter(DATA / "gpt_dora", base=tmp_path / "base.safetensors", top_k=4)
    assert all(r.dora and r.intruder_k == 4 for r in recs)
