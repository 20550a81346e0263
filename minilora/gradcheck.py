"""Finite-difference gradient checks, for the tests, ``minilora gradcheck`` and homework.

The centred difference ``(f(x + h) - f(x - h)) / 2h`` has error O(h^2) from truncation and
O(eps_machine / h) from rounding; in float64 with h = 1e-5 both are ~1e-10 relative, so a correct
analytic gradient agrees to ~1e-8 and a wrong one is off by O(1). Always check in float64.

Typical use (llm.c's "fake loss" trick: any op becomes a scalar by dotting with a random dout)::

    out, cache = layernorm_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = layernorm_backward(dout, cache)
    f = lambda: float((layernorm_forward(x, w, b)[0] * dout).sum())
    assert rel_error(dx, numerical_grad(f, x)) < 1e-6

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import numpy as np

from minilora import backend
from minilora.backend import xp
from minilora.config import GPTConfig
from minilora.errors import UsageError
from minilora.model import GPT
from minilora.nn import ops, ops_fast


def numerical_grad(f, x, h: float = 1e-5):
    """Centred finite-difference gradient of the scalar function ``f()`` w.r.t. the array ``x``.

    ``x`` is perturbed **in place** one element at a time (and restored), so ``f`` must read ``x``
    through a reference it already holds. Returns an array shaped like ``x``.
    """
    if x.dtype != xp.float64:
        raise TypeError(f"numerical_grad needs a float64 array (got {x.dtype}): float32 rounding "
                        "error (~1e-7 relative) would swamp the difference quotient")
    if not x.flags.c_contiguous:
        raise UsageError("numerical_grad needs a C-contiguous array (it perturbs a flat view)")
    grad = xp.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views: writing flat[i] changes x
    for i in range(flat.size):
        old = float(flat[i])
        flat[i] = old + h
        fp = float(f())
        flat[i] = old - h
        fm = float(f())
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def rel_error(a, b, rel_floor: float = 1e-3) -> float:
    """Largest elementwise relative error ``|a - b| / max(|a|, |b|, floor)``, a Python float.

    ``floor = rel_floor * max(|a|, |b|)`` over the whole tensor (and at least 1e-12): an element a
    thousand times smaller than the tensor's largest is compared on that scale, because its
    finite-difference estimate carries absolute noise of the size of the *large* elements' noise.
    """
    a = np.asarray(backend.to_numpy(a), dtype=np.float64)
    b = np.asarray(backend.to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise UsageError(f"rel_error: shapes differ {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    denom = np.maximum(np.maximum(np.abs(a), np.abs(b)), max(rel_floor * scale, 1e-12))
    return float((np.abs(a - b) / denom).max())


def check(name: str, analytic, f, x, tol: float = 1e-6, h: float = 1e-5,
          atol: float = 1e-9) -> dict:
    """Compare ``analytic`` with the numerical gradient of ``f`` w.r.t. ``x``.

    Passes when the relative error is below ``tol`` **or** every absolute difference is below
    ``atol``: a gradient that is exactly zero in theory (e.g. the key bias, which shifts every
    attention score of a query by the same amount and so cancels in the softmax) has a numerical
    estimate of pure rounding noise (~1e-11), whose relative error is meaningless.
    Returns a row ``{"name", "shape", "rel_error", "abs_error", "tol", "atol", "rule", "ok"}``
    where ``rule`` is the test it passed (``"rel"``, else ``"abs"``; None when it failed both);
    never raises, so a table of many checks can be printed and the caller decides.
    """
    num = numerical_grad(f, x, h)
    err = rel_error(analytic, num)
    abs_err = float(abs(backend.to_numpy(analytic) - backend.to_numpy(num)).max()) if num.size else 0.0
    rule = "rel" if err < tol else "abs" if abs_err < atol else None
    return {"name": name, "shape": tuple(x.shape), "rel_error": err, "abs_error": abs_err,
            "tol": tol, "atol": atol, "rule": rule, "ok": rule is not None}


# ----------------------------------------------------------------------------------------------
# The op suite: every op of minilora.nn.ops checked on random shapes (tests + `minilora gradcheck`)
# ----------------------------------------------------------------------------------------------
def check_op(op: str, forward, backward, inputs: dict, wrt: list[str], rng, tol=1e-6) -> list[dict]:
    """Gradient-check one op with the fake-loss trick ``L = sum(forward(**inputs) * dout)``.

    ``backward(dout, cache)`` must return gradients in the order of ``inputs``; only the names in
    ``wrt`` are checked (e.g. not integer ids). Returns one result row per checked input, named
    ``"<op>: d<input>"`` so a failure says which gradient broke.
    """
    out, cache = forward(**inputs)
    dout = backend.asarray(rng.standard_normal(tuple(out.shape)))
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    by_name = dict(zip(inputs, grads))

    def f():
        return xp.sum(forward(**inputs)[0] * dout)

    return [check(f"{op}: d{n}", by_name[n], f, inputs[n], tol) for n in wrt]


def op_suite(rng=None, tol: float = 1e-6) -> list[dict]:
    """Check every op's backward on random float64 inputs of a few shapes; returns result rows."""

    rng = backend.cpu_rng(0 if rng is None else rng)

    def randn(*shape, scale=1.0):
        return backend.asarray(rng.standard_normal(shape) * scale)

    rows = []
    for (B, T, d_in, d_out) in [(2, 3, 4, 5), (1, 5, 7, 3)]:
        for with_bias in (True, False):
            inputs = {"x": randn(B, T, d_in), "w": randn(d_out, d_in)}
            if with_bias:
                inputs["b"] = randn(d_out)
            rows += check_op(f"linear{'' if with_bias else ' (no bias)'} {B}x{T}x{d_in}->{d_out}",
                             ops.linear_forward, lambda d, c: ops.linear_backward(d, c)[:len(inputs)],
                             inputs, list(inputs), rng, tol)
            rows += check_op(f"linear fast{'' if with_bias else ' (no bias)'} {B}x{T}x{d_in}->{d_out}",
                             ops_fast.linear_forward_fast,
                             lambda d, c: ops_fast.linear_backward_fast(d, c)[:len(inputs)],
                             inputs, list(inputs), rng, tol)
    for (B, T, V, C) in [(2, 4, 6, 3), (3, 2, 4, 5)]:
        idx = backend.asarray(rng.integers(0, V, size=(B, T)))
        rows += check_op(f"embedding {B}x{T}, V={V}, C={C}",
                         lambda w: ops.embedding_forward(idx, w),
                         lambda d, c: ops.embedding_backward(d, c),
                         {"w": randn(V, C)}, ["w"], rng, tol)
    with ops_fast.blocked_always():  # the fast twins' blocked code even on these tiny arrays
        for shape in [(2, 3, 5), (4, 8)]:
            C = shape[-1]
            for tag, fwd, bwd in (("", ops.layernorm_forward, ops.layernorm_backward),
                                  (" fast", ops_fast.layernorm_forward_fast, ops_fast.layernorm_backward_fast)):
                rows += check_op(f"layernorm{tag} {shape}", fwd, bwd,
                                 {"x": randn(*shape), "w": randn(C), "b": randn(C)}, ["x", "w", "b"],
                                 rng, tol)
        for shape in [(2, 3, 4), (7,)]:
            for tag, fwd, bwd in (("", ops.gelu_forward, ops.gelu_backward),
                                  (" fast", ops_fast.gelu_forward_fast, ops_fast.gelu_backward_fast)):
                rows += check_op(f"gelu{tag} {shape}", fwd, bwd, {"x": randn(*shape, scale=2.0)},
                                 ["x"], rng, tol)
            rows += check_op(f"softmax {shape}", ops.softmax_forward, ops.softmax_backward,
                             {"x": randn(*shape, scale=2.0)}, ["x"], rng, tol)
    for (B, T, P, C, NH) in [(2, 4, 0, 6, 2), (1, 5, 0, 8, 4), (2, 3, 2, 4, 2)]:
        rows += check_op(f"attention B={B} T={T} prefix={P} C={C} NH={NH}",
                         lambda q, k, v: ops.attention_forward(q, k, v, NH), ops.attention_backward,
                         {"q": randn(B, T, C), "k": randn(B, T + P, C), "v": randn(B, T + P, C)},
                         ["q", "k", "v"], rng, tol)
        with ops_fast.blocked_always():
            rows += check_op(f"attention fast (tiles of 2) B={B} T={T} prefix={P} C={C} NH={NH}",
                             lambda q, k, v: ops_fast.attention_forward_fast(q, k, v, NH, tile=2),
                             ops_fast.attention_backward_fast,
                             {"q": randn(B, T, C), "k": randn(B, T + P, C),
                              "v": randn(B, T + P, C)}, ["q", "k", "v"], rng, tol)
    rows += check_op("residual (2, 3, 4)", ops.residual_forward, ops.residual_backward,
                     {"x": randn(2, 3, 4), "y": randn(2, 3, 4)}, ["x", "y"], rng, tol)
    drop_seed = int(rng.integers(1 << 30))
    rows += check_op("dropout p=0.3", lambda x: ops.dropout_forward(x, 0.3, backend.cpu_rng(drop_seed)),
                     ops.dropout_backward, {"x": randn(3, 5)}, ["x"], rng, tol)
    for (N, V, ignore) in [(6, 5, False), (8, 4, True)]:
        t = rng.integers(0, V, size=(N,))
        if ignore:
            t[::3] = ops.IGNORE_INDEX
        tgt = backend.asarray(t)
        rows += check_op(f"cross_entropy N={N} V={V}{' (with ignored targets)' if ignore else ''}",
                         lambda logits: ops.cross_entropy_forward(logits, tgt),
                         lambda d, c: ops.cross_entropy_backward(d, c),
                         {"logits": randn(N, V, scale=2.0)}, ["logits"], rng, tol)
    return rows


def model_check(model, idx, targets, tol: float = 1e-6, names=None) -> list[dict]:
    """Check ``model.backward`` through the mean cross-entropy for every trainable parameter
    (or those in ``names``). The model must be float64. Returns one row per parameter."""

    if model.dtype != xp.float64:
        raise TypeError("model_check needs a float64 model: call model.astype('float64') first")
    model.forward_backward(idx, targets)
    analytic = {n: (g.copy() if g is not None else xp.zeros_like(p))
                for n, p, g in model.named_trainable()}

    def f():
        return ops.cross_entropy_forward(model.forward(idx, check=False)[0], targets)[0]

    rows = []
    for n, p, _ in model.named_trainable():
        if names is None or n in names:
            rows.append(check(f"model: d{n}", analytic[n], f, p, tol))
    return rows


def tiny_model_check(seed: int = 0, tol: float = 1e-6) -> list[dict]:
    """The whole-model check on a tiny float64 GPT (every parameter, through the loss)."""

    rng = backend.cpu_rng(seed)
    cfg = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)
    model = GPT(cfg, rng, dtype="float64")
    # LayerNorm params start at 1/0 exactly; perturb them so their gradients are generic
    for _, m in model.named_modules():
        for k in m.params:
            m.params[k] = m.params[k] + backend.asarray(rng.standard_normal(m.params[k].shape) * 0.1)
    idx = backend.asarray(rng.integers(0, 11, size=(2, 6)))
    tgt = backend.asarray(rng.integers(0, 11, size=(2, 6)))
    return model_check(model, idx, tgt, tol)


def _rule_text(r: dict) -> str:
    if r.get("rule") == "rel":
        return f"rel < {r['tol']:.0e}"
    if r.get("rule") == "abs":
        return f"abs < {r['atol']:.0e}"
    return "NO: failed both" if "tol" in r else ("yes" if r["ok"] else "NO")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`check` rows: name, shape, relative and absolute error, and
    the rule each row passed, ``rel < tol`` or (a gradient so small that its relative error is
    rounding noise) ``abs < atol``; the footer states the rule, and its last line counts the rows
    passed by each test with the thresholds."""
    w = max(len(r["name"]) for r in rows)
    lines = [f"{'gradient':<{w}}  {'shape':<16} {'rel. error':>10} {'abs. error':>10}  passed by",
             "-" * (w + 50)]
    for r in rows:
        lines.append(f"{r['name']:<{w}}  {r['shape']!s:<16} {r['rel_error']:>10.2e} "
                     f"{r.get('abs_error', float('nan')):>10.2e}  {_rule_text(r)}")
    n_bad = sum(not r["ok"] for r in rows)
    by_rule = {}
    for r in rows:
        if r["ok"] and r.get("rule"):
            key = _rule_text(r)
            by_rule[key] = by_rule.get(key, 0) + 1
    detail = "; ".join(f"{n} by {k}" for k, n in sorted(by_rule.items()))
    lines.append("a row passes when its largest relative error is below tol, or else (a gradient "
                 "that is ~0 in theory) its largest absolute error is below atol")
    lines.append(f"{len(rows) - n_bad} passed ({detail or 'no rule recorded'}), {n_bad} failed")
    return "\n".join(lines)
