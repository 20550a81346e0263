"""Fine-tuning the shipped base model in one harness: full fine-tuning or LoRA, like for like.

Both methods use the same data, steps, batch, schedule and seed; only which parameters train
(and, by convention, the learning rate) differ. Each run reports

* the task metric: held-out loss in nats/char on the task's test split (``task_loss``),
* **forgetting**: the change in Shakespeare validation loss (held-out plays) from the base,
* trainable parameters, median step time, and the optimizer-state bytes.

Tasks so far: ``milton`` (continued language modelling on *Paradise Lost*: Books I-IX train,
Book X test), ``python`` (the shipped stdlib snapshot, whole modules held out),
``sentiment`` (VADER movie-review sentences: the character after ``sentence<TAB>`` is ``+`` or
``-``; metric: exact-match accuracy on the held-out 20 %, chance 50 %, majority 50.4 %) and
``lexicon`` (single VADER words, same format; majority 55.8 %).

The sentiment recipe (:data:`TASK_RECIPES`, the default for these tasks) and why:

* The base never saw ``+`` or a tab in Shakespeare: after ``sentence<TAB>`` it gives
  P(+) ~ 4e-8 and P(-) ~ 2e-3, so the frozen base always answers ``-`` (= the majority, 50.4 %),
  and LoRA on q, v alone spends its first ~150 steps only learning to emit ``+`` at all (label
  loss still ~1.5 nats). Putting ``lm_head`` among the LoRA targets (full fine-tuning trains it
  anyway) learns the answer format in ~70 steps.
* One label per row is little signal: the old 150-200 steps of batch 8 saw 15-20 % of the 8,058
  training sentences once. The recipe: batch 32, 400 steps (~1.6 epochs).
* Label loss alone also drives every position towards ``+``/``-`` (forgetting +1.7 to +6.8
  nats in our runs).
  The LM loss on the sentence beside it (:func:`label_lm_forward_backward`, ``lm_weight`` 1)
  keeps forgetting near +0.5.
* Reference points on the same split: frozen-feature logistic probes (last position ~57 %,
  mean over positions ~63 %); bag-of-words logistic regression 78-80 %.

Measured with these defaults (``results/finetune/{sentiment,lexicon}-{lora,full}``, all 2,014 /
1,442 test rows, 2 shared CPU cores): sentiment LoRA 62.6 %, full 64.9 % (forgetting +0.52 /
+0.62, ~5-6 min of training); lexicon LoRA 81.8 %, full 87.8 % (forgetting +1.39 / +2.25: the
LM term covers single words only; 1-2 min).

Chapter: chapters/02-lora-notes.ipynb
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable, NamedTuple

TASKS = ("milton", "python", "sentiment", "lexicon")
LM_TASKS = ("milton", "python")


class MethodSetup(NamedTuple):
    """What a fine-tuning method does to the freshly loaded base model.

    Attributes:
        model: the model to train (usually the base itself, modified in place; a method may wrap
            it, e.g. prompt tuning). It must offer ``forward(idx, check=...)``,
            ``forward_backward(x, y)``, ``named_trainable()`` and ``num_parameters()``.
        config: the method's options as a JSON-able dict (or None), recorded in ``result.json``.
        save: ``f(out_dir: Path)`` writing the trained weights (atomically) into ``out_dir``;
            returns the file name written.
        lr, min_lr: the method's default peak and final learning rates.
        base_model: the untouched base, for methods that leave it intact but change the outputs
            at step 0 (prefix / prompt tuning wrap it): the ``*_base`` figures are measured on
            it and the method's step-0 figures are reported as ``*_init``. None: ``model`` at
            step 0 is the base (LoRA's B = 0, zero-up adapters, BitFit).
    """
    model: object
    config: dict | None
    save: Callable
    lr: float
    min_lr: float
    base_model: object = None


def _setup_full(model, tok, config) -> MethodSetup:
    from minilora.checkpoint import save_checkpoint

    if config is not None:
        raise ValueError("method 'full' takes no method config (every parameter trains)")

    def save(out: Path) -> str:
        save_checkpoint(out / "model.safetensors", model, tok, extra={"finetune": True})
        return "model.safetensors"
    return MethodSetup(model, None, save, 1e-3, 1e-4)


def _setup_lora(model, tok, config) -> MethodSetup:
    from minilora.config import LoraConfig
    from minilora.lora import inject_lora, save_adapter

    config = config or LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
    if not isinstance(config, LoraConfig):
        raise TypeError(f"method 'lora' needs a LoraConfig, got {type(config).__name__}")
    inject_lora(model, config)

    def save(out: Path) -> str:
        save_adapter(out / "adapter.safetensors", model, config)
        return "adapter.safetensors"
    return MethodSetup(model, config.to_dict(), save, 5e-3, 5e-4)


# name -> "module:function" with the signature of _setup_lora: f(model, tokenizer, config or None)
# -> MethodSetup. Imported lazily, so a method's module loads only when it is used.
METHODS = {
    "full": "minilora.finetune:_setup_full",
    "lora": "minilora.finetune:_setup_lora",
    "qlora": "minilora.qlora:setup_qlora",  # LoRA around a 4-bit (NF4) base; --init loftq
    # the other PEFT methods of the taxonomy (minilora/peft_methods.py)
    "adapter": "minilora.peft_methods:setup_adapter",
    "prefix": "minilora.peft_methods:setup_prefix",
    "prompt": "minilora.peft_methods:setup_prompt",
    "bitfit": "minilora.peft_methods:setup_bitfit",
}


def method_setup(method: str) -> Callable:
    """The setup function registered for ``method`` (one clear error for an unknown name)."""
    import importlib

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    module, func = METHODS[method].split(":")
    return getattr(importlib.import_module(module), func)


def task_splits(task: str) -> tuple[str, str]:
    """(train text, test text) of a language-modelling task."""
    from minilora.data import load_milton, load_python_code

    if task == "milton":
        d = load_milton()
        return d["train"], d["test"]
    if task == "python":
        d = load_python_code()
        return d["train"], d["test"]
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")


def classification_splits(task: str) -> dict:
    """``{"train": [(text, label)...], "test": [...]}`` of a classification task: ``sentiment``
    (:func:`minilora.data.load_sentiment`) or ``lexicon`` (:func:`minilora.data.load_lexicon`)."""
    from minilora.data import load_lexicon, load_sentiment

    if task == "sentiment":
        return load_sentiment()
    if task == "lexicon":
        return load_lexicon()
    raise ValueError(f"{task!r} is not a classification task; allowed: sentiment, lexicon")


def classification_accuracy(model, X, Y, batch_size: int = 128) -> float:
    """Exact-match accuracy of the label character after the tab (last position of each row).

    The prediction is the label (among those present in ``Y``) with the largest logit, so the
    model is compared only between the allowed answers ("+" vs "-").
    """
    from minilora import backend

    np_ = backend.cpu_module()
    labels = Y[:, -1]
    candidates = np_.unique(labels)
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
    from minilora import backend
    from minilora.backend import xp
    from minilora.nn import ops

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


# The sentiment recipe (see the module docstring): batch 32 (one label per row needs many rows),
# 400 steps (~1.6 epochs of the 8,058 training sentences), the label loss plus the sentence's
# language-modelling loss (lm_weight 1: keeps forgetting small), and for LoRA every linear
# layer and the LM head (the base never saw "+": its head row must move).
TASK_RECIPES = {
    "sentiment": {
        "train": {"max_steps": 400, "batch_size": 32, "warmup_steps": 30},
        "lr": {"lora": 3e-3},
        "lora_targets": ("q", "k", "v", "o", "up", "down", "lm_head"),
        "lm_weight": 1.0,
    },
    # single words (at most 19 letters): rows of 24, batch 64; 300 steps ~3.3 epochs of 5,767
    "lexicon": {
        "train": {"max_steps": 300, "batch_size": 64, "block_size": 24, "warmup_steps": 30},
        "lr": {"lora": 3e-3},
        "lora_targets": ("q", "k", "v", "o", "up", "down", "lm_head"),
        "lm_weight": 1.0,
    },
}

# forgetting is measured on the same Shakespeare windows whatever the task's batch shape
FORGETTING_BATCH, FORGETTING_BLOCK = 8, 128


def task_recipe(task: str) -> dict:
    """The task's defaults (train-config overrides, per-method learning rates, LoRA targets,
    ``lm_weight``); ``{}`` for a task that uses the harness defaults."""
    return TASK_RECIPES.get(task, {})


def default_lora_config(task: str = "milton", **fields):
    """LoRA r=8, alpha=16 on the task's targets (``q, v`` unless its recipe names others);
    ``fields`` replace any :class:`LoraConfig` field."""
    from minilora.config import LoraConfig

    fields.setdefault("target_modules", task_recipe(task).get("lora_targets", ("q", "v")))
    return LoraConfig(**{"r": 8, "lora_alpha": 16, **fields})


def default_train_config(setup: MethodSetup, eval_batches: int = 16, **overrides):
    """The harness's :class:`TrainConfig`: 200 steps of 8 x 128, warmup 20 (at most a tenth of the
    steps), cosine decay, the method's learning rates (``min_lr`` = lr/10 when ``lr`` is given);
    ``overrides`` replace any field."""
    from minilora.config import TrainConfig

    steps = overrides.get("max_steps", 200)
    fields = dict(max_steps=steps, batch_size=8, block_size=128, lr=setup.lr, min_lr=setup.min_lr,
                  warmup_steps=min(20, steps // 10), eval_every=max(1, steps // 2),
                  eval_batches=eval_batches, ckpt_every=10**9)
    if "lr" in overrides and "min_lr" not in overrides:
        fields["min_lr"] = overrides["lr"] / 10
    fields.update(overrides)
    return TrainConfig(**fields)


def finetune(method: str = "lora", task: str = "milton", method_config=None, train_config=None,
             base_path=None, out_dir=None, progress: bool = True, eval_batches: int = 16,
             eval_examples: int | None = None, measure_memory: bool = True,
             lm_weight: float | None = None) -> dict:
    """Fine-tune the base model with ``method`` on ``task``; returns a result record.

    Args:
        method: a name in :data:`METHODS`: "full" (every parameter trains), "lora" (only the
            factors of ``method_config``), ...
        task: one of :data:`TASKS`.
        method_config: the method's options, e.g. a :class:`LoraConfig` for "lora" (default
            r=8, alpha=16 on q, v; on the task recipe's targets where it names them, see
            :data:`TASK_RECIPES`); None for the method's defaults.
        train_config: a :class:`TrainConfig`, or a dict of fields overriding the default (200
            steps, batch 8 x 128, warmup 20, cosine to lr/10, at the method's default learning
            rate, e.g. 1e-3 for full and 5e-3 for LoRA, then the task recipe's overrides), or
            None for the default.
        base_path: the base checkpoint (default: the shipped one).
        out_dir: if given, ``result.json`` and the trained weights (``adapter.safetensors`` for
            LoRA, ``model.safetensors`` for full, ...) are written there (atomically).
        eval_batches: fixed windows for the language-modelling losses.
        eval_examples: score only the first n test examples of a classification task (quick).
        measure_memory: add ``memory`` (bytes of weights, gradients, optimizer state and
            activations, and the measured peak of one step: :func:`minilora.memory.memory_account`).
        lm_weight: classification tasks: weight of the language-modelling term on the text
            beside the label loss (:func:`label_lm_forward_backward`; 0: the label only); None:
            the task recipe's (1.0 for sentiment).
    """
    from minilora.checkpoint import atomic_write_text, base_model_path, load_checkpoint
    from minilora.config import TrainConfig
    from minilora.data import encode_classification, encode_corpus, load_shakespeare, sample_rows
    from minilora.quant.linear import quantized_parameter_count
    from minilora.train import evaluate, fixed_batches, train

    setup_fn = method_setup(method)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    recipe = task_recipe(task)
    if lm_weight is not None and task in LM_TASKS:
        raise ValueError(f"lm_weight is for classification tasks; {task!r} is language modelling")
    if lm_weight is None:
        lm_weight = recipe.get("lm_weight", 0.0)
    if not lm_weight >= 0:
        raise ValueError(f"lm_weight must be >= 0, got {lm_weight}")
    if method == "lora" and method_config is None and "lora_targets" in recipe:
        method_config = default_lora_config(task)
    path = base_path or base_model_path()
    model, tok, _ = load_checkpoint(path)
    setup = setup_fn(model, tok, method_config)
    model = setup.model
    # the base's plus any the method added (as PEFT counts); 4-bit weights are not float params
    total = model.num_parameters() + quantized_parameter_count(model)
    if not isinstance(train_config, TrainConfig):
        lr = recipe.get("lr", {})
        train_config = default_train_config(
            setup, eval_batches, **{**recipe.get("train", {}),
                                    **({"lr": lr[method]} if method in lr else {}),
                                    **(train_config or {})})
    T, B = train_config.block_size, train_config.batch_size
    sh = encode_corpus(load_shakespeare()["val"], tok)
    sh_batches = fixed_batches(sh, eval_batches, FORGETTING_BATCH,
                               min(FORGETTING_BLOCK, model.config.block_size), seed=12345)
    if task in LM_TASKS:
        train_text, test_text = task_splits(task)
        tr, te = encode_corpus(train_text, tok), encode_corpus(test_text, tok)
        task_batches = fixed_batches(te, eval_batches, B, T, seed=12345)

        def score(m):
            return evaluate(m, task_batches)
        batch_fn, forward_backward, metric = None, None, "test loss (nats/char)"
    else:
        d = classification_splits(task)
        tr = None
        Xtr, Ytr = encode_classification(d["train"], tok, T, lm_targets=lm_weight > 0)
        Xte, Yte = encode_classification(d["test"][:eval_examples], tok, T)

        def score(m):
            return classification_accuracy(m, Xte, Yte)
        majority = max(float((Yte[:, -1] == c).mean()) for c in set(Yte[:, -1].tolist()))

        def batch_fn(rng):
            return sample_rows(Xtr, Ytr, B, rng)

        def forward_backward(x, y):
            return label_lm_forward_backward(model, x, y, lm_weight)
        metric = "test accuracy"
    base_model = model if setup.base_model is None else setup.base_model
    task0, sh0 = score(base_model), evaluate(base_model, sh_batches)
    init = {} if base_model is model else {"task_metric_init": score(model),
                                           "shakespeare_loss_init": evaluate(model, sh_batches)}
    hist = train(model, tok, tr, None, train_config, out_dir=None, progress=progress,
                 batch_fn=batch_fn, forward_backward=forward_backward)  # evaluated below
    task1, sh1 = score(model), evaluate(model, sh_batches)
    memory = None
    if measure_memory:  # one more (lr = 0) step on a training batch, weights left as they are
        from minilora.backend import cpu_rng
        from minilora.data import get_batch
        from minilora.memory import memory_account

        mx, my = batch_fn(cpu_rng(0)) if batch_fn is not None else get_batch(tr, B, T, cpu_rng(0))
        memory = memory_account(model, mx, my)
    step_ms = 1000 * statistics.median(B * T / r["tok_per_s"] for r in hist.train[5:] or hist.train)
    trainable = model.num_parameters(trainable_only=True)
    result = {
        "method": method, "task": task,
        "method_config": setup.config,
        "train_config": train_config.to_dict(),
        "base": "shipped" if base_path is None else str(path),
        "metric": metric, "task_metric_base": task0, "task_metric": task1,
        **({"task_loss_base": task0, "task_loss": task1} if task in LM_TASKS
           else {"accuracy_base": task0, "accuracy": task1, "test_examples": len(Xte),
                 "chance_baseline": 1 / len(set(Yte[:, -1].tolist())),
                 "majority_baseline": majority, "lm_weight": lm_weight}),
        "shakespeare_loss_base": sh0, "shakespeare_loss": sh1, "forgetting": sh1 - sh0, **init,
        "trainable_params": trainable, "total_params": total,
        "optimizer_state_bytes": 2 * 4 * trainable,
        "memory": memory,
        "median_step_ms": step_ms, "train_seconds": hist.seconds,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["weights_file"] = setup.save(out)
        atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def format_result(r: dict) -> str:
    """A short human-readable summary of a :func:`finetune` record."""
    return (f"{r['method']} on {r['task']}: {r['metric']} {r['task_metric_base']:.3f} -> "
            f"{r['task_metric']:.3f}; Shakespeare {r['shakespeare_loss_base']:.3f} -> "
            f"{r['shakespeare_loss']:.3f} (forgetting {r['forgetting']:+.3f}); "
            f"{r['trainable_params']:,} of {r['total_params']:,} parameters trained; "
            f"median step {r['median_step_ms']:.0f} ms")
