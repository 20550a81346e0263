"""The harness's view of the methods: any registered method (:data:`minilora.methods.METHODS`),
plus what any method can add in a run (modules trained whole, LoRA+), made into a
:class:`MethodSetup` the harness trains.

The methods themselves (configs, layers, files) live in the library, one home each
(:mod:`minilora.methods`); this module holds no table of them: adding a method is its home and
one line in the registry.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, NamedTuple

from minilora.errors import UsageError
from minilora.io import atomic_write_text
from minilora.methods.registry import METHODS, Tuned, get_method
from minilora.optim import ParamGroup, loraplus_group


class MethodSetup(NamedTuple):
    """What a fine-tuning method does to the freshly loaded base model, for the harness.

    Attributes:
        model: the model to train (usually the base itself, modified in place; a method may wrap
            it, e.g. prompt tuning). It offers ``forward(idx, check=...)``,
            ``forward_backward(x, y)``, ``named_trainable()`` and ``num_parameters()``.
        config: the method's options as a JSON-able dict (or None), recorded in ``result.json``.
        save: ``f(out_dir: Path) -> str`` writing the trained weights (atomically) into
            ``out_dir`` (and any other file of the method); returns the weights' file name.
        lr, min_lr: the method's default peak and final learning rates.
        base_model: the untouched base, for methods that change the outputs at step 0 (prefix /
            prompt tuning wrap it; QLoRA quantises it): the ``*_base`` figures are measured on
            it and the method's step-0 figures are reported as ``*_init``. None: ``model`` at
            step 0 is the base (LoRA's B = 0, zero-up Houlsby adapters, BitFit).
        callbacks: training callbacks (:class:`minilora.train.Callback`; AdaLoRA's allocator).
        groups: the optimizer's parameter groups (:class:`minilora.optim.ParamGroup`).
        tuned: the library's :class:`minilora.methods.Tuned` (None for a hand-made setup).
    """
    model: object
    config: dict | None
    save: Callable
    lr: float
    min_lr: float
    base_model: object = None
    callbacks: tuple = ()
    groups: tuple = ()
    tuned: Tuned | None = None


class Extras(NamedTuple):
    """What can be added to any method: ``finetune(method, task, Extras(config, ...))``.

    Attributes:
        config: the method's own config (or None for its default).
        modules_to_save: module names trained whole beside the method (PEFT's
            ``modules_to_save``, e.g. ``("lm_head",)``); saved inside the method's own file
            (``lm_head.modules_to_save.default.weight``; PEFT's layout in AdaLoRA's folder).
        loraplus_ratio: LoRA+: the B factors' learning rate is ratio x A's (methods with LoRA
            factors: lora, qlora, dora, adalora).
        modules_to_save_lr: peak learning rate of the saved modules (None: the method's, as in
            PEFT, where one optimizer trains everything); the schedule scales it like the rest.
        method_lr: the run's peak learning rate when it is not the method's default (a task
            recipe's or ``--lr``), so that ``modules_to_save_lr`` comes out right.
    """
    config: object = None
    modules_to_save: tuple = ()
    loraplus_ratio: float | None = None
    modules_to_save_lr: float | None = None
    method_lr: float | None = None


def setup_method(name: str, model, tokenizer, config=None, steps: int | None = None
                 ) -> MethodSetup:
    """Apply the registered method ``name`` to the freshly loaded base ``model`` for the harness.

    Args:
        name: a key of :data:`METHODS`.
        config: the method's config (None: its default), or an :class:`Extras`.
        steps: the run's steps, for a default config that depends on them (AdaLoRA's schedule).
    """
    method = get_method(name)
    extras = config if isinstance(config, Extras) else Extras(config)
    for field in ("modules_to_save_lr", "method_lr"):
        v = getattr(extras, field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not 0 < v < float("inf")):
            raise UsageError(f"{field} must be a finite number > 0, got {v!r}")
    groups = [loraplus_group(extras.loraplus_ratio)] if extras.loraplus_ratio is not None else []
    cfg = method.default_config(steps=steps) if extras.config is None else extras.config
    base = copy.deepcopy(model) if getattr(method, "base_differs", None) == "copy" else None
    tuned = method.apply(model, cfg, extras.modules_to_save)
    if getattr(method, "base_differs", None) == "wrapped":
        base = tuned.gpt
    lr, min_lr = method.lr
    summary = dict(method.record(tuned) or {})
    if groups:
        if not any(n.endswith(".lora_B") for n, _, _ in tuned.model.named_trainable()):
            raise UsageError("loraplus_ratio sets the learning rate of LoRA B factors; this "
                             "method has none (use lora, qlora, dora or adalora)")
        summary["loraplus_ratio"] = float(extras.loraplus_ratio)
    if tuned.modules_to_save:
        summary["modules_to_save"] = list(tuned.modules_to_save)
        if extras.modules_to_save_lr is not None:
            names = {n for p in tuned.modules_to_save for n, _ in tuned.model.named_parameters()
                     if n.startswith(p + ".")}
            ratio = extras.modules_to_save_lr / (extras.method_lr or lr)
            groups.append(ParamGroup("modules_to_save", names.__contains__, ratio))
            summary["modules_to_save_lr"] = float(extras.modules_to_save_lr)

    def save(out: Path) -> str:
        out = Path(out)
        method.save(out / method.weights_file, tuned, tokenizer=tokenizer)
        for fname, text in method.extra_files(tuned).items():
            atomic_write_text(out / fname, text)
        return method.weights_file

    return MethodSetup(tuned.model, summary or None, save, lr, min_lr, base,
                       tuple(tuned.callbacks), tuple(groups), tuned)


def method_setup(name: str) -> Callable:
    """``f(model, tokenizer, config) -> MethodSetup`` for method ``name`` (one clear error for an
    unknown name)."""
    get_method(name)
    return lambda model, tokenizer, config=None: setup_method(name, model, tokenizer, config)


__all__ = ["METHODS", "Extras", "MethodSetup", "method_setup", "setup_method"]
