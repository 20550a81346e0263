"""Sampling (sample.py): the next-token distribution, the seeded draw, generation with and
without the KV cache, the progress bar, and clear errors for bad arguments."""
import numpy as np
import pytest
from helpers import np_

from minilora import backend
from minilora.config import GPTConfig
from minilora.data import CharTokenizer
from minilora.errors import MiniloraError, UsageError
from minilora.model import GPT
from minilora.sample import (
    _draw,
    generate,
    next_token_probs,
    probs_from_logits,
    sample_text,
)

TOK = CharTokenizer.default()
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=12, n_layer=2, n_head=2, n_embd=16,
                init_std=0.5)


@pytest.fixture(scope="module")
def model():
    return GPT(CFG, 0, dtype="float64")


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_probs_are_the_tempered_softmax_restricted_to_top_k(rng):
    z = rng.standard_normal((3, 10)) * 3
    np.testing.assert_allclose(probs_from_logits(z, 0.5), softmax(z / 0.5), rtol=1e-12)
    p = probs_from_logits(z, 0.7, top_k=3)
    assert ((p > 0).sum(axis=1) == 3).all()
    for row, zr in zip(p, z):
        top = np.argsort(zr)[-3:]
        np.testing.assert_allclose(row[top], softmax(zr[top] / 0.7), rtol=1e-12)
    np.testing.assert_allclose(probs_from_logits(z, 1.0, top_k=10), softmax(z), rtol=1e-12)


def test_next_token_probs_reads_the_last_position_of_the_cropped_context(model, rng):
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(2, 20)))
    ref = softmax(np_(model.forward(idx[:, -12:])[0])[:, -1])
    np.testing.assert_allclose(next_token_probs(model, idx), ref, rtol=1e-12)


def test_the_draw_follows_the_distribution():
    p = np.tile([[0.1, 0.6, 0.0, 0.3]], (20_000, 1))
    ids = _draw(p, np.random.default_rng(0))
    freq = np.bincount(ids, minlength=4) / len(ids)
    np.testing.assert_allclose(freq, p[0], atol=0.01)  # 20k draws: std <= 0.0035
    assert freq[2] == 0.0


def test_generate_keeps_the_prompt_and_is_seeded(model, rng):
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(2, 4)))
    a = np_(generate(model, idx, 10, rng=3))
    assert a.shape == (2, 14) and (a[:, :4] == np_(idx)).all()
    np.testing.assert_array_equal(a, np_(generate(model, idx, 10, rng=3)))
    assert not np.array_equal(a, np_(generate(model, idx, 10, rng=4)))
    assert np_(generate(model, idx, 0)).tolist() == np_(idx).tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_k_1_is_greedy_decoding(model, use_cache):
    """The argmax path, computed here by full forward passes on the cropped context, past
    block_size too (the exact window)."""
    ids = list(TOK.encode("ROMEO:"))
    out = np_(generate(model, backend.asarray(np.array([ids])), 15, top_k=1,
                       use_cache=use_cache, exact_window=use_cache))[0]
    for _ in range(15):
        ctx = backend.asarray(np.array([ids[-12:]]))
        ids.append(int(np.argmax(np_(model.forward(ctx)[0])[0, -1])))
    assert out.tolist() == ids


def test_sample_text_returns_prompt_and_continuation(model):
    text = sample_text(model, TOK, "KING:", max_new_tokens=7, seed=1)
    assert text.startswith("KING:") and len(text) == 5 + 7
    assert text == sample_text(model, TOK, "KING:", max_new_tokens=7, seed=1, use_cache=False)


def test_sample_text_streams_each_character(model):
    parts = []
    text = sample_text(model, TOK, "KING:", max_new_tokens=20, seed=1, stream=parts.append)
    assert len(parts) == 20 and "KING:" + "".join(parts) == text


def test_progress_bar_on_stderr_only_when_asked(model, capsys):
    idx = backend.asarray(np.array([[1, 2, 3]]))
    generate(model, idx, 5, progress=False)
    generate(model, idx, 5)  # default: only on a terminal (pytest's stderr is not one)
    assert capsys.readouterr().err == ""
    generate(model, idx, 5, progress=True)
    captured = capsys.readouterr()
    assert "generating" in captured.err and captured.out == ""


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0), "temperature must be a number > 0"),
    (dict(temperature="hot"), "temperature must be a number > 0"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(top_k=2.5), "top_k must be a positive integer"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 0"),
    (dict(use_cache=False, keep=3), "keep sets how a KV cache slides"),
    (dict(keep=12), "keep .* must be 'half' or an integer in \\[0, 11\\]"),
    (dict(keep=3, exact_window=True), "keep and exact_window both set"),
])
def test_bad_arguments_are_clear_errors(model, kw, match):
    args = {"max_new_tokens": 3, **kw}
    with pytest.raises(MiniloraError, match=match):
        generate(model, backend.asarray(np.array([[1, 2]])), **args)


def test_prompt_and_model_errors(model):
    with pytest.raises(UsageError, match="at least one character"):
        sample_text(model, TOK, "")
    with pytest.raises(MiniloraError):
        sample_text(model, TOK, "caf\u00e9\u2603")  # outside the 97-symbol vocabulary

    class NoCache:
        config = CFG

        def forward(self, idx, check=True):
            return model.forward(idx, check=check)

    idx = backend.asarray(np.array([[1, 2]]))
    with pytest.raises(UsageError, match="NoCache has no kv_cache"):
        generate(NoCache(), idx, 2)
    np.testing.assert_array_equal(np_(generate(NoCache(), idx, 4, use_cache=False, rng=2)),
                                  np_(generate(model, idx, 4, rng=2)))
