"""Regenerate tests/data/svd/: PEFT-made adapters in every layout ``minilora svd`` must account
for, with PEFT's own ΔW and merged weights to check it against.

Needs torch, transformers and peft, which minilora itself does not (the repository's dev venv has
them; see tests/data/make_peft_fixtures.py for a throwaway venv):

    python tests/data/make_svd_fixtures.py        # a few seconds on one CPU core

Made with torch 2.13.0+cpu, peft 0.21.2, transformers 5.25.0, safetensors 0.8.0, numpy 2.4.6 and
Python 3.11. Models are built from tiny configs with weights drawn by seeded torch generators
(``torch.manual_seed``); LoRA factors are then overwritten with seeded NumPy values (PEFT starts
B at 0, which would give ΔW = 0). The script re-runs itself with PYTHONHASHSEED=0 so that the
JSON's ``target_modules`` order is stable. About 0.8 MB in all.

Directories (each adapter: ``adapter_model.safetensors`` + ``adapter_config.json`` as
``PeftModel.save_pretrained`` wrote them, the model card deleted; ``reference.npz`` loads with
``allow_pickle=False``):

* ``gpt2_base/model.safetensors``: a GPT-2 (``GPT2LMHeadModel``, n_embd 16, 2 layers, 2 heads,
  vocab 50, 16 positions) saved by ``save_pretrained``: Conv1D weights stored (in, out)
  (``transformer.h.0.attn.c_attn.weight`` (16, 48), the square ``attn.c_proj`` (16, 16),
  ``mlp.c_fc`` (16, 64), ``mlp.c_proj`` (64, 16)), and **no** ``lm_head.weight``: GPT-2 ties it
  to ``transformer.wte.weight`` and the tied copy is not saved.
* ``gpt2_conv1d_true/``: LoRA r=4, lora_alpha=8 on c_attn, c_proj (both: attention and MLP) and
  c_fc. PEFT sets ``fan_in_fan_out: true`` for Conv1D itself. float32.
* ``gpt2_tied/``: LoRA on c_attn and lm_head, the output layer tied to ``wte`` (PEFT also saves
  ``lm_head.base_layer.weight``, a copy of the tied weight; and since lm_head is an nn.Linear,
  PEFT flips the saved flag to ``fan_in_fan_out: false``, so the flag says nothing about the
  Conv1D modules).
* ``gpt2_conv1d_false/``: the same tensors with ``fan_in_fan_out: false`` in the config, as real
  GPT-2 adapters on the Hub carry it (PEFT warns and flips the flag at load time; the saved flag
  stays whatever the user wrote in older versions).
* ``gpt2_bf16/``, ``gpt2_fp16/``: the ``gpt2_conv1d_true`` adapter saved from a model cast to
  bfloat16 / float16 (the factors rounded by torch).
* ``gpt2_cls/``: ``GPT2ForSequenceClassification`` (3 labels) with LoRA r=4 on c_attn and c_fc,
  ``lora_bias=True`` (every ``lora_B`` has a bias), and ``modules_to_save=["score"]`` (the
  classifier head, saved in full as ``base_model.model.score.weight``). Plus, as older PEFT
  versions wrote them and as real adapters still carry them, LoRA factors under PEFT's wrapper
  paths ``score.original_module.lora_{A,B}.weight`` and ``score.modules_to_save.lora_{A,B}.weight``
  (B = 0).
* ``gpt2_emb/``: LoRA on c_attn and the embedding ``wte`` (``lora_embedding_A`` (4, 50),
  ``lora_embedding_B`` (16, 4)), saved with ``save_embedding_layers=True``: a full copy of the
  embedding ``transformer.wte.base_layer.weight`` and of the tied ``lm_head.weight``.
* ``bart_base/model.safetensors`` and ``bart_lora/``: a tiny ``BartModel`` (d_model 16, 2 encoder
  and 2 decoder layers, ffn 24) and LoRA r=4 on q_proj, v_proj (in the encoder's self_attn, the
  decoder's self_attn and encoder_attn: one short name, three matrices per layer) and fc1.
* ``gpt2_nan/``: ``gpt2_conv1d_true`` with one NaN written into
  ``transformer.h.1.mlp.c_fc.lora_B.weight``.
* ``gpt2_lfs/``: ``gpt2_conv1d_true``'s config, and a Git LFS pointer (the text git writes in place
  of a large file before ``git lfs pull``) as ``adapter_model.safetensors``.

Each ``reference.npz`` (PEFT adapters): for every LoRA module M (its path without
``base_model.model.``), ``delta/M``: PEFT's ``get_delta_weight("default")`` in float64, in the
layout of the base weight (Conv1D: (in, out)); ``merged/M``: the module's weight after
``merge_and_unload()`` on a float64 model, same layout; ``conv1d/M`` () 1 for a Conv1D module,
else 0.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    BartConfig,
    BartModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)
from transformers.pytorch_utils import Conv1D

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "svd")
PREFIX = "base_model.model."


def gpt2_config(**kw):
    return GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


def fill_lora(model, seed: int) -> None:
    """Give every LoRA factor seeded values (A ~ U(±1/sqrt(d_in)), B ~ N(0, 0.3²); embeddings:
    A ~ N(0, 0.3²), B ~ N(0, 1)), float64 first, then the model's dtype."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" not in name:
                continue
            if "lora_embedding_A" in name or ("lora_B" in name and "bias" not in name):
                a = rng.normal(0, 0.3 if "lora_embedding_A" in name else 0.3, p.shape)
            elif "lora_embedding_B" in name:
                a = rng.normal(0, 1.0, p.shape)
            elif "lora_B" in name:                                    # lora_bias
                a = rng.normal(0, 0.1, p.shape)
            else:
                a = rng.uniform(-1, 1, p.shape) / np.sqrt(p.shape[-1])
            p.copy_(torch.as_tensor(a, dtype=p.dtype))


def save(model, out_dir, **kw):
    model.save_pretrained(out_dir, **kw)
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)


def reference(peft_model, out_dir) -> None:
    """PEFT's ΔW and merged weight of every LoRA module, float64, in the base weight's layout."""
    ref = {}
    m64 = peft_model.to(torch.float64)
    for name, mod in m64.named_modules():
        if not hasattr(mod, "get_delta_weight") or "default" not in getattr(mod, "lora_A", {}) \
                and "default" not in getattr(mod, "lora_embedding_A", {}):
            continue
        path = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if "modules_to_save" in path or "original_module" in path:
            continue
        ref[f"delta/{path}"] = mod.get_delta_weight("default").detach().numpy().astype(np.float64)
        ref[f"conv1d/{path}"] = np.array(int(isinstance(mod.base_layer, Conv1D)))
    merged = m64.merge_and_unload()
    params = dict(merged.named_parameters())
    for key in [k for k in ref if k.startswith("delta/")]:
        path = key[len("delta/"):]
        w = params.get(f"{path}.weight")
        if w is None:                       # a tied lm_head shares the embedding's parameter
            w = dict(merged.named_parameters(remove_duplicate=False))[f"{path}.weight"]
        ref[f"merged/{path}"] = w.detach().numpy().astype(np.float64)
    np.savez(os.path.join(out_dir, "reference.npz"), **ref)


def gpt2_fixtures():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config()).eval()
    base.save_pretrained(os.path.join(OUT, "gpt2_base"), safe_serialization=True)
    for f in os.listdir(os.path.join(OUT, "gpt2_base")):
        if f != "model.safetensors":
            os.remove(os.path.join(OUT, "gpt2_base", f))
    def lora_model(dtype=torch.float32, targets=("c_attn", "c_proj", "c_fc"), seed=1):
        torch.manual_seed(0)
        m = GPT2LMHeadModel(gpt2_config()).eval()
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                          fan_in_fan_out=True, init_lora_weights=True))
        fill_lora(pm, seed)
        return pm.to(dtype)

    pm = lora_model(targets=("c_attn", "lm_head"), seed=6)
    out = os.path.join(OUT, "gpt2_tied")
    save(pm, out)
    reference(pm, out)

    for name, dtype in (("gpt2_conv1d_true", torch.float32), ("gpt2_bf16", torch.bfloat16),
                        ("gpt2_fp16", torch.float16)):
        pm = lora_model(dtype)
        out = os.path.join(OUT, name)
        save(pm, out)
        reference(pm, out)
    src = os.path.join(OUT, "gpt2_conv1d_true")
    for name in ("gpt2_conv1d_false", "gpt2_nan", "gpt2_lfs"):
        os.makedirs(os.path.join(OUT, name), exist_ok=True)
        cfg = json.load(open(os.path.join(src, "adapter_config.json")))
        if name == "gpt2_conv1d_false":
            cfg["fan_in_fan_out"] = False
        json.dump(cfg, open(os.path.join(OUT, name, "adapter_config.json"), "w"), indent=2,
                  sort_keys=True)
    shutil.copy(os.path.join(src, "adapter_model.safetensors"),
                os.path.join(OUT, "gpt2_conv1d_false"))
    shutil.copy(os.path.join(src, "reference.npz"), os.path.join(OUT, "gpt2_conv1d_false"))
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    t[f"{PREFIX}transformer.h.1.mlp.c_fc.lora_B.weight"][3, 1] = float("nan")
    save_file(t, os.path.join(OUT, "gpt2_nan", "adapter_model.safetensors"),
              metadata={"format": "pt"})
    size = os.path.getsize(os.path.join(src, "adapter_model.safetensors"))
    with open(os.path.join(OUT, "gpt2_lfs", "adapter_model.safetensors"), "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\n"
                "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                f"size {size}\n")

    # a classifier: lora_bias, modules_to_save, and PEFT's legacy wrapper paths
    torch.manual_seed(0)
    cls = GPT2ForSequenceClassification(gpt2_config(num_labels=3)).eval()
    pm = get_peft_model(cls, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                        modules_to_save=["score"], lora_bias=True,
                                        fan_in_fan_out=True))
    fill_lora(pm, 2)
    with torch.no_grad():
        pm.base_model.model.score.modules_to_save["default"].weight.add_(0.05)
    out = os.path.join(OUT, "gpt2_cls")
    save(pm, out)
    reference(pm, out)
    t = load_file(os.path.join(out, "adapter_model.safetensors"))
    rng = np.random.default_rng(3)
    for part in ("original_module", "modules_to_save"):
        t[f"{PREFIX}score.{part}.lora_A.weight"] = torch.as_tensor(
            rng.uniform(-0.2, 0.2, (4, 16)), dtype=torch.float32)
        t[f"{PREFIX}score.{part}.lora_B.weight"] = torch.zeros(3, 4)
    save_file(t, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})

    # LoRA on the embedding, saved with the embedding layers
    torch.manual_seed(0)
    m = GPT2LMHeadModel(gpt2_config()).eval()
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"],
                                      fan_in_fan_out=True))
    fill_lora(pm, 4)
    out = os.path.join(OUT, "gpt2_emb")
    save(pm, out, save_embedding_layers=True)
    reference(pm, out)


def bart_fixtures():
    torch.manual_seed(0)
    cfg = BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                     vocab_size=40, max_position_embeddings=16)
    base = BartModel(cfg).eval()
    base.save_pretrained(os.path.join(OUT, "bart_base"), safe_serialization=True)
    for f in os.listdir(os.path.join(OUT, "bart_base")):
        if f != "model.safetensors":
            os.remove(os.path.join(OUT, "bart_base", f))
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                         target_modules=["q_proj", "v_proj", "fc1"]))
    fill_lora(pm, 5)
    out = os.path.join(OUT, "bart_lora")
    save(pm, out)
    reference(pm, out)


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__)], env=env))
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    gpt2_fixtures()
    bart_fixtures()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
