"""Pure operations with hand-written backward passes.

Every op is a pair of functions::

    out, cache = <op>_forward(inputs...)      # never mutates its inputs
    grads      = <op>_backward(dout, cache)   # gradients in the order of the forward inputs

The cache holds exactly what the backward pass needs. Each backward is checked against centred
finite differences in float64 (``tests/test_ops_grad.py``, ``minilora gradcheck``).

Shape legend (llm.c's letters):
    B  batch size          T  sequence length (queries)     Tk  key length (T + prefix length)
    C  channels (n_embd)   V  vocabulary size               NH  number of heads
    hs head size (C // NH) d_in, d_out  linear layer in/out features

The backward passes quote the forward line they differentiate, so each gradient can be checked
by eye. ``need_*`` flags let a caller skip work for frozen inputs: a frozen weight costs no
weight-gradient matmul, which is where LoRA's training-step savings come from.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import math
from typing import NamedTuple

from minilora.backend import (
    asarray,  # local: keeps the op module's imports minimal
    xp,
)
from minilora.errors import UsageError

GELU_K = math.sqrt(2.0 / math.pi)  # tanh-approximation constant of GELU (GPT-2's)
GELU_C = 0.044715


# ----------------------------------------------------------------------------------------------
# linear: out = x @ w.T + b
# ----------------------------------------------------------------------------------------------
def linear_forward(x, w, b=None, keep_x: bool = True):
    """Affine map ``out = x @ w.T + b``.

    Args:
        x: (..., d_in) input.
        w: (d_out, d_in) weight (torch / llm.c layout).
        b: (d_out,) bias or None.
        keep_x: keep ``x`` in the cache. Only ``dw`` needs it, so a frozen weight passes False
            and its input can be freed as soon as nothing else holds it (activation memory
            saved by freezing: e.g. the (B, T, 4C) input of a frozen MLP down projection).
    Returns:
        out (..., d_out), cache = (x or None, w, has_bias).
    """
    d_out, d_in = w.shape
    # one (N, d_in) @ (d_in, d_out) GEMM: a stacked (B, T, d_in) @ 2-D matmul would be B small ones
    n = math.prod(x.shape[:-1])  # not reshape(-1, ...): a rank-0 layer has d_in = 0
    out = xp.matmul(x.reshape(n, d_in), w.T).reshape(*x.shape[:-1], d_out)
    if b is not None:
        out += b
    return out, (x if keep_x else None, w, b is not None)


def linear_backward(dout, cache, need_dx=True, need_dw=True, need_db=True):
    """Gradients of ``out = x @ w.T + b``.

    dx = dout @ w           (..., d_in)
    dw = dout^T @ x         (d_out, d_in)   summed over every leading axis
    db = sum(dout)          (d_out,)
    A gradient that is not needed (frozen weight, no bias, first layer) is returned as None and
    costs nothing.
    """
    x, w, has_bias = cache
    d_out, d_in = w.shape
    dout2 = dout.reshape(math.prod(dout.shape[:-1]), d_out)  # (N, d_out); d_out may be 0
    dx = xp.matmul(dout2, w).reshape(*dout.shape[:-1], d_in) if need_dx else None  # (..., d_in)
    dw = db = None
    if need_dw:
        if x is None:
            raise UsageError("linear_backward: dw was asked for, but the forward pass ran with "
                             "keep_x=False (the weight was frozen then); unfreeze before forward")
        dw = xp.matmul(dout2.T, x.reshape(dout2.shape[0], d_in))  # (d_out, d_in)
    if need_db and has_bias:  # column sums as a vector-matrix product: BLAS beats sum(axis=0)
        db = xp.matmul(xp.ones((1, dout2.shape[0]), dtype=dout2.dtype), dout2).reshape(d_out)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# embedding: out = w[idx]
# ----------------------------------------------------------------------------------------------
def embedding_forward(idx, w):
    """Row lookup ``out[b, t] = w[idx[b, t]]``.

    Args:
        idx: (B, T) integer ids in [0, V).
        w: (V, C) table.
    Returns:
        out (B, T, C), cache = (idx, V).
    """
    return w[idx], (idx, w.shape[0])


def embedding_backward(dout, cache):
    """``dw[v] = sum of dout[b, t] over all (b, t) with idx[b, t] == v``; (V, C).

    The scatter-add is done as a matmul with a one-hot matrix when V is small (a BLAS call beats
    ``add.at`` there), else with ``add.at``.
    """
    idx, V = cache
    C = dout.shape[-1]
    flat_idx = idx.reshape(-1)
    flat = dout.reshape(-1, C)
    if V * flat_idx.size <= 1 << 24:  # one-hot (N, V) stays small: 16M entries at most
        onehot = (flat_idx[:, None] == xp.arange(V)[None, :]).astype(dout.dtype)  # (N, V)
        return xp.matmul(onehot.T, flat)
    dw = xp.zeros((V, C), dtype=dout.dtype)
    xp.add.at(dw, flat_idx, flat)
    return dw


# ----------------------------------------------------------------------------------------------
# layernorm: out = (x - mean) / sqrt(var + eps) * w + b, over the last axis
# ----------------------------------------------------------------------------------------------
def layernorm_forward(x, w, b, eps=1e-5):
    """LayerNorm over the last axis.

    mean = x.mean(-1); rstd = 1 / sqrt(x.var(-1) + eps); norm = (x - mean) * rstd
    out = norm * w + b
    Args: x (..., C); w, b (C,). Returns out (..., C), cache = (norm, w, rstd).

    The layers call :func:`minilora.nn.ops_fast.layernorm_forward_fast`, the same formula with the row means done
    by BLAS (a test checks the two agree).
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    norm = xc
    norm *= rstd  # in place: xc is ours
    out = norm * w + b
    return out, (norm, w, rstd)


def layernorm_backward(dout, cache, need_dx=True, need_dw=True):
    """Gradients of LayerNorm.

    forward: norm = (x - mean) * rstd;  out = norm * w + b
    dnorm = dout * w
    dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))     (..., C)
    dw = sum(dout * norm), db = sum(dout)                             (C,)

    (The layers call :func:`minilora.nn.ops_fast.layernorm_backward_fast`.)
    """
    norm, w, rstd = cache
    C = w.shape[0]
    dx = dw = db = None
    if need_dx:
        dnorm = dout * w
        dx = dnorm - dnorm.mean(axis=-1, keepdims=True)
        dx -= norm * (dnorm * norm).mean(axis=-1, keepdims=True)
        dx *= rstd
    if need_dw:
        dw = (dout * norm).reshape(-1, C).sum(axis=0)
        db = dout.reshape(-1, C).sum(axis=0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# GELU (tanh approximation, as GPT-2)
# ----------------------------------------------------------------------------------------------
def gelu_forward(x):
    """``out = 0.5 x (1 + tanh(k (x + c x^3)))`` with k = sqrt(2/pi), c = 0.044715.

    cache = (x, t = tanh(k (x + c x^3))). The layers call
    :func:`minilora.nn.ops_fast.gelu_forward_fast`: the same
    passes on one cache-sized block of rows at a time, the blocks shared over the cores.
    """
    t = x * x  # built in place in one buffer: t = tanh(k x (1 + c x^2))
    t *= GELU_C
    t += 1.0
    t *= x
    t *= GELU_K
    xp.tanh(t, out=t)
    out = t + 1.0
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    """forward: out = 0.5 x (1 + t), t = tanh(u), u = k (x + c x^3)
    dout/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2).

    (The layers call :func:`minilora.nn.ops_fast.gelu_backward_fast`, block by block.)"""
    x, t = cache
    dx = x * x  # two buffers, updated in place (this op is memory-bound)
    dx *= 3.0 * GELU_C * GELU_K
    dx += GELU_K  # k (1 + 3 c x^2)
    sech2 = t * t
    xp.subtract(1.0, sech2, out=sech2)  # 1 - t^2
    dx *= sech2
    dx *= x
    dx += t
    dx += 1.0
    dx *= 0.5
    dx *= dout
    return dx


# ----------------------------------------------------------------------------------------------
# softmax over the last axis
# ----------------------------------------------------------------------------------------------
def _softmax_inplace(y):
    """Softmax over the last axis, overwriting ``y`` (only for buffers the caller owns)."""
    y -= y.max(axis=-1, keepdims=True)
    xp.exp(y, out=y)
    y /= y.sum(axis=-1, keepdims=True)
    return y


def softmax_forward(x):
    """``y = exp(x - max x) / sum exp(x - max x)`` over the last axis. cache = y."""
    y = _softmax_inplace(x.copy())
    return y, y


def _softmax_backward_inplace(dout, y):
    """``softmax_backward`` overwriting ``dout`` (only for buffers the caller owns)."""
    dout -= (dout * y).sum(axis=-1, keepdims=True)
    dout *= y
    return dout


def softmax_backward(dout, cache):
    """``dx = y * (dout - sum(dout * y))`` (the Jacobian diag(y) - y y^T applied to dout)."""
    return _softmax_backward_inplace(dout.copy(), cache)


# ----------------------------------------------------------------------------------------------
# causal multi-head self-attention (the projections are separate linear layers)
# ----------------------------------------------------------------------------------------------
def causal_mask_bias(T, Tk, dtype):
    """(T, Tk) additive mask: 0 where query t may see key j, -inf elsewhere.

    With Tk > T the first ``Tk - T`` keys come before the queries (a prefix, or the cached keys
    of earlier tokens) and every query sees them; query t sees key j iff ``j <= t + (Tk - T)``.
    """
    P = Tk - T
    allowed = xp.arange(Tk)[None, :] <= (xp.arange(T)[:, None] + P)
    return xp.where(allowed, 0.0, -xp.inf).astype(dtype)


def split_heads(x, n_head):
    """(B, T, C) -> (B, NH, T, hs)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, NH, T, hs) -> (B, T, C), contiguous."""
    B, NH, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


class AttentionCache(NamedTuple):
    """What :func:`attention_backward` needs from the forward pass (heads split)."""
    qh: object   # (B, NH, T, hs) queries
    kh: object   # (B, NH, Tk, hs) keys (earlier keys first)
    vh: object   # (B, NH, Tk, hs) values
    att: object  # (B, NH, T, Tk) attention weights (softmax output)


def attention_forward(q, k, v, n_head):
    """Causal scaled dot-product attention, all heads at once (no loop over heads or positions).
    The layers call :func:`minilora.nn.ops_fast.attention_forward_fast`, the same over query
    tiles.

    att = softmax(q k^T / sqrt(hs) + mask)      (B, NH, T, Tk)
    y   = att v                                 (B, NH, T, hs) -> merged to (B, T, C)
    Args:
        q: (B, T, C) queries; k, v: (B, Tk, C) keys and values (Tk >= T). The first Tk - T
            keys belong to earlier positions (a decoding step's cached past, or prefix tuning's
            trainable prefix) and every query sees them; the last T are the queries' own.
        n_head: NH, must divide C.
    Returns:
        y (B, T, C), cache = :class:`AttentionCache`.
    """
    B, T, C = q.shape
    Tk = k.shape[1]
    hs = C // n_head
    qh, kh, vh = split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head)
    scale = 1.0 / math.sqrt(hs)
    scores = xp.matmul(qh, kh.transpose(0, 1, 3, 2))  # (B, NH, T, Tk)
    scores *= scale
    if T > 1:  # one query (a decoding step) sees every key: its mask row is all zeros
        scores += causal_mask_bias(T, Tk, scores.dtype)
    att = _softmax_inplace(scores)  # scores is our own buffer: no copy
    y = xp.matmul(att, vh)  # (B, NH, T, hs)
    return merge_heads(y), AttentionCache(qh, kh, vh, att)


def attention_backward(dout, cache):
    """Gradients of causal attention; returns (dq, dk, dv), each shaped like its input.

    forward: y = att @ v          -> datt = dy @ v^T,  dv = att^T @ dy
    forward: att = softmax(s)     -> ds = att * (datt - sum(datt * att))   (masked: att = 0 -> 0)
    forward: s = q @ k^T * scale  -> dq = ds @ k * scale,  dk = ds^T @ q * scale
    """
    qh, kh, vh, att = cache
    n_head, hs = qh.shape[1], qh.shape[3]
    scale = 1.0 / math.sqrt(hs)
    dy = split_heads(dout, n_head)  # (B, NH, T, hs)
    datt = xp.matmul(dy, vh.transpose(0, 1, 3, 2))  # (B, NH, T, Tk)
    dvh = xp.matmul(att.transpose(0, 1, 3, 2), dy)  # (B, NH, Tk, hs)
    ds = _softmax_backward_inplace(datt, att)  # datt is our own buffer: no copy
    ds *= scale
    dqh = xp.matmul(ds, kh)  # (B, NH, T, hs)
    dkh = xp.matmul(ds.transpose(0, 1, 3, 2), qh)  # (B, NH, Tk, hs)
    return merge_heads(dqh), merge_heads(dkh), merge_heads(dvh)


# ----------------------------------------------------------------------------------------------
# residual: out = x + y
# ----------------------------------------------------------------------------------------------
def residual_forward(x, y):
    """``out = x + y`` (the skip connection). cache = None."""
    return x + y, None


def residual_backward(dout, cache):
    """Both branches receive the upstream gradient unchanged: ``dx = dy = dout``."""
    return dout, dout


# ----------------------------------------------------------------------------------------------
# dropout (inverted): out = x * mask / (1 - p)
# ----------------------------------------------------------------------------------------------
def dropout_forward(x, p, rng):
    """Inverted dropout with keep probability ``1 - p``; identity when p == 0.

    The mask is drawn on the CPU from ``rng`` (a numpy Generator) so NumPy and CuPy runs drop the
    same units. cache = scaled mask (or None).
    """
    if p == 0.0:
        return x, None
    keep = asarray(rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
    return x * keep, keep


def dropout_backward(dout, cache):
    """``dx = dout * mask / (1 - p)``."""
    return dout if cache is None else dout * cache


# ----------------------------------------------------------------------------------------------
# fused softmax + cross-entropy (the loss)
# ----------------------------------------------------------------------------------------------
IGNORE_INDEX = -1


class CrossEntropyCache(NamedTuple):
    """What :func:`cross_entropy_backward` needs from the forward pass."""
    probs: object       # (N, V) softmax(logits), rows flattened
    targets: object     # (N,) targets, IGNORE_INDEX replaced by 0 (masked by ``valid``)
    valid: object       # (N,) bool: target != IGNORE_INDEX
    n: int              # number of valid positions (the mean's denominator)
    shape: tuple        # logits' original shape (..., V)


def cross_entropy_forward(logits, targets):
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits)``.

    loss = -(1/N) sum_i log p_i[targets_i],  p = softmax(logits)
    Positions whose target is ``IGNORE_INDEX`` (-1) are left out of the sum and of N (used by
    classification tasks, where only the label position is scored).
    Args: logits (..., V); targets (...) integer.
    Returns: loss (0-d array), cache = :class:`CrossEntropyCache` (five fields).
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    valid = t != IGNORE_INDEX
    n = int(valid.sum())
    if n == 0:
        raise UsageError("cross_entropy: every target is IGNORE_INDEX (-1); nothing to score")
    safe_t = xp.where(valid, t, 0)
    shifted = z - z.max(axis=-1, keepdims=True)  # (N, V), max 0 per row: exp cannot overflow
    target_logit = xp.take_along_axis(shifted, safe_t[:, None], axis=1)[:, 0]  # (N,)
    probs = xp.exp(shifted, out=shifted)
    sumexp = probs.sum(axis=-1)  # (N,)
    probs /= sumexp[:, None]
    nll = xp.log(sumexp) - target_logit  # -log p[target] = logsumexp - logit[target]
    loss = (nll * valid).sum() / n
    return loss, CrossEntropyCache(probs, safe_t, valid, n, logits.shape)


def cross_entropy_backward(dloss, cache):
    """``dlogits = dloss * (softmax(logits) - onehot(targets)) / N`` (zero rows where ignored)."""
    probs, t, valid, n, shape = cache
    d = probs.copy()
    d[xp.arange(d.shape[0]), t] -= 1.0
    d *= (valid[:, None] * (dloss / n)).astype(d.dtype)
    return d.reshape(shape)


def cross_entropy(logits, targets):
    """Fused loss and gradient: returns ``(loss, dlogits)`` (as llm.c does)."""
    loss, cache = cross_entropy_forward(logits, targets)
    return loss, cross_entropy_backward(1.0, cache)


# ----------------------------------------------------------------------------------------------
# naive references (loops), kept only to explain and to test the vectorised versions
# ----------------------------------------------------------------------------------------------
def attention_forward_naive(q, k, v, n_head):
    """Loop over batch, head and query position; same maths as :func:`attention_forward`."""
    B, T, C = q.shape
    Tk = k.shape[1]
    hs = C // n_head
    P = Tk - T
    y = xp.zeros_like(q)
    for b in range(B):
        for h in range(n_head):
            sl = slice(h * hs, (h + 1) * hs)
            for t in range(T):
                s = k[b, : t + P + 1, sl] @ q[b, t, sl] / math.sqrt(hs)  # (t+P+1,)
                a = xp.exp(s - s.max())
                a /= a.sum()
                y[b, t, sl] = a @ v[b, : t + P + 1, sl]
    return y
