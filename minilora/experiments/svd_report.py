"""The run of ``minilora svd``: open LoRA adapters of either kind, check them, and analyse them module
by module, serially or on Dask.

Two kinds of adapter are read, each with its own kind of base weights:

=====================================  ========================================================
adapter                                base weights (``--base``)
=====================================  ========================================================
a PEFT LoRA directory (anyone's        a ``.safetensors`` file or a (sharded) directory of them,
model: ``adapter_model.safetensors``   matched by module name (:class:`BaseWeights`); none by
+ ``adapter_config.json``)             default
a minilora adapter file                a minilora checkpoint (:func:`load_checkpoint`); the
(:func:`minilora.methods.lora.save_adapter`,   shipped base model by default
``minilora-adapter-v1``)
=====================================  ========================================================

A run (:func:`run_analysis`) takes one or many adapters (:class:`AdapterInput`, a directory of
PEFT adapters expanded by :func:`expand_adapter_paths`) and one base. Everything that can be
checked is checked first (:func:`prepare`: every factor finite, every base weight present and
fitting, with the file, module and tensor named; ``keep_going`` turns a refusal into a "not
analysed" entry). Then one task per module (:func:`analyze_module`), for every adapter that
holds it: W_0 read once, its SVD had once (computed, or read from the
:class:`~minilora.analysis.BaseSvdCache`), one :class:`~minilora.analysis.ModuleRecord` per
adapter (ΔW's spectrum from the r × r core; φ against ``other``; with the base, ‖ΔW‖₂/‖W‖₂,
amplification and the exact intruder count), and a :class:`~minilora.analysis.decisions.PairRecord`
per pair of adapters. The tasks run in this process or on Dask (a LocalCluster, or a scheduler
whose workers see the same files and cache directory); :func:`assemble` puts them back in natural
module order, so both give the same :class:`SvdRun`. Tables and files:
:mod:`minilora.experiments.svd_tables`.

How to read φ: two random r-dimensional subspaces of R^d already have E φ(i, j) = max(i, j) / d
(1/d for the top directions), so a measured φ means something only against that baseline, which
every table prints beside it. At minilora's width (d = 160) and r = 8 the baseline of φ(r, r) is
0.05; at LLaMA-7B's width (4096) it is 0.004.

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minilora import backend
from minilora.analysis import (
    BaseWeights,
    PeftAdapter,
    analyze_lora_module,
    base_info,
    lora_scaling,
    plan_base,
    read_base,
    read_peft_adapter,
)
from minilora.analysis.decisions import compare_modules
from minilora.analysis.exact_intruders import BaseSvdCache, MemoryCache
from minilora.analysis.module_paths import natural_key, natural_sorted
from minilora.analysis.peft_files import WEIGHTS_NAME, LoraModule, SkippedTensor
from minilora.checkpoint import load_checkpoint
from minilora.errors import MiniloraError
from minilora.experiments.ablate import _dask, start_cluster
from minilora.methods.lora import read_adapter
from minilora.nn.layers import Embedding, Linear

RECORDS_FORMAT = "minilora-svd-records-v2"
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
            self.modules[name] = LoraModule(name, self.kind_of(name), B.shape[0], A.shape[1],
                                            A.shape[0], float(self.config.lora_alpha),
                                            self.scale, f"{name}.lora_A", f"{name}.lora_B", None)
        if not self.modules:
            raise SvdInputError(f"{self.path}: no lora_A / lora_B factors in this adapter")
        self.modules = {n: self.modules[n] for n in natural_sorted(self.modules)}
        self.skipped = [SkippedTensor(k, k.rsplit(".", 1)[0], tuple(a.shape),
                                      "a trained bias (bias='all' or 'lora_only'): not part of "
                                      "ΔW = s·B·A")
                        for k, a in arrays.items() if not k.endswith((".lora_A", ".lora_B"))]
        for name, (B, A) in self._arrays.items():
            for key, a in ((f"{name}.lora_A", A), (f"{name}.lora_B", B)):
                if not np.isfinite(a).all():
                    self._bad = getattr(self, "_bad", {})
                    self._bad[name] = (f"{self.path}: module {name}: tensor {key!r} holds "
                                       f"{int(np.sum(~np.isfinite(a)))} NaN or infinite "
                                       f"value(s) of {a.size}")

    def check_module(self, name: str) -> None:
        """Raise naming the file, module and tensor when a factor holds NaN or inf."""
        bad = getattr(self, "_bad", {})
        if name in bad:
            raise SvdInputError(bad[name])

    def magnitude(self, name: str):
        return None

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
        for name, mod in self.modules.items():
            d_out, d_in = mod.d_out, mod.d_in
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
    return {n: (m.d_out, m.d_in) for n, m in adapter.modules.items()}


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


# ----------------------------------------------------------------------------------------------
# the base weights of either kind of adapter, read one module at a time
# ----------------------------------------------------------------------------------------------
class PeftBase:
    """A PEFT adapter's base: :class:`BaseWeights` and where each module's W_0 is (its
    :class:`~minilora.analysis.BasePlan`). Picklable: Dask workers read their own modules."""

    def __init__(self, weights: BaseWeights, plan: dict):
        self.weights, self.plan = weights, plan

    def has(self, name: str) -> bool:
        return name in self.plan

    def read(self, name: str, mod) -> np.ndarray:
        return read_base(self.weights, self.plan[name], mod)

    def key(self, name: str) -> str:
        return self.plan[name].key

    def info(self, name: str) -> dict:
        return base_info(self.plan[name])


class DictBase:
    """A minilora adapter's base: {module: W_0 (d_out, d_in)} from the checkpoint."""

    def __init__(self, weights: dict):
        self.weights = weights

    def has(self, name: str) -> bool:
        return name in self.weights

    def read(self, name: str, mod) -> np.ndarray:
        return self.weights[name]

    def key(self, name: str) -> str:
        return f"{name}.weight"

    def info(self, name: str) -> dict:
        return dict(base_orientation="same", orientation_source="checkpoint", base_note=None)


# ----------------------------------------------------------------------------------------------
# a run: many adapters, one base, one record per (adapter, module)
# ----------------------------------------------------------------------------------------------
#: version of records.json's layout (bump when a field changes meaning or goes away)
SCHEMA_VERSION = 2


@dataclass
class AdapterInput:
    """One adapter of a run: its label (the directory or file name, made unique), path, the
    opened adapter and the modules selected for analysis."""
    label: str
    path: str
    adapter: object
    names: list

    @property
    def kind(self) -> str:
        return "peft" if is_peft(self.adapter) else "minilora"

    @property
    def config(self) -> dict:
        if is_peft(self.adapter):
            return dict(self.adapter.config)
        return dataclasses.asdict(self.adapter.config)


@dataclass
class AdapterResult:
    """The records of one adapter and what was not analysed in it."""
    label: str
    path: str
    kind: str
    config: dict
    records: list = field(default_factory=list)
    not_analysed: list = field(default_factory=list)   # [{"module", "tensor", "shape", "reason"}]


@dataclass
class SvdRun:
    """Everything one ``minilora svd`` run measured."""
    adapters: list                                      # [AdapterResult]
    pairs: list = field(default_factory=list)           # [PairRecord], two or more adapters
    warnings: list = field(default_factory=list)
    cache: dict | None = None                           # hits, misses, seconds, path, bytes
    seconds: float = 0.0
    execution: str = "serial"
    module_seconds: dict = field(default_factory=dict)  # wall seconds of each module's task


def unique_labels(paths) -> list[str]:
    """:func:`adapter_label` of each path, with ``-2``, ``-3`` ... added to repeats."""
    out, seen = [], {}
    for p in paths:
        label = adapter_label(p)
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out


def expand_adapter_paths(paths) -> list[Path]:
    """The adapters named on the command line: a PEFT directory or a minilora file stands for
    itself; a directory without ``adapter_config.json`` stands for every adapter directly inside
    it (sorted naturally). Refuses a directory holding none."""
    out = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "adapter_config.json").exists() \
                and not (p / WEIGHTS_NAME).exists():
            found = natural_sorted(str(c) for c in p.iterdir()
                                   if c.is_dir() and (c / "adapter_config.json").exists())
            if not found:
                raise SvdInputError(f"{p} is a directory without adapter_config.json and holds "
                                    f"no adapter directory (each needs adapter_config.json and "
                                    f"{WEIGHTS_NAME})")
            out += [Path(f) for f in found]
        else:
            out.append(p)
    return out


def prepare(inputs: list[AdapterInput], base_path=None, keep_going: bool = False,
            base_loaded=None) -> tuple[object, list, dict]:
    """Check what can be checked before any work: every selected module's factors are finite,
    and (with a base) each module's base weight exists and fits. Returns (base source,
    warnings, problems {(adapter index, module): reason}); without ``keep_going`` the first
    problem is raised, naming the file, the module and the tensor."""
    problems, warnings = {}, []
    for i, inp in enumerate(inputs):
        for n in inp.names:
            try:
                inp.adapter.check_module(n)
            except MiniloraError as e:
                problems[(i, n)] = str(e)
    source = None
    if base_loaded is not None:
        source = DictBase(base_loaded)
    elif base_path is not None:
        weights = BaseWeights(base_path)
        plan = {}
        for i, inp in enumerate(inputs):
            p, w, probs = plan_base(inp.adapter, weights, inp.names)
            for n, bp in p.items():
                if n in plan and plan[n].key != bp.key:
                    raise SvdInputError(f"module {n} maps to base weight {plan[n].key!r} for one "
                                        f"adapter and {bp.key!r} for another")
                plan[n] = bp
            warnings += [x for x in w if x not in warnings]
            for n, msg in probs.items():
                problems[(i, n)] = msg
        source = PeftBase(weights, plan)
    if problems and not keep_going:
        (i, n), msg = next(iter(problems.items()))
        more = f" ({len(problems) - 1} more module(s) too)" if len(problems) > 1 else ""
        raise SvdInputError(f"{msg}{more}; pass --keep-going to analyse the other modules and "
                            f"list this one under 'not analysed'")
    return source, warnings, problems


def analyze_module(name: str, adapters: list, base, other=None, opts: dict | None = None,
                   cache_dir=None, use_cache: bool = True, keep_going: bool = False,
                   skip: tuple = ()) -> dict:
    """The work of one module for every adapter that has it: one record per adapter (φ against
    ``other`` when given), the pairs between adapters, and the cache's counters.

    ``adapters`` is a list of (index, adapter); ``base`` a :class:`PeftBase` / :class:`DictBase`
    or None; ``skip`` the adapter indices whose module was refused before the run. W_0 is read
    and its SVD had (cache or computed) once, whatever the number of adapters. A top-level
    function, so that Dask workers can run it.
    """
    opts = dict(opts or {})
    t0 = time.perf_counter()
    cache = _Once(BaseSvdCache(cache_dir) if use_cache else MemoryCache())
    out = {"module": name, "records": {}, "failed": {}, "pairs": [], "cache": None,
           "seconds": 0.0}
    factors = {}
    W = None
    try:
        if base is not None and base.has(name):
            mod0 = next(a.modules[name] for i, a in adapters if i not in skip)
            W = base.read(name, mod0)
    except (MiniloraError, StopIteration) as e:
        for i, _ in adapters:
            out["failed"][i] = f"base weight: {e}"
        if not keep_going:
            raise SvdInputError(f"module {name}: {e}") from None
        return out
    for i, adapter in adapters:
        if i in skip:
            continue
        mod = adapter.modules[name]
        try:
            B, A = adapter.factors(name)
            oth = None
            if other is not None and name in other.modules:
                oth = (*other.factors(name), other.modules[name].scale)
            magnitude = adapter.magnitude(name) if W is not None else None
            rec = analyze_lora_module(
                name, B, A, mod.scale, kind=mod.kind, lora_alpha=mod.lora_alpha, other=oth,
                W=W, magnitude=magnitude, dora=mod.magnitude_key is not None,
                base_key=base.key(name) if W is not None else None, cache=cache,
                base_info=base.info(name) if W is not None else None, **opts)
            out["records"][i] = rec
            factors[i] = (B, A, mod.scale)
        except (MiniloraError, np.linalg.LinAlgError) as e:
            if not keep_going:
                raise SvdInputError(f"{getattr(adapter, 'path', '')}: module {name}: {e}; pass "
                                    f"--keep-going to analyse the other modules") from None
            out["failed"][i] = f"error: {e}"
    idx = sorted(factors)
    for a_pos, a in enumerate(idx):
        for b in idx[a_pos + 1:]:
            ra, rb = out["records"][a], out["records"][b]
            if (ra.d_out, ra.d_in) != (rb.d_out, rb.d_in):
                continue
            out["pairs"].append(compare_modules(name, a, b, factors[a], factors[b],
                                                subspace=opts.get("subspace", "A")))
    out["cache"] = (cache.hits, cache.misses, cache.seconds_computing,
                    cache.cpu_seconds_computing)
    out["seconds"] = time.perf_counter() - t0
    return out


class _Once:
    """A cache for one task: W_0's SVD is looked up once whatever the number of adapters."""

    def __init__(self, cache):
        self.cache, self.dec = cache, None

    def get(self, W, key=None):
        if self.dec is None:
            self.dec = self.cache.get(W, key)
        return self.dec

    @property
    def hits(self):
        return self.cache.hits

    @property
    def misses(self):
        return self.cache.misses

    @property
    def seconds_computing(self):
        return self.cache.seconds_computing

    @property
    def cpu_seconds_computing(self):
        return self.cache.cpu_seconds_computing


def run_analysis(inputs: list[AdapterInput], base_source=None, other=None, *,
                 problems: dict | None = None, opts: dict | None = None, cache_dir=None,
                 use_cache: bool = True, keep_going: bool = False, serial: bool = True,
                 scheduler: str | None = None, workers: int = 2,
                 progress: Callable[[int, int, str], None] | None = None) -> SvdRun:
    """Analyse every selected module of every adapter, one task per module (all adapters that
    hold it): in this process (``serial``), or on Dask (a LocalCluster of ``workers`` processes
    with one BLAS thread each, or the scheduler at ``scheduler``). Records come back in natural
    module order whatever order the tasks finish in, so both give the same :class:`SvdRun`.
    """
    problems = problems or {}
    t0 = time.perf_counter()
    names = natural_sorted({n for inp in inputs for n in inp.names})
    tasks = []
    for n in names:
        members = [(i, inp.adapter) for i, inp in enumerate(inputs) if n in inp.names]
        skip = tuple(i for i, _ in members if (i, n) in problems)
        tasks.append((n, members, skip))
    kw = dict(base=base_source, other=other, opts=opts, cache_dir=cache_dir,
              use_cache=use_cache, keep_going=keep_going)
    results = {}
    execution = "serial"
    if serial:
        for k, (n, members, skip) in enumerate(tasks):
            results[n] = analyze_module(n, members, skip=skip, **kw)
            if progress is not None:
                progress(k + 1, len(tasks), n)
    else:
        client, cluster = start_cluster(workers, 1, scheduler)
        execution = f"dask ({scheduler})" if scheduler else f"dask ({workers} local workers)"
        _, distributed = _dask()
        try:
            shared = client.scatter({"kw": kw}, broadcast=True)["kw"]
            futures = {client.submit(_task, n, members, skip, shared, pure=False): n
                       for n, members, skip in tasks}
            for k, fut in enumerate(distributed.as_completed(futures)):
                n = futures[fut]
                results[n] = fut.result()
                if progress is not None:
                    progress(k + 1, len(tasks), n)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return assemble(inputs, results, names, problems, time.perf_counter() - t0, execution,
                    cache_dir if use_cache else None)


def _task(name, members, skip, kw):
    return analyze_module(name, members, skip=skip, **kw)


def assemble(inputs, results: dict, names: list, problems: dict, seconds: float,
             execution: str, cache_dir) -> SvdRun:
    """Put the per-module results back together in natural order (a :class:`SvdRun`)."""
    adapters = []
    for i, inp in enumerate(inputs):
        res = AdapterResult(inp.label, inp.path, inp.kind, inp.config)
        for t in getattr(inp.adapter, "skipped", []):
            res.not_analysed.append({"module": t.module, "tensor": t.key,
                                     "shape": list(t.shape), "reason": t.reason})
        for n in names:
            if n not in inp.names:
                continue
            r = results[n]
            if (i, n) in problems:
                res.not_analysed.append({"module": n, "tensor": None, "shape": None,
                                         "reason": problems[(i, n)]})
            elif i in r["failed"]:
                res.not_analysed.append({"module": n, "tensor": None, "shape": None,
                                         "reason": r["failed"][i]})
            elif i in r["records"]:
                res.records.append(r["records"][i])
        res.not_analysed.sort(key=lambda t: natural_key(t["module"]))
        adapters.append(res)
    pairs = [p for n in names for p in results[n]["pairs"]]
    hits = sum(r["cache"][0] for r in results.values() if r["cache"])
    misses = sum(r["cache"][1] for r in results.values() if r["cache"])
    secs = sum(r["cache"][2] for r in results.values() if r["cache"])
    cpu = sum(r["cache"][3] for r in results.values() if r["cache"])
    cache = {"hits": hits, "misses": misses, "seconds_computing": secs,
             "cpu_seconds_computing": cpu}
    if cache_dir is not None:
        cache.update(BaseSvdCache(cache_dir).report())
    return SvdRun(adapters, pairs, [], cache, seconds, execution,
                  {n: results[n].get("seconds", 0.0) for n in names})


__all__ = ["RECORDS_FORMAT", "RESIDUAL_INITS", "SCHEMA_VERSION", "AdapterInput", "AdapterResult",
           "DictBase", "MiniloraAdapter", "PeftBase", "SvdInputError", "SvdRun", "adapter_label",
           "analyze_module", "assemble", "check_init", "check_pair", "expand_adapter_paths",
           "is_peft", "module_shapes", "open_adapter", "open_base", "prepare", "run_analysis",
           "select_modules", "unique_labels"]
