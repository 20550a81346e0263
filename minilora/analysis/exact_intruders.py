"""Exact intruder dimensions of W_t = W_0 + s·B·A, from the base's SVD (computed once, cached).

The paper's count (Shuttleworth et al., Algorithm 1; :mod:`.intruders`) compares the top k left
singular vectors y_j of W_t with **every** left singular vector u_i of W_0 (the thin SVD, n =
min(d_out, d_in) of them). A full SVD of each W_t is what the reference code does; here the base's
SVD is computed once per base matrix (and kept in a :class:`BaseSvdCache` on disk, keyed by the
tensor's hash), and W_t is treated as what it is: W_0 plus a rank-r update.

Write ΔW = s·B·A = U_Δ S V_Δᵀ (its thin SVD from the r × r core, rank r' <= r) and keep the
square factor of W_0's SVD, Q_0 (n × n), with D = diag(σ_0²):

* d_out <= d_in ("left": Q_0 = U_0 spans R^d_out). In U_0's coordinates the Gram matrix of W_t is

      G = U_0ᵀ W_t W_tᵀ U_0 = D + F K Fᵀ,   F = [U_0ᵀ U_Δ, U_0ᵀ W_0 V_Δ] (n × 2r'),
                                           K = [[S², S], [S, 0]],

  and its eigenvectors c_j (top k) are the y_j written in the u_i: c_ij = u_iᵀ y_j, the cosines
  themselves.
* d_out > d_in ("right": Q_0 = V_0). In V_0's coordinates W_tᵀ W_t = D + F K Fᵀ with
  F = [V_0ᵀ W_0ᵀ U_Δ, V_0ᵀ V_Δ], K = [[0, S], [S, S²]]; its eigenvectors e_j give the right singular
  vectors, and u_iᵀ y_j = (σ_0i e_ij + (Y S Tᵀ e_j)_i / σ_0i) / σ_j with Y, T the two blocks of F
  (U_0 itself, d_out × n, is never formed or stored).

Either way the problem is a diagonal plus a symmetric rank-2r' matrix, n × n. Its top k + 1
eigenpairs come from Lanczos (``scipy.sparse.linalg.eigsh``; a product costs O(n r')), and the
result is **certified**:

1. every Ritz pair (λ, c) has a residual ρ = ‖G c − λ c‖: an eigenvalue lies within ρ of λ;
2. the number of eigenvalues above any τ is counted exactly by Sylvester's law of inertia
   (Haynsworth's inertia additivity on [[D − τ, F], [Fᵀ, −K⁻¹]]: a 2r' × 2r' eigenvalue count),
   so each interval [λ − ρ, λ + ρ] is shown to hold exactly one eigenvalue and none is missed;
3. the gap δ to the rest of the spectrum then bounds the vector's error (Davis-Kahan: sin θ <=
   ρ / δ), hence every cosine's error; a vector whose max |cos| lies within that bound of ε
   could go either way.

If any step fails (Lanczos does not converge, intervals overlap, a count disagrees, a
classification is uncertain), the module falls back to the dense eigendecomposition of the same
n × n matrix (``method`` says which); small matrices (n <= ``dense_max``) take it directly. The
count returned is therefore the paper's count, computed in float64, never an estimate.

Cost per module, with the base SVD cached: O(d_out d_in r) for W_0 V_Δ and O(n² r) for the
projections, plus Lanczos; against O(d_out d_in min(d_out, d_in)) for a fresh SVD of W_t. The one
eigendecomposition per base matrix (the cache's entry: :func:`base_svd`) is the dominant cost of
a cold run.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.linalg import eigh
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

from minilora.analysis.intruders import Intruders
from minilora.analysis.svd import SVD, AnalysisError, as_float64

#: the cache's layout version (bump when what an entry holds changes)
CACHE_VERSION = 2   # 2: Q and σ from the Gram matrix's eigendecomposition (1: np.linalg.svd)
#: where the cache lives unless told: $MINILORA_SVD_CACHE, else $XDG_CACHE_HOME/minilora/base-svd
CACHE_ENV = "MINILORA_SVD_CACHE"
EPS64 = np.finfo(np.float64).eps


def default_cache_dir() -> Path:
    """``$MINILORA_SVD_CACHE`` if set, else ``$XDG_CACHE_HOME/minilora/base-svd`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).expanduser() / "minilora" / "base-svd"


class BaseSvd(NamedTuple):
    """What the exact count needs of W_0's SVD: the square factor and the singular values."""
    side: str            # "left": Q = U_0 (d_out <= d_in); "right": Q = V_0 (d_out > d_in)
    Q: np.ndarray        # (n, n), n = min(d_out, d_in); columns are singular vectors
    s: np.ndarray        # (n,) descending
    shape: tuple         # W_0's (d_out, d_in)


def tensor_hash(W: np.ndarray) -> str:
    """SHA-256 of a float64 matrix's shape and bytes (C order): the cache key of W_0."""
    W = np.ascontiguousarray(W, dtype=np.float64)
    h = hashlib.sha256(f"minilora-base-svd-v{CACHE_VERSION}:{W.shape}".encode())
    h.update(memoryview(W).cast("B"))
    return h.hexdigest()


def base_svd(W) -> BaseSvd:
    """The square factor and singular values of W_0's thin SVD, in float64, from the
    eigendecomposition of the n × n Gram matrix (G = W_0 W_0ᵀ on the "left", W_0ᵀ W_0 on the
    "right"): σ_0i² and Q_0 are G's eigenpairs (``scipy.linalg.eigh``, divide and conquer).

    The exact count needs exactly this: on the left, W_t W_tᵀ in Q_0's coordinates is
    diag(σ_0²) + F K Fᵀ, so G's eigenpairs are all it reads, and ``eigh`` returns them with an
    error of order n·eps·σ_01² — the size of the rounding a full SVD leaves in W_0 W_0ᵀ too. On the
    right, a small σ_0i is known to a relative n·eps·(σ_01 / σ_0i)² only (not n·eps·σ_01 / σ_0i as
    from an SVD); :func:`intruders_lowrank` counts that in its certificate and falls back to full
    SVDs where it matters. The eigendecomposition skips the other side's vectors and uses both
    cores: on 2 cores about 3x faster than ``np.linalg.svd`` for 4096 × 4096 (6.4 s vs 17.8 s) and
    5x for 4096 × 14336 (7.4 s vs 41 s; BENCHMARKS.md)."""
    W = as_float64(W, "W", 2)
    left = W.shape[0] <= W.shape[1]
    G = W @ W.T if left else W.T @ W            # NumPy hands a @ a.T to BLAS's syrk
    lam, Q = eigh(G, overwrite_a=True, check_finite=False, driver="evd")
    lam, Q = lam[::-1], np.ascontiguousarray(Q[:, ::-1])
    return BaseSvd("left" if left else "right", Q, np.sqrt(np.maximum(lam, 0.0)), W.shape)


class BaseSvdCache:
    """Base SVDs on disk, one entry per base matrix, keyed by :func:`tensor_hash`.

    An entry is ``<hash>.json`` (shape, side, when, size) + ``<hash>.Q.npy`` + ``<hash>.s.npy``,
    written atomically (a temporary name, then a rename): two workers that compute the same
    matrix at once write the same bytes, and a reader never sees half an entry. Entries are
    float64; a 4096 × 4096 base matrix costs 128 MiB.

    ``hits`` / ``misses`` count this object's lookups (a run's report).
    """

    def __init__(self, path=None):
        self.path = Path(path) if path is not None else default_cache_dir()
        self.hits = self.misses = 0
        self.seconds_computing = self.cpu_seconds_computing = 0.0

    def _files(self, key: str):
        return (self.path / f"{key}.json", self.path / f"{key}.Q.npy", self.path / f"{key}.s.npy")

    def get(self, W, key: str | None = None) -> BaseSvd:
        """W_0's :class:`BaseSvd`: read from the cache, or computed and stored."""
        W = np.asarray(W, dtype=np.float64)
        key = key or tensor_hash(W)
        meta_path, q_path, s_path = self._files(key)
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                Q = np.load(q_path, allow_pickle=False)
                s = np.load(s_path, allow_pickle=False)
                if tuple(meta["shape"]) == W.shape and meta["version"] == CACHE_VERSION:
                    self.hits += 1
                    return BaseSvd(meta["side"], Q, s, tuple(meta["shape"]))
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                pass                                  # a damaged entry is recomputed
        self.misses += 1
        t0, c0 = time.perf_counter(), time.process_time()
        dec = base_svd(W)
        self.seconds_computing += time.perf_counter() - t0
        self.cpu_seconds_computing += time.process_time() - c0
        self._store(key, dec)
        return dec

    def _store(self, key: str, dec: BaseSvd) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AnalysisError(f"base SVD cache {self.path}: cannot create it ({e}); place it "
                                f"elsewhere with --cache-dir or ${CACHE_ENV}") from None
        meta_path, q_path, s_path = self._files(key)
        tag = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            for path, arr in ((q_path, dec.Q), (s_path, dec.s)):
                tmp = path.with_name(path.name + tag)
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                os.replace(tmp, path)
            meta = {"version": CACHE_VERSION, "shape": list(dec.shape), "side": dec.side,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "bytes": int(dec.Q.nbytes + dec.s.nbytes)}
            tmp = meta_path.with_name(meta_path.name + tag)
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, meta_path)             # the entry exists once its meta does
        except OSError as e:
            raise AnalysisError(f"base SVD cache {self.path}: cannot write ({e}); place it "
                                f"elsewhere with --cache-dir or ${CACHE_ENV}, or run without "
                                f"the cache (--no-cache)") from None

    def report(self) -> dict:
        """{"path", "entries", "bytes"} of what is on disk now."""
        if not self.path.is_dir():
            return {"path": str(self.path), "entries": 0, "bytes": 0}
        entries = list(self.path.glob("*.json"))
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return {"path": str(self.path), "entries": len(entries), "bytes": size}

    def clear(self) -> dict:
        """Remove the cache directory's entries; returns what was there (:meth:`report`)."""
        before = self.report()
        if self.path.is_dir():
            for p in self.path.iterdir():
                if p.is_file() and (p.suffix in (".json", ".npy") or ".tmp-" in p.name):
                    p.unlink()
            try:
                self.path.rmdir()
            except OSError:
                pass                                  # something else lives there: keep it
        return before


class MemoryCache:
    """A stand-in for :class:`BaseSvdCache` that keeps nothing on disk (``--no-cache``)."""

    path = None

    def __init__(self):
        self.hits = self.misses = 0
        self.seconds_computing = self.cpu_seconds_computing = 0.0

    def get(self, W, key: str | None = None) -> BaseSvd:
        self.misses += 1
        t0, c0 = time.perf_counter(), time.process_time()
        dec = base_svd(W)
        self.seconds_computing += time.perf_counter() - t0
        self.cpu_seconds_computing += time.process_time() - c0
        return dec


# ----------------------------------------------------------------------------------------------
# the certified top-k of a diagonal-plus-low-rank symmetric matrix
# ----------------------------------------------------------------------------------------------
class _DiagLowRank:
    """M = diag(d) + F K Fᵀ, symmetric, n × n, K (2r × 2r) invertible."""

    def __init__(self, d, F, K):
        self.d, self.F, self.K = d, F, K
        self.n = d.size
        self.Kinv = np.linalg.inv(K)
        self.p0 = int(np.sum(np.linalg.eigvalsh(-self.Kinv) > 0))

    def matvec(self, x):
        return self.d * x + self.F @ (self.K @ (self.F.T @ x))

    def dense(self):
        M = (self.F @ self.K) @ self.F.T
        M[np.diag_indices(self.n)] += self.d
        return 0.5 * (M + M.T)

    def count_above(self, tau: float) -> int | None:
        """How many eigenvalues exceed ``tau`` (None when tau hits a diagonal entry)."""
        gap = self.d - tau
        if np.any(gap == 0):
            return None
        S = -self.Kinv - (self.F.T / gap) @ self.F
        ev = np.linalg.eigvalsh(0.5 * (S + S.T))
        scale = max(1.0, float(np.abs(ev).max()))
        if np.any(np.abs(ev) <= 1e3 * EPS64 * scale * S.shape[0]):
            return None                        # tau sits (numerically) on an eigenvalue
        return int(np.sum(gap > 0)) + int(np.sum(ev > 0)) - self.p0


def _top_dense(M: _DiagLowRank, k: int):
    lam, vec = eigh(M.dense(), subset_by_index=[M.n - k, M.n - 1])
    return lam[::-1], vec[:, ::-1]


def _top_lanczos(M: _DiagLowRank, k: int):
    """Top k + 1 Ritz pairs and, for the top k, certified error bounds on the vectors (sin θ),
    or None when the certificate cannot be given."""
    op = LinearOperator((M.n, M.n), matvec=M.matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(M.n)
    try:
        lam, vec = eigsh(op, k=k + 1, which="LA", tol=0, v0=v0, maxiter=50 * M.n)
    except (ArpackNoConvergence, ArpackError):
        return None
    order = np.argsort(lam)[::-1]
    lam, vec = lam[order], vec[:, order]
    res = np.linalg.norm(np.column_stack([M.matvec(vec[:, j]) for j in range(k + 1)])
                         - vec * lam, axis=0)
    top = max(abs(lam[0]), float(M.d.max()), 1e-300)
    w = np.maximum(res, 1e-7 * top)                        # widened location intervals
    lo, hi = lam - w, lam + w
    if np.any(lo[:-1] <= hi[1:]):                          # intervals must be disjoint
        return None
    if M.count_above(hi[0]) != 0:
        return None
    for j in range(k):                                     # exactly one eigenvalue in each
        if M.count_above(lo[j]) != j + 1 or M.count_above(hi[j + 1]) != j + 1:
            return None
    sin = np.empty(k)
    for j in range(k):
        gap = lam[j] - hi[j + 1]
        if j > 0:
            gap = min(gap, lo[j - 1] - lam[j])
        if gap <= 0:
            return None
        sin[j] = min(1.0, res[j] / gap)
    return lam[:k], vec[:, :k], sin, res[:k]


class ExactIntruders(NamedTuple):
    """The result of :func:`intruders_lowrank`."""
    found: Intruders          # count, indices, max |cos| per examined vector
    sigma: np.ndarray         # (k,) the top singular values of W_t
    method: str               # "dense" or "lanczos (certified)"
    max_error: float          # the certificate: max over j of the bound on max |cos| (0: dense)


def intruders_lowrank(W0, base: BaseSvd, delta: SVD, k: int = 10, eps: float = 0.5,
                      dense_max: int = 512) -> ExactIntruders:
    """The paper's intruder count of W_t = W_0 + ΔW (module docstring), exactly.

    Args:
        W0: (d_out, d_in) the base weight (float64).
        base: its :class:`BaseSvd` (from :func:`base_svd` or a :class:`BaseSvdCache`).
        delta: ΔW's thin SVD (U_Δ (d_out, p), s (p,), Vh_Δ (p, d_in)), e.g. :func:`lowrank_svd`.
        k, eps: the top k vectors of W_t are examined with the cosine threshold ε.
        dense_max: n up to which the n × n problem is solved densely.
    """
    W0 = np.asarray(W0, dtype=np.float64)
    if tuple(W0.shape) != tuple(base.shape):
        raise AnalysisError(f"the base SVD is of a {base.shape} matrix, W0 is {W0.shape}")
    n = base.s.size
    if not 1 <= k <= n:
        raise AnalysisError(f"k must be in [1, {n}], got {k}")
    U_d, s_d, Vh_d = delta
    keep = s_d > (s_d[0] * max(W0.shape) * EPS64 if s_d.size and s_d[0] > 0 else 0)
    if not keep.any():                     # ΔW = 0: W_t = W_0, every vector is its own match
        sims = np.ones(k)
        return ExactIntruders(Intruders(0, np.zeros(0, np.int64), sims, np.zeros(k), k,
                                        float(eps)), base.s[:k].copy(), "dense", 0.0)
    U_d, S, V_d = U_d[:, keep], s_d[keep], Vh_d[keep].T
    Q0, s0 = base.Q, base.s
    d = s0 ** 2
    zero = np.zeros((S.size, S.size))
    Sd = np.diag(S)
    if base.side == "left":
        P = Q0.T @ U_d                                     # U_0ᵀ U_Δ
        Z = Q0.T @ (W0 @ V_d)                              # U_0ᵀ W_0 V_Δ
        M = _DiagLowRank(d, np.hstack([P, Z]), np.block([[Sd * Sd, Sd], [Sd, zero]]))
    else:
        Y = Q0.T @ (W0.T @ U_d)                            # V_0ᵀ W_0ᵀ U_Δ = Σ_0 U_0ᵀ U_Δ
        T = Q0.T @ V_d                                     # V_0ᵀ V_Δ
        M = _DiagLowRank(d, np.hstack([Y, T]), np.block([[zero, Sd], [Sd, Sd * Sd]]))

    def cosines(vec, lam):
        if base.side == "left":
            return np.abs(vec), np.zeros(vec.shape[1])
        sig = np.sqrt(np.maximum(lam, 0.0))
        # σ_0i² comes from the Gram matrix's eigenvalues (:func:`base_svd`), each known to
        # about n·eps·σ_01²: below that, σ_0i (and the u_i = W_0 v_i / σ_0i behind it) is noise
        tiny = s0 ** 2 <= s0[0] ** 2 * n * EPS64
        inv = np.where(tiny, 0.0, 1.0 / np.where(tiny, 1.0, s0))
        C = (s0[:, None] * vec + (inv[:, None] * Y) @ (Sd @ (T.T @ vec))) / sig
        # the division by σ_0i: a relative error of n·eps·(σ_01 / σ_0i)² in σ_0i and v_i
        coupling = np.linalg.norm(Sd @ (T.T @ vec), axis=0) / sig
        div = np.inf if tiny.any() else n * EPS64 * (s0[0] / s0[-1]) ** 2
        return np.abs(C), div * coupling

    method, bound = "dense", np.zeros(k)
    out = None if n <= dense_max or k + 1 >= n else _top_lanczos(M, k)
    if out is not None:
        lam, vec, sin, res = out
        C, extra = cosines(vec, lam)
        amp = 1.0 if base.side == "left" else np.sqrt(max(lam[0], 0.0) / np.maximum(lam, 1e-300))
        bound = np.sqrt(2.0) * sin * amp + extra + res / np.maximum(lam, 1e-300) + 1e-12
        sims = C.max(axis=0)
        if np.all(np.abs(sims - eps) > bound):
            method = "lanczos (certified)"
        else:
            out = None
    if out is None:
        lam, vec = _top_dense(M, k)
        C, extra = cosines(vec, lam)
        sims = C.max(axis=0)
        method = "dense"
        if np.any(np.abs(sims - eps) <= extra):
            # a (nearly) singular W_0 on the "right" side: its u_i for the tiny σ_0i are not
            # recoverable from V_0; do what the reference does, two full SVDs
            U0 = np.linalg.svd(W0, full_matrices=False)[0]
            Ut, st, _ = np.linalg.svd(W0 + (U_d * S) @ V_d.T, full_matrices=False)
            sims = np.abs(U0.T @ Ut[:, :k]).max(axis=0)
            lam = st[:k] ** 2
            method = "dense (full SVDs)"
    idx = np.flatnonzero(sims < eps)
    found = Intruders(int(idx.size), idx, sims, np.zeros(k), k, float(eps))
    return ExactIntruders(found, np.sqrt(np.maximum(lam, 0.0)), method,
                          float(np.max(bound)) if method.startswith("lanczos") else 0.0)


def cache_report_text(report: dict) -> str:
    """One line: where the cache is, how many entries, how big."""
    return (f"base SVD cache {report['path']}: {report['entries']} entr"
            f"{'y' if report['entries'] == 1 else 'ies'}, {report['bytes'] / 2 ** 20:.1f} MiB")


__all__ = ["CACHE_ENV", "BaseSvd", "BaseSvdCache", "ExactIntruders", "MemoryCache", "base_svd",
           "cache_report_text", "default_cache_dir", "intruders_lowrank", "tensor_hash"]
