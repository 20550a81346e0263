"""Fine-tuning the shipped base model in one harness: every method, every task, like for like.

All methods use the same data, steps, batch, schedule and seed; only which parameters train (and
the method's learning rate) differ. Each run reports

* the task metric: held-out loss in nats/char (language-modelling tasks) or exact-match accuracy
  (labelled tasks), with the frozen base's value and, for labelled tasks, chance and majority;
* **forgetting**: the change in Shakespeare validation loss (held-out plays) from the base,
  always on the same fixed 8 x 128 windows whatever the task's batch shape;
* trainable parameters, median step time, optimizer-state bytes and the measured memory account.

Tasks and their recipes: :mod:`minilora.experiments.tasks`; methods:
:mod:`minilora.experiments.methods`.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from minilora.backend import cpu_rng
from minilora.checkpoint import load_checkpoint
from minilora.config import TrainConfig
from minilora.data import (
    encode_classification,
    encode_corpus,
    get_batch,
    load_shakespeare,
    sample_rows,
)
from minilora.errors import UsageError
from minilora.experiments.methods import Extras, MethodSetup, setup_method
from minilora.experiments.paths import base_model_path
from minilora.experiments.tasks import (
    LM_TASKS,
    classification_accuracy,
    classification_splits,
    label_lm_forward_backward,
    task_recipe,
    task_splits,
)
from minilora.io import atomic_write_text, ensure_writable_dir
from minilora.memory import check_fits, check_training_fits, memory_account
from minilora.methods.registry import get_method
from minilora.model import set_recompute
from minilora.quant.linear import quantized_parameter_count
from minilora.train import CKPT_NAME, evaluate, fixed_batches, read_resumable, train

# forgetting is measured on the same Shakespeare windows whatever the task's batch shape
FORGETTING_BATCH, FORGETTING_BLOCK = 8, 128


def default_lora_config(task: str = "milton", **fields):
    """Method "lora"'s default (r=8, alpha=16) on the task's targets (``q, v`` unless its recipe
    names others); ``fields`` replace any :class:`LoraConfig` field."""
    fields.setdefault("target_modules", task_recipe(task).get("lora_targets", ("q", "v")))
    return dataclasses.replace(get_method("lora").default_config(), **fields)


def default_train_config(setup: MethodSetup, eval_batches: int = 16, **overrides):
    """The harness's :class:`TrainConfig`: 200 steps of 8 x 128, warmup 20 (at most a tenth of the
    steps), cosine decay, the method's learning rates (``min_lr`` = lr/10 when ``lr`` is given);
    ``overrides`` replace any field."""
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
             lm_weight: float | None = None, resume: bool = False,
             save_every: int | None = None, allow_nonfinite: bool = False,
             recompute: bool = False, recompute_chunk: int | None = None) -> dict:
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
            LoRA, ``model.safetensors`` for full, ...) are written there (atomically), and the
            run keeps a resumable training checkpoint there (``ckpt.safetensors``: the model
            with the method's weights, AdamW moments, step and sampler RNG state, as
            :func:`minilora.train.train` writes them; ``metrics.jsonl``: the losses).
        resume: continue the run in ``out_dir`` from its checkpoint (same arguments; on NumPy
            the result equals the uninterrupted run's, loss for loss). The evaluations of the
            base are recomputed; ``train_seconds`` counts only the resumed part.
        save_every: with ``out_dir``: steps between checkpoints (default: a tenth of the run).
        allow_nonfinite: load a base holding NaN/inf anyway (debugging only).
        recompute: activation recomputation (:func:`minilora.model.set_recompute`): the same
            gradients with one block's activations in memory instead of all, for about a third
            more compute per step. ``recompute_chunk``: sequences per recomputed piece (None:
            the whole batch; 1: the least memory).
        eval_batches: fixed windows for the language-modelling losses.
        eval_examples: score only the first n test examples of a classification task (quick).
        measure_memory: add ``memory`` (bytes of weights, gradients, optimizer state and
            activations, and the measured peak of one step: :func:`minilora.memory.memory_account`).
        lm_weight: classification tasks: weight of the language-modelling term on the text
            beside the label loss (:func:`label_lm_forward_backward`; 0: the label only); None:
            the task recipe's (1.0 for sentiment).
    """
    get_method(method)  # an unknown (or renamed) method: one line, before any work
    recipe = task_recipe(task)
    if lm_weight is not None and task in LM_TASKS:
        raise UsageError(f"lm_weight is for classification tasks; {task!r} is language modelling")
    if lm_weight is None:
        lm_weight = recipe.get("lm_weight", 0.0)
    if not lm_weight >= 0:
        raise UsageError(f"lm_weight must be >= 0, got {lm_weight}")
    if eval_examples is not None and (isinstance(eval_examples, bool) or eval_examples < 1):
        raise UsageError(f"eval_examples must be >= 1 (or None: all), got {eval_examples!r}")
    if not isinstance(eval_batches, int) or isinstance(eval_batches, bool) or eval_batches < 1:
        raise UsageError(f"eval_batches must be an integer >= 1, got {eval_batches!r}")
    if save_every is not None and (isinstance(save_every, bool) or not isinstance(save_every, int)
                                   or save_every < 1):
        raise UsageError(f"save_every must be an integer >= 1 (or None), got {save_every!r}")
    if resume and out_dir is None:
        raise UsageError("resume=True needs out_dir (the run directory to continue)")
    if resume and not (Path(out_dir) / CKPT_NAME).is_file():
        raise UsageError(f"cannot resume: {str(Path(out_dir) / CKPT_NAME)!r} does not exist "
                         "(no checkpoint of an earlier run in out_dir)")
    if method == "lora" and "lora_targets" in recipe:  # the task's targets for plain LoRA
        if method_config is None:
            method_config = default_lora_config(task)
        elif isinstance(method_config, Extras) and method_config.config is None:
            method_config = method_config._replace(config=default_lora_config(task))
    steps = (train_config.max_steps if isinstance(train_config, TrainConfig) else
             {**recipe.get("train", {}), **(train_config or {})}.get("max_steps", 200))
    path = base_path or base_model_path()
    model, tok, _ = load_checkpoint(path, allow_nonfinite=allow_nonfinite)
    setup = setup_method(method, model, tok, method_config, steps=steps)
    model = setup.model
    set_recompute(model, recompute, recompute_chunk)
    # the base's plus any the method added (as PEFT counts); 4-bit weights are not float params
    total = model.num_parameters() + quantized_parameter_count(model)
    if not isinstance(train_config, TrainConfig):
        lr = recipe.get("lr", {})
        train_config = default_train_config(
            setup, eval_batches, **{**recipe.get("train", {}),
                                    **({"lr": lr[method]} if method in lr else {}),
                                    **(train_config or {})})
    T, B = train_config.block_size, train_config.batch_size
    if T > model.config.block_size:  # before any evaluation: windows longer than the context
        raise UsageError(f"block_size {T} (--block-size) exceeds the base model's context of "
                         f"{model.config.block_size} characters ({path}); give "
                         f"{model.config.block_size} or less")
    # a step (and the evaluations, as large) must fit in memory: refused now, not by the OS
    check_training_fits(model, B, T, "--batch-size")
    check_fits(f"eval_batches {eval_batches:,} (--eval-batches) of {B} x {T} windows",
               16.0 * eval_batches * B * T, 16.0 * B * T, " windows")
    run_config = train_config  # the same run, plus where and how often to save it
    if out_dir is not None:
        run_config = dataclasses.replace(
            train_config, ckpt_every=save_every or max(1, train_config.max_steps // 10))
    if resume:  # a checkpoint of another run is refused now, not after the evaluations
        read_resumable(out_dir, run_config)
    if out_dir is not None:  # fail now, not after the whole run (and not before the checks)
        ensure_writable_dir(out_dir)
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
    hist = train(model, tok, tr, None, run_config, out_dir=out_dir, resume=resume,
                 progress=progress, batch_fn=batch_fn, forward_backward=forward_backward,
                 callbacks=setup.callbacks, groups=setup.groups)  # evaluated below
    task1, sh1 = score(model), evaluate(model, sh_batches)
    memory = None
    if measure_memory:  # one more (lr = 0) step on a training batch, weights left as they are
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
        **({"recompute": True, "recompute_chunk": recompute_chunk} if recompute else {}),
    }
    if out_dir is not None:
        out = Path(out_dir)
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
