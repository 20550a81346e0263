"""Score several adapters (and the base) on a task in one mixed-adapter batch: ``minilora score``.
"""
from __future__ import annotations

import time

import numpy as np

from minilora import backend
from minilora.adapters import AdapterRegistry
from minilora.data import encode_classification, encode_corpus
from minilora.errors import UsageError
from minilora.experiments.tasks import (
    LM_TASKS,
    classification_splits,
    get_task,
    task_splits,
)
from minilora.nn import ops
from minilora.train import fixed_batches


def score_adapters(registry: AdapterRegistry, tokenizer, task: str, adapters: list,
                   eval_batches: int = 16, batch_size: int = 8, block_size: int = 128,
                   eval_examples: int | None = None) -> dict:
    """Score every adapter of ``adapters`` (names, or None for the base) on ``task``, in mixed
    batches: each evaluation batch is repeated once per adapter and run as one batch.

    The windows and test rows are the ones :func:`minilora.experiments.finetune.finetune` scores (fixed
    batches, seed 12345), so the numbers are comparable with its ``task_metric``.

    Returns:
        ``{"metric": str, "higher_is_better": bool, "scores": {label: value}, "rows": int,
        "seconds": float}`` with label = the adapter name or "base".
    """

    get_task(task)
    if not adapters:
        raise UsageError("give at least one adapter (or None for the base) to score")
    labels = ["base" if a is None else a for a in adapters]
    if len(set(labels)) != len(labels):
        raise UsageError(f"adapters to score must be distinct, got {labels}")
    for a in adapters:
        if a is not None:
            registry._get(a)
    n = len(adapters)
    t0 = time.perf_counter()
    if task in LM_TASKS:
        test_ids = encode_corpus(task_splits(task)[1], tokenizer)
        totals = [0.0] * n
        batches = fixed_batches(test_ids, eval_batches, batch_size, block_size, seed=12345)
        for x, y in batches:
            B = x.shape[0]
            X = backend.asarray(np.concatenate([x] * n).astype("int64"))  # (n B, T)
            logits = registry.forward(X, [a for a in adapters for _ in range(B)], check=False)
            yb = backend.asarray(y)
            for i in range(n):
                loss, _ = ops.cross_entropy_forward(logits[i * B:(i + 1) * B], yb)
                totals[i] += backend.to_scalar(loss)
        scores = {lab: t / len(batches) for lab, t in zip(labels, totals)}
        rows, metric, higher = len(batches) * batch_size * n, "test loss (nats/char)", False
    else:
        X, Y = encode_classification(classification_splits(task)["test"][:eval_examples],
                                     tokenizer, block_size)
        label_ids = Y[:, -1]
        candidates = np.unique(label_ids)
        correct = [0] * n
        chunk = max(1, 128 // n)
        for s in range(0, len(X), chunk):
            x = X[s:s + chunk]
            B = len(x)
            logits = registry.forward(backend.asarray(np.concatenate([x] * n).astype("int64")),
                                      [a for a in adapters for _ in range(B)], check=False)
            last = backend.to_numpy(logits[:, -1, :])[:, candidates]  # (n B, labels)
            pred = candidates[last.argmax(axis=1)]
            for i in range(n):
                correct[i] += int((pred[i * B:(i + 1) * B] == label_ids[s:s + B]).sum())
        scores = {lab: c / len(X) for lab, c in zip(labels, correct)}
        rows, metric, higher = len(X) * n, "test accuracy", True
    return {"metric": metric, "higher_is_better": higher, "scores": scores, "rows": rows,
            "seconds": time.perf_counter() - t0}


def format_scores(task: str, result: dict) -> str:
    """A small table of :func:`score_adapters`' result, best first."""
    scores = result["scores"]
    order = sorted(scores, key=scores.get, reverse=result["higher_is_better"])
    w = max(len(k) for k in scores)
    lines = [f"{task}: {result['metric']} ({'higher' if result['higher_is_better'] else 'lower'} "
             f"is better); {result['rows']} rows in mixed batches, {result['seconds']:.1f} s"]
    lines += [f"  {k:<{w}}  {scores[k]:.4f}" for k in order]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the articles' claim: per-task adapters hot-swapped vs one general adapter on mixed data
