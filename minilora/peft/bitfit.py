"""BitFit: only the existing biases train (a selective method: no new numbers at all).

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minilora.config import ConfigError, JsonConfig
from minilora.errors import PeftError
from minilora.nn.layers import LayerNorm, Module


@dataclass(frozen=True)
class BitFitConfig(JsonConfig):
    """BitFit (Ben Zaken et al. 2021): train only the bias terms, freeze every weight.

    Attributes:
        layernorm: also train the LayerNorm biases (beta). BitFit trains "the bias terms" of
            BERT, whose LayerNorms have biases too; with False only the Linear biases (q, k, v,
            o, up, down) train. LayerNorm *gains* never train. Our ``lm_head`` has no bias.
    """

    layernorm: bool = field(default=True, metadata={"help": "train LayerNorm biases too"})

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
