"""The shipped corpora: where they live, and readers that split them into train / held-out text.

What ships in the data directory (made once by ``data/make_data.sh``; origin, licence and the
exact commands in ``data/SOURCES.md``):

* ``shakespeare/<work>.txt``  42 plays and poems, modern spelling       -> :func:`load_shakespeare`
* ``milton/paradise_lost.txt`` the ten-book 1667 *Paradise Lost*        -> :func:`load_milton`
* ``vader/movie_reviews.tsv`` 10,605 rated movie-review sentences       -> :func:`load_sentiment`
* ``vader/vader_lexicon.txt`` 7,520 rated words and emoticons           -> :func:`load_lexicon`
* ``python_stdlib/<module>.py.txt`` 31 CPython 3.11.7 standard-library modules -> :func:`load_python_code`
  (stored as ``.py.txt`` so that no tool mistakes them for this project's code)

Every file is already folded to :data:`~minilora.data.text.ASCII_VOCAB` (tab, newline and
printable ASCII), so the readers only *check* that nothing outside the vocabulary slipped in;
nothing downloads at run time.

Chapter: chapters/01-foundations.ipynb
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from minilora.data.text import _OUTSIDE, DataError


class DataMissingError(DataError, FileNotFoundError):
    """The data directory or a shipped corpus file is missing."""

def data_dir() -> Path:
    """The folder holding the shipped corpora and base model: one rule, in this order.

    1. ``$MINILORA_DATA``, if that environment variable is set (it must be a directory);
    2. the copy installed with the package (``pip install .`` puts the repository's ``data/``
       inside the package as ``minilora/_shipped``);
    3. the repository's ``data/`` folder next to the package (a git checkout, ``pip install -e``).

    Returns:
        Path to an existing directory.

    Raises:
        DataMissingError: naming the path that was tried and how to fix it.

    Chapter: chapters/01-foundations.ipynb
    """
    env = os.environ.get("MINILORA_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataMissingError(f"MINILORA_DATA={env!r} is not a directory: point it at a copy of "
                            "the repository's data/ folder, or unset it to use the shipped copy")
        return path
    package = Path(__file__).resolve().parent.parent  # .../minilora
    for path in (package / "_shipped", package.parent / "data"):
        if (path / "SOURCES.md").is_file():
            return path
    raise DataMissingError(f"minilora's data directory was not found (tried {package / '_shipped'} and "
                    f"{package.parent / 'data'}). Install from a git checkout (`pip install .` "
                    "or `pip install -e .` copies or links data/), or set MINILORA_DATA to a copy "
                    "of the repository's data/ folder.")

def _read_checked(path: Path) -> str:
    """The text of ``path``, after checking it is already folded to ASCII_VOCAB."""
    text = path.read_text(encoding="utf-8")
    m = _OUTSIDE.search(text)
    if m:
        raise DataError(f"{path}: character {m.group()!r} (U+{ord(m.group()):04X}) at offset "
                         f"{m.start()} is outside ASCII_VOCAB. The shipped files are stored "
                         "pre-folded; regenerate data/ with data/make_data.sh, or pass the "
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
    suffix = pattern.lstrip("*")  # "*.py.txt" -> ".py.txt": a name is the file name without it
    paths = sorted((data_dir() / folder).glob(pattern))
    if not paths:
        raise DataMissingError(f"no {pattern} files in {data_dir() / folder}; "
                                "regenerate data/ with data/make_data.sh")
    names = [p.name[:-len(suffix)] for p in paths]
    unknown = sorted(held - set(names))
    if unknown:
        raise DataError(f"unknown {what}: {', '.join(map(repr, unknown))}. "
                         f"Available ({len(names)}): {', '.join(names)}")
    rest = "\n".join(_read_checked(p) for p, n in zip(paths, names) if n not in held)
    out = "\n".join(_read_checked(p) for p, n in zip(paths, names) if n in held)
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
        raise DataError("data/milton/paradise_lost.txt has no 'BOOK X.' heading line; "
                         "regenerate data/ with data/make_data.sh")
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
    train, test = _split_by_file("python_stdlib", "*.py.txt", test_modules, "module(s)")
    return {"train": train, "test": test}
