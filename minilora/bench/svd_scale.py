"""Time and peak memory of the adapter-only ΔW analysis of a LLaMA-7B-shaped PEFT adapter.

    OPENBLAS_NUM_THREADS=1 python -m minilora.bench.svd_scale [--layers 32] [--d 4096] [--r 16]
                                                            [--dtype F32|BF16] [--other] [--json]

A synthetic adapter with LoRA (r = 16) on q_proj, k_proj, v_proj and o_proj of 32 layers at
d = 4096 (LLaMA-7B's shapes: 128 modules, 16.8 M LoRA parameters, 67 MB in float32) is written
on the fly to a temporary directory as a real PEFT directory (``adapter_model.safetensors`` +
``adapter_config.json``, keys ``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.
lora_{A,B}.weight``). Then, in a fresh child process so that its memory figures are its own,
``minilora.analysis.analyze_adapter`` reads it module by module and computes every ΔW's spectrum
from its r × r core (no 4096 × 4096 matrix is ever formed). With ``--other`` a second adapter is
written and φ is computed for every module as well.

Reported: wall time of the analysis (best of ``--repeats``), tracemalloc's peak of Python/NumPy
allocations during one analysis, and the child's peak resident set (everything: interpreter,
NumPy, BLAS buffers). The peak RSS is VmHWM from /proc/self/status, the high-water mark of the
child's own address space: ru_maxrss would not do, because Linux carries the forking parent's
peak (here, the ~300 MiB spent writing the adapter) into the child's ru_maxrss across exec.
ru_maxrss is printed too where /proc is missing. Targets: < 60 s and < 1 GiB.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from minilora.analysis import analyze_adapter, write_safetensors

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapter(path, layers: int, d: int, r: int, dtype: str, seed: int) -> int:
    """A PEFT LoRA directory with random factors (PEFT's A init, B ~ N(0, 0.01²)); returns bytes."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for proj in PROJS:
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            bound = 1 / np.sqrt(d)
            tensors[f"{p}.lora_A.weight"] = rng.uniform(-bound, bound, (r, d)).astype(np.float32)
            tensors[f"{p}.lora_B.weight"] = (0.01 * rng.standard_normal((d, r))).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors, dtype,
                      metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": list(PROJS), "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "fan_in_fan_out": False, "lora_dropout": 0.0}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return os.path.getsize(os.path.join(path, "adapter_model.safetensors"))


def measure(path: str, other: str | None, repeats: int) -> dict:
    """Run in the child: time the analysis, then its tracemalloc peak, then ru_maxrss."""
    best, n_modules = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        recs = analyze_adapter(path, other=other)
        best = min(best, time.perf_counter() - t0)
        n_modules = len(recs)
    tracemalloc.start()
    analyze_adapter(path, other=other)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"modules": n_modules, "seconds": best, "tracemalloc_peak_mib": peak / 2 ** 20,
            "peak_rss_mib": peak_rss_mib(), "top_sv_first_module": float(recs[0].singular_values[0])}


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: VmHWM (Linux), else ru_maxrss (see the docstring)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024          # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024   # bytes on macOS, KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", choices=["F32", "BF16"], default="F32")
    ap.add_argument("--other", action="store_true", help="also compute φ against a 2nd adapter")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)   # internal: measure in a child
    args = ap.parse_args(argv)
    if args.child:
        other = args.child[1] if len(args.child) > 1 else None
        print(json.dumps(measure(args.child[0], other, args.repeats)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        size = write_adapter(os.path.join(tmp, "a"), args.layers, args.d, args.r, args.dtype, 0)
        dirs = [os.path.join(tmp, "a")]
        if args.other:
            write_adapter(os.path.join(tmp, "b"), args.layers, args.d, args.r, args.dtype, 1)
            dirs.append(os.path.join(tmp, "b"))
        write_s = time.perf_counter() - t0
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--repeats",
                              str(args.repeats), "--child", *dirs],
                             check=True, capture_output=True, text=True)
    res = json.loads(out.stdout)
    res.update(layers=args.layers, d=args.d, r=args.r, dtype=args.dtype, other=args.other,
               adapter_mib=size / 2 ** 20, write_seconds=write_s,
               blas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
               target_met=res["seconds"] < 60 and res["peak_rss_mib"] < 1024)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"adapter: {res['modules']} modules (r={args.r}, d={args.d}, {args.dtype}), "
              f"{res['adapter_mib']:.1f} MiB on disk{' + a second one for φ' if args.other else ''}")
        print(f"analysis: {res['seconds']:.2f} s, tracemalloc peak {res['tracemalloc_peak_mib']:.1f} "
              f"MiB, peak RSS {res['peak_rss_mib']:.0f} MiB (targets: < 60 s, < 1024 MiB: "
              f"{'met' if res['target_met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
