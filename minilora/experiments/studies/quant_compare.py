"""``minilora quantize --compare``: NF4 vs FP4 vs int4 on N(0, 1) data and the base model's
weights, written to ``results/quant/*.json`` (the maths is in :mod:`minilora.quant.compare`).
"""
from __future__ import annotations

import json
from pathlib import Path

from minilora.checkpoint import load_checkpoint
from minilora.config import QUANT_TYPES
from minilora.experiments.paths import base_model_path
from minilora.io import atomic_write_text
from minilora.quant.compare import (
    BLOCKSIZES,
    _bs_label,
    code_levels,
    compare_codes,
    format_error_table,
    gaussian_sample,
    model_quant_weights,
    quant_error,
)

RESULTS_SUBDIR = "quant"
MADE_BY = "minilora quantize --compare"

def run_comparison(results_dir="results", n_gaussian: int = 2 ** 20, seed: int = 0,
                   blocksizes=BLOCKSIZES, ckpt=None, log=print) -> dict:
    """Compare NF4, FP4 and int4 on N(0, 1) data and on a model's weights; write the JSON files.

    Writes (atomically) into ``<results_dir>/quant/``:

    * ``error_vs_blocksize.json``: every (data, quant_type, blocksize) record of
      :func:`compare_codes`;
    * ``error_table.json``: the block-64 rows, plus NF4 / FP4 / int4 with double quantisation;
    * ``code_histogram.json``: code counts at block 64 for each data set and type, with levels.

    Args:
        results_dir: the results folder (default "results").
        n_gaussian: number of N(0, 1) samples (default 2**20).
        seed: for the Gaussian sample.
        blocksizes: block sizes compared (None = whole tensor).
        ckpt: model checkpoint (default: the shipped base model).
    Returns:
        {"error_table": ..., "error_vs_blocksize": ..., "code_histogram": ...} as written.

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """

    path = Path(ckpt) if ckpt is not None else base_model_path()
    model, _, _ = load_checkpoint(path)
    weights = list(model_quant_weights(model).values())
    datasets = {"gaussian": gaussian_sample(n_gaussian, seed), "base_model": weights}
    settings = {"gaussian_n": n_gaussian, "seed": seed, "model": path.name,
                "model_quantized_params": sum(int(w.size) for w in weights),
                "model_quantized_tensors": len(weights), "made_by": MADE_BY}
    rows = compare_codes(datasets, QUANT_TYPES, blocksizes)
    table = [r for r in rows if r["blocksize"] == 64]
    for data, tensors in datasets.items():
        for qt in QUANT_TYPES:
            table.append({"data": data, "quant_type": qt, "blocksize": 64, "double_quant": True,
                          **quant_error(tensors, qt, 64, double_quant=True)})
    hist = [{"data": r["data"], "quant_type": r["quant_type"], "blocksize": 64,
             "levels": code_levels(r["quant_type"]), "counts": r["code_counts"],
             "fraction": [c / r["n"] for c in r["code_counts"]]}
            for r in rows if r["blocksize"] == 64]
    results = {"error_table": {"settings": settings, "rows": table},
               "error_vs_blocksize": {"settings": settings,
                                      "blocksizes": [_bs_label(b) for b in blocksizes],
                                      "rows": rows},
               "code_histogram": {"settings": settings, "histograms": hist}}
    out_dir = Path(results_dir) / RESULTS_SUBDIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, obj in results.items():
        atomic_write_text(out_dir / f"{name}.json", json.dumps(obj, indent=1) + "\n")
    log(format_error_table(table))
    log(f"written: {', '.join(str(out_dir / f'{k}.json') for k in results)}")
    return results
