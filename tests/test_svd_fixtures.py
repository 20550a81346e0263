"""`minilora svd` on PEFT-made adapters in every layout (tests/data/svd/, made by
tests/data/make_svd_fixtures.py): every number it prints equals a dense float64 reference built
from PEFT's own ΔW and merged weights; every tensor it leaves out is listed with its reason;
square Conv1D modules are oriented like the others; a tied lm_head finds the embedding; bf16 and
fp16 read exactly; an LFS pointer and a NaN are one line naming file, module and tensor; cached
and uncached, Dask and serial runs give the same records.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from minilora import cli
from minilora.analysis import (
    base_svd,
    intruders_lowrank,
    lowrank_svd,
    natural_sorted,
    type_labels,
    write_safetensors,
)
from minilora.experiments.svd_tables import read_run

DATA = Path(__file__).resolve().parent / "data" / "svd"
GPT2_BASE = DATA / "gpt2_base"


def run(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def csv_rows(out_dir) -> dict:
    with open(Path(out_dir) / "summary.csv", newline="") as f:
        return {row["module"]: row for row in csv.DictReader(f)}


def reference(name: str) -> dict:
    """{module: (ΔW, W0)} in y = ΔW x orientation, from PEFT's own ΔW and merged weight
    (float64): a Conv1D or an embedding stores the transpose. The bf16 / fp16 adapters were
    saved from a model cast whole, so their W0 is the float32 base's (gpt2_conv1d_true's)."""
    if name in ("gpt2_bf16", "gpt2_fp16"):
        base = reference("gpt2_conv1d_true")
        return {m: (d, base[m][1]) for m, (d, _) in _reference(name).items()}
    return _reference(name)


def _reference(name: str) -> dict:
    out = {}
    with np.load(DATA / name / "reference.npz", allow_pickle=False) as z:
        for key in z.files:
            if not key.startswith("delta/"):
                continue
            m = key[len("delta/"):]
            delta, merged = z[key], z[f"merged/{m}"]
            flip = bool(z[f"conv1d/{m}"]) or m.endswith("wte")
            W0 = merged - delta
            out[m] = (delta.T, W0.T) if flip else (delta, W0)
    return out


def dense(delta, W0, k=10, eps=0.5) -> dict:
    """Every number the tool prints for a module, from dense float64 SVDs."""
    U, s, Vh = np.linalg.svd(delta, full_matrices=False)
    r = int(np.sum(s > 1e-10 * s[0]))
    s, U, Vh = s[:r], U[:, :r], Vh[:r]
    e = np.cumsum(s ** 2) / np.sum(s ** 2)
    p = s / s.sum()
    U0, s0, _ = np.linalg.svd(W0, full_matrices=False)
    Ut = np.linalg.svd(W0 + delta, full_matrices=False)[0][:, :min(k, *W0.shape)]
    sims = np.abs(U0.T @ Ut).max(axis=0)
    proj = np.linalg.norm(U.T @ W0 @ Vh.T)
    return {"delta_fro": np.linalg.norm(delta), "delta_spectral": s[0], "energy_top1": e[0],
            "rank_90": int(np.searchsorted(e, 0.9 - 1e-12) + 1),
            "rank_95": int(np.searchsorted(e, 0.95 - 1e-12) + 1),
            "rank_99": int(np.searchsorted(e, 0.99 - 1e-12) + 1),
            "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
            "stable_rank": float(np.sum(s ** 2) / s[0] ** 2),
            "w_fro": np.linalg.norm(W0), "w_spectral": s0[0], "spectral_ratio": s[0] / s0[0],
            "w_proj_delta": proj, "w_proj_top": np.sqrt(np.sum(s0[:r] ** 2)),
            "w_proj_random": r * np.linalg.norm(W0) / np.sqrt(W0.size),
            "amplification": np.linalg.norm(delta) / proj,
            "intruder_count": int(np.sum(sims < eps)), "sims": sims}


FLOATS = ("delta_fro", "delta_spectral", "energy_top1", "effective_rank", "stable_rank", "w_fro",
          "w_spectral", "spectral_ratio", "w_proj_delta", "w_proj_top", "w_proj_random",
          "amplification")
INTS = ("rank_90", "rank_95", "rank_99", "intruder_count")

CASES = {"gpt2_conv1d_true": GPT2_BASE, "gpt2_conv1d_false": GPT2_BASE, "gpt2_tied": GPT2_BASE,
         "gpt2_cls": GPT2_BASE, "gpt2_emb": GPT2_BASE, "gpt2_bf16": GPT2_BASE,
         "gpt2_fp16": GPT2_BASE, "bart_lora": DATA / "bart_base"}


@pytest.mark.parametrize("name", list(CASES))
def test_every_printed_number_equals_the_dense_reference(name, tmp_path, capsys):
    out = tmp_path / name
    rc, stdout, stderr = run(["svd", str(DATA / name), "--base", str(CASES[name]), "--serial",
                              "--no-figures", "--no-cache", "--out", str(out)], capsys)
    assert rc == 0, stderr
    rows = csv_rows(out)
    ref = reference(name)
    assert set(rows) == set(ref), (sorted(rows), sorted(ref))
    assert list(rows) == natural_sorted(rows)                       # layer order
    run_data = read_run(out / "records.json")
    recs = {r.module: r for r in run_data["adapters"][0]["records"]}
    for m, (delta, W0) in ref.items():
        want, row = dense(delta, W0), rows[m]
        for f in FLOATS:
            np.testing.assert_allclose(float(row[f]), want[f], rtol=1e-9, err_msg=f"{m} {f}")
        for f in INTS:
            assert int(row[f]) == want[f], (m, f)
        assert float(row["utilisation"]) == pytest.approx(want["stable_rank"] / int(row["r"]))
        np.testing.assert_allclose(recs[m].intruder_similarities, want["sims"], atol=1e-9)
        assert row["intruder_count_min"] == row["intruder_count_max"] == row["intruder_count"]
        assert f"{want['intruder_count']}/10" in stdout


def test_square_conv1d_follows_the_other_modules_and_a_wrong_flag_is_named(tmp_path, capsys):
    rc, out_true, _ = run(["svd", str(DATA / "gpt2_conv1d_true"), "--base", str(GPT2_BASE),
                           "--serial", "--no-figures", "--no-cache", "--out",
                           str(tmp_path / "t")], capsys)
    rc2, out_false, _ = run(["svd", str(DATA / "gpt2_conv1d_false"), "--base", str(GPT2_BASE),
                             "--serial", "--no-figures", "--no-cache", "--out",
                             str(tmp_path / "f")], capsys)
    assert rc == rc2 == 0
    assert "warning" not in out_true
    warn = [line for line in out_false.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "fan_in_fan_out=false" in warn[0] and "attn.c_proj" in warn[0]
    a, b = csv_rows(tmp_path / "t"), csv_rows(tmp_path / "f")
    for m in a:                          # the same tensors: the same numbers, flag or not
        for f in FLOATS + INTS:
            assert a[m][f] == b[m][f], (m, f)
    sq = b["transformer.h.0.attn.c_proj"]
    assert (sq["base_orientation"], sq["orientation_source"]) == ("transposed", "adapter")
    assert b["transformer.h.0.mlp.c_fc"]["orientation_source"] == "shape"


def test_tied_lm_head_uses_the_embedding(tmp_path, capsys):
    rc, stdout, stderr = run(["svd", str(DATA / "gpt2_tied"), "--base", str(GPT2_BASE),
                              "--serial", "--no-figures", "--no-cache", "--out",
                              str(tmp_path / "o")], capsys)
    assert rc == 0, stderr
    row = csv_rows(tmp_path / "o")["lm_head"]
    assert row["base_key"] == "transformer.wte.weight" and "tied" in row["base_note"]
    assert "lm_head.base_layer.weight" in stdout          # PEFT's copy: not analysed, said why


def test_everything_left_out_is_listed_with_its_reason(tmp_path, capsys):
    rc, stdout, _ = run(["svd", str(DATA / "gpt2_cls"), "--serial", "--no-figures",
                         "--out", str(tmp_path / "o")], capsys)
    assert rc == 0
    data = json.loads((tmp_path / "o" / "records.json").read_text())
    skipped = {t["tensor"]: t["reason"] for t in data["adapters"][0]["not_analysed"]}
    keys = json.loads((DATA / "gpt2_cls" / "adapter_model.safetensors").read_bytes()[
        8:8 + int.from_bytes((DATA / "gpt2_cls" / "adapter_model.safetensors").read_bytes()[:8],
                             "little")])
    keys.pop("__metadata__", None)
    analysed = {r["module"] for r in data["adapters"][0]["records"]}
    for key in keys:                                  # every tensor: analysed or listed
        module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        assert key in skipped or module in analysed, key
    assert "modules_to_save" in skipped["base_model.model.score.weight"]
    assert "lora_bias" in skipped["base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"]
    assert "wrapper" in skipped["base_model.model.score.original_module.lora_A.weight"]
    assert not any(m.startswith("score") for m in analysed)
    assert "not analysed in gpt2_cls (9)" in stdout
    with open(tmp_path / "o" / "not_analysed.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 9
    rc, stdout, _ = run(["svd", str(DATA / "gpt2_emb"), "--serial", "--no-figures",
                         "--out", str(tmp_path / "e")], capsys)
    data = json.loads((tmp_path / "e" / "records.json").read_text())["adapters"][0]
    reasons = {t["tensor"]: t["reason"] for t in data["not_analysed"]}
    assert "full copy" in reasons["base_model.model.transformer.wte.base_layer.weight"]
    assert "full copy" in reasons["base_model.model.lm_head.weight"]
    assert {r["kind"] for r in data["records"]} == {"linear", "embedding"}


def test_encoder_decoder_types_stay_apart(tmp_path, capsys):
    rc, _, stderr = run(["svd", str(DATA / "bart_lora"), "--serial", "--out",
                         str(tmp_path / "o")], capsys)
    assert rc == 0, stderr
    recs = read_run(tmp_path / "o" / "records.json")["adapters"][0]["records"]
    types = {r.module_type for r in recs}
    assert len(types) == 8                    # q, v in 3 attentions + fc1 in 2 stacks
    labels = type_labels(types)
    assert len(set(labels.values())) == len(types)
    assert {"encoder q_proj", "decoder self_attn.q_proj", "decoder encoder_attn.q_proj"} \
        <= set(labels.values())
    assert (tmp_path / "o" / "svd_spectrum.png").stat().st_size > 0


def test_lfs_pointer_and_nan_are_named(tmp_path, capsys):
    rc, stdout, stderr = run(["svd", str(DATA / "gpt2_lfs"), "--out", str(tmp_path / "l")],
                             capsys)
    assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert "Git LFS pointer" in stderr and "git lfs pull" in stderr
    assert "adapter_model.safetensors" in stderr
    rc, stdout, stderr = run(["svd", str(DATA / "gpt2_nan"), "--out", str(tmp_path / "n")],
                             capsys)
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and not (tmp_path / "n").exists()
    for part in ("gpt2_nan", "transformer.h.1.mlp.c_fc",
                 "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight", "1 NaN",
                 "--keep-going"):
        assert part in stderr, part
    rc, stdout, stderr = run(["svd", str(DATA / "gpt2_nan"), "--keep-going", "--serial",
                              "--no-figures", "--out", str(tmp_path / "k")], capsys)
    assert rc == 0 and "could not be analysed" in stderr
    rows = csv_rows(tmp_path / "k")
    assert "transformer.h.1.mlp.c_fc" not in rows and len(rows) == 7
    left = json.loads((tmp_path / "k" / "records.json").read_text())["adapters"][0]
    assert any(t["module"] == "transformer.h.1.mlp.c_fc" and "NaN" in t["reason"]
               for t in left["not_analysed"])


def test_records_last(tmp_path, capsys):
    """records.json: schema and minilora versions, the adapter's config and the base named, NaN
    stored as null (an untrained module: ΔW = 0, its energy undefined)."""
    ad = tmp_path / "ad"
    ad.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(12):                      # 12 layers: file order would run 0, 1, 10, 11, 2
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{p}.lora_A.weight"] = rng.standard_normal((2, 8))
        tensors[f"{p}.lora_B.weight"] = rng.standard_normal((8, 2)) if i != 3 else np.zeros((8, 2))
    write_safetensors(ad / "adapter_model.safetensors", tensors, "F32")
    (ad / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "toy/base",
         "target_modules": ["q_proj"]}))
    rc, _, stderr = run(["svd", str(ad), "--serial", "--no-figures", "--out",
                         str(tmp_path / "o")], capsys)
    assert rc == 0, stderr
    data = json.loads((tmp_path / "o" / "records.json").read_text())   # strict JSON: no NaN
    assert data["schema_version"] == 2 and data["minilora_version"]
    a = data["adapters"][0]
    assert a["config"]["base_model_name_or_path"] == "toy/base" and a["config"]["r"] == 2
    layers = [r["layer"] for r in a["records"]]
    assert layers == list(range(12))
    assert a["records"][3]["energy_top1"] is None and a["records"][3]["delta_fro"] == 0.0
    assert list(csv_rows(tmp_path / "o")) == [f"model.layers.{i}.self_attn.q_proj"
                                              for i in range(12)]


def test_cached_uncached_and_dask_runs_are_identical(tmp_path, capsys):
    argv = ["svd", str(DATA / "gpt2_conv1d_true"), str(DATA / "gpt2_tied"), "--base",
            str(GPT2_BASE), "--no-figures"]
    cache = tmp_path / "cache"
    outs = {}
    for name, extra in (("nocache", ["--no-cache", "--serial"]),
                        ("cold", ["--cache-dir", str(cache), "--serial"]),
                        ("warm", ["--cache-dir", str(cache), "--serial"]),
                        ("dask", ["--cache-dir", str(cache), "--workers", "2"])):
        rc, stdout, stderr = run(argv + extra + ["--out", str(tmp_path / name)], capsys)
        assert rc == 0, stderr
        outs[name] = json.loads((tmp_path / name / "records.json").read_text())
        if name == "warm":
            assert " 0 computed" in stdout
        if name == "dask":
            assert "dask (2 local workers)" in stdout
    for name in ("cold", "warm", "dask"):
        assert outs[name]["adapters"] == outs["nocache"]["adapters"], name
        assert outs[name]["pairs"] == outs["nocache"]["pairs"], name
    rc, stdout, _ = run(["svd", "--cache-report", "--cache-dir", str(cache)], capsys)
    assert rc == 0 and "entries" in stdout
    rc, stdout, _ = run(["svd", "--clear-cache", "--cache-dir", str(cache)], capsys)
    assert rc == 0 and "cleared" in stdout and not cache.exists()


def test_without_matplotlib_the_tables_are_written(tmp_path, capsys, monkeypatch):
    from minilora.cli import svd as svd_cli
    monkeypatch.setattr(svd_cli, "_have_matplotlib", lambda: False)
    rc, stdout, stderr = run(["svd", str(DATA / "gpt2_conv1d_true"), "--serial", "--out",
                              str(tmp_path / "o")], capsys)
    assert rc == 0 and "figures skipped: matplotlib is not installed" in stderr
    assert (tmp_path / "o" / "summary.csv").exists() and not list((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (256, 256)])
def test_certified_lanczos_equals_the_dense_count(shape):
    """The low-rank path with Lanczos (forced: dense_max=0) equals two full SVDs, for W taller
    than wide ("right" side), wider ("left") and square; its certificate bounds the error."""
    rng = np.random.default_rng(sum(shape))
    W0 = rng.standard_normal(shape) / np.sqrt(shape[1])
    W0[:, :3] *= 4
    B, A = rng.standard_normal((shape[0], 4)), rng.standard_normal((4, shape[1]))
    for scale in (0.05, 0.5, 3.0):
        dW = scale * B @ A / np.sqrt(shape[1])
        got = intruders_lowrank(W0, base_svd(W0), lowrank_svd(B / np.sqrt(shape[1]), A, scale),
                                10, 0.5, dense_max=0)
        U0 = np.linalg.svd(W0, full_matrices=False)[0]
        Ut = np.linalg.svd(W0 + dW, full_matrices=False)[0][:, :10]
        sims = np.abs(U0.T @ Ut).max(axis=0)
        assert got.found.count == int(np.sum(sims < 0.5))
        np.testing.assert_allclose(got.found.similarities, sims, atol=1e-10)
        if got.method.startswith("lanczos"):
            assert got.max_error < np.min(np.abs(sims - 0.5))


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_the_base_decomposition_is_the_svd_to_rounding(shape):
    """:func:`base_svd` (the Gram matrix's eigenpairs): Q orthonormal, σ equal to the SVD's,
    and Q the singular vectors of its side: Qᵀ G Q = diag(σ²) to n·eps·σ_1²."""
    rng = np.random.default_rng(1)
    W = rng.standard_normal(shape) / np.sqrt(shape[1])
    dec = base_svd(W)
    n = min(shape)
    assert dec.side == ("left" if shape[0] <= shape[1] else "right") and dec.Q.shape == (n, n)
    s_ref = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(dec.s, s_ref, rtol=1e-12)
    np.testing.assert_allclose(dec.Q.T @ dec.Q, np.eye(n), atol=1e-13)
    G = W @ W.T if dec.side == "left" else W.T @ W
    off = dec.Q.T @ G @ dec.Q - np.diag(dec.s ** 2)
    assert np.abs(off).max() <= 10 * n * np.finfo(float).eps * s_ref[0] ** 2


def test_a_nearly_singular_tall_base_falls_back_to_full_svds():
    """On the "right" side a σ_0i below ~sqrt(n eps) σ_01 is not resolved by the Gram matrix:
    the count then comes from two full SVDs, and equals them."""
    rng = np.random.default_rng(5)
    d_out, d_in = 240, 160
    U, _ = np.linalg.qr(rng.standard_normal((d_out, d_in)))
    V, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
    W0 = (U * np.logspace(0, -10, d_in)) @ V.T                 # σ from 1 down to 1e-10
    B, A = rng.standard_normal((d_out, 4)), rng.standard_normal((4, d_in))
    got = intruders_lowrank(W0, base_svd(W0), lowrank_svd(B, A, 0.3), 10, 0.5, dense_max=0)
    U0 = np.linalg.svd(W0, full_matrices=False)[0]
    Ut = np.linalg.svd(W0 + 0.3 * B @ A, full_matrices=False)[0][:, :10]
    sims = np.abs(U0.T @ Ut).max(axis=0)
    assert got.method == "dense (full SVDs)"
    assert got.found.count == int(np.sum(sims < 0.5))


# ---------------------------------------------------------------------------------------------
# truncation
# ---------------------------------------------------------------------------------------------
def _best_rank_k(D, k):
    U, s, Vh = np.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vh[:k], float(np.sum(s[:k] ** 2) / np.sum(s ** 2))


def test_truncate_peft_keeps_the_best_rank_k_and_says_the_energy(tmp_path, capsys):
    from minilora.analysis import read_peft_adapter
    out = tmp_path / "tr"
    rc, stdout, stderr = run(["adapter", "truncate", str(DATA / "gpt2_conv1d_true"),
                              "--energy", "0.9", "--out", str(out)], capsys)
    assert rc == 0, stderr
    ref = reference("gpt2_conv1d_true")
    new = read_peft_adapter(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"]
    for m, (delta, _) in ref.items():
        k = new.modules[m].r
        want, kept = _best_rank_k(delta, k)
        assert kept >= 0.9 and (k == 1 or _best_rank_k(delta, k - 1)[1] < 0.9)
        np.testing.assert_allclose(new.delta_weight(m), want, atol=1e-6 * np.abs(delta).max())
        line = next(x for x in stdout.splitlines() if x.startswith(m + " "))
        assert f"{kept:.4f}" in line
    assert "energy kept" in stdout and f"written to {out}" in stdout


@pytest.mark.slow      # imports torch, transformers and peft (about 10 s)
def test_truncated_peft_directory_loads_in_real_peft(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel
    out = tmp_path / "tr"
    rc, _, stderr = run(["adapter", "truncate", str(DATA / "gpt2_conv1d_true"), "--suggested",
                         "rank_90", "--out", str(out)], capsys)
    assert rc == 0, stderr
    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.load_state_dict(load_file(str(GPT2_BASE / "model.safetensors")), strict=False)
    pm = PeftModel.from_pretrained(model, str(out)).to(torch.float64)
    ref = np.load(DATA / "gpt2_conv1d_true" / "reference.npz", allow_pickle=False)
    seen = 0
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            path = name[len("base_model.model."):]
            got = mod.get_delta_weight("default").detach().numpy()
            want, _ = _best_rank_k(ref[f"delta/{path}"], mod.r["default"])
            np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())
            seen += 1
    assert seen == 8


def test_truncate_a_minilora_adapter_file(tmp_path, capsys):
    from minilora.experiments.svd_report import open_adapter
    src = Path(__file__).resolve().parent.parent / "chapters" / "assets" / "milton-lora" / \
        "adapter.safetensors"
    if not src.exists():
        pytest.skip("the Milton adapter is not here")
    out = tmp_path / "milton-r2.safetensors"
    rc, stdout, stderr = run(["adapter", "truncate", str(src), "--rank", "2", "--out", str(out)],
                             capsys)
    assert rc == 0, stderr
    a, b = open_adapter(src), open_adapter(out)
    for m in a.modules:
        B, A = a.factors(m)
        want, _ = _best_rank_k(a.scale * B @ A, 2)
        Bk, Ak = b.factors(m)
        np.testing.assert_allclose(b.scale * Bk @ Ak, want, atol=1e-5 * np.abs(want).max())
    assert b.config.r == 2


def test_a_running_scheduler_gives_the_same_records(tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    argv = ["svd", str(DATA / "gpt2_conv1d_true"), "--base", str(GPT2_BASE), "--no-figures",
            "--cache-dir", str(tmp_path / "cache")]
    rc, _, stderr = run(argv + ["--serial", "--out", str(tmp_path / "serial")], capsys)
    assert rc == 0, stderr
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        rc, stdout, stderr = run(argv + ["--scheduler", cluster.scheduler_address, "--out",
                                         str(tmp_path / "remote")], capsys)
    assert rc == 0, stderr
    assert f"dask ({cluster.scheduler_address})" in stdout
    a = json.loads((tmp_path / "serial" / "records.json").read_text())
    b = json.loads((tmp_path / "remote" / "records.json").read_text())
    assert a["adapters"] == b["adapters"]


def test_every_csv_column_is_documented_and_gpt2_types_stay_apart(tmp_path, capsys):
    from minilora.experiments.svd_tables import CSV_COLUMNS, csv_columns
    assert sorted(csv_columns()) == sorted(CSV_COLUMNS)
    readme = (Path(__file__).resolve().parent.parent / "results" / "svd" / "README.md")
    text = readme.read_text()
    assert all(f"`{c}`" in text for c in CSV_COLUMNS)
    rc, _, stderr = run(["svd", str(DATA / "gpt2_conv1d_true"), "--serial", "--out",
                         str(tmp_path / "o")], capsys)
    assert rc == 0, stderr
    recs = read_run(tmp_path / "o" / "records.json")["adapters"][0]["records"]
    labels = type_labels({r.module_type for r in recs})
    assert sorted(labels.values()) == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]


def test_the_7b_bench_runs_small(tmp_path, capsys):
    """`python -m minilora.bench.svd_exact_scale` on tiny shapes: both passes, identical records,
    the cache filled once and read back."""
    from minilora.bench import svd_exact_scale
    out = tmp_path / "bench.jsonl"
    assert svd_exact_scale.main(["--layers", "2", "--d", "24", "--ff", "40", "--modules",
                                 "q,gate,down", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["identical"] and res["cold"]["cache_misses"] == 6
    assert res["cached"]["cache_hits"] == 6 and res["cached"]["cache_misses"] == 0
    assert res["cold"]["cache_bytes"] > 0 and "records identical" in capsys.readouterr().out


def test_square_modules_alone_take_the_base_config_or_warn(tmp_path, capsys):
    """An adapter on GPT-2's attn.c_proj alone (square: its shape says nothing) with the wrong
    flag: the base's config.json (model_type gpt2: Conv1D) decides and the flag is named;
    without a config.json the flag decides, with a warning that nothing confirms it."""
    from safetensors.numpy import load_file, save_file
    ad = tmp_path / "cproj"
    ad.mkdir()
    t = load_file(str(DATA / "gpt2_conv1d_false" / "adapter_model.safetensors"))
    save_file({k: v for k, v in t.items() if ".attn.c_proj." in k},
              str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((DATA / "gpt2_conv1d_false" / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["c_proj"]}))
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes((GPT2_BASE / "model.safetensors").read_bytes())
    rc, stdout, stderr = run(["svd", str(ad), "--base", str(base), "--serial", "--no-figures",
                              "--out", str(tmp_path / "noconfig")], capsys)
    assert rc == 0, stderr
    assert "on the word of fan_in_fan_out=false alone" in stdout
    assert csv_rows(tmp_path / "noconfig")["transformer.h.0.attn.c_proj"][
        "orientation_source"] == "flag"
    (base / "config.json").write_text('{"model_type": "gpt2"}')
    rc, stdout, stderr = run(["svd", str(ad), "--base", str(base), "--serial", "--no-figures",
                              "--out", str(tmp_path / "config")], capsys)
    assert rc == 0, stderr
    assert "model_type 'gpt2'" in stdout and "fan_in_fan_out=false" in stdout
    rows = csv_rows(tmp_path / "config")
    ref = reference("gpt2_conv1d_true")
    for m in ("transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"):
        assert (rows[m]["base_orientation"], rows[m]["orientation_source"]) == (
            "transposed", "base config")
        want = dense(*ref[m])
        np.testing.assert_allclose(float(rows[m]["amplification"]), want["amplification"],
                                   rtol=1e-9)
        assert int(rows[m]["intruder_count"]) == want["intruder_count"]
