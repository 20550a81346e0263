"""Whole-checkpoint quantisation: targets, bit account, round trip, errors."""
import numpy as np
import pytest

from minilora.checkpoint import CheckpointError, save_checkpoint
from minilora.config import GPTConfig
from minilora.data import CharTokenizer
from minilora.model import GPT
from minilora.quant import dequantize_4bit
from minilora.quant.model_quant import is_quant_target, load_quantized, save_quantized

TOK = CharTokenizer.default()
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_only_block_linear_weights_are_quantised():
    assert is_quant_target("blocks.0.attn.q.weight") and is_quant_target("blocks.3.mlp.down.weight")
    for name in ("blocks.0.attn.q.bias", "wte.weight", "lm_head.weight", "blocks.1.ln_1.weight"):
        assert not is_quant_target(name)


@pytest.mark.parametrize("quant_type, dq", [("nf4", True), ("nf4", False), ("fp4", False),
                                            ("int4", True)])
def test_round_trip_and_bit_account(tmp_path, quant_type, dq):
    model = GPT(CFG, rng=0)
    rep = save_quantized(tmp_path / "q.safetensors", model, TOK, quant_type, 64, dq)
    assert rep["quantized_tensors"] == 2 * 6
    assert rep["quantized_params"] + rep["kept_float32_params"] == model.num_parameters()
    # per-tensor partial second-level blocks and the offset cost a little over the asymptote
    assert rep["bits_per_param_formula"] <= rep["bits_per_param_measured"] < rep["bits_per_param_formula"] + 0.05
    qmodel, tok, states = load_quantized(tmp_path / "q.safetensors")
    assert tok == TOK
    for (n, p), (_, pq) in zip(model.named_parameters(), qmodel.named_parameters()):
        if is_quant_target(n):
            assert 0 < np.abs(p - pq).max() <= np.abs(p).max()  # lossy, bounded by absmax
            assert states[n].quant_type == quant_type
        else:
            np.testing.assert_array_equal(p, pq, err_msg=n)  # kept exactly


def test_dequantised_weights_equal_the_library_dequantisation(tmp_path):
    from minilora.quant import quantize_nf4
    model = GPT(CFG, rng=1)
    save_quantized(tmp_path / "q.safetensors", model, TOK, "nf4", 64, False)
    qmodel, _, _ = load_quantized(tmp_path / "q.safetensors")
    w = model.blocks[0].attn.q.params["weight"]
    packed, state = quantize_nf4(w, 64)
    np.testing.assert_array_equal(qmodel.blocks[0].attn.q.params["weight"],
                                  dequantize_4bit(packed, state))


def test_loading_a_float_checkpoint_as_quantised_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "f.safetensors", GPT(CFG), TOK)
    with pytest.raises(CheckpointError, match="not a minilora quantised checkpoint"):
        load_quantized(tmp_path / "f.safetensors")
