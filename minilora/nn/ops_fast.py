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
from minilora.nn.ops import (
    GELU_C,
    GELU_K,
    AttentionCache,
    attention_backward,
    attention_forward,
    causal_mask_bias,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    merge_heads,
    split_heads,
)
from minilora.threads import parallel_chunks

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


def block_rows(n_rows: int, row_len: int) -> int:
    """Rows per block of :func:`_row_blocks`: about :data:`BLOCK_FLOATS` floats (all rows on
    CuPy). The same for any thread count."""
    return n_rows if is_cupy() else max(1, min(n_rows, BLOCK_FLOATS // max(1, row_len)))


def _row_blocks(n_rows: int, row_len: int, block) -> None:
    """Call ``block(r0, r1, scratch)`` over row blocks of :func:`block_rows` rows that cover
    rows 0 .. n_rows-1 (every block starts at a multiple of it), the blocks shared out over the
    CPU threads (:func:`minilora.threads.parallel_chunks`); ``scratch`` is a per-thread
    ``(rows, row_len)`` buffer factory. On CuPy: one block, all rows (the GPU is parallel
    already)."""
    rows = block_rows(n_rows, row_len)
    n_blocks = -(-n_rows // rows)

    def chunk(k0, k1):
        scratch = {}

        def buf(dtype):  # one scratch block per thread and dtype, reused across its blocks
            if dtype not in scratch:
                scratch[dtype] = xp.empty((rows, row_len), dtype=dtype)
            return scratch[dtype]
        for k in range(k0, k1):
            r0, r1 = k * rows, min((k + 1) * rows, n_rows)
            block(r0, r1, lambda dtype: buf(dtype)[: r1 - r0])
    parallel_chunks(n_blocks, chunk)


def _row_mean(a2, C):
    """Mean over the last axis of a 2-D (N, C) array as one matrix-vector product (N, 1): BLAS
    sums rows of C = 128 floats several times faster than ``mean(axis=-1)``'s pairwise loop."""
    return xp.matmul(a2, xp.full((C, 1), 1.0 / C, dtype=a2.dtype))


def layernorm_forward_fast(x, w, b, eps=1e-5):
    """:func:`~minilora.nn.ops.layernorm_forward` with each row mean as a matrix-vector product
    (:func:`_row_mean`), fewer temporaries, and the rows in cache-sized blocks shared over the
    CPU threads (:func:`_row_blocks`); same cache. Small inputs take the plain op."""
    if x.size <= SMALL_FLOATS:
        return layernorm_forward(x, w, b, eps) if is_cupy() else _layernorm_small(x, w, b, eps)
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


def _layernorm_small(x, w, b, eps):
    """:func:`~minilora.nn.ops.layernorm_forward`'s arithmetic call for call, the same floats
    and cache, without ``mean``'s Python layer (a decoding step's rows: there, the calls' own
    overhead is the cost). NumPy only."""
    C = xp.intp(x.shape[-1])  # as np.mean divides: by the count as an intp
    mean = xp.add.reduce(x, axis=-1, keepdims=True)
    xp.true_divide(mean, C, out=mean, casting="unsafe")
    xc = x - mean
    var = xp.add.reduce(xc * xc, axis=-1, keepdims=True)
    xp.true_divide(var, C, out=var, casting="unsafe")
    var += eps
    rstd = xp.true_divide(1.0, xp.sqrt(var, out=var), out=var)
    xc *= rstd  # norm
    out = xc * w
    out += b
    return out, (xc, w, rstd)


def layernorm_backward_fast(dout, cache, need_dx=True, need_dw=True):
    """:func:`~minilora.nn.ops.layernorm_backward` in row blocks shared over the threads, with
    every row mean and column sum as a BLAS matrix-vector product::

        m1 = mean(dout * w) = dout @ (w / C)            m2 = mean(dnorm * norm) = (dout * norm) @ (w / C)
        dx = (dout * w - m1 - norm * m2) * rstd         dw, db: column sums of dout * norm, dout

    dw and db are summed block by block (the blocks do not depend on the thread count, so
    neither do the sums)."""
    norm, w, rstd = cache
    if norm.size <= SMALL_FLOATS:
        return layernorm_backward(dout, cache, need_dx, need_dw)
    C = w.shape[0]
    n2, d2 = norm.reshape(-1, C), dout.reshape(-1, C)  # (N, C)
    r2 = rstd.reshape(-1, 1)
    N = n2.shape[0]
    rows = block_rows(N, C)
    n_blocks = -(-N // rows)
    dx = xp.empty_like(d2) if need_dx else None
    parts = xp.empty((2, n_blocks, C), dtype=d2.dtype) if need_dw else None  # dw, db per block
    wc = (w / C).reshape(C, 1)

    def block(r0, r1, scratch):
        ds, ns = d2[r0:r1], n2[r0:r1]
        dn = xp.multiply(ds, ns, out=scratch(d2.dtype))  # dout * norm
        if need_dw:
            ones = xp.ones((1, r1 - r0), dtype=d2.dtype)
            k = r0 // rows
            xp.matmul(ones, dn, out=parts[0, k:k + 1])
            xp.matmul(ones, ds, out=parts[1, k:k + 1])
        if need_dx:
            m2 = xp.matmul(dn, wc)  # (rows, 1)
            m1 = xp.matmul(ds, wc)
            o = dx[r0:r1]
            xp.multiply(ds, w, out=o)
            o -= m1
            o -= xp.multiply(ns, m2, out=dn)
            o *= r2[r0:r1]
    _row_blocks(N, C, block)
    dw = db = None
    if need_dw:
        dw, db = parts.sum(axis=1)
    return (dx.reshape(dout.shape) if need_dx else None), dw, db


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
    """What :func:`attention_backward_fast` needs: the split heads (queries already scaled by
    1 / sqrt(hs)), one block of unnormalised weights per query tile, stored keys-major (tile i:
    keys 0 .. t1 + P - 1 by queries t0 .. t1-1), and the softmax's sums (one per query)."""
    qh: object   # (B, NH, T, hs) queries times 1 / sqrt(hs)
    kh: object   # (B, NH, Tk, hs)
    vh: object   # (B, NH, Tk, hs)
    tiles: list  # [(t0, t1, e (B, NH, t1 + P, t1 - t0))], e = exp(s^T - colmax s^T)
    z: object    # (B, NH, 1, T) sums of e over the keys: the attention weights are e^T / z


def attention_tile(T: int) -> int:
    """Queries per tile of :func:`attention_forward_fast`: 32 up to T = 128, then T / 4 (the
    fastest of 16-256 on the 2-core CPU at the bench's T = 128 and 256)."""
    return max(32, T // 4)


def attention_forward_fast(q, k, v, n_head, tile: int | None = None):
    """:func:`~minilora.nn.ops.attention_forward` over query tiles, skipping the masked half of
    the T x T square, with the scores keys-major and the softmax's division on the output.

    Tile [t0, t1) attends to keys 0 .. t1 + P - 1 only (queries see nothing later), so with n
    tiles the scores cost (n + 1) / 2n of the full square (0.625 at n = 4), and each tile's
    scores stay small enough for the cache during the softmax. Only the tile's diagonal block
    needs the causal mask. Per tile and head, with qs = q / sqrt(hs) (scaled once)::

        S = k qs^T   (keys x queries)      e = exp(S - colmax S)      z = colsum e
        y = (e^T v) / z                    (= softmax(qs k^T + mask) v)

    Keys-major, no product has a transposed view as its right operand (NumPy's stacked matmul
    runs those 2.5x slower: qs^T is laid out once per layer) and the mask is a contiguous
    block; the large block is never scaled or divided: those passes fall on q and on y, 8x
    smaller at T = 256, hs = 32. The output is written straight into (B, T, NH, hs) order, so
    merging the heads is free. The batch is shared out over the CPU threads
    (:func:`minilora.threads.parallel_chunks`: the per-head GEMMs are too small for BLAS to
    thread). Returns y (B, T, C), cache = :class:`TiledAttentionCache` (a small input, e.g. a
    decoding step, takes the plain op and returns its :class:`~minilora.nn.ops.AttentionCache`).
    """
    B, T, C = q.shape
    Tk = k.shape[1]
    if T == 1 and not is_cupy():  # a decoding step: one query attends to every key
        return _attention_one_query(q, k, v, n_head)
    if B * n_head * T * Tk <= SMALL_FLOATS:  # small: the plain op (its own cache)
        return attention_forward(q, k, v, n_head)
    P, hs = Tk - T, C // n_head
    tile = tile or attention_tile(T)
    qs = xp.empty_like(q)  # q / sqrt(hs), written by each thread for its sequences
    qh, kh, vh = split_heads(qs, n_head), split_heads(k, n_head), split_heads(v, n_head)
    y = xp.empty((B, T, n_head, hs), dtype=q.dtype)
    yh = y.transpose(0, 2, 1, 3)  # (B, NH, T, hs) view
    z = xp.empty((B, n_head, 1, T), dtype=q.dtype)
    bounds = [(t0, min(t0 + tile, T)) for t0 in range(0, T, tile)]
    tiles = [(t0, t1, xp.empty((B, n_head, t1 + P, t1 - t0), dtype=q.dtype)) for t0, t1 in bounds]
    masks = {n: causal_mask_bias(n, n, q.dtype).T.copy()  # keys x queries
             for n in {t1 - t0 for t0, t1 in bounds} if n > 1}

    def run(b0, b1):
        xp.multiply(q[b0:b1], 1.0 / math.sqrt(hs), out=qs[b0:b1])
        # qs^T per head, contiguous: NumPy's matmul is 2.5x slower on a transposed right operand
        qT = xp.ascontiguousarray(qh[b0:b1].transpose(0, 1, 3, 2))  # (b, NH, hs, T)
        for t0, t1, e in tiles:
            kend = t1 + P
            s = e[b0:b1]  # (b, NH, kend, tq), this thread's sequences
            xp.matmul(kh[b0:b1, :, :kend], qT[..., t0:t1], out=s)
            if t1 - t0 > 1:  # keys t0+P .. kend-1 form the tile's diagonal block: causal there
                s[:, :, t0 + P:kend] += masks[t1 - t0]
            s -= s.max(axis=-2, keepdims=True)
            xp.exp(s, out=s)
            zt = s.sum(axis=-2, keepdims=True)  # (b, NH, 1, tq)
            z[b0:b1, :, :, t0:t1] = zt
            yt = xp.matmul(s.transpose(0, 1, 3, 2), vh[b0:b1, :, :kend])  # (b, NH, tq, hs)
            yt /= zt.transpose(0, 1, 3, 2)
            yh[b0:b1, :, t0:t1] = yt
    parallel_chunks(B, run)
    return y.reshape(B, T, C), TiledAttentionCache(qh, kh, vh, tiles, z)


def _attention_one_query(q, k, v, n_head):
    """:func:`~minilora.nn.ops.attention_forward` for one query per sequence (T = 1, no mask),
    keys-major: the scores as a column per head (k q^T), so no transposed operand and no copy
    of the heads; the same floats and cache as the plain op. NumPy only."""
    B, _, C = q.shape
    Tk, hs = k.shape[1], C // n_head
    kh = k.reshape(B, Tk, n_head, hs).transpose(0, 2, 1, 3)  # (B, NH, Tk, hs) views
    vh = v.reshape(B, Tk, n_head, hs).transpose(0, 2, 1, 3)
    s = xp.matmul(kh, q.reshape(B, n_head, hs, 1))  # (B, NH, Tk, 1)
    s *= 1.0 / math.sqrt(hs)
    s -= s.max(axis=-2, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-2, keepdims=True)
    att = s.reshape(B, n_head, 1, Tk)
    y = xp.matmul(att, vh)  # (B, NH, 1, hs)
    qh = q.reshape(B, 1, n_head, hs).transpose(0, 2, 1, 3)
    return y.reshape(B, 1, C), AttentionCache(qh, kh, vh, att)


def attention_backward_fast(dout, cache: TiledAttentionCache):
    """:func:`~minilora.nn.ops.attention_backward` tile by tile (the tiles of
    :func:`attention_forward_fast`); dk and dv sum the contributions of every tile that saw
    each key. Keys-major, with a = e / z the weights (a column per query)::

        D = v dy^T                     r = colsum(D * e) / z      (= rowsum(datt * att))
        G = e * (D - r)                ds^T = G / z                (the softmax's backward)
        dv = e (dy / z)                dq = (G^T k) / (z sqrt(hs))      dk = G (qs / z)

    so the large (Tk, tq) block takes three passes (D * e, e * r, the difference) and a
    column sum; every 1 / z and 1 / sqrt(hs) falls on a (tq, hs) operand. Batch shared over
    the threads as in the forward."""
    if isinstance(cache, AttentionCache):  # the forward took the plain op (small input)
        return attention_backward(dout, cache)
    qh, kh, vh, tiles, z = cache
    B, NH, T, hs = qh.shape
    Tk = kh.shape[2]
    P = Tk - T
    scale = 1.0 / math.sqrt(hs)
    dy = split_heads(dout, NH)  # (B, NH, T, hs) view
    dq = xp.empty((B, T, NH, hs), dtype=qh.dtype)
    dkh = xp.zeros((B, NH, Tk, hs), dtype=qh.dtype)  # heads first: contiguous accumulation
    dvh = xp.zeros((B, NH, Tk, hs), dtype=qh.dtype)
    dqh = dq.transpose(0, 2, 1, 3)  # (B, NH, T, hs) view
    largest = max(e[0].size for _, _, e in tiles)

    def run(b0, b1):
        rz = 1.0 / z[b0:b1].transpose(0, 1, 3, 2)  # (b, NH, T, 1)
        dyz = dy[b0:b1] * rz  # dy / z
        qz = qh[b0:b1] * rz  # qs / z
        rz *= scale  # 1 / (z sqrt(hs)), for dq
        dyT = xp.ascontiguousarray(dy[b0:b1].transpose(0, 1, 3, 2))  # (b, NH, hs, T)
        buf = xp.empty(2 * (b1 - b0) * largest, dtype=qh.dtype)  # two (kend, tq) blocks
        for t0, t1, e in tiles:
            kend = t1 + P
            et = e[b0:b1]
            g = buf[:et.size].reshape(et.shape)
            tmp = buf[et.size:2 * et.size].reshape(et.shape)
            xp.matmul(vh[b0:b1, :, :kend], dyT[..., t0:t1], out=g)  # D = datt^T
            dvh[b0:b1, :, :kend] += xp.matmul(et, dyz[:, :, t0:t1])
            g *= et
            r = g.sum(axis=-2, keepdims=True)  # (b, NH, 1, tq)
            r /= z[b0:b1, :, :, t0:t1]
            g -= xp.multiply(et, r, out=tmp)  # G = e * (D - r)
            dqt = xp.matmul(g.transpose(0, 1, 3, 2), kh[b0:b1, :, :kend])
            dqt *= rz[:, :, t0:t1]
            dqh[b0:b1, :, t0:t1] = dqt
            dkh[b0:b1, :, :kend] += xp.matmul(g, qz[:, :, t0:t1])
    parallel_chunks(B, run)
    C = NH * hs
    return (dq.reshape(B, T, C), merge_heads(dkh), merge_heads(dvh))


# ----------------------------------------------------------------------------------------------
# linear, its GEMMs shared over the threads (for BLAS kept at one thread per call)
# ----------------------------------------------------------------------------------------------
#: rows per thread below which a linear layer's GEMM is one call
MIN_ROWS_PER_THREAD = 256


def matmul_rows(a, b, min_rows: int = MIN_ROWS_PER_THREAD, bias=None):
    """``a @ b (+ bias)`` (a: (m, k), b: (k, n), bias: (n,)) with the rows of a shared over the
    CPU threads, each thread one BLAS call writing its rows of the result (and adding the bias
    to them while they are in its cache); one call with one thread."""
    out = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)

    def rows(i0, i1):
        xp.matmul(a[i0:i1], b, out=out[i0:i1])
        if bias is not None:
            out[i0:i1] += bias
    parallel_chunks(a.shape[0], rows, min_per_thread=min_rows)
    return out


def add(a, b, out=None):
    """``a + b`` for two arrays of one shape (a residual connection), into ``out`` (may be
    ``a`` itself) or a new array, rows shared over the CPU threads. Small arrays (a decoding
    step's) or broadcasting: one NumPy call."""
    if a.size <= SMALL_FLOATS or a.shape != b.shape:
        return xp.add(a, b, out=out)
    out = xp.empty_like(a) if out is None else out
    a2, b2, o2 = (t.reshape(-1, a.shape[-1]) for t in (a, b, out))

    def rows(i0, i1):
        xp.add(a2[i0:i1], b2[i0:i1], out=o2[i0:i1])
    # memory-bound: a thread pays only from 4 cache blocks of rows on (small 3.3 -> 4.8 ms a
    # step on 2 threads with a block each, medium 11.8 -> 10.5 with two each; load 1)
    parallel_chunks(a2.shape[0], rows, min_per_thread=4 * max(1, BLOCK_FLOATS // a2.shape[1]))
    return out


def linear_forward_fast(x, w, b=None, keep_x: bool = True):
    """:func:`~minilora.nn.ops.linear_forward` with the rows of x shared over the CPU threads
    (:func:`matmul_rows`); same cache. One call when there is one thread
    (:func:`minilora.threads.cpu_threads`), as when BLAS threads itself."""
    if x.dtype != w.dtype:  # mixed precision: the plain op (NumPy's promotion rules)
        return linear_forward(x, w, b, keep_x)
    d_out, d_in = w.shape
    x2 = x.reshape(-1, d_in)
    if x2.shape[0] < 2 * MIN_ROWS_PER_THREAD:  # one BLAS call either way (a decoding step)
        out = xp.matmul(x2, w.T)
        if b is not None:
            out += b
    else:
        out = matmul_rows(x2, w.T, bias=b)
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
