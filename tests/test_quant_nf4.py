"""NF4 / FP4 / int4 tables and blockwise 4-bit quantisation (minilora.quant.nf4, .blockwise).

Where the expected numbers come from:
* NF4 / FP4 tables, nibble order, zero padding, tie rule: bitsandbytes source (functional.py,
  backends/default/ops.py, csrc/kernels.cu), see shared/facts/nf4-and-peft-format.md §1.
* tests/data/bnb_nf4_golden.npz: outputs of the real bitsandbytes 0.50.0 CPU path (torch 2.13.0),
  made by tests/data/make_bnb_nf4_golden.py. NF4 and FP4 packed bytes and absmax must be
  byte-identical.
* mean |error| on randn(1024, 1024): bnb tests/test_functional.py::test_4bit_quant
  (NF4 bs64 0.072798, FP4 bs64 0.096543, std ~1e-4).
"""
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora import backend
from minilora.quant import blockwise as B
from minilora.quant import checks as QC
from minilora.quant import nf4 as N
from minilora.quant import packing as QP
from minilora.quant.state import QuantState

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "bnb_nf4_golden.npz")
F32_EPS = float(np.finfo(np.float32).eps)


def reference_quantize(x, code, blocksize):
    """Slow, obvious reference: loop over blocks, argmin distance, ties to the lower index.

    Scales like bnb (float32 reciprocal for full blocks, division for the partial last block)
    so that it sees the same float32 ``scaled`` values as the library.
    """
    flat = np.asarray(x, np.float32).reshape(-1)
    code64 = np.asarray(code, np.float64)
    q, absmax = [], []
    for start in range(0, flat.size, blocksize):
        blk = flat[start:start + blocksize]
        am = np.float32(np.abs(blk).max())
        div = np.maximum(am, np.float32(1e-38))
        if blk.size == blocksize:
            scaled = blk * (np.float32(1) / div)
        else:
            scaled = blk / div
        scaled = np.clip(scaled, -1, 1).astype(np.float64)
        dist = np.abs(scaled[:, None] - code64[None, :])     # (bs, K)
        q.append(np.argmin(dist, axis=1))                    # first minimum = lower index
        absmax.append(am)
    return np.concatenate(q).astype(np.uint8), np.array(absmax, np.float32)


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------

def test_nf4_code_structure():
    c = N.NF4_CODE
    assert c.dtype == np.float32 and c.shape == (16,)
    assert np.all(np.diff(c) > 0), "sorted, so code order == value order"
    assert c[0] == -1.0 and c[15] == 1.0 and c[7] == 0.0, "both ends and an exact zero (code 7)"
    assert (c < 0).sum() == 7 and (c > 0).sum() == 8, "asymmetric: 7 negative, 8 positive"
    assert not c.flags.writeable


def test_create_normal_map_equals_nf4_code_exactly():
    derived = N.create_normal_map()
    assert derived.dtype == np.float32
    # bit-for-bit: torch's float32 linspace rounding is reproduced by linspace_float32
    np.testing.assert_array_equal(derived, N.NF4_CODE)
    # and NumPy's own linspace gets within one float32 ulp (the facts file's observation)
    np.testing.assert_array_max_ulp(derived, N.NF4_CODE, maxulp=1)


def test_create_normal_map_unnormalised_quantiles():
    # max = Phi^-1(0.9677083) = 1.8481 is what the table was divided by
    from scipy.stats import norm
    assert norm.ppf(np.float32(0.9677083)) == pytest.approx(1.8481, abs=1e-4)
    sym = N.create_normal_map(use_extra_value=False)
    assert sym.shape == (15,) and sym[7] == 0.0
    np.testing.assert_array_equal(sym[:7], -sym[8:][::-1])


def test_create_normal_map_bad_offset():
    with pytest.raises(ValueError, match="offset"):
        N.create_normal_map(offset=0.4)


def test_linspace_float32_matches_numpy_within_one_ulp():
    for num in (2, 8, 9, 17, 65):
        np.testing.assert_array_max_ulp(QC.linspace_float32(0.1, 1.0, num),
                                        np.linspace(0.1, 1.0, num, dtype=np.float32), maxulp=1)


def test_fp4_code():
    c = N.FP4_CODE
    raw = np.array(N.FP4_RAW, np.float32)
    np.testing.assert_array_equal(c, raw / np.float32(12))
    assert c[3] == 1.0 and c[11] == -1.0
    assert c[1] == np.float32(0.0625 / 12), "0b001 is the subnormal 0.5 * 2**-2, normalised"
    assert np.signbit(c[8]) and c[8] == 0 and not np.signbit(c[0]), "two zeros: +0 (0x0), -0 (0x8)"
    assert np.all(np.signbit(c[8:])) and not np.any(np.signbit(c[:8])), "bit 3 is the sign"


def test_int4_symmetric_code():
    c = N.int4_symmetric_code()
    assert c.shape == (16,) and c.dtype == np.float32
    np.testing.assert_allclose(c, np.arange(-8, 8) / 7, rtol=0, atol=1e-7)
    usable = c[np.abs(c) <= 1]
    assert usable.size == 15, "15 symmetric levels -7..7; -8/7 is outside [-1, 1]"
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    packed, state = N.quantize_int4(x)
    q = QP.unpack_nibbles(packed, x.size)
    assert q.min() >= 1, "index 0 (-8/7) is never chosen"
    assert np.all(np.bincount(q, minlength=16)[1:] > 0)
    # a block of multiples of absmax/7 comes back exactly (up to float32 rounding)
    y = (np.arange(-7, 8, dtype=np.float32) / np.float32(7)) * np.float32(3.5)
    packed, state = N.quantize_int4(y, blocksize=15)
    np.testing.assert_allclose(N.dequantize_int4(packed, state), y, rtol=0, atol=4e-7)


# ------------------------------------------------------------------------------------------
# nearest code and the tie rule
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [N.NF4_CODE, np.sort(N.FP4_CODE), N.INT4_CODE],
                         ids=["nf4", "fp4", "int4"])
def test_tie_goes_to_lower_code(code):
    mids = B.midpoints(code)
    assert mids.dtype == np.float32
    below = np.nextafter(mids, np.float32(-np.inf))
    above = np.nextafter(mids, np.float32(np.inf))
    k = np.arange(mids.size)
    distinct = code[:-1] != code[1:]                     # FP4's -0/+0 pair has no real midpoint
    np.testing.assert_array_equal(B.nearest_code(mids, code)[distinct], k[distinct])
    np.testing.assert_array_equal(B.nearest_code(below, code)[distinct], k[distinct])
    np.testing.assert_array_equal(B.nearest_code(above, code)[distinct], k[distinct] + 1)


def test_nf4_midpoints_match_cuda_thresholds():
    # first and last of dQuantizeNF4's constants (kernels.cu), to the printed digits
    mids = B.midpoints(N.NF4_CODE)
    assert mids[0] == pytest.approx(-0.8480964004993439, abs=1e-7)
    assert mids[7] == pytest.approx(0.03979014977812767, abs=1e-8)
    assert mids[14] == pytest.approx(0.8614784181118011, abs=1e-7)


def test_nearest_code_counting_equals_searchsorted(rng):
    code = N.NF4_CODE
    mids = B.midpoints(code)
    s = np.concatenate([rng.uniform(-1.2, 1.2, 5000).astype(np.float32), mids,
                        np.nextafter(mids, np.float32(2)), np.float32([-1, 0, 1, -0.0])])
    expect = np.searchsorted(mids, s, side="left")
    np.testing.assert_array_equal(B.nearest_code(s, code), expect)
    # the 256-entry dynamic map takes the searchsorted path; same answer as brute force
    from minilora.quant.double import DYNAMIC_MAP
    t = rng.uniform(-1, 1, 3000).astype(np.float32)
    brute = np.argmin(np.abs(t[:, None].astype(np.float64) - DYNAMIC_MAP[None, :]), axis=1)
    np.testing.assert_array_equal(B.nearest_code(t, DYNAMIC_MAP), brute)


# ------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------

def test_pack_high_nibble_first():
    np.testing.assert_array_equal(QP.pack_nibbles(np.uint8([1, 2, 15, 0])), np.uint8([0x12, 0xF0]))
    np.testing.assert_array_equal(QP.pack_nibbles(np.uint8([3, 4, 5]), pad=7),
                                  np.uint8([0x34, 0x57]))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 63, 64, 65, 1001])
def test_pack_unpack_round_trip(rng, n):
    q = rng.integers(0, 16, n).astype(np.uint8)
    packed = QP.pack_nibbles(q, pad=7)
    assert packed.shape == ((n + 1) // 2,) and packed.dtype == np.uint8
    np.testing.assert_array_equal(QP.unpack_nibbles(packed, n), q)
    if n % 2:
        assert packed[-1] & 0xF == 7


def test_bnb_examples_first_byte_and_odd_padding():
    x = np.zeros(64, np.float32)
    x[0], x[1] = 1.0, -1.0
    packed, _ = N.quantize_nf4(x)
    assert packed[0] == 0xF0, "[1.0, -1.0] -> codes 15, 0 -> 0xF0"
    packed, _ = N.quantize_nf4(np.random.default_rng(1).standard_normal(7).astype(np.float32))
    assert packed[-1] & 0xF == 0x7, "odd length padded with the NF4 code of 0.0"
    packed, _ = N.quantize_fp4(np.ones(3, np.float32))
    assert packed[-1] & 0xF == 0x0, "FP4 pads with code 0 (+0.0)"


def test_unpack_bad_input():
    with pytest.raises(ValueError, match="ceil"):
        QP.unpack_nibbles(np.zeros(3, np.uint8), 8)
    with pytest.raises(TypeError, match="uint8"):
        QP.unpack_nibbles(np.zeros(4, np.int32), 8)
    with pytest.raises(ValueError, match="0..15"):
        QP.pack_nibbles(np.uint8([16]))


# ------------------------------------------------------------------------------------------
# blockwise quantisation: shapes, block sizes, edge cases
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocksize", [1, 2, 3, 64, 65, 4096])
@pytest.mark.parametrize("n", [1, 5, 130, 4099])
def test_quantize_blockwise_matches_reference(rng, blocksize, n):
    x = rng.standard_normal(n).astype(np.float32)
    x[: min(n, blocksize)] *= 10          # blocks with very different scales
    q, absmax = B.quantize_blockwise(x, N.NF4_CODE, blocksize)
    q_ref, absmax_ref = reference_quantize(x, N.NF4_CODE, blocksize)
    assert q.shape == (n,) and absmax.shape == (math.ceil(n / blocksize),)
    np.testing.assert_array_equal(absmax, absmax_ref)
    np.testing.assert_array_equal(q, q_ref)
    x_hat = B.dequantize_blockwise(q, absmax, N.NF4_CODE, blocksize)
    np.testing.assert_array_equal(x_hat, N.NF4_CODE[q] * np.repeat(absmax, blocksize)[:n])


@pytest.mark.parametrize("blocksize", [1, 3, 64, 65])
def test_slicing_is_invisible(monkeypatch, rng, blocksize):
    """The NumPy path works in cache-sized slices; the result must not depend on the slice size."""
    x = rng.standard_normal(5 * 1031).astype(np.float32)
    whole = N.quantize_nf4(x, blocksize=blocksize, double_quant=True)
    y_whole = N.dequantize_nf4(*whole)
    monkeypatch.setattr(B, "_SLICE", 256)
    small = N.quantize_nf4(x, blocksize=blocksize, double_quant=True)
    np.testing.assert_array_equal(small[0], whole[0])
    np.testing.assert_array_equal(small[1].absmax, whole[1].absmax)
    np.testing.assert_array_equal(N.dequantize_nf4(*small), y_whole)


@pytest.mark.parametrize("blocksize", [1, 2, 3, 64, 65])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 129, 1001])
def test_dequantize_packed_equals_unpack_then_lookup(rng, blocksize, n):
    x = rng.standard_normal(n).astype(np.float32)
    q, absmax = B.quantize_blockwise(x, N.NF4_CODE, blocksize)
    packed = QP.pack_nibbles(q, pad=7)
    two_steps = B.dequantize_blockwise(QP.unpack_nibbles(packed, n), absmax, N.NF4_CODE, blocksize)
    one_step = B.dequantize_packed(packed, absmax, N.NF4_CODE, blocksize, n)
    np.testing.assert_array_equal(one_step, two_steps)
    assert one_step.shape == (n,) and one_step.dtype == np.float32


def test_dequantize_bad_input():
    q, absmax = B.quantize_blockwise(np.ones(10, np.float32), N.NF4_CODE, 4)
    with pytest.raises(ValueError, match="absmax has 2 entries"):
        B.dequantize_blockwise(q, absmax[:2], N.NF4_CODE, 4)
    with pytest.raises(ValueError, match="shape \\(3, 3\\) holds 9"):
        B.dequantize_blockwise(q, absmax, N.NF4_CODE, 4, shape=(3, 3))
    with pytest.raises(ValueError, match="only 4 entries"):
        B.dequantize_blockwise(q, absmax, N.NF4_CODE[:4], 4)
    with pytest.raises(TypeError, match="integer"):
        B.dequantize_blockwise(q.astype(np.float32), absmax, N.NF4_CODE, 4)
    packed = QP.pack_nibbles(q)
    with pytest.raises(ValueError, match="ceil"):
        B.dequantize_packed(packed, absmax, N.NF4_CODE, 4, 12)


def test_absmax_per_block(rng):
    x = rng.standard_normal((5, 13)).astype(np.float32)
    am = B.absmax_per_block(x, 8)
    flat = np.abs(x.reshape(-1))
    np.testing.assert_array_equal(am, [flat[i:i + 8].max() for i in range(0, 65, 8)])


@pytest.mark.parametrize("blocksize", [1, 3, 64])
def test_all_zero_blocks_give_exact_zeros(blocksize):
    x = np.zeros(200, np.float32)
    x[100:103] = [0.5, -2.0, 1.0]
    packed, state = N.quantize_nf4(x, blocksize=blocksize)
    y = N.dequantize_nf4(packed, state)
    assert np.all(np.isfinite(y))
    zero_blocks = state.absmax == 0
    assert zero_blocks.any()
    assert np.all(y[np.repeat(zero_blocks, blocksize)[:200]] == 0)
    assert np.all(QP.unpack_nibbles(packed, 200)[:96] == 7), "zero -> NF4 code 7 (bnb: 0x77)"
    packed, state = N.quantize_nf4(np.zeros((3, 5), np.float32))
    np.testing.assert_array_equal(N.dequantize_nf4(packed, state), np.zeros((3, 5)))


@pytest.mark.parametrize("value", [3.25, -0.01, 7e-30, 1e30])
def test_constant_blocks_are_exact(value):
    x = np.full((3, 50), value, np.float32)
    for quantize, dequantize in [(N.quantize_nf4, N.dequantize_nf4),
                                 (N.quantize_fp4, N.dequantize_fp4),
                                 (N.quantize_int4, N.dequantize_int4)]:
        packed, state = quantize(x, blocksize=64)
        np.testing.assert_array_equal(dequantize(packed, state), x)


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 11)])
def test_round_trip_shapes_and_dtypes(rng, shape):
    for dtype in (np.float16, np.float32, np.float64):
        x = rng.standard_normal(shape).astype(dtype)
        packed, state = N.quantize_nf4(x)
        y = N.dequantize_nf4(packed, state)
        assert y.shape == x.shape and y.dtype == dtype
        assert packed.shape == ((x.size + 1) // 2,)
        assert state.shape == shape and state.dtype == np.dtype(dtype).name


def test_single_element():
    packed, state = N.quantize_nf4(np.float32([-0.3]))
    assert packed.tolist() == [0x07] and state.absmax.tolist() == [np.float32(0.3)]
    np.testing.assert_array_equal(N.dequantize_nf4(packed, state), np.float32([-0.3]))


def test_bnb_reference_error_numbers():
    x = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    for quantize, dequantize, err, rel in [(N.quantize_nf4, N.dequantize_nf4, 0.072798, 0.203339),
                                           (N.quantize_fp4, N.dequantize_fp4, 0.096543, 0.260125)]:
        packed, state = quantize(x, blocksize=64)
        e = np.abs(dequantize(packed, state) - x)
        assert e.mean() == pytest.approx(err, abs=5e-4)
        assert (e / (np.abs(x) + 1e-8)).mean() == pytest.approx(rel, abs=2e-3)


def test_round_trip_on_each_backend(xpb):
    x = np.random.default_rng(3).standard_normal((37, 11)).astype(np.float32)
    packed, state = N.quantize_nf4(backend.asarray(x), double_quant=True)
    y = backend.to_numpy(N.dequantize_nf4(packed, state))
    p_np, s_np = (backend.to_numpy(packed), backend.to_numpy(state.absmax))
    backend.set_backend("numpy")
    p_ref, s_ref = N.quantize_nf4(x, double_quant=True)
    np.testing.assert_array_equal(p_np, p_ref)
    np.testing.assert_array_equal(s_np, s_ref.absmax)
    np.testing.assert_allclose(y, N.dequantize_nf4(p_ref, s_ref), rtol=1e-6, atol=1e-7)


def test_double_quant_does_not_change_the_4bit_codes(rng):
    x = rng.standard_normal((64, 100)).astype(np.float32)
    p1, _ = N.quantize_nf4(x)
    p2, s2 = N.quantize_nf4(x, double_quant=True)
    np.testing.assert_array_equal(p1, p2)
    assert s2.double_quant and s2.absmax.dtype == np.uint8


# ------------------------------------------------------------------------------------------
# the error bound, as a property
# ------------------------------------------------------------------------------------------

_finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(x=hnp.arrays(np.float32, st.integers(1, 300), elements=_finite32),
       blocksize=st.sampled_from([1, 2, 3, 7, 64, 65]),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]))
def test_error_at_most_half_the_local_gap(x, blocksize, quant_type):
    """|x_hat - x| <= (gap between the two levels around x/absmax) / 2 * absmax, + rounding."""
    code = N.get_code(quant_type)
    packed, state = N.quantize_4bit(x, code, blocksize, quant_type=quant_type)
    x_hat = N.dequantize_4bit(packed, state).astype(np.float64)
    am = np.repeat(state.absmax.astype(np.float64), blocksize)[: x.size]
    levels = np.unique(code.astype(np.float64))                  # sorted, +-0 merged
    s = np.divide(x, am, out=np.zeros(x.size), where=am > 0)
    j = np.clip(np.searchsorted(levels, s), 1, levels.size - 1)
    half_gap = (levels[j] - levels[j - 1]) / 2
    bound = half_gap * am + 4 * F32_EPS * am
    assert np.all(np.abs(x_hat - x) <= bound)


# ------------------------------------------------------------------------------------------
# bitsandbytes: golden file (always) and the live library (when installed)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    if not os.path.exists(GOLDEN):
        pytest.skip(f"{GOLDEN} missing; regenerate with tests/data/make_bnb_nf4_golden.py")
    with np.load(GOLDEN) as g:
        return {k: g[k] for k in g.files}


def test_tables_equal_bnb_golden(golden):
    assert str(golden["bnb_version"]).startswith("0.50")
    np.testing.assert_array_equal(N.NF4_CODE, golden["nf4_code"])
    np.testing.assert_array_equal(N.FP4_CODE, golden["fp4_code"])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_byte_identical_to_bnb_golden(golden, quant_type):
    for name in golden["cases"]:
        x = golden[f"{name}/x"]
        packed, state = N.quantize_4bit(x, N.get_code(quant_type), 64, quant_type=quant_type)
        np.testing.assert_array_equal(packed, golden[f"{name}/{quant_type}_packed"],
                                      err_msg=f"{name} packed")
        np.testing.assert_array_equal(state.absmax, golden[f"{name}/{quant_type}_absmax"],
                                      err_msg=f"{name} absmax")
        if quant_type == "nf4":
            np.testing.assert_array_equal(N.dequantize_nf4(packed, state),
                                          golden[f"{name}/nf4_dequant"], err_msg=f"{name} deq")


def test_byte_identical_to_live_bitsandbytes():
    why = ("bitsandbytes (+ torch) not installed; test_byte_identical_to_bnb_golden covers "
           "bnb 0.50.0 from stored outputs")
    torch = pytest.importorskip("torch", reason=why)
    F = pytest.importorskip("bitsandbytes.functional", reason=why)
    rng = np.random.default_rng(7)
    for shape in [(64, 64), (33, 7), (7,), (3, 1000)]:
        x = rng.standard_normal(shape).astype(np.float32)
        packed_ref, st_ref = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
        packed, state = N.quantize_nf4(x)
        np.testing.assert_array_equal(packed, packed_ref.numpy().reshape(-1))
        np.testing.assert_array_equal(state.absmax, st_ref.absmax.numpy())


# ------------------------------------------------------------------------------------------
# bad input: one clear error each
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_rejects_non_finite(bad, kind):
    x = np.ones(130, np.float32)
    x[128] = bad
    with pytest.raises(ValueError, match=f"{kind}.*index 128"):
        N.quantize_nf4(x)
    x = np.ones(100, np.float32)
    x[3] = bad
    with pytest.raises(ValueError, match=kind):
        N.quantize_nf4(x)


@pytest.mark.parametrize("blocksize, err", [(0, ValueError), (-64, ValueError), (1.5, TypeError),
                                            (64.0, TypeError), (True, TypeError),
                                            ("64", TypeError), (None, TypeError)])
def test_rejects_bad_blocksize(blocksize, err):
    with pytest.raises(err, match="blocksize must be a positive integer"):
        N.quantize_nf4(np.ones(8, np.float32), blocksize=blocksize)
    with pytest.raises(err, match="blocksize"):
        B.quantize_blockwise(np.ones(8, np.float32), N.NF4_CODE, blocksize)


def test_accepts_numpy_integer_blocksize():
    packed, state = N.quantize_nf4(np.ones(8, np.float32), blocksize=np.int64(4))
    assert state.blocksize == 4 and type(state.blocksize) is int


@pytest.mark.parametrize("x", [np.zeros(0, np.float32), np.zeros((3, 0), np.float32)])
def test_rejects_empty(x):
    with pytest.raises(ValueError, match="empty"):
        N.quantize_nf4(x)


def test_rejects_non_float_input():
    with pytest.raises(TypeError, match="floating-point"):
        N.quantize_nf4(np.arange(10))


def test_rejects_bad_codes():
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="exactly 16 entries"):
        N.quantize_4bit(x, N.NF4_CODE[:15])
    with pytest.raises(ValueError, match="sorted"):
        B.quantize_blockwise(x, N.NF4_CODE[::-1], 64)
    with pytest.raises(ValueError, match="sorted"):
        B.nearest_code(x, N.FP4_CODE)
    with pytest.raises(ValueError, match="finite"):
        N.quantize_4bit(x, np.r_[N.NF4_CODE[:15], np.nan])
    with pytest.raises(ValueError, match="1-D"):
        N.quantize_4bit(x, N.NF4_CODE.reshape(4, 4))
    with pytest.raises(ValueError, match="quant_type"):
        N.get_code("nf5")
    with pytest.raises(ValueError, match="quant_type"):
        N.quantize_4bit(x, N.NF4_CODE, quant_type="nf5")


def test_state_must_match_packed():
    packed, state = N.quantize_nf4(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="do not belong together"):
        N.dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="uint8"):
        N.dequantize_nf4(packed.astype(np.int16), state)
    with pytest.raises(TypeError, match="QuantState"):
        N.dequantize_4bit(packed, {"absmax": state.absmax})
    broken = QuantState(absmax=state.absmax[:-1], shape=state.shape, code=state.code)
    with pytest.raises(ValueError, match="absmax must be"):
        N.dequantize_nf4(packed, broken)
    _, fp4_state = N.quantize_fp4(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="'fp4' codes"):
        N.dequantize_nf4(packed, fp4_state)
    with pytest.raises(TypeError, match="double_quant"):
        N.quantize_nf4(np.ones(4, np.float32), double_quant="yes")


def test_rejects_float64_beyond_float32_range():
    with pytest.raises(ValueError, match="beyond float32's range"):
        N.quantize_nf4(np.array([1.0, 1e300]))
