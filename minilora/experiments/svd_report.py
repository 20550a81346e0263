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
(:func:`minilora.methods.lora.save_adapter`,   shipped base model by default
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

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

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
from minilora.methods.lora import read_adapter
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


__all__ = ["RECORDS_FORMAT", "RESIDUAL_INITS", "MiniloraAdapter", "SvdInputError", "adapter_label",
           "analyze", "check_init", "check_pair", "is_peft", "module_shapes", "open_adapter",
           "open_base", "select_modules"]
