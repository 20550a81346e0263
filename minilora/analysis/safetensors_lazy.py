"""Read safetensors files one tensor at a time, in float64, bf16 included, without torch.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 N, then N
bytes of JSON header, then the data. The header maps each tensor name to
``{"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]}`` (byte offsets into the
data section, i.e. from byte 8 + N of the file), plus an optional ``"__metadata__"`` of strings.
Data are raw little-endian, C order.

``safetensors.numpy`` cannot hand out bfloat16 (NumPy has no such dtype), and real adapters and
base models are often stored in bf16. So :class:`SafetensorsFile` parses the header itself and
reads each tensor's byte range on demand: nothing but the header is read when a file is opened,
and a tensor is read (seek + read) only when asked for. bf16 is the top 16 bits of a float32, so
``(u16 as u32) << 16`` reinterpreted as float32 is the exact value; F16, F32 and F64 are read as
such. Every tensor comes back as float64 (exact for all four dtypes).

:class:`BaseWeights` does the same for a model's weights: one ``.safetensors`` file, or a
directory holding ``model.safetensors`` or a sharded checkpoint (``model.safetensors.index.json``
whose ``weight_map`` names the shard of every tensor), and finds the weight of a LoRA module by
its name (:meth:`BaseWeights.find`).

Chapter: chapters/08-delta-w-analysis.ipynb
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minilora.errors import MiniloraError
from minilora.io import atomic_write_bytes

#: safetensors dtype -> how its bytes are read (bf16 as uint16, widened below)
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype("<u2")}
MAX_HEADER_BYTES = 100_000_000   # the limit the reference implementation enforces
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class AdapterFileError(MiniloraError, ValueError):
    """An adapter or model file is missing, unreadable, malformed or of an unsupported kind."""


LFS_POINTER = b"version https://git-lfs"


def is_lfs_pointer(path) -> bool:
    """True when ``path`` is a Git LFS pointer (a small text file standing in for the real one:
    ``version https://git-lfs.github.com/spec/v1``, ``oid sha256:...``, ``size ...``)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        return False


def lfs_pointer_error(path) -> AdapterFileError:
    """The error for a Git LFS pointer found where a real file was expected."""
    return AdapterFileError(f"{path}: this file is a Git LFS pointer, not the real file: fetch "
                            f"the real file with `git lfs pull`")


class TensorInfo(NamedTuple):
    """Where one tensor lives in its file."""
    dtype: str          # "F32", "BF16", ...
    shape: tuple        # e.g. (4096, 16)
    start: int          # absolute byte offset of the first byte in the file
    end: int            # absolute offset one past the last byte


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:
    """Exact bf16 -> float32: the bf16 bits are the high half of the float32 bits."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest, ties to even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


class SafetensorsFile:
    """A lazily read ``.safetensors`` file: the header at open, each tensor on :meth:`read`."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise AdapterFileError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if is_lfs_pointer(self.path):
            raise lfs_pointer_error(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFileError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterFileError(f"{self.path}: not a safetensors file (header length {n} "
                                       f"does not fit a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise AdapterFileError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise AdapterFileError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (TypeError, KeyError, ValueError):
                raise AdapterFileError(f"{self.path}: malformed header entry for {name!r}") from None
            if not 0 <= begin <= end <= data_len:
                raise AdapterFileError(f"{self.path}: tensor {name!r} lies outside the file "
                                       f"(offsets {begin}..{end}, {data_len} data bytes)")
            if dtype in DTYPES and end - begin != int(np.prod(shape)) * DTYPES[dtype].itemsize:
                raise AdapterFileError(f"{self.path}: tensor {name!r} has {end - begin} bytes, "
                                       f"its shape {shape} in {dtype} needs "
                                       f"{int(np.prod(shape)) * DTYPES[dtype].itemsize}")
            self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple:
        return self._info(name).shape

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise AdapterFileError(f"{self.path}: no tensor named {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float64 array of its stored shape (only its bytes are read)."""
        info = self._info(name)
        if info.dtype not in DTYPES:
            raise AdapterFileError(f"{self.path}: tensor {name!r} is {info.dtype}; only "
                                   f"{', '.join(DTYPES)} can be read")
        with open(self.path, "rb") as f:
            f.seek(info.start)
            raw = f.read(info.end - info.start)
        a = np.frombuffer(raw, dtype=DTYPES[info.dtype])
        if info.dtype == "BF16":
            a = bf16_to_float32(a)
        return a.astype(np.float64).reshape(info.shape)


def write_safetensors(path, tensors: dict, dtype: str = "F32", metadata: dict | None = None) -> None:
    """Write float arrays (name -> array) to a safetensors file in ``dtype`` (F64/F32/F16/BF16),
    atomically. bf16 is rounded to nearest even from float32. ``metadata`` values must be str.

    The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
    """
    if dtype not in DTYPES:
        raise AdapterFileError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, a in tensors.items():
        a = np.asarray(a)
        data = float32_to_bf16(a) if dtype == "BF16" else np.ascontiguousarray(a, DTYPES[dtype])
        buf = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(buf)]}
        chunks.append(buf)
        offset += len(buf)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    atomic_write_bytes(path, struct.pack("<Q", len(head)) + head + b"".join(chunks))


class BaseWeights:
    """A model's weights in safetensors, read lazily: one file, or a directory with
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            if (path / INDEX_NAME).is_file():
                index_path = path / INDEX_NAME
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise AdapterFileError(f"{index_path}: not a safetensors index (a JSON "
                                           f"object with a 'weight_map')") from None
                missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
                if missing:
                    raise AdapterFileError(f"{index_path}: shard(s) {', '.join(missing)} missing")
                self._where = {k: path / f for k, f in weight_map.items()}
            elif (path / SINGLE_NAME).is_file():
                path = path / SINGLE_NAME
            else:
                raise AdapterFileError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} in this "
                                       f"directory (base weights must be safetensors)")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise AdapterFileError(f"{path}: base weights must be a .safetensors file (or a "
                                       f"directory of them); pickled .bin/.pt files are not read")
            only = SafetensorsFile(path)
            self._files = {path: only}
            self._where = {k: path for k in only.keys()}
        elif not path.is_dir():
            raise AdapterFileError(f"{path}: no such file or directory")
        else:
            self._files = {}
        self.path = path

    def keys(self) -> list[str]:
        return list(self._where)

    def _file(self, key: str) -> SafetensorsFile:
        if key not in self._where:
            raise AdapterFileError(f"{self.path}: no weight named {key!r}")
        p = self._where[key]
        if p not in self._files:
            self._files[p] = SafetensorsFile(p)
        return self._files[p]

    def shape(self, key: str) -> tuple:
        return self._file(key).shape(key)

    def read(self, key: str) -> np.ndarray:
        """Weight ``key`` as float64, in its stored shape."""
        return self._file(key).read(key)

    def find(self, module: str) -> str:
        """The key of the weight of LoRA module ``module`` (e.g. ``model.layers.0.self_attn.q_proj``).

        Tried in order, dropping leading path components one at a time (never a numeric one,
        so a layer index is never lost): ``<path>.weight``, ``<path>.base_layer.weight`` (a
        PEFT-wrapped checkpoint), then a unique key ending in ``.<path>.weight`` (a base with an
        extra prefix). Raises if nothing or more than one key fits.
        """
        keys = self._where
        parts = module.split(".")
        for start in range(len(parts)):
            if start and parts[start - 1].isdigit():
                break
            p = ".".join(parts[start:])
            for cand in (f"{p}.weight", f"{p}.base_layer.weight"):
                if cand in keys:
                    return cand
            hits = [k for k in keys if k.endswith((f".{p}.weight", f".{p}.base_layer.weight"))]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise AdapterFileError(f"{self.path}: module {module!r} matches several base "
                                       f"weights ({', '.join(sorted(hits)[:4])})")
        raise AdapterFileError(f"{self.path}: no base weight for module {module!r} (looked for "
                               f"'{module}.weight' and shorter suffixes of it)")
