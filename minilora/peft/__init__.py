"""The other PEFT methods of the taxonomy: Houlsby adapters, prefix tuning, prompt tuning, BitFit.

Each method freezes the base GPT and trains a small set of new (or selected) numbers; every
backward pass is written by hand and gradchecked::

    Houlsby adapter  h -> h + up(gelu(down(h)))  after attn.o and after mlp.down     (additive,
                     2md + d + m per adapter, m = bottleneck)                         new layers)
    prefix tuning    per layer, P trainable keys and values prepended to the         (new inputs
                     attention's keys and values: 2 L P C numbers                     to attention)
    prompt tuning    P trainable vectors prepended to the token embeddings: P C      (new input)
    (IA)³            vectors rescaling keys, values and the MLP's inner activation   (rescaling)
    BitFit           only the existing biases train                                  (selective)

Modules: :mod:`~minilora.peft.houlsby`, :mod:`~minilora.peft.prefix` (prefix + prompt),
:mod:`~minilora.peft.bitfit`, and :mod:`~minilora.peft.files` (apply / count / save / load for
all of them). LoRA itself lives in :mod:`minilora.lora`.

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
from minilora.errors import PeftError
from minilora.nn.modules_to_save import (
                                 SavedModules,
                                 add_modules_to_save,
                                 check_saved_modules,
                                 count_modules_to_save,
                                 load_saved_modules,
                                 modules_to_save_state_dict,
                                 resolve_modules_to_save,
                                 saved_modules_tensors,
                                 split_saved_modules,
)
from minilora.peft.bitfit import BitFitConfig, apply_bitfit
from minilora.peft.files import (
                                 CONFIGS,
                                 PEFT_FORMAT,
                                 apply_peft,
                                 count_peft_parameters,
                                 load_peft,
                                 peft_state_dict,
                                 save_peft,
)
from minilora.peft.houlsby import (
                                 ADAPTER_TARGETS,
                                 AdapterConfig,
                                 HoulsbyAdapter,
                                 adapter_layers,
                                 inject_adapters,
)
from minilora.peft.ia3 import (
                                 IA3Config,
                                 IA3Linear,
                                 count_ia3_parameters,
                                 export_ia3_peft,
                                 ia3_layers,
                                 import_ia3_peft,
                                 inject_ia3,
                                 load_ia3,
                                 merge_ia3,
                                 save_ia3,
                                 unmerge_ia3,
)
from minilora.peft.prefix import (
                                 PrefixConfig,
                                 PrefixTuningModel,
                                 PromptConfig,
                                 PromptTuningModel,
                                 add_prefix,
                                 add_prompt,
                                 base_prefix_kv,
)

__all__ = ["ADAPTER_TARGETS", "AdapterConfig", "BitFitConfig", "CONFIGS", "HoulsbyAdapter",
           "PEFT_FORMAT", "PeftError", "PrefixConfig", "PrefixTuningModel", "PromptConfig",
           "PromptTuningModel", "adapter_layers", "add_prefix", "add_prompt", "apply_bitfit",
           "apply_peft", "base_prefix_kv", "count_peft_parameters", "inject_adapters",
           "load_peft", "peft_state_dict", "save_peft", "SavedModules", "add_modules_to_save",
           "count_modules_to_save", "modules_to_save_state_dict", "resolve_modules_to_save",
           "check_saved_modules", "load_saved_modules", "saved_modules_tensors",
           "split_saved_modules",
           "IA3Config", "IA3Linear", "count_ia3_parameters", "export_ia3_peft", "ia3_layers",
           "import_ia3_peft", "inject_ia3", "load_ia3", "merge_ia3", "save_ia3", "unmerge_ia3"]
