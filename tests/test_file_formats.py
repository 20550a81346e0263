"""Every kind of file committed in the repository still loads with today's reader.

The kinds: the shipped checkpoint (``minilora-checkpoint-v1``), a LoRA adapter
(``minilora-adapter-v1``, the Milton adapter chapter 05 reads), a QLoRA adapter
(``minilora-qlora-adapter-v1``) and a PEFT-method file (``minilora-peft-v1``, prompt tuning), the
last two kept under ``tests/data/formats/`` as written by earlier versions. All of them go through
one reader, :func:`minilora.io.read_typed`.
"""
import pathlib

import numpy as np
import pytest

from minilora.checkpoint import load_checkpoint
from minilora.experiments.paths import base_model_path
from minilora.io import CheckpointError, read_typed, write_typed
from minilora.methods.lora import load_adapter, lora_layers
from helpers import load_method
from minilora.methods.qlora import load_qlora_adapter

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORMATS = ROOT / "tests" / "data" / "formats"
LORA = ROOT / "chapters" / "assets" / "milton-lora" / "adapter.safetensors"


@pytest.fixture(scope="module")
def base():
    return load_checkpoint(base_model_path())


def test_shipped_checkpoint(base):
    model, tok, info = base
    assert info["format"] == "minilora-checkpoint-v1"
    assert model.num_parameters() == 1_928_000 and tok.vocab_size == 97


def test_lora_adapter_the_chapter_reads(base):
    model = load_checkpoint(base_model_path())[0]
    config = load_adapter(LORA, model)
    assert config.r == 8 and set(config.target_modules) == {"q", "v"}
    assert len(lora_layers(model)) == 12


def test_qlora_adapter_rebuilds_its_base():
    model, tok, config, quant = load_qlora_adapter(FORMATS / "qlora-adapter-v1.safetensors",
                                                   base_model_path())
    assert quant.quant_type == "nf4" and config.r == 8


def test_peft_method_file(base):
    model = load_checkpoint(base_model_path())[0]
    wrapped, config = load_method(FORMATS / "peft-v1-prompt.safetensors", model)
    assert type(config).__name__ == "PromptConfig"
    assert wrapped.num_parameters(trainable_only=True) == config.prompt_len * 160


def test_one_reader_refuses_the_wrong_kind_and_names_a_nonfinite_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="not a minilora adapter"):
        read_typed(base_model_path(), "minilora-adapter-v1", "adapter")
    path = tmp_path / "x.safetensors"
    write_typed(path, "minilora-adapter-v1", {"a": np.zeros(3, np.float32)}, {})
    data = bytearray(path.read_bytes())
    data[-4:] = np.array([np.nan], np.float32).tobytes()  # corrupt the last float in place
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor 'a' holds NaN or inf"):
        read_typed(path, "minilora-adapter-v1", "adapter")
    arrays, _ = read_typed(path, "minilora-adapter-v1", "adapter", allow_nonfinite=True)
    assert np.isnan(arrays["a"][-1])
