"""minilora's pool (threads.parallel_chunks), and the NF4 quantiser split over threads. The policy
(the setting chosen per phase) is tested in tests/test_thread_policy.py."""
import threading

import numpy as np
import pytest
from conftest import use_backend

from minilora import threads
from minilora.quant.blockwise import (
    dequantize_blockwise,
    dequantize_packed,
    quantize_blockwise,
)
from minilora.quant.nf4 import NF4_CODE
from minilora.quant.packing import pack_nibbles


@pytest.mark.parametrize("n,nthreads", [(0, 3), (1, 3), (7, 3), (10, 4), (5, 1), (3, 8)])
def test_chunks_cover_each_item_once_in_order(n, nthreads):
    seen, lock = [], threading.Lock()

    def fn(i0, i1):
        with lock:
            seen.append((i0, i1))

    threads.parallel_chunks(n, fn, threads=nthreads)
    items = sorted(i for i0, i1 in seen for i in range(i0, i1))
    assert items == list(range(n))                        # every item exactly once
    assert all(i1 > i0 for i0, i1 in seen)                # no empty chunks
    # t = min(threads, n) threads take min(n, CHUNKS_PER_THREAD t) chunks (one when t = 1)
    t = min(nthreads, n)
    assert len(seen) == (0 if n == 0 else 1 if t <= 1 else min(n, threads.CHUNKS_PER_THREAD * t))


def test_min_per_thread_limits_the_split():
    calls = []
    threads.parallel_chunks(10, lambda i0, i1: calls.append((i0, i1)), threads=8, min_per_thread=4)
    assert sorted(calls) == [(0, 5), (5, 10)]             # 10 // 4 = 2 threads, 2 chunks


def test_the_caller_takes_every_chunk_a_worker_does_not_start(monkeypatch):
    """Threads take the next free chunk: a worker that never gets a core (here: one that
    never runs) leaves its chunks to the caller, who covers them all."""
    import concurrent.futures

    class NeverRuns:
        def submit(self, fn):
            f = concurrent.futures.Future()
            f.set_result(None)
            return f
    monkeypatch.setitem(threads._pool, "executor", NeverRuns())
    monkeypatch.setitem(threads._pool, "size", 8)
    seen = []
    threads.parallel_chunks(10, lambda i0, i1: seen.append((i0, i1)), threads=2)
    assert seen == [(0, 5), (5, 10)]  # both chunks, by the caller


def test_an_error_in_any_chunk_is_raised_after_all_finish():
    done = []

    def fn(i0, i1):
        if i0 == 0:
            raise ValueError("chunk 0")
        done.append(i0)

    with pytest.raises(ValueError, match="chunk 0"):
        threads.parallel_chunks(4, fn, threads=4)
    assert sorted(done) == [1, 2, 3]
    with pytest.raises(KeyError):
        threads.parallel_chunks(4, lambda i0, i1: {}[i0] if i0 == 2 else None, threads=4)


def test_one_call_on_cupy(monkeypatch):
    monkeypatch.setenv("MINILORA_THREADS", "4")
    use_backend("cupy_strict")
    calls = []
    threads.parallel_chunks(40, lambda i0, i1: calls.append((i0, i1)))
    assert threads.cpu_threads() == 1 and calls == [(0, 40)]


@pytest.mark.parametrize("n", [64 * 2048 * 9 + 37, 64 * 2048 * 2])
def test_quantiser_gives_the_same_bytes_on_any_thread_count(monkeypatch, n):
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    runs = []
    for threads in ("1", "3"):
        monkeypatch.setenv("MINILORA_THREADS", threads)
        q, absmax = quantize_blockwise(x, NF4_CODE, 64)
        packed = pack_nibbles(q, pad=7)
        runs.append((q, absmax, dequantize_blockwise(q, absmax, NF4_CODE, 64),
                     dequantize_packed(packed, absmax, NF4_CODE, 64, n)))
    for a, b in zip(*runs):
        assert np.array_equal(a, b)
    # and the threaded answer is the plain one: searchsorted on the midpoints, blockwise
    q, absmax = runs[1][:2]
    full = n // 64 * 64
    am = np.abs(x[:full]).reshape(-1, 64).max(axis=1)
    assert np.array_equal(absmax[:full // 64], am)
    scaled = np.clip(x[:full].reshape(-1, 64) * (np.float32(1) / am[:, None]), -1, 1)
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    assert np.array_equal(q[:full], np.searchsorted(mids, scaled.ravel(), side="left"))


def test_a_non_finite_value_in_a_later_chunk_is_still_one_clear_error(monkeypatch):
    from minilora.quant.checks import QuantError
    monkeypatch.setenv("MINILORA_THREADS", "3")
    x = np.random.default_rng(1).standard_normal(64 * 2048 * 8).astype(np.float32)
    x[-5] = np.nan
    with pytest.raises(QuantError, match="NaN"):
        quantize_blockwise(x, NF4_CODE, 64)
