"""Checkpoints: round trip, atomic writes, and one clear error for every broken file."""
import os

import numpy as np
import pytest
from helpers import save_arrays

from minilora import checkpoint
from minilora.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minilora.config import GPTConfig
from minilora.data import CharTokenizer
from minilora.model import GPT

TOK = CharTokenizer.default()
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)


def test_round_trip_weights_config_tokenizer(tmp_path):
    m = GPT(CFG, rng=2)
    save_checkpoint(tmp_path / "a.safetensors", m, TOK, extra={"note": "hi"})
    m2, tok2, info = load_checkpoint(tmp_path / "a.safetensors")
    assert m2.config == CFG and tok2 == TOK and info["extra"] == {"note": "hi"}
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        np.testing.assert_array_equal(a, b, err_msg=n)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_checkpoint(p, GPT(CFG), TOK)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        load_checkpoint(p)


def test_wrong_shaped_tensor(tmp_path):
    m = GPT(CFG)
    arrays = {f"model.{n}": p for n, p in m.named_parameters()}
    arrays["model.lm_head.weight"] = np.zeros((3, 3), np.float32)
    meta = {"format": checkpoint.FORMAT, "model_config": CFG.to_dict(), "tokenizer": TOK.to_dict()}
    save_arrays(tmp_path / "w.safetensors", arrays, meta)
    with pytest.raises(CheckpointError, match=r"lm_head.weight.*shape"):
        load_checkpoint(tmp_path / "w.safetensors")


def test_missing_tensor_and_bad_config(tmp_path):
    m = GPT(CFG)
    arrays = {f"model.{n}": p for n, p in m.named_parameters() if n != "ln_f.bias"}
    meta = {"format": checkpoint.FORMAT, "model_config": CFG.to_dict(), "tokenizer": TOK.to_dict()}
    save_arrays(tmp_path / "m.safetensors", arrays, meta)
    with pytest.raises(CheckpointError, match="missing.*ln_f.bias"):
        load_checkpoint(tmp_path / "m.safetensors")
    bad = dict(meta, model_config=dict(CFG.to_dict(), n_head=3))
    save_arrays(tmp_path / "c.safetensors", dict(arrays), bad)
    with pytest.raises(CheckpointError, match="divisible"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_refuses_to_save_nan_and_leaves_old_file(tmp_path):
    p = tmp_path / "k.safetensors"
    m = GPT(CFG)
    save_checkpoint(p, m, TOK)
    before = p.read_bytes()
    m.lm_head.params["weight"][0, 0] = np.nan
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(p, m, TOK)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["k.safetensors"]  # no temp file left


def test_a_crash_mid_write_keeps_the_last_good_file(tmp_path, monkeypatch):
    p = tmp_path / "k.safetensors"
    save_checkpoint(p, GPT(CFG, rng=0), TOK)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(p, GPT(CFG, rng=1), TOK)
    assert p.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["k.safetensors"]


def test_tokenizer_vocab_mismatch(tmp_path):
    m = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(tmp_path / "v.safetensors", m, TOK)
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_checkpoint(tmp_path / "v.safetensors")
