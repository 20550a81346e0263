"""Speed and memory benchmarks, measured side by side in one run and printed as ratios.

::

    minilora bench --configs small,medium --steps 10 --threads 2 --out results/bench.json
    result = run_bench(configs=["small"], steps=10, threads=2, torch_compare=True, out=None)

For each configuration (``small``: T 128, 4 layers, C 128, 4 heads, B 16; ``medium``: T 256,
6 layers, C 256, 8 heads, B 8; float32, AdamW, full context ``T = block_size``):

(a) **step time**: one full training step of ours (forward, fused cross-entropy, backward, global
    norm clipping at 1.0, AdamW), median over ``steps`` timed steps after ``warmup`` untimed ones;
(b) **vs PyTorch**: the same step in PyTorch (:mod:`minilora.bench.torch_reference`, same weights, explicit
    attention; and separately with ``scaled_dot_product_attention``), timed *interleaved* with ours
    (order alternating each round, a short pause at every switch so one library's idle-spinning
    worker threads do not steal the cores from the other); ratio ours/torch, target <= 1.0;
(c) **FLOP/s**: the analytic matmul FLOPs of a step (:func:`train_step_flops`) over our step time,
    against this machine's float32 matmul rate (best of a few large square sgemm, same threads);
    target >= 0.55 at ``medium`` (PyTorch reaches 0.54);
(d) **peak memory of a step**: in-process with ``tracemalloc`` (NumPy reports its buffers to it;
    PyTorch's CPU allocator does not, so tracemalloc is blind to torch, and torch has no CPU
    allocator statistics), and, the comparable figure, the growth of the resident-set high-water
    mark over two steps in a fresh child process per framework (see :func:`_rss_child_run`).

Threads: the library's own setting for training (:mod:`minilora.threads`: one BLAS thread,
minilora's pool on ``threads`` threads, the environment's variables as overrides), and
``torch.set_num_threads(threads)`` for PyTorch: the default setting a user gets is what is
measured. The memory child processes get the same.

PyTorch is optional and never imported at module level: it is loaded inside
:func:`minilora.bench.core._import_torch` and the comparison is skipped, with a note, when it is absent.

Adding a measurement (later chapters: LoRA step vs full fine-tuning step, merged vs base
inference, QLoRA): write ``def measure_x(ctx: BenchContext) -> Section`` and append
``("x", measure_x)`` to :data:`MEASUREMENTS`; its data lands in the JSON under the config, its
rows in the printed table, its :class:`Check` objects in the targets summary.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import json
import sys
from typing import Callable

from minilora import backend
from minilora.bench.adapters import (
    measure_lora,
    measure_multi_adapter,
    measure_peft_latency,
    measure_qlora,
)
from minilora.bench.core import (
    SWITCH_PAUSE_S,
    BenchContext,
    Section,
    _import_torch,
    bench_configs,
    bench_threads,
    load_average,
    machine_info,
    measure_sgemm,
    train_step_flops,
)
from minilora.bench.decode import measure_decode
from minilora.bench.profile import measure_profile
from minilora.bench.recompute import measure_recompute
from minilora.bench.train import measure_memory, measure_train_step
from minilora.config import GPTConfig
from minilora.errors import UsageError
from minilora.io import atomic_write_text

Measurement = Callable[[BenchContext], Section]

#: The measurements run for every configuration, in order: ``(name, measure(ctx) -> Section)``.
MEASUREMENTS: list[tuple[str, Measurement]] = [
    ("train_step", measure_train_step),
    ("memory", measure_memory),
    ("lora", measure_lora),
    ("multi_adapter", measure_multi_adapter),  # adapter switch time, mixed-adapter batches
    ("peft_latency", measure_peft_latency),  # Houlsby adapters vs LoRA at inference
    ("qlora", measure_qlora),  # 4-bit base + LoRA vs LoRA: step time, peak memory
    ("decode", measure_decode),  # generation chars/s: KV cache, no cache, PyTorch's cache
    ("recompute", measure_recompute),  # activation recomputation: memory and time, full/LoRA/QLoRA
    ("profile", measure_profile),  # where the step's time goes, ours op by op vs torch.profiler
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
        threads: minilora's pool (one BLAS thread each) and ``torch.set_num_threads``.
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
        raise UsageError(f"unknown benchmark config(s) {bad or configs}; allowed: "
                         f"{', '.join(sorted(known))}")
    if isinstance(only, str):
        only = only.split(",")
    measurements = [(n, f) for n, f in MEASUREMENTS if only is None or n in only]
    unknown = sorted(set(only or ()) - {n for n, _ in MEASUREMENTS})
    if unknown or not measurements:
        raise UsageError(f"unknown measurement(s) {unknown or only}; allowed: "
                         f"{', '.join(n for n, _ in MEASUREMENTS)}")
    for name, v in (("steps", steps), ("threads", threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {v!r}")

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
    with bench_threads(threads) as setting:
        result["threads"] = {"requested": threads, "minilora": setting,
                             "torch": torch.get_num_threads() if torch is not None else None}
        m = result["machine"]
        print_fn(f"minilora bench: {m['cpu_model']}, {m['cores']} cores "
                 f"({m['usable_cores']} usable), "
                 f"Python {m['python']}, NumPy {m['numpy']} ({m['numpy_blas']}), "
                 f"backend {m['backend']}, torch {m['torch'] or '-'}"
                 f"{' (' + m['torch_blas'] + ')' if torch is not None else ''}")
        print_fn(f"load average (1, 5, 15 min): {m['load_average'] or 'unknown'}")
        print_fn(f"threads: {setting['in_force']}; torch {result['threads']['torch'] or '-'}; "
                 f"variables: {setting['environment']}")
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
    result["load_average_end"] = load_average()
    if checks:
        print_fn("\ntargets:")
        print_fn(_format_table([(f"{c.config}: {c.metric}",
                                 "-" if c.value is None else f"{c.value:.2f}",
                                 f"{c.op} {c.target}  {c.status()}") for c in checks]))
    if out:
        atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True))
        print_fn(f"results written to {out}")
    return result


__all__ = ["MEASUREMENTS", "BenchContext", "Section", "bench_configs", "run_bench",
           "train_step_flops"]
