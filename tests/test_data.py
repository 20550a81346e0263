"""Tests for minilora.data: the tokenizer, folding, batches and every shipped corpus and split."""
import json
from collections import Counter

import numpy as np
import pytest

from minilora import data
from minilora.data import ASCII_VOCAB, CharTokenizer

TOK = CharTokenizer.default()


# --- vocabulary and tokenizer --------------------------------------------------------------------

def test_ascii_vocab_layout():
    assert len(ASCII_VOCAB) == 97 == len(set(ASCII_VOCAB))
    assert ASCII_VOCAB[:3] == "\t\n " and ASCII_VOCAB[-1] == "~"
    assert TOK.vocab_size == 97
    assert TOK.encode("A").tolist() == [ord("A") - 30]


def test_round_trip_and_dtype():
    text = "To be, or not to be:\tthat is the question.\n~{}|`"
    ids = TOK.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < TOK.vocab_size
    assert TOK.decode(ids) == text
    assert TOK.decode(ids.tolist()) == text
    assert TOK.encode("").shape == (0,) and TOK.decode([]) == ""


def test_custom_vocab_non_ascii_round_trip():
    tok = CharTokenizer("ab\u00e9\u20ac")
    assert tok.encode("\u20acab\u00e9").tolist() == [3, 0, 1, 2]
    assert tok.decode([3, 0, 1, 2]) == "\u20acab\u00e9"
    with pytest.raises(ValueError, match="'c'"):
        tok.encode("abc")


def test_encode_error_names_offending_characters():
    with pytest.raises(ValueError) as e:
        TOK.encode("caf\u00e9 \u2014 na\u00efve")
    msg = str(e.value)
    assert "'\u00e9'" in msg and "'\u2014'" in msg and "U+00E9" in msg
    assert "index 3" in msg
    assert "fold_ascii" in msg and "printable ASCII" in msg
    with pytest.raises(ValueError, match=r"'\\r'"):
        TOK.encode("line\r\n")


def test_decode_rejects_bad_ids():
    with pytest.raises(ValueError, match="97"):
        TOK.decode([0, 97])
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode(np.array([-1]))
    with pytest.raises(ValueError, match="1-D"):
        TOK.decode(np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(TypeError):
        TOK.decode(np.array([1.0, 2.0]))


def test_tokenizer_dict_round_trip_and_equality():
    d = TOK.to_dict()
    back = CharTokenizer.from_dict(json.loads(json.dumps(d)))
    assert back == TOK and hash(back) == hash(TOK)
    assert CharTokenizer("abc") != TOK
    with pytest.raises(ValueError):
        CharTokenizer.from_dict({"chars": 3})
    with pytest.raises(ValueError):
        CharTokenizer.from_dict({"type": "BPE", "chars": "ab"})


def test_tokenizer_rejects_duplicates_and_empty():
    with pytest.raises(ValueError, match="'a'"):
        CharTokenizer("abca")
    with pytest.raises(ValueError):
        CharTokenizer("")


# --- folding -------------------------------------------------------------------------------------

def test_fold_ascii_rules():
    f = data.fold_ascii
    assert f("\u2018hi\u2019 \u201cyo\u201d") == "'hi' \"yo\""
    assert f("a\u2013b\u2014c") == "a-b--c"
    assert f("\u00e6ther \u00a35 na\u00efve\u00a0caf\u00e9") == "aether L5 naive cafe"
    assert f("\u00b6 Verse") == " Verse"
    assert f("\u00bd \u2026 \ufb01") == "1/2 ... fi"
    assert f("\ufeffa\r\nb\rc\x1a") == "a\nb\nc"
    assert f("\u03c3 \u4e2d \U0001f600") == "? ? ?"
    plain = "already\tASCII\n"
    assert f(plain) is plain


def test_fold_ascii_output_always_encodes():
    # every Latin-1 and general-punctuation character folds into the vocabulary
    text = "".join(map(chr, range(0, 0x250))) + "".join(map(chr, range(0x2000, 0x2070)))
    TOK.encode(data.fold_ascii(text))


# --- data dir ------------------------------------------------------------------------------------

def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILORA_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    missing = tmp_path / "nope"
    monkeypatch.setenv("MINILORA_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="nope") as e:
        data.data_dir()
    assert "MINILORA_DATA" in str(e.value)


def test_loader_rejects_unfolded_file(monkeypatch, tmp_path):
    (tmp_path / "milton").mkdir()
    (tmp_path / "milton" / "paradise_lost.txt").write_text("BOOK X.\ncaf\u00e9\n", encoding="utf-8")
    monkeypatch.setenv("MINILORA_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="make_data.sh"):
        data.load_milton()


# --- shipped corpora -----------------------------------------------------------------------------

def _shipped_text_files():
    root = data.data_dir()
    return sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".tsv", ".py"))


def test_every_shipped_file_is_in_the_vocabulary():
    files = _shipped_text_files()
    assert len(files) >= 42 + 1 + 3 + 32
    total = 0
    for p in files:
        ids = TOK.encode(p.read_text(encoding="utf-8"))  # raises on any char outside ASCII_VOCAB
        total += ids.size
    assert total < 10_000_000


def test_shipped_size_under_budget():
    """Corpora under 10 MiB; the shipped base model (data/base_model/) under 10 MB on its own."""
    files = [p for p in data.data_dir().rglob("*") if p.is_file()]
    corpora = sum(p.stat().st_size for p in files if "base_model" not in p.parts)
    model = sum(p.stat().st_size for p in files if "base_model" in p.parts)
    assert corpora < 10 * 2**20
    assert 0 < model <= 10_000_000


def test_encode_corpus_matches_python_loop():
    text = data.load_milton()["test"][:5000]
    ids = data.encode_corpus(text)
    assert ids.tolist() == [ASCII_VOCAB.index(c) for c in text]


# --- Shakespeare ---------------------------------------------------------------------------------

def test_shakespeare_split():
    a = data.load_shakespeare()
    b = data.load_shakespeare()
    assert a == b
    assert set(a) == {"train", "val"}
    hamlet = (data.data_dir() / "shakespeare" / "hamlet.txt").read_text()
    tempest = (data.data_dir() / "shakespeare" / "tempest.txt").read_text()
    assert a["val"] == hamlet + "\n" + tempest
    assert hamlet not in a["train"] and "HAMLET, PRINCE OF DENMARK" not in a["train"]
    assert len(a["train"]) == 4_784_895 and len(a["val"]) == 272_384
    assert len(set(a["train"] + a["val"])) == 84
    assert len(list((data.data_dir() / "shakespeare").glob("*.txt"))) == 42


def test_shakespeare_other_split_and_unknown_play():
    s = data.load_shakespeare(val_plays="sonnets")
    assert s["val"] == (data.data_dir() / "shakespeare" / "sonnets.txt").read_text()
    assert len(s["train"]) + len(s["val"]) + 1 == 5_057_239 + 41
    with pytest.raises(ValueError) as e:
        data.load_shakespeare(val_plays=("hamlet", "hamlett"))
    assert "'hamlett'" in str(e.value) and "macbeth" in str(e.value)


# --- batches -------------------------------------------------------------------------------------

def test_get_batch_shapes_shift_and_determinism():
    ids = np.arange(1000, dtype=np.int32) % 97
    x, y = data.get_batch(ids, 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal((x + 1) % 97, y)  # each window is contiguous in ids
    x2, y2 = data.get_batch(ids, 8, 16, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = data.get_batch(ids, 8, 16, np.random.default_rng(1))
    assert not np.array_equal(x, x3)


def test_get_batch_reaches_last_token_and_short_corpus_error():
    ids = np.arange(5, dtype=np.int32)
    x, y = data.get_batch(ids, 4, 4, np.random.default_rng(0))  # exactly block_size + 1 tokens
    assert x.tolist() == [[0, 1, 2, 3]] * 4 and y.tolist() == [[1, 2, 3, 4]] * 4
    with pytest.raises(ValueError, match="block_size"):
        data.get_batch(ids, 2, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        data.get_batch(ids.reshape(1, 5), 2, 2, np.random.default_rng(0))


# --- fine-tuning tasks ---------------------------------------------------------------------------

def test_milton_split():
    m = data.load_milton()
    assert m["test"].startswith("BOOK X.")
    assert "BOOK IX." in m["train"] and "BOOK X." not in m["train"]
    assert 66_000 < len(m["test"]) < 70_000 and len(m["test"]) == 67_991
    assert len(m["train"]) == 397_080
    assert m["test"].rstrip().endswith("THE END.")


def test_sentiment_counts_and_split():
    s = data.load_sentiment()
    train, test = s["train"], s["test"]
    labels = Counter(lab for _, lab in train + test)
    assert labels == {"+": 4996, "-": 5076}
    assert len(train) == 8058 and len(test) == 2014
    assert Counter(lab for _, lab in test) == {"+": 999, "-": 1015}
    assert all("\t" not in t and "\n" not in t and t == t.strip() for t, _ in train + test)
    assert data.load_sentiment() == s
    assert data.load_sentiment(seed=1) != s
    assert Counter(lab for _, lab in data.load_sentiment(seed=1)["test"]) == {"+": 999, "-": 1015}
    for text, _ in test[:50]:
        TOK.encode(text)
    everything = data.load_sentiment(min_abs_score=0.0)
    assert len(everything["train"]) + len(everything["test"]) == 10_605 - 37  # 37 rated exactly 0


def test_lexicon_split():
    lex = data.load_lexicon()
    train, test = lex["train"], lex["test"]
    words = [w for w, _ in train + test]
    assert len(words) == len(set(words)) == 7209
    assert all(w.isalpha() and w.isascii() for w in words)
    assert Counter(lab for _, lab in train + test) == {"+": 3183, "-": 4026}
    assert len(test) == 1442 and not {w for w, _ in train} & {w for w, _ in test}
    assert dict(train + test)["good"] == "+" and dict(train + test)["sob"] == "-"
    assert data.load_lexicon() == lex


def test_python_split_by_module():
    py = data.load_python_code()
    folder = data.data_dir() / "python_stdlib"
    assert len(list(folder.glob("*.py.txt"))) == 31
    stats = (folder / "statistics.py.txt").read_text()
    assert stats in py["test"] and stats not in py["train"]
    assert (folder / "argparse.py.txt").read_text() in py["train"]
    assert len(py["train"]) == 805_683 and len(py["test"]) == 80_867
    for name in ("statistics", "textwrap", "shlex"):  # folding kept the snapshot valid Python
        compile((folder / f"{name}.py.txt").read_text(), name, "exec")
    with pytest.raises(ValueError, match="'numpy'"):
        data.load_python_code(test_modules=("numpy",))
