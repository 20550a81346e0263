"""The fine-tuning tasks: which corpus, which metric, which recipe. One entry per task in
:data:`TASKS`; everything else (the harness, the CLI's choices, scoring, the claim study) reads it.

* ``milton``    continued language modelling on *Paradise Lost*: Books I-IX train, Book X test;
* ``python``    code language modelling on the shipped stdlib snapshot, whole modules held out;
* ``sentiment`` VADER movie-review sentences: the character after ``sentence<TAB>`` is ``+`` or
  ``-``; metric: exact-match accuracy on the held-out 20 % (chance 50 %, majority 50.4 %);
* ``lexicon``   single VADER words, same format (majority 55.8 %).

The recipe of the labelled tasks (:attr:`Task.recipe`) and why:

* The base never saw ``+`` or a tab in Shakespeare: after ``sentence<TAB>`` it gives
  P(+) ~ 4e-8 and P(-) ~ 2e-3, so the frozen base always answers ``-`` (= the majority), and LoRA
  on q, v alone spends its first ~150 steps only learning to emit ``+`` at all. Putting
  ``lm_head`` among the LoRA targets (full fine-tuning trains it anyway) learns the answer format
  in ~70 steps.
* One label per row is little signal: batch 32 and 400 steps (~1.6 epochs of the 8,058 training
  sentences) for sentiment; rows of 24 and batch 64 for the single words of lexicon.
* Label loss alone drives every position towards ``+``/``-`` (forgetting grows by several nats);
  the LM loss on the sentence beside it (:func:`label_lm_forward_backward`, ``lm_weight`` 1) keeps
  forgetting near the LM tasks'. Measured results: ``results/finetune/`` and its ``table.md``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from minilora import backend
from minilora.backend import xp
from minilora.data import (
    encode_classification,
    encode_corpus,
    get_batch,
    load_lexicon,
    load_milton,
    load_python_code,
    load_sentiment,
    sample_rows,
)
from minilora.errors import UsageError
from minilora.nn import ops


class Task(NamedTuple):
    """One fine-tuning task.

    Attributes:
        name: the CLI name.
        kind: "lm" (next-character loss on held-out text) or "classification" (the label
            character after ``text<TAB>``; exact-match accuracy).
        load: ``() -> {"train": ..., "test": ...}``: text for "lm", ``[(text, label)]`` lists for
            "classification".
        recipe: the harness defaults for this task: ``train`` (TrainConfig overrides), ``lr``
            (per-method learning rates), ``lora_targets``, ``lm_weight``. Empty: the harness's.
        about: one line for ``--help``.
    """
    name: str
    kind: str
    load: Callable[[], dict]
    recipe: dict
    about: str


_LABEL_RECIPE = {"lr": {"lora": 3e-3}, "lora_targets": ("q", "k", "v", "o", "up", "down",
                                                         "lm_head"), "lm_weight": 1.0}

TASKS = {
    "milton": Task("milton", "lm", load_milton, {},
                   "Paradise Lost, Books I-IX -> Book X (test loss, nats/char)"),
    "python": Task("python", "lm", load_python_code, {},
                   "CPython stdlib modules, whole modules held out (test loss, nats/char)"),
    "sentiment": Task("sentiment", "classification", load_sentiment,
                      {"train": {"max_steps": 400, "batch_size": 32, "warmup_steps": 30},
                       **_LABEL_RECIPE},
                      "VADER movie-review sentences, '+' or '-' after a tab (accuracy)"),
    # single words (at most 19 letters): rows of 24, batch 64; 300 steps ~3.3 epochs of 5,767
    "lexicon": Task("lexicon", "classification", load_lexicon,
                    {"train": {"max_steps": 300, "batch_size": 64, "block_size": 24,
                               "warmup_steps": 30}, **_LABEL_RECIPE},
                    "VADER lexicon words, '+' or '-' after a tab (accuracy)"),
}
LM_TASKS = tuple(n for n, t in TASKS.items() if t.kind == "lm")


def get_task(name: str) -> Task:
    """The task called ``name``, or one clear error listing the tasks."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def task_splits(task: str) -> tuple[str, str]:
    """(train text, test text) of a language-modelling task."""
    t = get_task(task)
    if t.kind != "lm":
        raise UsageError(f"{task!r} is not a language-modelling task; allowed: "
                         f"{', '.join(LM_TASKS)}")
    d = t.load()
    return d["train"], d["test"]


def classification_splits(task: str) -> dict:
    """``{"train": [(text, label)...], "test": [...]}`` of a classification task."""
    t = get_task(task)
    if t.kind != "classification":
        raise UsageError(f"{task!r} is not a classification task; allowed: "
                         f"{', '.join(n for n in TASKS if n not in LM_TASKS)}")
    return t.load()


def task_recipe(task: str) -> dict:
    """The task's harness defaults (``{}`` for a task that uses the harness's own)."""
    return get_task(task).recipe


def task_batch_fn(task: str, tokenizer, batch_size: int, block_size: int):
    """``f(rng) -> (x, y)`` drawing one training batch of ``task`` (the harness's training data)."""
    if task in LM_TASKS:
        ids = encode_corpus(task_splits(task)[0], tokenizer)
        return lambda rng: get_batch(ids, batch_size, block_size, rng)
    X, Y = encode_classification(classification_splits(task)["train"], tokenizer, block_size)
    return lambda rng: sample_rows(X, Y, batch_size, rng)


def classification_accuracy(model, X, Y, batch_size: int = 128) -> float:
    """Exact-match accuracy of the label character after the tab (last position of each row).

    The prediction is the label (among those present in ``Y``) with the largest logit, so the
    model is compared only between the allowed answers ("+" vs "-").
    """
    labels = Y[:, -1]
    candidates = np.unique(labels)
    correct = 0
    for i in range(0, len(X), batch_size):
        logits, _ = model.forward(backend.asarray(X[i:i + batch_size]), check=False)
        last = backend.to_numpy(logits[:, -1, :])[:, candidates]  # (b, n_labels)
        correct += int((candidates[last.argmax(axis=1)] == labels[i:i + batch_size]).sum())
    return correct / len(X)


def label_lm_forward_backward(model, x, y, lm_weight: float) -> float:
    """One training pass of a classification row with a language-modelling term; returns the
    label loss (float) and leaves the gradients in the model's ``grads``.

    ``y`` (B, T) holds the label at the last position and, from
    ``encode_classification(..., lm_targets=True)``, next-character targets on the text (-1
    elsewhere). The loss is

        L = CE(logits[:, -1], y[:, -1]) + lm_weight * CE(logits[:, :-1], y[:, :-1])

    each cross-entropy a mean over its own (non-ignored) positions, so the label keeps weight 1
    however long the text is (in one plain mean over all positions it would get ~1/100).
    Backward: ``dlogits = [lm_weight * dCE_text, dCE_label]`` along T. ``model`` is anything
    with the GPT's ``forward`` / ``backward`` / ``zero_grad`` contract.
    """
    logits, cache = model.forward(x, check=False)
    label_loss, d_label = ops.cross_entropy(logits[:, -1:], y[:, -1:])
    if lm_weight and bool((y[:, :-1] != ops.IGNORE_INDEX).any()):
        _, d_text = ops.cross_entropy(logits[:, :-1], y[:, :-1])
        d_text *= lm_weight
        dlogits = xp.concatenate([d_text, d_label], axis=1)
    else:
        dlogits = xp.concatenate([xp.zeros_like(logits[:, :-1]), d_label], axis=1)
    del logits
    model.zero_grad()
    model.backward(dlogits, cache)
    return backend.to_scalar(label_loss)
