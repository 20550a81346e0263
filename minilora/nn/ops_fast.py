"""Faster twins of three ops of :mod:`minilora.nn.ops`, the ones the layers call.

Each computes the same function with the same cache contract as its plain op, which stays in
``ops`` as the chapters show it; ``tests/test_ops_grad.py`` checks every pair agrees (float64 and
float32, several blocks, two threads) and gradchecks both:

* :func:`layernorm_forward_fast` / :func:`layernorm_backward_fast`: row means as BLAS
  matrix-vector products, rows in cache-sized blocks shared over the CPU threads;
* :func:`gelu_forward_fast` / :func:`gelu_backward_fast`: the same in-place passes, block by block
  (each block stays in the cache across the passes), blocks shared over the threads;
* :func:`attention_forward_fast` / :func:`attention_backward_fast`: queries in tiles that skip the
  masked keys, the batch shared over the threads.

``minilora bench --only profile`` shows what each costs in a training step.

Chapter: chapters/01-foundations.ipynb (section 3.1)
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

from minilora.backend import is_cupy, xp
from minilora.threads import parallel_chunks
from minilora.nn.ops import (
    GELU_C,
    GELU_K,
    AttentionCache,
    _softmax_backward_inplace,
    _softmax_inplace,
    attention_backward,
    attention_forward,
    causal_mask_bias,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    split_heads,
)

#: floats per block of a blocked element-wise op (512 KiB of float32): a chain of passes over one
#: block stays in the core's L2 cache instead of streaming the whole tensor from memory per pass
BLOCK_FLOATS = 1 << 17
#: below this many floats the plain op is faster (a decoding step's (1, 1, C) rows): the blocks,
#: threads and scratch buffers cost more Python time than the arithmetic they organise
SMALL_FLOATS = 1 << 14


@contextlib.contextmanager
def blocked_always():
    """Within the block, the blocked paths run even on small inputs (:data:`SMALL_FLOATS`
    set to -1): the gradchecks and agreement tests use it on their tiny arrays."""
    global SMALL_FLOATS
    saved, SMALL_FLOATS = SMALL_FLOATS, -1
    try:
        yield
    finally:
        SMALL_FLOATS = saved


def _row_blocks(n_rows: int, row_len: int, block) -> None:
    """Call ``block(r0, r1, scratch)`` over row blocks of about :data:`BLOCK_FLOATS` floats that
    cover rows 0 .. n_rows-1, the blocks shared out over the CPU threads
    (:func:`minilora.threads.parallel_chunks`); ``scratch`` is a per-thread ``(rows, row_len)``
    buffer factory. On CuPy: one block, all rows (the GPU is parallel already)."""
    rows = n_rows if is_cupy() else max(1, min(n_rows, BLOCK_FLOATS // max(1, row_len)))

    def chunk(i0, i1):
        scratch = {}

        def buf(dtype):  # one scratch block per thread and dtype, reused across its blocks
            if dtype not in scratch:
                scratch[dtype] = xp.empty((rows, row_len), dtype=dtype)
            return scratch[dtype]
        for r0 in range(i0, i1, rows):
            r1 = min(r0 + rows, i1)
            block(r0, r1, lambda dtype: buf(dtype)[: r1 - r0])
    parallel_chunks(n_rows, chunk, min_per_thread=rows)


def _row_mean(a2, C):
    """Mean over the last axis of a 2-D (N, C) array as one matrix-vector product (N, 1): BLAS
    sums rows of C = 128 floats several times faster than ``mean(axis=-1)``'s pairwise loop."""
    return xp.matmul(a2, xp.full((C, 1), 1.0 / C, dtype=a2.dtype))


def layernorm_forward_fast(x, w, b, eps=1e-5):
    """:func:`~minilora.nn.ops.layernorm_forward` with each row mean as a matrix-vector product
    (:func:`_row_mean`), fewer temporaries, and the rows in cache-sized blocks shared over the
    CPU threads (:func:`_row_blocks`); same cache. Small inputs take the plain op."""
    if x.size <= SMALL_FLOATS:
        return layernorm_forward(x, w, b, eps)
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    out, norm = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((N, 1), dtype=x.dtype)

    def block(r0, r1, _scratch):
        xc, o, rs = norm[r0:r1], out[r0:r1], rstd[r0:r1]
        xs = x2[r0:r1]
        xp.subtract(xs, _row_mean(xs, C), out=xc)
        xp.multiply(xc, xc, out=o)  # the square, in the output's buffer for now
        rs[...] = _row_mean(o, C)  # var, then 1 / sqrt(var + eps) in place
        rs += eps
        xp.sqrt(rs, out=rs)
        xp.reciprocal(rs, out=rs)
        xc *= rs  # norm
        xp.multiply(xc, w, out=o)
        o += b
    _row_blocks(N, C, block)
    return out.reshape(x.shape), (norm.reshape(x.shape), w, rstd.reshape(*x.shape[:-1], 1))


def layernorm_backward_fast(dout, cache, need_dx=True, need_dw=True):
    """:func:`~minilora.nn.ops.layernorm_backward` with row means as matrix-vector products, the column sums
    by ``einsum`` and a vector-matrix product, and dx in row blocks over the threads."""
    norm, w, rstd = cache
    if norm.size <= SMALL_FLOATS:
        return layernorm_backward(dout, cache, need_dx, need_dw)
    C = w.shape[0]
    n2, d2 = norm.reshape(-1, C), dout.reshape(-1, C)  # (N, C)
    r2 = rstd.reshape(-1, 1)
    dx = dw = db = None
    if need_dx:
        dx = xp.empty_like(d2)

        def block(r0, r1, scratch):
            ns, dnorm, tmp = n2[r0:r1], dx[r0:r1], scratch(d2.dtype)
            xp.multiply(d2[r0:r1], w, out=dnorm)
            xp.multiply(dnorm, ns, out=tmp)
            m2 = _row_mean(tmp, C)  # mean(dnorm * norm): (rows, 1)
            dnorm -= _row_mean(dnorm, C)
            dnorm -= xp.multiply(ns, m2, out=tmp)
            dnorm *= r2[r0:r1]
        _row_blocks(n2.shape[0], C, block)
        dx = dx.reshape(dout.shape)
    if need_dw:
        dw = xp.einsum("ij,ij->j", d2, n2)
        db = xp.matmul(xp.ones((1, d2.shape[0]), dtype=d2.dtype), d2).reshape(C)
    return dx, dw, db


def gelu_forward_fast(x):
    """:func:`~minilora.nn.ops.gelu_forward` block by block (:func:`_row_blocks`); same cache.
    Small inputs take the plain op."""
    if x.size <= SMALL_FLOATS:
        return gelu_forward(x)
    L = x.shape[-1]
    x2 = x.reshape(-1, L)
    out, t = xp.empty_like(x2), xp.empty_like(x2)

    def block(r0, r1, _scratch):
        xs, ts, os = x2[r0:r1], t[r0:r1], out[r0:r1]
        xp.multiply(xs, xs, out=ts)  # t = tanh(x (k + k c x^2)), built in place
        ts *= GELU_K * GELU_C
        ts += GELU_K
        ts *= xs
        xp.tanh(ts, out=ts)
        xp.add(ts, 1.0, out=os)  # out = 0.5 x (1 + t)
        os *= xs
        os *= 0.5
    _row_blocks(x2.shape[0], L, block)
    return out.reshape(x.shape), (x, t.reshape(x.shape))


def gelu_backward_fast(dout, cache):
    """:func:`~minilora.nn.ops.gelu_backward` block by block (:func:`_row_blocks`), one scratch block per
    thread. Small inputs take the plain op."""
    x, t = cache
    if x.size <= SMALL_FLOATS:
        return gelu_backward(dout, cache)
    L = x.shape[-1]
    x2, t2, d2 = x.reshape(-1, L), t.reshape(-1, L), dout.reshape(-1, L)
    dx = xp.empty_like(d2)

    def block(r0, r1, scratch):
        xs, ts, ds = x2[r0:r1], t2[r0:r1], dx[r0:r1]
        sech2 = scratch(ts.dtype)
        xp.multiply(xs, xs, out=ds)
        ds *= 3.0 * GELU_C * GELU_K
        ds += GELU_K  # k (1 + 3 c x^2)
        xp.multiply(ts, ts, out=sech2)
        xp.subtract(1.0, sech2, out=sech2)  # 1 - t^2
        ds *= sech2
        ds *= xs
        ds += ts
        ds += 1.0
        ds *= 0.5
        ds *= d2[r0:r1]
    _row_blocks(x2.shape[0], L, block)
    return dx.reshape(dout.shape)


class TiledAttentionCache(NamedTuple):
    """What :func:`attention_backward_fast` needs: the split heads and one softmax block per
    query tile (tile i: queries t0 .. t1-1 over keys 0 .. t1 + P - 1)."""
    qh: object   # (B, NH, T, hs)
    kh: object   # (B, NH, Tk, hs)
    vh: object   # (B, NH, Tk, hs)
    tiles: list  # [(t0, t1, att (B, NH, t1 - t0, t1 + P))]


def attention_tile(T: int) -> int:
    """Queries per tile of :func:`attention_forward_fast`: 32 up to T = 128, then T / 4 (the
    fastest of 16-128 on a 2-core CPU at the bench's T = 128 and 256)."""
    return max(32, T // 4)


def attention_forward_fast(q, k, v, n_head, tile: int | None = None):
    """:func:`~minilora.nn.ops.attention_forward` over query tiles, skipping the masked half of the T x T square.

    Tile [t0, t1) attends to keys 0 .. t1 + P - 1 only (queries see nothing later), so with n
    tiles the scores cost (n + 1) / 2n of the full square (0.625 at n = 4), and each tile's
    scores stay small enough for the cache during the softmax. Only the tile's diagonal block
    needs the causal mask. The output is written straight into (B, T, NH, hs) order, so merging
    the heads is free. The batch is shared out over the CPU threads
    (:func:`minilora.threads.parallel_chunks`: the per-head GEMMs are too small for BLAS to
    thread). Returns y (B, T, C), cache = :class:`TiledAttentionCache` (a small input, e.g. a
    decoding step, takes the plain op and returns its :class:`~minilora.nn.ops.AttentionCache`).
    """
    B, T, C = q.shape
    Tk = k.shape[1]
    if B * n_head * T * Tk <= SMALL_FLOATS:  # a decoding step: the plain op (its own cache)
        return attention_forward(q, k, v, n_head)
    P, hs = Tk - T, C // n_head
    tile = tile or attention_tile(T)
    qh, kh, vh = split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head)
    scale = 1.0 / math.sqrt(hs)
    y = xp.empty((B, T, n_head, hs), dtype=q.dtype)
    yh = y.transpose(0, 2, 1, 3)  # (B, NH, T, hs) view
    bounds = [(t0, min(t0 + tile, T)) for t0 in range(0, T, tile)]
    tiles = [(t0, t1, xp.empty((B, n_head, t1 - t0, t1 + P), dtype=q.dtype)) for t0, t1 in bounds]
    masks = {n: causal_mask_bias(n, n, q.dtype) for n in {t1 - t0 for t0, t1 in bounds} if n > 1}

    def run(b0, b1):
        for t0, t1, att in tiles:
            kend = t1 + P
            s = att[b0:b1]  # (b, NH, tq, kend), this thread's rows
            xp.matmul(qh[b0:b1, :, t0:t1], kh[b0:b1, :, :kend].transpose(0, 1, 3, 2), out=s)
            s *= scale
            if t1 - t0 > 1:  # keys t0+P .. kend-1 form the tile's diagonal block: causal there
                s[..., t0 + P:kend] += masks[t1 - t0]
            _softmax_inplace(s)
            yh[b0:b1, :, t0:t1] = xp.matmul(s, vh[b0:b1, :, :kend])
    parallel_chunks(B, run)
    return y.reshape(B, T, C), TiledAttentionCache(qh, kh, vh, tiles)


def attention_backward_fast(dout, cache: TiledAttentionCache):
    """:func:`~minilora.nn.ops.attention_backward` tile by tile (the tiles of :func:`attention_forward_fast`);
    dk and dv sum the contributions of every tile that saw each key. Batch shared over the
    threads as in the forward."""
    if isinstance(cache, AttentionCache):  # the forward took the plain op (small input)
        return attention_backward(dout, cache)
    qh, kh, vh, tiles = cache
    B, NH, T, hs = qh.shape
    Tk = kh.shape[2]
    P = Tk - T
    scale = 1.0 / math.sqrt(hs)
    dy = split_heads(dout, NH)  # (B, NH, T, hs)
    dq = xp.empty((B, T, NH, hs), dtype=qh.dtype)
    dk = xp.zeros((B, Tk, NH, hs), dtype=qh.dtype)
    dv = xp.zeros((B, Tk, NH, hs), dtype=qh.dtype)
    dqh, dkh, dvh = (a.transpose(0, 2, 1, 3) for a in (dq, dk, dv))  # (B, NH, ., hs) views

    def run(b0, b1):
        for t0, t1, att in tiles:
            kend = t1 + P
            a, dyt = att[b0:b1], dy[b0:b1, :, t0:t1]
            datt = xp.matmul(dyt, vh[b0:b1, :, :kend].transpose(0, 1, 3, 2))  # (b, NH, tq, kend)
            dvh[b0:b1, :, :kend] += xp.matmul(a.transpose(0, 1, 3, 2), dyt)
            ds = _softmax_backward_inplace(datt, a)
            ds *= scale
            dqh[b0:b1, :, t0:t1] = xp.matmul(ds, kh[b0:b1, :, :kend])
            dkh[b0:b1, :, :kend] += xp.matmul(ds.transpose(0, 1, 3, 2), qh[b0:b1, :, t0:t1])
    parallel_chunks(B, run)
    C = NH * hs
    return dq.reshape(B, T, C), dk.reshape(B, Tk, C), dv.reshape(B, Tk, C)


# ----------------------------------------------------------------------------------------------
# linear, its GEMMs shared over the threads (for BLAS kept at one thread per call)
# ----------------------------------------------------------------------------------------------
#: rows per thread below which a linear layer's GEMM is one call
MIN_ROWS_PER_THREAD = 256


def matmul_rows(a, b, min_rows: int = MIN_ROWS_PER_THREAD):
    """``a @ b`` (a: (m, k), b: (k, n)) with the rows of a shared over the CPU threads, each
    thread one BLAS call writing its rows of the result; one call with one thread."""
    out = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    parallel_chunks(a.shape[0], lambda i0, i1: xp.matmul(a[i0:i1], b, out=out[i0:i1]),
                    min_per_thread=min_rows)
    return out


def linear_forward_fast(x, w, b=None, keep_x: bool = True):
    """:func:`~minilora.nn.ops.linear_forward` with the rows of x shared over the CPU threads
    (:func:`matmul_rows`); same cache. One call when there is one thread
    (:func:`minilora.threads.cpu_threads`), as when BLAS threads itself."""
    if x.dtype != w.dtype:  # mixed precision: the plain op (NumPy's promotion rules)
        return linear_forward(x, w, b, keep_x)
    d_out, d_in = w.shape
    out = matmul_rows(x.reshape(-1, d_in), w.T)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], d_out), (x if keep_x else None, w, b is not None)


def linear_backward_fast(dout, cache, need_dx=True, need_dw=True, need_db=True):
    """:func:`~minilora.nn.ops.linear_backward` with dx shared over the threads by rows and dW
    by output rows (:func:`matmul_rows`); the same gradients."""
    x, w, has_bias = cache
    if (dout.dtype != w.dtype or (x is not None and x.dtype != w.dtype)
            or (need_dw and x is None)):  # mixed precision, or the plain op's error for dW
        return linear_backward(dout, cache, need_dx, need_dw, need_db)
    d_out, d_in = w.shape
    dout2 = dout.reshape(-1, d_out)
    dx = dw = db = None
    if need_dx:
        dx = matmul_rows(dout2, w).reshape(*dout.shape[:-1], d_in)
    if need_dw:
        dw = matmul_rows(dout2.T, x.reshape(-1, d_in), min_rows=16)  # (d_out, d_in)
    if need_db and has_bias:
        db = xp.matmul(xp.ones((1, dout2.shape[0]), dtype=dout2.dtype), dout2).reshape(d_out)
    return dx, dw, db
