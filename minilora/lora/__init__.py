"""LoRA: a frozen weight plus a trainable low-rank update, ΔW = scaling · B A.

Four modules, read in this order:

* :mod:`minilora.lora.layers`       the wrappers :class:`LoRALinear` / :class:`LoRAEmbedding`
                                    (forward, hand-written backward, merge / unmerge)
* :mod:`minilora.lora.inject`       on a whole model: inject, freeze, merge, unmerge, count
* :mod:`minilora.lora.files`        adapter files (the factors alone) and state dicts
* :mod:`minilora.lora.peft_io`  Hugging Face PEFT's ``adapter_model.safetensors`` +
                                    ``adapter_config.json``, both ways

Variants: :mod:`minilora.lora.dora` (DoRA, ``LoraConfig(use_dora=True)``) and
:mod:`minilora.lora.adalora` (AdaLoRA: SVD form, importance-scored rank budget).

Chapter: chapters/04-lora-notes.ipynb
"""
from minilora.config import LORA_TARGETS
from minilora.lora.adalora import AdaLoraConfig, AdaLoRALinear, adalora_layers
from minilora.lora.adalora_peft import export_adalora_peft, import_adalora_peft
from minilora.lora.adalora_train import (
                                         AdaLoraModel,
                                         RankAllocator,
                                         inject_adalora,
                                         orth_regularizer,
)
from minilora.lora.dora import DoRALinear
from minilora.lora.files import (
                                         ADAPTER_FORMAT,
                                         load_adapter,
                                         load_lora_state_dict,
                                         lora_state_dict,
                                         read_adapter,
                                         save_adapter,
)
from minilora.lora.inject import (
                                         count_lora_parameters,
                                         inject_lora,
                                         lora_layers,
                                         mark_only_lora_as_trainable,
                                         merge_lora,
                                         prepare_for_adapter,
                                         set_lora_training,
                                         unmerge_lora,
)
from minilora.lora.layers import (
                                         LORA_LAYERS,
                                         LoRAEmbedding,
                                         LoRAError,
                                         LoRALinear,
                                         LoRALinearCache,
                                         lora_scaling,
)

__all__ = ["ADAPTER_FORMAT", "AdaLoRALinear", "AdaLoraConfig", "AdaLoraModel", "RankAllocator",
           "adalora_layers", "export_adalora_peft", "import_adalora_peft", "inject_adalora",
           "orth_regularizer", "DoRALinear", "LORA_LAYERS", "LORA_TARGETS", "LoRAEmbedding",
           "LoRAError",
           "LoRALinear", "LoRALinearCache", "count_lora_parameters", "inject_lora",
           "load_adapter", "load_lora_state_dict", "lora_layers", "lora_scaling",
           "lora_state_dict", "mark_only_lora_as_trainable", "merge_lora", "prepare_for_adapter",
           "read_adapter", "save_adapter", "set_lora_training", "unmerge_lora"]
