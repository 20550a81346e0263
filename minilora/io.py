"""One typed file format for everything minilora saves: arrays in safetensors, the rest as JSON.

Every file minilora writes (checkpoints, LoRA and QLoRA adapters, the other PEFT methods' files,
quantised models, ``QuantState``) is one ``.safetensors`` file:

* the tensors, by name (raw little-endian arrays: nothing is ever unpickled);
* the header's metadata entry ``"minilora"``: a JSON object whose ``"format"`` field names the
  kind of file and its version (``"minilora-checkpoint-v1"``, ``"minilora-adapter-v1"``, ...).

:func:`write_typed` writes such a file atomically; :func:`read_typed` reads one back and checks,
before returning anything, that the file exists, is a readable safetensors file written by
minilora, has the expected format, and that every float tensor is finite (naming the first bad
one). :func:`config_from_meta` and :func:`check_same_base` are the two checks every reader then
does (parse a saved config; the file was made for a model of this shape).

Atomic writes: the bytes go to ``<name>.tmp-<pid>`` in the same directory, are flushed and
fsynced, then ``os.replace``-d over the target, so a crash mid-save leaves the previous file
untouched (and at worst a stray temp file, which nothing reads).

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as _safetensors_bytes

from minilora import backend
from minilora.errors import MiniloraError

META_KEY = "minilora"


class OutputError(MiniloraError, OSError):
    """An output path cannot be written (a file where a directory is needed, no permission...)."""


class CheckpointError(MiniloraError, ValueError):
    """A saved file (checkpoint, adapter, quantised model) is missing, truncated, corrupt, of
    another kind, holds NaN/inf, or does not fit the model it is loaded into."""


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
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON (a trailing newline), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def first_nonfinite(arrays: dict) -> str | None:
    """The name of the first float array (in dict order) holding NaN or inf, else None."""
    for name, a in arrays.items():
        a = backend.to_numpy(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return name
    return None


def write_typed(path, fmt: str, arrays: dict, meta: dict | None = None) -> None:
    """Atomically write ``arrays`` (name -> array of either backend) with ``meta`` + ``format``.

    Refuses (before writing anything) a float array holding NaN or inf: a file that cannot be
    trained from or sampled from should never exist.

    Args:
        path: the ``.safetensors`` file to write (parent directories are created).
        fmt: the kind and version of the file, stored as ``meta["format"]``.
        arrays: ``{name: array}``; arrays are copied to the CPU, contiguous.
        meta: JSON-serialisable metadata (its ``"format"`` key, if any, must equal ``fmt``).
    """
    meta = dict(meta or {})
    if meta.setdefault("format", fmt) != fmt:
        raise ValueError(f"write_typed: meta['format'] is {meta['format']!r}, not {fmt!r}")
    bad = first_nonfinite(arrays)
    if bad is not None:
        raise CheckpointError(f"refusing to save {bad!r}: it holds NaN or inf")
    tensors = {k: np.ascontiguousarray(backend.to_numpy(a)) for k, a in arrays.items()}
    atomic_write_bytes(path, _safetensors_bytes(
        tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))


def read_header(path, what: str = "file") -> dict:
    """The JSON header (``meta``) of a :func:`write_typed` file, without reading its tensors
    (which method wrote this file?); the same one-line errors as :func:`read_typed`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta_raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # SafetensorError, OSError, ...: truncated or not a safetensors file
        raise CheckpointError(f"{what} {str(path)!r} is truncated or not a safetensors file "
                              f"({type(e).__name__}: {e})") from None
    return _parse_meta(path, meta_raw, what)


def _parse_meta(path, meta_raw, what: str) -> dict:
    if meta_raw is None:
        raise CheckpointError(f"{what} {str(path)!r} has no {META_KEY!r} metadata: not written "
                              "by minilora")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {str(path)!r} has corrupt metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{what} {str(path)!r} has corrupt metadata (not a JSON object)")
    return meta


def read_typed(path, fmt: str | tuple[str, ...] | None, what: str = "file",
               allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """Read a file written by :func:`write_typed`; returns ``(NumPy arrays, meta)``.

    Args:
        path: the ``.safetensors`` file.
        fmt: the expected ``meta["format"]`` (one, a tuple of accepted ones, or None: any).
        what: how the error messages name the file ("checkpoint", "adapter", ...).
        allow_nonfinite: skip the NaN/inf check (for debugging a broken file only).
    Raises:
        CheckpointError: missing, not a file, truncated or not safetensors, not written by
            minilora, another format, or a float tensor with NaN/inf (named).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta_raw = (f.metadata() or {}).get(META_KEY)
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: truncated or not a safetensors file
        raise CheckpointError(f"{what} {str(path)!r} is truncated or not a safetensors file "
                              f"({type(e).__name__}: {e})") from None
    meta = _parse_meta(path, meta_raw, what)
    accepted = (fmt,) if isinstance(fmt, str) else fmt
    if accepted is not None and meta.get("format") not in accepted:
        raise CheckpointError(f"{str(path)!r} is not a minilora {what} (format "
                              f"{meta.get('format')!r}, expected "
                              f"{' or '.join(repr(f) for f in accepted)})")
    if not allow_nonfinite:
        bad = first_nonfinite(arrays)
        if bad is not None:
            raise CheckpointError(f"{what} {str(path)!r}: tensor {bad!r} holds NaN or inf (the "
                                  "file is damaged or was saved from a diverged run; "
                                  "allow_nonfinite=True loads it anyway, for debugging)")
    return arrays, meta


def config_from_meta(path, meta: dict, key: str, cls, what: str = "file"):
    """``cls.from_dict(meta[key])`` with one clear :class:`CheckpointError` if it is missing or
    invalid (``cls`` is a config dataclass: GPTConfig, LoraConfig, QuantConfig, ...)."""
    try:
        return cls.from_dict(meta[key])
    except (KeyError, ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{what} {str(path)!r} has an invalid {key}: {e}") from None


BASE_SHAPE_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "bias")


def check_same_base(path, saved: dict | None, model_config, error=CheckpointError,
                    fields: tuple = BASE_SHAPE_FIELDS) -> None:
    """Refuse a file made for a base model of another shape.

    ``saved`` is the model config stored in the file (a dict, or None when the file has none);
    ``model_config`` the config of the model it is loaded into (anything with ``to_dict``, or None).
    Raises ``error`` naming every field that differs, e.g. "n_embd 8 (file) vs 12 (model)".
    """
    if not saved or model_config is None or not hasattr(model_config, "to_dict"):
        return
    ours = model_config.to_dict()
    diff = {k: (v, ours.get(k)) for k, v in saved.items() if k in fields and ours.get(k) != v}
    if diff:
        raise error(f"{str(path)!r} was built for another base model: "
                    + ", ".join(f"{k} {a} (file) vs {b} (model)" for k, (a, b) in diff.items()))


def strip_prefix(arrays: dict, prefix: str) -> dict:
    """The entries of ``arrays`` whose name starts with ``prefix``, with the prefix removed
    (``"model.wte.weight"`` -> ``"wte.weight"`` for prefix ``"model."``)."""
    return {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}




def ensure_writable_dir(path) -> Path:
    """Create ``path`` (and parents) if needed and prove it is writable, before any work starts.

    Raises:
        UsageError-like :class:`OutputError`: the path is a file, or lies under a file, or cannot
        be created or written (permissions, read-only disk), naming the path and the reason.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output directory {str(path)!r} is an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".minilora-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to output directory {str(path)!r}: "
                          f"{e.strerror or type(e).__name__}") from None
    return path


__all__ = ["CheckpointError", "META_KEY", "OutputError", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "check_same_base", "config_from_meta", "ensure_writable_dir",
           "first_nonfinite", "read_typed", "strip_prefix", "write_typed"]
