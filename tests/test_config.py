"""Configs: validated on construction, JSON round trips, unknown fields refused, derived values."""
import math

import pytest

from minilora.config import ConfigError, GPTConfig, QuantConfig, TrainConfig
from minilora.methods.lora.config import LoraConfig
from minilora.model import GPT


@pytest.mark.parametrize("cls", [GPTConfig, TrainConfig, LoraConfig, QuantConfig])
def test_json_round_trip(cls):
    c = cls()
    assert cls.from_json(c.to_json()) == c
    assert cls.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("cls", [GPTConfig, TrainConfig, LoraConfig, QuantConfig])
def test_unknown_field_is_refused_not_dropped(cls):
    d = dict(cls().to_dict(), no_such_field=1)
    with pytest.raises(ConfigError, match="no_such_field"):
        cls.from_dict(d)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(block_size=True), "block_size"),
    (dict(init_std=float("nan")), "init_std"),
    (dict(bias="yes"), "bias"),
])
def test_gpt_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**kwargs)


@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_parameter_count_matches_the_model(bias):
    c = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=bias)
    assert c.num_parameters() == GPT(c, rng=0).num_parameters()


def test_lora_scaling_and_rslora():
    assert LoraConfig(r=8, lora_alpha=16).scaling == 2.0
    assert math.isclose(LoraConfig(r=16, lora_alpha=16, use_rslora=True).scaling, 4.0)


def test_lora_targets_accept_peft_names_and_all_linear():
    assert LoraConfig(target_modules=("q_proj", "v_proj")).target_modules == ("q", "v")
    assert set(LoraConfig(target_modules="all-linear").target_modules) == {
        "q", "k", "v", "o", "up", "down"}
    with pytest.raises(ConfigError, match="target"):
        LoraConfig(target_modules=("nope",))


def test_quant_config_types_are_the_named_codes():
    from minilora.config import QUANT_TYPES
    from minilora.quant.nf4 import get_code
    for qt in QUANT_TYPES:
        assert QuantConfig(quant_type=qt).quant_type == qt and len(get_code(qt)) == 16
    with pytest.raises(ConfigError, match="quant_type"):
        QuantConfig(quant_type="int8")


def test_train_config_checks_ranges():
    with pytest.raises(ConfigError):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError):
        TrainConfig(batch_size=0)
