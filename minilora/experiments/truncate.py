"""``minilora adapter truncate``: an adapter whose every ΔW is the best rank-k approximation of the
original's (Eckart-Young: no rank-k matrix is closer in the Frobenius or the spectral norm), with
the energy each module keeps.

The rank of each module comes from one of:

* ``rank=K``: the same k for every module (capped at its r);
* ``energy=E``: per module, the smallest k that keeps the fraction E of ‖ΔW‖_F² (Σ_{i<=k} σ_i² /
  Σ σ_i² >= E);
* ``criterion=C``: the rank ``minilora svd`` suggests (rank_90, rank_95, rank_99, effective_rank,
  knee; see :mod:`minilora.analysis.decisions`).

With ΔW = s·B·A = U S Vᵀ (from the r × r core), the new factors are B_k = U_k √S_k and A_k =
√S_k V_kᵀ, and the new scale is 1 (PEFT: lora_alpha = r per module, ``use_rslora`` off), so B_k
A_k is the truncation itself.

* A **PEFT directory** gives a PEFT directory: the same keys and dtype, each module's k in
  ``rank_pattern`` (and ``alpha_pattern``) where it differs from the most common k (the config's
  ``r``), every other tensor (``lora_B.bias``, ``modules_to_save`` copies, DoRA magnitudes)
  copied as it was. PEFT loads it with ``PeftModel.from_pretrained``.
* A **minilora adapter file** gives a minilora adapter file: minilora's LoRA has one r for all
  modules, so with per-module ranks the factors are zero-padded to the largest k (ΔW is exactly
  the truncation; the file is as large as a rank-max(k) adapter).

A DoRA module keeps its magnitude vector: its directional update is truncated, and its merged
weight m · (W + ΔW_k) / ‖W + ΔW_k‖_row changes accordingly.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minilora.analysis import lowrank_svd, rank_for_energy, write_safetensors
from minilora.analysis.decisions import RANK_CRITERIA, rank_suggestions, truncate_factors
from minilora.analysis.peft_files import CONFIG_NAME, WEIGHTS_NAME
from minilora.analysis.svd import AnalysisError
from minilora.errors import MiniloraError
from minilora.experiments.svd_report import analyze_module, is_peft, open_adapter
from minilora.io import atomic_write_json, read_typed, write_typed
from minilora.methods.lora.files import ADAPTER_FORMAT


class TruncateError(MiniloraError, ValueError):
    """A truncation cannot be done as asked."""


class Truncated(NamedTuple):
    """One module's truncation."""
    module: str
    r: int
    k: int
    energy_kept: float       # Σ_{i<=k} σ_i² / Σ σ_i² (1.0 for ΔW = 0)
    energy: float            # ‖ΔW‖_F² before truncation (to weigh the total)


def choose_ranks(adapter, rank: int | None = None, energy: float | None = None,
                 criterion: str | None = None) -> dict:
    """{module: k} from exactly one of ``rank``, ``energy``, ``criterion`` (module docstring)."""
    if sum(x is not None for x in (rank, energy, criterion)) != 1:
        raise TruncateError("give exactly one of --rank K, --energy E, --suggested CRITERION")
    if criterion is not None and criterion not in RANK_CRITERIA:
        raise TruncateError(f"--suggested must be one of {', '.join(RANK_CRITERIA)}")
    ks = {}
    for n, mod in adapter.modules.items():
        B, A = adapter.factors(n)
        if rank is not None:
            k = min(rank, mod.r)
        elif energy is not None:
            k = max(1, rank_for_energy(lowrank_svd(B, A, mod.scale).s, energy))
        else:
            rec = analyze_module(n, [(0, adapter)], None)["records"][0]
            k = max(1, rank_suggestions(rec)[criterion])
        ks[n] = int(min(k, mod.r))
    return ks


def truncate_adapter(src, out, *, rank: int | None = None, energy: float | None = None,
                     criterion: str | None = None) -> list[Truncated]:
    """Write the truncated adapter of ``src`` to ``out`` (a PEFT directory for a PEFT source,
    an adapter file for a minilora one); returns one :class:`Truncated` per module."""
    adapter = open_adapter(src)
    ks = choose_ranks(adapter, rank, energy, criterion)
    factors, report = {}, []
    for n, mod in adapter.modules.items():
        B, A = adapter.factors(n)
        try:
            Bk, Ak, kept = truncate_factors(B, A, mod.scale, ks[n])
        except AnalysisError as e:
            raise TruncateError(f"module {n}: {e}") from None
        factors[n] = (Bk, Ak)
        energy = float(np.sum(lowrank_svd(B, A, mod.scale).s ** 2))
        report.append(Truncated(n, mod.r, ks[n], kept, energy))
    if is_peft(adapter):
        _write_peft(adapter, Path(out), factors, ks)
    else:
        _write_minilora(adapter, Path(out), factors, ks)
    return report


def _write_peft(adapter, out: Path, factors: dict, ks: dict) -> None:
    w = adapter.weights
    tensors, dtypes = {}, set()
    for key in w.keys():
        tensors[key] = w.read(key)
        dtypes.add(w.tensors[key].dtype)
    for n, (Bk, Ak) in factors.items():
        mod = adapter.modules[n]
        a_shape, b_shape = w.shape(mod.a_key), w.shape(mod.b_key)
        tensors[mod.a_key] = Ak.reshape((Ak.shape[0], *a_shape[1:]))
        tensors[mod.b_key] = Bk.reshape((b_shape[0], Bk.shape[1], *b_shape[2:]))
    dtype = "F32" if dtypes <= {"F32", "F64"} else sorted(dtypes - {"F64", "F32"})[0]
    common = Counter(ks.values()).most_common(1)[0][0]
    config = dict(adapter.config)
    config.update(r=int(common), lora_alpha=int(common), use_rslora=False,
                  rank_pattern={n: int(k) for n, k in ks.items() if k != common},
                  alpha_pattern={n: int(k) for n, k in ks.items() if k != common})
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_NAME, tensors, dtype, metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_NAME, config)


def _write_minilora(adapter, out: Path, factors: dict, ks: dict) -> None:
    arrays, meta = read_typed(adapter.path, ADAPTER_FORMAT, "adapter")
    width = max(ks.values())
    for n, (Bk, Ak) in factors.items():
        k = Bk.shape[1]
        A = np.zeros((width, Ak.shape[1]))
        B = np.zeros((Bk.shape[0], width))
        A[:k], B[:, :k] = Ak, Bk
        arrays[f"{n}.lora_A"] = A.astype(arrays[f"{n}.lora_A"].dtype)
        arrays[f"{n}.lora_B"] = B.astype(arrays[f"{n}.lora_B"].dtype)
    cfg = dict(meta["lora_config"])
    cfg.update(r=int(width), lora_alpha=float(width), use_rslora=False)
    meta = {k: v for k, v in meta.items() if k != "format"}
    meta["lora_config"] = cfg
    write_typed(out, ADAPTER_FORMAT, arrays, meta)


def truncation_table(report: list[Truncated]) -> str:
    """One line per module (r -> k, energy kept), then the totals."""
    width = max(len(t.module) for t in report)
    lines = [f"{'module':<{width}}   r  ->  k   energy kept"]
    lines += [f"{t.module:<{width}}  {t.r:>2}  -> {t.k:>2}   {t.energy_kept:.4f}" for t in report]
    before, after = sum(t.r for t in report), sum(t.k for t in report)
    total = sum(t.energy for t in report)
    kept = sum(t.energy * t.energy_kept for t in report) / total if total else 1.0
    lines.append(f"ranks {before} -> {after} ({after / before:.0%} of the factors' rows); energy "
                 f"kept: {kept:.4f} of Σ‖ΔW‖F² over all modules, "
                 f"{min(t.energy_kept for t in report):.4f} in the worst module")
    return "\n".join(lines)


__all__ = ["TruncateError", "Truncated", "choose_ranks", "truncate_adapter", "truncation_table"]
