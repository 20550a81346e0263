"""Every fine-tuning method, one home each, and the one registry everybody asks
(:mod:`minilora.methods.registry`).

=========  ===============================  ==============================================
method     its home                         what trains
=========  ===============================  ==============================================
full       :mod:`~minilora.methods.full`    every parameter
lora       :mod:`minilora.methods.lora`     ΔW = scaling · B A on the targeted layers
qlora      :mod:`~minilora.methods.qlora`   LoRA around a base held as 4-bit NF4 codes
dora       :mod:`minilora.methods.lora`     LoRA + a magnitude per output unit (``dora.py``)
adalora    :mod:`~minilora.methods.adalora` LoRA in SVD form, pruned to a rank budget
houlsby    :mod:`~minilora.methods.houlsby` bottleneck adapters after attn.o and mlp.down
prefix     :mod:`~minilora.methods.prefix`  P keys and values in front of every attention
prompt     :mod:`~minilora.methods.prompt`  P soft-prompt vectors before the tokens
bitfit     :mod:`~minilora.methods.bitfit`  only the existing biases
ia3        :mod:`~minilora.methods.ia3`     vectors rescaling k, v and the MLP's activation
=========  ===============================  ==============================================

Each home holds the method's config dataclass (defaults, validation, one help line per field),
its layers (forward and hand-written backward side by side, gradchecked) and one
:class:`~minilora.methods.base.Method` object implementing the same small interface (apply,
trainable tensors, save / load in our format, to / from PEFT where PEFT has the method, merge
where it exists). :data:`minilora.methods.registry.METHODS` lists them; the fine-tuning harness, ``minilora finetune``
(its flags and ``--help`` are generated from the config dataclasses), ``minilora adapter
export-peft / import-peft / merge``, the results table, the bench and the chapters read it.
Adding a method is its home plus one line in the registry (CONTRIBUTING.md shows one).

Chapter: chapters/04-lora-notes.ipynb (the PEFT taxonomy)
"""
