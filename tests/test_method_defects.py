"""Issue 19's four user-visible defects, each as a user meets it on the command line."""
import json

import numpy as np
import pytest

from minilora import backend, cli
from minilora.checkpoint import load_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora import inject_lora, read_adapter, save_adapter
from minilora.nn.modules_to_save import add_modules_to_save

TINY = ["--steps", "1", "--batch-size", "1", "--block-size", "16", "--eval-batches", "1",
        "--no-progress"]


def _finetune(tmp_path, *argv):
    out = tmp_path / "run"
    assert cli.main(["finetune", *argv, *TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "result.json").read_text())


def test_dora_takes_the_lora_flags(tmp_path):
    out, r = _finetune(tmp_path, "--method", "dora", "--r", "4", "--alpha", "8", "--targets",
                       "q,k", "--dropout", "0.1")
    _, config = read_adapter(out / r["weights_file"])
    assert (config.r, config.lora_alpha, config.target_modules, config.lora_dropout,
            config.use_dora) == (4, 8.0, ("q", "k"), 0.1, True)


def test_adalora_takes_alpha_targets_and_dropout(tmp_path):
    _, r = _finetune(tmp_path, "--method", "adalora", "--alpha", "10", "--targets", "q,k,o",
                     "--dropout", "0.05", "--init-r", "4", "--target-r", "2")
    c = r["method_config"]
    assert (c["lora_alpha"], c["target_modules"], c["lora_dropout"], c["init_r"],
            c["target_r"]) == (10.0, ["q", "k", "o"], 0.05, 4, 2)


@pytest.mark.parametrize("argv, flag", [(["--method", "adalora", "--r", "4"], "--r"),
                                        (["--method", "bitfit", "--alpha", "4"], "--alpha"),
                                        (["--method", "lora", "--init-r", "4"], "--init-r")])
def test_a_flag_the_method_has_no_field_for_is_refused(tmp_path, capsys, argv, flag):
    assert cli.main(["finetune", *argv, *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minilora: error:") and flag in err and len(err.splitlines()) == 1


@pytest.fixture
def base_with_head(tmp_path):
    """A tiny base and a LoRA adapter file whose lm_head trained whole (modules_to_save)."""
    assert cli.main(["pretrain", "--preset", "tiny", "--max-steps", "1", "--out",
                     str(tmp_path / "pre"), "--no-progress", "--export",
                     str(tmp_path / "base.safetensors")]) == 0
    m, _, _ = load_checkpoint(tmp_path / "base.safetensors")
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v"), init_lora_weights=False, seed=1)
    inject_lora(m, cfg)
    add_modules_to_save(m, ("lm_head",))
    rng = np.random.default_rng(0)
    head = m.lm_head.params["weight"]
    head += backend.asarray(rng.normal(0, 0.5, head.shape), dtype=head.dtype)
    save_adapter(tmp_path / "ad.safetensors", m, cfg, ("lm_head",))
    idx = backend.asarray(rng.integers(0, m.config.vocab_size, (2, 12)))
    return tmp_path, m, idx


def test_export_and_import_peft_move_the_saved_head(base_with_head):
    d, m, idx = base_with_head
    want = backend.to_numpy(m.forward(idx)[0])
    base = str(d / "base.safetensors")
    assert cli.main(["adapter", "export-peft", str(d / "ad.safetensors"), "--out",
                     str(d / "peft"), "--base", base]) == 0
    peft_cfg = json.loads((d / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["modules_to_save"] == ["lm_head"]
    assert cli.main(["adapter", "import-peft", str(d / "peft"), "--out", str(d / "back.safetensors"),
                     "--base", base]) == 0
    arrays, _ = read_adapter(d / "back.safetensors")
    assert "lm_head.modules_to_save.default.weight" in arrays
    m2, _, _ = load_checkpoint(base)
    from minilora.methods.lora import load_adapter
    load_adapter(d / "back.safetensors", m2)
    np.testing.assert_allclose(backend.to_numpy(m2.forward(idx)[0]), want, rtol=1e-5, atol=1e-5)


def _adalora_model(rank_zero_layer=True):
    from minilora.config import GPTConfig
    from minilora.methods.adalora import ADALORA, AdaLoraConfig
    from minilora.model import GPT
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), rng=0,
              dtype="float64")
    cfg = AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, target_modules=("q", "v"),
                        total_step=10)
    (alloc,) = ADALORA.apply(gpt, cfg).callbacks   # the rank allocator (a training callback)
    rng = np.random.default_rng(1)
    for name, layer in alloc.layers.items():
        layer.params["lora_E"][...] = backend.asarray(rng.normal(size=(3, 1)))
    pattern = {n: [True, False, True] for n in alloc.layers}
    if rank_zero_layer:
        pattern["blocks.0.attn.q"] = [False, False, False]
    return gpt, alloc, cfg, pattern


def test_adalora_layer_at_rank_zero_imports_runs_and_round_trips(tmp_path):
    from minilora.methods.adalora import export_adalora_peft, import_adalora_peft
    from minilora.config import GPTConfig
    from minilora.model import GPT
    gpt, alloc, cfg, pattern = _adalora_model()
    for name, keep in pattern.items():
        alloc.layers[name].params["lora_E"] *= backend.asarray(
            np.asarray(keep, dtype=float)[:, None])
    idx = backend.asarray(np.random.default_rng(2).integers(0, 11, (2, 8)))
    want = backend.to_numpy(gpt.forward(idx)[0])
    export_adalora_peft(tmp_path / "a", gpt, cfg, pattern)
    fresh = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), rng=0,
                dtype="float64")
    cfg2, ranks = import_adalora_peft(tmp_path / "a", fresh)
    assert ranks["blocks.0.attn.q"] == 0 and ranks["blocks.0.attn.v"] == 2
    logits, cache = fresh.forward(idx)
    np.testing.assert_allclose(backend.to_numpy(logits), want, rtol=1e-10, atol=1e-12)
    fresh.zero_grad()
    fresh.backward(backend.asarray(np.ones(logits.shape)), cache)    # the backward runs too
    export_adalora_peft(tmp_path / "b", fresh, cfg2)                  # re-export, read back
    again = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), rng=0,
                dtype="float64")
    _, ranks2 = import_adalora_peft(tmp_path / "b", again)
    assert ranks2 == ranks
    np.testing.assert_allclose(backend.to_numpy(again.forward(idx)[0]), want, rtol=1e-10,
                               atol=1e-12)


def test_finetune_help_names_every_method(capsys):
    from minilora.experiments.methods import METHODS
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    line = top[top.index(" finetune "):top.index(" results ")]   # its one-line summary
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    out = capsys.readouterr().out
    epilog = out[out.index("examples:"):]
    for m in METHODS:
        assert m in line and f"--method {m}" in epilog, m


def test_task_choices_come_from_tasks(monkeypatch):
    from minilora.experiments import tasks
    monkeypatch.setitem(tasks.TASKS, "toy", tasks.TASKS["milton"]._replace(name="toy"))
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("finetune", "score"):
        task = next(a for a in sub[command]._actions if a.dest == "task")
        assert list(task.choices) == list(tasks.TASKS), command
