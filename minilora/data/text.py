"""One character vocabulary for every corpus, folding text into it, and the tokenizer.

Everything here is CPU bookkeeping with NumPy: strings in, ``int32`` id arrays out.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from minilora.backend import to_numpy
from minilora.errors import MiniloraError


class DataError(MiniloraError, ValueError):
    """Text or ids that do not fit the vocabulary, a bad batch shape, or a split that names no
    such file."""


ASCII_VOCAB: str = "\t\n" + "".join(chr(i) for i in range(32, 127))
"""The 97 symbols every corpus and task is written in: tab, newline, then ``' '`` .. ``'~'``.

Id 0 is tab, id 1 is newline, id 2 is space and id ``ord(c) - 30`` is any printable ASCII ``c``.
One fixed vocabulary means a base model pre-trained on Shakespeare can be fine-tuned on Milton,
on sentiment labels or on Python code without resizing (or re-initialising) its token embedding
and output head: only the data changes, never ``vocab_size``.
"""

# Anything matching this is outside ASCII_VOCAB.
_OUTSIDE = re.compile(r"[^\t\n -~]")

# Characters folded by hand, checked before Unicode decomposition. Everything else that is not in
# ASCII_VOCAB goes through _fold_char's rules (spaces, controls, NFKD, then "?").
_FOLD: dict[str, str] = {
    # quotes and primes
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u00ab": '"', "\u00bb": '"',
    # dashes: en dash and friends -> "-", em dash -> "--" (the plain-text convention)
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2212": "-",
    "\u2014": "--", "\u2015": "--",
    # letters that Unicode does not decompose into base letter + accent
    "\u00e6": "ae", "\u00c6": "AE", "\u0153": "oe", "\u0152": "OE", "\u00df": "ss",
    "\u00fe": "th", "\u00de": "Th", "\u00f0": "d", "\u00d0": "D", "\u00f8": "o", "\u00d8": "O",
    "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0110": "D", "\u0131": "i",
    # currency: one letter for the pound, as plain-text editions write "L5" for 5 pounds
    "\u00a3": "L", "\u20ac": "EUR", "\u00a2": "c", "\u00a5": "Y",
    # marks and symbols
    "\u00b6": "",  # pilcrow: a paragraph mark, not text
    "\u00a7": "S", "\u00a9": "(c)", "\u00ae": "(R)", "\u00b1": "+/-", "\u00d7": "x",
    "\u00f7": "/", "\u2044": "/", "\u2022": "*", "\u00b7": ".", "\u00a1": "!", "\u00bf": "?",
    # vertical tab and form feed break lines in the files that use them
    "\x0b": "\n", "\x0c": "\n",
}


@lru_cache(maxsize=None)
def _fold_char(c: str) -> str:
    """ASCII replacement for one character outside ASCII_VOCAB (see :func:`fold_ascii`)."""
    if c in _FOLD:
        return _FOLD[c]
    category = unicodedata.category(c)
    if category == "Zs":  # NBSP, thin space, em space, ...
        return " "
    if category in ("Zl", "Zp"):  # line / paragraph separator
        return "\n"
    if category in ("Cc", "Cf") or category.startswith("M"):  # controls, BOM, soft hyphen, accents
        return ""
    decomposed = unicodedata.normalize("NFKD", c)  # e-acute -> e + accent, "1/2" sign -> 1, /, 2
    out = "".join(_FOLD.get(d, d) for d in decomposed if not unicodedata.combining(d))
    if out and _OUTSIDE.search(out) is None:
        return out
    return "?"


def fold_ascii(text: str) -> str:
    """Rewrite ``text`` so every character is in :data:`ASCII_VOCAB`.

    Rules, in order, for each character outside the vocabulary:

    1. line endings: ``"\\r\\n"`` and a lone ``"\\r"`` become ``"\\n"``; vertical tab and form
       feed become ``"\\n"``;
    2. a hand-made table: curly quotes -> ``'`` / ``"``, en dash and minus -> ``-``,
       em dash -> ``--``, ``æ`` -> ``ae``, ``ß`` -> ``ss``, ``Þ`` -> ``Th``, ``£`` -> ``L``
       (one letter, as plain-text editions print "L5"; ``GBP`` would be anachronistic in old
       prose), ``€`` -> ``EUR``, ``¶`` -> nothing, ``±`` -> ``+/-``, ``©`` -> ``(c)``, ...;
    3. any Unicode space (NBSP, thin space) -> ``" "``; line/paragraph separators -> ``"\\n"``;
    4. other control and format characters (DOS end-of-file ``\\x1a``, byte-order mark, soft
       hyphen, zero-width space) and lone combining accents are **dropped**;
    5. compatibility decomposition (NFKD) minus accents: ``é`` -> ``e``, ``ﬁ`` -> ``fi``,
       ``½`` -> ``1/2``, ``…`` -> ``...``, ``™`` -> ``TM``;
    6. whatever is still outside the vocabulary (Greek, CJK, emoji, ...) is **replaced by "?"**,
       so a loss of information stays visible in the text.

    ASCII text without carriage returns comes back unchanged (the same object). The result
    always satisfies ``CharTokenizer.default().encode(result)`` without error.

    Chapter: chapters/01-foundations.ipynb
    """
    if not isinstance(text, str):
        raise TypeError(f"fold_ascii expects str, got {type(text).__name__}")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    outside = set(_OUTSIDE.findall(text))
    if not outside:
        return text
    return text.translate({ord(c): _fold_char(c) for c in outside})


# ---------------------------------------------------------------------------------------------
# Character tokenizer
# ---------------------------------------------------------------------------------------------


class CharTokenizer:
    """Map each character of a fixed vocabulary to an integer id and back.

    ``encode(text)[i] == chars.index(text[i])`` and ``decode(encode(text)) == text``. Encoding
    uses a lookup table indexed by code point (``table[ord(c)] = id``, ``-1`` for characters not
    in the vocabulary) applied to the text's bytes with ``np.frombuffer``, so a 5 MB corpus
    encodes in milliseconds without a Python loop over characters.

    Args:
        chars: the vocabulary, id ``i`` being ``chars[i]``; every character at most once.

    Chapter: chapters/01-foundations.ipynb
    """

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise TypeError(f"chars must be a str, got {type(chars).__name__}")
        if not chars:
            raise DataError("chars must not be empty")
        dups = [c for c, n in Counter(chars).items() if n > 1]
        if dups:
            raise DataError(f"chars must be unique; repeated: {', '.join(map(repr, dups[:10]))}")
        self.chars = chars
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # (V,)
        table = np.full(max(256, int(self._codepoints.max()) + 1), -1, dtype=np.int32)
        table[self._codepoints] = np.arange(len(chars), dtype=np.int32)
        self._table = table  # code point -> id, -1 outside the vocabulary

    @classmethod
    def default(cls) -> "CharTokenizer":
        """The tokenizer over :data:`ASCII_VOCAB` (97 symbols) used by every corpus and task."""
        return cls(ASCII_VOCAB)

    @property
    def vocab_size(self) -> int:
        """Number of symbols V; ids run from 0 to V - 1."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text``: int32 array of shape ``(len(text),)``.

        Raises:
            ValueError: if ``text`` holds characters outside the vocabulary; the message names
                the first few (repr'd, with code point and position) and how to fix the text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if text.isascii():
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)  # (N,) one byte per char
        else:
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        n = len(self._table)  # >= 256, so any byte is a valid index
        if codes.dtype == np.uint8:
            ids = self._table[codes]  # (N,) int32, a fresh array
        else:
            ids = self._table[np.minimum(codes, n - 1)]  # (N,) int32
            ids[codes >= n] = -1  # code points beyond the table are never in the vocabulary
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            raise DataError(self._encode_error(text, bad))
        return ids

    def _encode_error(self, text: str, bad: np.ndarray) -> str:
        first: dict[str, int] = {}
        for i in bad.tolist():
            first.setdefault(text[i], i)
            if len(first) == 5:
                break
        named = ", ".join(f"{c!r} (U+{ord(c):04X}) at index {i}" for c, i in first.items())
        if self.chars == ASCII_VOCAB:
            allowed = "tab, newline and printable ASCII ' '..'~' (minilora.data.ASCII_VOCAB)"
        elif len(self.chars) <= 100:
            allowed = repr(self.chars)
        else:
            allowed = repr(self.chars[:100]) + f" ... ({len(self.chars)} in all)"
        return (f"cannot encode {bad.size} character(s) outside this tokenizer's "
                f"{self.vocab_size}-symbol vocabulary; first: {named}. Allowed: {allowed}. "
                "Clean the text first with minilora.data.fold_ascii(text), which maps curly "
                "quotes, dashes and accented letters to ASCII.")

    def decode(self, ids) -> str:
        """The text whose ids are ``ids`` (a 1-D integer sequence or array; a scalar is one id).

        Accepts NumPy arrays, lists and CuPy arrays (copied to the host first).

        Raises:
            ValueError: for an id outside ``0 .. vocab_size - 1`` or an array of 2+ dimensions.
        """

        a = np.asarray(to_numpy(ids))
        if a.ndim > 1:
            raise DataError(f"decode expects a 1-D sequence of ids, got shape {a.shape}; "
                             "decode each row separately")
        a = a.reshape(-1)
        if a.size == 0:
            return ""
        if a.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {a.dtype}")
        bad = np.flatnonzero((a < 0) | (a >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"id {int(a[i])} at position {i} is out of range: valid ids are "
                             f"0..{self.vocab_size - 1} ({bad.size} bad id(s) in all)")
        return self._codepoints[a].astype("<u4").tobytes().decode("utf-32-le")

    def to_dict(self) -> dict:
        """A JSON-safe description: ``{"type": "CharTokenizer", "chars": ...}``."""
        return {"type": "CharTokenizer", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CharTokenizer":
        """Rebuild a tokenizer from :meth:`to_dict` output (e.g. after a JSON round trip)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("chars"), str):
            raise DataError("expected a mapping with a string 'chars' entry, as made by "
                             f"CharTokenizer.to_dict(); got {d!r:.200}")
        if d.get("type", "CharTokenizer") != "CharTokenizer":
            raise DataError(f"not a CharTokenizer description: type={d.get('type')!r}")
        return cls(d["chars"])

    def __eq__(self, other) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        name = "ASCII_VOCAB" if self.chars == ASCII_VOCAB else repr(self.chars[:40])
        return f"CharTokenizer({name}, vocab_size={self.vocab_size})"


def encode_corpus(text: str, tokenizer: CharTokenizer | None = None) -> np.ndarray:
    """Encode a whole corpus: int32 array of shape ``(len(text),)``.

    Args:
        text: the corpus (e.g. ``load_shakespeare()["train"]``).
        tokenizer: defaults to ``CharTokenizer.default()`` (:data:`ASCII_VOCAB`).

    Chapter: chapters/01-foundations.ipynb
    """
    return (tokenizer or CharTokenizer.default()).encode(text)
