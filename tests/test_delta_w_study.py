"""The ΔW studies on a tiny sweep (a 2-layer, width-32 GPT made here): each study's numbers
against an independent computation, and every figure built from the records alone."""
import json

import numpy as np
import pytest

from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.config import GPTConfig
from minilora.data import CharTokenizer
from minilora.experiments.ablate import run_sweep
from minilora.experiments.ablate_records import grid, load_records
from minilora.experiments.studies.delta_w import STUDIES, run_delta_w_study
from minilora.experiments.studies.delta_w_common import (
    Evaluator,
    StudyError,
    adapter_factors,
    find_cells,
)
from minilora.experiments.studies.delta_w_fullft import budget_table
from minilora.model import GPT

TINY = dict(batch_size=2, block_size=32, eval_batches=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("dw")
    base = root / "tiny.safetensors"
    save_checkpoint(base, GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32), rng=0),
                    CharTokenizer.default())
    cells = grid(["milton"], [2, 8], [("q", "v"), "all-linear"], [0, 1], 8, full=True,
                 base=str(base), **TINY)
    cells += grid(["milton"], [], [], [0], 8, pairs=[(("q",), 4), (("v",), 4), (("q", "v"), 2)],
                  base=str(base), **TINY)
    results, runs = root / "results", root / "runs"
    run_sweep(cells, results / "ablate", runs, serial=True, progress=False, log=lambda *_: None)
    run_delta_w_study(results / "ablate", results / "delta_w", runs, phi_ranks=(2, 8),
                      budget=(("q",), 4), log=lambda *_: None)
    load = {n: json.loads((results / "delta_w" / f"{n}.json").read_text()) for n in
            ("pretrained_spectra", "phi", "amplification", "full_vs_lora", "intruders", "budget")}
    return {"root": root, "base": base, "results": results, "runs": runs, **load,
            "records": load_records(results / "ablate")}


def test_spectra_are_the_singular_values_of_the_base(study):
    params = dict(load_checkpoint(study["base"])[0].named_parameters())
    mats = study["pretrained_spectra"]["matrices"]
    assert len(mats) == 2 * 6
    for m in mats:
        s = np.linalg.svd(np.asarray(params[m["module"] + ".weight"], np.float64),
                          compute_uv=False)
        np.testing.assert_allclose(m["singular_values"], s, rtol=1e-4)
        assert 1 <= m["effective_rank"] <= len(s)


def test_phi_grids_and_their_random_baseline(study):
    comps = study["phi"]["comparisons"]
    assert set(comps) == {"r2_vs_r8", "r2_seed0_vs_seed1", "r8_seed0_vs_seed1"}
    c = comps["r2_vs_r8"]
    assert c["grid_shape"] == [2, 8] and c["d"] == 32
    i, j = np.arange(1, 3)[:, None], np.arange(1, 9)[None, :]
    np.testing.assert_allclose(c["baseline_exact"], np.maximum(i, j) / 32, atol=1e-4)
    # the sampled mean is the exact expectation within 5 standard errors
    se = np.asarray(c["baseline_sampled_std"]) / np.sqrt(c["n_samples"])
    gap = np.abs(np.asarray(c["baseline_sampled_mean"]) - c["baseline_exact"])
    assert np.all(gap <= 5 * se + 1e-3)
    # φ recomputed from the adapters: right singular vectors of A
    recs = study["records"]
    (fa, _), (fb, _) = (adapter_factors(find_cells(recs, targets="q,v", r=r, seed=0)[0],
                                        study["runs"]) for r in (2, 8))
    m = c["modules"][0]
    Ua = np.linalg.svd(fa[m["module"]][1])[2].T[:, :2]
    Ub = np.linalg.svd(fb[m["module"]][1])[2].T[:, :8]
    assert m["phi_11"] == pytest.approx(float((Ua[:, 0] @ Ub[:, 0]) ** 2), abs=1e-6)
    assert m["phi_full"] == pytest.approx(float(np.sum((Ua.T @ Ub) ** 2) / 2), abs=1e-6)
    for mod in c["modules"]:
        g = np.asarray(mod["grid"])
        assert g.shape == (2, 8) and np.all((g >= -1e-9) & (g <= 1 + 1e-9))


def test_amplification_rows_follow_their_definitions(study):
    params = dict(load_checkpoint(study["base"])[0].named_parameters())
    rows = study["amplification"]["rows"]
    assert {x["r"] for x in rows} == {2, 8}
    for x in rows:
        W = np.asarray(params[x["module"] + ".weight"], np.float64)
        s = np.linalg.svd(W, compute_uv=False)
        assert x["proj_top"] == pytest.approx(np.sqrt(np.sum(s[:x["r"]] ** 2)), rel=1e-6)
        assert x["proj_random_exact"] == pytest.approx(x["r"] * np.linalg.norm(W) / 32, rel=1e-6)
        assert x["amp_delta"] == pytest.approx(x["delta_fro"] / x["proj_delta"], rel=1e-6)
        # W's own top directions hold the most of W any r-dim pair of subspaces can hold
        assert x["proj_delta"] <= x["proj_top"] + 1e-9


def test_truncation_and_the_evaluator_reproduce_the_records(study):
    tr = study["full_vs_lora"]["truncation"]
    chk = tr["check"]
    assert chk["evaluated_task_loss"] == pytest.approx(chk["record_task_loss"], abs=2e-5)
    assert chk["evaluated_forgetting"] == pytest.approx(chk["record_forgetting"], abs=2e-5)
    assert tr["ranks"] == [2, 8] and len(tr["full"]) == 2
    for f in tr["full"]:
        rows = {row["r"]: row for row in f["rows"]}
        assert set(rows) == {2, 8, None}
    # rank 32 = the full width: truncation keeps everything
    ev = Evaluator(study["base"], **{k: v for k, v in TINY.items()})
    assert ev({})["forgetting"] == pytest.approx(0.0, abs=1e-12)
    er = study["full_vs_lora"]["effective_rank"]
    full = [x for x in er if x["targets"] == "full"]
    lora = [x for x in er if x["targets"] == "all-linear" and x["r"] == 2]
    assert full and lora and all(x["effective_rank"] <= 2 + 1e-9 for x in lora)


def test_intruder_threshold_from_the_null_and_counts_from_the_records(study):
    d = study["intruders"]
    null = d["null"]
    assert null["eps"] >= null["random_floor"]["q99"]
    assert null["levels"]["1"]["false_positive_rate"][f"{null['eps']:g}"][null["k"] - 1] == 0.0
    for c in d["counts"]:
        assert c["total"] == sum(int(v) for v in c["per_layer"].values())
        assert c["by_eps"]["0.2"] <= c["by_eps"]["0.5"] <= c["by_eps"]["0.9"]  # monotone in ε
    for row in d["scaling"]:
        assert row["unchanged"]["task_loss"] == pytest.approx(row["record_task_loss"], abs=2e-5)
        for s in row["scaled"]:
            assert s["lambda"] in (0.5, 0.0)


def test_budget_table_holds_equal_parameter_cells(study):
    b = study["budget"]
    assert b["budget"] == 2 * 4 * 2 * 32            # q at r=4 on 2 layers: r (d_in + d_out)
    assert {(x["targets"], x["r"]) for x in b["rows"]} >= {("q", 4), ("v", 4), ("q,v", 2)}
    assert all(abs(x["trainable_params"] - b["budget"]) <= 0.15 * b["budget"] for x in b["rows"])
    with pytest.raises(StudyError, match="no k r=8 cell"):
        budget_table(study["records"], ("k",), 8)


def test_unknown_study_is_refused(study):
    with pytest.raises(StudyError, match="unknown study"):
        run_delta_w_study(study["results"] / "ablate", study["root"] / "x", study["runs"],
                          only=["nope"])
    assert "intruders" in STUDIES


@pytest.mark.slow  # matplotlib draws 12 PNGs (about 8 s of CPU)
def test_every_figure_builds_from_the_records(study, tmp_path):
    pytest.importorskip("matplotlib")
    from minilora.experiments.figures import FIGURES, make_figures
    names = [n for n in FIGURES if n.startswith(("ablate_", "delta_w_"))]
    assert len(names) == 9
    done = make_figures(names, study["results"], tmp_path, log=lambda *_: None)
    assert all(isinstance(v, list) and v for v in done.values()), done
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "delta_w_phi_r2_vs_r8.png" in pngs and "ablate_pareto.png" in pngs
    assert all((tmp_path / p).stat().st_size > 10_000 for p in pngs)


@pytest.mark.parametrize("argv, flag", [
    (["--only", "nope"], "--only"),
    (["--phi-ranks", "64,8"], "--phi-ranks"),
    (["--budget", "q"], "--budget"),
    (["--sweep", "/nonexistent/sweep"], "--sweep"),
])
def test_cli_delta_w_refuses_bad_flags(argv, flag, capsys, tmp_path):
    from minilora.cli import main
    sweep = tmp_path / "sweep"
    (sweep / "cells").mkdir(parents=True)
    args = ["delta-w", "--sweep", str(sweep), "--out", str(tmp_path / "o"), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
