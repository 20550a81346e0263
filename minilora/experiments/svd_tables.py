"""The tables of ``minilora svd``: the terminal summary, Markdown, CSV and ``records.json``, and
reading them back (:func:`read_records`). Records come from :mod:`minilora.experiments.svd_report`.

What one run writes into its output directory:

* ``summary.md``: the adapter-level summary (utilisation, energy per layer, the most wasteful
  modules), the per-module table in layer order, the "not analysed" table (every tensor of the
  adapter file left out, with its reason), and with several adapters the side-by-side table and
  the pairs (φ against its null, the merge triage);
* ``summary.csv``: one row per (adapter, module), the columns of :data:`CSV_COLUMNS`
  (documented there and in results/svd/README.md); floats written exactly (``repr``), a missing
  value as an empty cell, NaN as ``nan``;
* ``not_analysed.csv``: adapter, module, tensor, shape, reason;
* ``pairs.csv`` (two or more adapters): one row per module and pair (:class:`PairRecord`);
* ``rank_pattern.json``: per adapter and criterion, the PEFT ``rank_pattern`` the analysis
  suggests;
* ``records.json``: everything (format ``minilora-svd-records-v2``, schema version, minilora's
  version, each adapter's path, kind and full config, the base, the options, every record with
  its arrays as lists, what was not analysed, the pairs, the warnings);
  a non-finite float is ``null`` (JSON has no NaN), and reading it back restores NaN. The same
  inputs write the same bytes, whatever the execution (serial or Dask, cached or not).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np

import minilora
from minilora.analysis import ModuleRecord, natural_sorted
from minilora.analysis.decisions import RANK_CRITERIA, PairRecord, adapter_summary, rank_pattern
from minilora.experiments.svd_report import (
    RECORDS_FORMAT,
    RECORDS_JSON,
    SCHEMA_VERSION,
    SUMMARY_CSV,
    SUMMARY_MD,
    AdapterResult,
    SvdInputError,
    SvdRun,
)
from minilora.io import atomic_write_json, atomic_write_text

NOT_ANALYSED_CSV, PAIRS_CSV, RANK_PATTERN_JSON = ("not_analysed.csv", "pairs.csv",
                                                  "rank_pattern.json")

# ----------------------------------------------------------------------------------------------
# the per-module table
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
    ("utilisation", "util.", None),
    ("phi_top1", "φ(1,1)", "other"),
    ("phi_null95_top1", "null p95", "other"),
    ("phi_full", "φ(r,r')", "other"),
    ("phi_baseline_full", "random φ(r,r')", "other"),
    ("phi_null95_full", "null p95 ", "other"),
    ("spectral_ratio", "‖ΔW‖2/‖W‖2", "base"),
    ("amplification", "amplification", "base"),
    ("intruder_count", "intruders", "intruders"),
)

#: summary.csv's columns and what each holds (the first is the adapter's label)
CSV_COLUMNS = {
    "adapter": "the adapter's label (its directory or file name; -2, -3 added to repeats)",
    "module": "the module's path in the model (without PEFT's base_model.model. prefix)",
    "layer": "the block index (first all-digit path component); empty outside the blocks",
    "module_type": "the path with the layer replaced by '*': one matrix across layers",
    "kind": "linear, embedding or conv",
    "d_out": "rows of ΔW in y = ΔW x", "d_in": "columns of ΔW",
    "r": "LoRA rank (r or rank_pattern)", "lora_alpha": "lora_alpha (or alpha_pattern)",
    "scale": "s in ΔW = s·B·A (alpha/r, or alpha/sqrt(r) with rsLoRA)",
    "dora": "a DoRA magnitude vector is present",
    "delta_fro": "‖ΔW‖_F", "delta_spectral": "‖ΔW‖_2 = σ1(ΔW)",
    "energy_top1": "σ1² / Σσ² (nan for ΔW = 0)",
    "rank_90": "smallest k with 90 % of Σσ² (0 for ΔW = 0)", "rank_95": "the same, 95 %",
    "rank_99": "the same, 99 %", "knee": "the knee of the energy curve",
    "effective_rank": "exp(entropy of σ/Σσ) (Roy & Vetterli)",
    "stable_rank": "Σσ² / σ1²", "utilisation": "stable_rank / r",
    "other_r": "--other: the second adapter's rank",
    "phi_subspace": "--other: the basis compared (A, B, delta_in, delta_out)",
    "phi_dim": "--other: its width d",
    "phi_top1": "--other: φ(1,1)", "phi_full": "--other: φ(r, r')",
    "phi_baseline_top1": "--other: E φ(1,1) for random subspaces = 1/d",
    "phi_baseline_full": "--other: E φ(r, r') = max(r, r')/d",
    "phi_null95_top1": "--other: 95th percentile of φ(1,1) for random subspaces",
    "phi_null975_top1": "--other: 97.5th percentile of φ(1,1)",
    "phi_null95_full": "--other: 95th percentile of φ(r, r')",
    "phi_null975_full": "--other: 97.5th percentile of φ(r, r')",
    "base_key": "--base: the base weight's name",
    "base_orientation": "--base: same, or transposed (stored (d_in, d_out))",
    "orientation_source": "--base: shape, adapter (square modules follow the others), "
                          "base config (model_type in config.json beside the base), flag, "
                          "embedding, checkpoint",
    "base_note": "--base: e.g. a tied weight shared with the embedding",
    "w_fro": "--base: ‖W‖_F", "w_spectral": "--base: ‖W‖_2",
    "spectral_ratio": "--base: ‖ΔW‖_2 / ‖W‖_2",
    "w_proj_delta": "--base: ‖U_rᵀ W V_r‖_F with ΔW's top-r singular vectors",
    "w_proj_top": "--base: the same with W's own top-r vectors",
    "w_proj_random": "--base: the same for random directions (expected)",
    "amplification": "--base: ‖ΔW‖_F / w_proj_delta (LoRA §7.3)",
    "intruder_k": "--base: fine-tuned singular vectors examined",
    "intruder_eps": "--base: cosine threshold ε",
    "intruder_count": "--base: intruder dimensions (empty when only a range is known)",
    "intruder_count_min": "--base: the count's certain lower bound",
    "intruder_count_max": "--base: and upper bound (equal to the count when exact)",
    "intruder_uncertain": "--base: max - min",
    "intruder_method": "--base: dense, lanczos (certified), dense (full SVDs) or "
                       "randomized (bounds)",
    "intruder_certificate": "--base: Lanczos: the largest error bound on a max |cos|",
    "svd_method": "--base: how W's spectrum was had: full (computed or cached), "
                  "randomized(...), top-1 (Lanczos) with --intruders off",
    "intruder_indices": "--base: the intruders' ranks among the top k (0-based), space-separated",
}


def _needs(records, needs) -> bool:
    if needs is None:
        return True
    key = {"other": "phi_full", "base": "w_fro", "intruders": "intruder_k"}[needs]
    return any(getattr(r, key) is not None for r in records)


def summary_columns(records) -> list[tuple[str, str]]:
    """(field, header) of the summary columns that apply to ``records``."""
    return [(f, h.strip()) for f, h, needs in SUMMARY_COLUMNS if _needs(records, needs)]


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
            v = r.intruder_text if f == "intruder_count" else getattr(r, f)
            row.append(format_value(v))
        rows.append(row)
    return [h for _, h in cols], rows


def _fixed(headers, rows) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows]


def summary_table(records) -> str:
    """A fixed-width table (module left-aligned, numbers right-aligned), one line per module,
    and the closing lines on how to read φ and intruders when those columns are present."""
    headers, rows = _cells(records)
    return "\n".join(_fixed(headers, rows) + _notes(records))


def _notes(records) -> list[str]:
    notes = []
    if _needs(records, "other"):
        notes.append(f"φ compares the {records[0].phi_subspace!r} subspaces; random subspaces of "
                     f"R^d give E φ(1,1) = 1/d and E φ(r,r') = max(r,r')/d (the 'random' "
                     f"column), and exceed the 'null p95' columns 5 % of the time")
    if any(r.dora for r in records):
        notes.append("DoRA modules: the ΔW columns describe the directional update s·B·A; the "
                     "intruders use the merged DoRA weight m·(W0 + ΔW)/‖W0 + ΔW‖_row")
    with_k = [r for r in records if r.intruder_k is not None]
    if with_k:
        r0 = with_k[0]
        exact = all(r.intruder_count is not None for r in with_k)
        notes.append(
            f"intruders: of the top {r0.intruder_k} singular vectors of W0 + ΔW, those with "
            f"max |cos| < {r0.intruder_eps:g} to every singular vector of W0 (the paper's "
            f"count, full base spectrum)"
            + ("" if exact else "; 'a-b/k': only bounds are known (--intruders approx), the "
                                "count lies between a and b"))
    if _needs(records, "base"):
        notes.append("amplification = ‖ΔW‖F / ‖U_rᵀ W V_r‖F (U_r, V_r: ΔW's top-r singular "
                     "vectors); util. = stable rank / r")
    return notes


def markdown_rows(headers, rows) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    return (["| " + " | ".join(headers) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
            + ["| " + " | ".join(row) + " |" for row in esc])


def markdown_table(records, title: str = "") -> str:
    """The summary columns as a Markdown table, under ``title`` (a heading) when given, with the
    reading notes below it."""
    headers, rows = _cells(records)
    lines = ([f"# {title}", ""] if title else []) + markdown_rows(headers, rows)
    notes = _notes(records)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


# ----------------------------------------------------------------------------------------------
# the adapter-level summary, what was not analysed, several adapters, pairs
# ----------------------------------------------------------------------------------------------
def summary_lines(res: AdapterResult) -> list[str]:
    """The adapter-level summary of one adapter (before its per-module rows)."""
    s = adapter_summary(res.records)
    if not s["modules"]:
        return [f"{res.label}: no module analysed"]
    su, st = s["utilisation"], s["stable_rank"]
    lines = [f"{res.label}: {s['modules']} modules, r = {'/'.join(map(str, s['ranks']))}, "
             f"Σ‖ΔW‖F² = {s['total_fro'] ** 2:.4g}",
             f"  stable rank {st['min']:.3g} / {st['median']:.3g} / {st['max']:.3g} "
             f"(min / median / max); utilisation = stable rank / r {su['min']:.2f} / "
             f"{su['median']:.2f} / {su['max']:.2f}"]
    shares = [(x["layer"], x["share"]) for x in s["layer_energy_share"] if x["share"] is not None]
    if shares:
        top = sorted(shares, key=lambda t: -t[1])[:3]
        lines.append("  energy by layer: " + ", ".join(
            f"{'no layer' if l is None else l}: {v:.0%}" for l, v in shares[:12])
            + (" ..." if len(shares) > 12 else "")
            + f"; largest: {', '.join('no layer' if l is None else str(l) for l, _ in top)}")
    lines.append("  most room to truncate (lowest rank_95 / r, then utilisation): " + "; ".join(
        f"{w['module']} (r={w['r']}, stable rank {w['stable_rank']:.2f}, "
        f"95 % energy at rank {w['rank_95']})" for w in s["wasteful"]))
    return lines


def not_analysed_rows(res: AdapterResult) -> list[list[str]]:
    return [[t["module"], t["tensor"] or "(module)",
             "" if t["shape"] is None else "×".join(map(str, t["shape"])), t["reason"]]
            for t in res.not_analysed]


def not_analysed_lines(res: AdapterResult) -> list[str]:
    if not res.not_analysed:
        return [f"not analysed in {res.label}: nothing (every tensor is a LoRA factor)"]
    lines = [f"not analysed in {res.label} ({len(res.not_analysed)}):"]
    lines += [f"  {m}  {t}  [{shape}]: {why}" for m, t, shape, why in not_analysed_rows(res)]
    return lines


def side_by_side(run: SvdRun) -> tuple[list[str], list[list[str]]]:
    """One row per module, for each adapter its ‖ΔW‖F, effective rank, utilisation and (with a
    base) amplification and intruders."""
    labels = [a.label for a in run.adapters]
    fields = [("delta_fro", "‖ΔW‖F"), ("effective_rank", "eff.rank"), ("utilisation", "util.")]
    if any(r.w_fro is not None for a in run.adapters for r in a.records):
        fields += [("amplification", "amp."), ("intruder_count", "intr.")]
    by = [{r.module: r for r in a.records} for a in run.adapters]
    names = list(dict.fromkeys(m for a in run.adapters for m in (r.module for r in a.records)))
    names = natural_sorted(names)
    headers = ["module"] + [f"{h} {lab}" for lab in labels for _, h in fields]
    rows = []
    for n in names:
        row = [n]
        for b in by:
            r = b.get(n)
            for f, _ in fields:
                v = None if r is None else (r.intruder_text if f == "intruder_count"
                                            else getattr(r, f))
                row.append(format_value(v))
        rows.append(row)
    return headers, rows


PAIR_COLUMNS = (("module", "module"), ("a", "a"), ("b", "b"), ("phi_full", "φ(r,r')"),
                ("phi_null95_full", "null p95"), ("magnitude_ratio", "‖ΔWa‖/‖ΔWb‖"),
                ("overlap_in", "overlap in"), ("overlap_in_null95", "null p95 in"),
                ("overlap_out", "overlap out"), ("overlap_out_null95", "null p95 out"),
                ("cosine", "cos(ΔWa,ΔWb)"), ("verdict", "verdict"))


def pair_cells(run: SvdRun) -> tuple[list[str], list[list[str]]]:
    labels = [a.label for a in run.adapters]
    rows = []
    for p in run.pairs:
        row = []
        for f, _ in PAIR_COLUMNS:
            v = getattr(p, f)
            row.append(labels[v] if f in ("a", "b") else format_value(v))
        rows.append(row)
    return [h for _, h in PAIR_COLUMNS], rows


def phi_matrix(run: SvdRun, field: str = "phi_full") -> dict:
    """{module type: {layer: N × N matrix}} of ``field`` between every pair of adapters (1 on
    the diagonal, NaN where a pair has no common module)."""
    n = len(run.adapters)
    out: dict = {}
    for p in run.pairs:
        M = out.setdefault(p.module_type, {}).setdefault(p.layer, np.eye(n))
        M[p.a, p.b] = M[p.b, p.a] = getattr(p, field)
    return out


def phi_matrix_rows(run: SvdRun) -> dict:
    """{module type: N rows of N cells}: the median over layers of φ(r, r') / null p95 for every
    pair of adapters ("" on the diagonal)."""
    n = len(run.adapters)
    ratios: dict = {}
    for p in run.pairs:
        if p.phi_null95_full:
            ratios.setdefault(p.module_type, {}).setdefault((p.a, p.b), []).append(
                p.phi_full / p.phi_null95_full)
    out = {}
    for t, by_pair in ratios.items():
        rows = [["" for _ in range(n)] for _ in range(n)]
        for (a, b), vals in by_pair.items():
            rows[a][b] = rows[b][a] = format_value(float(np.median(vals)))
        out[t] = rows
    return out


def verdict_counts(run: SvdRun) -> list[str]:
    labels = [a.label for a in run.adapters]
    counts: dict = {}
    for p in run.pairs:
        key = (labels[p.a], labels[p.b])
        counts.setdefault(key, {}).setdefault(p.verdict, 0)
        counts[key][p.verdict] += 1
    return [f"  {a} vs {b}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items(),
                                                                       key=lambda t: -t[1]))
            for (a, b), c in counts.items()]


#: the terminal lists at most this many skipped tensors per adapter (summary.md has them all)
TERMINAL_SKIPPED = 12


def run_text(run: SvdRun, markdown: bool = False, title: str = "") -> str:
    """The report of a run, as Markdown (everything: ``summary.md``) or for the terminal. The
    terminal gets the same for one adapter (the skipped tensors cut at
    :data:`TERMINAL_SKIPPED`); with several adapters it gets each adapter's summary, the φ
    matrix, the verdict counts and the warnings, and names the files that hold the per-module
    tables, the side-by-side table and every pair."""
    out = [f"# {title}", ""] if markdown and title else []

    def table(headers, rows):
        return markdown_rows(headers, rows) if markdown else _fixed(headers, rows)

    many = len(run.adapters) > 1
    brief = many and not markdown
    for res in run.adapters:
        if markdown:
            out += [f"## {res.label}", ""] if many else []
            out += ["**Summary.** " + summary_lines(res)[0], ""]
            out += [f"- {x.strip()}" for x in summary_lines(res)[1:]] + [""]
        else:
            out += summary_lines(res)
            skipped = [t for t in res.not_analysed if t["tensor"] is not None]
            failed = [t for t in res.not_analysed if t["tensor"] is None]
            if brief:
                out += [f"  not analysed: {len(skipped)} tensor(s) left out, {len(failed)} "
                        f"module(s) failed (summary.md lists each with its reason)", ""]
                continue
            out += [""]
        if res.records:
            headers, rows = _cells(res.records)
            out += table(headers, rows) + [""]
            out += _notes(res.records) + [""]
        if markdown:
            out += [f"**Not analysed** ({len(res.not_analysed)})", ""]
            if res.not_analysed:
                out += markdown_rows(["module", "tensor", "shape", "reason"],
                                     not_analysed_rows(res))
            else:
                out += ["Nothing: every tensor is a LoRA factor."]
            out += [""]
        else:
            lines = not_analysed_lines(res)
            if len(lines) > TERMINAL_SKIPPED + 1:
                lines = lines[:TERMINAL_SKIPPED + 1] + [
                    f"  ... and {len(lines) - 1 - TERMINAL_SKIPPED} more (summary.md, "
                    f"not_analysed.csv)"]
            out += lines + [""]
    if brief:
        out += ["per-module tables, side by side: summary.md and summary.csv; every pair: "
                "summary.md and pairs.csv", ""]
    if many and not brief:
        headers, rows = side_by_side(run)
        out += (["## Side by side", ""] if markdown else ["side by side:"]) + table(headers, rows)
        out += [""]
    if run.pairs and len(run.adapters) > 2:
        out += (["## φ matrix per module type", ""] if markdown else
                ["φ(r,r') / null p95 between every pair, median over layers (> 1: more alike "
                 "than 95 % of random pairs):"])
        labels = [a.label for a in run.adapters]
        for t, rows in phi_matrix_rows(run).items():
            out += ([f"`{t}`", ""] if markdown else [f"{t}:"])
            out += table(["adapter"] + labels, [[lab] + row for lab, row in zip(labels, rows)])
            out += [""]
    if run.pairs:
        if not brief:
            headers, rows = pair_cells(run)
            out += (["## Pairs: φ against its null, merge triage", ""] if markdown else
                    ["pairs (φ against the null's 95th percentile; merge triage):"])
            out += table(headers, rows) + [""]
        out += ["verdicts (merge triage per module):"] + verdict_counts(run) + [""]
    if run.warnings:
        out += (["## Warnings", ""] if markdown else []) + [f"warning: {w}" for w in run.warnings]
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# CSV and JSON
# ----------------------------------------------------------------------------------------------
#: ModuleRecord fields kept out of the CSV (arrays; records.json has them)
_ARRAYS = ("singular_values", "phi_grid", "intruder_indices", "intruder_similarities")


def csv_columns() -> list[str]:
    """The CSV's columns (:data:`CSV_COLUMNS`): the adapter's label, every
    :class:`ModuleRecord` field but the arrays, then ``intruder_indices`` as a space-separated
    string."""
    return ["adapter"] + [f.name for f in dataclasses.fields(ModuleRecord)
                          if f.name not in _ARRAYS] + ["intruder_indices"]


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))          # repr: the shortest text that reads back exactly
    if isinstance(v, (np.integer, np.bool_)):
        return str(v.item())
    return str(v)


def csv_text(records, label: str = "", run: SvdRun | None = None) -> str:
    """Every scalar field of every record as CSV (:func:`csv_columns`), one row per (adapter,
    module); floats written with ``repr`` (they read back exactly), None as an empty cell."""
    fields = csv_columns()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    groups = [(a.label, a.records) for a in run.adapters] if run is not None else \
        [(label, records)]
    for lab, recs in groups:
        for r in recs:
            row = r.row()
            row["adapter"] = lab
            w.writerow([_csv_cell(row.get(f)) for f in fields])
    return buf.getvalue()


def _rows_csv(headers, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(rows)
    return buf.getvalue()


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()] if v.ndim else _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None    # JSON has no NaN: null
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _record_json(r) -> dict:
    return {f.name: _jsonable(getattr(r, f.name)) for f in dataclasses.fields(r)}


def records_json(run: SvdRun, meta: dict | None = None) -> dict:
    """The whole run as JSON (module docstring): ``format``, ``schema_version``,
    ``minilora_version``, ``meta`` (inputs and options), ``adapters`` (label, path, kind, config,
    summary, rank suggestions, records, not_analysed), ``pairs``, ``warnings``. Nothing that
    depends on how the run went (time, cache, serial or Dask): the same inputs give the same
    bytes."""
    return {
        "format": RECORDS_FORMAT, "schema_version": SCHEMA_VERSION,
        "minilora_version": minilora.__version__, **(meta or {}),
        "adapters": [{"label": a.label, "path": a.path, "kind": a.kind,
                      "config": _jsonable(a.config),
                      "summary": _jsonable(adapter_summary(a.records)),
                      "rank_suggestions": {c: rank_pattern(a.records, c) for c in RANK_CRITERIA},
                      "records": [_record_json(r) for r in a.records],
                      "not_analysed": _jsonable(a.not_analysed)} for a in run.adapters],
        "pairs": [_record_json(p) for p in run.pairs],
        "warnings": list(run.warnings),
    }


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(ModuleRecord)
                 if f.type in ("float", "float | None")}


def _record_from(d: dict, cls=ModuleRecord):
    d = dict(d)
    for k in _ARRAYS:
        if d.get(k) is not None:
            arr = [np.nan if x is None else x for x in np.ravel(np.asarray(d[k], dtype=object))]
            d[k] = np.asarray(arr, dtype=np.int64 if k == "intruder_indices" else np.float64
                              ).reshape(np.shape(np.asarray(d[k], dtype=object)))
    for f in dataclasses.fields(cls):
        if f.name in d and d[f.name] is None and f.type == "float":
            d[f.name] = float("nan")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def read_run(path) -> dict:
    """``records.json`` back as a dict with ModuleRecord / PairRecord objects in place."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != RECORDS_FORMAT:
        raise SvdInputError(f"{path}: not a {RECORDS_FORMAT} file (written by minilora svd)")
    for a in data["adapters"]:
        a["records"] = [_record_from(r) for r in a["records"]]
    data["pairs"] = [_record_from(p, PairRecord) for p in data["pairs"]]
    return data


def read_records(path, adapter: int = 0) -> tuple[list[ModuleRecord], dict]:
    """(records, meta) of one adapter (the first by default) from a ``records.json``."""
    data = read_run(path)
    recs = data["adapters"][adapter]["records"]
    meta = {k: v for k, v in data.items() if k not in ("adapters", "pairs")}
    meta["adapter_kind"] = data["adapters"][adapter]["kind"]
    return recs, meta


def run_from_json(path) -> SvdRun:
    """A :class:`SvdRun` rebuilt from ``records.json`` (figures redrawn from saved results)."""
    data = read_run(path)
    adapters = [AdapterResult(a["label"], a["path"], a["kind"], a["config"], a["records"],
                              a["not_analysed"]) for a in data["adapters"]]
    return SvdRun(adapters, data["pairs"], data.get("warnings", []))


def write_report(out_dir, run: SvdRun, meta: dict | None = None, title: str = "") -> list[Path]:
    """Write the run's files into ``out_dir`` (module docstring), each atomically (temp file +
    rename); returns their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / SUMMARY_CSV, out_dir / SUMMARY_MD, out_dir / NOT_ANALYSED_CSV,
             out_dir / RANK_PATTERN_JSON, out_dir / RECORDS_JSON]
    atomic_write_text(paths[0], csv_text([], run=run))
    atomic_write_text(paths[1], run_text(run, markdown=True, title=title))
    atomic_write_text(paths[2], _rows_csv(
        ["adapter", "module", "tensor", "shape", "reason"],
        [[a.label, *row] for a in run.adapters for row in not_analysed_rows(a)]))
    atomic_write_json(paths[3], {a.label: {c: rank_pattern(a.records, c) for c in RANK_CRITERIA}
                                 for a in run.adapters})
    if run.pairs:
        labels = [a.label for a in run.adapters]
        fields = [f.name for f in dataclasses.fields(PairRecord)]
        rows = [[labels[v] if f in ("a", "b") else _csv_cell(v)
                 for f, v in ((f, getattr(p, f)) for f in fields)] for p in run.pairs]
        atomic_write_text(out_dir / PAIRS_CSV, _rows_csv(fields, rows))
        paths.insert(3, out_dir / PAIRS_CSV)
    atomic_write_json(paths[-1], records_json(run, meta))
    return paths


__all__ = ["CSV_COLUMNS", "NOT_ANALYSED_CSV", "PAIRS_CSV", "RANK_PATTERN_JSON",
           "SUMMARY_COLUMNS", "csv_columns", "csv_text", "format_value", "markdown_table",
           "phi_matrix", "phi_matrix_rows", "read_records", "read_run", "records_json", "run_from_json",
           "run_text", "side_by_side", "summary_columns", "summary_lines", "summary_table",
           "write_report"]
