"""Fine-tuning the shipped base model in one harness: full fine-tuning or LoRA, like for like.

Both methods use the same data, steps, batch, schedule and seed; only which parameters train
(and, by convention, the learning rate) differ. Each run reports

* the task metric: held-out loss in nats/char on the task's test split (``task_loss``),
* **forgetting**: the change in Shakespeare validation loss (held-out plays) from the base,
* trainable parameters, median step time, and the optimizer-state bytes.

Tasks so far: ``milton`` (continued language modelling on *Paradise Lost*: Books I-IX train,
Book X test) and ``python`` (the shipped stdlib snapshot, whole modules held out).

Chapter: chapters/02-lora-notes.ipynb
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

TASKS = ("milton", "python")
METHODS = ("full", "lora")


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


def finetune(method: str = "lora", task: str = "milton", lora_config=None, train_config=None,
             base_path=None, out_dir=None, progress: bool = True, eval_batches: int = 16) -> dict:
    """Fine-tune the base model with ``method`` on ``task``; returns a result record.

    Args:
        method: "full" (every parameter trains) or "lora" (only the factors of ``lora_config``).
        task: one of :data:`TASKS`.
        lora_config: a :class:`LoraConfig` (method "lora"; default r=8, alpha=16 on q, v).
        train_config: a :class:`TrainConfig` (default: 200 steps, batch 8 x 128, lr 1e-3 for
            full and 5e-3 for LoRA).
        base_path: the base checkpoint (default: the shipped one).
        out_dir: if given, ``result.json`` and the trained weights (``adapter.safetensors`` for
            LoRA, ``model.safetensors`` for full) are written there (atomically).
    """
    from minilora.checkpoint import atomic_write_text, base_model_path, load_checkpoint, save_checkpoint
    from minilora.config import LoraConfig, TrainConfig
    from minilora.data import encode_corpus, load_shakespeare
    from minilora.lora import inject_lora, save_adapter
    from minilora.train import evaluate, fixed_batches, train

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed here: {', '.join(METHODS)}")
    train_text, test_text = task_splits(task)
    if train_config is None:
        train_config = TrainConfig(max_steps=200, batch_size=8, block_size=128,
                                   lr=5e-3 if method == "lora" else 1e-3,
                                   min_lr=5e-4 if method == "lora" else 1e-4, warmup_steps=20,
                                   eval_every=100, eval_batches=eval_batches, ckpt_every=10**9)
    path = base_path or base_model_path()
    model, tok, _ = load_checkpoint(path)
    report = {"trainable": model.num_parameters(), "total": model.num_parameters()}
    if method == "lora":
        lora_config = lora_config or LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"))
        report = inject_lora(model, lora_config)
    tr = encode_corpus(train_text, tok)
    te = encode_corpus(test_text, tok)
    sh = encode_corpus(load_shakespeare()["val"], tok)
    T, B = train_config.block_size, train_config.batch_size
    task_batches = fixed_batches(te, eval_batches, B, T, seed=12345)
    sh_batches = fixed_batches(sh, eval_batches, B, T, seed=12345)
    task0, sh0 = evaluate(model, task_batches), evaluate(model, sh_batches)
    hist = train(model, tok, tr, None, train_config, out_dir=None, progress=progress)  # evaluated below
    task1, sh1 = evaluate(model, task_batches), evaluate(model, sh_batches)
    step_ms = 1000 * statistics.median(B * T / r["tok_per_s"] for r in hist.train[5:] or hist.train)
    trainable = model.num_parameters(trainable_only=True)
    result = {
        "method": method, "task": task,
        "lora_config": lora_config.to_dict() if method == "lora" else None,
        "train_config": train_config.to_dict(),
        "base": str(path),
        "task_loss_base": task0, "task_loss": task1,
        "shakespeare_loss_base": sh0, "shakespeare_loss": sh1, "forgetting": sh1 - sh0,
        "trainable_params": trainable, "total_params": report["total"],
        "optimizer_state_bytes": 2 * 4 * trainable,
        "median_step_ms": step_ms, "train_seconds": hist.seconds,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if method == "lora":
            save_adapter(out / "adapter.safetensors", model, lora_config)
        else:
            save_checkpoint(out / "model.safetensors", model, tok, extra={"finetune": task})
        atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def format_result(r: dict) -> str:
    """A short human-readable summary of a :func:`finetune` record."""
    return (f"{r['method']} on {r['task']}: task loss {r['task_loss_base']:.3f} -> "
            f"{r['task_loss']:.3f} nats/char; Shakespeare {r['shakespeare_loss_base']:.3f} -> "
            f"{r['shakespeare_loss']:.3f} (forgetting {r['forgetting']:+.3f}); "
            f"{r['trainable_params']:,} of {r['total_params']:,} parameters trained; "
            f"median step {r['median_step_ms']:.0f} ms")
