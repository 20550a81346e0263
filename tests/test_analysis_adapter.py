"""analyze_adapter on PEFT-format directories written here, checked against dense computations."""
import json

import numpy as np
import pytest

from minilora.analysis import (
    AdapterFileError,
    AnalysisError,
    ModuleRecord,
    analyze_adapter,
    analyze_lora_module,
    dora_weight,
    effective_rank,
    intruders_from_weights,
    layer_index,
    read_peft_adapter,
    stable_rank,
    write_safetensors,
)

D, FF, R = 24, 40, 4
PROJ = {"self_attn.q_proj": (D, D), "self_attn.v_proj": (D, D), "mlp.down_proj": (D, FF)}


def make_pair(tmp_path, rng, name="ad", r=R, alpha=8, layers=2, dtype="F64", extra=None):
    """An adapter directory and the dense ΔW of each module (y = ΔW x orientation)."""
    tensors, dense = {}, {}
    for i in range(layers):
        for proj, (o, n) in PROJ.items():
            p = f"model.layers.{i}.{proj}"
            A, B = rng.standard_normal((r, n)), rng.standard_normal((o, r))
            tensors[f"base_model.model.{p}.lora_A.weight"] = A
            tensors[f"base_model.model.{p}.lora_B.weight"] = B
            dense[p] = (alpha / r) * B @ A
    tensors.update(extra or {})
    path = tmp_path / name
    path.mkdir()
    write_safetensors(path / "adapter_model.safetensors", tensors, dtype)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
         "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    return path, dense


def make_base(tmp_path, rng, layers=2):
    w = {}
    for i in range(layers):
        for proj, (o, n) in PROJ.items():
            w[f"model.layers.{i}.{proj}.weight"] = rng.standard_normal((o, n)) / np.sqrt(n)
    write_safetensors(tmp_path / "base.safetensors", w, "F64")
    return tmp_path / "base.safetensors", w


def test_adapter_only_records_match_the_dense_spectrum(tmp_path, rng):
    path, dense = make_pair(tmp_path, rng)
    calls = []
    recs = analyze_adapter(path, progress=lambda done, total, m: calls.append((done, total, m)))
    assert [c[:2] for c in calls] == [(i + 1, 6) for i in range(6)]
    assert {r.module for r in recs} == set(dense)
    for rec in recs:
        s = np.linalg.svd(dense[rec.module], compute_uv=False)[:R]
        assert np.allclose(rec.singular_values, s, rtol=1e-10)
        assert rec.delta_fro == pytest.approx(np.linalg.norm(dense[rec.module]))
        assert rec.delta_spectral == pytest.approx(np.linalg.norm(dense[rec.module], 2))
        assert rec.energy_top1 == pytest.approx(s[0] ** 2 / np.sum(s ** 2))
        assert rec.effective_rank == pytest.approx(effective_rank(s))
        assert rec.stable_rank == pytest.approx(stable_rank(s))
        assert (rec.r, rec.scale, rec.lora_alpha, rec.kind, rec.dora) == (R, 2.0, 8.0, "linear", False)
        assert rec.layer == int(rec.module.split(".")[2])
        assert rec.phi_grid is None and rec.amplification is None
        row = rec.row()
        assert "singular_values" not in row and not any(isinstance(v, np.ndarray) for v in row.values())


def test_modules_regex_and_checks_before_work(tmp_path, rng):
    path, _ = make_pair(tmp_path, rng)
    recs = analyze_adapter(path, modules=r"layers\.1\..*(q|v)_proj")
    assert sorted(r.module for r in recs) == ["model.layers.1.self_attn.q_proj",
                                              "model.layers.1.self_attn.v_proj"]
    calls = []
    for kwargs, err, msg in [({"modules": "("}, AnalysisError, "not a regular expression"),
                             ({"modules": "k_proj"}, AnalysisError, "no module"),
                             ({"subspace": "C"}, AnalysisError, "subspace"),
                             ({"eps": 1.5}, AnalysisError, "eps"),
                             ({"base": tmp_path / "nothing.safetensors"}, AdapterFileError, "no such")]:
        with pytest.raises(err, match=msg):
            analyze_adapter(path, progress=lambda *a: calls.append(a), **kwargs)
    assert calls == []


def test_phi_against_another_adapter(tmp_path, rng):
    path, _ = make_pair(tmp_path, rng, "a")
    path2, _ = make_pair(tmp_path, rng, "b", r=8, alpha=16)
    ad, ad2 = read_peft_adapter(path), read_peft_adapter(path2)
    recs = {r.module: r for r in analyze_adapter(path, other=path2)}
    m = "model.layers.0.mlp.down_proj"
    rec = recs[m]
    # the paper's bases: right singular vectors of A (in R^d_in), ordered by A's singular values
    U1 = np.linalg.svd(ad.factors(m)[1])[2][:R].T
    U2 = np.linalg.svd(ad2.factors(m)[1])[2][:8].T
    expect = np.array([[np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j)
                        for j in range(1, 9)] for i in range(1, R + 1)])
    assert rec.phi_grid.shape == (R, 8) and np.allclose(rec.phi_grid, expect)
    assert (rec.other_r, rec.phi_dim, rec.phi_subspace) == (8, FF, "A")
    assert rec.phi_baseline_full == pytest.approx(8 / FF)
    assert rec.phi_baseline_top1 == pytest.approx(1 / FF)
    # an adapter against itself: complete overlap at every (i, j)
    same = analyze_adapter(path, other=path, subspace="delta_out")
    assert all(np.allclose(r.phi_grid, 1.0) for r in same)
    assert all(r.phi_dim == D for r in same)


def test_base_amplification_and_intruders_match_dense(tmp_path, rng):
    path, dense = make_pair(tmp_path, rng)
    base_path, w = make_base(tmp_path, rng)
    recs = analyze_adapter(path, base=base_path, top_k=5, eps=0.3)
    for rec in recs:
        W = w[rec.base_key]
        assert rec.base_key == rec.module + ".weight"
        U, s, Vh = np.linalg.svd(dense[rec.module])
        proj = np.linalg.norm(U[:, :R].T @ W @ Vh[:R].T)
        assert rec.w_proj_delta == pytest.approx(proj)
        assert rec.amplification == pytest.approx(np.linalg.norm(dense[rec.module]) / proj)
        sw = np.linalg.svd(W, compute_uv=False)
        assert rec.w_proj_top == pytest.approx(np.sqrt(np.sum(sw[:R] ** 2)))
        assert rec.w_fro == pytest.approx(np.linalg.norm(W))
        assert rec.w_proj_random == pytest.approx(R * np.linalg.norm(W) / np.sqrt(W.size))
        found = intruders_from_weights(W, W + dense[rec.module], k=5, eps=0.3)
        assert rec.intruder_count == found.count
        assert np.allclose(rec.intruder_similarities, found.similarities)
        assert (rec.intruder_k, rec.intruder_eps) == (5, 0.3)
        assert (rec.svd_method, rec.intruder_uncertain) == ("full", 0)


def planted(tmp_path, rng, d=96, strength=12.0):
    """A base whose q_proj is W0 and an adapter whose ΔW = strength · u wᵀ (a planted intruder)."""
    U0, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V0, _ = np.linalg.qr(rng.standard_normal((d, d)))
    W0 = (U0 * (4.0 * 0.93 ** np.arange(d))) @ V0.T       # gaps, so the top vectors are well defined
    u = rng.standard_normal((d, 1)); u /= np.linalg.norm(u)
    v = rng.standard_normal((1, d)); v /= np.linalg.norm(v)
    write_safetensors(tmp_path / "base.safetensors",
                      {"model.layers.0.self_attn.q_proj.weight": W0}, "F64")
    ad = tmp_path / "ad"
    ad.mkdir()
    write_safetensors(ad / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": v,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": strength * u}, "F64")
    (ad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1, "lora_alpha": 1}')
    return ad, tmp_path / "base.safetensors", W0, u


def test_planted_intruder_found_by_full_and_randomized_svd(tmp_path, rng):
    ad, base, W0, u = planted(tmp_path, rng)
    full, = analyze_adapter(ad, base=base, top_k=10, eps=0.5)
    assert full.intruder_count >= 1 and 0 in full.intruder_indices and full.svd_method == "full"
    # exact is the default whatever the size; the randomized path is asked for and gives bounds
    same, = analyze_adapter(ad, base=base, top_k=10, eps=0.5, full_svd_max_dim=32, base_rank=48)
    assert same.intruder_count == full.intruder_count and same.svd_method == "full"
    rand, = analyze_adapter(ad, base=base, top_k=10, eps=0.5, full_svd_max_dim=32, base_rank=48,
                            intruders="approx")
    assert rand.svd_method.startswith("randomized(base_rank=48, k=10")
    assert rand.intruder_method == "randomized (bounds)"
    assert rand.intruder_count_min <= full.intruder_count <= rand.intruder_count_max
    assert (rand.intruder_count is None) == (rand.intruder_count_min != rand.intruder_count_max)
    assert 0 in rand.intruder_indices
    # against only the top 48 pre-trained vectors the best |cos| can only be lower (a max over a
    # subset); the full answer lies between it and the tail bound, hence "uncertain" intruders
    assert np.all(rand.intruder_similarities <= full.intruder_similarities + 1e-6)
    assert rand.intruder_count_max >= full.intruder_count
    assert 1 <= rand.intruder_uncertain <= rand.intruder_count_max and rand.intruder_count is None
    # amplification does not depend on the SVD method (it uses ΔW's exact vectors)
    assert rand.amplification == pytest.approx(full.amplification)


def test_gpt2_conv1d_and_embedding_bases_are_transposed(tmp_path, rng):
    V, C = 30, 8
    A_att, B_att = rng.standard_normal((2, C)), rng.standard_normal((3 * C, 2))
    A_emb, B_emb = rng.standard_normal((2, V)), rng.standard_normal((C, 2))
    ad = tmp_path / "gpt2"
    ad.mkdir()
    write_safetensors(ad / "adapter_model.safetensors", {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": A_att,
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": B_att,
        "base_model.model.transformer.wte.lora_embedding_A": A_emb,
        "base_model.model.transformer.wte.lora_embedding_B": B_emb}, "F64")
    (ad / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": true}')
    W_att = rng.standard_normal((C, 3 * C))       # Conv1D stores (in, out)
    W_emb = rng.standard_normal((V, C))           # the embedding table (V, C)
    write_safetensors(tmp_path / "gpt2.safetensors",
                      {"h.0.attn.c_attn.weight": W_att, "wte.weight": W_emb}, "F64")
    recs = {r.module: r for r in analyze_adapter(ad, base=tmp_path / "gpt2.safetensors", top_k=3)}
    att, emb = recs["transformer.h.0.attn.c_attn"], recs["transformer.wte"]
    for rec, W, B, A in [(att, W_att.T, B_att, A_att), (emb, W_emb.T, B_emb, A_emb)]:
        dW = 2.0 * B @ A
        U, s, Vh = np.linalg.svd(dW)
        proj = np.linalg.norm(U[:, :2].T @ W @ Vh[:2].T)
        assert rec.amplification == pytest.approx(np.linalg.norm(dW) / proj)
        assert rec.intruder_count == intruders_from_weights(W, W + dW, k=3).count
    assert (emb.kind, emb.d_out, emb.d_in) == ("embedding", C, V)


def test_base_shape_mismatch_is_refused_before_work(tmp_path, rng):
    path, _ = make_pair(tmp_path, rng, layers=1)
    write_safetensors(tmp_path / "wrong.safetensors", {
        "model.layers.0.self_attn.q_proj.weight": np.ones((D, D)),
        "model.layers.0.self_attn.v_proj.weight": np.ones((D, D)),
        "model.layers.0.mlp.down_proj.weight": np.ones((D, D))})
    with pytest.raises(AdapterFileError, match="does not fit"):
        analyze_adapter(path, base=tmp_path / "wrong.safetensors")


def test_dora_intruders_use_the_merged_dora_weight(tmp_path, rng):
    d = 20
    A, B = rng.standard_normal((2, d)), rng.standard_normal((d, 2))
    m = rng.random(d) + 0.5
    W = rng.standard_normal((d, d))
    dW = 0.5 * B @ A
    W_dora = dora_weight(W, dW, m)
    assert np.allclose(np.linalg.norm(W_dora, axis=1), m)         # each output row has norm m_i
    rec = analyze_lora_module("model.layers.0.self_attn.q_proj", B, A, 0.5, W=W, magnitude=m, top_k=4)
    assert rec.dora and rec.intruder_count == intruders_from_weights(W, W_dora, k=4).count
    assert np.allclose(rec.intruder_similarities, intruders_from_weights(W, W_dora, k=4).similarities)


def test_bf16_adapter_reads_like_its_rounded_values(tmp_path, rng):
    path32, dense = make_pair(tmp_path, np.random.default_rng(5), "f32", dtype="F32")
    path16, _ = make_pair(tmp_path, np.random.default_rng(5), "bf16", dtype="BF16")
    a, b = analyze_adapter(path32), analyze_adapter(path16)
    for x, y in zip(a, b):
        assert np.allclose(x.singular_values, y.singular_values, rtol=2e-2)


def test_layer_index_and_record_type():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("transformer.wte") is None
    assert isinstance(analyze_lora_module("x", np.ones((3, 1)), np.ones((1, 2)), 1.0), ModuleRecord)


def test_other_adapter_of_another_model_is_refused_before_work(tmp_path, rng):
    path, _ = make_pair(tmp_path, rng, "a")
    other = tmp_path / "b"
    other.mkdir()
    write_safetensors(other / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((R, 2 * D)),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((D, R))})
    (other / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(AnalysisError, match="not the same model"):
        analyze_adapter(path, other=other)


def test_a_fresh_adapter_with_b_zero_gives_undefined_not_made_up_numbers(rng):
    W = rng.standard_normal((12, 10))
    rec = analyze_lora_module("model.layers.0.q_proj", np.zeros((12, 3)),
                              rng.standard_normal((3, 10)), 2.0, W=W)
    assert np.all(rec.singular_values == 0) and rec.delta_fro == 0.0
    assert (rec.rank_90, rec.effective_rank, rec.stable_rank) == (0, 0.0, 0.0)
    assert np.isnan(rec.energy_top1) and np.isnan(rec.amplification)
    assert rec.intruder_count == 0                      # W_0 + 0 has no new direction
