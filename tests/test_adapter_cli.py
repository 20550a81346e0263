"""`minilora adapter ...`, `minilora score` and `minilora sample --adapter`: runs and errors."""
import subprocess
import sys

import numpy as np
import pytest

from minilora import backend, cli
from minilora.checkpoint import load_checkpoint
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora import (
    inject_lora,
    load_adapter,
    lora_state_dict,
    read_adapter,
    save_adapter,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base checkpoint and two adapter files for it (random A and B)."""
    d = tmp_path_factory.mktemp("adapters")
    assert cli.main(["pretrain", "--preset", "tiny", "--max-steps", "1", "--out", str(d / "run"),
                     "--no-progress", "--export", str(d / "base.safetensors")]) == 0
    for seed, targets in ((1, ("q", "v")), (2, ("q", "v"))):
        m, _, _ = load_checkpoint(d / "base.safetensors")
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                         seed=seed)
        inject_lora(m, cfg)
        save_adapter(d / f"ad{seed}.safetensors", m, cfg)
    return d


@pytest.mark.parametrize("cmd", [["adapter"], ["adapter", "merge"], ["adapter", "export-peft"],
                                 ["adapter", "import-peft"], ["adapter", "claim"], ["score"]])
def test_help_has_examples(cmd):
    r = subprocess.run([sys.executable, "-m", "minilora.cli", *cmd, "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "example" in r.stdout


def test_merge_writes_a_checkpoint_equal_to_base_plus_adapter(files, rng):
    out = files / "merged.safetensors"
    assert cli.main(["adapter", "merge", str(files / "ad1.safetensors"), "--out", str(out),
                     "--base", str(files / "base.safetensors")]) == 0
    merged, _, info = load_checkpoint(out)
    assert info["extra"]["method"] == "lora" and info["extra"]["method_config"]["r"] == 2
    ref, _, _ = load_checkpoint(files / "base.safetensors")
    load_adapter(files / "ad1.safetensors", ref)
    idx = backend.asarray(rng.integers(0, ref.config.vocab_size, size=(2, 9)))
    np.testing.assert_allclose(backend.to_numpy(merged.forward(idx)[0]),
                               backend.to_numpy(ref.forward(idx)[0]), rtol=1e-5, atol=1e-5)


def test_export_then_import_peft_round_trips(files):
    peft = files / "peft"
    base = ["--base", str(files / "base.safetensors")]
    assert cli.main(["adapter", "export-peft", str(files / "ad2.safetensors"), "--out",
                     str(peft), *base]) == 0
    assert (peft / "adapter_model.safetensors").exists() and (peft / "adapter_config.json").exists()
    assert cli.main(["adapter", "import-peft", str(peft), "--out", str(files / "back.safetensors"),
                     *base]) == 0
    a, ca = read_adapter(files / "ad2.safetensors")
    b, cb = read_adapter(files / "back.safetensors")
    assert ca == cb and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_score_and_sample_with_several_adapters(files, capsys):
    ck = ["--ckpt", str(files / "base.safetensors")]
    ads = ["--adapter", str(files / "ad1.safetensors"), "--adapter", str(files / "ad2.safetensors")]
    assert cli.main(["score", *ads, "--task", "python", "--eval-batches", "1", "--batch-size",
                     "2", "--block-size", "16", *ck]) == 0
    out = capsys.readouterr().out
    assert "test loss" in out and all(k in out for k in ("ad1", "ad2", "base"))
    assert cli.main(["sample", *ads, "--prompt", "ROMEO:", "--max-new-tokens", "5", *ck]) == 0
    out = capsys.readouterr().out
    assert "=== ad1 ===\nROMEO:" in out and "=== ad2 ===\nROMEO:" in out
    # one adapter: the plain text, as without --adapter
    assert cli.main(["sample", "--adapter", str(files / "ad1.safetensors"), "--prompt", "AB",
                     "--max-new-tokens", "3", *ck]) == 0
    assert capsys.readouterr().out.startswith("AB")


@pytest.mark.parametrize("args, match", [
    (["score", "--adapter", "no/such.safetensors"], "does not exist"),
    (["score", "--adapter", "{ad1}"], "another base model"),  # tiny adapter, shipped base
    (["score", "--no-base", "--ckpt", "{base}"], "nothing to score"),
    (["sample", "--adapter", "no/such.safetensors"], "does not exist"),
    (["adapter", "merge", "{ad1}", "--out", "{new}/m.safetensors"], "another base model"),
    (["adapter", "merge", "no/such.safetensors", "--out", "{new}/m.safetensors"],
     "does not exist"),
    (["adapter", "export-peft", "{ad1}", "--out", "{new}"], "another base model"),
    (["adapter", "import-peft", "{new}", "--out", "{new}/a.safetensors"],
     "is not a directory (a PEFT adapter directory"),
    (["adapter", "import-peft", "{peftdir}", "--out", "{new}/a.safetensors"],
     "fewer layers"),
    (["adapter", "claim", "--tasks", "milton", "--out", "{new}"], "at least two"),
    (["adapter", "claim", "--tasks", "milton,poetry", "--out", "{new}"], "unknown task"),
])
def test_bad_input_exits_2_with_one_line(files, tmp_path, capsys, args, match):
    peftdir = files / "peft-for-error"
    if not peftdir.exists():  # a PEFT export of the tiny adapter, imported into the shipped base
        cli.main(["adapter", "export-peft", str(files / "ad1.safetensors"), "--out", str(peftdir),
                  "--base", str(files / "base.safetensors")])
    args = [a.replace("{ad1}", str(files / "ad1.safetensors"))
            .replace("{base}", str(files / "base.safetensors"))
            .replace("{peftdir}", str(peftdir)).replace("{new}", str(tmp_path / "new"))
            for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora: error:") and err.count("\n") == 1, err
    assert any(m in err for m in match.split("|")), err
    assert not (tmp_path / "new").exists()  # nothing written on bad input


def test_score_table_reuses_the_adapter_state_names(files):
    """The adapter file holds exactly lora_state_dict's names (what the registry reads)."""
    m, _, _ = load_checkpoint(files / "base.safetensors")
    cfg = load_adapter(files / "ad1.safetensors", m)
    arrays, _ = read_adapter(files / "ad1.safetensors")
    assert set(arrays) == set(lora_state_dict(m, cfg.bias))
