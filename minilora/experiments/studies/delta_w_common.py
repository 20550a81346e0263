"""Shared by the ΔW studies: where the sweep's cells and weights are, and an evaluator that scores
a set of weights on the task and on the forgetting windows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from minilora import backend
from minilora.checkpoint import load_checkpoint
from minilora.data import encode_corpus, load_shakespeare
from minilora.errors import MiniloraError
from minilora.experiments.ablate_records import DEFAULT_RUNS, LINEARS, target_label
from minilora.experiments.finetune import FORGETTING_BATCH, FORGETTING_BLOCK
from minilora.experiments.paths import RESULTS, base_model_path
from minilora.experiments.tasks import task_splits
from minilora.methods.lora import lora_scaling, read_adapter
from minilora.train import evaluate, fixed_batches

def sweep_command(sweep, steps=100, ranks=None, targets=None, seeds=(0,), full=False,
                  pairs=None, like: dict | None = None) -> str:
    """The ``minilora ablate`` command that adds the given cells to the sweep in ``sweep``;
    ``like``: a cell of that sweep, whose settings (base, batch, window, ...) the new cells
    must share to join it."""
    parts = ["minilora ablate"]
    for flag, key, default in (("--base", "base", "shipped"), ("--batch-size", "batch_size", 8),
                               ("--block-size", "block_size", 128),
                               ("--eval-batches", "eval_batches", 16), ("--lr", "lr", None)):
        if like is not None and like.get(key, default) != default:
            parts.append(f"{flag} {like[key]}")
    if ranks:
        parts.append(f"--ranks {','.join(map(str, ranks))} --targets '{targets}'")
    if pairs:
        parts.append(f"--pairs '{pairs}'")
    parts.append(f"--seeds {','.join(map(str, seeds))}")
    if full:
        parts.append("--full")
    parts.append(f"--steps {steps} --out {Path(sweep).as_posix()}")
    return " ".join(parts)


def study_command(sweep, out, only=None) -> str:
    """The ``minilora delta-w`` command that writes the studies of ``sweep`` into ``out``
    (``--overwrite`` when ``out`` already holds files)."""
    out = Path(out)
    busy = out.is_dir() and any(out.iterdir())
    return (f"minilora delta-w --sweep {Path(sweep).as_posix()} --out {out.as_posix()}"
            + (f" --only {only}" if only else "") + (" --overwrite" if busy else ""))


#: how the committed sweep and studies were made (results/ablate, results/delta_w READMEs)
SWEEP_COMMAND = (sweep_command("results/ablate", 100, (1, 2, 4, 8, 16, 64), "q,v;all-linear",
                               full=True) + " && "
                 + sweep_command("results/ablate", 100, (8, 64), "q,v", seeds=(1,), full=True))
BUDGET_COMMAND = sweep_command("results/ablate", 100, pairs="q:8;k:8;v:8;o:8;q,k:4;q,v:4;q,k,v,o:2")
STUDY_COMMAND = "minilora delta-w --sweep results/ablate --out results/delta_w --overwrite"
OUT = RESULTS / "delta_w"
#: matrices whose left singular vectors of W_0 span R^d_out (d_out <= d_in): the intruder test is
#: well posed there; mlp.up (640 x 160) has only 160 of 640 output directions, so any new
#: direction has a small max |cos| by construction and is left out of the intruder counts
INTRUDER_MODULES = ("q", "k", "v", "o", "down")


class StudyError(MiniloraError):
    """The sweep lacks the cells (or their weights) a study needs; the message says which, and
    ``add`` (keyword arguments of :func:`sweep_command`) which cells would make it possible."""

    def __init__(self, message: str, add: dict | None = None):
        super().__init__(message)
        self.add = add


def rounded(x, digits=5):
    """Round floats (and nested lists of them) for compact JSON."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [rounded(v, digits) for v in x]
    return float(f"{float(x):.{digits}g}")


# ----------------------------------------------------------------------------------------------
# reading the sweep


def find_cells(records, method="lora", targets=None, r=None, seed=None, task="milton",
               steps=None) -> list[dict]:
    """The records matching every given field (``targets`` as a label: "q,v", "all-linear")."""
    out = []
    for rec in records:
        c = rec["config"]
        if c["task"] != task or c["method"] != method:
            continue
        if targets is not None and target_label(c["targets"]) != targets:
            continue
        if (r is not None and c["r"] != r) or (seed is not None and c["seed"] != seed):
            continue
        if steps is not None and c["steps"] != steps:
            continue
        out.append(rec)
    return sorted(out, key=lambda x: (x["config"]["r"] or 0, x["config"]["seed"]))


def one_cell(records, **kw) -> dict:
    found = find_cells(records, **kw)
    if not found:
        what = ", ".join(f"{k}={v}" for k, v in kw.items() if v is not None)
        raise StudyError(f"the sweep has no LoRA cell with {what}",
                         add=dict(ranks=(kw.get("r"),), targets=kw.get("targets", "q,v"),
                                  seeds=(kw.get("seed") or 0,)))
    return found[0]


def adapter_factors(rec, runs=DEFAULT_RUNS) -> tuple[dict, float]:
    """``({module: (B, A)}, scale)`` of a LoRA cell's adapter, float64."""
    path = Path(runs) / rec["key"] / "adapter.safetensors"
    if not path.exists():
        raise StudyError(f"the weights of cell {rec['key']} are not in {path.parent} (give "
                         "--runs where the sweep kept them, or run the sweep's command again "
                         f"into a new --out with --runs {runs}: cells are deterministic)")
    arrays, cfg = read_adapter(path)
    scale = lora_scaling(cfg.r, cfg.lora_alpha, cfg.use_rslora)
    names = sorted(n[:-len(".lora_A")] for n in arrays if n.endswith(".lora_A"))
    return {n: (np.asarray(arrays[n + ".lora_B"], np.float64),
                np.asarray(arrays[n + ".lora_A"], np.float64)) for n in names}, scale


def full_weights(rec, runs=DEFAULT_RUNS) -> dict:
    """``{parameter: array}`` of a full fine-tuning cell's model, float64."""
    path = Path(runs) / rec["key"] / "model.safetensors"
    if not path.exists():
        raise StudyError(f"the weights of cell {rec['key']} are not in {path.parent} (give "
                         "--runs where the sweep kept them, or run the sweep's command again "
                         f"into a new --out with --runs {runs}: cells are deterministic)")
    return {n: np.asarray(p, np.float64) for n, p in load_checkpoint(path)[0].named_parameters()}


def linear_names(model) -> list[str]:
    """The block linears of the model, ``blocks.{i}.attn.q`` ... ``blocks.{i}.mlp.down``."""
    return [n[:-len(".weight")] for n, _ in model.named_parameters()
            if n.endswith(".weight") and n.split(".")[-2] in LINEARS]


# ----------------------------------------------------------------------------------------------
# evaluating modified weights on the harness's windows


class Evaluator:
    """Task loss and Shakespeare loss of the base with some weights replaced, on the same fixed
    windows as the harness (so numbers compare with the records')."""

    def __init__(self, base=None, task="milton", eval_batches=16, batch_size=8,
                 block_size=128):
        self.model, tok, _ = load_checkpoint(base or base_model_path())
        self.modules = dict(self.model.named_modules())
        self.base = {n: backend.to_numpy(p).copy() for n, p in self.model.named_parameters()}
        _, test = task_splits(task)
        self.task_batches = fixed_batches(encode_corpus(test, tok), eval_batches, batch_size,
                                          block_size, seed=12345)
        sh = encode_corpus(load_shakespeare()["val"], tok)
        self.sh_batches = fixed_batches(sh, eval_batches, FORGETTING_BATCH,
                                        min(FORGETTING_BLOCK, self.model.config.block_size),
                                        seed=12345)
        self.sh_base = evaluate(self.model, self.sh_batches)
        self.evals = 0

    def __call__(self, weights: dict) -> dict:
        """``weights``: {module name: W (d_out, d_in)} replacing ``<name>.weight``; other
        parameters stay at the base. Returns task loss and forgetting."""
        try:
            for n, W in weights.items():
                m = self.modules[n]
                m.params["weight"] = np.asarray(W, dtype=m.params["weight"].dtype)
            task = evaluate(self.model, self.task_batches)
            sh = evaluate(self.model, self.sh_batches)
        finally:
            for n in weights:
                self.modules[n].params["weight"] = self.base[n + ".weight"]
        self.evals += 1
        return {"task_loss": task, "forgetting": sh - self.sh_base}


def lora_weights(factors, scale, base) -> dict:
    return {n: base[n + ".weight"].astype(np.float64) + scale * (B @ A)
            for n, (B, A) in factors.items()}
