"""AdaLoRA: gradients (layer and orthogonality regulariser) in float64, start at the base, merge
round trip, the budget schedule and pruning never above budget, config errors, and the whole
12-step PEFT run of the fixture replayed step for step (ranks kept, ΔW, logits)."""
import json
import math

import numpy as np
import pytest
from helpers import batch, lora_layer_gradcheck, np_, randn
from peft_gpt import PEFT_DIR, fixture_gpt, logits_of, reference

from minilora import backend
from minilora.config import ConfigError, GPTConfig
from minilora.gradcheck import check, format_table
from minilora.methods.adalora import AdaLoraConfig, AdaLoRALinear, adalora_layers
from minilora.methods.adalora import export_adalora_peft, import_adalora_peft
from minilora.methods.adalora import (
    ADALORA,
    inject_adalora,
    orth_regularizer,
    orth_regularizer_backward,
)
from minilora.model import GPT
from minilora.nn.layers import Linear
from minilora.optim import AdamW

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, init_std=0.3)


def randomise(model, rng, std=0.3):
    for m in adalora_layers(model).values():
        for k in ("lora_A", "lora_E", "lora_B"):
            m.params[k] = backend.asarray(std * rng.standard_normal(m.params[k].shape))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_gradcheck(xpb, rng, dropout, bias):
    base = Linear(randn(rng, 4, 5), randn(rng, 4) if bias else None)
    layer = AdaLoRALinear(base, r=3, lora_alpha=6, lora_dropout=dropout, rng=1)
    layer.params["lora_E"] = randn(rng, 3, 1)
    layer.trainable |= {"weight"} | ({"bias"} if bias else set())
    rows = lora_layer_gradcheck(layer, randn(rng, 2, 3, 5), randn(rng, 2, 3, 4))
    assert {r["name"] for r in rows} >= {"dx", "dlora_A", "dlora_E", "dlora_B"}
    assert all(r["ok"] for r in rows), format_table(rows)


def test_orthogonality_regulariser_value_and_gradient(xpb, rng):
    model = GPT(TINY, 0, dtype="float64")
    inject_adalora(model, AdaLoraConfig(init_r=3, target_r=2, target_modules=("q", "up"),
                                        total_step=10))
    randomise(model, rng)
    layers = adalora_layers(model)
    want = np.mean([np.linalg.norm(np_(m.params["lora_A"]) @ np_(m.params["lora_A"]).T - np.eye(3))
                    for m in layers.values()] +
                   [np.linalg.norm(np_(m.params["lora_B"]).T @ np_(m.params["lora_B"]) - np.eye(3))
                    for m in layers.values()])
    assert math.isclose(orth_regularizer(model), want, rel_tol=1e-13)
    model.zero_grad()
    orth_regularizer_backward(model, weight=0.7)
    rows = [check(f"{n}.{k}", m.grads[k], lambda: 0.7 * orth_regularizer(model), m.params[k])
            for n, m in layers.items() for k in ("lora_A", "lora_B")]
    assert all(r["ok"] for r in rows), format_table(rows)


def test_whole_model_gradcheck_includes_the_regulariser(xpb, rng):
    """The GPT's backward plus the allocator's after_backward (the training callback) = d(CE + w
    R): check it against CE + w R by finite differences."""
    from minilora.nn import ops
    cfg = AdaLoraConfig(init_r=2, target_r=1, target_modules=("q", "v", "down"), total_step=5,
                        orth_reg_weight=0.5)
    tuned = ADALORA.apply(GPT(TINY, 0, dtype="float64"), cfg)
    model, (alloc,) = tuned.model, tuned.callbacks
    randomise(model, rng)
    x, y = batch(1, B=2, T=5, V=11)
    model.forward_backward(x, y)
    alloc.after_backward()
    grads = {n: g.copy() for n, _, g in model.named_trainable()}

    def f():
        ce = ops.cross_entropy_forward(model.forward(x, check=False)[0], y)[0]
        return backend.to_scalar(ce) + 0.5 * orth_regularizer(model)
    rows = [check(n, grads[n], f, p) for n, p, _ in model.named_trainable()]
    assert all(r["ok"] for r in rows), format_table(rows)


def test_starts_at_the_base_and_merge_round_trips(xpb, rng):
    model = GPT(TINY, 0, dtype="float64")
    idx = backend.asarray(np.arange(10).reshape(2, 5))
    base = np_(model.forward(idx)[0]).copy()
    inject_adalora(model, AdaLoraConfig(init_r=3, target_r=2, total_step=10))
    np.testing.assert_array_equal(np_(model.forward(idx)[0]), base)  # E = 0
    randomise(model, rng)
    out = np_(model.forward(idx)[0]).copy()
    w0 = np_(model.state_dict()["blocks.0.attn.q.weight"]).copy()
    for m in adalora_layers(model).values():
        m.merge()
    np.testing.assert_allclose(np_(model.forward(idx)[0]), out, rtol=1e-12, atol=1e-12)
    for m in adalora_layers(model).values():
        m.unmerge()
    np.testing.assert_allclose(np_(model.state_dict()["blocks.0.attn.q.weight"]), w0,
                               rtol=1e-13, atol=1e-15)


def test_schedule_and_pruning_never_exceed_the_budget(rng):
    """With deltaT = 1 every step ends with at most the budget in use. (With deltaT > 1, as in
    PEFT, masked E entries get gradients again between two prunings, so the budget holds at the
    pruning steps only.)"""
    cfg = AdaLoraConfig(init_r=4, target_r=2, target_modules=("q", "k", "v", "up"), tinit=3,
                        tfinal=4, deltaT=1, total_step=30, orth_reg_weight=0.1)
    tuned = ADALORA.apply(GPT(TINY, 0, dtype="float64"), cfg)
    model, (alloc,) = tuned.model, tuned.callbacks
    randomise(model, rng, std=0.2)
    assert alloc.init_bgt == 4 * 8 and alloc.target_bgt == 2 * 8
    budgets = [alloc.budget_schedule(t)[0] for t in range(30)]
    assert budgets[:4] == [32] * 4 and budgets[-5:] == [16] * 5
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # only shrinks
    opt = AdamW(model, lr=1e-2)
    for step in range(30):
        x, y = batch(step, B=2, T=5, V=11)
        model.forward_backward(x, y)
        alloc.after_backward()
        opt.step()
        alloc.after_step(step)  # the training callback: score and prune
        assert alloc.kept() <= budgets[step]
    assert alloc.kept() == 16 and sum(alloc.ranks().values()) == 16
    assert len(set(alloc.ranks().values())) > 1  # the budget moved between layers
    assert [h[1] for h in alloc.history] == sorted((h[1] for h in alloc.history), reverse=True)
    assert all(kept <= budget for _, budget, kept in alloc.history)


@pytest.mark.parametrize("kw,match", [
    (dict(init_r=4, target_r=6), "target_r=6 is above init_r=4"),
    (dict(tinit=5, tfinal=5, total_step=10), "must be less than total_step"),
    (dict(beta1=1.0), "beta1 must be in"),
    (dict(target_modules=("wte",)), "AdaLoRA adapts"),
    (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        AdaLoraConfig(**kw)


# ----------------------------------------------------------------------------------------------
# the real-PEFT fixture: AdaLoRA init_r 6, target_r 3 on q,k,v,o,up,down; 12 steps
# ----------------------------------------------------------------------------------------------
def test_peft_adalora_file_reproduces_peft_logits_and_deltas(tmp_path):
    ref = reference("gpt_adalora")
    model = fixture_gpt(ref)
    config, ranks = import_adalora_peft(PEFT_DIR / "gpt_adalora", model)
    assert config.init_r == 6 and config.target_r == 3 and sum(ranks.values()) == 36
    np.testing.assert_allclose(logits_of(model, ref), ref["logits"], rtol=0, atol=1e-8)
    for name, m in adalora_layers(model).items():
        peft = name.replace("blocks", "model.layers").replace("attn.", "self_attn.") + "_proj"
        assert ranks[name] == ref[f"rank_kept/{peft}"] and m.ranknum == 6
        np.testing.assert_allclose(np_(m.delta_weight()), ref[f"delta/{peft}"], rtol=1e-10,
                                   atol=1e-14)
    export_adalora_peft(tmp_path, model, config)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    for name, r in ranks.items():  # PEFT's pattern: init_r entries, the kept ones True
        pattern = d["rank_pattern"][name.replace("blocks", "model.layers").replace(
            "attn.", "self_attn.") + "_proj.lora_E"]
        assert len(pattern) == config.init_r and sum(pattern) == r
    from safetensors.numpy import load_file
    ours, theirs = (load_file(str(p / "adapter_model.safetensors")) for p in
                    (tmp_path, PEFT_DIR / "gpt_adalora"))
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_replaying_peft_training_gives_peft_allocation():
    """The fixture's run (torch AdamW lr 1e-2, weight decay 0.01, betas (0.9, 0.999), no
    clipping; CE on the ids rolled by one + 0.5 R; update_and_allocate after each step) from
    the same NumPy draws: our allocator must keep the same triplets and reach the same ΔW."""
    ref = reference("gpt_adalora")
    d = json.loads((PEFT_DIR / "gpt_adalora" / "adapter_config.json").read_text())
    cfg = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, tinit=2, tfinal=3, deltaT=1,
                        total_step=12, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                        target_modules=("q", "k", "v", "o", "up", "down"))
    tuned = ADALORA.apply(fixture_gpt(ref), cfg)
    model, (alloc,) = tuned.model, tuned.callbacks
    name = "gpt_adalora"
    rng = np.random.default_rng([20261129, sum(map(ord, name)), len(name)])
    for m in adalora_layers(model).values():  # tree order = the fixture's module order
        for k, std in (("lora_A", 0.3), ("lora_B", 0.3), ("lora_E", 0.0)):
            m.params[k] = backend.asarray(std * rng.standard_normal(m.params[k].shape))
    x = backend.asarray(ref["input_ids"])
    y = backend.asarray(np.roll(ref["input_ids"], -1, axis=1))
    opt = AdamW(model, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for step in range(cfg.total_step):
        model.forward_backward(x, y)
        alloc.after_backward()
        opt.step(grad_clip=0.0)
        alloc.after_step(step)
    for n, keep in alloc.rank_pattern.items():
        peft = n.replace("blocks", "model.layers").replace("attn.", "self_attn.") + "_proj"
        assert keep == d["rank_pattern"][f"{peft}.lora_E"], n
        np.testing.assert_allclose(np_(adalora_layers(model)[n].delta_weight()),
                                   ref[f"delta/{peft}"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(logits_of(model, ref), ref["logits"], rtol=0, atol=1e-10)
    assert math.isclose(model.loss(x, y) + 0.5 * orth_regularizer(model), float(ref["loss_total"]),
                        rel_tol=1e-8)


def test_adalora_with_saved_head_loads_in_real_peft(tmp_path):
    """Our AdaLoRA folder with modules_to_save=["lm_head"] in real PEFT: the same logits, before
    and after merge_and_unload; PEFT's own re-save imports back exactly."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import sys
    sys.path.insert(0, str(PEFT_DIR.parent))
    import make_peft_fixtures as fx
    from peft import PeftModel

    from minilora.nn.modules_to_save import add_modules_to_save
    ref = reference("gpt_adalora")
    model = fixture_gpt(ref)
    config, _ = import_adalora_peft(PEFT_DIR / "gpt_adalora", model)
    add_modules_to_save(model, ["lm_head"])
    head = model.lm_head.params["weight"]
    head += backend.asarray(0.05 * np.random.default_rng(0).standard_normal(head.shape))
    ours = logits_of(model, ref)
    export_adalora_peft(tmp_path / "a", model, config, modules_to_save=["lm_head"])
    d = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert d["modules_to_save"] == ["lm_head"] and d["task_type"] == "CAUSAL_LM"
    d["task_type"] = None  # the toy torch GPT has no transformers generation helpers
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(d))
    base = {k[len("base/"):]: v for k, v in ref.items() if k.startswith("base/")}
    pm = PeftModel.from_pretrained(fx.llama_named_gpt(fx.load_torch_gpt(), base),
                                   str(tmp_path / "a")).eval()
    np.testing.assert_allclose(fx.logits_of(pm, ref["input_ids"]), ours, rtol=0, atol=1e-12)
    pm.save_pretrained(str(tmp_path / "b"))
    fresh = fixture_gpt(ref)
    import_adalora_peft(tmp_path / "b", fresh)
    np.testing.assert_allclose(logits_of(fresh, ref), ours, rtol=0, atol=1e-12)
    merged = pm.merge_and_unload()
    np.testing.assert_allclose(fx.logits_of(merged, ref["input_ids"]), ours, rtol=0, atol=1e-12)
