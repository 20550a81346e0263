"""``finetune --resume``: a run stopped after step k and resumed ends where the uninterrupted run
ends, loss for loss (bit-exact on NumPy), for LoRA and full fine-tuning."""
import json

import numpy as np
import pytest

from minilora import cli
from minilora.checkpoint import save_checkpoint
from minilora.config import GPTConfig
from minilora.data import CharTokenizer
from minilora.errors import UsageError
from minilora.experiments import finetune as ft
from minilora.io import read_typed
from minilora.model import GPT
from minilora.optim import NonFiniteError
from minilora.train import CKPT_NAME, METRICS_NAME

STEPS, KILL_AFTER = 6, 3
TRAIN = {"max_steps": STEPS, "batch_size": 2, "block_size": 16}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    tok = CharTokenizer.default()
    path = tmp_path_factory.mktemp("base") / "tiny.safetensors"
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(path, GPT(cfg, rng=0), tok)
    return path


def _run(method, base, out, **kw):
    return ft.finetune(method, "milton", None, dict(TRAIN), base_path=base, out_dir=out,
                       progress=False, eval_batches=1, measure_memory=False, save_every=2, **kw)


def _losses(out):
    recs = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "loss" in r]


def _kill_after(monkeypatch, k):
    """Make the harness's training loop raise KeyboardInterrupt (Ctrl-C) after step k."""
    real = ft.train

    def stop(step, rec):
        if step + 1 == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "train", lambda *a, **kw: real(*a, step_callback=stop, **kw))


@pytest.mark.parametrize("method, weights", [("lora", "adapter.safetensors"),
                                             ("full", "model.safetensors")])
def test_killed_then_resumed_equals_the_uninterrupted_run(tiny_base, tmp_path, monkeypatch,
                                                          method, weights):
    whole = _run(method, tiny_base, tmp_path / "whole")
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        _kill_after(m, KILL_AFTER)  # steps 0, 1, 2 ran; the last checkpoint is after 2 steps
        with pytest.raises(KeyboardInterrupt):
            _run(method, tiny_base, out)
    assert not (out / "result.json").exists()
    _, meta = read_typed(out / CKPT_NAME, None)
    assert meta["step"] == 2  # save_every=2: the last checkpoint before the kill
    resumed = _run(method, tiny_base, out, resume=True)
    assert _losses(out) == _losses(tmp_path / "whole")  # bit-exact, every step
    assert len(_losses(out)) == STEPS
    for key in ("task_metric", "shakespeare_loss", "forgetting", "trainable_params"):
        assert resumed[key] == whole[key], key
    a, _ = read_typed(out / weights, None)
    b, _ = read_typed(tmp_path / "whole" / weights, None)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


KILLED_CHILD = """
import os, signal, sys
from minilora.experiments import finetune as ft
real = ft.train
def kill(step, rec):
    if step + 1 == {k}:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no flush: a real kill
ft.train = lambda *a, **kw: real(*a, step_callback=kill, **kw)
from minilora import cli
sys.exit(cli.main({argv!r}))
"""


def test_cli_run_killed_by_sigkill_resumes_to_the_same_losses(tiny_base, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    argv = ["finetune", "--method", "lora", "--base", str(tiny_base), "--steps", str(STEPS),
            "--batch-size", "2", "--block-size", "16", "--eval-batches", "1", "--no-progress",
            "--save-every", "2"]
    assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    code = KILLED_CHILD.format(k=KILL_AFTER, argv=argv + ["--out", str(out)])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / CKPT_NAME).exists() and not (out / "result.json").exists()
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    assert _losses(out) == _losses(tmp_path / "whole")
    a = read_typed(out / "adapter.safetensors", None)[0]
    b = read_typed(tmp_path / "whole" / "adapter.safetensors", None)[0]
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_cli_resume_and_its_mistakes(tiny_base, tmp_path):
    out = tmp_path / "run"
    argv = ["finetune", "--method", "lora", "--base", str(tiny_base), "--steps", "4",
            "--batch-size", "2", "--block-size", "16", "--eval-batches", "1", "--no-progress",
            "--out", str(out), "--save-every", "2"]
    with pytest.raises(UsageError, match="cannot resume"):
        ft.finetune("lora", "milton", None, dict(TRAIN), base_path=tiny_base, out_dir=out,
                    resume=True)
    assert cli.main(argv) == 0
    first = _losses(out)
    assert cli.main(argv + ["--resume"]) == 0  # a finished run: nothing left to train
    assert _losses(out) == first
    assert cli.main(argv + ["--resume", "--lr", "0.5"]) == 2  # another config: refused


def test_resuming_another_run_is_refused_before_any_evaluation(tiny_base, tmp_path, monkeypatch):
    from minilora.io import CheckpointError

    _run("lora", tiny_base, tmp_path)

    def no_evaluation(*a, **kw):
        raise AssertionError("evaluated before the checkpoint was checked")

    monkeypatch.setattr(ft, "evaluate", no_evaluation)
    with pytest.raises(CheckpointError, match=r"training config differs .*'lr'"):
        ft.finetune("lora", "milton", None, {**TRAIN, "lr": 0.5}, base_path=tiny_base,
                    out_dir=tmp_path, progress=False, eval_batches=1, save_every=2, resume=True)


def test_nan_base_is_named_at_load_and_blamed_when_allowed(tiny_base, tmp_path):
    arrays, meta = read_typed(tiny_base, None)
    arrays["model.blocks.0.attn.q.weight"][0, 0] = np.nan
    from safetensors.numpy import save_file
    bad = tmp_path / "nan.safetensors"
    save_file(arrays, str(bad), metadata={"minilora": json.dumps(meta)})
    with pytest.raises(Exception, match="blocks.0.attn.q.weight"):
        _run("lora", bad, tmp_path / "a")
    with pytest.raises(NonFiniteError, match=r"starting weights .*blocks\.0\.attn\.q\.weight"
                                             r".*no checkpoint was saved yet"):
        _run("lora", bad, tmp_path / "b", allow_nonfinite=True)


def test_a_diverged_step_is_blamed_and_the_last_checkpoint_named(tmp_path):
    from minilora.config import TrainConfig
    from minilora.train import train

    tok = CharTokenizer.default()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                          n_embd=16), rng=0)
    cfg = TrainConfig(max_steps=5, batch_size=2, block_size=8, warmup_steps=0, eval_every=100,
                      eval_batches=1, ckpt_every=2, lr=1e-3, min_lr=1e-4)
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, 500)
    calls = []

    def fb(x, y):  # the fourth step's loss overflows; weights and batch stay finite
        calls.append(1)
        loss = model.forward_backward(x, y)
        return float("inf") if len(calls) == 4 else loss

    with pytest.raises(NonFiniteError, match=r"loss is inf at step 3: the step diverged at "
                       r"learning rate .*last good checkpoint is .*ckpt\.safetensors \(after 2 "
                       r"steps"):
        train(model, tok, ids, None, cfg, out_dir=tmp_path, progress=False, forward_backward=fb)
