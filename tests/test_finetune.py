"""The fine-tuning harness: LoRA and full fine-tuning from the shipped base, like for like."""
import json

import numpy as np
import pytest

from minilora.checkpoint import base_model_path, load_checkpoint
from minilora.config import LoraConfig, TrainConfig
from minilora.finetune import finetune
from minilora.lora import load_adapter

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


def test_full_and_lora_share_the_harness(tmp_path):
    full = finetune("full", "python", None, CFG, progress=False, eval_batches=2)
    assert full["trainable_params"] == full["total_params"] == 1_928_000
    assert full["task_loss"] != full["task_loss_base"]


@pytest.mark.parametrize("kw, match", [
    (dict(method="adapter"), "unknown method"),
    (dict(task="chess"), "unknown task"),
])
def test_bad_method_or_task(kw, match):
    with pytest.raises(ValueError, match=match):
        finetune(**dict(dict(train_config=CFG, progress=False), **kw))
