"""Speed and memory benchmarks, measured side by side in one run and printed as ratios.

::

    minilora bench --configs small,medium --steps 10 --threads 2 --out results/bench.json
    result = run_bench(configs=["small"], steps=10, threads=2, torch_compare=True, out=None)

For each configuration (``small``: T 128, 4 layers, C 128, 4 heads, B 16; ``medium``: T 256,
6 layers, C 256, 8 heads, B 8; float32, AdamW, full context ``T = block_size``):

(a) **step time**: one full training step of ours (forward, fused cross-entropy, backward, global
    norm clipping at 1.0, AdamW), median over ``steps`` timed steps after ``warmup`` untimed ones;
(b) **vs PyTorch**: the same step in PyTorch (``benchmarks/torch_gpt.py``, same weights, explicit
    attention; and separately with ``scaled_dot_product_attention``), timed *interleaved* with ours
    (order alternating each round, a short pause at every switch so one library's idle-spinning
    worker threads do not steal the cores from the other); ratio ours/torch, target <= 1.0;
(c) **FLOP/s**: the analytic matmul FLOPs of a step (:func:`train_step_flops`) over our step time,
    against this machine's float32 matmul rate (best of a few large square sgemm, same threads);
    target >= 0.6 at ``medium``;
(d) **peak memory of a step**: in-process with ``tracemalloc`` (NumPy reports its buffers to it;
    PyTorch's CPU allocator does not, so tracemalloc is blind to torch, and torch has no CPU
    allocator statistics), and, the comparable figure, the growth of the resident-set high-water
    mark over two steps in a fresh child process per framework (see :func:`_rss_child_run`).

Threads: PyTorch takes ``torch.set_num_threads(threads)``. NumPy's BLAS reads its thread count
when it is loaded; with ``threadpoolctl`` installed we set it to ``threads`` at run time, without
it the count is whatever ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` said at start-up (else all
cores): set them before starting Python, e.g. ``OPENBLAS_NUM_THREADS=2 minilora bench``. The
memory child processes always get them set.

PyTorch is optional and never imported at module level: it is loaded inside
:func:`_import_torch` and the comparison is skipped, with a note, when it is absent.

Adding a measurement (later chapters: LoRA step vs full fine-tuning step, merged vs base
inference, QLoRA): write ``def measure_x(ctx: BenchContext) -> Section`` and append
``("x", measure_x)`` to :data:`MEASUREMENTS`; its data lands in the JSON under the config, its
rows in the printed table, its :class:`Check` objects in the targets summary.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from minilora import backend
from minilora.config import GPTConfig
from minilora.memory import step_peak_bytes as _tracemalloc_step_peak  # one implementation

np = backend.cpu_module()  # CPU-side work only (batches, sgemm inputs); the model runs on xp

TORCH_GPT_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_gpt.py"
LR = 1e-3
GRAD_CLIP = 1.0
SWITCH_PAUSE_S = 0.25  # > OpenBLAS idle-spin (~2^28 cycles) and libgomp spin: pools sleep first


def bench_configs() -> dict:
    """Name -> ``{"model": GPTConfig kwargs, "batch_size": B, "flop_target": ratio or None}``.

    ``small`` and ``medium`` are the CLI presets of the same name; ``micro`` is for tests.
    """
    from minilora.cli import PRESETS

    out = {"micro": {"model": dict(block_size=16, n_layer=1, n_head=2, n_embd=16),
                     "batch_size": 2, "flop_target": None}}
    for name, target in (("small", None), ("medium", 0.6)):
        p = PRESETS[name]
        out[name] = {"model": dict(p["model"]), "batch_size": p["train"]["batch_size"],
                     "flop_target": target}
    return out


# ----------------------------------------------------------------------------------------------
# FLOP count
# ----------------------------------------------------------------------------------------------
def train_step_flops(config: GPTConfig, batch_size: int, seq_len: int | None = None) -> dict:
    """Matmul FLOPs of one training step (multiply and add counted as 2).

    With N = B T tokens, L layers, width C, V vocabulary, NH heads of size hs (NH hs = C)::

        a linear d_in -> d_out:        2 N d_in d_out
        per block, q, k, v, o (C -> C): 4 * 2 N C^2        up (C -> 4C), down (4C -> C): 16 N C^2
        per block, attention:          2 B NH T T hs (q k^T) + 2 B NH T T hs (att v) = 4 B T^2 C
        lm_head (C -> V):              2 N C V
        forward  F = L (24 N C^2 + 4 B T^2 C) + 2 N C V
        backward = 2 F   (each linear: dx = dout W and dW = dout^T x, both the size of its
                          forward; attention: d(att), dv, dq, dk, four of the same size)
        step     = 3 F

    The attention terms count the full T x T square: causal masking does not halve the work of
    an explicit implementation (ours, or torch without SDPA). Not counted: element-wise work
    (LayerNorm, softmax, GELU, cross-entropy, AdamW), the embedding lookups, and our embedding
    gradient's one-hot matmul (an implementation choice; torch scatters).
    """
    B, T = batch_size, seq_len or config.block_size
    N, C, L, V = B * T, config.n_embd, config.n_layer, config.vocab_size
    linears = 24 * N * C * C
    attention = 4 * B * T * T * C
    head = 2 * N * C * V
    fwd = L * (linears + attention) + head
    return {"forward": fwd, "backward": 2 * fwd, "total": 3 * fwd,
            "forward_linears": L * linears + head, "forward_attention": L * attention}


# ----------------------------------------------------------------------------------------------
# threads, machine, optional torch
# ----------------------------------------------------------------------------------------------
def _import_torch():
    """(torch, torch_gpt module) or (None, reason). torch is imported only here."""
    try:
        torch = importlib.import_module("torch")
    except Exception as e:  # ImportError, or a broken install raising at import
        return None, (f"PyTorch is not installed ({type(e).__name__}); "
                      "`pip install torch` to compare")
    if not TORCH_GPT_PATH.exists():
        return None, f"{TORCH_GPT_PATH} is missing (run from a source checkout to compare)"
    return torch, _load_torch_gpt()


def _load_torch_gpt(path=TORCH_GPT_PATH):
    spec = importlib.util.spec_from_file_location("minilora_bench_torch_gpt", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def blas_threads(threads: int):
    """Limit NumPy's BLAS to ``threads`` inside the block when threadpoolctl is installed.

    Yields a description of what is in force.
    """
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        yield {"control": "environment (threadpoolctl not installed)",
               "setting": _threads_env(), "blas_threads": _env_threads()}
        return
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        info = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
        yield {"control": "threadpoolctl", "setting": _threads_env(),
               "blas_threads": threads,
               "libraries": [f"{d.get('internal_api')} {d.get('version')}: "
                             f"{d.get('num_threads')} threads" for d in info]}


def _threads_env() -> str:
    from minilora.train import threads_hint
    return threads_hint()


def _env_threads():
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(k, "").strip().isdigit():
            return int(os.environ[k])
    return None  # OpenBLAS default: all cores


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numpy_blas() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy: no dict mode
        return "unknown"


def machine_info(torch=None) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "python": platform.python_version(), "numpy": np.__version__,
            "numpy_blas": _numpy_blas(), "backend": backend.get_backend(), "torch": None}
    if torch is not None:
        cfg = torch.__config__.show()
        m = re.search(r"BLAS_INFO=(\w+)", cfg)
        info["torch"] = torch.__version__
        info["torch_blas"] = m.group(1) if m else "unknown"
    return info


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------
def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    backend.synchronize()
    return time.perf_counter() - t0


def measure_sgemm(threads: int, sizes=(1024, 1536, 2048), reps: int = 3, torch=None) -> dict:
    """This machine's float32 matmul rate: median of ``reps`` n x n sgemm per size, best size.

    2 n^3 FLOPs per product. Run under the same BLAS thread setting as the model steps.
    """
    rng = np.random.default_rng(0)
    out = {"sizes": list(sizes), "numpy_flops_per_s": {}, "torch_flops_per_s": {}}
    xp = backend.xp
    for n in sizes:
        a = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
        b = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
        xp.matmul(a, b)  # warm: thread pool, buffers
        t = statistics.median(_timed(lambda: xp.matmul(a, b)) for _ in range(reps))
        out["numpy_flops_per_s"][str(n)] = 2 * n ** 3 / t
        if torch is not None:
            ta, tb = torch.from_numpy(backend.to_numpy(a)), torch.from_numpy(backend.to_numpy(b))
            torch.mm(ta, tb)
            t = statistics.median(_timed(lambda: torch.mm(ta, tb)) for _ in range(reps))
            out["torch_flops_per_s"][str(n)] = 2 * n ** 3 / t
    out["peak_flops_per_s"] = max(out["numpy_flops_per_s"].values())
    if out["torch_flops_per_s"]:
        out["torch_peak_flops_per_s"] = max(out["torch_flops_per_s"].values())
    return out


# ----------------------------------------------------------------------------------------------
# the measurement registry
# ----------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One figure against its target, e.g. ``ours/torch step time <= 1.0``."""

    config: str
    metric: str
    value: float | None  # None: not measured (e.g. torch absent)
    op: str  # "<=" or ">="
    target: float

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def status(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]

    def to_dict(self) -> dict:
        return {"config": self.config, "metric": self.metric, "value": self.value,
                "op": self.op, "target": self.target, "met": self.met}


@dataclass
class Section:
    """What a measurement returns: JSON data, printed rows (metric, value, target), checks."""

    data: dict
    rows: list = field(default_factory=list)
    checks: list = field(default_factory=list)


@dataclass
class BenchContext:
    """Everything a measurement needs for one configuration."""

    name: str
    config: GPTConfig
    batch_size: int
    flop_target: float | None
    steps: int
    warmup: int
    threads: int
    peak_flops: float
    torch: object = None  # the torch module, or None
    torch_gpt: object = None  # benchmarks/torch_gpt.py as a module, or None
    torch_note: str = ""
    memory: bool = True
    progress: bool = True
    pause_s: float = SWITCH_PAUSE_S

    @property
    def flops(self) -> dict:
        return train_step_flops(self.config, self.batch_size)

    def batches(self, n: int = 4, seed: int = 0):
        """``n`` fixed (x, y) int64 batches of shape (B, T), NumPy, the same for every framework."""
        rng = np.random.default_rng(seed)
        B, T, V = self.batch_size, self.config.block_size, self.config.vocab_size
        return [(rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T)))
                for _ in range(n)]


def _ours_stepper(ctx: BenchContext, model=None):
    """(model, step function) for our full training step on the fixed batches."""
    from minilora.model import GPT
    from minilora.optim import AdamW

    if model is None:
        model = GPT(ctx.config, rng=0, dtype="float32")
    opt = AdamW(model, lr=LR, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    data = [(backend.asarray(x), backend.asarray(y)) for x, y in ctx.batches()]
    i = [0]

    def step():
        x, y = data[i[0] % len(data)]
        i[0] += 1
        model.forward_backward(x, y)
        opt.step(LR, grad_clip=GRAD_CLIP)

    return model, opt, step


def _torch_stepper(ctx: BenchContext, model, use_sdpa: bool):
    torch, tg = ctx.torch, ctx.torch_gpt
    tmodel = tg.from_minilora(model, use_sdpa=use_sdpa)
    topt = tg.make_optimizer(tmodel, lr=LR)
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in ctx.batches()]
    i = [0]

    def step():
        x, y = data[i[0] % len(data)]
        i[0] += 1
        tg.train_step(tmodel, topt, x, y, grad_clip=GRAD_CLIP)

    return tmodel, topt, step


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="round", leave=False, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def measure_train_step(ctx: BenchContext) -> Section:
    """(a)-(c): our step, torch's step (explicit attention, and SDPA), interleaved; FLOP/s."""
    from minilora.model import GPT

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
    with _bar(ctx.steps, f"{ctx.name}: train step ({', '.join(names)})", ctx.progress) as bar:
        for r in range(ctx.steps):
            order = names if r % 2 == 0 else names[::-1]  # ABBA: neither always goes first
            for n in order:
                if len(names) > 1:
                    time.sleep(ctx.pause_s)
                times[n].append(_timed(steppers[n]))
            bar.update(1)
    med = {n: statistics.median(t) for n, t in times.items()}
    flops = ctx.flops["total"]
    tokens = ctx.batch_size * ctx.config.block_size
    data = {"median_s": med, "min_s": {n: min(t) for n, t in times.items()},
            "times_s": times, "tokens_per_s": {n: tokens / s for n, s in med.items()},
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
    from minilora.model import GPT

    name, threads = spec["config"], spec["threads"]
    c = bench_configs()[name]
    ctx = BenchContext(name, GPTConfig(**c["model"]), c["batch_size"], None, 1, 0, threads, 1.0,
                       memory=False, progress=False)
    model = GPT(ctx.config, rng=0, dtype="float32")
    if spec["framework"] == "torch":
        torch = importlib.import_module("torch")
        torch.set_num_threads(threads)
        ctx.torch, ctx.torch_gpt = torch, _load_torch_gpt(Path(spec["torch_gpt"]))
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
    spec = {"config": config_name, "framework": framework, "threads": threads, "steps": steps,
            "torch_gpt": str(TORCH_GPT_PATH)}
    env = dict(os.environ)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    env["MINILORA_BACKEND"] = "numpy"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from minilora.bench import _rss_child_main; _rss_child_main(sys.argv[1])"
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
        from minilora.model import GPT
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


def _interleaved(fns: dict, steps: int, warmup: int) -> dict:
    """Median seconds of each ``fn()``, run round-robin with the order flipped every round."""
    names = list(fns)
    for n in names:
        for _ in range(warmup):
            fns[n]()
    times = {n: [] for n in names}
    for r in range(steps):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(_timed(fns[n]))
    return {n: statistics.median(t) for n, t in times.items()}


def measure_lora(ctx: BenchContext) -> Section:
    """LoRA (r=8 on q, v) training step vs full fine-tuning step, and inference with the adapter
    merged / unmerged vs the plain base model (all interleaved in one run).

    Targets (the LoRA issue): step ratio <= 0.70 (ideal ~2/3: the frozen weights' dW GEMMs,
    a third of the matmul work, are skipped); merged inference / base <= 1.02 (the same
    computation); unmerged <= 1.15 (two thin extra GEMMs per adapted layer).
    """
    from minilora.config import LoraConfig
    from minilora.lora import inject_lora, lora_layers, merge_lora
    from minilora.model import GPT

    _, _, full_step = _ours_stepper(ctx, GPT(ctx.config, rng=0, dtype="float32"))
    lora_model = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(lora_model, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
    _, _, lora_step = _ours_stepper(ctx, lora_model)
    steps = _interleaved({"full": full_step, "lora": lora_step}, ctx.steps, ctx.warmup)

    base = GPT(ctx.config, rng=0, dtype="float32")
    unmerged = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(unmerged, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
    merged = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(merged, LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v")))
    merge_lora(merged)
    assert all(m.merged for m in lora_layers(merged).values())
    x = backend.asarray(ctx.batches(1)[0][0])
    infer = _interleaved({"base": lambda: base.forward(x, check=False),
                          "merged": lambda: merged.forward(x, check=False),
                          "unmerged": lambda: unmerged.forward(x, check=False)},
                         ctx.steps, ctx.warmup)
    mem = None
    if ctx.memory and not backend.is_cupy():
        from minilora.memory import memory_account
        xb, yb = ctx.batches(1)[0]
        mem = {"full": memory_account(GPT(ctx.config, rng=0, dtype="float32"), xb, yb),
               "lora": memory_account(lora_model, xb, yb)}
    r_step = steps["lora"] / steps["full"]
    r_merged = infer["merged"] / infer["base"]
    r_unmerged = infer["unmerged"] / infer["base"]
    checks = [Check(ctx.name, "LoRA step / full FT step", r_step, "<=", 0.70),
              Check(ctx.name, "merged inference / base", r_merged, "<=", 1.02),
              Check(ctx.name, "unmerged inference / base", r_unmerged, "<=", 1.15)]
    rows = [("LoRA r=8 q,v step / full FT step",
             f"{steps['lora'] * 1e3:.1f} / {steps['full'] * 1e3:.1f} ms = {r_step:.2f}",
             f"<= 0.70  {checks[0].status()}"),
            ("merged LoRA inference / base", f"{r_merged:.3f}", f"<= 1.02  {checks[1].status()}"),
            ("unmerged LoRA inference / base", f"{r_unmerged:.3f}", f"<= 1.15  {checks[2].status()}")]
    data = {"step_median_s": steps, "inference_median_s": infer, "ratio_lora_over_full": r_step,
            "ratio_merged_over_base": r_merged, "ratio_unmerged_over_base": r_unmerged,
            "memory": mem}
    if mem is not None:
        # peak = weights + AdamW state + what one steady step allocates (gradients, activations)
        r_mem = mem["lora"]["measured_total"] / mem["full"]["measured_total"]
        data["ratio_peak_memory_lora_over_full"] = r_mem
        checks.append(Check(ctx.name, "LoRA peak memory / full FT peak memory", r_mem, "<=", 0.5))
        mib = 2.0 ** 20
        rows.append(("LoRA peak memory / full FT (tracemalloc)",
                     f"{mem['lora']['measured_total'] / mib:.1f} / "
                     f"{mem['full']['measured_total'] / mib:.1f} MiB = {r_mem:.2f}",
                     f"<= 0.5  {checks[-1].status()}"))
        rows.append(("  of which activations, LoRA / full",
                     f"{mem['lora']['activations'] / mib:.1f} / "
                     f"{mem['full']['activations'] / mib:.1f} MiB", "counted from the caches"))
    return Section(data, rows, checks)


def measure_multi_adapter(ctx: BenchContext) -> Section:
    """Many adapters on one base (:mod:`minilora.multi_adapter`; 4 adapters, r=8 on q, v).

    (a) **switch time / base checkpoint reload time**: switching the active adapter unmerged
        (re-pointing lora_A / lora_B: no arithmetic) and merged (W0 -= ΔW_old; W0 += ΔW_new), each
        against reloading the base checkpoint from disk (``load_checkpoint``; the file is in the
        page cache, the kindest case for the reload). Target <= 0.05 (the LoRA issue). Also
        reported, without a target: the bare tensor read (``load_arrays``), since most of
        ``load_checkpoint``'s time is ``GPT.__init__`` drawing the random weights it overwrites.
    (b) **mixed-adapter batch throughput / one merged adapter**: the same (B, T) batch, rows
        assigned round robin to the 4 adapters (sorted segments, two thin GEMMs per adapter and
        layer), against the model with one adapter merged (the base's cost). Interleaved.
        Target >= 0.8.
    """
    import tempfile

    from minilora.checkpoint import load_arrays, load_checkpoint, save_checkpoint
    from minilora.config import LoraConfig
    from minilora.data import CharTokenizer
    from minilora.lora import inject_lora, lora_state_dict, merge_lora
    from minilora.model import GPT
    from minilora.multi_adapter import AdapterRegistry

    n_adapters, switches = 4, 50
    reg, merged_reg = (AdapterRegistry(GPT(ctx.config, rng=0, dtype="float32")) for _ in "ab")
    single = GPT(ctx.config, rng=0, dtype="float32")
    for i in range(n_adapters):
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"), init_lora_weights=False,
                         seed=i)
        m = GPT(ctx.config, rng=0, dtype="float32")
        inject_lora(m, cfg)
        arrays = {k: backend.to_numpy(v) for k, v in lora_state_dict(m).items()}
        reg.add(f"a{i}", arrays, cfg)
        merged_reg.add(f"a{i}", arrays, cfg)
        if i == 0:
            inject_lora(single, cfg)
            for name, p in lora_state_dict(single).items():
                p[...] = backend.asarray(arrays[name])
            merge_lora(single, safe_merge=True)
    names = reg.names
    k = [0]

    def switch(registry, merge):
        def run():  # `switches` switches per call, cycling through the adapters
            for _ in range(switches):
                k[0] += 1
                registry.set_adapter(names[k[0] % n_adapters], merge=merge)
            backend.synchronize()
        return run

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.safetensors"
        save_checkpoint(path, GPT(ctx.config, rng=0, dtype="float32"), CharTokenizer.default())
        times = _interleaved({"reload": lambda: load_checkpoint(path),
                              "read": lambda: load_arrays(path),
                              "unmerged": switch(reg, False), "merged": switch(merged_reg, True)},
                             ctx.steps, 1)
    reload_s = times["reload"]
    unmerged_s, merged_s = times["unmerged"] / switches, times["merged"] / switches
    reg.disable_adapters()
    x = backend.asarray(ctx.batches(1)[0][0])
    ids = [names[b % n_adapters] for b in range(x.shape[0])]

    def mixed():
        reg.forward(x, ids, check=False)
        backend.synchronize()

    def one_merged():
        single.forward(x, check=False)
        backend.synchronize()
    infer = _interleaved({"merged_single": one_merged, "mixed": mixed}, ctx.steps, ctx.warmup)
    r_unmerged, r_merged = unmerged_s / reload_s, merged_s / reload_s
    r_tput = infer["merged_single"] / infer["mixed"]  # throughput ratio = inverse time ratio
    checks = [Check(ctx.name, "unmerged adapter switch / base reload", r_unmerged, "<=", 0.05),
              Check(ctx.name, "merged adapter switch / base reload", r_merged, "<=", 0.05),
              Check(ctx.name, f"mixed {n_adapters}-adapter batch / merged throughput", r_tput,
                    ">=", 0.8)]
    rows = [("base checkpoint reload", f"{reload_s * 1e3:.2f} ms", "load_checkpoint, page cache"),
            ("  of which the bare tensor read (load_arrays)", f"{times['read'] * 1e3:.2f} ms",
             f"merged switch / read = {merged_s / times['read']:.2f} (no target)"),
            ("adapter switch, unmerged (pointers)",
             f"{unmerged_s * 1e6:.1f} us = {r_unmerged:.4f}", f"<= 0.05  {checks[0].status()}"),
            ("adapter switch, merged (unmerge + merge)",
             f"{merged_s * 1e3:.3f} ms = {r_merged:.3f}", f"<= 0.05  {checks[1].status()}"),
            (f"mixed {n_adapters}-adapter batch / 1 merged (throughput)",
             f"{infer['mixed'] * 1e3:.1f} vs {infer['merged_single'] * 1e3:.1f} ms = "
             f"{r_tput:.2f}", f">= 0.8  {checks[2].status()}")]
    data = {"n_adapters": n_adapters, "reload_median_s": reload_s, "read_median_s": times["read"],
            "switch_unmerged_s": unmerged_s, "switch_merged_s": merged_s,
            "ratio_switch_unmerged_over_reload": r_unmerged,
            "ratio_switch_merged_over_reload": r_merged, "inference_median_s": infer,
            "ratio_mixed_over_merged_throughput": r_tput}
    return Section(data, rows, checks)


def measure_peft_latency(ctx: BenchContext) -> Section:
    """Inference latency / base of Houlsby adapters (bottleneck 16 after attn.o and mlp.down,
    unmergeable), LoRA r=8 on q, v unmerged, and LoRA merged, at batch 1 and at the config's
    batch (full context T), all interleaved with the base: the LoRA paper's Table 1 (adapters add
    sequential depth, which shows most at small batch). No target: the figures are reported.
    Batch 1 is cheap and noisy, so it takes 3x the timed forwards. An identical copy of the base
    runs in the same rotation: its ratio is the noise floor of the figures. Every model's arrays
    are re-allocated after all are built (a model's speed was seen to depend on when its arrays
    were allocated: the first-built one ran ~10% slower than an identical later one).
    """
    from minilora.config import LoraConfig
    from minilora.lora import inject_lora, merge_lora
    from minilora.model import GPT
    from minilora.peft_methods import AdapterConfig, inject_adapters

    lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    models = {"base": GPT(ctx.config, rng=0, dtype="float32")}
    models["adapter"] = GPT(ctx.config, rng=0, dtype="float32")
    inject_adapters(models["adapter"], AdapterConfig(bottleneck=16, zero_up=False))
    models["lora_unmerged"] = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(models["lora_unmerged"], lora_cfg)
    models["lora_merged"] = GPT(ctx.config, rng=0, dtype="float32")
    inject_lora(models["lora_merged"], lora_cfg)
    merge_lora(models["lora_merged"])
    models["base_copy"] = GPT(ctx.config, rng=0, dtype="float32")
    for m in models.values():
        m.astype("float32")  # fresh copies of every array, allocated together
    x_full = ctx.batches(1)[0][0]  # (B, T)
    data, rows = {}, []
    for label, B, steps in (("batch 1", 1, 3 * ctx.steps), (f"batch {ctx.batch_size}",
                                                            ctx.batch_size, ctx.steps)):
        x = backend.asarray(x_full[:B])
        fns = {name: (lambda m=m: m.forward(x, check=False)) for name, m in models.items()}
        t = _interleaved(fns, steps, ctx.warmup)
        ratios = {name: t[name] / t["base"] for name in models if name != "base"}
        data[f"B{B}"] = {"median_s": t, "ratio_over_base": ratios,
                         "tokens": B * ctx.config.block_size}
        rows.append((f"inference {label} x T {ctx.config.block_size}: base",
                     f"{t['base'] * 1e3:.2f} ms", ""))
        for name, what in (("base_copy", "identical base copy (noise floor)"),
                           ("adapter", "Houlsby m=16 (2 per block)"),
                           ("lora_unmerged", "LoRA r=8 q,v unmerged"),
                           ("lora_merged", "LoRA r=8 q,v merged")):
            rows.append((f"  {what} / base", f"{ratios[name]:.3f}",
                         "LoRA paper Table 1 (GPU, B=1): Adapter^H +30%" if
                         (name == "adapter" and B == 1) else ""))
    data["adapter_params"] = models["adapter"].num_parameters(trainable_only=True)
    data["lora_params"] = models["lora_unmerged"].num_parameters(trainable_only=True)
    return Section(data, rows, [])


def measure_qlora(ctx: BenchContext) -> Section:
    """QLoRA (NF4 + double-quantised base, LoRA r=8 on q, v) training step vs the same LoRA on
    the float32 base: step time (interleaved) and peak memory.

    Peak memory is :func:`minilora.memory.memory_account`'s measured total: weights at rest
    (QLoRA's 4-bit layers count their codes and scales), AdamW moments, and the tracemalloc peak
    of one steady step (gradients, activations, temporaries, including QLoRA's transient
    dequantised matrices). Targets (ours, from the cost model): step ratio <= 1.10 (dequantising
    a (d_out, d_in) matrix is O(d_out d_in) against the O(B T d_out d_in) matmul it feeds, twice
    per step); peak-memory ratio <= 1.0. Timed for information: QLoRA with ``keep_dequantized``
    (float copies held, no per-call dequantisation).
    """
    from minilora.config import LoraConfig, QuantConfig
    from minilora.lora import inject_lora
    from minilora.memory import memory_account
    from minilora.model import GPT
    from minilora.qlora import inject_qlora

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    models = {n: GPT(ctx.config, rng=0, dtype="float32") for n in ("lora", "qlora", "qlora_kept")}
    inject_lora(models["lora"], cfg)
    inject_qlora(models["qlora"], cfg, QuantConfig())
    inject_qlora(models["qlora_kept"], cfg, QuantConfig(keep_dequantized=True))
    med = _interleaved({n: _ours_stepper(ctx, m)[2] for n, m in models.items()}, ctx.steps,
                       ctx.warmup)
    r_step = med["qlora"] / med["lora"]
    r_kept = med["qlora_kept"] / med["lora"]
    checks = [Check(ctx.name, "QLoRA step / LoRA step", r_step, "<=", 1.10)]
    rows = [("QLoRA (NF4+DQ) r=8 q,v step / LoRA step",
             f"{med['qlora'] * 1e3:.1f} / {med['lora'] * 1e3:.1f} ms = {r_step:.2f}",
             f"<= 1.10  {checks[0].status()}"),
            ("QLoRA with dequantised copies kept / LoRA (info)", f"{r_kept:.2f}", "")]
    data = {"step_median_s": med, "ratio_step_qlora_over_lora": r_step,
            "ratio_step_qlora_kept_over_lora": r_kept, "memory": None}
    if ctx.memory and not backend.is_cupy():
        xb, yb = ctx.batches(1)[0]
        mem = {n: memory_account(models[n], xb, yb) for n in ("lora", "qlora")}
        r_mem = mem["qlora"]["measured_total"] / mem["lora"]["measured_total"]
        r_w = mem["qlora"]["weights"] / mem["lora"]["weights"]
        r_act = mem["qlora"]["measured_step_peak"] / mem["lora"]["measured_step_peak"]
        checks.append(Check(ctx.name, "QLoRA peak memory / LoRA peak memory", r_mem, "<=", 1.0))
        mib = 2.0 ** -20
        rows += [("QLoRA / LoRA peak memory (weights + AdamW + step)",
                  f"{mem['qlora']['measured_total'] * mib:.1f} / "
                  f"{mem['lora']['measured_total'] * mib:.1f} MiB = {r_mem:.2f}",
                  f"<= 1.0  {checks[1].status()}"),
                 ("  weights at rest, QLoRA / LoRA",
                  f"{mem['qlora']['weights'] * mib:.1f} / {mem['lora']['weights'] * mib:.1f} MiB"
                  f" = {r_w:.2f}", ""),
                 ("  step peak (tracemalloc), QLoRA / LoRA", f"{r_act:.2f}", "")]
        data.update(memory=mem, ratio_peak_memory_qlora_over_lora=r_mem,
                    ratio_weights_qlora_over_lora=r_w, ratio_step_peak_qlora_over_lora=r_act)
    return Section(data, rows, checks)


Measurement = Callable[[BenchContext], Section]

#: The measurements run for every configuration, in order. Later sections append theirs,
#: e.g. ("lora_step", measure_lora_step), ("merged_inference", ...), ("qlora_step", ...).
MEASUREMENTS: list[tuple[str, Measurement]] = [
    ("train_step", measure_train_step),
    ("memory", measure_memory),
    ("lora", measure_lora),
    ("multi_adapter", measure_multi_adapter),  # adapter switch time, mixed-adapter batches
    ("peft_latency", measure_peft_latency),  # Houlsby adapters vs LoRA at inference
    ("qlora", measure_qlora),  # 4-bit base + LoRA vs LoRA: step time, peak memory
]


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------
def _format_table(rows) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"  {a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)


def run_bench(configs, steps: int = 10, threads: int = 2, torch_compare: bool = True, out=None,
              *, warmup: int = 2, memory: bool = True, progress: bool = True,
              sgemm_sizes=(1024, 1536, 2048), pause_s: float = SWITCH_PAUSE_S,
              print_fn=print, only=None) -> dict:
    """Run every measurement of :data:`MEASUREMENTS` for each named config; print and return.

    Args:
        configs: names from :func:`bench_configs` ("small", "medium"; "micro" for tests).
        steps: timed steps per framework (median reported), after ``warmup`` untimed ones.
        threads: BLAS threads (via threadpoolctl if installed) and ``torch.set_num_threads``.
        torch_compare: also time PyTorch (skipped with a note if it cannot be imported).
        out: optional path; the results are written there as JSON (atomically).
        memory, progress, sgemm_sizes, pause_s: for tests and quick runs.
        only: names from :data:`MEASUREMENTS` to run (default: all), e.g. ["peft_latency"].
    Returns:
        the result dict (also what goes into ``out``).
    """
    known = bench_configs()
    if isinstance(configs, str):
        configs = configs.split(",")
    configs = [c.strip() for c in configs if c.strip()]
    bad = [c for c in configs if c not in known]
    if not configs or bad:
        raise ValueError(f"unknown benchmark config(s) {bad or configs}; allowed: "
                         f"{', '.join(sorted(known))}")
    if isinstance(only, str):
        only = only.split(",")
    measurements = [(n, f) for n, f in MEASUREMENTS if only is None or n in only]
    unknown = sorted(set(only or ()) - {n for n, _ in MEASUREMENTS})
    if unknown or not measurements:
        raise ValueError(f"unknown measurement(s) {unknown or only}; allowed: "
                         f"{', '.join(n for n, _ in MEASUREMENTS)}")
    for name, v in (("steps", steps), ("threads", threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

    torch, tg, torch_note = None, None, "not requested (--no-torch)"
    if torch_compare:
        torch, tg = _import_torch()
        if torch is None:
            torch_note, tg = tg, None
        else:
            torch_note = ""
            torch.set_num_threads(threads)

    result = {"machine": machine_info(torch), "steps": steps, "warmup": warmup,
              "torch_compare": torch is not None, "torch_note": torch_note, "configs": {}}
    with blas_threads(threads) as blas:
        result["threads"] = {"requested": threads, "numpy_blas": blas,
                             "torch": torch.get_num_threads() if torch is not None else None}
        m = result["machine"]
        print_fn(f"minilora bench: {m['cpu_model']}, {m['cores']} cores "
                 f"({m['usable_cores']} usable), "
                 f"Python {m['python']}, NumPy {m['numpy']} ({m['numpy_blas']}), "
                 f"backend {m['backend']}, torch {m['torch'] or '-'}"
                 f"{' (' + m['torch_blas'] + ')' if torch is not None else ''}")
        print_fn(f"threads: requested {threads}; NumPy BLAS via {blas['control']} "
                 f"[{blas['setting']}]; torch {result['threads']['torch'] or '-'}")
        if blas["control"] != "threadpoolctl" and blas["blas_threads"] not in (threads,):
            print_fn(f"  note: NumPy's BLAS thread count cannot be changed without threadpoolctl; "
                     f"start with OPENBLAS_NUM_THREADS={threads} OMP_NUM_THREADS={threads} "
                     f"(now: {blas['setting']}, i.e. "
                     f"{blas['blas_threads'] or 'all ' + str(m['usable_cores'])} threads)")
        if torch_note:
            print_fn(f"PyTorch comparison skipped: {torch_note}")
        if progress:
            print(f"[sgemm] timing float32 matmul, sizes {list(sgemm_sizes)}", file=sys.stderr)
        sgemm = measure_sgemm(threads, sgemm_sizes, torch=torch)
        result["sgemm"] = sgemm
        print_fn(f"float32 sgemm peak (best of n={list(sgemm_sizes)}): NumPy "
                 f"{sgemm['peak_flops_per_s'] / 1e9:.1f} GFLOP/s"
                 + (f", torch {sgemm['torch_peak_flops_per_s'] / 1e9:.1f} GFLOP/s"
                    if torch is not None else ""))
        checks = []
        for name in configs:
            c = known[name]
            ctx = BenchContext(name, GPTConfig(**c["model"]), c["batch_size"], c["flop_target"],
                               steps, warmup, threads, sgemm["peak_flops_per_s"], torch, tg,
                               torch_note, memory, progress, pause_s)
            cres = {"model": ctx.config.to_dict(), "batch_size": ctx.batch_size,
                    "tokens_per_step": ctx.batch_size * ctx.config.block_size,
                    "flops": ctx.flops, "measurements": {}}
            rows = []
            for mname, fn in measurements:
                if progress:
                    print(f"[{name}] {mname} ...", file=sys.stderr)
                sec = fn(ctx)
                cres["measurements"][mname] = sec.data
                rows += sec.rows
                checks += sec.checks
            result["configs"][name] = cres
            cf = ctx.config
            print_fn(f"\n{name}: B {ctx.batch_size}, T {cf.block_size}, {cf.n_layer} layers, "
                     f"C {cf.n_embd}, {cf.n_head} heads, V {cf.vocab_size}, float32, AdamW; "
                     f"median of {steps} steps after {warmup} warm-up")
            print_fn(_format_table(rows))
    result["targets"] = [c.to_dict() for c in checks]
    if checks:
        print_fn("\ntargets:")
        print_fn(_format_table([(f"{c.config}: {c.metric}",
                                 "-" if c.value is None else f"{c.value:.2f}",
                                 f"{c.op} {c.target}  {c.status()}") for c in checks]))
    if out:
        from minilora.checkpoint import atomic_write_text
        atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True))
        print_fn(f"results written to {out}")
    return result
