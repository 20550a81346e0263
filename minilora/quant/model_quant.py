"""Quantising a whole model checkpoint: every transformer linear weight to 4 bits, one file.

What is quantised follows QLoRA: the weight matrices of the blocks' linear layers (``attn.q``,
``k``, ``v``, ``o``, ``mlp.up``, ``down``). Embeddings, the LM head, biases and LayerNorm
parameters stay float32 (they are small, and the head and embeddings are sensitive).

The quantised checkpoint is one safetensors file (written atomically) with

* ``model.<name>``: the float32 parameters that are kept,
* ``q.<name>.packed`` (uint8, two codes per byte) and ``q.<name>.<absmax|code|absmax2|code2>``,
* a JSON header entry ``"minilora"``: format, model config, tokenizer and, per quantised tensor,
  its :class:`QuantState` metadata.

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from __future__ import annotations

from minilora import backend
from minilora.config import GPTConfig
from minilora.data import CharTokenizer
from minilora.io import (
    CheckpointError,
    config_from_meta,
    read_typed,
    strip_prefix,
    write_typed,
)
from minilora.model import GPT
from minilora.quant.checks import QuantError
from minilora.quant.double import bits_per_param, measured_bits_per_param
from minilora.quant.nf4 import dequantize_4bit, get_code, quantize_4bit
from minilora.quant.state import QuantState

FORMAT = "minilora-quantized-v1"
QUANT_TARGETS = ("q", "k", "v", "o", "up", "down")


def is_quant_target(name: str) -> bool:
    """True for ``blocks.{i}.attn.{q,k,v,o}.weight`` and ``blocks.{i}.mlp.{up,down}.weight``."""
    parts = name.split(".")
    return parts[0] == "blocks" and parts[-1] == "weight" and parts[-2] in QUANT_TARGETS


def quantize_model(model, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True) -> tuple[dict, dict, dict]:
    """Quantise the targeted weights of ``model``.

    Returns:
        arrays: name -> array for the checkpoint (see the module docstring);
        states: name -> :class:`QuantState` for each quantised weight;
        report: counts, exact bits per quantised parameter (formula and measured), and the
            mean / max absolute reconstruction error over all quantised weights.
    """
    code = get_code(quant_type)
    arrays, states = {}, {}
    n_q = bytes_q = 0
    err_sum = 0.0
    err_max = 0.0
    for name, p in model.named_parameters():
        if not is_quant_target(name):
            arrays[f"model.{name}"] = p
            continue
        packed, state = quantize_4bit(p, code, blocksize, double_quant, quant_type=quant_type)
        w_hat = dequantize_4bit(packed, state)
        diff = backend.xp.abs(w_hat - p)
        err_sum += backend.to_scalar(diff.sum())
        err_max = max(err_max, backend.to_scalar(diff.max()))
        tensors, _ = state.to_tensors_and_meta()
        arrays[f"q.{name}.packed"] = packed
        arrays.update({f"q.{name}.{k}": v for k, v in tensors.items()})
        states[name] = state
        n_q += int(p.size)
        bytes_q += round(measured_bits_per_param(packed, state) * int(p.size) / 8)
    if not states:
        raise QuantError("quantize_model: the model has no blocks.*.{attn.q,k,v,o / mlp.up,down} "
                         "weights to quantise")
    kept = sum(int(a.size) for k, a in arrays.items() if k.startswith("model."))
    report = {
        "quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
        "quantized_params": n_q, "kept_float32_params": kept, "quantized_tensors": len(states),
        "bits_per_param_formula": bits_per_param(blocksize, double_quant),
        "bits_per_param_measured": 8 * bytes_q / n_q,
        "mean_abs_error": err_sum / n_q, "max_abs_error": err_max,
        "float32_bytes": 4 * (n_q + kept), "quantized_bytes": bytes_q + 4 * kept,
    }
    return arrays, states, report


def save_quantized(path, model, tokenizer, quant_type="nf4", blocksize=64,
                   double_quant=True) -> dict:
    """Quantise ``model`` and write the checkpoint to ``path`` (atomically); returns the report."""

    arrays, states, report = quantize_model(model, quant_type, blocksize, double_quant)
    meta = {"model_config": model.config.to_dict(),
            "tokenizer": tokenizer.to_dict(), "report": report,
            "quant_states": {n: s.to_tensors_and_meta()[1] for n, s in states.items()}}
    write_typed(path, FORMAT, arrays, meta)
    return report


def load_quantized(path, dtype="float32", allow_nonfinite: bool = False):
    """Read a quantised checkpoint; returns ``(model, tokenizer, states)`` with the quantised
    weights dequantised into an ordinary float model (for evaluation and sampling)."""

    arrays, meta = read_typed(path, FORMAT, "quantised checkpoint", allow_nonfinite)
    model = GPT(config_from_meta(path, meta, "model_config", GPTConfig, "quantised checkpoint"),
                rng=None, dtype=dtype)
    tok = CharTokenizer.from_dict(meta["tokenizer"])
    weights = strip_prefix(arrays, "model.")
    states = {}
    for name, qmeta in meta["quant_states"].items():
        prefix = f"q.{name}."
        tensors = strip_prefix(arrays, prefix)
        packed = tensors.pop("packed", None)
        try:
            state = QuantState.from_tensors_and_meta(tensors, qmeta)
            if packed is None:
                raise KeyError(f"{prefix}packed is missing")
            w = dequantize_4bit(backend.asarray(packed), state)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{str(path)!r}: quantised tensor {name!r} is broken: {e}") from None
        states[name] = state
        weights[name] = backend.to_numpy(w)
    try:
        model.load_state_dict(weights)
    except ValueError as e:
        raise CheckpointError(f"{str(path)!r} does not fit its config: {e}") from None
    return model, tok, states
