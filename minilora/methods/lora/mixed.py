"""Stand-ins for a LoRA layer that serve a batch mixing several adapters (S-LoRA / Punica's SGMV).

For the whole batch and per segment g = [s, e) of rows that share adapter g::

    out          = x @ W0.T + b                                   (B, T, d_out)   one GEMM
    out[s:e]    += s_g * (x[s:e] @ A_g.T) @ B_g.T                 (e - s, T, d_out)

Inference only: the mixed layers have no backward. :class:`minilora.adapters.AdapterRegistry`
puts them into the model tree in place of the LoRA wrappers.

Chapter: chapters/04-lora-notes.ipynb
"""
from __future__ import annotations

from typing import NamedTuple

from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora import LoRAEmbedding, LoRAError, LoRALinear, lora_layers, merge_lora
from minilora.nn import ops
from minilora.nn.layers import Embedding, Linear, Module

BASE = None  # the adapter id of a row that runs the plain base model (also -1 as an integer)


class Adapter(NamedTuple):
    """One registered adapter: its config and factors ``{layer name: (A, B)}`` on the backend."""
    name: str
    config: LoraConfig
    factors: dict
    source: str | None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) + int(b.nbytes) for a, b in self.factors.values())


# ----------------------------------------------------------------------------------------------
# plain and mixed stand-ins for a LoRA layer (put into the model tree in its place)
# ----------------------------------------------------------------------------------------------
def plain_layer(wrapper) -> Module:
    """The base layer of a LoRA wrapper: a frozen Linear / Embedding on the *same* arrays.

    Installed in the wrapper's place it gives exactly the base model (no adapter path at all).
    """
    if isinstance(wrapper, LoRALinear):
        layer = Linear(wrapper.params["weight"], wrapper.params.get("bias"))
    elif isinstance(wrapper, LoRAEmbedding):
        layer = Embedding(wrapper.params["weight"])
    else:
        raise TypeError(f"plain_layer takes a LoRALinear or LoRAEmbedding, got "
                        f"{type(wrapper).__name__}")
    layer.trainable = set()
    return layer


class MixedLoRALinear(Module):
    """A Linear whose rows use different adapters (inference only).

    out = x @ W0.T + b;  out[s:e] += s_g (x[s:e] @ A_g.T) @ B_g.T   for each segment (s, e, A_g, B_g, s_g)

    ``segments`` is set by :meth:`AdapterRegistry.forward` for one call; rows in no segment get
    the base output. x (B, T, d_in) -> out (B, T, d_out).
    """

    def __init__(self, wrapper: LoRALinear):
        super().__init__()
        self.wrapper = wrapper
        self.segments = []

    def forward(self, x):
        p = self.wrapper.params
        out, _ = ops.linear_forward(x, p["weight"], p.get("bias"))  # (B, T, d_out)
        for s, e, A, B, scaling in self.segments:
            h, _ = ops.linear_forward(x[s:e], A)  # (e - s, T, r): a contiguous view of x
            u, _ = ops.linear_forward(h, B)  # (e - s, T, d_out)
            u *= scaling
            out[s:e] += u
        return out, None

    def backward(self, dout, cache, need_dx: bool = True):
        raise LoRAError("mixed-adapter batches are for inference only (no backward); train one "
                        "adapter at a time with set_adapter(name)")


class MixedLoRAEmbedding(Module):
    """An Embedding whose rows use different adapters (inference only).

    out = W0[idx];  out[s:e] += s_g A_g.T[idx[s:e]] @ B_g.T   for each segment; idx (B, T) -> (B, T, C)
    """

    def __init__(self, wrapper: LoRAEmbedding):
        super().__init__()
        self.wrapper = wrapper
        self.segments = []

    def forward(self, idx):
        out, _ = ops.embedding_forward(idx, self.wrapper.params["weight"])  # (B, T, C)
        if self.segments:
            out = out.copy()  # W0[idx] may be a view of W0 on some backends: never add into it
        for s, e, A, B, scaling in self.segments:
            h, _ = ops.embedding_forward(idx[s:e], A.T)  # rows of A.T: (e - s, T, r)
            u, _ = ops.linear_forward(h, B)  # (e - s, T, C)
            u *= scaling
            out[s:e] += u
        return out, None

    def backward(self, dout, cache):
        raise LoRAError("mixed-adapter batches are for inference only (no backward)")


def merge_and_unload(model: Module) -> Module:
    """Merge every LoRA layer (finite-checked) and put plain base layers in their place.

    Afterwards ``model`` is an ordinary GPT again whose weights hold W0 + ΔW: its
    ``named_parameters()`` have no ``lora_`` tensors, so :func:`minilora.checkpoint.save_checkpoint`
    writes a full checkpoint that loads without minilora's LoRA code (PEFT's ``merge_and_unload``).
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("merge_and_unload: the model has no LoRA layers")
    if not all(m.merged for m in layers.values()):
        merge_lora(model, safe_merge=True)
    modules = dict(model.named_modules())
    for name, m in layers.items():
        parent, _, child = name.rpartition(".")
        modules[parent].replace(child, plain_layer(m))
    return model


# ----------------------------------------------------------------------------------------------
# the registry
