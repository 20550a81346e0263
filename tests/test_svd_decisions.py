"""The decisions `minilora svd` offers, on solid ground: the null of φ (exact for one direction,
simulated otherwise, checked against sampling), the knee, utilisation and rank suggestions
written as a PEFT rank_pattern, the merge triage's verdicts, many adapters and a directory of
them, and an intruder count known only as a range shown as a range."""
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta

from minilora import cli
from minilora.analysis import (
    analyze_adapter,
    knee_rank,
    phi_null_quantiles,
    random_orthonormal,
    write_safetensors,
)
from minilora.analysis.decisions import (
    adapter_summary,
    compare_modules,
    merge_verdict,
    rank_pattern,
    rank_suggestions,
)
from minilora.experiments.svd_tables import summary_table

PEFT = Path(__file__).resolve().parent / "data" / "peft"


def run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("i,j,d", [(1, 1, 64), (1, 8, 160), (4, 8, 64), (8, 8, 160)])
def test_phi_null_percentiles_match_sampling(i, j, d):
    q95, q975 = phi_null_quantiles(i, j, d)
    if min(i, j) == 1:                 # exact: Beta(max/2, (d - max)/2)
        b = max(i, j)
        assert q95 == pytest.approx(beta.ppf(0.95, b / 2, (d - b) / 2), rel=1e-12)
    rng = np.random.default_rng(7)
    vals = [np.sum((random_orthonormal(d, i, rng).T @ random_orthonormal(d, j, rng)) ** 2)
            / min(i, j) for _ in range(4000)]
    assert q95 == pytest.approx(np.quantile(vals, 0.95), rel=0.05)
    assert q975 == pytest.approx(np.quantile(vals, 0.975), rel=0.05)
    assert max(i, j) / d < q95 < q975 <= 1


def test_knee_and_suggestions():
    assert knee_rank([5.0, 4.0, 0.1, 0.05]) == 2
    assert knee_rank([1.0]) == 1 and knee_rank([0.0, 0.0]) == 0
    assert knee_rank([1.0, 1.0, 1.0]) == 1           # a flat spectrum has no knee
    recs = analyze_adapter(PEFT / "llama_lora")
    pat = rank_pattern(recs, "rank_95")
    assert set(pat) == {r.module for r in recs}
    for r in recs:
        s = rank_suggestions(r)
        assert pat[r.module] == s["rank_95"] == r.rank_95
        assert 1 <= s["rank_90"] <= s["rank_95"] <= s["rank_99"] <= r.r
        assert r.utilisation == pytest.approx(r.stable_rank / r.r)
    summ = adapter_summary(recs)
    assert sum(x["share"] for x in summ["layer_energy_share"]) == pytest.approx(1.0)
    assert summ["utilisation"]["min"] <= summ["utilisation"]["median"] <= summ["utilisation"]["max"]
    assert len(summ["wasteful"]) == 3


def test_merge_verdicts_need_more_than_one_cosine(rng=np.random.default_rng(0)):
    assert merge_verdict(20.0, True, True, 0.9) == "one dominates"
    assert merge_verdict(1.0, False, False, 0.9) == "independent"  # a cosine alone decides nothing
    assert merge_verdict(1.0, True, True, 0.5) == "shared, aligned"
    assert merge_verdict(1.0, True, True, -0.5) == "shared, opposed"
    assert merge_verdict(1.0, True, True, 0.0) == "shared, mixed"
    assert merge_verdict(1.0, True, False, 0.0) == "partly shared (input)"
    d, r = 64, 4
    B, A = rng.standard_normal((d, r)), rng.standard_normal((r, d))
    same = compare_modules("m", 0, 1, (B, A, 1.0), (B, A, 1.0))
    assert same.verdict == "shared, aligned" and same.cosine == pytest.approx(1.0)
    assert same.overlap_in == pytest.approx(1.0) and same.overlap_out == pytest.approx(1.0)
    opp = compare_modules("m", 0, 1, (B, A, 1.0), (-B, A, 1.0))
    assert opp.verdict == "shared, opposed" and opp.cosine == pytest.approx(-1.0)
    B2, A2 = rng.standard_normal((d, r)), rng.standard_normal((r, d))
    ind = compare_modules("m", 0, 1, (B, A, 1.0), (B2, A2, 1.0))
    assert ind.overlap_in < ind.overlap_in_null95 or ind.overlap_out < ind.overlap_out_null95
    want = np.sum((B @ A) * (B2 @ A2)) / (np.linalg.norm(B @ A) * np.linalg.norm(B2 @ A2))
    assert ind.cosine == pytest.approx(want)


def test_many_adapters_and_a_directory_of_them(tmp_path, capsys):
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ("llama_lora", "llama_lora_b"):
        (folder / name).symlink_to(PEFT / name)
    out = tmp_path / "o"
    rc, stdout, stderr = run(["svd", str(folder), "--modules", "q_proj|v_proj", "--serial",
                              "--out", str(out)], capsys)
    assert rc == 0, stderr
    data = json.loads((out / "records.json").read_text())
    assert [a["label"] for a in data["adapters"]] == ["llama_lora", "llama_lora_b"]
    assert len(data["pairs"]) == 6 and "verdicts" in stdout and "pairs.csv" in stdout
    md = (out / "summary.md").read_text()
    assert "## Side by side" in md and "## Pairs" in md and "## llama_lora_b" in md
    # llama_lora_b copies the first two rows of each lora_A: their input spaces share 2 directions
    assert all(p["verdict"] != "independent" for p in data["pairs"])
    assert all(p["overlap_in"] > p["overlap_in_null95"] for p in data["pairs"])
    assert (out / "pairs.csv").exists() and (out / "svd_pairs.png").exists()
    assert {p.name for p in out.glob("svd_layers_*.png")} == {"svd_layers_q_proj.png",
                                                             "svd_layers_v_proj.png"}
    patterns = json.loads((out / "rank_pattern.json").read_text())
    assert set(patterns) == {"llama_lora", "llama_lora_b"} and "rank_95" in patterns["llama_lora"]
    rc, _, stderr = run(["svd", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "no adapter directory" in stderr


def test_an_uncertain_count_is_a_range_never_a_number(tmp_path):
    rng = np.random.default_rng(3)
    d = 96
    U0, _ = np.linalg.qr(rng.standard_normal((d, d)))
    V0, _ = np.linalg.qr(rng.standard_normal((d, d)))
    W0 = (U0 * (4.0 * 0.93 ** np.arange(d))) @ V0.T
    u, v = rng.standard_normal((d, 1)), rng.standard_normal((1, d))
    u /= np.linalg.norm(u)
    v /= np.linalg.norm(v)
    write_safetensors(tmp_path / "base.safetensors",
                      {"model.layers.0.self_attn.q_proj.weight": W0}, "F64")
    ad = tmp_path / "ad"
    ad.mkdir()
    write_safetensors(ad / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": v,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": 12.0 * u}, "F64")
    (ad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1, "lora_alpha": 1}')
    rec, = analyze_adapter(ad, base=tmp_path / "base.safetensors", intruders="approx",
                           full_svd_max_dim=32, base_rank=40)
    assert rec.intruder_count is None and rec.intruder_count_min < rec.intruder_count_max
    table = summary_table([rec])
    assert f"{rec.intruder_count_min}-{rec.intruder_count_max}/10" in table
    assert "only bounds are known" in table
    exact, = analyze_adapter(ad, base=tmp_path / "base.safetensors")
    assert rec.intruder_count_min <= exact.intruder_count <= rec.intruder_count_max
    assert f"{exact.intruder_count}/10" in summary_table([exact])


def test_the_null_beyond_simulation_is_a_moment_matched_beta():
    """Above min(i, j) = 16 the null's percentiles come from a Beta with φ's exact mean and
    variance; at a = 4 and 8 (where both are computed) the two agree to 0.5 %."""
    from minilora.analysis import subspace
    for a, b, d in ((4, 8, 64), (8, 8, 160), (8, 16, 4096)):
        sim = phi_null_quantiles(a, b, d)
        old = subspace.NULL_SIMULATE_MAX
        try:
            subspace.NULL_SIMULATE_MAX = 1
            phi_null_quantiles.cache_clear()
            fit = phi_null_quantiles(a, b, d)
        finally:
            subspace.NULL_SIMULATE_MAX = old
            phi_null_quantiles.cache_clear()
        np.testing.assert_allclose(fit, sim, rtol=5e-3)
    q95, q975 = phi_null_quantiles(32, 64, 4096)
    assert 64 / 4096 < q95 < q975 < 0.02
