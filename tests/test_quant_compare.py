"""NF4 vs FP4 vs int4 comparisons, and the QLoRA article's worked examples recomputed.

Reference errors are bitsandbytes' own: tests/test_functional.py::test_4bit_quant lists the
mean |A - deq(q(A))| for A = randn(1024, 1024) (std about 1e-4 over 200 samples). The NF4 code
frequencies at block 64 are the ones bitsandbytes' quantiser gives on N(0, 1) data.
"""
import json
import math

import numpy as np
import pytest

from minilora.experiments.figures import make_figures
from minilora.experiments.studies.quant_compare import run_comparison
from minilora.quant import NF4_CODE
from minilora.quant.compare import (
    article_examples,
    compare_codes,
    format_error_table,
    gaussian_sample,
    nearest_level,
    quant_error,
    roundtrip_codes,
)


@pytest.fixture(scope="module")
def gauss():
    return gaussian_sample(2 ** 20, seed=0)          # same size as bnb's randn(1024, 1024)


# --- the error table against bitsandbytes' reference numbers -------------------------------------

@pytest.mark.parametrize("qt, bs, ref", [("nf4", 32, 0.067746), ("nf4", 64, 0.072798),
                                         ("nf4", 128, 0.076831), ("nf4", 256, 0.080337),
                                         ("nf4", 4096, 0.092547), ("fp4", 64, 0.096543),
                                         ("fp4", 4096, 0.129536)])
def test_mean_abs_error_matches_bitsandbytes_reference(gauss, qt, bs, ref):
    r = quant_error(gauss, qt, bs)
    assert abs(r["mean_abs_error"] - ref) < 5e-4       # bnb's std is ~1e-4; 5 sigma


def test_error_statistics_are_the_definitions(rng):
    x = rng.standard_normal((37, 11)).astype(np.float32)
    x_hat, q = roundtrip_codes(x, "nf4", 16)
    r = quant_error(x, "nf4", 16)
    err = np.abs(x.astype(np.float64) - x_hat)
    assert r["n"] == x.size and sum(r["code_counts"]) == x.size
    assert r["mean_abs_error"] == pytest.approx(err.mean(), rel=1e-12)
    assert r["max_abs_error"] == pytest.approx(err.max(), rel=1e-12)
    assert r["rmse"] == pytest.approx(math.sqrt((err ** 2).mean()), rel=1e-12)
    assert r["relative_rmse"] == pytest.approx(r["rmse"] / math.sqrt((x.astype(float) ** 2).mean()))
    assert np.array_equal(np.bincount(q, minlength=16), r["code_counts"])
    # the reconstruction is the table level times the block's absmax
    absmax = np.abs(x.reshape(-1)[:16]).max()
    assert np.allclose(x_hat.reshape(-1)[:16], NF4_CODE[q[:16]] * absmax)


def test_pooled_over_tensors_equals_per_tensor_sums(rng):
    a = rng.standard_normal(300).astype(np.float32)
    b = 0.1 * rng.standard_normal((20, 7)).astype(np.float32)
    ra, rb, r = quant_error(a, "int4", 64), quant_error(b, "int4", 64), quant_error([a, b], "int4", 64)
    assert r["n"] == 440
    assert r["mean_abs_error"] == pytest.approx((300 * ra["mean_abs_error"] + 140 * rb["mean_abs_error"]) / 440)
    assert r["max_abs_error"] == max(ra["max_abs_error"], rb["max_abs_error"])
    assert r["code_counts"] == [i + j for i, j in zip(ra["code_counts"], rb["code_counts"])]


def test_nf4_beats_fp4_and_int4_on_gaussian_data_and_error_grows_with_block_size(gauss):
    rows = compare_codes({"g": gauss[: 2 ** 16]}, blocksizes=(16, 64, 256, 4096, None))
    err = {(r["quant_type"], r["blocksize"]): r["mean_abs_error"] for r in rows}
    for bs in (16, 64, 256, 4096, "whole"):
        assert err[("nf4", bs)] < err[("fp4", bs)] and err[("nf4", bs)] < err[("int4", bs)]
    for qt in ("nf4", "fp4", "int4"):
        seq = [err[(qt, bs)] for bs in (16, 64, 256, 4096, "whole")]
        assert seq == sorted(seq), (qt, seq)


def test_code_histogram_nf4_block64_matches_the_simulation_and_int4_never_uses_minus_8(gauss):
    r = quant_error(gauss, "nf4", 64)
    freq = np.array(r["code_counts"]) / r["n"]
    ref = np.array([.0185, .0435, .0583, .0710, .0807, .0883, .0924, .0882, .0811, .0784, .0735,
                    .0670, .0580, .0476, .0363, .0172])
    assert np.abs(freq - ref).max() < 2e-3
    # not equal-mass: end codes ~1.8 %, centre ~9 %, although NF4 is "equal expected count"
    assert freq[0] < 0.025 and freq[6] > 0.085
    counts = quant_error(gauss, "int4", 64)["code_counts"]
    assert counts[0] == 0                               # -8/7 lies outside [-1, 1]
    assert quant_error(gauss, "fp4", 64)["code_counts"][0] > 0


def test_whole_tensor_is_one_block(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    assert quant_error(x, "nf4", None) == quant_error(x, "nf4", 1000)


def test_double_quant_changes_error_only_slightly(gauss):
    a, b = quant_error(gauss, "nf4", 64), quant_error(gauss, "nf4", 64, double_quant=True)
    assert a["code_counts"] == b["code_counts"]        # the 4-bit codes do not depend on DQ
    assert 0 <= b["mean_abs_error"] - a["mean_abs_error"] < 2e-4   # bnb: 0.07265 -> 0.07272


def test_bad_input_is_one_clear_error(rng):
    x = rng.standard_normal(10).astype(np.float32)
    with pytest.raises(ValueError, match="quant_type must be one of nf4, fp4, int4"):
        quant_error(x, "nf5")
    with pytest.raises(ValueError, match="blocksize must be a positive integer"):
        quant_error(x, "nf4", 0)
    with pytest.raises(ValueError, match="empty list"):
        quant_error([], "nf4")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        gaussian_sample(0)


# --- the article's worked examples --------------------------------------------------------------

def test_article_nf4_example_recomputed_with_the_real_table():
    ex = article_examples()
    # the article: 0.2121 "is closest to 0.1997, position 10". With bnb's NF4 table the nearest
    # level is code 10 = 0.24611... (0.2121 lies above the midpoint 0.2035 of 0.1609 and 0.2461)
    assert ex["nf4"]["code"] == 10 and ex["nf4"]["level"] == float(NF4_CODE[10])
    assert (NF4_CODE[9] + NF4_CODE[10]) / 2 < 0.2121
    assert ex["nf4"]["abs_error"] == pytest.approx(0.034012, abs=1e-6)
    # 0.1997 is not a level of NF4, FP4 or int4 (nearest ones are >= 0.03 away)
    for qt in ("nf4", "fp4", "int4"):
        assert ex[qt]["distance_of_article_level"] > 0.03
    # a uniform 16-level grid on [-1, 1] has 0.2 at position 10 (from 1): closest to the article
    assert ex["uniform_grid"] == {"position_from_1": 10, "level": pytest.approx(0.2),
                                  "abs_error": pytest.approx(0.0121)}
    assert nearest_level(0.2121, "fp4") == (7, 0.25)   # FP4 code 0b0111 = 3/12


def test_article_int4_formula_recomputed():
    ex = article_examples()
    # round(16 / absmax * x) with absmax 1: 3, i.e. 3/16 = 0.1875; it spans -16..16 = 33 values
    assert ex["article_formula"]["q"] == 3
    assert ex["article_formula"]["dequantized"] == 0.1875
    assert ex["article_formula"]["distinct_values"] == 33 and ex["article_formula"]["bits_needed"] == 6
    # symmetric int4 (QLoRA Eq. 1 with 2^(4-1) - 1 = 7): round(7 * 0.2121) = 1 -> 1/7
    assert ex["symmetric_int4"]["q"] == 1
    assert ex["symmetric_int4"]["dequantized"] == pytest.approx(1 / 7)
    assert ex["int4"]["level"] == pytest.approx(1 / 7) and ex["int4"]["code"] == 9   # index k + 8


def test_article_double_quant_arithmetic():
    b = article_examples()["bits"]
    assert b["absmax_fp32_per_param"] == 0.5                      # article: 0.5 bits  (right)
    assert b["million_params_fp32_absmax_bits"] == 500_000         # article: 500,000   (right)
    assert b["second_term_32_over_64x256"] == 0.001953125          # article: 0.001953125
    assert b["first_term_8_over_64"] == 0.125                      # article: 0.125
    assert b["double_quant_per_param"] == 0.126953125              # article: ~0.127    (right)
    # article: "brings a 1M-parameter model down to 125,000 bits" -> 126,953 (8/64 only is 125,000)
    assert round(b["million_params_double_quant_bits"]) == 126_953
    assert b["first_term_8_over_64"] * 10 ** 6 == 125_000
    assert round(b["million_params_measured_double_quant_bits"]) == 127_016   # partial blocks + offset
    assert b["saved_per_param"] == 0.373046875                     # paper: 0.373
    assert b["saved_65B_gigabytes"] == pytest.approx(3.03, abs=0.005)   # paper: "about 3 GB"


# --- the command and the figures --------------------------------------------------------------

def test_run_comparison_writes_json_and_figures(tmp_path):
    res = run_comparison(tmp_path / "results", n_gaussian=4096, blocksizes=(64, 256, None),
                         log=lambda s: None)
    qdir = tmp_path / "results" / "quant"
    for name in ("error_table", "error_vs_blocksize", "code_histogram"):
        assert json.loads((qdir / f"{name}.json").read_text()) == json.loads(json.dumps(res[name]))
    rows = res["error_vs_blocksize"]["rows"]
    assert len(rows) == 2 * 3 * 3 and {r["blocksize"] for r in rows} == {64, 256, "whole"}
    assert res["error_vs_blocksize"]["settings"]["model_quantized_tensors"] == 36
    assert len(res["error_table"]["rows"]) == 2 * 3 * 2        # with and without DQ
    assert len(res["code_histogram"]["histograms"]) == 6
    assert "base_model nf4" in format_error_table(res["error_table"]["rows"])
    out = make_figures(["quant_error_vs_blocksize", "quant_code_histogram"], tmp_path / "results",
                       tmp_path / "fig", log=lambda s: None)
    for paths in out.values():
        assert open(paths[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_figures_without_results_name_the_command(tmp_path):
    out = make_figures(["quant_code_histogram"], tmp_path, tmp_path / "fig", log=lambda s: None)
    assert out["quant_code_histogram"].startswith("skipped") and "minilora quantize --compare" in \
        out["quant_code_histogram"]


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
def test_cli_compare(tmp_path, capsys):
    from minilora.cli import main

    assert main(["quantize", "--compare", "--results", str(tmp_path)]) == 0
    assert "written:" in capsys.readouterr().out
    assert (tmp_path / "quant" / "error_table.json").exists()
    assert main(["quantize", "--compare", "--results", str(tmp_path), "--ckpt",
                 str(tmp_path / "missing.safetensors")]) == 2


# --- the faster packing / lookup paths give the same bytes and values ---------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1001])
def test_pack_nibbles_equals_the_strided_definition(rng, n):
    from minilora.quant.packing import pack_nibbles

    q = rng.integers(0, 16, n).astype(np.uint8)
    ref = np.left_shift(q[0::2], 4)
    ref[: n // 2] |= q[1::2]
    if n % 2:
        ref[-1] |= 7
    assert np.array_equal(pack_nibbles(q, pad=7), ref)
    assert np.array_equal(pack_nibbles(q.astype(np.int64), pad=7), ref)     # other int dtype
    wide = np.stack([q, q], axis=1)[:, 0]                                    # non-contiguous view
    assert np.array_equal(pack_nibbles(wide, pad=7), ref)


def test_dequantize_blockwise_refuses_negative_indices():
    from minilora.quant.blockwise import dequantize_blockwise

    with pytest.raises(ValueError, match="negative index -1"):
        dequantize_blockwise(np.array([0, -1]), np.ones(1, np.float32), NF4_CODE, 64)
