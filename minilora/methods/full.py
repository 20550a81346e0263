"""Full fine-tuning: every parameter trains (the baseline every parameter-efficient method is
measured against). The trained model is a plain GPT checkpoint.

Chapter: chapters/07-full-ft-vs-lora.ipynb
"""
from __future__ import annotations

from minilora.checkpoint import FORMAT as CHECKPOINT_FORMAT
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.errors import UsageError
from minilora.methods.base import Method, Tuned


class FullMethod(Method):
    """Every parameter of the GPT trains; saved as a whole checkpoint."""

    name = "full"
    example = "--out runs/ft-full"
    config_cls = None
    summary = "full fine-tuning: every parameter trains"
    weights_file = "model.safetensors"
    file_format = CHECKPOINT_FORMAT
    lr = (1e-3, 1e-4)

    def apply(self, model, config=None, modules_to_save=()) -> Tuned:
        if modules_to_save:
            raise UsageError("method 'full' trains every module already; modules_to_save is for "
                             "the parameter-efficient methods")
        return super().apply(model, config)

    def _apply(self, model, config) -> Tuned:
        return Tuned(model, None, self)

    def trainable(self, tuned: Tuned) -> dict:
        return dict(tuned.model.named_parameters())

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        if tokenizer is None:
            raise UsageError("method 'full' saves a whole checkpoint: give the tokenizer")
        save_checkpoint(path, tuned.model, tokenizer, extra={"finetune": True})

    def load(self, path, model=None) -> Tuned:
        """The checkpoint's own model (``model`` is not needed: the file holds every weight)."""
        return Tuned(load_checkpoint(path)[0], None, self)


FULL = FullMethod()

__all__ = ["FULL", "FullMethod"]
