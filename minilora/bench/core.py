"""The bench's machinery: configs, analytic FLOPs, threads and machine facts, sgemm peak, the
``Check`` / ``Section`` / ``BenchContext`` records, and the training-step closures (ours, PyTorch's).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from minilora import backend, threads
from minilora.bench.torch_reference import reference
from minilora.config import GPTConfig
from minilora.experiments.presets import PRESETS
from minilora.model import GPT
from minilora.nn.ops_fast import matmul_rows
from minilora.optim import AdamW

LR = 1e-3
GRAD_CLIP = 1.0
SWITCH_PAUSE_S = 0.25  # > OpenBLAS idle-spin (~2^28 cycles) and libgomp spin: pools sleep first

def bench_configs() -> dict:
    """Name -> ``{"model": GPTConfig kwargs, "batch_size": B, "flop_target": ratio or None}``.

    ``small`` and ``medium`` are the CLI presets of the same name; ``micro`` is for tests.
    """

    out = {"micro": {"model": dict(block_size=16, n_layer=1, n_head=2, n_embd=16),
                     "batch_size": 2, "flop_target": None}}
    for name, target in (("small", None), ("medium", 0.55)):
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
    """(torch, the reference built on it) or (None, reason). torch is imported only here."""
    try:
        torch = importlib.import_module("torch")  # optional: the comparison is skipped without it
    except Exception as e:  # ImportError, or a broken install raising at import
        return None, (f"PyTorch is not installed ({type(e).__name__}); "
                      "`pip install torch` to compare")
    return torch, reference(torch)


@contextlib.contextmanager
def bench_threads(pool: int | None = None):
    """The library's thread setting for training (:func:`minilora.threads.phase` "train"), with
    minilora's pool at ``pool`` threads when given. Yields a description of what is in force."""
    with threads.phase("train", pool=pool) as setting:
        yield {"blas": setting.blas, "pool": setting.pool, "why": setting.why,
               "in_force": threads.describe(), "environment": _threads_env()}


def _threads_env() -> str:
    """The thread variables the user set (for the benchmark header)."""
    keys = (threads.POOL_VAR, *threads.BLAS_VARS, *threads.OTHER_VARS)
    return ", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) or "none set"


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


def load_average():
    """The 1, 5 and 15-minute load averages (None where the OS has none): benchmark figures on
    a shared machine mean little without them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(torch=None) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "python": platform.python_version(), "numpy": np.__version__,
            "numpy_blas": _numpy_blas(), "backend": backend.get_backend(), "torch": None,
            "load_average": load_average()}
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


def interleaved(fns: dict, steps: int, warmup: int) -> dict:
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


def measure_sgemm(threads: int, sizes=(1024, 1536, 2048), reps: int = 3, torch=None) -> dict:
    """This machine's float32 matmul rate: median of ``reps`` n x n sgemm per size, best size.

    2 n^3 FLOPs per product. Run under the same thread settings as the model steps: with a
    single-threaded BLAS the rows are shared over minilora's threads
    (:func:`minilora.threads.cpu_threads`), as the linear layers do.
    """
    rng = np.random.default_rng(0)
    out = {"sizes": list(sizes), "numpy_flops_per_s": {}, "torch_flops_per_s": {}}
    for n in sizes:
        a = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
        b = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
        def product():  # as the layers run a GEMM: rows over minilora's threads, if it has any
            matmul_rows(a, b, min_rows=1)
        product()  # warm: thread pools, buffers
        t = statistics.median(_timed(product) for _ in range(reps))
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
    torch_gpt: object = None  # minilora.bench.torch_reference.reference(torch), or None
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
    """A progress bar on stderr, only on a terminal: logs and CI output get no bar fragments."""
    return tqdm(total=total, desc=desc, unit="round", leave=False,
                disable=not enabled or not sys.stderr.isatty(), file=sys.stderr, dynamic_ncols=True)
