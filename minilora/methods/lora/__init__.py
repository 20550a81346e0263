"""LoRA's home: a frozen weight plus a trainable low-rank update, ΔW = scaling · B A (and DoRA,
LoRA with a magnitude per output unit, as in PEFT's ``tuners/lora``).

Read in this order:

* :mod:`~minilora.methods.lora.config`   :class:`LoraConfig` (PEFT's field names and defaults)
* :mod:`~minilora.methods.lora.layers`   :class:`LoRALinear` / :class:`LoRAEmbedding` (forward,
                                         hand-written backward, merge / unmerge)
* :mod:`~minilora.methods.lora.init`     how the factors start (PEFT's inits, PiSSA)
* :mod:`~minilora.methods.lora.dora`     :class:`DoRALinear` (``LoraConfig(use_dora=True)``)
* :mod:`~minilora.methods.lora.inject`   on a whole model: inject, freeze, merge, unmerge, count
* :mod:`~minilora.methods.lora.files`    adapter files (the factors alone) and state dicts
* :mod:`~minilora.methods.lora.peft_io`  to and from Hugging Face PEFT's directory
* :mod:`~minilora.methods.lora.mixed`    layers that serve a batch mixing several adapters
* :mod:`~minilora.methods.lora.method`   LoRA and DoRA behind the one method interface

Chapter: chapters/04-lora-notes.ipynb
"""
from minilora.methods.lora.config import (
                                         LORA_ALL_LINEAR,
                                         LORA_TARGET_ALIASES,
                                         LORA_TARGETS,
                                         LoraConfig,
)
from minilora.methods.lora.dora import DoRALinear
from minilora.methods.lora.files import (
                                         ADAPTER_FORMAT,
                                         load_adapter,
                                         load_lora_state_dict,
                                         lora_state_dict,
                                         read_adapter,
                                         save_adapter,
)
from minilora.methods.lora.inject import (
                                         count_lora_parameters,
                                         inject_lora,
                                         lora_layers,
                                         mark_only_lora_as_trainable,
                                         merge_lora,
                                         prepare_for_adapter,
                                         set_lora_training,
                                         unmerge_lora,
)
from minilora.methods.lora.layers import (
                                         LORA_LAYERS,
                                         LoRAEmbedding,
                                         LoRAError,
                                         LoRALinear,
                                         LoRALinearCache,
                                         lora_scaling,
)
from minilora.methods.lora.method import DORA, LORA
from minilora.methods.lora.peft_io import export_peft, import_peft

__all__ = ["ADAPTER_FORMAT", "DORA", "DoRALinear", "LORA", "LORA_ALL_LINEAR", "LORA_LAYERS",
           "LORA_TARGETS", "LORA_TARGET_ALIASES", "LoRAEmbedding", "LoRAError", "LoRALinear",
           "LoRALinearCache", "LoraConfig", "count_lora_parameters", "export_peft", "import_peft",
           "inject_lora", "load_adapter", "load_lora_state_dict", "lora_layers", "lora_scaling",
           "lora_state_dict", "mark_only_lora_as_trainable", "merge_lora", "prepare_for_adapter",
           "read_adapter", "save_adapter", "set_lora_training", "unmerge_lora"]
