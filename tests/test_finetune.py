"""The fine-tuning harness: LoRA and full fine-tuning from the shipped base, like for like."""
import json

import numpy as np
import pytest

from minilora.checkpoint import load_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.config import TrainConfig
from minilora.experiments.finetune import finetune
from minilora.experiments.paths import base_model_path
from minilora.methods.lora import load_adapter

CFG = TrainConfig(max_steps=3, batch_size=2, block_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=1,
                  eval_every=3, eval_batches=2, ckpt_every=10**9)


def test_lora_finetune_trains_only_the_factors_and_saves_a_small_adapter(tmp_path):
    r = finetune("lora", "milton", LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v")), CFG,
                 out_dir=tmp_path, progress=False, eval_batches=2)
    n_layer, C = 6, 160
    assert r["trainable_params"] == n_layer * 2 * (2 * C * 2)  # q and v: r (d_in + d_out) each
    assert r["total_params"] == 1_928_000 + r["trainable_params"]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["forgetting"] == pytest.approx(saved["shakespeare_loss"] - saved["shakespeare_loss_base"])
    assert (tmp_path / "adapter.safetensors").stat().st_size < 100_000  # the adapter, not the base
    # the saved adapter reproduces the fine-tuned model on a fresh base
    base, tok, _ = load_checkpoint(base_model_path())
    model, _, _ = load_checkpoint(base_model_path())
    load_adapter(tmp_path / "adapter.safetensors", model)
    idx = tok.encode("Of Man's first disobedience")[None, :]
    tuned, plain = model.forward(idx)[0], base.forward(idx)[0]
    assert np.isfinite(tuned).all() and not np.allclose(tuned, plain)  # the adapter acts


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
def test_full_and_lora_share_the_harness(tmp_path):
    full = finetune("full", "python", None, CFG, progress=False, eval_batches=2)
    assert full["trainable_params"] == full["total_params"] == 1_928_000
    assert full["task_loss"] != full["task_loss_base"]


@pytest.mark.parametrize("kw, match", [
    (dict(method="vera"), "unknown method"),
    (dict(task="chess"), "unknown task"),
])
def test_bad_method_or_task(kw, match):
    with pytest.raises(ValueError, match=match):
        finetune(**dict(dict(train_config=CFG, progress=False), **kw))


def test_encode_classification_scores_only_the_label_position():
    from minilora.data import CharTokenizer, encode_classification
    tok = CharTokenizer.default()
    X, Y = encode_classification([("good film", "+"), ("x" * 40, "-")], tok, 16)
    assert X.shape == Y.shape == (2, 16)
    assert tok.decode(X[0]) == "\n" * 6 + "good film\t"  # left-padded with newlines
    assert tok.decode(X[1]) == "x" * 15 + "\t"  # cut to the last block_size characters
    assert (Y[:, :-1] == -1).all() and tok.decode(Y[:, -1]) == "+-"


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
def test_sentiment_task_reports_accuracy_and_forgetting():
    cfg = TrainConfig(max_steps=2, batch_size=2, block_size=32, lr=1e-3, min_lr=1e-4,
                      warmup_steps=1, eval_every=2, eval_batches=2, ckpt_every=10**9)
    r = finetune("lora", "sentiment", None, cfg, progress=False, eval_batches=2, eval_examples=20)
    assert r["metric"] == "test accuracy" and r["test_examples"] == 20
    assert 0.0 <= r["accuracy_base"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert r["accuracy"] * 20 == pytest.approx(round(r["accuracy"] * 20))  # a count of 20
    assert np.isfinite(r["forgetting"])


def test_label_position_training_learns_an_easy_rule():
    """The classification machinery (rows, ignored targets, accuracy) learns a trivially
    learnable rule: the label is '+' iff the text starts with 'good'."""
    from minilora.config import GPTConfig
    from minilora.data import CharTokenizer, encode_classification, sample_rows
    from minilora.experiments.tasks import classification_accuracy
    from minilora.model import GPT
    from minilora.train import train

    tok = CharTokenizer.default()
    rng = np.random.default_rng(0)
    words = ["film", "plot", "cast", "score", "script"]
    pairs = [(f"{'good' if i % 2 else 'poor'} {rng.choice(words)}", "+" if i % 2 else "-")
             for i in range(64)]
    X, Y = encode_classification(pairs, tok, 16)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                          n_embd=32), rng=0)
    cfg = TrainConfig(max_steps=80, batch_size=16, block_size=16, lr=3e-3, min_lr=3e-4,
                      warmup_steps=5, eval_every=80, eval_batches=1, ckpt_every=10**9)
    train(model, tok, None, None, cfg, progress=False,
          batch_fn=lambda g: sample_rows(X, Y, 16, g))
    assert classification_accuracy(model, X, Y) == 1.0


def test_encode_classification_lm_targets_cover_the_text_only():
    from minilora.data import CharTokenizer, encode_classification
    tok = CharTokenizer.default()
    X, Y = encode_classification([("good film", "+")], tok, 16, lm_targets=True)
    assert tok.decode(X[0]) == "\n" * 6 + "good film\t"
    assert (Y[0, :6] == -1).all()  # the padding is not scored
    assert tok.decode(Y[0, 6:]) == "ood film\t+"  # next characters, then the label


def test_label_lm_loss_gradient_matches_finite_differences():
    """L = CE(label) + w * CE(text), each a mean over its own positions (float64 gradcheck)."""
    from minilora import gradcheck
    from minilora.config import GPTConfig
    from minilora.data import CharTokenizer, encode_classification
    from minilora.experiments.tasks import label_lm_forward_backward
    from minilora.model import GPT
    from minilora.nn import ops

    tok = CharTokenizer.default()
    X, Y = encode_classification([("a fine film", "+"), ("dull", "-")], tok, 8, lm_targets=True)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2,
                          n_embd=8), rng=0, dtype="float64")
    w = 0.7

    def loss():
        logits, _ = model.forward(X)
        label, _ = ops.cross_entropy_forward(logits[:, -1:], Y[:, -1:])
        text, _ = ops.cross_entropy_forward(logits[:, :-1], Y[:, :-1])
        return float(label) + w * float(text)

    label_loss = label_lm_forward_backward(model, X, Y, w)
    assert label_loss == pytest.approx(float(ops.cross_entropy_forward(
        model.forward(X)[0][:, -1:], Y[:, -1:])[0]))
    for name in ("lm_head.weight", "blocks.0.attn.v.weight", "wte.weight"):
        mod, key = model, name
        *path, key = name.split(".")
        for p in path:
            mod = mod.children[p]
        r = gradcheck.check(name, mod.grads[key].copy(), loss, mod.params[key])
        assert r["ok"], r


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
def test_sentiment_recipe_is_the_default_and_the_label_only_loss_stays_available():
    from minilora.experiments.finetune import default_lora_config
    from minilora.experiments.tasks import TASKS
    cfg = TrainConfig(max_steps=2, batch_size=2, block_size=32, lr=1e-3, min_lr=1e-4,
                      warmup_steps=1, eval_every=2, eval_batches=2, ckpt_every=10**9)
    r = finetune("lora", "sentiment", None, cfg, progress=False, eval_batches=2, eval_examples=20,
                 measure_memory=False)
    recipe = TASKS["sentiment"].recipe
    assert r["lm_weight"] == recipe["lm_weight"] == 1.0
    assert tuple(r["method_config"]["target_modules"]) == recipe["lora_targets"]
    assert r["chance_baseline"] == 0.5 and 0.5 <= r["majority_baseline"] <= 1.0
    assert default_lora_config("milton").target_modules == ("q", "v")
    r0 = finetune("full", "sentiment", None, dict(max_steps=2, batch_size=2, block_size=32),
                  progress=False, eval_batches=2, eval_examples=20, measure_memory=False,
                  lm_weight=0.0)
    assert r0["lm_weight"] == 0.0 and r0["train_config"]["max_steps"] == 2
    with pytest.raises(ValueError, match="classification"):
        finetune("lora", "milton", None, CFG, progress=False, lm_weight=1.0)


@pytest.mark.slow  # an end-to-end run; CI runs -m slow
def test_lexicon_task_and_forgetting_windows_independent_of_the_batch_shape():
    """The word-polarity task runs on its own rows; forgetting uses the same 8 x 128 Shakespeare
    windows whatever the task's batch, so runs of different tasks compare."""
    cfg = dict(max_steps=2, batch_size=2, block_size=16)
    r = finetune("lora", "lexicon", None, cfg, progress=False, eval_batches=2, eval_examples=20,
                 measure_memory=False)
    s = finetune("lora", "sentiment", None, dict(cfg, block_size=32), progress=False,
                 eval_batches=2, eval_examples=20, measure_memory=False)
    assert r["task"] == "lexicon" and r["test_examples"] == 20
    assert r["train_config"]["block_size"] == 16
    assert r["shakespeare_loss_base"] == s["shakespeare_loss_base"]
