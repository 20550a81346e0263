"""Model sizes: for ``minilora pretrain --preset`` and the bench's configs.

Each preset is ``{"model": GPTConfig fields, "train": TrainConfig fields}``.
"""
from __future__ import annotations

PRESETS = {
    # the shipped base model: 1,928,000 parameters (7.7 MB float32); see data/SOURCES.md
    "base": dict(model=dict(block_size=256, n_layer=6, n_head=5, n_embd=160),
                 train=dict(max_steps=3000, batch_size=16, block_size=256, lr=2e-3, min_lr=1e-4,
                            warmup_steps=100, weight_decay=0.1, eval_every=250, eval_batches=40,
                            ckpt_every=250)),
    # a few seconds on a laptop: for trying the CLI and for tests
    "tiny": dict(model=dict(block_size=64, n_layer=2, n_head=2, n_embd=32),
                 train=dict(max_steps=50, batch_size=8, block_size=64, lr=3e-3, min_lr=3e-4,
                            warmup_steps=5, eval_every=25, eval_batches=4, ckpt_every=25)),
    # the benchmark configs of the Foundation issue
    "small": dict(model=dict(block_size=128, n_layer=4, n_head=4, n_embd=128),
                  train=dict(max_steps=1000, batch_size=16, block_size=128)),
    "medium": dict(model=dict(block_size=256, n_layer=6, n_head=8, n_embd=256),
                   train=dict(max_steps=1000, batch_size=8, block_size=256)),
}
