"""Checkpoints: arrays in one safetensors file, everything else as JSON in its header; atomic.

A checkpoint is a single ``.safetensors`` file:

* tensors ``model.<param name>`` (the weights) and, for a resumable training checkpoint,
  ``optim.<param name>.m`` / ``optim.<param name>.v`` (AdamW moments);
* the header's metadata entry ``"minilora"``: a JSON object with ``format`` (version),
  ``model_config`` (:class:`GPTConfig` fields), ``tokenizer`` (its vocabulary), and optionally
  ``train_config``, ``optimizer`` (step count etc.), ``step``, ``rng_state`` and free ``extra``.

One file means one atomic write: we write ``<name>.tmp-<pid>`` in the same directory, flush and
fsync it, then ``os.replace`` it over the old file. A crash mid-save leaves the last good
checkpoint untouched (and at worst a stray temp file, which loading ignores). Nothing is ever
unpickled: safetensors holds raw little-endian arrays and JSON.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

from minilora.config import ConfigError, GPTConfig
from minilora.data import CharTokenizer
from minilora.io import CheckpointError, read_typed, strip_prefix, write_typed
from minilora.model import GPT

FORMAT = "minilora-checkpoint-v1"


def save_checkpoint(path, model, tokenizer, optimizer=None, train_config=None, step=None,
                    rng_state=None, extra=None) -> None:
    """Save a model (and, for resuming, its optimizer, step and data-sampler RNG state)."""
    arrays = {f"model.{n}": p for n, p in model.named_parameters()}
    meta = {"model_config": model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(), "dtype": str(model.dtype)}
    if optimizer is not None:
        arrays.update({f"optim.{k}": a for k, a in optimizer.state_arrays().items()})
        meta["optimizer"] = optimizer.state_meta()
    if train_config is not None:
        meta["train_config"] = train_config.to_dict()
    if step is not None:
        meta["step"] = int(step)
    if rng_state is not None:
        meta["rng_state"] = rng_state
    if extra:
        meta["extra"] = extra
    write_typed(path, FORMAT, arrays, meta)


def load_checkpoint(path, dtype=None, allow_nonfinite: bool = False):
    """Load a checkpoint; returns ``(model, tokenizer, info)``.

    ``info`` holds the raw meta plus ``"optim_arrays"`` (for :meth:`AdamW.load_state`). The model
    is built from the saved config and filled with the saved weights on the active backend;
    missing, extra or wrongly shaped tensors, and NaN/inf weights (unless ``allow_nonfinite``),
    raise :class:`CheckpointError`.
    """
    arrays, meta = read_typed(path, FORMAT, "checkpoint", allow_nonfinite)
    try:
        config = GPTConfig.from_dict(meta["model_config"])
        tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
    except (KeyError, ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config/tokenizer: {e}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"checkpoint {str(path)!r}: tokenizer has {tokenizer.vocab_size} "
                              f"symbols but the model expects vocab_size {config.vocab_size}")
    model = GPT(config, rng=None, dtype=dtype or meta.get("dtype", "float32"))  # no draws
    try:
        model.load_state_dict(strip_prefix(arrays, "model."))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit its config: {e}") from None
    info = dict(meta)
    info["optim_arrays"] = strip_prefix(arrays, "optim.")
    return model, tokenizer, info
