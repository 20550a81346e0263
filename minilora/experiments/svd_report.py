"""The report of ``minilora svd``: open a LoRA adapter of either kind, analyse it module by module,
and write its tables.

Two kinds of adapter are read, each with its own kind of base weights:

=====================================  ========================================================
adapter                                base weights (``--base``)
=====================================  ========================================================
a PEFT LoRA directory (anyone's        a ``.safetensors`` file or a (sharded) directory of them,
model: ``adapter_model.safetensors``   matched by module name (:class:`BaseWeights`); none by
+ ``adapter_config.json``)             default
a minilora adapter file                a minilora checkpoint (:func:`load_checkpoint`); the
(:func:`minilora.lora.save_adapter`,   shipped base model by default
``minilora-adapter-v1``)
=====================================  ========================================================

Every module gives one :class:`~minilora.analysis.ModuleRecord` (ΔW = s · B A: its spectrum from
the r × r core; φ against ``other``; amplification and intruder dimensions against the base).
The tables built here from the records:

* :func:`summary_table`: a fixed-width table for the terminal (the columns that apply);
* :func:`markdown_table`: the same columns as Markdown, with a heading naming the inputs;
* :func:`csv_text`: every scalar field of every record (one row per module);
* :func:`records_json`: everything, arrays as lists, readable back with :func:`read_records`.

How to read φ: two random r-dimensional subspaces of R^d already have E φ(i, j) = max(i, j) / d
(1/d for the top directions), so a measured φ means something only against that baseline, which
every table prints beside it. At minilora's width (d = 160) and r = 8 the baseline of φ(r, r) is
0.05; at LLaMA-7B's width (4096) it is 0.004.

Chapter: chapters/05-delta-w-analysis.ipynb
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minilora import backend
from minilora.analysis import (
    BaseWeights,
    ModuleRecord,
    PeftAdapter,
    analyze_adapter,
    analyze_lora_module,
    lora_scaling,
    read_peft_adapter,
)
from minilora.analysis.peft_files import WEIGHTS_NAME
from minilora.checkpoint import load_checkpoint
from minilora.errors import MiniloraError
from minilora.io import atomic_write_json, atomic_write_text
from minilora.lora import read_adapter
from minilora.nn.layers import Embedding, Linear

RECORDS_FORMAT = "minilora-svd-records-v1"
#: the files :func:`write_report` writes
SUMMARY_CSV, SUMMARY_MD, RECORDS_JSON = "summary.csv", "summary.md", "records.json"


class SvdInputError(MiniloraError, ValueError):
    """An input of ``minilora svd`` cannot be analysed as asked (kind, modules, base)."""


# ----------------------------------------------------------------------------------------------
# which adapters have a ΔW to analyse
# ----------------------------------------------------------------------------------------------
#: inits that move s·B0·A0 out of W0 (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ): the trained base is a
#: residual, and s·B·A is not the update to the pretrained weights
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def check_init(path, init) -> None:
    """Refuse an adapter whose ``init_lora_weights`` is one of :data:`RESIDUAL_INITS` (PEFT's
    "pissa_niter_16" style names included). PEFT saves such an adapter as a plain LoRA (init
    True, rank doubled) when ``save_pretrained`` is given
    ``path_initial_model_for_weight_conversion``; that converted adapter is analysed."""
    name = str(init).lower()
    if any(name.startswith(p) for p in RESIDUAL_INITS):
        raise SvdInputError(
            f"{path} was initialised with {init!r}: training started from a base with "
            f"s·B0·A0 moved out of W0, so its s·B·A is not the update to the pretrained "
            f"weights, and its spectrum, φ, amplification and intruders would describe something "
            f"else. Only adapters whose ΔW starts at 0 are analysed (PEFT converts one on save: "
            f"save_pretrained(..., path_initial_model_for_weight_conversion=...))")


# ----------------------------------------------------------------------------------------------
# minilora's own adapter files
# ----------------------------------------------------------------------------------------------
class MiniloraAdapter:
    """A minilora adapter file (``save_adapter``) opened for analysis, in the layout of
    :class:`~minilora.analysis.PeftAdapter`: ``modules`` (name -> (d_out, d_in, r)) and
    :meth:`factors` giving (B (d_out, r), A (r, d_in)) in float64 with ΔW = ``scale`` · B A.

    A minilora embedding stores ``lora_A`` (r, V) and ``lora_B`` (C, r), PEFT's layout, so ΔW is
    (C, V) in y = ΔW x orientation, the transpose of the (V, C) table, as for PEFT adapters.
    Trained biases (``bias="all"`` / ``"lora_only"``) are not part of ΔW and are not analysed.
    """

    def __init__(self, path):
        self.path = Path(path)
        arrays, self.config = read_adapter(self.path)
        check_init(self.path, self.config.init_lora_weights)
        self.scale = float(lora_scaling(self.config.r, self.config.lora_alpha,
                                        self.config.use_rslora))
        self._arrays = {}
        self.modules = {}
        for key in arrays:
            if not key.endswith(".lora_A"):
                continue
            name = key[:-len(".lora_A")]
            A, B = arrays[key], arrays.get(f"{name}.lora_B")
            if B is None or A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise SvdInputError(f"{self.path}: module {name!r} has no matching lora_B "
                                    f"(lora_A {A.shape}, lora_B "
                                    f"{None if B is None else B.shape})")
            if A.shape[0] != self.config.r:
                raise SvdInputError(f"{self.path}: module {name!r} has rank {A.shape[0]} but "
                                    f"the adapter's config says r={self.config.r}")
            self._arrays[name] = (B, A)
            self.modules[name] = (B.shape[0], A.shape[1], A.shape[0])
        if not self.modules:
            raise SvdInputError(f"{self.path}: no lora_A / lora_B factors in this adapter")

    @staticmethod
    def kind_of(name: str) -> str:
        """"embedding" for the token table ``wte`` (the one Embedding LoRA targets), else
        "linear"."""
        return "embedding" if name.rsplit(".", 1)[-1] == "wte" else "linear"

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(B (d_out, r), A (r, d_in)) of module ``name``, float64."""
        B, A = self._arrays[name]
        return np.asarray(B, np.float64), np.asarray(A, np.float64)

    def base_weights(self, checkpoint) -> dict:
        """{module name: W0 (d_out, d_in) float64} of every adapted module, from a minilora
        checkpoint made for the same base shape (embeddings' (V, C) tables are transposed to
        ΔW's (C, V) orientation)."""
        model, _, _ = load_checkpoint(checkpoint)
        read_adapter(self.path, model)          # refuses an adapter of another base shape
        layers = dict(model.named_modules())
        out = {}
        for name, (d_out, d_in, _) in self.modules.items():
            layer = layers.get(name)
            if not isinstance(layer, (Linear, Embedding)):
                raise SvdInputError(f"{checkpoint}: no Linear or Embedding named {name!r} for "
                                    f"the adapter's module")
            W = np.asarray(backend.to_numpy(layer.params["weight"]), np.float64)
            W = W.T if isinstance(layer, Embedding) else W
            if W.shape != (d_out, d_in):
                raise SvdInputError(f"{checkpoint}: {name}.weight fits ΔW {W.shape}, the "
                                    f"adapter's ΔW is {(d_out, d_in)}")
            out[name] = W
        return out


def is_peft(adapter) -> bool:
    return isinstance(adapter, PeftAdapter)


def open_adapter(path, adapter_name: str | None = None):
    """A PEFT adapter directory (or its ``adapter_model.safetensors``) -> :class:`PeftAdapter`
    (``adapter_name`` picks one adapter in a file holding several); any other file ->
    :class:`MiniloraAdapter` (refused unless minilora wrote it)."""
    path = Path(path)
    if path.is_dir() or path.name == WEIGHTS_NAME:
        adapter = read_peft_adapter(path, adapter_name)
        check_init(adapter.path, adapter.config.get("init_lora_weights", True))
        return adapter
    if adapter_name is not None:
        raise SvdInputError("an adapter name picks one adapter in a PEFT file holding several; "
                            f"{path} is a minilora adapter file (one adapter)")
    return MiniloraAdapter(path)


def adapter_label(path) -> str:
    """A short name for an adapter: the directory name of a PEFT adapter (or of finetune's
    ``adapter.safetensors``), else the file stem."""
    p = Path(path).resolve()
    if p.is_dir():
        return p.name
    if p.name == WEIGHTS_NAME or p.stem == "adapter":
        return p.parent.name or p.stem
    return p.stem


def module_shapes(adapter) -> dict:
    """{module name: (d_out, d_in)} of either kind of adapter."""
    if is_peft(adapter):
        return {n: (m.d_out, m.d_in) for n, m in adapter.modules.items()}
    return {n: (d_out, d_in) for n, (d_out, d_in, _) in adapter.modules.items()}


def select_modules(adapter, pattern: str | None) -> list[str]:
    """The adapter's module names where ``re.search(pattern, name)`` finds a match (all without a
    pattern), in file order; refuses a pattern that keeps none."""
    names = list(module_shapes(adapter))
    keep = names if pattern is None else [n for n in names if re.search(pattern, n)]
    if not keep:
        raise SvdInputError(f"no module matches {pattern!r} (the adapter's modules: "
                            f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''})")
    return keep


def check_pair(adapter, other, names: list[str]) -> None:
    """``other`` must hold every selected module with the same ΔW shape, and be the same kind."""
    if is_peft(adapter) != is_peft(other):
        raise SvdInputError("the two adapters must be of the same kind (two PEFT directories or "
                            "two minilora adapter files)")
    mine, theirs = module_shapes(adapter), module_shapes(other)
    missing = [n for n in names if n not in theirs]
    if missing:
        raise SvdInputError(f"{other.path} lacks {len(missing)} of the {len(names)} modules "
                            f"compared (first: {missing[0]!r}); keep the shared ones with "
                            f"--modules REGEX")
    for n in names:
        if mine[n] != theirs[n]:
            raise SvdInputError(f"module {n} is {mine[n]} in {adapter.path} but {theirs[n]} in "
                                f"{other.path}: not the same model")


def open_base(adapter, base):
    """The base weights for ``adapter``: a :class:`BaseWeights` (PEFT) or {name: W0} (minilora);
    None when ``base`` is None."""
    if base is None:
        return None
    return BaseWeights(base) if is_peft(adapter) else adapter.base_weights(base)


# ----------------------------------------------------------------------------------------------
# the analysis, one record per module
# ----------------------------------------------------------------------------------------------
def analyze(adapter, other=None, base=None, *, names: list[str], top_k: int = 10,
            eps: float = 0.5, subspace: str = "A", full_svd_max_dim: int = 1024,
            base_rank: int = 64, progress: Callable[[int, int, str], None] | None = None
            ) -> list[ModuleRecord]:
    """One :class:`ModuleRecord` per module of ``names`` (from :func:`select_modules`).

    A PEFT adapter goes through :func:`~minilora.analysis.analyze_adapter` (tensors read one
    module at a time; ``base`` a :class:`BaseWeights`); a minilora adapter through
    :func:`~minilora.analysis.analyze_lora_module` per module (``base`` the dict of
    :meth:`MiniloraAdapter.base_weights`). ``progress(done, total, module)`` after each module.
    """
    opts = {"top_k": top_k, "eps": eps, "subspace": subspace,
            "full_svd_max_dim": full_svd_max_dim, "base_rank": base_rank}
    if is_peft(adapter):
        pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        return analyze_adapter(adapter, other, base, modules=pattern, progress=progress, **opts)
    records = []
    for i, n in enumerate(names):
        B, A = adapter.factors(n)
        oth = None if other is None else (*other.factors(n), other.scale)
        records.append(analyze_lora_module(
            n, B, A, adapter.scale, lora_alpha=adapter.config.lora_alpha, other=oth,
            W=None if base is None else base[n], kind=adapter.kind_of(n), **opts))
        if progress is not None:
            progress(i + 1, len(names), n)
    return records


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
#: (field, header, needs): the summary columns; needs is None (always), "other" or "base"
SUMMARY_COLUMNS = (
    ("module", "module", None),
    ("r", "r", None),
    ("delta_spectral", "σ1(ΔW)", None),
    ("delta_fro", "‖ΔW‖F", None),
    ("energy_top1", "top-1 energy", None),
    ("rank_90", "rank@90%", None),
    ("effective_rank", "eff. rank", None),
    ("phi_top1", "φ(1,1)", "other"),
    ("phi_baseline_top1", "random φ(1,1)", "other"),
    ("phi_full", "φ(r,r')", "other"),
    ("phi_baseline_full", "random φ(r,r')", "other"),
    ("w_proj_delta", "‖UᵀWV‖F", "base"),
    ("amplification", "amplification", "base"),
    ("intruder_count", "intruders", "base"),
)


def _has(records, needs) -> bool:
    if needs is None:
        return True
    key = "phi_full" if needs == "other" else "amplification"
    return any(getattr(r, key) is not None for r in records)


def summary_columns(records) -> list[tuple[str, str]]:
    """(field, header) of the summary columns that apply to ``records``."""
    return [(f, h) for f, h, needs in SUMMARY_COLUMNS if _has(records, needs)]


def format_value(v) -> str:
    """A table cell: blank for None, integers as is, floats to 4 significant digits."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def _cells(records) -> tuple[list[str], list[list[str]]]:
    cols = summary_columns(records)
    rows = []
    for r in records:
        row = []
        for f, _ in cols:
            v = getattr(r, f)
            if f == "intruder_count" and v is not None:
                v = f"{v}/{r.intruder_k}" + (f" (±{r.intruder_uncertain})"
                                            if r.intruder_uncertain else "")
            row.append(format_value(v))
        rows.append(row)
    return [h for _, h in cols], rows


def summary_table(records) -> str:
    """A fixed-width table (module left-aligned, numbers right-aligned), one line per module,
    and a closing line on how to read φ and intruders when those columns are present."""
    headers, rows = _cells(records)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows]
    return "\n".join(out + _notes(records))


def _notes(records) -> list[str]:
    notes = []
    if _has(records, "other"):
        notes.append(f"φ compares the {records[0].phi_subspace!r} subspaces; random subspaces of "
                     f"R^d give E φ(1,1) = 1/d and E φ(r,r') = max(r,r')/d (the 'random' columns)")
    if any(r.dora for r in records):
        notes.append("DoRA modules: the ΔW columns describe the directional update s·B·A; the "
                     "intruders use the merged DoRA weight m·(W0 + ΔW)/‖W0 + ΔW‖_row")
    if _has(records, "base"):
        r0 = next(r for r in records if r.intruder_k is not None)
        notes.append(f"amplification = ‖ΔW‖F / ‖U_rᵀ W V_r‖F (U_r, V_r: ΔW's top-r singular "
                     f"vectors); intruders: of the top {r0.intruder_k} singular vectors of "
                     f"W0 + ΔW, those with max |cos| < {r0.intruder_eps:g} to every singular "
                     f"vector of W0 (±n: n of them could be overturned by singular vectors of "
                     f"W0 that were not computed: a randomized SVD's tail, or the left null "
                     f"space of a W0 with more rows than columns)")
    return notes


def markdown_table(records, title: str = "") -> str:
    """The summary columns as a Markdown table, under ``title`` (a heading) when given, with the
    reading notes below it."""
    headers, rows = _cells(records)
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ([f"# {title}", ""] if title else [])
    lines += ["| " + " | ".join(headers) + " |",
              "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    notes = _notes(records)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


#: ModuleRecord fields kept out of the CSV (arrays; records.json has them)
_ARRAYS = ("singular_values", "phi_grid", "intruder_indices", "intruder_similarities")


def csv_columns() -> list[str]:
    """The CSV's columns: every :class:`ModuleRecord` field but the arrays, then
    ``intruder_indices`` as a space-separated string (as :meth:`ModuleRecord.row` gives it)."""
    return [f.name for f in dataclasses.fields(ModuleRecord) if f.name not in _ARRAYS] + [
        "intruder_indices"]


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))          # repr: the shortest text that reads back exactly
    if isinstance(v, (np.integer, np.bool_)):
        return str(v.item())
    return str(v)


def csv_text(records) -> str:
    """Every scalar field of every record as CSV (:func:`csv_columns`), one row a module;
    floats written with ``repr`` (they read back exactly), None as an empty cell."""
    fields = csv_columns()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for r in records:
        row = r.row()
        w.writerow([_csv_cell(row.get(f)) for f in fields])
    return buf.getvalue()


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()] if v.ndim else _jsonable(v.item())
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else str(float(v))   # "nan", "inf": strict JSON
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def records_json(records, meta: dict | None = None) -> dict:
    """``{"format", **meta, "records": [...]}``: every field of every record, arrays as (nested)
    lists, a non-finite float as the string "nan" / "inf" / "-inf" (JSON has no NaN)."""
    out = {"format": RECORDS_FORMAT, **(meta or {})}
    out["records"] = [{f.name: _jsonable(getattr(r, f.name)) for f in dataclasses.fields(r)}
                      for r in records]
    return out


def read_records(path) -> tuple[list[ModuleRecord], dict]:
    """(records, meta) from a ``records.json`` written by :func:`write_report`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != RECORDS_FORMAT:
        raise SvdInputError(f"{path}: not a {RECORDS_FORMAT} file")
    records = []
    for d in data.pop("records"):
        d = {k: (float(v) if isinstance(v, str) and k not in ("module", "kind", "phi_subspace",
                                                                "base_key", "svd_method")
                 else v) for k, v in d.items()}
        for k in _ARRAYS:
            if d.get(k) is not None:
                d[k] = np.asarray(d[k], dtype=np.int64 if k == "intruder_indices" else np.float64)
        records.append(ModuleRecord(**d))
    return records, data


def write_report(out_dir, records, meta: dict | None = None, title: str = "") -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and ``records.json`` into ``out_dir`` (each file
    atomically: temp file + rename); returns their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / SUMMARY_CSV, out_dir / SUMMARY_MD, out_dir / RECORDS_JSON]
    atomic_write_text(paths[0], csv_text(records))
    atomic_write_text(paths[1], markdown_table(records, title))
    atomic_write_json(paths[2], records_json(records, meta))
    return paths


__all__ = ["RECORDS_FORMAT", "RESIDUAL_INITS", "SUMMARY_COLUMNS", "MiniloraAdapter",
           "SvdInputError", "adapter_label", "analyze", "check_init", "check_pair",
           "csv_columns", "csv_text", "format_value", "is_peft", "markdown_table",
           "module_shapes", "open_adapter", "open_base", "read_records", "records_json",
           "select_modules", "summary_columns", "summary_table", "write_report"]
