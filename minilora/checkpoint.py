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

import json
import os
from pathlib import Path

from minilora import backend
from minilora.errors import MiniloraError

FORMAT = "minilora-checkpoint-v1"


class CheckpointError(MiniloraError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_arrays(path, arrays: dict, meta: dict) -> None:
    """Atomically write ``arrays`` (name -> array of either backend) and JSON ``meta``."""
    from safetensors.numpy import save

    np_ = backend.cpu_module()
    tensors = {}
    for k, a in arrays.items():
        a = np_.ascontiguousarray(backend.to_numpy(a))
        if not np_.all(np_.isfinite(a)) and a.dtype.kind == "f":
            raise CheckpointError(f"refusing to save {k!r}: it holds NaN or inf")
        tensors[k] = a
    data = save(tensors, metadata={"minilora": json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(path, data)


def load_arrays(path) -> tuple[dict, dict]:
    """Read a file written by :func:`save_arrays`; returns (NumPy arrays, meta). Clear errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta_raw = (f.metadata() or {}).get("minilora")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...: truncated or not a safetensors file
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or not a safetensors file "
                              f"({type(e).__name__}: {e})") from None
    if meta_raw is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no 'minilora' metadata: not written "
                              "by minilora")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has corrupt metadata ({e})") from None
    return arrays, meta


def strip_prefix(arrays: dict, prefix: str) -> dict:
    """The entries of ``arrays`` whose name starts with ``prefix``, with the prefix removed
    (``"model.wte.weight"`` -> ``"wte.weight"`` for prefix ``"model."``)."""
    return {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}


def save_checkpoint(path, model, tokenizer, optimizer=None, train_config=None, step=None,
                    rng_state=None, extra=None) -> None:
    """Save a model (and, for resuming, its optimizer, step and data-sampler RNG state)."""
    arrays = {f"model.{n}": p for n, p in model.named_parameters()}
    meta = {"format": FORMAT, "model_config": model.config.to_dict(),
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
    save_arrays(path, arrays, meta)


def load_checkpoint(path, dtype=None):
    """Load a checkpoint; returns ``(model, tokenizer, info)``.

    ``info`` holds the raw meta plus ``"optim_arrays"`` (for :meth:`AdamW.load_state`). The model
    is built from the saved config and filled with the saved weights on the active backend;
    missing, extra or wrongly shaped tensors raise :class:`CheckpointError`.
    """
    from minilora.config import ConfigError, GPTConfig
    from minilora.data import CharTokenizer
    from minilora.model import GPT

    arrays, meta = load_arrays(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}; "
                              f"this minilora reads {FORMAT!r}")
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


BASE_MODEL_FILE = "base_model/shakespeare_char.safetensors"


def base_model_path() -> Path:
    """Where the shipped pretrained Shakespeare model lives (``data/base_model/...``)."""
    from minilora.data import data_dir
    p = data_dir() / BASE_MODEL_FILE
    if not p.exists():
        raise CheckpointError(
            f"the shipped base model {str(p)!r} is missing. It is committed with the repository; "
            "re-create it with the command in data/SOURCES.md (`minilora pretrain --preset base "
            "...`), or pass --ckpt PATH")
    return p
