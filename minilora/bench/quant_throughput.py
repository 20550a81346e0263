"""Throughput of NF4 quantise + dequantise, against a plain copy of the same float32 array.

    python -m minilora.bench.quant_throughput [--n 4194304] [--repeats 5] [--backend numpy|cupy] [--json]

GB/s are gigabytes of float32 *input* per second (4 n bytes / best time). The copy (``xp.copyto``)
is the memory-bandwidth ceiling for anything that reads the tensor once and writes it once, so
``ratio = nf4_roundtrip_gbps / copy_gbps`` says how far the quantiser is from that ceiling
(target >= 0.25). If torch + bitsandbytes are importable, their CPU path is timed on the same data.

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

from minilora import backend
from minilora.backend import xp
from minilora.quant import dequantize_nf4, quantize_nf4


def _best_time(fn, repeats: int) -> float:
    fn()                                   # warm-up (allocations, caches, CuPy kernels)
    backend.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _bnb_times(x_np, repeats: int):
    """(quantise s, dequantise s, version) for bitsandbytes' CPU path, or None if unavailable."""
    try:  # optional: the comparison needs bitsandbytes and torch installed beside minilora
        bitsandbytes = importlib.import_module("bitsandbytes")
        F = importlib.import_module("bitsandbytes.functional")
        torch = importlib.import_module("torch")
    except Exception:
        return None
    t = torch.from_numpy(x_np)
    packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
    tq = _best_time(lambda: F.quantize_4bit(t, blocksize=64, quant_type="nf4"), repeats)
    td = _best_time(lambda: F.dequantize_4bit(packed, state), repeats)
    return tq, td, bitsandbytes.__version__


def bench_quant(n: int = 2 ** 22, repeats: int = 5, blocksize: int = 64, seed: int = 0) -> dict:
    """Time NF4 quantise + dequantise of ``n`` float32 values and a plain copy of them.

    Args:
        n: number of float32 elements (default 2**22 = 16 MiB).
        repeats: timed runs; the best is kept.
        blocksize: NF4 block size.
        seed: for the standard-normal input.
    Returns:
        dict with backend, n, seconds and GB/s for copy / quantise / dequantise / round trip,
        ``ratio`` (round-trip GB/s over copy GB/s), ``target_ratio`` (0.25), and ``bnb_*``
        entries when bitsandbytes is importable (else ``bnb_available: False``).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """
    np = backend.cpu_module()
    x_np = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    x = backend.asarray(x_np)
    out = xp.empty_like(x)
    gb = 4 * n / 1e9

    t_copy = _best_time(lambda: xp.copyto(out, x), repeats)
    packed, state = quantize_nf4(x, blocksize=blocksize)
    t_q = _best_time(lambda: quantize_nf4(x, blocksize=blocksize), repeats)
    t_d = _best_time(lambda: dequantize_nf4(packed, state), repeats)
    t_rt = t_q + t_d
    result = {
        "backend": backend.get_backend(), "n": n, "blocksize": blocksize, "repeats": repeats,
        "copy_s": t_copy, "quantize_s": t_q, "dequantize_s": t_d, "roundtrip_s": t_rt,
        "copy_gbps": gb / t_copy, "quantize_gbps": gb / t_q, "dequantize_gbps": gb / t_d,
        "roundtrip_gbps": gb / t_rt, "ratio": t_copy / t_rt, "target_ratio": 0.25,
    }
    bnb = _bnb_times(x_np, repeats) if backend.get_backend() == "numpy" else None
    result["bnb_available"] = bnb is not None
    if bnb is not None:
        bq, bd, version = bnb
        result.update({"bnb_version": version, "bnb_quantize_s": bq, "bnb_dequantize_s": bd,
                       "bnb_roundtrip_gbps": gb / (bq + bd),
                       "speed_vs_bnb": (bq + bd) / t_rt})
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2 ** 22)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--backend", choices=backend.BACKENDS, default=None)
    p.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = p.parse_args(argv)
    if args.backend:
        backend.set_backend(args.backend)
    r = bench_quant(args.n, args.repeats, args.blocksize)
    if args.json:
        print(json.dumps(r, indent=2))
        return r
    print(f"backend {r['backend']}, n = {r['n']:,} float32 ({4 * r['n'] / 2**20:.0f} MiB), "
          f"blocksize {r['blocksize']}, best of {r['repeats']}")
    rows = [("copy", r["copy_s"], r["copy_gbps"]), ("nf4 quantise", r["quantize_s"],
            r["quantize_gbps"]), ("nf4 dequantise", r["dequantize_s"], r["dequantize_gbps"]),
            ("nf4 round trip", r["roundtrip_s"], r["roundtrip_gbps"])]
    if r["bnb_available"]:
        rows.append((f"bnb {r['bnb_version']} round trip", r["bnb_quantize_s"]
                     + r["bnb_dequantize_s"], r["bnb_roundtrip_gbps"]))
    for name, s, g in rows:
        print(f"  {name:<26s} {1e3 * s:9.2f} ms {g:8.2f} GB/s")
    print(f"  ratio round trip / copy = {r['ratio']:.3f} (target >= {r['target_ratio']})")
    if r["bnb_available"]:
        print(f"  minilora is {r['speed_vs_bnb']:.2f}x bitsandbytes' CPU path")
    return r


if __name__ == "__main__":
    main()
