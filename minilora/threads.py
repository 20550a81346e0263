"""CPU threads: the library sets them for each phase, so the user's default is the fast setting.

Two kinds of threads can run minilora's CPU work:

* the **BLAS's own** (OpenBLAS, inside NumPy and SciPy): one matmul split over the cores;
* **minilora's pool** (:func:`parallel_chunks`): the rows of each linear layer's GEMM, the
  element-wise passes in blocks, the attention's batch, AdamW's parameters, NF4's blocks, each
  thread one single-threaded BLAS call or NumPy pass on its own part.

minilora chooses, for every phase, one BLAS thread and its own pool on the usable cores:

==========  ============  =========================================================================
phase       BLAS threads  minilora's pool
==========  ============  =========================================================================
train       1             every usable core: one GEMM's rows shared as minilora does run at the
                          machine's full sgemm rate, OpenBLAS's own split at 40 % of it
decode      1             every usable core: a batch-1 step's GEMMs have one row (one core either
                          way); the prompt and a re-encoded window share their rows
analysis    1             every usable core (SVDs, ΔW, NF4 quantisation)
worker      1             cores / processes: one of several processes on the machine (the Dask
                          workers of ``minilora ablate``, see :func:`child_env`)
==========  ============  =========================================================================

**Why the BLAS never gets threads of its own here.** OpenBLAS's worker threads spin while they
wait for the next call. On a busy machine a spinning thread holds a core that another process
needs, and every call then waits for a thread the scheduler has put aside: measured on the
2-core machine at load 2, an SVD of a 1024 x 1024 matrix took 3.0x as long with two OpenBLAS
threads as with one, a 256 x 1024 one 7.9x, and chapter 01 in full mode 7x (BENCHMARKS.md,
"Threads"). minilora's pool waits on a lock, not a spin, so a busy core only delays its own
chunk. One policy for every phase keeps the user's default away from that case, on a quiet
machine and a loaded one.

**Overrides** (read at each use, validated like flags: a bad value is one error line):

* ``MINILORA_THREADS=N``: minilora's pool has N threads;
* ``OPENBLAS_NUM_THREADS=N`` (or ``OMP_NUM_THREADS`` when that is unset, as OpenBLAS reads
  them): the BLAS keeps the N threads it started with and minilora leaves it alone; with N > 1
  its own pool then stays at 1 thread unless ``MINILORA_THREADS`` says otherwise (two pools on
  the same cores slow each other down).

The library applies the setting through ``threadpoolctl`` (made for this): when this module is
imported, whenever a phase starts (:func:`phase`: training, generation, the command line), and
again when modules were imported since the last time (a BLAS loaded later, e.g. SciPy's own, is
limited too). ``describe()`` says what is in force.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from typing import Any

try:  # a dependency; absent only on a bare machine (the GPU check's: numpy, scipy, cupy)
    import threadpoolctl
except ImportError:
    threadpoolctl = None

from minilora.backend import is_cupy
from minilora.errors import UsageError

#: minilora's own pool size
POOL_VAR = "MINILORA_THREADS"
#: the variables OpenBLAS reads for its thread count, in its order (the first one set wins)
BLAS_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
#: validated too (another BLAS, e.g. an MKL build of NumPy, reads it)
OTHER_VARS = ("MKL_NUM_THREADS",)
#: the most threads a variable may ask for (a typo like 10000 is refused, not obeyed)
MAX_THREADS = 1024

#: phase -> why its setting is what it is (the setting itself: :func:`choose`)
PHASES = {
    "train": "forward, backward and AdamW: every GEMM's rows shared over minilora's pool",
    "decode": "generation: one-row GEMMs per step; the prompt's and re-encoded windows' rows "
              "shared over minilora's pool",
    "analysis": "SVDs, ΔW and quantisation: single-threaded LAPACK, blocks over minilora's pool",
    "worker": "one of several processes: the cores divided between them",
}


class ThreadsError(UsageError):
    """A thread variable has a value that is not allowed (one line, like a bad flag)."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _parse(var: str, value: str) -> int:
    """The thread count in ``value`` of variable ``var`` or one clear error. ``OMP_NUM_THREADS``
    may be a list (``4,2``: nested OpenMP levels); its first entry counts."""
    text = value.strip()
    first = text.split(",")[0].strip() if var == "OMP_NUM_THREADS" else text
    try:
        n = int(first)
    except ValueError:
        n = None
    if n is None or not 1 <= n <= MAX_THREADS or (var == "OMP_NUM_THREADS" and not all(
            p.strip().isdigit() and int(p) >= 1 for p in text.split(","))):
        hint = ("unset it to let minilora choose" if var == POOL_VAR
                else "unset it to let minilora choose (one BLAS thread, its own pool on the cores)")
        raise ThreadsError(f"{var} must be a whole number of threads in [1, {MAX_THREADS}] "
                           f"(got {value!r}); {hint}")
    return n


def env_overrides() -> dict:
    """The thread variables the user set, validated: ``{"pool": N or None, "blas": N or None,
    "blas_var": the variable that set it or None}``. Raises :class:`ThreadsError` for a bad one."""
    out: dict[str, Any] = {"pool": None, "blas": None, "blas_var": None}
    for var in (POOL_VAR, *BLAS_VARS, *OTHER_VARS):
        value = os.environ.get(var)
        if value is None or not value.strip():
            continue
        n = _parse(var, value)
        if var == POOL_VAR:
            out["pool"] = n
        elif var in BLAS_VARS and out["blas"] is None:
            out["blas"], out["blas_var"] = n, var
    return out


def check_env() -> None:
    """Raise the :class:`ThreadsError` of a bad thread variable now (the command line calls this
    first, so a bad value is one line before any work starts)."""
    env_overrides()


@dataclass(frozen=True)
class ThreadSetting:
    """What a phase runs with. ``blas``: the BLAS threads minilora sets (None: left as the
    environment started them); ``pool``: minilora's own threads; ``why``: one line."""

    phase: str
    blas: int | None
    pool: int
    why: str


def choose(phase: str = "train", *, processes: int = 1, pool: int | None = None) -> ThreadSetting:
    """The setting the library chooses for ``phase`` (one of :data:`PHASES`).

    Args:
        processes: how many processes share the machine's cores (the "worker" phase); the pool
            gets ``usable_cores() // processes`` threads, at least 1.
        pool: an explicit pool size (a command's own ``--threads`` flag): it wins over
            ``MINILORA_THREADS`` and the policy.
    Raises :class:`ThreadsError` for a bad thread variable, ``ValueError`` for an unknown phase.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown thread phase {phase!r}; known: {', '.join(PHASES)}")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    env = env_overrides()
    blas = None if env["blas"] is not None else 1
    if is_cupy():
        return ThreadSetting(phase, blas, 1, "CuPy: the GPU runs the work; one CPU thread feeds it")
    if pool is not None:
        return ThreadSetting(phase, blas, max(1, int(pool)), "set by the caller")
    if env["pool"] is not None:
        return ThreadSetting(phase, blas, env["pool"], f"{POOL_VAR}={env['pool']}")
    if env["blas"] is not None and env["blas"] > 1:
        return ThreadSetting(phase, None, 1, f"{env['blas_var']}={env['blas']}: the BLAS threads "
                             "itself, so minilora's pool stays at 1 thread")
    n = max(1, usable_cores() // processes)
    if processes > 1:
        return ThreadSetting(phase, blas, n, f"{processes} processes share "
                             f"{usable_cores()} cores")
    return ThreadSetting(phase, blas, n, PHASES[phase])


# ----------------------------------------------------------------------------------------------
# applying it
# ----------------------------------------------------------------------------------------------
_state: dict[str, Any] = {"phase": ("train", 1, None), "modules_seen": -1, "cache": (None, None),
                          "blas_env": None}


def _limit_blas(force: bool = False) -> None:
    """Set every loaded BLAS to one thread (threadpoolctl) unless the environment set its
    threads; repeated only when modules were imported since the last time (a BLAS loaded
    later) or with ``force``."""
    n_modules = len(sys.modules)
    if not force and n_modules == _state["modules_seen"]:
        return
    _state["modules_seen"] = n_modules
    try:
        env = env_overrides()
    except ThreadsError:  # reported by check_env / choose; the BLAS is left as it is
        return
    if env["blas"] is None and threadpoolctl is not None:
        threadpoolctl.threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def phase(name: str, *, processes: int = 1, pool: int | None = None):
    """Run the block with the setting :func:`choose` gives for phase ``name`` (arguments as
    there); the previous phase comes back after it (the BLAS stays at one thread: minilora
    never gives it more). Yields the :class:`ThreadSetting`."""
    setting = choose(name, processes=processes, pool=pool)
    saved = _state["phase"]
    _state["phase"] = (name, processes, pool)
    refresh()
    _limit_blas(force=True)
    try:
        yield setting
    finally:
        _state["phase"] = saved


def in_phase(name: str):
    """Decorator: the function runs inside :func:`phase` ``name`` (the library's long-running
    entry points: ``train``, ``generate``)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return run
    return wrap


def current() -> ThreadSetting:
    """The setting in force: the innermost :func:`phase`, else "train". ``MINILORA_THREADS`` is
    read again at each call (a changed value takes effect at once); the BLAS variables when a
    phase starts (:func:`refresh`), as the BLAS itself reads them only when it loads."""
    key = (_state["phase"], is_cupy(), os.environ.get(POOL_VAR), _state["blas_env"])
    cached_key, setting = _state["cache"]
    if key != cached_key:
        name, processes, pool = _state["phase"]
        setting = choose(name, processes=processes, pool=pool)
        _state["cache"] = (key, setting)
    return setting


def refresh() -> None:
    """Read the BLAS thread variables again (a phase's start does this)."""
    _state["blas_env"] = tuple(os.environ.get(v) for v in (*BLAS_VARS, *OTHER_VARS))


def cpu_threads() -> int:
    """How many threads minilora's own CPU work is split over now (1 on CuPy): the pool of
    :func:`current`. Also limits a BLAS loaded since the last call to one thread."""
    _limit_blas()
    return current().pool


def describe() -> str:
    """One line: the BLAS threads and minilora's pool in force, and why (for logs and the bench)."""
    try:
        env = env_overrides()
    except ThreadsError as e:
        return f"thread variables invalid: {e}"
    _limit_blas()
    setting = current()
    if threadpoolctl is None:
        blas = "as the environment started them (threadpoolctl is not installed)"
    else:
        info = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
        blas = ", ".join(f"{d.get('internal_api')} {d.get('num_threads')}" for d in info) or "none"
    who = (f"set by {env['blas_var']}" if env["blas"] is not None
           else "set by minilora" if threadpoolctl is not None else "")
    return (f"BLAS threads: {blas}{f' ({who})' if who else ''}; minilora's pool: {setting.pool} "
            f"(phase {setting.phase}: {setting.why})")


def child_env(processes: int, env: dict | None = None) -> dict:
    """Environment variables for ``processes`` worker processes started together on this machine
    (e.g. Dask workers): one BLAS thread each (set before NumPy loads, so the BLAS never starts
    threads) and minilora's pool on their share of the cores. A variable the user set is kept.
    Returns a new dict: ``env`` (default ``os.environ``) updated."""
    base = dict(os.environ if env is None else env)
    out = dict(base)
    for var in (*BLAS_VARS[:1], "OMP_NUM_THREADS", *OTHER_VARS):
        if not base.get(var, "").strip():
            out[var] = "1"
    if not base.get(POOL_VAR, "").strip():
        out[POOL_VAR] = str(max(1, usable_cores() // max(1, int(processes))))
    return out


# ----------------------------------------------------------------------------------------------
# minilora's pool
# ----------------------------------------------------------------------------------------------
_pool: dict[str, Any] = {"executor": None, "size": 0}


#: chunks per thread of :func:`parallel_chunks`. Threads take them one at a time, so a thread
#: that has not started when the others are done leaves its chunk to them. More than one a
#: thread was slower on the 2-core machine (smaller GEMMs, more hand-offs: small step 126.6 ms
#: at 1, 136.7 at 2, 149.0 at 3; medium 489 / 504 / 554 ms; load 1.3-1.5, interleaved)
CHUNKS_PER_THREAD = 1


def parallel_chunks(n: int, fn, threads: int | None = None, min_per_thread: int = 1) -> None:
    """Call ``fn(i0, i1)`` on contiguous chunks that cover ``range(n)``, shared over threads.

        t = min(threads, n // min_per_thread) threads, as many chunks (CHUNKS_PER_THREAD = 1)
        chunk k: [n k / t, n (k + 1) / t)

    Each thread, the calling one included, takes the next chunk not yet taken until none is
    left, so a worker that has not started by the time the caller is done (its core busy with
    another process) leaves its chunk to the caller instead of keeping it waiting. The chunks depend only on ``n``, the thread count and
    ``min_per_thread``, never on which thread ran them. NumPy releases the GIL inside ufuncs
    on large arrays and inside BLAS calls, so chunks run on separate cores. ``fn`` must write
    only its own part of any shared output and keep its own scratch buffers. One plain call
    ``fn(0, n)`` on CuPy (the GPU is already parallel), with one thread, or for n < 2. The
    first exception raised in a chunk is raised here, after every thread has stopped.

    Args:
        n: number of items (e.g. cache-sized slices of a tensor).
        fn: ``fn(i0, i1)`` processes items i0 .. i1-1.
        threads: default :func:`cpu_threads`.
        min_per_thread: fewer threads (and chunks) when there are fewer items than this per
            chunk (a chunk costs a hand-off; small tensors are done in one call).
    """
    most = n // max(1, int(min_per_thread))
    t = most
    if t > 1:  # (a decoding step's one-row work never asks: ~1 us saved per call)
        t = min(t, cpu_threads() if threads is None else max(1, int(threads)))
    if t <= 1:
        if n > 0:
            fn(0, n)
        return
    if _pool["size"] < t - 1:
        if _pool["executor"] is not None:
            _pool["executor"].shutdown(wait=True)
        _pool["executor"] = concurrent.futures.ThreadPoolExecutor(
            max_workers=t - 1, thread_name_prefix="minilora")
        _pool["size"] = t - 1
    chunks = min(most, CHUNKS_PER_THREAD * t)
    bounds = [n * k // chunks for k in range(chunks + 1)]
    todo = iter(range(chunks))  # shared: next() on it is atomic (the GIL)

    def work():
        for k in todo:
            fn(bounds[k], bounds[k + 1])
    futures = [_pool["executor"].submit(work) for _ in range(t - 1)]
    try:
        work()                                        # the calling thread takes chunks too
    finally:
        done = [f.exception() for f in futures]       # wait for all before raising anything
    for e in done:
        if e is not None:
            raise e


refresh()
_limit_blas(force=True)  # the process default, from the first import on
