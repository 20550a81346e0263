"""(e) Generation speed: characters per second with the KV cache, without it, and PyTorch's.

On the shipped Shakespeare model (the ``micro`` config uses a random model of its own shape, for
tests), at batch 1 and batch 16, float32, temperature 0.8:

* **ours, KV cache** — :func:`minilora.sample.generate` as ``minilora sample`` runs it;
* **ours, no cache** — ``use_cache=False``: the whole context re-run for every token;
* **PyTorch, KV cache** — the hand-written reference (:mod:`minilora.bench.torch_reference`:
  keys and values preallocated to ``block_size``, one new token per forward, under
  ``torch.inference_mode``), same weights.

A generation starts from an 8-token prompt and fills the window: ``block_size - 8`` new tokens
(248 on the shipped model), so no variant re-encodes. One character is one token; chars/s =
batch size x new tokens / seconds, prompt encoding and sampling included. The cached variants
are timed ``min(steps, 3)`` times each, alternating; the no-cache variant once, and at batch 16
only over the first 64 new tokens (its cost grows with the context, so that figure is an upper
bound on its speed over the whole window and the speed-up shown a lower bound). Beside the
wall-clock figures, characters per CPU-second of the process (``time.process_time``): on a
shared machine, with one thread, the better guess of what a quiet core would do.

Past the window (the long-generation figures): :data:`LONG_TOKENS` characters at batch 1 from
the same prompt, with the default chunked window (half the window re-encoded when it is full,
:mod:`minilora.sample`), timed twice; and the exact sliding window over
:data:`EXACT_TOKENS` characters past a full window (its cost per character is the same at
every position past the window, so that rate is its rate for any longer text).

Targets (the speed issue): ours / PyTorch >= 1.0 (chars/s, both cached) at each batch size,
>= 1,000 chars/s at batch 1, and >= 1,000 chars/s for the long generation. The load average
before and after is recorded: on a shared machine every figure here falls with it.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

from minilora import backend
from minilora.bench.core import BenchContext, Check, Section, _bar, _timed
from minilora.checkpoint import load_checkpoint
from minilora.experiments.paths import base_model_path
from minilora.model import GPT
from minilora.sample import generate

PROMPT_LEN = 8
BATCHES = (1, 16)
NO_CACHE_TOKENS_AT_16 = 64
TEMPERATURE = 0.8
LONG_TOKENS = 2000
EXACT_TOKENS = 64


def _decode_model(ctx: BenchContext):
    """(model, where it came from): the shipped model, or a random one for ``micro``."""
    if ctx.name == "micro":
        return GPT(ctx.config, rng=0, dtype="float32"), "random micro model"
    path = base_model_path()
    model, _, _ = load_checkpoint(path)
    return model, f"shipped model {path.name}"


def _measure_long(model, prompt, reps: int, ctx: BenchContext) -> dict:
    """Characters/s of a :data:`LONG_TOKENS`-character generation at batch 1 with the chunked
    window (median of ``reps``), and of the exact window past a full window."""
    idx = backend.asarray(prompt)
    n = LONG_TOKENS if ctx.name != "micro" else 4 * model.config.block_size
    window = model.config.block_size
    times = [_timed(lambda: generate(model, idx, n, TEMPERATURE, progress=False))
             for _ in range(reps)]
    kv = model.kv_cache(1, "half")
    full = backend.asarray(np.resize(prompt, (1, window)))  # a prompt that fills the window
    n_exact = min(EXACT_TOKENS, n)
    t_exact = _timed(lambda: generate(model, full, n_exact, TEMPERATURE, progress=False,
                                      exact_window=True))
    med = statistics.median(times)
    return {"tokens": n, "chunked_s": med, "chunked_times_s": times,
            "chunked_chars_per_s": n / med, "keep": kv.keep,
            "reencodings": len(range(window, PROMPT_LEN + n, window - kv.keep)),
            "exact_tokens": n_exact, "exact_s": t_exact, "exact_chars_per_s": n_exact / t_exact}


def _load() -> list:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def measure_decode(ctx: BenchContext) -> Section:
    """Characters/s at batch 1 and 16: ours with and without the KV cache, PyTorch's with one."""
    load_before = _load()
    model, source = _decode_model(ctx)
    cfg = model.config
    n_new = cfg.block_size - PROMPT_LEN
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, PROMPT_LEN))
    tmodel = None
    if ctx.torch is not None:
        tmodel = ctx.torch_gpt.from_minilora(model)
    reps = max(1, min(ctx.steps, 3))
    data = {"model": source, "prompt_tokens": PROMPT_LEN, "new_tokens": n_new,
            "temperature": TEMPERATURE, "repeats": reps, "batches": {}}
    rows, checks = [], []
    with _bar(len(BATCHES) * (2 * reps + 1), f"{ctx.name}: decode", ctx.progress) as bar:
        for B in BATCHES:
            idx_np = np.repeat(prompt, B, axis=0)
            idx = backend.asarray(idx_np)
            cached = {"ours": lambda idx=idx: generate(model, idx, n_new, TEMPERATURE,
                                                       progress=False)}
            if tmodel is not None:
                tidx = ctx.torch.from_numpy(idx_np)
                cached["torch"] = lambda tidx=tidx: ctx.torch_gpt.generate(tmodel, tidx, n_new,
                                                                           TEMPERATURE)
            for fn in cached.values():  # warm-up: thread pools, first-call allocations
                fn()
            times = {n: [] for n in cached}
            cpu = {n: [] for n in cached}
            names = list(cached)
            for r in range(reps):
                for n in (names if r % 2 == 0 else names[::-1]):
                    if len(names) > 1:
                        time.sleep(ctx.pause_s)
                    c0 = time.process_time()
                    times[n].append(_timed(cached[n]))
                    cpu[n].append(time.process_time() - c0)
                    bar.update(1)
            n_plain = n_new if B == 1 else min(n_new, NO_CACHE_TOKENS_AT_16)
            time.sleep(ctx.pause_s)  # let torch's worker threads stop spinning first
            t_plain = _timed(lambda idx=idx, n=n_plain: generate(
                model, idx, n, TEMPERATURE, use_cache=False, progress=False))
            bar.update(1 + (reps if tmodel is None else 0))
            med = {n: statistics.median(t) for n, t in times.items()}
            cps = {n: B * n_new / s for n, s in med.items()}
            cps["ours_no_cache"] = B * n_plain / t_plain
            ratio = cps["ours"] / cps["torch"] if "torch" in cps else None
            cpu_med = {n: statistics.median(t) for n, t in cpu.items()}
            data["batches"][str(B)] = {"median_s": med, "times_s": times, "cpu_s": cpu,
                                       "chars_per_cpu_s": {n: B * n_new / s
                                                           for n, s in cpu_med.items()},
                                       "no_cache_s": t_plain, "no_cache_new_tokens": n_plain,
                                       "chars_per_s": cps, "ratio_ours_over_torch": ratio,
                                       "cache_speedup": cps["ours"] / cps["ours_no_cache"]}
            rows.append((f"decode B={B}, ours with KV cache", f"{cps['ours']:,.0f} chars/s",
                         f"{n_new} new tokens, {med['ours'] * 1e3:.0f} ms "
                         f"({B * n_new / cpu_med['ours']:,.0f} per CPU-second)"))
            rows.append((f"decode B={B}, ours without cache", f"{cps['ours_no_cache']:,.0f} chars/s",
                         f"{n_plain} new tokens; cache x{cps['ours'] / cps['ours_no_cache']:.1f}"))
            if ratio is not None:
                c = Check(ctx.name, f"decode chars/s ours/torch (KV cache), batch {B}", ratio,
                          ">=", 1.0)
                checks.append(c)
                rows.append((f"decode B={B}, torch with KV cache", f"{cps['torch']:,.0f} chars/s",
                             f"({B * n_new / cpu_med['torch']:,.0f} per CPU-second); "
                             f"ours/torch {ratio:.2f} (>= 1.0  {c.status()})"))
            if B == 1:
                c = Check(ctx.name, "decode chars/s at batch 1 (KV cache)", cps["ours"], ">=",
                          1000.0)
                checks.append(c)
                rows.append(("decode B=1 target", f"{cps['ours']:,.0f}", f">= 1000  {c.status()}"))
    long = _measure_long(model, prompt, reps, ctx)
    data["long"] = long
    rows.append((f"generate {long['tokens']:,} chars, B=1, chunked window (default)",
                 f"{long['chunked_chars_per_s']:,.0f} chars/s",
                 f"{long['chunked_s']:.2f} s, {long['reencodings']} re-encodings of "
                 f"{long['keep']} characters"))
    rows.append((f"  the same, exact sliding window", f"{long['exact_chars_per_s']:,.0f} chars/s",
                 f"over {long['exact_tokens']} characters past a full window (--exact-window)"))
    c = Check(ctx.name, f"generate {long['tokens']} chars at batch 1, chars/s (chunked window)",
              long["chunked_chars_per_s"], ">=", 1000.0)
    checks.append(c)
    rows.append(("long generation target", f"{long['chunked_chars_per_s']:,.0f}",
                 f">= 1000  {c.status()}"))
    if tmodel is None:
        rows.append(("decode, torch with KV cache", "skipped", ctx.torch_note))
    data["load_average_before"], data["load_average_after"] = load_before, _load()
    rows.append(("decode: load average before / after",
                 f"{'/'.join(map(str, load_before[:1] + _load()[:1])) or '-'}",
                 f"({source}; {os.cpu_count()} cores)"))
    return Section(data, rows, checks)
