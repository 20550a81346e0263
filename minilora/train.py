"""The training loop: batches, AdamW with warmup + cosine, clipping, validation, checkpoints.

::

    history = train(model, tokenizer, train_ids, val_ids, TrainConfig(...), out_dir="runs/x")

Each step: sample a batch of random windows (from a seeded CPU Generator), forward, fused
cross-entropy, backward, clip, AdamW. Every ``eval_every`` steps the loss on a *fixed* set of
validation windows is measured (fixed, so curves are comparable and resuming does not change
them). Metrics go to ``metrics.jsonl`` (one JSON object per line) and to a tqdm progress bar.
Checkpoints (``ckpt.safetensors``) are written atomically every ``ckpt_every`` steps and at the
end; ``resume=True`` continues from one and, on NumPy, reproduces the uninterrupted run's loss
curve bit for bit (the sampler's RNG state and the AdamW moments are saved with the weights).

If the loss or the gradient becomes NaN/inf, training stops with :class:`NonFiniteError`, whose
message says what is to blame (the starting weights, a parameter that went bad, a batch with
nothing to score, or the step itself: learning rate too high) and where the last good checkpoint
is (nothing is saved after a bad step). The dropout masks' Generators of LoRA layers
(``dropout_rng``) are saved and restored too, so resuming stays exact with ``lora_dropout > 0``.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from minilora import backend, threads
from minilora.checkpoint import FORMAT as CKPT_FORMAT
from minilora.checkpoint import save_checkpoint
from minilora.config import TrainConfig
from minilora.data import get_batch
from minilora.errors import MiniloraError, UsageError
from minilora.memory import check_training_fits
from minilora.io import (
    CheckpointError,
    atomic_write_text,
    first_nonfinite,
    read_typed,
    strip_prefix,
)
from minilora.nn import ops
from minilora.optim import AdamW, NonFiniteError, lr_at

CKPT_NAME = "ckpt.safetensors"
METRICS_NAME = "metrics.jsonl"
#: divergence: the mean loss of the last WINDOW steps above max(FACTOR x, MARGIN + ) the first
#: step's loss stops the run (a loss that only wobbles, or a slow start, never comes near it)
DIVERGENCE_WINDOW, DIVERGENCE_FACTOR, DIVERGENCE_MARGIN = 10, 1.5, 1.0


class DivergenceError(MiniloraError, ArithmeticError):
    """The training loss ran far above where it started (see :data:`DIVERGENCE_FACTOR`): the
    message says by how much, the likely cause, and where the last good checkpoint is."""


def diverged(losses: list, start: float) -> float | None:
    """The recent mean loss if it is far above ``start`` (the run diverged), else None."""
    if len(losses) < 3 or not math.isfinite(start):
        return None
    recent = losses[-DIVERGENCE_WINDOW:]
    mean = sum(recent) / len(recent)
    limit = max(DIVERGENCE_FACTOR * start, start + DIVERGENCE_MARGIN)
    return mean if mean > limit else None


@dataclass
class History:
    """What a run produced: per-step training records and the validation records."""

    train: list = field(default_factory=list)  # {"step", "loss", "lr", "grad_norm", "tok_per_s"}
    val: list = field(default_factory=list)  # {"step", "val_loss"}
    seconds: float = 0.0

    @property
    def final_val_loss(self):
        return self.val[-1]["val_loss"] if self.val else None


def fixed_batches(ids, n_batches, batch_size, block_size, seed):
    """``n_batches`` (x, y) windows drawn once from their own seeded Generator."""
    rng = backend.cpu_rng(seed)
    return [get_batch(ids, batch_size, block_size, rng) for _ in range(n_batches)]


def evaluate(model, batches) -> float:
    """Mean cross-entropy (nats per token) over the given (x, y) batches; no gradients."""
    total = 0.0
    for x, y in batches:
        logits, _ = model.forward(backend.asarray(x), check=False)
        loss, _ = ops.cross_entropy_forward(logits, backend.asarray(y))
        total += backend.to_scalar(loss)
    return total / len(batches)


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    """Metrics records with step <= upto_step (the tail after a crash is dropped)."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            if i == len(lines) - 1:
                break             # a line cut short by a crash mid-write: the tail is dropped
            raise CheckpointError(f"{path} line {i + 1} is not a metrics record (JSON with an "
                                  "integer 'step'); the run's metrics file is damaged: move it "
                                  "away to resume without the earlier curve")
        if rec["step"] <= upto_step:
            out.append(rec)
    return out


def _module_rngs(model) -> dict:
    """``{module name: Generator}`` for every module that draws at training time (a LoRA
    layer's ``dropout_rng``); their states go into the checkpoint with the sampler's."""
    return {name: m.dropout_rng for name, m in model.named_modules()
            if getattr(m, "dropout_rng", None) is not None}


def nonfinite_cause(model, y, step: int, start: int, lr: float) -> str:
    """Why the loss (or gradient) of ``step`` is NaN/inf, in words: the weights the run started
    from, a parameter that went bad in training, a batch whose targets are all ignored, or (none
    of these) the step diverged at learning rate ``lr``."""
    bad = first_nonfinite(dict(model.named_parameters()))
    if bad is not None and step == start:
        return (f"the starting weights hold NaN/inf (parameter {bad!r}): the base model or "
                "checkpoint is damaged, not the training")
    if bad is not None:
        return f"parameter {bad!r} became NaN/inf during training"
    if int((backend.to_numpy(y) != ops.IGNORE_INDEX).sum()) == 0:
        return f"the batch of step {step} has no target to score (every target is ignored)"
    return (f"the step diverged at learning rate {lr:.3g} (the weights and the batch are finite); "
            "try a lower learning rate or stronger gradient clipping")


def read_resumable(out_dir, cfg: TrainConfig) -> tuple[dict, dict]:
    """``(arrays, meta)`` of ``out_dir/ckpt.safetensors`` after checking that a run with ``cfg``
    can continue from it (same training config, optimizer and RNG state saved); callers check
    this before spending time on anything else (the fine-tuning harness: before its baseline
    evaluations)."""
    path = Path(out_dir) / CKPT_NAME
    arrays, meta = read_typed(path, CKPT_FORMAT, "checkpoint")
    saved_cfg = meta.get("train_config")
    if saved_cfg is not None and TrainConfig.from_dict(saved_cfg) != cfg:
        diff = {k: (saved_cfg[k], v) for k, v in cfg.to_dict().items() if saved_cfg.get(k) != v}
        raise CheckpointError(f"cannot resume: the training config differs from the "
                              f"checkpoint's (field: (saved, given)) {diff}")
    if "rng_state" not in meta or "optimizer" not in meta:
        raise CheckpointError(f"{path} is not a resumable checkpoint (no optimizer/RNG state)")
    return arrays, meta


@threads.in_phase("train")
class Callback:
    """What a fine-tuning method does at fixed points of every training step (override either):
    AdaLoRA's rank allocator (:class:`minilora.methods.adalora.RankAllocator`) adds its
    regulariser's gradient after the backward pass and prunes after the optimizer step. The
    model and the optimizer know no method; the loop calls these."""

    def after_backward(self) -> None:
        """The step's gradients are in the parameters' ``grads``; the update comes next."""

    def after_step(self, step: int) -> None:
        """The optimizer updated the parameters for 0-based ``step`` (gradients still there)."""


def train(model, tokenizer, train_ids, val_ids, cfg: TrainConfig, out_dir=None, resume=False,
          progress=True, step_callback=None, batch_fn=None, forward_backward=None,
          callbacks=(), groups=None) -> History:
    """Train ``model`` in place; returns a :class:`History`.

    Args:
        model: a GPT (any subset of parameters trainable; frozen ones cost no gradient work).
        tokenizer: saved with every checkpoint.
        train_ids, val_ids: 1-D integer NumPy arrays of token ids.
        cfg: a :class:`TrainConfig`.
        out_dir: where ``ckpt.safetensors`` and ``metrics.jsonl`` go (None: nothing written).
        resume: continue from ``out_dir/ckpt.safetensors`` (same cfg required).
        progress: show a tqdm bar.
        step_callback: optional ``f(step, record)`` called after every step.
        batch_fn: optional ``f(rng) -> (x, y)`` replacing the random windows of ``train_ids``
            (classification tasks draw whole labelled rows); it must draw only from ``rng``, so
            resuming stays exact.
        forward_backward: optional ``f(x, y) -> loss`` (a float) that leaves the gradients in
            the model's ``grads``, replacing ``model.forward_backward`` (e.g. a loss that weights
            a classification label and a language-modelling term separately).
        callbacks: :class:`Callback` s of the method being trained (AdaLoRA's allocator).
        groups: the optimizer's parameter groups (:class:`minilora.optim.ParamGroup`: LoRA+'s
            B factors, the learning rate of modules saved whole).
    """
    if cfg.block_size > model.config.block_size:
        raise UsageError(f"TrainConfig.block_size {cfg.block_size} exceeds the model's block_size "
                         f"{model.config.block_size}")
    check_training_fits(model, cfg.batch_size, cfg.block_size)  # before anything is allocated
    out = Path(out_dir) if out_dir is not None else None
    opt = AdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                weight_decay=cfg.weight_decay, groups=groups)
    rng = backend.cpu_rng(cfg.seed)
    start = 0
    hist = History()
    if resume:
        if out is None:
            raise UsageError("resume=True needs out_dir (where the checkpoint is)")
        arrays, meta = read_resumable(out, cfg)
        model.load_state_dict(strip_prefix(arrays, "model."))
        opt.load_state(strip_prefix(arrays, "optim."), meta["optimizer"])
        rng.bit_generator.state = meta["rng_state"]
        saved_rngs = (meta.get("extra") or {}).get("module_rng_states", {})
        for name, g in _module_rngs(model).items():
            if name in saved_rngs:
                g.bit_generator.state = saved_rngs[name]
        start = int(meta["step"])
        records = _read_metrics(out / METRICS_NAME, start - 1)
        hist.train = [r for r in records if "loss" in r]
        hist.val = [r for r in records if "val_loss" in r]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # rewrite the metrics file so it holds exactly the records up to the resume point
        atomic_write_text(out / METRICS_NAME,
                          "".join(json.dumps(r) + "\n" for r in sorted(
                              hist.train + hist.val, key=lambda r: (r["step"], "val_loss" in r))))
        metrics_f = open(out / METRICS_NAME, "a")
    else:
        metrics_f = None

    val_batches = fixed_batches(val_ids, cfg.eval_batches, cfg.batch_size, cfg.block_size,
                                cfg.seed + 1) if val_ids is not None else None

    def log(rec):
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()

    saved_step = start if resume else None  # the step of the last good checkpoint on disk

    def save(step_done):
        nonlocal saved_step
        if out is not None:
            extra = {"module_rng_states": {n: g.bit_generator.state
                                           for n, g in _module_rngs(model).items()}}
            save_checkpoint(out / CKPT_NAME, model, tokenizer, optimizer=opt, train_config=cfg,
                            step=step_done, rng_state=rng.bit_generator.state, extra=extra)
            saved_step = step_done

    def stopped(step, what, cause, resumable=True):
        if out is None:
            where = "no checkpoint is kept (no out_dir)"
        elif saved_step is None:
            where = f"no checkpoint was saved yet (every {cfg.ckpt_every} steps into {out})"
        else:
            where = (f"the last good checkpoint is {out / CKPT_NAME} (after {saved_step} steps"
                     + ("; continue with resume=True, or --resume)" if resumable else ")"))
        return NonFiniteError(f"{what} at step {step}: {cause}. Training stopped; {where}")

    bar = None
    if progress:
        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step",
                   dynamic_ncols=True, leave=True)
    t_run = time.perf_counter()
    tokens = cfg.batch_size * cfg.block_size
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            x, y = (batch_fn(rng) if batch_fn is not None
                    else get_batch(train_ids, cfg.batch_size, cfg.block_size, rng))
            loss = (forward_backward or model.forward_backward)(backend.asarray(x),
                                                                backend.asarray(y))
            if not math.isfinite(loss):
                raise stopped(step, f"loss is {loss}", nonfinite_cause(model, y, step, start, lr))
            for cb in callbacks:
                cb.after_backward()
            try:
                norm = opt.step(lr, cfg.grad_clip)
            except NonFiniteError:
                raise stopped(step, "the gradient is NaN/inf",
                              nonfinite_cause(model, y, step, start, lr)) from None
            for cb in callbacks:
                cb.after_step(step)
            backend.synchronize()
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                   "tok_per_s": tokens / dt}
            hist.train.append(rec)
            log(rec)
            recent = diverged([r["loss"] for r in hist.train[-DIVERGENCE_WINDOW:]],
                              hist.train[0]["loss"])
            if recent is not None:
                e = stopped(step, f"the loss diverged (mean {recent:.3f} over the last "
                            f"{min(DIVERGENCE_WINDOW, len(hist.train))} steps, against "
                            f"{hist.train[0]['loss']:.3f} at step {hist.train[0]['step']})",
                            f"the steps at learning rate up to {lr:.3g} made it worse; try a "
                            "lower learning rate", resumable=False)
                raise DivergenceError(str(e))
            done = step + 1
            if val_batches is not None and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                vrec = {"step": step, "val_loss": evaluate(model, val_batches)}
                hist.val.append(vrec)
                log(vrec)
            if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
                save(done)
            if bar is not None:
                post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens / dt:,.0f}"}
                if hist.val:
                    post["val"] = f"{hist.val[-1]['val_loss']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if step_callback is not None:
                step_callback(step, rec)
    finally:
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()
    hist.seconds = time.perf_counter() - t_run
    return hist
