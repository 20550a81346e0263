"""Training loop: resume reproduces the uninterrupted run bit for bit; NaN stops cleanly."""
import json

import numpy as np
import pytest
from helpers import load_arrays

from minilora.checkpoint import load_checkpoint
from minilora.config import GPTConfig, TrainConfig
from minilora.data import CharTokenizer
from minilora.model import GPT
from minilora.optim import AdamW, NonFiniteError, lr_at
from minilora.train import CKPT_NAME, METRICS_NAME, train

TOK = CharTokenizer.default()
MCFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)


def _corpus(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    return rng.integers(0, TOK.vocab_size, size=n).astype(np.int32)


def _cfg(**kw):
    base = dict(max_steps=12, batch_size=4, block_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                eval_every=4, eval_batches=2, ckpt_every=4, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(500, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_resume_reproduces_the_uninterrupted_loss_curve_bit_for_bit(tmp_path):
    ids, val = _corpus(0), _corpus(1, 500)
    full = train(GPT(MCFG, rng=0), TOK, ids, val, _cfg(), out_dir=tmp_path / "full", progress=False)

    # "crash" after step 8: run only 8 steps with the same config, then resume to 12
    part_dir = tmp_path / "part"
    cfg = _cfg()
    model = GPT(MCFG, rng=0)
    with pytest.raises(KeyboardInterrupt):
        def stop(step, rec):
            if step == 9:  # checkpoint of step 8 is on disk; steps 8-9 are lost
                raise KeyboardInterrupt
        train(model, TOK, ids, val, cfg, out_dir=part_dir, progress=False, step_callback=stop)
    _, meta = load_arrays(part_dir / CKPT_NAME)
    assert meta["step"] == 8
    resumed = train(GPT(MCFG, rng=123), TOK, ids, val, cfg, out_dir=part_dir, resume=True,
                    progress=False)
    assert [r["loss"] for r in resumed.train] == [r["loss"] for r in full.train]  # exact equality
    assert [r["val_loss"] for r in resumed.val] == [r["val_loss"] for r in full.val]
    a, _, _ = load_checkpoint(tmp_path / "full" / CKPT_NAME)
    b, _, _ = load_checkpoint(part_dir / CKPT_NAME)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa, pb, err_msg=n)
    # the metrics file holds each step exactly once after the resume
    steps = [json.loads(l)["step"] for l in (part_dir / METRICS_NAME).read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(12))


def test_resume_with_a_different_config_is_refused(tmp_path):
    ids = _corpus(0)
    train(GPT(MCFG, rng=0), TOK, ids, None, _cfg(max_steps=4), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="differs"):
        train(GPT(MCFG, rng=0), TOK, ids, None, _cfg(max_steps=4, lr=1e-2), out_dir=tmp_path,
              resume=True, progress=False)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    ids = _corpus(0)
    model = GPT(MCFG, rng=0)

    def poison(step, rec):
        if step == 5:  # after the step-4 checkpoint, break the weights
            model.lm_head.params["weight"][...] = np.nan

    with pytest.raises(NonFiniteError, match="last good checkpoint"):
        train(model, TOK, ids, None, _cfg(max_steps=12), out_dir=tmp_path, progress=False,
              step_callback=poison)
    good, _, info = load_checkpoint(tmp_path / CKPT_NAME)
    assert info["step"] == 4
    assert all(np.isfinite(p).all() for _, p in good.named_parameters())


def test_adamw_refuses_non_finite_gradients_without_touching_parameters():
    model = GPT(MCFG, rng=0)
    idx = _corpus(0, 32).reshape(2, 16)
    model.forward_backward(idx, idx)
    model.lm_head.grads["weight"][0, 0] = np.inf
    before = model.lm_head.params["weight"].copy()
    with pytest.raises(NonFiniteError):
        AdamW(model).step(grad_clip=1.0)
    np.testing.assert_array_equal(model.lm_head.params["weight"], before)


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    text = "to be or not to be, that is the question. " * 200
    ids = TOK.encode(text)
    hist = train(GPT(MCFG, rng=0), TOK, ids, ids[:600], _cfg(max_steps=60, ckpt_every=60,
                                                               eval_every=30), out_dir=tmp_path,
                 progress=False)
    assert hist.val[-1]["val_loss"] < hist.val[0]["val_loss"] < np.log(TOK.vocab_size)
    assert hist.val[-1]["val_loss"] < 0.6 * np.log(TOK.vocab_size)  # well below uniform guessing
    recs = [json.loads(l) for l in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert sum("val_loss" in r for r in recs) == 2 and sum("loss" in r for r in recs) == 60
