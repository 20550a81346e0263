"""LoRA and DoRA behind the one interface of :class:`minilora.methods.base.Method` (their layers:
:mod:`~minilora.methods.lora.layers`, :mod:`~minilora.methods.lora.dora`; files:
:mod:`~minilora.methods.lora.files`, :mod:`~minilora.methods.lora.peft_io`).

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

from minilora.errors import UsageError
from minilora.methods.base import Method, Tuned
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora.files import ADAPTER_FORMAT, load_adapter, read_adapter, save_adapter
from minilora.methods.lora.inject import inject_lora, lora_layers
from minilora.methods.lora.mixed import merge_and_unload
from minilora.methods.lora.peft_io import export_peft, import_peft
from minilora.nn.modules_to_save import split_saved_modules


class LoraMethod(Method):
    """LoRA (Hu et al. 2021): ΔW = scaling · B A on the targeted layers."""

    name = "lora"
    example = "--r 8 --alpha 16 --targets q,v"
    config_cls = LoraConfig
    summary = "LoRA: a low-rank update scaling · B A on the targeted layers"
    weights_file = "adapter.safetensors"
    file_format = ADAPTER_FORMAT
    peft_type = "LORA"
    lr = (5e-3, 5e-4)
    use_dora = False

    def default_config(self, steps=None):
        return LoraConfig(r=8, lora_alpha=16, target_modules=("q", "v"), use_dora=self.use_dora)

    def check_config(self, config):
        config = super().check_config(config)
        if config.use_dora != self.use_dora:
            raise UsageError(f"method {self.name!r} needs a LoraConfig with use_dora="
                             f"{self.use_dora} (DoRA is method 'dora')")
        return config

    def _apply(self, model, config) -> Tuned:
        return Tuned(model, config, self, report=inject_lora(model, config))

    def save(self, path, tuned: Tuned, tokenizer=None) -> None:
        save_adapter(path, tuned.model, tuned.config, tuned.modules_to_save)

    def load(self, path, model) -> Tuned:
        _, _, paths = split_saved_modules(read_adapter(path)[0])
        config = load_adapter(path, model)
        return Tuned(model, self.check_config(config), self, tuple(paths))

    def export_peft(self, path_dir, tuned: Tuned, base_model_name_or_path=None):
        return export_peft(path_dir, tuned.model, tuned.config, base_model_name_or_path,
                           tuned.modules_to_save)

    def import_peft(self, path_dir, model) -> Tuned:
        config, paths = import_peft(path_dir, model, return_modules=True)
        return Tuned(model, self.check_config(config), self, tuple(paths))

    def merge(self, tuned: Tuned):
        return merge_and_unload(tuned.model)

    def layers(self, tuned: Tuned) -> dict:
        return lora_layers(tuned.model)


class DoraMethod(LoraMethod):
    """DoRA (Liu et al. 2024): LoRA with ``use_dora=True``, a trainable magnitude per output
    unit times the direction of W0 + scaling · B A (:class:`~minilora.methods.lora.dora.DoRALinear`)."""

    name = "dora"
    example = "--r 8 --task milton"
    summary = "DoRA: LoRA's update, then a trained magnitude per output unit times the direction"
    use_dora = True


LORA = LoraMethod()
DORA = DoraMethod()

__all__ = ["DORA", "DoraMethod", "LORA", "LoraMethod"]
