"""Time, memory and cache size of ``minilora svd``'s exact intruder count on a 7B-shaped base.

    python -m minilora.bench.svd_exact_scale [--layers 32] [--modules q,k,v,o,gate,up,down]
        [--d 4096] [--ff 14336] [--r 16] [--workers 0|2] [--cache DIR] [--json OUT]

A LLaMA/Mistral-7B-shaped model: per layer q, k, v, o (d × d) and gate, up (ff × d), down
(d × ff); 32 layers give 224 modules (128 of 4096 × 4096, 96 of 4096 × 14336 in one orientation
or the other). The adapter is a real PEFT directory (LoRA r = 16 on every module, written to a
temporary directory). The base is synthetic and never written: :class:`SyntheticBase` reads as a
:class:`~minilora.analysis.BaseWeights` whose tensor ``key`` is a Gaussian matrix (scale
1/sqrt(d_in)) drawn from a generator seeded by the key, so the same key gives the same matrix in
every process (a 7B base in bf16 would be 15.6 GB of disk; its SVD cache 28.7 GB in float64).

Two passes over the same modules through :func:`minilora.experiments.svd_report.run_analysis`
(exact intruders, k = 10, ε = 0.5):

1. **cold**: an empty cache directory: each base matrix's SVD is computed and stored;
2. **cached**: the same run again: every base SVD is read from the cache.

Reported per pass: wall time, seconds spent in base SVDs, the cache's size, the peak resident set
of this process and (Dask) of each worker (VmHWM), and the records of both passes compared (they
must be identical). ``--workers 0`` runs serially in this process; ``--workers N`` on a local Dask
cluster of N single-threaded workers.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

from minilora.analysis import BaseSvdCache, plan_base, write_safetensors
from minilora.bench.svd_scale import peak_rss_mib
from minilora.experiments.svd_report import AdapterInput, PeftBase, open_adapter, run_analysis

SHAPES = {"q": ("self_attn.q_proj", "d", "d"), "k": ("self_attn.k_proj", "d", "d"),
          "v": ("self_attn.v_proj", "d", "d"), "o": ("self_attn.o_proj", "d", "d"),
          "gate": ("mlp.gate_proj", "ff", "d"), "up": ("mlp.up_proj", "ff", "d"),
          "down": ("mlp.down_proj", "d", "ff")}


class SyntheticBase:
    """A base model's weights made on demand: ``model.layers.{i}.{proj}.weight`` (d_out, d_in),
    Gaussian with std 1/sqrt(d_in), seeded by the key (the same matrix in every process)."""

    def __init__(self, shapes: dict):
        self._shapes = dict(shapes)
        self.path = "synthetic-7b-base"

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def find(self, module: str) -> str:
        return f"{module}.weight"

    def read(self, key: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        d_out, d_in = self._shapes[key]
        return np.random.default_rng(seed).standard_normal((d_out, d_in)) / np.sqrt(d_in)


def build(tmp: str, layers: int, mods: list[str], d: int, ff: int, r: int):
    """(adapter directory, SyntheticBase): LoRA r on ``mods`` of ``layers`` layers."""
    rng = np.random.default_rng(0)
    tensors, shapes = {}, {}
    size = {"d": d, "ff": ff}
    for i in range(layers):
        for m in mods:
            proj, o, n = SHAPES[m]
            d_out, d_in = size[o], size[n]
            path = f"model.layers.{i}.{proj}"
            shapes[f"{path}.weight"] = (d_out, d_in)
            tensors[f"base_model.model.{path}.lora_A.weight"] = rng.uniform(
                -1 / np.sqrt(d_in), 1 / np.sqrt(d_in), (r, d_in)).astype(np.float32)
            tensors[f"base_model.model.{path}.lora_B.weight"] = (
                0.02 * rng.standard_normal((d_out, r))).astype(np.float32)
    ad = os.path.join(tmp, "adapter")
    os.makedirs(ad)
    write_safetensors(os.path.join(ad, "adapter_model.safetensors"), tensors, "F32",
                      metadata={"format": "pt"})
    with open(os.path.join(ad, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                   "target_modules": sorted({SHAPES[m][0].split(".")[-1] for m in mods})}, f)
    return ad, SyntheticBase(shapes)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
        out += kids
        todo += kids
    return out


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreePeak(threading.Thread):
    """The peak of the summed resident sets of this process and all its descendants (Dask's
    nannies and workers), sampled every 0.2 s (Linux /proc)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._halt = 0.0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self._halt.is_set():
            total = sum(_rss_mib(p) for p in [me, *_descendants(me)])
            self.peak = max(self.peak, total)
            self._halt.wait(0.2)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


def one_pass(adapter_dir, base, cache_dir, workers: int) -> dict:
    """Run the analysis once; wall time, SVD seconds, cache size, peak memory, records."""
    adapter = open_adapter(adapter_dir)
    inputs = [AdapterInput("adapter", adapter_dir, adapter, list(adapter.modules))]
    plan, _, problems = plan_base(adapter, base, inputs[0].names)
    if problems:
        raise SystemExit(f"synthetic base does not fit: {problems}")
    source = PeftBase(base, plan)
    watch = TreePeak()
    watch.start()
    t0 = time.perf_counter()
    run = run_analysis(inputs, source, cache_dir=cache_dir, serial=not workers,
                       workers=max(1, workers))
    wall = time.perf_counter() - t0
    tree = watch.stop()
    recs = run.adapters[0].records
    return {"seconds": wall, "modules": len(recs), "svd_seconds": run.cache["seconds_computing"],
            "svd_cpu_seconds": run.cache["cpu_seconds_computing"],
            "cpu_seconds": time.process_time(),
            "cache_hits": run.cache["hits"], "cache_misses": run.cache["misses"],
            "cache_bytes": BaseSvdCache(cache_dir).report()["bytes"],
            "peak_rss_tree_mib": tree, "peak_rss_main_mib": peak_rss_mib(),
            "module_seconds": run.module_seconds,
            "intruders": [r.intruder_count for r in recs],
            "methods": sorted({r.intruder_method for r in recs}),
            "sims": [r.intruder_similarities.tolist() for r in recs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--modules", default="q,k,v,o,gate,up,down")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--ff", type=int, default=14336)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="0: serial; N: local Dask workers")
    ap.add_argument("--cache", default=None, help="cache directory (default: a temporary one, "
                                                  "removed at the end)")
    ap.add_argument("--passes", default="cold,cached")
    ap.add_argument("--json", default=None, help="append the result as one JSON line here")
    args = ap.parse_args(argv)
    mods = [m.strip() for m in args.modules.split(",") if m.strip()]
    bad = [m for m in mods if m not in SHAPES]
    if bad:
        ap.error(f"--modules: unknown {bad}; choose from {', '.join(SHAPES)}")
    tmp = tempfile.mkdtemp(prefix="svd-exact-bench-")
    cache = args.cache or os.path.join(tmp, "cache")
    try:
        ad, base = build(tmp, args.layers, mods, args.d, args.ff, args.r)
        out = {"layers": args.layers, "modules": mods, "d": args.d, "ff": args.ff, "r": args.r,
               "workers": args.workers, "load": os.getloadavg()[0],
               "blas": os.environ.get("OPENBLAS_NUM_THREADS", "unset")}
        for name in args.passes.split(","):
            res = one_pass(ad, base, cache, args.workers)
            out[name] = res
            print(f"{name}: {res['modules']} modules in {res['seconds']:.1f} s "
                  f"({res['svd_seconds']:.1f} s in base SVDs, CPU {res['svd_cpu_seconds']:.1f} s, "
                  f"{res['cache_misses']} computed, "
                  f"{res['cache_hits']} read); cache {res['cache_bytes'] / 2 ** 30:.2f} GiB; "
                  f"peak RSS (all processes) {res['peak_rss_tree_mib']:.0f} MiB; methods {res['methods']}; "
                  f"intruders {sum(x or 0 for x in res['intruders'])}", flush=True)
        passes = [out[n] for n in args.passes.split(",")]
        if len(passes) > 1:
            out["identical"] = all(p["sims"] == passes[0]["sims"] and
                                   p["intruders"] == passes[0]["intruders"] for p in passes)
            print(f"records identical across passes: {out['identical']}")
        for p in passes:
            p.pop("sims")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(out) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
