"""The tables of ``minilora svd``: the terminal summary, Markdown, CSV and ``records.json``, and
reading them back (:func:`read_records`). Records come from :mod:`minilora.experiments.svd_report`.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np

from minilora.analysis import (
    ModuleRecord,
)
from minilora.experiments.svd_report import (
    RECORDS_FORMAT,
    RECORDS_JSON,
    SUMMARY_CSV,
    SUMMARY_MD,
    SvdInputError,
)
from minilora.io import atomic_write_json, atomic_write_text

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


__all__ = ["SUMMARY_COLUMNS", "csv_columns", "csv_text", "format_value", "markdown_table",
           "read_records", "records_json", "summary_columns", "summary_table", "write_report"]
