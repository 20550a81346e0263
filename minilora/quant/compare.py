"""NF4 vs FP4 vs symmetric int4: reconstruction error, error vs block size, codes used, and the
QLoRA article's worked examples recomputed with the real tables.

CPU-side analysis (``backend.cpu_module()`` NumPy, float64 for the error sums). The quantiser
itself is the library's :func:`minilora.quant.nf4.quantize_4bit` on the active backend; only its
results are brought back to the CPU.

For a tensor x and its round trip x_hat = dequantize(quantize(x)):

    mean_abs_error = mean |x - x_hat|          max_abs_error = max |x - x_hat|
    rmse           = sqrt(mean (x - x_hat)^2)  relative_rmse = rmse / sqrt(mean x^2)

Over several tensors (the weights of a model) each tensor is quantised on its own, as a real
checkpoint is, and the sums are pooled over all their elements. ``blocksize=None`` means one
block per tensor (a single absmax for the whole tensor).

``minilora quantize --compare`` runs :func:`run_comparison` and writes ``results/quant/*.json``;
``minilora figures`` draws them (``quant_error_vs_blocksize``, ``quant_code_histogram``).

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

import math

import numpy as np

from minilora import backend
from minilora.quant.checks import QuantError, check_blocksize
from minilora.quant.double import bits_per_param
from minilora.quant.model_quant import is_quant_target
from minilora.quant.nf4 import QUANT_TYPES, dequantize_4bit, get_code, quantize_4bit
from minilora.quant.packing import unpack_nibbles

#: Block sizes compared by default; None = the whole tensor is one block.
BLOCKSIZES = (16, 32, 64, 128, 256, 1024, 4096, None)
RESULTS_SUBDIR = "quant"
MADE_BY = "minilora quantize --compare"


# ---------------------------------------------------------------------------------------------
# one tensor, one code
# ---------------------------------------------------------------------------------------------

def roundtrip_codes(x, quant_type: str, blocksize: int | None = 64, double_quant: bool = False):
    """Quantise and dequantise ``x``; return the reconstruction and the 4-bit codes used.

        packed, state = quantize_4bit(x, code, blocksize);  x_hat = dequantize_4bit(packed, state)

    Args:
        x: float array of any shape, n >= 1 finite elements.
        quant_type: 'nf4', 'fp4' or 'int4'.
        blocksize: elements per block, or None for one block over the whole tensor.
        double_quant: 8-bit absmax (QLoRA double quantisation).
    Returns:
        x_hat: NumPy float32 array, x's shape.
        q: NumPy uint8 array of shape (n,), the code index of each element (for FP4 the index
           is the bit pattern, see :data:`minilora.quant.nf4.FP4_CODE`).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    code = get_code(quant_type)
    a = backend.asarray(x)
    n = int(a.size)
    bs = n if blocksize is None else check_blocksize(blocksize)
    packed, state = quantize_4bit(a, code, bs, double_quant, quant_type=quant_type)
    x_hat = dequantize_4bit(packed, state)
    return backend.to_numpy(x_hat), backend.to_numpy(unpack_nibbles(packed, n))


class _Pool:
    """Error sums pooled over tensors (float64)."""

    def __init__(self):
        self.n, self.abs_sum, self.sq_sum, self.x_sq_sum, self.max_abs = 0, 0.0, 0.0, 0.0, 0.0
        self.counts = np.zeros(16, dtype=np.int64)

    def add(self, x, x_hat, q):
        x = np.asarray(backend.to_numpy(x), dtype=np.float64).reshape(-1)
        err = np.abs(x - np.asarray(x_hat, dtype=np.float64).reshape(-1))
        self.n += x.size
        self.abs_sum += float(err.sum())
        self.sq_sum += float(np.dot(err, err))
        self.x_sq_sum += float(np.dot(x, x))
        self.max_abs = max(self.max_abs, float(err.max()))
        self.counts += np.bincount(q, minlength=16)[:16]

    def stats(self) -> dict:
        rmse = math.sqrt(self.sq_sum / self.n)
        rms_x = math.sqrt(self.x_sq_sum / self.n)
        return {"n": self.n, "mean_abs_error": self.abs_sum / self.n,
                "max_abs_error": self.max_abs, "rmse": rmse,
                "relative_rmse": rmse / rms_x if rms_x > 0 else 0.0}


def quant_error(tensors, quant_type: str, blocksize: int | None = 64,
                double_quant: bool = False) -> dict:
    """Round-trip error of one 4-bit code over one tensor or a list of tensors.

        mean_abs_error = sum |x - x_hat| / n,  max_abs_error = max |x - x_hat|,
        rmse = sqrt(sum (x - x_hat)^2 / n),    relative_rmse = rmse / sqrt(sum x^2 / n)

    pooled over all n elements; each tensor is quantised separately.

    Args:
        tensors: a float array, or a list / tuple of float arrays.
        quant_type: 'nf4', 'fp4' or 'int4'.
        blocksize: elements per block, or None for a whole tensor per block.
        double_quant: use 8-bit absmax.
    Returns:
        dict with n, mean_abs_error, max_abs_error, rmse, relative_rmse (floats) and
        code_counts (16 ints: how many elements got each code index).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    if quant_type not in QUANT_TYPES:
        raise QuantError(f"quant_type must be one of {', '.join(QUANT_TYPES)}; got {quant_type!r}")
    if isinstance(tensors, (list, tuple)):
        if not tensors:
            raise QuantError("tensors is an empty list; give at least one array")
        items = list(tensors)
    else:
        items = [tensors]
    pool = _Pool()
    for x in items:
        x_hat, q = roundtrip_codes(x, quant_type, blocksize, double_quant)
        pool.add(x, x_hat, q)
    return {**pool.stats(), "code_counts": [int(c) for c in pool.counts]}


# ---------------------------------------------------------------------------------------------
# the data compared
# ---------------------------------------------------------------------------------------------

def gaussian_sample(n: int = 2 ** 20, seed: int = 0):
    """n float32 draws from N(0, 1), seeded (``np.random.default_rng(seed)``). NumPy (n,)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QuantError(f"n must be a positive integer; got {n!r}")
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def model_quant_weights(model) -> dict:
    """The weights ``minilora quantize`` quantises (blocks' q, k, v, o, up, down), name -> array.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """

    return {name: p for name, p in model.named_parameters() if is_quant_target(name)}


def _bs_label(blocksize):
    return "whole" if blocksize is None else int(blocksize)


def compare_codes(datasets: dict, quant_types=QUANT_TYPES, blocksizes=BLOCKSIZES) -> list[dict]:
    """Error of every quant type at every block size on every dataset.

    Args:
        datasets: name -> array or list of arrays (e.g. {"gaussian": x, "base_model": [W, ...]}).
        quant_types: codes to compare (default nf4, fp4, int4).
        blocksizes: block sizes; None (written "whole") = one block per tensor.
    Returns:
        list of records {data, quant_type, blocksize, double_quant: False, n, mean_abs_error,
        max_abs_error, rmse, relative_rmse, code_counts}.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    rows = []
    for data, tensors in datasets.items():
        for qt in quant_types:
            for bs in blocksizes:
                r = quant_error(tensors, qt, bs)
                rows.append({"data": data, "quant_type": qt, "blocksize": _bs_label(bs),
                             "double_quant": False, **r})
    return rows


def code_levels(quant_type: str) -> list[float]:
    """The 16 levels of a code, index = 4-bit code (FP4 in bit-pattern order), as floats."""
    return [float(v) for v in get_code(quant_type)]


# ---------------------------------------------------------------------------------------------
# the QLoRA article's worked examples, recomputed
# ---------------------------------------------------------------------------------------------

def nearest_level(value: float, quant_type: str) -> tuple[int, float]:
    """Index and value of the level of a code nearest to ``value`` (already in [-1, 1]).

    Uses the library quantiser (absmax 1, one block), so ties and FP4's bit-pattern order are
    handled exactly as for real weights.
    """
    x = np.array([value, 1.0], dtype=np.float32)      # the 1.0 pins the block's absmax to 1
    x_hat, q = roundtrip_codes(x, quant_type, blocksize=2)
    return int(q[0]), float(x_hat[0])


def article_examples(weight: float = 0.2121, article_level: float = 0.1997,
                     positions: int = 16) -> dict:
    """The article's NF4 / int4 worked example and its double-quantisation arithmetic.

    The article ("参数高效微调——LoRA、QLoRA——概念") says a weight 0.2121 (absmax 1) is
    "closest to 0.1997, position 10", and writes int4 quantisation as
    ``round(totalNumberOfPositions / absmax * x)`` with totalNumberOfPositions = 16, and
    dequantisation as ``x_q / round(16 / absmax)``. Recomputed here:

    * each real table's nearest level to 0.2121 (NF4, FP4, int4 = k/7) and its error;
    * how far 0.1997 is from every level of every table (it is in none of them);
    * the uniform grid linspace(-1, 1, 16), the only 16-level table we found whose level
      nearest 0.2121 is about 0.2 at position 10 (counting from 1);
    * the article's formula: round(16 * 0.2121) = 3, dequantised 3/16; with 16 / absmax the
      integers run over -16..16 (33 values, 6 bits), not 4 bits; symmetric int4 uses 7;
    * the bit account: 32/64, 8/64 + 32/(64*256), the savings, and the bits for 10^6 weights.

    Returns:
        dict of plain numbers (see the keys); every entry is checked in
        tests/test_quant_compare.py.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    out = {"weight": weight, "article_level": article_level}
    for qt in QUANT_TYPES:
        idx, level = nearest_level(weight, qt)
        table = np.asarray(get_code(qt), dtype=np.float64)
        out[qt] = {"code": idx, "level": level, "abs_error": abs(weight - level),
                   "distance_of_article_level": float(np.abs(table - article_level).min())}
    grid = np.linspace(-1.0, 1.0, positions)
    g = int(np.argmin(np.abs(grid - weight)))
    out["uniform_grid"] = {"position_from_1": g + 1, "level": float(grid[g]),
                           "abs_error": abs(weight - float(grid[g]))}
    q_article = int(round(positions / 1.0 * weight))
    out["article_formula"] = {"q": q_article, "dequantized": q_article / positions,
                              "abs_error": abs(weight - q_article / positions),
                              "integer_range": [-positions, positions],
                              "distinct_values": 2 * positions + 1,
                              "bits_needed": math.ceil(math.log2(2 * positions + 1))}
    levels = 2 ** (4 - 1) - 1                                   # 7 for symmetric int4
    q_int4 = int(round(levels * weight))
    out["symmetric_int4"] = {"q": q_int4, "dequantized": q_int4 / levels,
                             "abs_error": abs(weight - q_int4 / levels)}
    single = bits_per_param(64) - 4
    double = bits_per_param(64, double_quant=True) - 4
    out["bits"] = {"absmax_fp32_per_param": single, "double_quant_per_param": double,
                   "first_term_8_over_64": 8 / 64, "second_term_32_over_64x256": 32 / (64 * 256),
                   "saved_per_param": single - double,
                   "million_params_fp32_absmax_bits": single * 10 ** 6,
                   "million_params_double_quant_bits": double * 10 ** 6,
                   "million_params_measured_double_quant_bits":
                       (bits_per_param(64, True, n=10 ** 6) - 4) * 10 ** 6,
                   "saved_65B_gigabytes": (single - double) * 65e9 / 8 / 1e9}
    return out



def format_error_table(rows) -> str:
    """The error table as fixed-width text (one line per data set, type and double_quant)."""
    lines = [f"{'data':<11}{'type':<6}{'block':>6}{'DQ':>4}{'mean |err|':>12}{'max |err|':>11}"
             f"{'RMSE':>11}{'rel. RMSE':>11}"]
    for r in rows:
        lines.append(f"{r['data']:<11}{r['quant_type']:<6}{str(r['blocksize']):>6}"
                     f"{'yes' if r['double_quant'] else 'no':>4}{r['mean_abs_error']:>12.3e}"
                     f"{r['max_abs_error']:>11.3e}{r['rmse']:>11.3e}{r['relative_rmse']:>11.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# figures live on the experiments floor (minilora.experiments.figures.quant)
# ---------------------------------------------------------------------------------------------
