"""Many adapters on one base: pointer switching, merged switching, mixed-adapter batches."""
import numpy as np
import pytest

from minilora import backend
from minilora.adapters import AdapterRegistry, generate_mixed, merge_and_unload
from minilora.checkpoint import load_checkpoint, save_checkpoint
from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.data import CharTokenizer
from minilora.experiments.scoring import score_adapters
from minilora.methods.lora import (
    LoRAError,
    inject_lora,
    lora_layers,
    lora_state_dict,
    save_adapter,
)
from minilora.model import GPT
from minilora.sample import generate

TOK = CharTokenizer.default()
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
TARGETS = ("wte", "q", "v", "up", "lm_head")


def base_model(dtype="float64", config=CFG):
    return GPT(config, rng=0, dtype=dtype)


def make_adapter(seed, r=4, alpha=8.0, targets=TARGETS, rslora=False, config=CFG, **kw):
    """(arrays, LoraConfig) of an adapter with random A *and* B (so ΔW != 0)."""
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                      init_lora_weights=False, seed=seed, **kw)
    m = base_model(config=config)
    inject_lora(m, lcfg)
    return {k: backend.to_numpy(v).copy() for k, v in lora_state_dict(m).items()}, lcfg


def alone(name_arrays_cfg, idx):
    """Logits of a fresh base with one adapter loaded the ordinary way (lora.py's path)."""
    from minilora.methods.lora import load_lora_state_dict
    arrays, lcfg = name_arrays_cfg
    m = base_model()
    inject_lora(m, lcfg)
    load_lora_state_dict(m, arrays)
    return backend.to_numpy(m.forward(idx)[0])


@pytest.fixture
def reg_and_adapters():
    ads = {"a": make_adapter(1, r=4), "b": make_adapter(2, r=2, alpha=3.0),
           "c": make_adapter(3, r=8, rslora=True)}
    reg = AdapterRegistry(base_model())
    for n, (arr, cfg) in ads.items():
        reg.add(n, arr, cfg)
    return reg, ads


def test_mixed_adapter_batch_equals_per_adapter_runs(rng, reg_and_adapters):
    reg, ads = reg_and_adapters
    ids = ["c", None, "a", "b", "a", "c", None, "b"]
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(len(ids), 12)))
    mixed = backend.to_numpy(reg.forward(idx, ids))
    base = backend.to_numpy(base_model().forward(idx)[0])
    for name in ("a", "b", "c"):
        ref = alone(ads[name], idx)
        rows = [i for i, a in enumerate(ids) if a == name]
        np.testing.assert_allclose(mixed[rows], ref[rows], rtol=1e-12, atol=1e-12,
                                   err_msg=f"rows of adapter {name}")
        assert not np.allclose(ref, base)  # the adapter really changes the output
    rows = [i for i, a in enumerate(ids) if a is None]
    np.testing.assert_allclose(mixed[rows], base[rows], rtol=1e-12, atol=1e-12)
    # integer ids (-1 = base) give the same thing, and the registry's mode is untouched
    as_int = [-1 if a is None else reg.names.index(a) for a in ids]
    np.testing.assert_array_equal(backend.to_numpy(reg.forward(idx, np.array(as_int))), mixed)
    assert reg.active is None and not reg.merged
    np.testing.assert_array_equal(backend.to_numpy(reg.forward(idx)), base)


def test_set_adapter_switches_pointers_without_copying(rng, reg_and_adapters):
    reg, ads = reg_and_adapters
    w_before = {n: m.params["weight"] for n, m in reg._wrappers.items()}
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(3, 10)))
    for name in ("b", "a", "c", "a"):
        reg.set_adapter(name)
        for layer, m in lora_layers(reg.model).items():
            A, B = reg.adapters[name].factors[layer]
            assert m.params["lora_A"] is A and m.params["lora_B"] is B  # the stored arrays
            assert m.params["weight"] is w_before[layer]  # the base is never copied
        np.testing.assert_allclose(backend.to_numpy(reg.forward(idx)), alone(ads[name], idx),
                                   rtol=1e-12, atol=1e-12)
    before = backend.to_numpy(reg.forward(idx))
    reg.forward(idx, ["b", None, "c"])  # a mixed batch in between leaves the active adapter on
    assert reg.active == "a" and lora_layers(reg.model)
    np.testing.assert_array_equal(backend.to_numpy(reg.forward(idx)), before)


def test_disable_adapters_is_exactly_the_base(rng, reg_and_adapters):
    reg, _ = reg_and_adapters
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(2, 9)))
    base = backend.to_numpy(base_model().forward(idx)[0])
    reg.set_adapter("a")
    reg.disable_adapters()
    assert not lora_layers(reg.model) and reg.active is None
    np.testing.assert_array_equal(backend.to_numpy(reg.forward(idx)), base)


def test_merged_switch_unmerges_old_and_merges_new(rng, reg_and_adapters):
    reg, ads = reg_and_adapters
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(2, 9)))
    for name in ("a", "c", "b"):
        reg.set_adapter(name, merge=True)
        assert reg.merged and all(m.merged for m in lora_layers(reg.model).values())
        np.testing.assert_allclose(backend.to_numpy(reg.forward(idx)), alone(ads[name], idx),
                                   rtol=1e-10, atol=1e-10)
    with pytest.raises(LoRAError, match="unmerged base"):
        reg.forward(idx, ["a", "b"])
    reg.set_adapter("a")  # merged -> unmerged: W0 back to the base
    assert not reg.merged
    np.testing.assert_allclose(backend.to_numpy(reg.forward(idx)), alone(ads["a"], idx),
                               rtol=1e-10, atol=1e-10)
    reg.disable_adapters()
    np.testing.assert_allclose(backend.to_numpy(reg.forward(idx)),
                               backend.to_numpy(base_model().forward(idx)[0]), rtol=1e-12,
                               atol=1e-12)


def test_merged_switching_drift_in_float32_is_a_few_ulp():
    reg = AdapterRegistry(base_model("float32"))
    for n in ("a", "b"):
        reg.add(n, *make_adapter(ord(n)))
    w0 = {n: backend.to_numpy(m.params["weight"]).copy() for n, m in reg._wrappers.items()}
    big = {n: np.abs(w0[n]).max() for n in w0}  # the largest |W0 + ΔW| over both adapters
    for name in ("a", "b"):
        reg.set_adapter(name)
        for n, m in reg._wrappers.items():
            big[n] = max(big[n], np.abs(w0[n] + backend.to_numpy(m.delta_weight())).max())
    for i in range(20):
        reg.set_adapter("ab"[i % 2], merge=True)
    reg.disable_adapters()
    for n, m in reg._wrappers.items():
        w = backend.to_numpy(m.params["weight"])
        # each in-place merge or unmerge rounds to the float32 grid of |W0 + ΔW|: <= 1/2 ulp,
        # 40 of them; the drift is the price of switching merged adapters in place (as PEFT does)
        assert np.abs(w - w0[n]).max() <= 20 * np.spacing(np.float32(big[n])), n


def test_adapter_files_load_by_name_and_are_small(tmp_path, rng):
    m = base_model()
    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v"), init_lora_weights=False)
    inject_lora(m, lcfg)
    save_adapter(tmp_path / "a.safetensors", m, lcfg)
    reg = AdapterRegistry(base_model())
    reg.load("a", tmp_path / "a.safetensors")
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(2, 5)))
    reg.set_adapter("a")
    np.testing.assert_allclose(backend.to_numpy(reg.forward(idx)),
                               backend.to_numpy(m.forward(idx)[0]), rtol=1e-12)
    assert reg.adapters["a"].nbytes == 2 * CFG.n_layer * 2 * (2 * CFG.n_embd) * 8
    assert (tmp_path / "a.safetensors").stat().st_size < 0.1 * m.num_parameters() * 8


def test_adapter_built_for_another_base_shape_is_a_clear_error(tmp_path):
    other = GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=24)
    m = base_model(config=other)
    lcfg = LoraConfig(r=2, target_modules=("q", "v"))
    inject_lora(m, lcfg)
    save_adapter(tmp_path / "other.safetensors", m, lcfg)
    reg = AdapterRegistry(base_model())
    with pytest.raises(LoRAError, match="another base model: n_embd 24"):
        reg.load("x", tmp_path / "other.safetensors")
    arrays, cfg = make_adapter(0, r=2, targets=("q", "v"), config=other)
    with pytest.raises(LoRAError, match=r"shape \(2, 24\).*another shape"):
        reg.add("x", arrays, cfg)
    assert reg.names == [] and not lora_layers(reg.model)  # nothing changed


@pytest.mark.parametrize("kw, match", [
    (dict(targets=("q",)), "same modules"),
    (dict(bias="all"), "bias='all'"),
    (dict(init_lora_weights="pissa"), "pissa"),
])
def test_adapters_that_cannot_share_the_base_are_refused(reg_and_adapters, kw, match):
    reg, _ = reg_and_adapters
    init = kw.pop("init_lora_weights", False)
    arrays, cfg = make_adapter(9, **kw)
    if init == "pissa":
        cfg = LoraConfig(**{**cfg.to_dict(), "init_lora_weights": "pissa"})
    with pytest.raises(LoRAError, match=match):
        reg.add("new", arrays, cfg)
    assert "new" not in reg.names


def test_bad_names_and_row_ids_are_clear_errors(rng, reg_and_adapters):
    reg, ads = reg_and_adapters
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(2, 4)))
    with pytest.raises(LoRAError, match="already registered"):
        reg.add("a", *ads["a"])
    with pytest.raises(LoRAError, match="no adapter named 'zz'.*a, b, c"):
        reg.set_adapter("zz")
    with pytest.raises(ValueError, match="3 adapter ids for a batch of 2"):
        reg.forward(idx, ["a", "b", "c"])
    with pytest.raises(ValueError, match="index 3 out of range"):
        reg.forward(idx, [0, 3])
    with pytest.raises(LoRAError, match="no adapter named 'zz'"):
        reg.forward(idx, ["a", "zz"])
    with pytest.raises(LoRAError, match="inference only"):
        reg._mixed["blocks.0.attn.q"].backward(None, None)


def test_registry_needs_a_plain_base():
    m = base_model()
    inject_lora(m, LoraConfig(r=2, target_modules=("q",)))
    with pytest.raises(LoRAError, match="plain base model"):
        AdapterRegistry(m)


def test_generation_with_several_adapters_in_one_batch(reg_and_adapters):
    reg, ads = reg_and_adapters
    texts = generate_mixed(reg, TOK, "ROMEO:", ["a", None, "c"], max_new_tokens=6, top_k=1)
    prompt = backend.asarray(TOK.encode("ROMEO:")[None, :].astype("int64"))
    for name, text in zip(["a", None, "c"], texts):
        if name is None:
            reg.disable_adapters()
        else:
            reg.set_adapter(name)
        ref = generate(reg.model, prompt, 6, top_k=1)  # greedy: independent of the batch
        assert text == TOK.decode(backend.to_numpy(ref[0])), name
    reg.disable_adapters()


def test_merge_and_unload_writes_a_plain_checkpoint(tmp_path, rng, reg_and_adapters):
    _, ads = reg_and_adapters
    from minilora.methods.lora import load_lora_state_dict
    m = base_model()
    inject_lora(m, ads["b"][1])
    load_lora_state_dict(m, ads["b"][0])
    idx = backend.asarray(rng.integers(0, CFG.vocab_size, size=(2, 7)))
    want = backend.to_numpy(m.forward(idx)[0])
    merge_and_unload(m)
    assert not lora_layers(m) and not any("lora_" in n for n, _ in m.named_parameters())
    save_checkpoint(tmp_path / "merged.safetensors", m, TOK)
    m2, _, _ = load_checkpoint(tmp_path / "merged.safetensors")
    np.testing.assert_allclose(backend.to_numpy(m2.forward(idx)[0]), want, rtol=1e-10, atol=1e-10)


def test_score_adapters_matches_evaluate_on_the_shipped_base():
    from minilora.data import encode_corpus
    from minilora.experiments.paths import base_model_path
    from minilora.experiments.tasks import task_splits
    from minilora.train import evaluate, fixed_batches

    base, tok, _ = load_checkpoint(base_model_path())
    arrays = {}
    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=("q",), init_lora_weights=False)
    tmp = load_checkpoint(base_model_path())[0]
    inject_lora(tmp, lcfg)
    arrays = {k: backend.to_numpy(v) for k, v in lora_state_dict(tmp).items()}
    reg = AdapterRegistry(base)
    reg.add("rand", arrays, lcfg)
    res = score_adapters(reg, tok, "python", [None, "rand"], eval_batches=1, batch_size=2,
                         block_size=32)
    batches = fixed_batches(encode_corpus(task_splits("python")[1], tok), 1, 2, 32, seed=12345)
    assert res["scores"]["base"] == pytest.approx(evaluate(reg.model, batches), rel=1e-5)
    assert res["scores"]["rand"] == pytest.approx(evaluate(tmp, batches), rel=1e-5)
    acc = score_adapters(reg, tok, "sentiment", ["rand", None], block_size=32, eval_examples=5)
    assert set(acc["scores"]) == {"rand", "base"} and acc["higher_is_better"]
    assert all(0 <= v <= 1 for v in acc["scores"].values())


def test_claim_figure_from_saved_results(tmp_path):
    import json

    from minilora.experiments.figures import make_figures

    res = tmp_path / "results" / "multi_adapter"
    res.mkdir(parents=True)
    rec = {"tasks": ["milton", "sentiment"], "holds_here": False, "steps_per_task": 200,
           "lora_config": {"r": 8},
           "results": {"milton": {"metric": "test loss (nats/char)", "higher_is_better": False,
                                  "base": 1.96, "per_task": 1.64, "general": 1.70},
                       "sentiment": {"metric": "test accuracy", "higher_is_better": True,
                                     "base": 0.5, "per_task": 0.7, "general": 0.72}}}
    (res / "claim.json").write_text(json.dumps(rec))
    out = make_figures(["multi_adapter_claim"], tmp_path / "results", tmp_path / "fig",
                       log=lambda s: None)
    png = tmp_path / "fig" / "multi_adapter_claim.png"
    assert out["multi_adapter_claim"] == [str(png)] and png.read_bytes()[:4] == b"\x89PNG"
    out = make_figures(["multi_adapter_claim"], tmp_path / "none", tmp_path / "fig",
                       log=lambda s: None)
    assert "minilora adapter claim" in out["multi_adapter_claim"]
