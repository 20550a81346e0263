"""Houlsby adapters, prefix tuning, prompt tuning, BitFit: gradients, step-0 behaviour, counts,
freezing, adapter files, errors, and a tiny run of each in the fine-tuning harness.

Gradient checks run in float64 with centred differences (``minilora.gradcheck``): a correct
backward agrees to ~1e-8 relative, so ``tol=1e-6`` leaves two orders of margin while a wrong
gradient is off by O(1).
"""
import json

import numpy as np
import pytest
from helpers import randn

from minilora import backend
from minilora.backend import xp
from minilora.checkpoint import CheckpointError, load_checkpoint
from minilora.config import ConfigError, GPTConfig
from minilora.experiments.paths import base_model_path
from minilora.gradcheck import check, format_table, model_check
from minilora.model import GPT, InputError
from minilora.nn.layers import Linear
from minilora.optim import AdamW
from minilora.methods.houlsby import HoulsbyConfig, HoulsbyLinear, houlsby_layers, inject_houlsby
from minilora.methods.bitfit import BitFitConfig, apply_bitfit
from minilora.errors import PeftError
from minilora.methods.prefix import PrefixConfig, PrefixTuningModel, add_prefix, base_prefix_kv
from minilora.methods.prompt import PromptConfig, PromptTuningModel, add_prompt
from helpers import apply_method, count_method_parameters, load_method, method_tensors, save_method
from minilora.methods.prefix import PrefixKV

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, init_std=0.3)
BASE = GPTConfig(vocab_size=97, block_size=256, n_layer=6, n_head=5, n_embd=160)  # shipped shape


def tiny_model(seed=0, dtype="float64", config=TINY):
    return GPT(config, seed, dtype=dtype)


def batch(seed=0, B=2, T=5, V=11):
    rng = np.random.default_rng(seed)
    return (backend.asarray(rng.integers(0, V, size=(B, T))),
            backend.asarray(rng.integers(0, V, size=(B, T))))


def all_configs():
    """One config per method, with inits that make every gradient non-trivial."""
    return [HoulsbyConfig(bottleneck=3, zero_up=False, init_std=0.3, train_layernorm=True, seed=1),
            PrefixConfig(prefix_len=3, seed=1),
            PrefixConfig(prefix_len=2, init="random", init_std=0.5, seed=2),
            PromptConfig(prompt_len=3, seed=1),
            PromptConfig(prompt_len=2, init="random", seed=2),
            BitFitConfig()]


IDS = ["houlsby", "prefix-vocab", "prefix-random", "prompt-vocab", "prompt-random", "bitfit"]


# ----------------------------------------------------------------------------------------------
# gradient checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_houlsby_adapter_layer_gradcheck(xpb, rng, bias):
    base = Linear(randn(rng, 6, 5), randn(rng, 6) if bias else None)  # d_in 5 -> d 6
    layer = HoulsbyLinear(base, bottleneck=3, init_std=0.5, zero_up=False, rng=3)
    layer.trainable = {"weight"} | ({"bias"} if bias else set())  # the base too, for the check
    x = randn(rng, 2, 4, 5)
    dout = randn(rng, 2, 4, 6)

    def f():
        return xp.sum(layer.forward(x)[0] * dout)

    out, cache = layer.forward(x)
    layer.zero_grad()
    dx = layer.backward(dout, cache)
    down, up = layer.houlsby_down, layer.houlsby_up
    rows = [check("dx", dx, f, x),
            check("dhoulsby_down.weight", down.grads["weight"], f, down.params["weight"]),
            check("dhoulsby_down.bias", down.grads["bias"], f, down.params["bias"]),
            check("dhoulsby_up.weight", up.grads["weight"], f, up.params["weight"]),
            check("dhoulsby_up.bias", up.grads["bias"], f, up.params["bias"]),
            check("dweight", layer.grads["weight"], f, layer.params["weight"])]
    if bias:
        rows.append(check("dbias", layer.grads["bias"], f, layer.params["bias"]))
    assert all(r["ok"] for r in rows), format_table(rows)


def test_houlsby_adapter_formula(rng):
    base = Linear(randn(rng, 6, 5), randn(rng, 6))
    layer = HoulsbyLinear(base, bottleneck=2, init_std=0.5, zero_up=False, rng=0)
    x = randn(rng, 3, 5)
    y = x @ base.params["weight"].T + base.params["bias"]
    h = y @ layer.houlsby_down.params["weight"].T + layer.houlsby_down.params["bias"]
    g = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    ref = y + g @ layer.houlsby_up.params["weight"].T + layer.houlsby_up.params["bias"]
    np.testing.assert_allclose(backend.to_numpy(layer.forward(x)[0]), backend.to_numpy(ref),
                               rtol=1e-12)


def test_prefix_attention_layer_gradcheck(xpb, rng):
    """The prefix's own layer: attention over [prefix; x] keys and values; the layer returns dx
    and hands d(prefix) to the PrefixKV, which sums it over the batch."""
    model = tiny_model()
    attn = model.blocks[0].attn
    x = randn(rng, 2, 4, 8)
    pk, pv = randn(rng, 3, 8), randn(rng, 3, 8)
    dout = randn(rng, 2, 4, 8)

    def f():
        return xp.sum(attn.forward(x, PrefixKV(pk, pv))[0] * dout)

    past = PrefixKV(pk, pv)
    out, cache = attn.forward(x, past)
    dx = attn.backward(dout, cache)
    assert backend.is_array(dx) and dx.shape == x.shape  # the type a backward returns
    rows = [check("dx", dx, f, x), check("dprefix_k", past.dkey, f, pk),
            check("dprefix_v", past.dvalue, f, pv)]
    assert all(r["ok"] for r in rows), format_table(rows)


def test_the_stacks_input_gradcheck(xpb, rng):
    """What prompt tuning composes from outside: GPT.add_positions then GPT.stack, and
    stack_backward's gradient of the stack's input (with every weight frozen)."""
    model = tiny_model()
    model.freeze()
    x = randn(rng, 2, 7, 8)
    dout = randn(rng, 2, 7, 11)

    def f():
        return xp.sum(model.stack(model.add_positions(x)[0])[0] * dout)

    xp_, _ = model.add_positions(x)
    logits, cache = model.stack(xp_)
    dx = model.stack_backward(dout, cache, need_dx=True)
    row = check("dx (stack input)", dx, f, x)
    assert row["ok"], format_table([row])


@pytest.mark.parametrize("config", all_configs(), ids=IDS)
def test_whole_model_gradcheck(xpb, config):
    model = apply_method(tiny_model(), config)
    idx, tgt = batch()
    rows = model_check(model, idx, tgt)
    names = {n for n, _, _ in model.named_trainable()}
    assert rows and len(rows) == len(names)
    assert all(r["ok"] for r in rows), format_table(rows)


# ----------------------------------------------------------------------------------------------
# step 0: what each method does to the base model before training
# ----------------------------------------------------------------------------------------------
def test_adapter_zero_up_gives_base_logits_exactly(xpb):
    base, model = tiny_model(), tiny_model()
    idx, _ = batch()
    inject_houlsby(model, HoulsbyConfig(bottleneck=4))  # zero_up=True: W_up = 0, b_up = 0
    np.testing.assert_array_equal(backend.to_numpy(model.forward(idx)[0]),
                                  backend.to_numpy(base.forward(idx)[0]))
    near = tiny_model()
    inject_houlsby(near, HoulsbyConfig(bottleneck=4, zero_up=False, init_std=1e-2))  # the paper
    d = np.abs(backend.to_numpy(near.forward(idx)[0] - base.forward(idx)[0])).max()
    assert 0 < d < 1e-2  # near-identity, not exact


def test_prompt_vocab_init_equals_base_reading_those_tokens_first(xpb):
    """A soft prompt equal to the embeddings of tokens s gives exactly the base's logits on the
    text s + x (positions included), restricted to x."""
    base = tiny_model()
    idx, _ = batch(T=5)
    model = add_prompt(tiny_model(), PromptConfig(prompt_len=3, seed=4))
    prompt = backend.to_numpy(model.children["prompt"].params["weight"])
    wte = backend.to_numpy(base.wte.params["weight"])
    s = [int(np.argmin(((wte - p) ** 2).sum(1))) for p in prompt]  # which tokens were drawn
    np.testing.assert_array_equal(wte[s], prompt)
    full = np.concatenate([np.tile(s, (2, 1)), backend.to_numpy(idx)], axis=1)
    ref = backend.to_numpy(base.forward(backend.asarray(full))[0])[:, 3:]
    np.testing.assert_allclose(backend.to_numpy(model.forward(idx)[0]), ref, rtol=1e-12,
                               atol=1e-12)


def test_prefix_vocab_init_equals_base_reading_those_tokens_first_without_positions(xpb):
    """No prefix is exactly the identity (the prefix slots always take softmax mass), so the
    logits change at step 0. What holds: the "vocab" prefix holds the keys/values the base
    computes for tokens s, so with position embeddings switched off (wpe = 0) the prefix model on
    x equals the base on s + x, restricted to x; with positions the tokens of x sit P places later
    in the base's run, which is the only difference."""
    base = tiny_model()
    base.wpe.params["weight"][...] = 0.0
    model = tiny_model()
    model.wpe.params["weight"][...] = 0.0
    model = add_prefix(model, PrefixConfig(prefix_len=3, seed=5))
    idx, _ = batch(T=5)
    s = np.random.default_rng(5).integers(0, 11, size=3)  # the ids the init drew
    key, value = base_prefix_kv(base, backend.asarray(s[None, :]))
    np.testing.assert_array_equal(backend.to_numpy(model.children["prefix"].params["key"]),
                                  backend.to_numpy(key))
    full = np.concatenate([np.tile(s, (2, 1)), backend.to_numpy(idx)], axis=1)
    ref = backend.to_numpy(base.forward(backend.asarray(full))[0])[:, 3:]
    np.testing.assert_allclose(backend.to_numpy(model.forward(idx)[0]), ref, rtol=1e-10,
                               atol=1e-12)
    plain = backend.to_numpy(base.forward(idx)[0])
    assert not np.allclose(backend.to_numpy(model.forward(idx)[0]), plain)  # not the identity


def test_bitfit_changes_nothing_at_step_0():
    base, model = tiny_model(), tiny_model()
    apply_bitfit(model, BitFitConfig())
    idx, _ = batch()
    np.testing.assert_array_equal(model.forward(idx)[0], base.forward(idx)[0])


# ----------------------------------------------------------------------------------------------
# counts and freezing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    HoulsbyConfig(bottleneck=4), HoulsbyConfig(bottleneck=2, targets=("o",)),
    HoulsbyConfig(bottleneck=3, train_layernorm=True), PrefixConfig(prefix_len=3),
    PromptConfig(prompt_len=5), BitFitConfig(), BitFitConfig(layernorm=False)])
@pytest.mark.parametrize("model_bias", [True, False])
def test_trainable_count_matches_formula(config, model_bias):
    cfg = GPTConfig(**{**TINY.to_dict(), "bias": model_bias})
    if config == BitFitConfig(layernorm=False) and not model_bias:
        return  # no bias at all: an error (test_inject_twice_and_wrong_inputs)
    model = apply_method(tiny_model(config=cfg), config)
    base_total = cfg.num_parameters()
    n = count_method_parameters(config, cfg)
    assert model.num_parameters(trainable_only=True) == n
    added = 0 if isinstance(config, BitFitConfig) else n - (
        (cfg.n_layer * 2 * 2 * cfg.n_embd + 2 * cfg.n_embd)
        if getattr(config, "train_layernorm", False) else 0)
    assert model.num_parameters() == base_total + added


def test_counts_on_the_base_shape_by_hand():
    L, C = 6, 160
    m = 16
    assert count_method_parameters(HoulsbyConfig(bottleneck=m), BASE) == 12 * (2 * m * C + C + m)
    assert count_method_parameters(HoulsbyConfig(bottleneck=m), BASE) == 63_552
    assert count_method_parameters(PrefixConfig(prefix_len=16), BASE) == 2 * L * 16 * C == 30_720
    assert count_method_parameters(PromptConfig(prompt_len=16), BASE) == 16 * C == 2_560
    assert count_method_parameters(BitFitConfig(), BASE) == L * (9 * C + 2 * C) + C == 10_720
    assert count_method_parameters(BitFitConfig(layernorm=False), BASE) == L * 9 * C


@pytest.mark.parametrize("config", all_configs(), ids=IDS)
def test_frozen_weights_unchanged_after_training_steps(config):
    model = apply_method(tiny_model(dtype="float32"), config)
    before = {n: backend.to_numpy(p).copy() for n, p in model.named_parameters()}
    trainable = {n for n, _, _ in model.named_trainable()}
    opt = AdamW(model, lr=1e-2)
    for s in range(3):
        x, y = batch(seed=s)
        model.forward_backward(x, y)
        assert {n for n, _, g in model.named_trainable() if g is not None} == trainable
        opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not np.array_equal(before[n], backend.to_numpy(p)), n
        else:
            np.testing.assert_array_equal(before[n], backend.to_numpy(p), err_msg=n)
    frozen_grads = [n for n, m, k in model._slots() if k in m.grads and n not in trainable]
    assert not frozen_grads  # frozen parameters get no gradient buffer


def test_trainable_names():
    m = tiny_model()
    inject_houlsby(m, HoulsbyConfig(bottleneck=2))
    names = [n for n, _, _ in m.named_trainable()]
    assert names[:4] == ["blocks.0.attn.o.houlsby_down.weight", "blocks.0.attn.o.houlsby_down.bias",
                         "blocks.0.attn.o.houlsby_up.weight", "blocks.0.attn.o.houlsby_up.bias"]
    assert sorted(houlsby_layers(m)) == ["blocks.0.attn.o", "blocks.0.mlp.down",
                                         "blocks.1.attn.o", "blocks.1.mlp.down"]
    p = add_prefix(tiny_model(), PrefixConfig(prefix_len=2))
    assert [n for n, _, _ in p.named_trainable()] == ["prefix.key", "prefix.value"]
    assert "blocks.0.attn.q.weight" in dict(p.named_parameters())  # base names unchanged
    q = add_prompt(tiny_model(), PromptConfig(prompt_len=2))
    assert [n for n, _, _ in q.named_trainable()] == ["prompt.weight"]
    b = tiny_model()
    rep = apply_bitfit(b, BitFitConfig(layernorm=False))
    assert all(n.endswith(".bias") and ".ln_" not in n for n in rep["targets"])


def test_base_checkpoint_still_loads_by_name_after_injection():
    src, model = tiny_model(seed=1), tiny_model(seed=0)
    inject_houlsby(model, HoulsbyConfig(bottleneck=2))
    model.load_state_dict(src.state_dict(), strict=False)
    np.testing.assert_array_equal(model.blocks[0].attn.o.params["weight"],
                                  src.blocks[0].attn.o.params["weight"])


# ----------------------------------------------------------------------------------------------
# save -> load on a fresh base
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", all_configs(), ids=IDS)
def test_save_load_round_trip_reproduces_logits(tmp_path, config):
    model = apply_method(tiny_model(), config)
    opt = AdamW(model, lr=1e-2)
    for s in range(2):  # move the method's parameters away from their init
        model.forward_backward(*batch(seed=s))
        opt.step()
    path = tmp_path / "peft.safetensors"
    save_method(path, model, config)
    saved = set(method_tensors(model, config))
    assert saved == {n for n, _, _ in model.named_trainable()}
    fresh, loaded_cfg = load_method(path, tiny_model())
    assert loaded_cfg == config and type(fresh) is type(model)
    idx, _ = batch(seed=9)
    np.testing.assert_array_equal(fresh.forward(idx)[0], model.forward(idx)[0])


def test_saved_file_holds_only_the_small_tensors(tmp_path):
    from helpers import load_arrays
    model = apply_method(tiny_model(), PrefixConfig(prefix_len=2))
    save_method(tmp_path / "p.safetensors", model, PrefixConfig(prefix_len=2))
    arrays, meta = load_arrays(tmp_path / "p.safetensors")
    assert sorted(arrays) == ["prefix.key", "prefix.value"]
    assert meta["method"] == "prefix" and meta["config"]["prefix_len"] == 2
    assert meta["model_config"]["n_embd"] == 8


def test_load_errors(tmp_path):
    model = apply_method(tiny_model(), HoulsbyConfig(bottleneck=2))
    save_method(tmp_path / "a.safetensors", model, HoulsbyConfig(bottleneck=2))
    other = GPTConfig(**{**TINY.to_dict(), "n_embd": 12, "n_head": 2})
    with pytest.raises(PeftError, match="another base model: n_embd 8 .file. vs 12"):
        load_method(tmp_path / "a.safetensors", GPT(other, 0))
    from helpers import save_arrays
    save_arrays(tmp_path / "x.safetensors", {"a": np.zeros(2)}, {"format": "something-else"})
    with pytest.raises(PeftError, match="'something-else' file, which no registered method reads"):
        load_method(tmp_path / "x.safetensors", tiny_model())
    save_arrays(tmp_path / "y.safetensors", {"prefix.key": np.zeros((2, 2, 8))},
                {"format": "minilora-peft-v1", "method": "prefix", "config": {"prefix_len": 2}})
    with pytest.raises(PeftError, match="missing \\['prefix.value'\\]"):
        load_method(tmp_path / "y.safetensors", tiny_model())
    save_arrays(tmp_path / "z.safetensors", {"prompt.weight": np.zeros((3, 8))},
                {"format": "minilora-peft-v1", "method": "prompt", "config": {"prompt_len": 2}})
    with pytest.raises(PeftError, match="has shape \\(3, 8\\), the model's is \\(2, 8\\)"):
        load_method(tmp_path / "z.safetensors", tiny_model())
    save_arrays(tmp_path / "w.safetensors", {"q": np.zeros(1)},
                {"format": "minilora-peft-v1", "method": "ia3", "config": {}})
    with pytest.raises(PeftError, match="'minilora-peft-v1' file of method 'ia3', which no "
                                        "registered method reads"):
        load_method(tmp_path / "w.safetensors", tiny_model())


# ----------------------------------------------------------------------------------------------
# bad configs and inputs: one clear error each
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kw, match", [
    (HoulsbyConfig, dict(bottleneck=0), "bottleneck must be an integer >= 1"),
    (HoulsbyConfig, dict(bottleneck=2.5), "bottleneck must be an integer"),
    (HoulsbyConfig, dict(targets=("q",)), "subset of \\['o', 'down'\\]"),
    (HoulsbyConfig, dict(targets=()), "non-empty subset"),
    (HoulsbyConfig, dict(init_std=0.0), "init_std must be > 0"),
    (HoulsbyConfig, dict(zero_up="yes"), "zero_up must be true or false"),
    (PrefixConfig, dict(prefix_len=0), "prefix_len must be an integer >= 1"),
    (PrefixConfig, dict(init="zeros"), "prefix init must be one of \\['vocab', 'random'\\]"),
    (PromptConfig, dict(prompt_len=-3), "prompt_len must be an integer >= 1"),
    (PromptConfig, dict(init="text"), "prompt init must be one of"),
    (BitFitConfig, dict(layernorm=1), "layernorm must be true or false"),
])
def test_bad_config_values(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


def test_config_json_round_trip_and_unknown_fields():
    for c in all_configs():
        assert type(c).from_json(c.to_json()) == c
    with pytest.raises(ConfigError, match="unknown field.*'r'"):
        HoulsbyConfig.from_dict({"bottleneck": 4, "r": 8})


def test_bottleneck_wider_than_the_layer():
    with pytest.raises(ConfigError, match="bottleneck=9 exceeds the output width 8"):
        inject_houlsby(tiny_model(), HoulsbyConfig(bottleneck=9))


def test_prompt_length_and_context_limits():
    with pytest.raises(ConfigError, match="prompt_len=8 must be < the base's block_size 8"):
        add_prompt(tiny_model(), PromptConfig(prompt_len=8))
    model = add_prompt(tiny_model(), PromptConfig(prompt_len=3))
    assert model.config.block_size == 5 and model.gpt.config.block_size == 8
    model.forward(batch(T=5)[0])  # P + T = 8 = block_size: fine
    with pytest.raises(InputError, match="6 tokens is longer than block_size 5"):
        model.forward(batch(T=6)[0])  # P + T = 9 > 8


def test_inject_twice_and_wrong_inputs():
    m = tiny_model()
    inject_houlsby(m, HoulsbyConfig(bottleneck=2))
    with pytest.raises(PeftError, match="already has Houlsby adapters"):
        inject_houlsby(m, HoulsbyConfig(bottleneck=2))
    with pytest.raises(TypeError, match="HoulsbyLinear wraps a minilora Linear"):
        HoulsbyLinear(m.blocks[0].attn, 2)
    with pytest.raises(TypeError, match="config must be one of"):
        apply_method(tiny_model(), {"bottleneck": 2})
    with pytest.raises(TypeError, match="wraps a minilora GPT"):
        PromptTuningModel(m.blocks[0], xp.zeros((2, 8)))
    with pytest.raises(PeftError, match="shape \\(n_layer, P, n_embd\\) = \\(2, P, 8\\)"):
        PrefixTuningModel(tiny_model(), xp.zeros((3, 2, 8)), xp.zeros((3, 2, 8)))
    nobias = tiny_model(config=GPTConfig(**{**TINY.to_dict(), "bias": False}))
    with pytest.raises(PeftError, match="BitFit found no bias to train"):
        apply_bitfit(nobias, BitFitConfig(layernorm=False))


# ----------------------------------------------------------------------------------------------
# the fine-tuning harness
# ----------------------------------------------------------------------------------------------
CFG = dict(max_steps=3, batch_size=2, block_size=32, warmup_steps=1, eval_every=3)
SMALL = {"houlsby": HoulsbyConfig(bottleneck=4), "prefix": PrefixConfig(prefix_len=4),
         "prompt": PromptConfig(prompt_len=4), "bitfit": BitFitConfig()}


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
@pytest.mark.parametrize("method", list(SMALL))
def test_finetune_each_method_on_milton(tmp_path, method):
    from minilora.experiments.finetune import finetune

    r = finetune(method, "milton", SMALL[method], CFG, out_dir=tmp_path, progress=False,
                 eval_batches=2)
    assert r["trainable_params"] == count_method_parameters(SMALL[method], BASE)
    added = 0 if method == "bitfit" else r["trainable_params"]
    assert r["total_params"] == 1_928_000 + added
    assert np.isfinite(r["task_loss"]) and r["task_loss"] != r["task_loss_base"]
    # "base" is the untouched base for every method; prefix / prompt also report their step 0
    from minilora.data import encode_corpus, load_milton
    from minilora.train import evaluate, fixed_batches
    plain, tok, _ = load_checkpoint(base_model_path())
    te = fixed_batches(encode_corpus(load_milton()["test"], tok), 2, 2, 32, seed=12345)
    assert r["task_loss_base"] == pytest.approx(evaluate(plain, te), rel=1e-6)
    assert ("task_metric_init" in r) == (method in ("prefix", "prompt"))
    if method in ("prefix", "prompt"):
        assert r["task_metric_init"] != r["task_loss_base"]
    assert r["method_config"] == SMALL[method].to_dict()
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["weights_file"] == r["weights_file"]
    weights = tmp_path / r["weights_file"]
    assert weights.stat().st_size < 300_000  # the small tensors, not the 7.7 MB base
    model, _ = load_method(weights, load_checkpoint(base_model_path())[0])
    idx = tok.encode("Of Man's first disobedience")[None, :]
    assert not np.allclose(model.forward(idx)[0], plain.forward(idx)[0])  # the method acts


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
def test_prompt_tuning_on_the_classification_task():
    """The harness's accuracy reads ``logits[:, -1]``: with a prompt, still the label position."""
    from minilora.experiments.finetune import finetune

    r = finetune("prompt", "sentiment", PromptConfig(prompt_len=4), dict(CFG, max_steps=2),
                 progress=False, eval_batches=2, eval_examples=10)
    assert r["test_examples"] == 10 and 0.0 <= r["accuracy"] <= 1.0


def test_finetune_rejects_a_config_of_another_method():
    from minilora.experiments.finetune import finetune

    with pytest.raises(ValueError, match="method 'prefix' needs a PrefixConfig"):
        finetune("prefix", "milton", PromptConfig(), CFG, progress=False, eval_batches=2)


# ----------------------------------------------------------------------------------------------
# the latency section of minilora bench
# ----------------------------------------------------------------------------------------------
def test_bench_peft_latency_section_on_micro():
    from minilora import bench

    lines = []
    res = bench.run_bench(["micro"], steps=2, threads=1, torch_compare=False, out=None, warmup=1,
                          memory=False, progress=False, sgemm_sizes=(128,), pause_s=0.0,
                          print_fn=lines.append, only=["peft_latency"])
    sec = res["configs"]["micro"]["measurements"]
    assert list(sec) == ["peft_latency"]
    for key in ("B1", "B2"):
        ratios = sec["peft_latency"][key]["ratio_over_base"]
        assert set(ratios) == {"adapter", "lora_unmerged", "lora_merged", "base_copy"}
        assert all(np.isfinite(v) and v > 0 for v in ratios.values())
    assert sec["peft_latency"]["adapter_params"] == 2 * (2 * 16 * 16 + 16 + 16)  # 1 layer, m = C
    assert "Houlsby m=16 (2 per block) / base" in "\n".join(lines)
    with pytest.raises(ValueError, match="unknown measurement.*'nope'.*peft_latency"):
        bench.run_bench(["micro"], steps=1, threads=1, torch_compare=False, only=["nope"])


@pytest.mark.slow  # an end-to-end run (seconds to tens of seconds); CI runs -m slow
def test_cli_finetune_with_the_method_options(tmp_path, capsys):
    from minilora.cli import main

    rc = main(["finetune", "--method", "prompt", "--prompt-len", "4", "--steps", "2",
               "--batch-size", "2", "--block-size", "32", "--eval-batches", "1", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["method_config"]["prompt_len"] == 4 and r["trainable_params"] == 4 * 160
    assert (tmp_path / "prompt.safetensors").exists()
    capsys.readouterr()
    # the range check, before any work: one line, exit status 2
    assert main(["finetune", "--method", "houlsby", "--bottleneck", "0", "--steps", "1"]) == 2
    assert "--bottleneck must be >= 1 (got 0)" in capsys.readouterr().err
