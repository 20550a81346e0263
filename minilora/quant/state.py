"""``QuantState``: everything besides the packed codes that 4-bit dequantisation needs, and its
file format (safetensors for the arrays + JSON for the rest, both written atomically).

Field names follow bitsandbytes' ``QuantState`` (``absmax``, ``shape``, ``code``, ``blocksize``,
``quant_type``, ``dtype``, ``offset``); bnb keeps the second level of double quantisation in a
nested ``state2`` (``state2.absmax``, ``state2.code``, ``state2.blocksize``), which are our flat
``absmax2``, ``code2``, ``blocksize2``.

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from minilora.backend import asarray, cpu_module, to_numpy, xp
from minilora.config import QUANT_TYPES
from minilora.io import atomic_write_bytes, atomic_write_text
from minilora.quant.checks import QuantError, n_blocks
from minilora.quant.double import DOUBLE_QUANT_BLOCKSIZE, DYNAMIC_MAP, double_dequantize

FORMAT = "minilora.QuantState"
VERSION = 1
STATE_QUANT_TYPES = QUANT_TYPES + ("custom",)  # a state may hold a code of its own
FLOAT_DTYPES = ("float16", "float32", "float64")
_META_KEYS = ("format", "version", "quant_type", "blocksize", "shape", "dtype", "double_quant",
              "blocksize2", "offset")


@dataclass(eq=False)
class QuantState:
    """What :func:`minilora.quant.nf4.dequantize_4bit` needs besides the packed codes.

        x_hat_i = code[q_i] * absmax[i // blocksize]                      (no double_quant)
        absmax  = code2[absmax_q8] * absmax2[b // blocksize2] + offset    (double_quant)

    Attributes:
        absmax: (n_blocks,) float32 scales, or (n_blocks,) uint8 codes of ``absmax - offset``
            when ``double_quant``; n_blocks = ceil(n / blocksize).
        shape: shape of the original tensor (n = prod(shape) elements).
        code: (16,) float32 table the 4-bit indices point into.
        blocksize: first-level block size (default 64).
        quant_type: 'nf4', 'fp4', 'int4' or 'custom'.
        dtype: name of the original dtype ('float32', ...); dequantisation returns it.
        offset: float32 scalar mean of the absmax values (double_quant only, else None).
        absmax2: (ceil(n_blocks / blocksize2),) float32 second-level scales (double_quant only).
        code2: (256,) float32 8-bit table of the second level (double_quant only).
        blocksize2: second-level block size (default 256).

    Chapter: chapters/06-nf4-step-by-step.ipynb
    """

    absmax: Any
    shape: tuple
    code: Any
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: str = "float32"
    offset: Any = None
    absmax2: Any = None
    code2: Any = None
    blocksize2: int = DOUBLE_QUANT_BLOCKSIZE

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.absmax2 is not None and self.code2 is None:
            self.code2 = DYNAMIC_MAP
        if self.offset is not None:
            self.offset = xp.asarray(self.offset, dtype=xp.float32).reshape(())
        for name in ("absmax", "code", "absmax2", "code2"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, asarray(v))
        if self.code is not None and self.code.dtype.kind == "f":
            self.code = self.code.astype(xp.float32, copy=False)

    # --- derived quantities -------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        """True when ``absmax`` holds 8-bit codes (bnb: ``nested`` / ``compress_statistics``).

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        return self.absmax2 is not None

    @property
    def n(self) -> int:
        """Number of quantised elements, n = prod(shape).

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Number of first-level blocks, ceil(n / blocksize).

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        return n_blocks(self.n, self.blocksize)

    def get_absmax(self):
        """The float32 first-level scales, restored first if they were double-quantised.

            absmax = code2[absmax_q8] * absmax2[b // blocksize2] + offset   (double_quant)

        Returns:
            float32 array of shape (n_blocks,).

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        if self.double_quant:
            return double_dequantize(self.absmax, self.absmax2, self.offset, self.blocksize2,
                                     code=self.code2)
        return self.absmax

    # --- consistency ---------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every inconsistency in this state, as readable sentences (empty when valid).

        Checks shape, blocksize, quant_type, dtype, a (16,) float32 code, absmax of shape
        (ceil(n / blocksize),) (float32, or uint8 with double_quant), and for double_quant
        absmax2 of shape (ceil(n_blocks / blocksize2),), a (256,) code2 and a finite offset.

        Returns:
            list of str.

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        out = []

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if not all(is_int(s) and s >= 0 for s in self.shape) or self.n < 1:
            out.append(f"shape must be non-negative integers with at least one element; "
                       f"got {self.shape}")
        if not is_int(self.blocksize) or self.blocksize <= 0:
            out.append(f"blocksize must be a positive integer; got {self.blocksize!r}")
        if self.quant_type not in STATE_QUANT_TYPES:
            out.append(f"quant_type must be one of {STATE_QUANT_TYPES}; got {self.quant_type!r}")
        if self.dtype not in FLOAT_DTYPES:
            out.append(f"dtype must be one of {FLOAT_DTYPES}; got {self.dtype!r}")
        if self.code is None or self.code.ndim != 1 or self.code.shape[0] != 16:
            got = None if self.code is None else tuple(self.code.shape)
            out.append(f"code must have shape (16,) for a 4-bit code; got {got}")
        elif self.code.dtype != xp.float32 or not bool(xp.isfinite(self.code).all()):
            out.append("code must be finite float32 values")
        if out:  # sizes below depend on shape / blocksize being sane
            return out
        nb = self.n_blocks
        want = "uint8" if self.double_quant else "float32"
        if self.absmax is None or tuple(self.absmax.shape) != (nb,) or self.absmax.dtype != want:
            got = None if self.absmax is None else f"{tuple(self.absmax.shape)} {self.absmax.dtype}"
            out.append(f"absmax must be ({nb},) {want} for shape {self.shape} in blocks of "
                       f"{self.blocksize}{' (double_quant codes)' if self.double_quant else ''}; "
                       f"got {got}")
        if self.double_quant:
            if not is_int(self.blocksize2) or self.blocksize2 <= 0:
                out.append(f"blocksize2 must be a positive integer; got {self.blocksize2!r}")
                return out
            nb2 = n_blocks(nb, self.blocksize2)
            if tuple(self.absmax2.shape) != (nb2,) or self.absmax2.dtype != xp.float32:
                out.append(f"absmax2 must be ({nb2},) float32 ({nb} first-level blocks in blocks "
                           f"of {self.blocksize2}); got {tuple(self.absmax2.shape)} "
                           f"{self.absmax2.dtype}")
            if self.code2 is None or tuple(self.code2.shape) != (256,):
                got = None if self.code2 is None else tuple(self.code2.shape)
                out.append(f"code2 must have shape (256,) (the 8-bit map); got {got}")
            if self.offset is None or not bool(xp.isfinite(self.offset)):
                out.append(f"offset must be a finite float32 for double_quant; got {self.offset}")
        elif self.offset is not None:
            out.append("offset is set but there is no absmax2: a double_quant state needs both")
        return out

    def validate(self) -> "QuantState":
        """Raise one ValueError listing every inconsistency (see :meth:`problems`).

        Returns:
            self, when valid.

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        p = self.problems()
        if p:
            raise QuantError("inconsistent QuantState: " + "; ".join(p))
        return self

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_tensors_and_meta(self) -> tuple[dict, dict]:
        """Split into NumPy arrays (for safetensors) and JSON-able metadata.

        Returns:
            tensors: {"absmax", "code"} plus {"absmax2", "code2"} when double_quant.
            meta: format, version, quant_type, blocksize, shape, dtype, double_quant,
                blocksize2, offset (a float, or None).

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        self.validate()
        np = cpu_module()
        tensors = {"absmax": to_numpy(self.absmax), "code": to_numpy(self.code)}
        if self.double_quant:
            tensors["absmax2"] = to_numpy(self.absmax2)
            tensors["code2"] = to_numpy(self.code2)
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        meta = {
            "format": FORMAT, "version": VERSION, "quant_type": self.quant_type,
            "blocksize": int(self.blocksize), "shape": list(self.shape), "dtype": self.dtype,
            "double_quant": self.double_quant,
            "blocksize2": int(self.blocksize2) if self.double_quant else None,
            # a float32 printed as a Python float reads back to the same float32
            "offset": float(to_numpy(self.offset)) if self.double_quant else None,
        }
        return tensors, meta

    @classmethod
    def from_tensors_and_meta(cls, tensors: dict, meta: dict) -> "QuantState":
        """Rebuild (and validate) a state from :meth:`to_tensors_and_meta` output.

        Raises:
            ValueError naming the missing / unexpected keys or the inconsistent sizes.

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        if not isinstance(meta, dict) or not isinstance(tensors, dict):
            raise QuantError("QuantState needs a dict of tensors and a dict of metadata")
        missing = [k for k in _META_KEYS if k not in meta]
        if missing:
            raise QuantError(f"QuantState metadata is missing key(s) {missing}; "
                             f"expected {list(_META_KEYS)}")
        if meta["format"] != FORMAT or meta["version"] != VERSION:
            raise QuantError(f"not a {FORMAT} v{VERSION} file: format={meta['format']!r}, "
                             f"version={meta['version']!r}")
        dq = meta["double_quant"]
        if not isinstance(dq, bool):
            raise QuantError(f"metadata double_quant must be true or false; got {dq!r}")
        want = {"absmax", "code"} | ({"absmax2", "code2"} if dq else set())
        if set(tensors) != want:
            raise QuantError(f"QuantState tensors must be exactly {sorted(want)}; missing "
                             f"{sorted(want - set(tensors))}, unexpected "
                             f"{sorted(set(tensors) - want)}")
        shape = meta["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise QuantError(f"metadata shape must be a list of integers; got {shape!r}")
        if dq and not isinstance(meta["offset"], (int, float)):
            raise QuantError(f"metadata offset must be a number for double_quant; "
                             f"got {meta['offset']!r}")
        state = cls(
            absmax=tensors["absmax"], shape=tuple(shape), code=tensors["code"],
            blocksize=meta["blocksize"], quant_type=meta["quant_type"], dtype=meta["dtype"],
            offset=meta["offset"] if dq else None,
            absmax2=tensors.get("absmax2"), code2=tensors.get("code2"),
            blocksize2=meta["blocksize2"] if dq else DOUBLE_QUANT_BLOCKSIZE,
        )
        return state.validate()

    def save(self, path_prefix) -> tuple[str, str]:
        """Write ``<prefix>.safetensors`` (arrays) and ``<prefix>.json`` (metadata), atomically.

        Each file is written atomically (:func:`minilora.io.atomic_write_bytes`: a temporary
        file in the same directory, then ``os.replace``), so a failed write leaves any previous file untouched. The JSON is
        also embedded in the safetensors header, so :meth:`load` notices a pair of files that
        came from two different saves.

        Returns:
            (safetensors path, json path).

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        tensors, meta = self.to_tensors_and_meta()
        text = json.dumps(meta, indent=2, sort_keys=True)
        st_path, json_path = _paths(path_prefix)
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        atomic_write_bytes(st_path, safetensors_bytes(tensors, metadata={"quant_state": text}))
        atomic_write_text(json_path, text + "\n")
        return st_path, json_path

    @classmethod
    def load(cls, path_prefix) -> "QuantState":
        """Read a state written by :meth:`save`; arrays land on the active backend.

        Raises:
            FileNotFoundError if a file is missing; ValueError if the files are unreadable,
            disagree with each other, or describe an inconsistent state.

        Chapter: chapters/06-nf4-step-by-step.ipynb
        """
        st_path, json_path = _paths(path_prefix)
        with open(json_path, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as e:
                raise QuantError(f"{json_path} is not valid JSON: {e}") from None
        try:
            with safe_open(st_path, framework="numpy") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise QuantError(f"{st_path} is not a readable safetensors file "
                             f"({type(e).__name__}: {e})") from None
        embedded = header.get("quant_state")
        if embedded is not None and json.loads(embedded) != meta:
            raise QuantError(f"{st_path} and {json_path} come from different saves "
                             "(their metadata disagree)")
        return cls.from_tensors_and_meta(tensors, meta)


def _paths(path_prefix) -> tuple[str, str]:
    p = os.fspath(path_prefix)
    return p + ".safetensors", p + ".json"
