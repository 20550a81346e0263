"""`minilora svd`: runs on real PEFT adapters and on minilora's own files, and its numbers equal a
direct dense NumPy computation; bad inputs are one line, exit 2, nothing written.

The dense reference never goes through minilora's readers or the r × r core: ΔW is PEFT's own
float64 ΔW from the fixture's ``reference.npz`` (or s·B·A from ``safetensors.numpy``), its SVD
is ``np.linalg.svd`` of the full matrix, φ is ‖U_iᵀ U'_j‖_F² / min(i, j) of the right singular
vectors of the two A factors, the base is decoded from its raw bytes (bf16 widens exactly).
"""
import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.stats import beta

from minilora import cli
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.data import CharTokenizer
from minilora.experiments.figures.common import MissingResults
from minilora.experiments.figures.svd import fig_svd_milton
from minilora.experiments.paths import base_model_path
from minilora.experiments.svd_tables import read_records, summary_table
from minilora.io import CheckpointError
from minilora.methods.lora import inject_lora, save_adapter
from minilora.model import GPT

DATA = Path(__file__).resolve().parent / "data" / "peft"
PREFIX = "base_model.model."
# three LLaMA fixture modules: a plain one, one with rank_pattern (r=8), one with alpha_pattern
CHECKED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
           "model.layers.2.self_attn.o_proj")


# ---------------------------------------------------------------------------------------------
# dense references
# ---------------------------------------------------------------------------------------------
def raw_safetensors(path) -> dict:
    """{key: float64 array} decoded from the bytes (BF16 = the top half of a float32)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        buf = raw[8 + n + info["data_offsets"][0]:8 + n + info["data_offsets"][1]]
        if info["dtype"] == "BF16":
            a = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(buf, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[info["dtype"]])
        out[key] = a.astype(np.float64).reshape(info["shape"])
    return out


def peft_delta(name: str, module: str) -> np.ndarray:
    with np.load(DATA / name / "reference.npz", allow_pickle=False) as z:
        return z[f"delta/{module}"]


def peft_A(name: str, module: str) -> np.ndarray:
    return load_file(str(DATA / name / "adapter_model.safetensors"))[
        f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)


def spectrum_stats(delta) -> dict:
    s = np.linalg.svd(delta, compute_uv=False)
    r = int(np.sum(s > 1e-12 * s[0]))
    s = s[:r]
    e = s ** 2 / np.sum(s ** 2)
    p = s / s.sum()
    return {"sv": s, "delta_spectral": s[0], "delta_fro": np.linalg.norm(delta),
            "energy_top1": e[0], "rank_90": int(np.searchsorted(np.cumsum(e), 0.9 - 1e-12) + 1),
            "effective_rank": float(np.exp(-np.sum(p * np.log(p)))),
            "stable_rank": float(np.sum(s ** 2) / s[0] ** 2)}


def phi_dense(A1, A2) -> np.ndarray:
    U1 = np.linalg.svd(A1, full_matrices=False)[2].T      # (d_in, r): right sing. vectors of A
    U2 = np.linalg.svd(A2, full_matrices=False)[2].T
    return np.array([[np.linalg.norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j)
                      for j in range(1, U2.shape[1] + 1)] for i in range(1, U1.shape[1] + 1)])


def base_dense(W, delta, k=10, eps=0.5) -> dict:
    U, s, Vh = np.linalg.svd(delta, full_matrices=False)
    r = int(np.sum(s > 1e-12 * s[0]))
    proj = np.linalg.norm(U[:, :r].T @ W @ Vh[:r].T)
    U0 = np.linalg.svd(W, full_matrices=False)[0]
    Ut = np.linalg.svd(W + delta, full_matrices=False)[0][:, :min(k, *W.shape)]
    cos = np.abs(U0.T @ Ut).max(axis=0)
    return {"w_fro": np.linalg.norm(W), "w_proj_delta": proj,
            "amplification": np.linalg.norm(delta) / proj, "intruder_count": int(np.sum(cos < eps))}


# ---------------------------------------------------------------------------------------------
def run(argv, capsys):
    """(exit code, stdout, stderr) of ``minilora ARGV`` in this process."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:      # argparse refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def csv_rows(out_dir) -> dict:
    with open(Path(out_dir) / "summary.csv", newline="") as f:
        return {row["module"]: row for row in csv.DictReader(f)}


def close(row, field, want, rtol=1e-9):
    assert row[field] != "", field
    np.testing.assert_allclose(float(row[field]), want, rtol=rtol, atol=1e-12, err_msg=field)


# ---------------------------------------------------------------------------------------------
# real PEFT adapters
# ---------------------------------------------------------------------------------------------
def test_single_peft_adapter_table_files_and_dense_spectrum(tmp_path, capsys):
    out = tmp_path / "one"
    rc, stdout, stderr = run(["svd", str(DATA / "llama_lora"), "--out", str(out)], capsys)
    assert rc == 0, stderr
    assert stderr == ""                          # not a terminal: no progress-bar fragments
    table = stdout.split("written:")[0]
    assert "σ1(ΔW)" in table and "eff. rank" in table and "φ" not in table
    assert "amplification" not in table          # no base, no base columns
    for f in ("summary.csv", "summary.md", "records.json", "svd_spectrum.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not (out / "svd_phi.png").exists() and not (out / "svd_intruders.png").exists()
    rows = csv_rows(out)
    assert len(rows) == 21 and all(m in table for m in rows)
    records, meta = read_records(out / "records.json")
    by_name = {r.module: r for r in records}
    assert meta["adapter_kind"] == "peft" and meta["base"] is None
    for m in CHECKED:
        want = spectrum_stats(peft_delta("llama_lora", m))
        for f in ("delta_spectral", "delta_fro", "energy_top1", "effective_rank", "stable_rank"):
            close(rows[m], f, want[f])
        assert int(rows[m]["rank_90"]) == want["rank_90"]
        assert rows[m]["phi_full"] == "" and rows[m]["amplification"] == ""
        np.testing.assert_allclose(by_name[m].singular_values, want["sv"], rtol=1e-9)
    assert rows["model.layers.1.mlp.down_proj"]["r"] == "8"             # rank_pattern
    assert float(rows["model.layers.2.self_attn.o_proj"]["scale"]) == 32 / 4   # alpha_pattern
    md = (out / "summary.md").read_text()
    assert md.startswith("# ΔW analysis of llama_lora") and md.count("\n| model.layers.") == 21


def test_pair_phi_equals_the_dense_subspace_similarity(tmp_path, capsys):
    out = tmp_path / "pair"
    rc, stdout, stderr = run(["svd", str(DATA / "llama_lora"), "--other",
                              str(DATA / "llama_lora_b"), "--modules", "q_proj|v_proj",
                              "--out", str(out)], capsys)
    assert rc == 0, stderr
    assert "null p95" in stdout and "max(r,r')/d" in stdout
    rows = csv_rows(out)
    assert len(rows) == 6 and all(m.endswith(("q_proj", "v_proj")) for m in rows)
    records = {r.module: r for r in read_records(out / "records.json")[0]}
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.v_proj"):
        grid = phi_dense(peft_A("llama_lora", m), peft_A("llama_lora_b", m))
        d = peft_A("llama_lora", m).shape[1]
        close(rows[m], "phi_top1", grid[0, 0])
        close(rows[m], "phi_full", grid[-1, -1])
        close(rows[m], "phi_baseline_top1", 1 / d)
        close(rows[m], "phi_baseline_full", max(grid.shape) / d)
        # the null of φ(1,1) is exact: cos² of a uniform unit vector with a fixed one in R^d is
        # Beta(1/2, (d-1)/2)
        close(rows[m], "phi_null95_top1", beta.ppf(0.95, 0.5, (d - 1) / 2))
        close(rows[m], "phi_null975_top1", beta.ppf(0.975, 0.5, (d - 1) / 2))
        assert float(rows[m]["phi_baseline_full"]) < float(rows[m]["phi_null95_full"]) \
            < float(rows[m]["phi_null975_full"]) <= 1
        np.testing.assert_allclose(records[m].phi_grid, grid, rtol=1e-9, atol=1e-12)
    assert {p.name for p in out.glob("svd_phi*.png")} == {
        "svd_phi.png", "svd_phi_q_proj.png", "svd_phi_v_proj.png"}


@pytest.mark.parametrize("base", ["base.safetensors", "base_sharded"])
def test_base_amplification_and_intruders_equal_dense(base, tmp_path, capsys):
    out = tmp_path / "base"
    rc, stdout, stderr = run(["svd", str(DATA / "llama_lora"), "--base", str(DATA / base),
                              "--no-figures", "--out", str(out)], capsys)
    assert rc == 0, stderr
    assert "amplification" in stdout and "intruders" in stdout
    rows = csv_rows(out)
    weights = raw_safetensors(DATA / "base.safetensors")     # bf16 == the fp16 shards, exactly
    for m in CHECKED:
        want = base_dense(weights[f"{m}.weight"], peft_delta("llama_lora", m))
        for f in ("w_fro", "w_proj_delta", "amplification"):
            close(rows[m], f, want[f], rtol=1e-8)
        assert int(rows[m]["intruder_count"]) == want["intruder_count"]
        assert rows[m]["svd_method"] == "full" and rows[m]["base_key"] == f"{m}.weight"
    assert not list(out.glob("*.png"))


def test_dora_adapter_is_marked_and_explained(tmp_path, capsys):
    rc, stdout, stderr = run(["svd", str(DATA / "gpt_dora"), "--no-figures", "--out",
                              str(tmp_path / "dora")], capsys)
    assert rc == 0, stderr
    assert "DoRA modules" in stdout
    rows = csv_rows(tmp_path / "dora")
    assert rows and all(row["dora"] == "True" for row in rows.values())


# ---------------------------------------------------------------------------------------------
# minilora's own adapter files
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base checkpoint and two LoRA adapters for it (random A and B, on q, v and wte)."""
    d = tmp_path_factory.mktemp("tiny")
    tok = CharTokenizer.default()
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    save_checkpoint(d / "base.safetensors", GPT(config, rng=0), tok)
    narrow = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=8)
    save_checkpoint(d / "narrow.safetensors", GPT(narrow, rng=0), tok)
    for seed in (1, 2):
        model = GPT(config, rng=0)
        cfg = LoraConfig(r=3, lora_alpha=6, target_modules=("q", "v", "wte"),
                         init_lora_weights=False, seed=seed)
        inject_lora(model, cfg)
        save_adapter(d / f"ad{seed}.safetensors", model, cfg)
    model = GPT(config, rng=0)
    cfg = LoraConfig(r=2, target_modules=("q",), init_lora_weights="pissa")
    inject_lora(model, cfg)
    save_adapter(d / "pissa.safetensors", model, cfg)
    return d


def test_minilora_adapter_with_its_base_and_a_second_adapter(tiny, tmp_path, capsys):
    out = tmp_path / "mini"
    rc, stdout, stderr = run(["svd", str(tiny / "ad1.safetensors"), "--other",
                              str(tiny / "ad2.safetensors"), "--base",
                              str(tiny / "base.safetensors"), "--no-figures", "--out", str(out)],
                             capsys)
    assert rc == 0, stderr
    assert "φ(r,r')" in stdout and "intruders" in stdout
    rows = csv_rows(out)
    assert set(rows) == {"wte", *(f"blocks.{i}.attn.{p}" for i in range(2) for p in "qv")}
    a1, a2 = load_file(str(tiny / "ad1.safetensors")), load_file(str(tiny / "ad2.safetensors"))
    base = load_file(str(tiny / "base.safetensors"))
    for m in ("blocks.1.attn.v", "wte"):
        B, A = a1[f"{m}.lora_B"].astype(np.float64), a1[f"{m}.lora_A"].astype(np.float64)
        delta = 2.0 * B @ A                                  # s = 6 / 3; (d_out, d_in)
        W = base[f"model.{m}.weight"].astype(np.float64)
        W = W.T if m == "wte" else W                         # the (V, C) table -> ΔW's (C, V)
        want = spectrum_stats(delta) | base_dense(W, delta)
        for f in ("delta_spectral", "delta_fro", "effective_rank", "amplification", "w_fro"):
            close(rows[m], f, want[f], rtol=1e-6)            # float32 files, float64 maths
        assert int(rows[m]["intruder_count"]) == want["intruder_count"]
        grid = phi_dense(A, a2[f"{m}.lora_A"].astype(np.float64))
        close(rows[m], "phi_full", grid[-1, -1], rtol=1e-6)
    assert rows["wte"]["kind"] == "embedding" and rows["blocks.0.attn.q"]["kind"] == "linear"
    saved = json.loads((out / "records.json").read_text())
    assert saved["adapters"][0]["kind"] == "minilora" and saved["schema_version"] == 2


def test_minilora_adapter_defaults_to_the_shipped_base(tmp_path, capsys):
    try:
        shipped = base_model_path()
    except CheckpointError:
        pytest.skip("the shipped base model is not here")
    model, _, _ = load_checkpoint(shipped)
    cfg = LoraConfig(r=2, target_modules=("v",), init_lora_weights=False, seed=3)
    inject_lora(model, cfg)
    save_adapter(tmp_path / "adapter.safetensors", model, cfg)
    rc, stdout, stderr = run(["svd", str(tmp_path / "adapter.safetensors"), "--no-figures",
                              "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, stderr
    assert "amplification" in stdout
    meta = json.loads((tmp_path / "o" / "records.json").read_text())
    assert meta["base"] == "shipped"
    assert len(meta["adapters"][0]["records"]) == model.config.n_layer
    rc, stdout, _ = run(["svd", str(tmp_path / "adapter.safetensors"), "--no-base",
                         "--no-figures", "--out", str(tmp_path / "o2")], capsys)
    assert rc == 0 and "amplification" not in stdout


# ---------------------------------------------------------------------------------------------
# bad inputs: exit 2, one line naming the flag, nothing written
# ---------------------------------------------------------------------------------------------
def _bin_dir(tmp_path):
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    return str(d)


def _pissa_peft_dir(tmp_path):
    d = tmp_path / "pissa_peft"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(
        (DATA / "llama_lora" / "adapter_model.safetensors").read_bytes())
    config = json.loads((DATA / "llama_lora" / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config,
                                                       "init_lora_weights": "pissa_niter_4"}))
    return str(d)


BAD = {
    "missing path": (lambda t, k: [str(t / "nope")], "PATH"),
    "pickled .bin": (lambda t, k: [_bin_dir(t)], "adapter_model.bin"),
    "bad regex": (lambda t, k: [str(DATA / "llama_lora"), "--modules", "q_proj("], "--modules"),
    "regex keeps nothing": (lambda t, k: [str(DATA / "llama_lora"), "--modules", "zzz"],
                            "--modules"),
    "other lacks modules": (lambda t, k: [str(DATA / "llama_lora_rs"), "--other",
                                          str(DATA / "llama_lora")], "--other"),
    "other of another kind": (lambda t, k: [str(DATA / "llama_lora"), "--other",
                                            str(k / "ad1.safetensors")], "--other"),
    "missing base": (lambda t, k: [str(DATA / "llama_lora"), "--base", str(t / "no")], "--base"),
    "base of another model": (lambda t, k: [str(DATA / "llama_lora"), "--base",
                                            str(k / "base.safetensors")], "--base"),
    "minilora base of another shape": (lambda t, k: [str(k / "ad1.safetensors"), "--base",
                                                     str(k / "narrow.safetensors")], "n_embd"),
    "pissa adapter": (lambda t, k: [str(k / "pissa.safetensors")], "pissa"),
    "unconverted PEFT pissa": (lambda t, k: [_pissa_peft_dir(t)], "pissa_niter_4"),
    "adapter name on a minilora file": (lambda t, k: [str(k / "ad1.safetensors"),
                                                      "--adapter-name", "x"], "PATH"),
    "top-k 0": (lambda t, k: [str(DATA / "llama_lora"), "--top-k", "0"], "--top-k"),
    "eps 0": (lambda t, k: [str(DATA / "llama_lora"), "--eps", "0"], "--eps"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_one_line_and_write_nothing(case, tiny, tmp_path, capsys):
    make, named = BAD[case]
    argv = make(tmp_path, tiny)
    out = tmp_path / "out"
    rc, stdout, stderr = run(["svd", *argv, "--out", str(out)], capsys)
    assert rc == 2, (case, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error: "), stderr
    assert named in lines[0], lines[0]
    assert not out.exists() and stdout == ""


def test_out_that_is_a_file_is_refused_untouched(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    rc, _, stderr = run(["svd", str(DATA / "llama_lora"), "--out", str(target)], capsys)
    assert rc == 2 and "--out" in stderr and len(stderr.strip().splitlines()) == 1
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "taken"]


def test_summary_table_is_aligned(tmp_path, capsys):
    rc, stdout, _ = run(["svd", str(DATA / "llama_lora_rs"), "--no-figures", "--out",
                         str(tmp_path / "rs")], capsys)
    assert rc == 0
    records, _ = read_records(tmp_path / "rs" / "records.json")
    table = summary_table(records).splitlines()
    assert table[0] in stdout
    header, rule, body = table[0], table[1], table[2:2 + len(records)]
    assert set(rule) <= {"-", " "} and len(rule) == len(header)
    assert all(len(line) == len(header) for line in body)      # numbers right-aligned, no gaps
    emb = next(r for r in records if r.module == "model.embed_tokens")
    assert emb.kind == "embedding" and (emb.d_out, emb.d_in) == (32, 80)


RESULTS = Path(__file__).resolve().parent.parent / "results"


def _milton_run_dir() -> Path:
    run_dir = RESULTS / "svd" / "milton-lora"
    if not (run_dir / "records.json").exists():
        pytest.skip("results/svd/milton-lora is not here")
    return run_dir


def test_committed_milton_records_match_their_csv():
    """``results/svd/milton-lora``: records.json reads back into the numbers of summary.csv."""
    run_dir = _milton_run_dir()
    records, meta = read_records(run_dir / "records.json")
    rows = csv_rows(run_dir)
    assert meta["base"] == "shipped" and [r.module for r in records] == list(rows)
    for r in records:
        for f in ("delta_fro", "amplification", "w_proj_delta"):
            assert float(rows[r.module][f]) == getattr(r, f)
        assert int(rows[r.module]["intruder_count"]) == r.intruder_count == len(r.intruder_indices)
        np.testing.assert_allclose(np.sqrt(np.sum(r.singular_values ** 2)), r.delta_fro,
                                   rtol=1e-12)


@pytest.mark.slow
def test_committed_milton_records_redraw(tmp_path):
    """The ``minilora figures`` entry redraws the Milton figures from records.json alone, byte
    for byte the committed ones; without the records it names the command that makes them."""
    run_dir = _milton_run_dir()
    paths = fig_svd_milton(RESULTS, tmp_path)
    names = ("amplification", "intruders", "spectrum")
    assert sorted(p.name for p in paths) == [f"svd_milton_lora_{n}.png" for n in names]
    for n in names:
        assert (tmp_path / f"svd_milton_lora_{n}.png").read_bytes() == \
            (run_dir / f"svd_{n}.png").read_bytes(), n
    with pytest.raises(MissingResults, match="minilora svd"):
        fig_svd_milton(tmp_path / "empty", tmp_path)
