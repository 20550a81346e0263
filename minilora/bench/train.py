"""(a)-(d): the training step vs PyTorch, FLOP/s against sgemm, and the peak memory of a step."""
from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minilora import backend
from minilora.bench.core import (
    BenchContext,
    Check,
    Section,
    _bar,
    _ours_stepper,
    _timed,
    _torch_stepper,
    bench_configs,
)
from minilora.bench.torch_reference import reference
from minilora.config import GPTConfig
from minilora.memory import (
    step_peak_bytes as _tracemalloc_step_peak,  # one implementation
)
from minilora.model import GPT


def measure_train_step(ctx: BenchContext) -> Section:
    """(a)-(c): our step, torch's step (explicit attention, and SDPA), interleaved; FLOP/s."""

    model = GPT(ctx.config, rng=0, dtype="float32")
    steppers = {}
    if ctx.torch is not None:  # copy the weights before our model takes a step
        steppers["torch"] = _torch_stepper(ctx, model, use_sdpa=False)[2]
        steppers["torch_sdpa"] = _torch_stepper(ctx, model, use_sdpa=True)[2]
    steppers = {"ours": _ours_stepper(ctx, model)[2], **steppers}
    names = list(steppers)
    for name in names:
        for _ in range(ctx.warmup):
            steppers[name]()
    times = {n: [] for n in names}
    first = {n: [] for n in names}  # the step right after a switch (and its pause)
    with _bar(ctx.steps, f"{ctx.name}: train step ({', '.join(names)})", ctx.progress) as bar:
        for r in range(ctx.steps):
            order = names if r % 2 == 0 else names[::-1]  # ABBA: neither always goes first
            for n in order:
                if len(names) > 1:
                    # the pause lets the other framework's spinning threads sleep; the step
                    # right after it is not a training loop's (on this 2-core VM our two
                    # threads' first step after 0.25 s idle took 25-30 ms longer, one thread's
                    # not), so it settles the framework in, untimed for the ratio, and the
                    # next step, back to back as in training, is the one timed
                    time.sleep(ctx.pause_s)
                    first[n].append(_timed(steppers[n]))
                times[n].append(_timed(steppers[n]))
            bar.update(1)
    med = {n: statistics.median(t) for n, t in times.items()}
    med_first = {n: statistics.median(t) for n, t in first.items() if t}
    flops = ctx.flops["total"]
    tokens = ctx.batch_size * ctx.config.block_size
    data = {"median_s": med, "min_s": {n: min(t) for n, t in times.items()},
            "times_s": times, "tokens_per_s": {n: tokens / s for n, s in med.items()},
            "first_after_switch_median_s": med_first,
            "flops_per_step": flops,
            "achieved_flops_per_s": {n: flops / s for n, s in med.items()}}
    data["flop_utilisation"] = data["achieved_flops_per_s"]["ours"] / ctx.peak_flops
    ratio = med["ours"] / med["torch"] if "torch" in med else None
    ratio_sdpa = med["ours"] / med["torch_sdpa"] if "torch_sdpa" in med else None
    data["ratio_ours_over_torch"] = ratio
    data["ratio_ours_over_torch_sdpa"] = ratio_sdpa

    rows = [("step time, ours", f"{med['ours'] * 1e3:.1f} ms", "")]
    checks = []
    if ratio is not None:
        rows += [("step time, torch (explicit attn)", f"{med['torch'] * 1e3:.1f} ms", ""),
                 ("step time, torch (SDPA, less work)", f"{med['torch_sdpa'] * 1e3:.1f} ms", "")]
        c = Check(ctx.name, "step time ours/torch", ratio, "<=", 1.0)
        checks.append(c)
        rows += [("ratio ours/torch", f"{ratio:.2f}", f"<= 1.0  {c.status()}"),
                 ("ratio ours/torch-SDPA (info)", f"{ratio_sdpa:.2f}", "")]
        if med_first:
            rows.append(("first step after a switch, ours / torch (info)",
                         f"{med_first['ours'] * 1e3:.1f} / {med_first['torch'] * 1e3:.1f} ms",
                         ""))
    else:
        rows.append(("ratio ours/torch", "skipped", ctx.torch_note))
    util = data["flop_utilisation"]
    rows.append(("matmul FLOP/s, ours", f"{data['achieved_flops_per_s']['ours'] / 1e9:.1f} G"
                 f" ({flops / 1e9:.2f} GFLOP/step)", ""))
    if ctx.flop_target is not None:
        c = Check(ctx.name, "ours FLOP/s / sgemm FLOP/s", util, ">=", ctx.flop_target)
        checks.append(c)
        rows.append(("FLOP/s ours / sgemm peak", f"{util:.2f}",
                     f">= {ctx.flop_target}  {c.status()}"))
    else:
        rows.append(("FLOP/s ours / sgemm peak", f"{util:.2f}", "(target applies at medium)"))
    return Section(data, rows, checks)


# -- memory ------------------------------------------------------------------------------------
def _rss_child_run(spec: dict) -> dict:
    """In a fresh process: build the model, warm the library, reset the high-water mark, take
    ``steps`` training steps; returns the resident-set growth.

    Counted (the same for both frameworks): gradients, AdamW moments (both create them lazily at
    the first step), activations kept for backward, temporaries, and allocator slack. Not
    counted: the interpreter, the libraries and the weights, which exist before the reset.
    """

    name, threads = spec["config"], spec["threads"]
    c = bench_configs()[name]
    ctx = BenchContext(name, GPTConfig(**c["model"]), c["batch_size"], None, 1, 0, threads, 1.0,
                       memory=False, progress=False)
    model = GPT(ctx.config, rng=0, dtype="float32")
    if spec["framework"] == "torch":
        torch = importlib.import_module("torch")
        torch.set_num_threads(threads)
        ctx.torch, ctx.torch_gpt = torch, reference(torch)
        _, _, step = _torch_stepper(ctx, model, use_sdpa=False)
        del model
        torch.mm(torch.ones(256, 256), torch.ones(256, 256))  # library start-up outside the count
    else:
        _, _, step = _ours_stepper(ctx, model)
        np.ones((256, 256), dtype=np.float32) @ np.ones((256, 256), dtype=np.float32)
    gc.collect()
    # Linux >= 4.0: writing "5" to clear_refs resets this process's high-water mark (VmHWM) to
    # its current RSS. We read VmHWM, not getrusage's ru_maxrss: the kernel keeps ru_maxrss across
    # execve, so a child forked from a big parent (one that imported torch) would report the
    # parent's peak. Without /proc, ru_maxrss is the fallback (and the delta then a lower bound).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base_kb = _proc_status_kb("VmRSS")
        reset = True
    except OSError:
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = False
    for _ in range(spec["steps"]):
        step()
    peak_kb = (_proc_status_kb("VmHWM") if reset
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux
    return {"baseline_kb": base_kb, "peak_kb": peak_kb,
            "delta_bytes": max(0, peak_kb - base_kb) * 1024,
            "method": "VmHWM after clear_refs reset" if reset else "ru_maxrss (no reset)"}


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _rss_child_main(spec_json: str) -> None:
    print("MINILORA_RSS " + json.dumps(_rss_child_run(json.loads(spec_json))))


def measure_rss_in_child(config_name: str, framework: str, threads: int, steps: int = 2) -> dict:
    """Run :func:`_rss_child_run` in a fresh Python with the BLAS/OpenMP threads set."""
    spec = {"config": config_name, "framework": framework, "threads": threads, "steps": steps}
    env = dict(os.environ)
    if framework == "torch":
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    else:  # the library's setting, as in the parent (minilora.threads)
        env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                    "MINILORA_THREADS": str(threads)})
    env["MINILORA_BACKEND"] = "numpy"
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the minilora package
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from minilora.bench.train import _rss_child_main; _rss_child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("MINILORA_RSS "):
            return json.loads(line[len("MINILORA_RSS "):])
    raise RuntimeError(f"memory child ({framework}, {config_name}) failed with status "
                       f"{proc.returncode}: {proc.stderr.strip()[-800:]}")


def measure_memory(ctx: BenchContext) -> Section:
    """(d): peak memory of a step, in-process (tracemalloc) and per fresh process (RSS)."""
    if not ctx.memory:
        return Section({"skipped": "memory measurement turned off"},
                       [("peak memory", "skipped", "")])
    if backend.is_cupy():
        return Section({"skipped": "memory is measured for the NumPy backend only"},
                       [("peak memory", "skipped", "NumPy backend only")])
    model, opt, step = _ours_stepper(ctx)
    step()  # steady state: AdamW moments exist, as in training
    data = {"tracemalloc_ours_bytes": _tracemalloc_step_peak(step),
            "optimizer_state_bytes": opt.state_bytes(),
            "weights_bytes": sum(int(p.nbytes) for _, p in model.named_parameters())}
    del model, opt, step
    rows = [("peak step memory, ours (tracemalloc)",
             f"{data['tracemalloc_ours_bytes'] / 2**20:.1f} MiB", "in-process, steady step")]
    if ctx.torch is not None:
        _, _, tstep = _torch_stepper(ctx, GPT(ctx.config, rng=0), use_sdpa=False)
        tstep()
        data["tracemalloc_torch_bytes_blind"] = _tracemalloc_step_peak(tstep)
        del tstep
        rows.append(("  torch (tracemalloc: blind)",
                     f"{data['tracemalloc_torch_bytes_blind'] / 2**20:.1f} MiB",
                     "not comparable"))
    ours = measure_rss_in_child(ctx.name, "numpy", ctx.threads)
    data["rss_ours"] = ours
    rows.append(("peak step memory, ours (RSS delta)", f"{ours['delta_bytes'] / 2**20:.1f} MiB",
                 "fresh process, 2 steps"))
    data["rss_torch"] = data["ratio_rss_ours_over_torch"] = None
    if ctx.torch is not None:
        theirs = measure_rss_in_child(ctx.name, "torch", ctx.threads)
        data["rss_torch"] = theirs
        rows.append(("peak step memory, torch (RSS delta)",
                     f"{theirs['delta_bytes'] / 2**20:.1f} MiB", "fresh process, 2 steps"))
        if theirs["delta_bytes"] > 0:
            data["ratio_rss_ours_over_torch"] = ours["delta_bytes"] / theirs["delta_bytes"]
            rows.append(("ratio ours/torch (RSS: the comparable one)",
                         f"{data['ratio_rss_ours_over_torch']:.2f}", "(no target)"))
    data["comparable"] = ("rss_*: the same instrument (resident-set high-water mark of a fresh "
                          "process) for both; tracemalloc sees NumPy's buffers but not torch's")
    return Section(data, rows, [])
