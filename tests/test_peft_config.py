"""minilora.peft_format: PEFT's adapter_config.json read with every field checked, and the
directory read and written in one place (used by every method's import/export and by analysis)."""
import json

import numpy as np
import pytest

from minilora.analysis import read_peft_adapter
from minilora.analysis.safetensors_lazy import AdapterFileError
from minilora.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PeftFormatError,
    check_peft_config,
    from_peft_module,
    lora_scaling,
    peft_config,
    read_peft_config,
    read_peft_dir,
    take_saved_modules,
    to_peft_module,
    write_peft_dir,
)

GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "modules_to_save": None, "rank_pattern": {}, "base_model_name_or_path": None}


@pytest.mark.parametrize("field, value, what", [
    ("r", None, "r must be an integer >= 1, got null"),
    ("r", 0, "r must be an integer >= 1, got 0"),
    ("r", "4", "r must be an integer >= 1, got '4'"),
    ("r", True, "r must be an integer >= 1, got true"),
    ("lora_alpha", None, "lora_alpha must be a finite number, got null"),
    ("lora_dropout", 1.0, "lora_dropout must be a number in [0, 1), got 1.0"),
    ("use_rslora", "yes", "use_rslora must be true or false, got 'yes'"),
    ("bias", "some", "bias must be 'none', 'all' or 'lora_only', got 'some'"),
    ("modules_to_save", "lm_head", "modules_to_save must be a list of module names or null"),
    ("target_modules", 3, "target_modules must be a module name, a regex or a list of names"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern must be an object of module patterns"),
    ("inference_mode", None, "inference_mode must be true or false, got null"),
])
def test_a_bad_field_is_one_line_naming_file_and_field(tmp_path, field, value, what):
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({**GOOD, field: value}))
    with pytest.raises(PeftFormatError) as e:
        read_peft_config(path)
    msg = str(e.value)
    assert msg.startswith(repr(str(path))) and what in msg and "\n" not in msg


@pytest.mark.parametrize("d, what", [
    ({"peft_type": "ADALORA", "init_r": 12, "target_r": 0}, "target_r must be an integer >= 1"),
    ({"peft_type": "ADALORA", "beta1": 1.0}, "beta1 must be a number in (0, 1)"),
    ({"peft_type": "ADALORA", "rank_pattern": {"x.lora_E": [1, 0]}}, "rank_pattern must be"),
    ({"peft_type": "IA3", "init_ia3_weights": None}, "init_ia3_weights must be true or false"),
])
def test_each_peft_type_checks_its_own_fields(d, what):
    with pytest.raises(PeftFormatError) as e:
        check_peft_config(d, "here")
    assert str(e.value).startswith(f"here: {what}")
    # nulls PEFT itself writes are fine
    check_peft_config({"peft_type": "ADALORA", "total_step": None, "rank_pattern": None}, "here")


def test_unknown_fields_are_kept_and_the_type_is_checked(tmp_path):
    d = check_peft_config({**GOOD, "eva_config": {"x": 1}}, "here", ("LORA",))
    assert d["eva_config"] == {"x": 1}
    with pytest.raises(PeftFormatError, match="peft_type is 'IA3'; minilora reads 'LORA'"):
        check_peft_config({"peft_type": "IA3"}, "here", ("LORA",))
    with pytest.raises(PeftFormatError, match="must hold a JSON object"):
        check_peft_config([1], "here")
    (tmp_path / CONFIG_NAME).write_text("{nope")
    with pytest.raises(PeftFormatError, match="not valid JSON"):
        read_peft_config(tmp_path / CONFIG_NAME)


def test_directory_round_trip_and_refusals(tmp_path):
    t = {"base_model.model.lm_head.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 3))}
    cfg = peft_config("LORA", {"r": 2, "lora_alpha": 4}, ("q",), ("lm_head",))
    assert cfg["target_modules"] == ["q_proj"] and cfg["modules_to_save"] == ["lm_head"]
    write_peft_dir(tmp_path / "a", t, cfg, {"minilora": "{}"})
    got = read_peft_dir(tmp_path / "a", ("LORA",))
    assert got.config == json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert got.metadata["minilora"] == "{}"
    np.testing.assert_array_equal(got.tensors["base_model.model.lm_head.weight"],
                                  t["base_model.model.lm_head.weight"])
    rest, saved, paths = take_saved_modules(got.tensors, got.config, "here")
    assert paths == ["lm_head"] and list(saved) == ["lm_head.weight"] and len(rest) == 1
    with pytest.raises(PeftFormatError, match="NaN or inf"):
        write_peft_dir(tmp_path / "b", {"k": np.array([np.nan])}, cfg)
    assert not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CONFIG_NAME).write_text(json.dumps(GOOD))
    (tmp_path / "c" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(PeftFormatError, match="pickle"):
        read_peft_dir(tmp_path / "c")
    (tmp_path / "c" / WEIGHTS_NAME).write_bytes(b"\x00" * 5)
    with pytest.raises(PeftFormatError, match="truncated or not a safetensors file"):
        read_peft_dir(tmp_path / "c")
    with pytest.raises(PeftFormatError, match="not a directory"):
        read_peft_dir(tmp_path / "nowhere")


def test_names_and_scaling():
    assert to_peft_module("blocks.3.mlp.down") == "model.layers.3.mlp.down_proj"
    assert from_peft_module("model.layers.3.mlp.down_proj") == "blocks.3.mlp.down"
    assert lora_scaling(4, 8) == 2.0 and lora_scaling(16, 8, use_rslora=True) == 2.0
    with pytest.raises(PeftFormatError, match="r must be an integer >= 1"):
        lora_scaling(0, 8)


def test_analysis_reads_the_config_through_the_same_checks(tmp_path):
    d = tmp_path / "ad"
    write_peft_dir(d, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                       np.ones((2, 4), np.float32),
                       "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                       np.ones((4, 2), np.float32)},
                   peft_config("LORA", {"r": 2, "lora_alpha": 4}, ("q",)))
    assert read_peft_adapter(d).modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    cfg = json.loads((d / CONFIG_NAME).read_text())
    (d / CONFIG_NAME).write_text(json.dumps({**cfg, "lora_alpha": None}))
    with pytest.raises(AdapterFileError, match="lora_alpha must be a finite number, got null"):
        read_peft_adapter(d)
