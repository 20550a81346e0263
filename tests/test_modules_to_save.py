"""modules_to_save: whole modules trained beside any method, saved inside the method's own file
(``lm_head.modules_to_save.default.weight``) and in PEFT's directory layout (both the 0.21 plain
key and the older ``modules_to_save.default`` key), merged and restored; errors."""
import json
import math

import numpy as np
import pytest
from helpers import batch, np_
from peft_gpt import PEFT_DIR, fixture_gpt, logits_of, reference
from safetensors.numpy import load_file, save_file

from minilora import backend
from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.methods.lora import inject_lora, merge_lora, unmerge_lora
from minilora.methods.lora.peft_io import export_peft, import_peft
from minilora.model import GPT
from minilora.optim import AdamW
from minilora.methods.houlsby import HoulsbyConfig
from minilora.methods.bitfit import BitFitConfig
from minilora.errors import PeftError
from minilora.methods.prompt import PromptConfig
from minilora.nn.modules_to_save import add_modules_to_save, count_modules_to_save
from helpers import apply_method

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)


@pytest.mark.parametrize("config", [LoraConfig(r=2), HoulsbyConfig(bottleneck=2),
                                    BitFitConfig(), PromptConfig(prompt_len=2)])
def test_any_method_trains_the_saved_module_and_nothing_else_new(config):
    gpt = GPT(TINY, 0, dtype="float64")
    model = inject_lora(gpt, config) and gpt if isinstance(config, LoraConfig) \
        else apply_method(gpt, config)
    before = {n for n, _, _ in model.named_trainable()}
    saved = add_modules_to_save(model, ("lm_head", "ln_f"))
    after = {n for n, _, _ in model.named_trainable()}
    saved_names = {"lm_head.weight", "ln_f.weight", "ln_f.bias"}
    assert saved_names <= after and after - before <= saved_names and "lm_head.weight" not in before
    assert count_modules_to_save(model, ("lm_head", "ln_f")) == TINY.vocab_size * 8 + 16
    head0 = np_(gpt.lm_head.params["weight"]).copy()
    opt = AdamW(model, lr=1e-2)
    x, y = batch(0, B=2, T=4, V=11)
    model.forward_backward(x, y)
    opt.step()
    assert not np.allclose(np_(gpt.lm_head.params["weight"]), head0)
    saved.restore()  # the adapter switched off: the base head again
    np.testing.assert_array_equal(np_(gpt.lm_head.params["weight"]), head0)


def test_unknown_or_adapted_module_is_one_clear_error():
    gpt = GPT(TINY, 0)
    inject_lora(gpt, LoraConfig(r=2, target_modules=("q", "v", "lm_head")))
    with pytest.raises(PeftError, match="no module of the model is named 'head'"):
        add_modules_to_save(gpt, ("head",))
    with pytest.raises(PeftError, match="already adapted"):
        add_modules_to_save(gpt, ("lm_head",))
    with pytest.raises(PeftError, match="list of module names"):
        add_modules_to_save(gpt, (3,))


def test_peft_lora_with_saved_lm_head_reproduces_peft_logits_and_merge():
    ref = reference("gpt_lora_mts")
    model = fixture_gpt(ref)
    config = import_peft(PEFT_DIR / "gpt_lora_mts", model)
    assert set(config.target_modules) == {"q", "v"}
    np.testing.assert_allclose(np_(model.lm_head.params["weight"]), ref["merged/lm_head.weight"],
                               rtol=0, atol=0)
    assert model.lm_head.trainable == {"weight"}
    np.testing.assert_allclose(logits_of(model, ref), ref["logits"], rtol=0, atol=1e-8)
    merge_lora(model)
    np.testing.assert_allclose(logits_of(model, ref), ref["logits_merged"], rtol=0, atol=1e-8)
    for name in ("blocks.0.attn.q.weight", "blocks.1.attn.v.weight"):
        np.testing.assert_allclose(np_(model.state_dict()[name]), ref[f"merged/{name}"],
                                   rtol=1e-12, atol=1e-14)
    unmerge_lora(model)
    np.testing.assert_allclose(logits_of(model, ref), ref["logits"], rtol=0, atol=1e-8)


def test_export_writes_peft_021_layout_and_reads_the_old_one(tmp_path):
    ref = reference("gpt_lora_mts")
    model = fixture_gpt(ref)
    config = import_peft(PEFT_DIR / "gpt_lora_mts", model)
    export_peft(tmp_path / "new", model, config, modules_to_save=("lm_head",))
    ours = load_file(str(tmp_path / "new" / "adapter_model.safetensors"))
    theirs = load_file(str(PEFT_DIR / "gpt_lora_mts" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs) and "base_model.model.lm_head.weight" in ours
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    d = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert d["modules_to_save"] == ["lm_head"]
    # the layout of PEFT before 0.21: ...lm_head.modules_to_save.default.weight
    old = {k.replace("lm_head.weight", "lm_head.modules_to_save.default.weight"): v
           for k, v in theirs.items()}
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "adapter_model.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text(
        (PEFT_DIR / "gpt_lora_mts" / "adapter_config.json").read_text())
    fresh = fixture_gpt(ref)
    import_peft(tmp_path / "old", fresh)
    np.testing.assert_allclose(logits_of(fresh, ref), ref["logits"], rtol=0, atol=1e-8)


def test_config_naming_a_module_the_file_lacks(tmp_path):
    ref = reference("gpt_lora_mts")
    d = json.loads((PEFT_DIR / "gpt_lora_mts" / "adapter_config.json").read_text())
    tensors = {k: v for k, v in load_file(str(PEFT_DIR / "gpt_lora_mts" /
                                               "adapter_model.safetensors")).items()
               if "lm_head" not in k}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    from minilora.peft_format import PeftFormatError
    with pytest.raises(PeftFormatError, match="modules_to_save names"):
        import_peft(tmp_path, fixture_gpt(ref))


def _perturb_trainable(model, seed):
    """Every trainable array moved off its init (as if trained)."""
    rng = np.random.default_rng(seed)
    for _, a, _ in model.named_trainable():
        a += backend.asarray(rng.normal(0.0, 0.1, a.shape), dtype=a.dtype)


def _load_fresh(method, path):
    from minilora.methods.lora import load_adapter
    from minilora.methods.ia3 import load_ia3
    from helpers import load_method
    fresh = GPT(TINY, 0, dtype="float64")
    if method in ("lora", "dora"):
        load_adapter(path, fresh)
        return fresh
    if method == "ia3":
        load_ia3(path, fresh)
        return fresh
    return load_method(path, fresh)[0]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bitfit", "houlsby", "prompt"])
def test_saved_modules_travel_inside_the_methods_own_file(tmp_path, method):
    """modules_to_save lands in the method's file as lm_head.modules_to_save.default.weight
    (no second file); loading it into a fresh base gives the trained model's logits exactly,
    with the saved modules trainable."""
    from minilora.experiments.methods import Extras, setup_method
    config = {"lora": LoraConfig(r=2), "dora": LoraConfig(r=2, use_dora=True),
              "houlsby": HoulsbyConfig(bottleneck=2), "prompt": PromptConfig(prompt_len=2)
              }.get(method)
    s = setup_method(method, GPT(TINY, 0, dtype="float64"), None,
                        Extras(config, ("lm_head", "ln_f")))
    _perturb_trainable(s.model, 1)
    name = s.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    keys = set(load_file(str(tmp_path / name)))
    assert {"lm_head.modules_to_save.default.weight", "ln_f.modules_to_save.default.weight",
            "ln_f.modules_to_save.default.bias"} <= keys
    assert not keys & {"lm_head.weight", "ln_f.weight"}
    fresh = _load_fresh(method, tmp_path / name)
    idx = backend.asarray(np.arange(8).reshape(2, 4) % TINY.vocab_size)
    np.testing.assert_array_equal(np_(fresh.forward(idx)[0]), np_(s.model.forward(idx)[0]))
    assert {"lm_head.weight", "ln_f.weight", "ln_f.bias"} <= {
        n for n, _, _ in fresh.named_trainable()}


def test_saved_module_of_another_shape_is_refused_before_loading(tmp_path):
    from minilora.methods.lora import LoRAError, lora_layers, save_adapter
    gpt = GPT(TINY, 0, dtype="float64")
    inject_lora(gpt, LoraConfig(r=2))
    save_adapter(tmp_path / "a.safetensors", gpt, LoraConfig(r=2), ("lm_head",))
    arrays = load_file(str(tmp_path / "a.safetensors"))
    from minilora.nn.modules_to_save import split_saved_modules
    rest, saved, paths = split_saved_modules(arrays)
    assert paths == ["lm_head"] and set(saved) == {"lm_head.weight"}
    assert all(".lora_" in k for k in rest)
    from minilora.nn.modules_to_save import check_saved_modules
    other = GPT(GPTConfig(vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=8), 0)
    with pytest.raises(PeftError, match="has shape"):
        check_saved_modules(other, paths, saved, "a.safetensors")
    fresh = GPT(TINY, 0, dtype="float64")
    del fresh.lm_head.params["weight"]       # a model without that parameter: refused first
    from minilora.methods.lora import load_adapter
    with pytest.raises(LoRAError, match="which this model does not have"):
        load_adapter(tmp_path / "a.safetensors", fresh)
    assert not lora_layers(fresh)            # nothing was injected


def test_qlora_and_adalora_files_carry_the_saved_head(tmp_path):
    from minilora.checkpoint import save_checkpoint
    from minilora.data.text import CharTokenizer
    from minilora.experiments.methods import Extras, setup_method
    from minilora.methods.adalora import AdaLoraConfig, import_adalora_peft
    from minilora.methods.qlora import load_qlora_adapter
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=64)
    tok = CharTokenizer("abcdefghijk")
    base = GPT(cfg, 0)
    save_checkpoint(tmp_path / "base.safetensors", base, tok)
    idx = backend.asarray(np.arange(8).reshape(1, 8))
    s = setup_method("qlora", GPT(cfg, 0), tok, Extras(LoraConfig(r=2), ("lm_head",)))
    _perturb_trainable(s.model, 2)
    name = s.save(tmp_path)
    assert "lm_head.modules_to_save.default.weight" in load_file(str(tmp_path / name))
    model, _, _, _ = load_qlora_adapter(tmp_path / name, tmp_path / "base.safetensors")
    np.testing.assert_array_equal(np_(model.forward(idx)[0]), np_(s.model.forward(idx)[0]))
    ada = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=("q", "v"),
                        total_step=10)
    s = setup_method("adalora", GPT(cfg, 0), tok, Extras(ada, ("lm_head",)))
    _perturb_trainable(s.model, 3)
    name = s.save(tmp_path / "ada")
    d = json.loads((tmp_path / "ada" / "adalora" / "adapter_config.json").read_text())
    assert d["modules_to_save"] == ["lm_head"]
    assert "base_model.model.lm_head.weight" in load_file(str(tmp_path / "ada" / name))
    fresh = GPT(cfg, 0)
    import_adalora_peft(tmp_path / "ada" / "adalora", fresh)
    np.testing.assert_allclose(np_(fresh.forward(idx)[0]), np_(s.model.forward(idx)[0]),
                               rtol=1e-5, atol=1e-6)


def test_harness_extras_for_any_method(tmp_path):
    """The fine-tuning harness's wrapper: modules_to_save at its own peak lr, LoRA+ scale, the
    sidecar file, and one clear error for combinations that mean nothing."""
    from minilora.errors import UsageError
    from minilora.experiments.methods import Extras, setup_method
    from minilora.methods.registry import METHODS
    from minilora.optim import group_scale
    gpt = GPT(TINY, 0, dtype="float64")
    s = setup_method("bitfit", gpt, None, Extras(None, ("lm_head",), None, 1e-3, 1e-2))
    assert s.config["modules_to_save"] == ["lm_head"]
    assert math.isclose(group_scale(s.groups)("lm_head.weight"), 0.1)
    assert group_scale(s.groups)("blocks.0.attn.q.bias") == 1.0
    assert s.save(tmp_path) == "bitfit.safetensors"
    assert "lm_head.modules_to_save.default.weight" in load_file(str(tmp_path /
                                                                     "bitfit.safetensors"))
    s = setup_method("lora", GPT(TINY, 0), None, Extras(LoraConfig(r=2), ("lm_head",), 4.0,
                                                        1e-3, 2e-3))
    assert group_scale(s.groups)("blocks.0.attn.q.lora_B") == 4.0
    assert math.isclose(group_scale(s.groups)("lm_head.weight"), 0.5)
    with pytest.raises(UsageError, match="has none"):
        setup_method("bitfit", GPT(TINY, 0), None, Extras(None, (), 4.0))
    with pytest.raises(UsageError, match="trains every module already"):
        setup_method("full", GPT(TINY, 0), None, Extras(None, ("lm_head",)))
    with pytest.raises(UsageError, match="loraplus ratio"):
        setup_method("lora", GPT(TINY, 0), None, Extras(None, (), -2.0))
    assert {"dora", "adalora", "ia3"} <= set(METHODS)


@pytest.mark.parametrize("method,config,extra_params", [
    ("ia3", None, 0),
    ("dora", LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v"), use_dora=True), 0),
    ("bitfit", "mts", 1),
])
def test_new_methods_run_in_the_harness(tmp_path, method, config, extra_params):
    from minilora.config import TrainConfig
    from minilora.experiments.finetune import finetune
    from minilora.experiments.methods import Extras
    cfg = TrainConfig(max_steps=2, batch_size=2, block_size=32, lr=5e-3, min_lr=5e-4,
                      warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=10**9)
    if config == "mts":
        config = Extras(None, ("lm_head",), None, 1e-3)
    r = finetune(method, "milton", config, cfg, out_dir=tmp_path, progress=False, eval_batches=1,
                 measure_memory=False)
    L, C, V = 6, 160, 97
    want = {"ia3": L * (C + C + 4 * C), "dora": L * 2 * (2 * C * 2 + C),
            "bitfit": L * (9 * C + 2 * C) + C + V * C}[method]
    assert r["trainable_params"] == want
    assert r["task_loss"] != r["task_loss_base"]
    assert (tmp_path / r["weights_file"].split(" + ")[0]).is_file()


def test_the_adapter_registry_refuses_an_adapter_with_saved_modules(tmp_path):
    from minilora.adapters import AdapterRegistry
    from minilora.methods.lora import LoRAError, save_adapter
    gpt = GPT(TINY, 0, dtype="float64")
    inject_lora(gpt, LoraConfig(r=2))
    save_adapter(tmp_path / "a.safetensors", gpt, LoraConfig(r=2), ("lm_head",))
    registry = AdapterRegistry(GPT(TINY, 0, dtype="float64"))
    with pytest.raises(LoRAError, match="modules_to_save: lm_head"):
        registry.load("a", tmp_path / "a.safetensors")
