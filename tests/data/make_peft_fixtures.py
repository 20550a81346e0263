"""Regenerate tests/data/peft/: small adapters saved by the real Hugging Face PEFT, with the numbers
PEFT itself computes from them, so that minilora's PEFT readers can be checked against PEFT's own
output.

Needs torch + peft, which minilora itself does not. Run it from the repository root in a throwaway
venv outside the repo (minilora's own files are only read: the GPT replica and the exporter's
module-name map, which needs numpy + safetensors, both in the venv):

    python3 -m venv ../venv-peft && . ../venv-peft/bin/activate
    pip install torch==2.13.0
    pip install peft safetensors numpy "torch==2.13.0"
    python tests/data/make_peft_fixtures.py       # about 5 s on one CPU core

Made with torch 2.13.0+cpu, peft 0.21.2, transformers 5.24.0, accelerate 1.15.0, safetensors 0.8.0,
numpy 2.4.6 and Python 3.11. Every value comes from seeded NumPy generators, not torch's RNG, so a
rerun with these versions writes the same numbers. tests/test_peft_fixtures.py checks that the
stored files agree with each other, using NumPy only.

Every adapter directory holds ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``; keys
``base_model.model.<module path>.<tensor>`` with no adapter name) and ``adapter_config.json``,
exactly as ``PeftModel.save_pretrained`` wrote them. ``task_type`` is null, so PEFT also writes
``auto_mapping``. PEFT holds ``target_modules`` as a set, so its order in the JSON follows the
string hash seed; the script re-runs itself with PYTHONHASHSEED=0 so that reruns are byte-identical.
Readers must treat the list as a set. The model-card README.md that PEFT also writes is deleted.
Every ``reference.npz`` loads with ``np.load(..., allow_pickle=False)``: string keys, float64 arrays
(token ids and ranks are int64). Total size: about 1.6 MB.

Part 1: a tiny LLaMA-style model (for the ΔW analysis of any PEFT adapter)
--------------------------------------------------------------------------
The model is built from plain nn.Modules named as in a LLaMA checkpoint. It has no forward pass,
since PEFT only needs modules to wrap:

* ``model.embed_tokens`` (V=80, C=32);
* ``model.layers.{0,1,2}``, each with ``self_attn.{q,k,v,o}_proj`` (q, o: 32->32; k, v: 32->16, as
  in grouped-query attention), ``mlp.{gate,up}_proj`` (32->48), ``mlp.down_proj`` (48->32) and
  ``input_layernorm`` / ``post_attention_layernorm`` (RMSNorm, (32,));
* ``model.norm`` (32,) and ``lm_head`` (32->80).

Every width is distinct (16, 32, 48, 80; r 4 or 8), so a transposed factor shows up as a shape
error. A real model is far larger; these sizes keep float64 ΔW for every module of three adapters
under 0.6 MB.

* ``base.safetensors``: the base weights in bfloat16, 30 tensors, keys as a real LLaMA checkpoint
  has them: ``model.embed_tokens.weight`` (80, 32), ``model.layers.0.self_attn.q_proj.weight``
  (32, 32), ``...k_proj.weight`` (16, 32), ``...mlp.gate_proj.weight`` (48, 32),
  ``...down_proj.weight`` (32, 48), ``model.layers.0.input_layernorm.weight`` (32,),
  ``model.norm.weight`` (32,), ``lm_head.weight`` (80, 32), ...
* ``base_sharded/model-00001-of-00002.safetensors`` (embed_tokens, layers 0-1),
  ``base_sharded/model-00002-of-00002.safetensors`` (layer 2, norm, lm_head) and
  ``base_sharded/model.safetensors.index.json`` (``{"metadata": {"total_size": bytes},
  "weight_map": {key: file name}}``): the same weights in float16. They were drawn in float32 and
  rounded to bfloat16, and values below 2**-14 (float16's smallest normal) were set to 0. Both
  files therefore upcast to bit-identical float32 arrays. NumPy has no bfloat16 and
  ``safetensors.numpy`` refuses it, so a reader must widen the raw uint16 itself (bf16 is the top
  half of a float32).
* ``llama_lora/``: LoRA with r=4 and lora_alpha=8 on q,k,v,o,gate,up,down of every layer, plus
  ``rank_pattern={"layers.1.mlp.down_proj": 8}`` and ``alpha_pattern={"layers.2.self_attn.o_proj":
  32}``. PEFT matches a pattern key against the module path with the regex ``(.*\\.)?(KEY)$``.
  The scale alpha/r is 2.0 everywhere, except 1.0 for layers.1 down_proj (8/8) and 8.0 for
  layers.2 o_proj (32/4). There are 42 float32 tensors, keys
  ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (r, d_in) and
  ``...lora_B.weight`` (d_out, r), likewise for every target.
* ``llama_lora_b/``: the same config with other values, forming a φ (subspace similarity) pair
  with ``llama_lora``. In every module the first two rows of its lora_A are copied from
  ``llama_lora``, so the row spaces of the two ΔW share exactly 2 directions; everything else is
  independent.
* ``llama_lora_rs/``: the same targets plus ``embed_tokens``, with ``use_rslora=True``. The scale
  alpha/sqrt(r) is 4.0, except sqrt(8) for layers.1 down_proj and 16.0 for layers.2 o_proj; the
  embedding's is 4.0. There are 44 float32 tensors. The embedding's keys have no ``.weight``:
  ``base_model.model.model.embed_tokens.lora_embedding_A`` (4, 80) = (r, V) and
  ``...lora_embedding_B`` (32, 4) = (C, r).
* ``llama_lora*/reference.npz``: for every adapted module M (its path, e.g.
  ``model.layers.0.self_attn.q_proj``):
  - ``delta/M``: PEFT's ``get_delta_weight("default")`` on a float64 copy of the layer, shaped as
    the base weight, (d_out, d_in). For the embedding it is (V, C) = s·(B A)ᵀ.
  - ``scale/M`` (): PEFT's ``scaling["default"]``.
  - ``rank/M`` () int64.

Values: lora_A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), which is PEFT's Linear init, and lora_B ~
N(0, 0.1²); PEFT would start B at 0, which gives ΔW = 0. For the embedding, lora_embedding_A ~
N(0, 0.1²) (PEFT starts it at 0) and lora_embedding_B ~ N(0, 1) (PEFT's init).

Part 2: the PyTorch replica of minilora's GPT (for PEFT parity: DoRA, (IA)³, AdaLoRA,
modules_to_save)
--------------------------------------------------------------------------------------------
The model is ``TorchGPT`` from minilora/bench/torch_reference.py (built on the installed torch)
in float64: vocab 97, block 16, n_layer 2, n_head 2, n_embd 16, biases
on. Its modules are moved to the LLaMA-style paths that minilora's PEFT exporter writes
(``PEFT_MODULE_MAP``; checked against it at generation when minilora imports):

* ``wte`` -> ``model.embed_tokens``;
* ``blocks.{i}.attn.{q,k,v,o}`` -> ``model.layers.{i}.self_attn.{q,k,v,o}_proj``;
* ``blocks.{i}.mlp.{up,down}`` -> ``model.layers.{i}.mlp.{up,down}_proj``;
* ``blocks.{i}.ln_1`` -> ``model.layers.{i}.input_layernorm`` and ``ln_2`` ->
  ``post_attention_layernorm``;
* ``ln_f`` -> ``model.norm``; ``lm_head`` stays;
* ``wpe``, which the exporter never names, -> ``model.embed_positions``.

The forward pass is TorchGPT's own code; the old attribute names remain readable as properties.
minilora's attention has separate q, k, v, o Linears (no fused qkv), so PEFT targets q and v
directly. Before its reference is written, every directory is reloaded with
``PeftModel.from_pretrained`` on a fresh copy of the base, and the reloaded logits must equal
``logits`` (atol 1e-12); the merged logits must equal them as well (atol 1e-10).

Each ``gpt_*/reference.npz`` holds:

* ``input_ids`` (2, 8) int64, the same in every fixture;
* ``base/NAME`` float64 for every parameter, under minilora's own parameter names. Examples:
  ``wte.weight`` (97, 16), ``wpe.weight`` (16, 16), ``blocks.0.attn.q.weight`` (16, 16),
  ``blocks.0.attn.q.bias`` (16,), ``blocks.0.mlp.up.weight`` (64, 16),
  ``blocks.0.mlp.down.weight`` (16, 64), ``blocks.0.ln_1.weight``, ``ln_f.bias``,
  ``lm_head.weight`` (97, 16). The base is the same in every fixture;
* ``logits_base`` (2, 8, 97): the base model's output with the adapter disabled;
* ``logits`` (2, 8, 97): PEFT's output with the adapter active (eval mode, no dropout);
* ``logits_merged`` (2, 8, 97): the output after ``merge_and_unload()``;
* ``merged/NAME``: every parameter (weight and bias) of the adapted or saved modules after
  ``merge_and_unload()``, under minilora names.

The adapters are float64, like the model. Per fixture (M is a module path as in the adapter file,
e.g. ``model.layers.0.self_attn.q_proj``):

* ``gpt_dora/``: LoRA with r=4, lora_alpha=8 and use_dora=True on q_proj and v_proj.
  - Keys per module: ``base_model.model.M.lora_A.weight`` (4, 16), ``...lora_B.weight`` (16, 4) and
    ``base_model.model.M.lora_magnitude_vector`` (16,), with no ``.weight``.
  - After lora_A/B were set, PEFT's own DoRA layer recomputed the magnitude (the norms
    ‖W0 + s·B A‖ over the input dimension, one per output feature). It was then multiplied by
    (1 + 0.1·N(0,1)).
  - Merge: W' = m / ‖W0 + s·B A‖_row · (W0 + s·B A); the bias is unchanged.
  - Reference extras: ``magnitude_init/M`` (16,) is PEFT's magnitude at initialisation (B = 0, so
    the ‖W0‖ row norms); ``weight_norm/M`` (16,) is ‖W0 + s·B A‖; ``delta/M`` (16, 16) is
    s·B A; ``scale/M``.
* ``gpt_ia3/``: (IA)³ with target_modules=[k_proj, v_proj, down_proj] and
  feedforward_modules=[down_proj], which is PEFT's own default for LLaMA names.
  - The outputs of k and v are scaled (``ia3_l`` (16, 1)). The input of down_proj, i.e. the MLP's
    inner GELU activation, is scaled (``ia3_l`` (1, 64)).
  - Keys: ``base_model.model.M.ia3_l``, with no ``.weight``.
  - Values are 1 + 0.2·N(0,1); PEFT starts them at 1, the identity.
  - Merge: k/v weight rows and biases are multiplied by l; down_proj's weight columns are
    multiplied by l and its bias is unchanged.
* ``gpt_adalora/``: AdaLoRA on q,k,v,o,up,down with init_r=6, target_r=3, lora_alpha=8, tinit=2,
  tfinal=3, deltaT=1, total_step=12, beta1=beta2=0.85 and orth_reg_weight=0.5.
  - Training: 12 AdamW steps (lr 1e-2) on lora_A/E/B, from A, B ~ N(0, 0.3²) and E = 0. The
    targets are ``input_ids`` rolled left by one (the last position wraps). The loss is PEFT's
    AdaLoraModel.forward: cross-entropy + 0.5 · orth reg. ``update_and_allocate(step)`` runs after
    each optimizer step.
  - The kept ranks sum to 36 = target_r × 12 modules.
  - The file holds only the kept ranks. Keys have no ``.weight``:
    ``base_model.model.M.lora_A`` (r_M, d_in), ``...lora_B`` (d_out, r_M) and ``...lora_E``
    (r_M, 1).
  - The config's ``rank_pattern`` maps ``M.lora_E`` to 6 booleans (the kept ranks). Its ``r`` (8)
    is the unused default: the rank is ``init_r``.
  - ΔW = B (A ⊙ E) · lora_alpha / (ranknum + 1e-5), with ranknum = init_r = 6, not the kept
    rank.
    PEFT keeps it at 6 when it reloads the pruned file.
  - Reference extras: ``rank_kept/M`` () int64; ``ranknum/M`` (); ``delta/M`` (PEFT's
    get_delta_weight); ``loss_ce`` () and ``loss_total`` () (= ce + 0.5 · orth reg, both by PEFT,
    after training, for the same targets).
* ``gpt_lora_mts/``: LoRA with r=4 and lora_alpha=8 on q_proj and v_proj, plus
  modules_to_save=["lm_head"]. The saved copy of lm_head was perturbed by + N(0, 0.05²).
  - Keys: the q/v factors as above plus ``base_model.model.lm_head.weight`` (97, 16). peft 0.21
    writes a saved module's tensors under the module's own path, without
    ``modules_to_save.default``; on load, PEFT maps them back to
    ``lm_head.modules_to_save.default.weight``.
  - Reference extras: ``delta/M`` and ``scale/M``.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import peft
import safetensors
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "peft")


def rng_for(name: str) -> np.random.Generator:
    """One seeded generator per fixture part, independent of call order."""
    return np.random.default_rng([20261129, sum(map(ord, name)), len(name)])


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()


def save_adapter(peft_model, out_dir):
    """``save_pretrained`` without the model-card README.md it also writes (boilerplate)."""
    peft_model.save_pretrained(out_dir)
    os.remove(os.path.join(out_dir, "README.md"))


def save_npz(path, arrays: dict):
    """np.savez_compressed of plain float64 / int64 arrays (never object arrays)."""
    for k, a in arrays.items():
        assert a.dtype in (np.float64, np.int64), (k, a.dtype)
    np.savez_compressed(path, **arrays)


def lora_targets(peft_model, kind=("lora_A",)):
    """{module path: PEFT layer} for the adapted modules (path as in the adapter file)."""
    prefix = "base_model.model."
    out = {}
    for name, m in peft_model.named_modules():
        if (name.startswith(prefix) and "." in name
                and isinstance(getattr(m, kind[0], None), (nn.ModuleDict, nn.ParameterDict))):
            out[name[len(prefix):]] = m
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: LLaMA-style names
# ---------------------------------------------------------------------------------------------
V, C, KV, FF, N_LAYER = 80, 32, 16, 48, 3
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK_PATTERN = {"layers.1.mlp.down_proj": 8}
ALPHA_PATTERN = {"layers.2.self_attn.o_proj": 32}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, KV, bias=False)
        self.v_proj = nn.Linear(C, KV, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(C, FF, bias=False)
        self.up_proj = nn.Linear(C, FF, bias=False)
        self.down_proj = nn.Linear(FF, C, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.mlp = GatedMLP()
        self.input_layernorm = nn.RMSNorm(C)
        self.post_attention_layernorm = nn.RMSNorm(C)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, C)
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(N_LAYER))
        self.norm = nn.RMSNorm(C)


class TinyLlama(nn.Module):
    """LLaMA's module names and shapes, no forward: PEFT only needs the modules to wrap."""

    def __init__(self):
        super().__init__()
        self.model = Backbone()
        self.lm_head = nn.Linear(C, V, bias=False)


def llama_base_weights() -> dict:
    """{checkpoint key: float32 array}, bf16-exact and fp16-exact (see the module docstring)."""
    rng = rng_for("llama_base")
    out = {}
    for name, p in TinyLlama().state_dict().items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = 1.0 + 0.1 * rng.standard_normal(p.shape)
        else:
            w = 0.05 * rng.standard_normal(p.shape)
        w = torch.tensor(w, dtype=torch.float32).to(torch.bfloat16).to(torch.float32)
        w[w.abs() < 2.0 ** -14] = 0.0
        assert torch.equal(w.to(torch.float16).to(torch.float32), w)
        out[name] = w
    return out


def write_llama_base(weights: dict):
    save_file({k: w.to(torch.bfloat16).contiguous() for k, w in weights.items()},
              os.path.join(OUT, "base.safetensors"), metadata={"format": "pt"})
    shard_dir = os.path.join(OUT, "base_sharded")
    os.makedirs(shard_dir, exist_ok=True)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]

    def shard_of(key):
        first = key.startswith("model.embed_tokens") or re.match(r"model\.layers\.[01]\.", key)
        return files[0] if first else files[1]

    weight_map, total = {}, 0
    for f in files:
        part = {k: w.to(torch.float16).contiguous() for k, w in weights.items() if shard_of(k) == f}
        save_file(part, os.path.join(shard_dir, f), metadata={"format": "pt"})
        weight_map.update({k: f for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(shard_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
        fh.write("\n")


def set_lora_values(peft_model, rng, copy_rows_from=None):
    """Overwrite every LoRA factor with non-zero values (see the module docstring); returns
    {module: {"A": ..., "B": ...}} (float32 arrays) for a φ partner."""
    factors = {}
    with torch.no_grad():
        for path, m in lora_targets(peft_model, ("lora_A",)).items():
            if "default" in m.lora_A:
                A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                bound = 1.0 / math.sqrt(A.shape[1])
                a = rng.uniform(-bound, bound, A.shape)
                b = 0.1 * rng.standard_normal(B.shape)
            else:
                A, B = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
                a = 0.1 * rng.standard_normal(A.shape)
                b = rng.standard_normal(B.shape)
            if copy_rows_from is not None:
                a[:2] = copy_rows_from[path]["A"][:2]
            A.copy_(torch.tensor(a, dtype=A.dtype))
            B.copy_(torch.tensor(b, dtype=B.dtype))
            factors[path] = {"A": A.numpy().copy(), "B": B.numpy().copy()}
    return factors


def dense_deltas(peft_model) -> dict:
    """delta/M, scale/M, rank/M from PEFT's own layers, computed in float64."""
    ref = {}
    for path, m in lora_targets(peft_model, ("lora_A",)).items():
        m64 = copy.deepcopy(m).to(torch.float64)
        ref[f"delta/{path}"] = np64(m64.get_delta_weight("default"))
        ref[f"scale/{path}"] = np.float64(m.scaling["default"])
        ref[f"rank/{path}"] = np.int64(m.r["default"])
        assert ref[f"delta/{path}"].shape == m.get_base_layer().weight.shape
    return ref


def make_llama(weights: dict):
    partner = None
    for name, seed_name, rslora, extra in (("llama_lora", "llama_lora", False, []),
                                           ("llama_lora_b", "llama_lora_b", False, []),
                                           ("llama_lora_rs", "llama_lora_rs", True,
                                            ["embed_tokens"])):
        model = TinyLlama()
        model.load_state_dict(weights)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS + extra,
                            rank_pattern=dict(RANK_PATTERN), alpha_pattern=dict(ALPHA_PATTERN),
                            use_rslora=rslora, lora_dropout=0.0)
        pm = get_peft_model(model, config)
        factors = set_lora_values(pm, rng_for(seed_name),
                                  copy_rows_from=partner if name == "llama_lora_b" else None)
        if name == "llama_lora":
            partner = factors
        out_dir = os.path.join(OUT, name)
        save_adapter(pm, out_dir)
        save_npz(os.path.join(out_dir, "reference.npz"), dense_deltas(pm))


# ---------------------------------------------------------------------------------------------
# Part 2: minilora's GPT replica under the exporter's module names
# ---------------------------------------------------------------------------------------------
GPT = {"vocab_size": 97, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16, "bias": True}

#: per replica class: old attribute -> new (dotted) path. minilora's PEFT exporter writes these
#: names (its PEFT_MODULE_MAP); wpe has no exporter name, so it gets an OPT-like one.
RENAMES = {
    "TorchGPT": {"wte": "model.embed_tokens", "wpe": "model.embed_positions",
                 "blocks": "model.layers", "ln_f": "model.norm"},
    "Block": {"attn": "self_attn", "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"},
    "CausalSelfAttention": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "MLP": {"up": "up_proj", "down": "down_proj"},
}


def load_torch_gpt():
    """The replica's classes (``reference(torch)`` in minilora/bench/torch_reference.py), loaded by
    path so that only it and minilora.backend are imported (not the bench package)."""
    sys.path.insert(0, ROOT)
    path = os.path.join(ROOT, "minilora", "bench", "torch_reference.py")
    spec = importlib.util.spec_from_file_location("minilora_torch_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reference(torch)


def _alias(path):
    return property(lambda self: self.get_submodule(path))


def rename_children(module: nn.Module, renames: dict):
    """Move ``module``'s children to new (dotted) paths; the class's forward keeps reading the old
    attribute names, which become read-only properties returning whatever now sits at the new
    path (so a PEFT wrapper put there is used)."""
    children = list(module._modules.items())
    module._modules.clear()
    for old, child in children:  # keeps the original order; a new container sits where its
        parent, *path = [module] + renames.get(old, old).split(".")  # first child was
        for part in path[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(path[-1], child)
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {o: _alias(n) for o, n in renames.items()})


def gpt_forward_with_loss(self, idx, targets=None):
    """TorchGPT's forward; with targets, an object with ``.logits`` and ``.loss`` (mean next-token
    cross-entropy), which is what lets PEFT's AdaLoRA add its orthogonal regulariser."""
    logits = type(self).__mro__[1].forward(self, idx)
    if targets is None:
        return logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return SimpleNamespace(logits=logits, loss=loss)


def gpt_base_weights(tg) -> dict:
    """{minilora parameter name: float64 array} from a seeded generator (GPT-2-like scales)."""
    rng = rng_for("gpt_base")
    out = {}
    for name, p in tg.TorchGPT(**GPT).named_parameters():
        if name.endswith("bias"):
            w = 0.02 * rng.standard_normal(p.shape)
        elif ".ln_" in name or name.startswith("ln_f"):
            w = 1.0 + 0.1 * rng.standard_normal(p.shape)
        else:
            w = 0.2 * rng.standard_normal(p.shape)
        out[name] = w
    return out


def llama_named_gpt(tg, base: dict) -> nn.Module:
    model = tg.TorchGPT(**GPT).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(t64(base[name]))
    ours = {id(p): n for n, p in model.named_parameters()}
    for m in list(model.modules()):
        if type(m).__name__ in RENAMES:
            rename_children(m, RENAMES[type(m).__name__])
    type(model).forward = gpt_forward_with_loss
    model.minilora_names = {n: ours[id(p)] for n, p in model.named_parameters()}
    return model.eval()


def check_exporter_names(model):
    """The replica's module paths are the ones minilora's exporter writes (when importable)."""
    try:
        from minilora.peft_format import to_peft_module
    except ImportError as e:  # minilora's deps are not in this venv, or the module moved
        print(f"note: minilora's exporter map not checked ({e})")
        return
    for llama, ours in model.minilora_names.items():
        module = ours.rpartition(".")[0]
        if module != "wpe":
            assert to_peft_module(module) == llama.rpartition(".")[0], (ours, llama)
    print("module paths agree with minilora's PEFT_MODULE_MAP")


def input_ids():
    return rng_for("gpt_input").integers(0, GPT["vocab_size"], size=(2, 8))


def logits_of(model, ids):
    with torch.no_grad():
        return np64(model(torch.as_tensor(ids)))


def finish_gpt(name, tg, base, pm, ref, ids, config_targets):
    """Save the adapter, reload it on a fresh base, merge; fill the common reference entries."""
    out_dir = os.path.join(OUT, name)
    pm.eval()
    ref["input_ids"] = ids.astype(np.int64)
    ref.update({f"base/{k}": np.asarray(v, dtype=np.float64) for k, v in base.items()})
    ref["logits"] = logits_of(pm, ids)
    with pm.disable_adapter():
        ref["logits_base"] = logits_of(pm, ids)
    save_adapter(pm, out_dir)
    reloaded = PeftModel.from_pretrained(llama_named_gpt(tg, base), out_dir).eval()
    np.testing.assert_allclose(logits_of(reloaded, ids), ref["logits"], rtol=0, atol=1e-12)
    names = pm.base_model.model.minilora_names
    merged = pm.merge_and_unload()
    ref["logits_merged"] = logits_of(merged, ids)
    np.testing.assert_allclose(ref["logits_merged"], ref["logits"], rtol=0, atol=1e-10)
    for llama, p in merged.named_parameters():
        if llama.rpartition(".")[0].rsplit(".", 1)[-1] in config_targets:
            ref[f"merged/{names[llama]}"] = np64(p)
    save_npz(os.path.join(out_dir, "reference.npz"), ref)
    assert not np.allclose(ref["logits"], ref["logits_base"])


def make_gpt_dora(tg, base, ids):
    rng = rng_for("gpt_dora")
    targets = ["q_proj", "v_proj"]
    pm = get_peft_model(llama_named_gpt(tg, base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    ref = {}
    with torch.no_grad():
        for path, m in lora_targets(pm).items():
            mag = m.lora_magnitude_vector["default"]
            ref[f"magnitude_init/{path}"] = np64(mag.weight)
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            bound = 1.0 / math.sqrt(A.shape[1])
            A.copy_(t64(rng.uniform(-bound, bound, A.shape)))
            B.copy_(t64(0.1 * rng.standard_normal(B.shape)))
            mag.update_layer(base_layer=m.get_base_layer(), lora_A=A, lora_B=B,
                             scaling=m.scaling["default"])  # PEFT's own ‖W0 + s·B A‖
            ref[f"weight_norm/{path}"] = np64(mag.weight)
            mag.weight.mul_(t64(1.0 + 0.1 * rng.standard_normal(mag.weight.shape)))
            ref[f"delta/{path}"] = np64(m.get_delta_weight("default"))
            ref[f"scale/{path}"] = np.float64(m.scaling["default"])
    finish_gpt("gpt_dora", tg, base, pm, ref, ids, targets)


def make_gpt_ia3(tg, base, ids):
    rng = rng_for("gpt_ia3")
    targets = ["k_proj", "v_proj", "down_proj"]
    pm = get_peft_model(llama_named_gpt(tg, base),
                        IA3Config(target_modules=targets, feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for m in lora_targets(pm, ("ia3_l",)).values():
            l = m.ia3_l["default"]
            assert torch.all(l == 1.0)
            l.copy_(t64(1.0 + 0.2 * rng.standard_normal(l.shape)))
    finish_gpt("gpt_ia3", tg, base, pm, {}, ids, targets)


def make_gpt_adalora(tg, base, ids):
    rng = rng_for("gpt_adalora")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    config = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, tinit=2, tfinal=3, deltaT=1,
                           total_step=12, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                           target_modules=targets)
    pm = get_peft_model(llama_named_gpt(tg, base), config)
    with torch.no_grad():  # PEFT: A, B ~ N(0, 0.02²), E = 0; set from NumPy for reproducibility
        for path, m in lora_targets(pm).items():
            for key, std in (("lora_A", 0.3), ("lora_B", 0.3), ("lora_E", 0.0)):
                p = getattr(m, key)["default"]
                p.copy_(t64(std * rng.standard_normal(p.shape)))
    x = torch.as_tensor(ids)
    targets_t = torch.roll(x, -1, dims=1)
    # only A, E, B: with a float64 base, peft 0.21.2 leaves `ranknum` requires_grad=True
    # (False with float32), and an optimizer given every trainable parameter would move it
    trained = [p for n, p in pm.named_parameters() if re.search(r"\.lora_[ABE]\.", n)]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    pm.train()
    for step in range(config.total_step):
        out = pm.base_model(x, targets=targets_t)  # AdaLoraModel.forward adds the orth reg
        out.loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    ref = {}
    with torch.no_grad():
        out = pm.base_model(x, targets=targets_t)
        ref["loss_total"] = np.float64(out.loss.item())
        ref["loss_ce"] = np.float64(F.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), targets_t.reshape(-1)).item())
    kept = pm.peft_config["default"].rank_pattern
    for path, m in lora_targets(pm).items():
        ref[f"rank_kept/{path}"] = np.int64(sum(kept[f"{path}.lora_E.default"]))
        ref[f"ranknum/{path}"] = np64(m.ranknum["default"]).reshape(())
        assert ref[f"ranknum/{path}"] == config.init_r
        ref[f"delta/{path}"] = np64(m.get_delta_weight("default"))
    print("adalora kept ranks:", {k.split("/", 1)[1]: int(v) for k, v in ref.items()
                                  if k.startswith("rank_kept/")})
    finish_gpt("gpt_adalora", tg, base, pm, ref, ids, targets)


def make_gpt_lora_mts(tg, base, ids):
    rng = rng_for("gpt_lora_mts")
    targets = ["q_proj", "v_proj"]
    pm = get_peft_model(llama_named_gpt(tg, base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                   modules_to_save=["lm_head"]))
    ref = {}
    with torch.no_grad():
        for path, m in lora_targets(pm).items():
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            bound = 1.0 / math.sqrt(A.shape[1])
            A.copy_(t64(rng.uniform(-bound, bound, A.shape)))
            B.copy_(t64(0.1 * rng.standard_normal(B.shape)))
            ref[f"delta/{path}"] = np64(m.get_delta_weight("default"))
            ref[f"scale/{path}"] = np.float64(m.scaling["default"])
        head = pm.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(t64(0.05 * rng.standard_normal(head.shape)))
    finish_gpt("gpt_lora_mts", tg, base, pm, ref, ids, targets + ["lm_head"])


def main():
    # PEFT keeps target_modules as a set and writes list(set): its order in adapter_config.json
    # follows the string hash seed, so fix the seed for byte-identical reruns
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.manual_seed(0)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    make_llama(llama_base_weights())
    write_llama_base(llama_base_weights())
    tg = load_torch_gpt()
    base = gpt_base_weights(tg)
    check_exporter_names(llama_named_gpt(tg, base))
    ids = input_ids()
    make_gpt_dora(tg, base, ids)
    make_gpt_ia3(tg, base, ids)
    make_gpt_adalora(tg, base, ids)
    make_gpt_lora_mts(tg, base, ids)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total / 1e6:.2f} MB (peft {peft.__version__}, torch {torch.__version__},"
          f" safetensors {safetensors.__version__}, numpy {np.__version__})")


if __name__ == "__main__":
    main()
