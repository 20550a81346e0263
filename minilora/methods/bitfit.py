"""BitFit: only the existing biases train (a selective method: no new numbers at all).

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from dataclasses import dataclass

from minilora.config import ConfigError, JsonConfig, option
from minilora.errors import PeftError
from minilora.nn.layers import LayerNorm, Module
from minilora.methods.base import (
    METHOD_FILE_FORMAT,
    Method,
    Tuned,
    copy_in,
    read_tensors_file,
    save_tensors_file,
)


@dataclass(frozen=True)
class BitFitConfig(JsonConfig):
    """BitFit (Ben Zaken et al. 2021): train only the bias terms, freeze every weight.

    Attributes:
        layernorm: also train the LayerNorm biases (beta). BitFit trains "the bias terms" of
            BERT, whose LayerNorms have biases too; with False only the Linear biases (q, k, v,
            o, up, down) train. LayerNorm *gains* never train. Our ``lm_head`` has no bias.
    """

    layernorm: bool = option(True, "train the LayerNorm biases too")

    def __post_init__(self):
        if not isinstance(self.layernorm, bool):
            raise ConfigError(f"layernorm must be true or false, got {self.layernorm!r}")

def _layernorm_param_names(model: Module) -> set:
    return {f"{mn}.{k}" if mn else k for mn, m in model.named_modules()
            if isinstance(m, LayerNorm) for k in m.params}


def bitfit_trainable(config: BitFitConfig, model: Module):
    """name -> bool: every bias (LayerNorm biases only with ``config.layernorm``)."""
    ln = _layernorm_param_names(model)
    return lambda name: name.endswith(".bias") and (config.layernorm or name not in ln)


def apply_bitfit(model: Module, config: BitFitConfig) -> dict:
    """Freeze every parameter except the biases (see :class:`BitFitConfig`); returns the report
    ``{"trainable", "total", "percent", "targets": [bias names]}``.

    Chapter: chapters/04-lora-notes.ipynb
    """
    if not isinstance(config, BitFitConfig):
        raise TypeError(f"config must be a BitFitConfig, got {type(config).__name__}")
    pred = bitfit_trainable(config, model)
    names = [n for n, _ in model.named_parameters() if pred(n)]
    if not names:
        raise PeftError("BitFit found no bias to train: the model was built with bias=False and "
                        "layernorm=False leaves out the LayerNorm biases; use layernorm=True")
    model.set_trainable(pred)
    return model.trainable_report(names)


def count_bitfit_parameters(config: BitFitConfig, model_config) -> int:
    """Closed form: L (4C [q,k,v,o] + 4C [up] + C [down]) if the Linears have biases, plus
    L 2C + C with ``layernorm`` (the biases of ln_1, ln_2 and ln_f).

    Chapter: chapters/04-lora-notes.ipynb
    """
    L, C = model_config.n_layer, model_config.n_embd
    n = L * (4 * C + 4 * C + C) if model_config.bias else 0
    return n + (L * 2 * C + C if config.layernorm else 0)


class BitFitMethod(Method):
    """BitFit: only the existing biases train."""

    name = "bitfit"
    example = ""
    config_cls = BitFitConfig
    summary = "BitFit: only the existing biases train"
    weights_file = "bitfit.safetensors"
    file_format = METHOD_FILE_FORMAT
    lr = (1e-2, 1e-3)
    file_names = ("bitfit",)

    def _apply(self, model, config) -> Tuned:
        return Tuned(model, config, self, report=apply_bitfit(model, config))

    def count_parameters(self, config, model_config) -> int:
        return count_bitfit_parameters(config, model_config)

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        save_tensors_file(path, self.file_format, tuned, self.trainable(tuned),
                          {"method": self.name, "config": tuned.config.to_dict()})

    def load(self, path, model) -> Tuned:
        config, arrays, saved, paths = read_tensors_file(
            path, self.file_format, "BitFit file", model, "config", self.config_cls)
        tuned = self.apply(model, config)
        copy_in(tuned.model, arrays, self.trainable(tuned), str(path), saved, paths)
        return tuned._replace(modules_to_save=tuple(paths))


BITFIT = BitFitMethod()
