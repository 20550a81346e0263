"""QLoRA: the 4-bit linear layer, QLoRALinear (LoRA over it), inject_qlora, LoftQ, adapter files.

Gradient checks run in float64 with centred differences (``minilora.gradcheck``): the 4-bit base
is dequantised and cast to float64, so the layer is an exact linear map of x, A and B and a
correct backward agrees to ~1e-8 relative; ``tol=1e-6`` leaves two orders of margin.
"""
import numpy as np
import pytest
from helpers import batch, lora_layer_gradcheck, np_, randn

from minilora import backend
from minilora.backend import xp
from minilora.checkpoint import CheckpointError
from minilora.config import ConfigError, GPTConfig, QuantConfig
from minilora.methods.lora.config import LoraConfig
from minilora.gradcheck import check, format_table, model_check
from minilora.methods.lora import LoRAError, LoRALinear, lora_layers, merge_lora
from minilora.model import GPT
from minilora.nn.layers import Linear
from minilora.optim import AdamW
from minilora.methods.qlora import (
    QLoRALinear,
    inject_qlora,
    load_qlora_adapter,
    quant_digest,
    save_qlora_adapter,
)
from minilora.quant import quantize_nf4
from minilora.quant.linear import QuantLinear, QuantWeight, quant_weights
from minilora.quant.loftq import loftq_init

TINY = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=16, init_std=0.3)


def quant_linear(rng, d_in, d_out, bias=True, double_quant=True, blocksize=16):
    w = randn(rng, d_out, d_in, dtype="float32")
    lin = Linear(w, randn(rng, d_out, dtype="float64") if bias else None)
    return QuantLinear.from_linear(lin, "nf4", blocksize, double_quant)


# ----------------------------------------------------------------------------------------------
# the 4-bit layer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_quant_linear_forward_is_x_times_dequantised_weight(xpb, rng, double_quant):
    ql = quant_linear(rng, 24, 8, double_quant=double_quant)
    w_hat = ql.qweight.dequantize()
    x = randn(rng, 2, 3, 24, dtype="float32")
    out, cache = ql.forward(x)
    ref = np_(x) @ np_(w_hat).T + np_(ql.params["bias"])
    np.testing.assert_allclose(np_(out), ref, rtol=1e-5, atol=1e-5)
    assert not any(backend.is_array(c) and c.shape == w_hat.shape for c in cache), \
        "the cache must not hold a float copy of the weight"


def test_quant_linear_gradcheck_dx_and_db(xpb, rng):
    ql = quant_linear(rng, 12, 5)
    ql.params["bias"] = ql.params["bias"].astype("float64")
    x, dout = randn(rng, 2, 3, 12), randn(rng, 2, 3, 5)

    def f():
        return xp.sum(ql.forward(x)[0] * dout)

    out, cache = ql.forward(x)
    ql.zero_grad()
    dx = ql.backward(dout, cache)
    rows = [check("dx", dx, f, x), check("dbias", ql.grads["bias"], f, ql.params["bias"])]
    assert all(r["ok"] for r in rows), format_table(rows)
    assert "weight" not in ql.grads and "weight" not in ql.params


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_qlora_linear_gradcheck(xpb, rng, dropout, bias):
    """dx, dA, dB (and db) of QLoRALinear in float64 through a float64 dequantised base."""
    layer = QLoRALinear(quant_linear(rng, 10, 6, bias), r=3, lora_alpha=6, lora_dropout=dropout,
                        init_lora_weights=False, rng=1)
    layer.astype("float64")
    layer.trainable = {"lora_A", "lora_B"} | ({"bias"} if bias else set())
    x, dout = randn(rng, 2, 3, 10), randn(rng, 2, 3, 6)
    rows = lora_layer_gradcheck(layer, x, dout)
    assert all(r["ok"] for r in rows), format_table(rows)


def test_qlora_linear_equals_lora_over_the_dequantised_weight(rng):
    """Same factors, same input: QLoRA == LoRA whose float W0 is dequant(Q) (forward and grads)."""
    ql = quant_linear(rng, 16, 8)
    q = QLoRALinear(ql, r=2, lora_alpha=4, init_lora_weights=False, rng=3)
    f = LoRALinear(Linear(ql.qweight.dequantize(), ql.params["bias"]), r=2, lora_alpha=4,
                   init_lora_weights=False, rng=3)
    x, dout = randn(rng, 4, 16, dtype="float32"), randn(rng, 4, 8, dtype="float32")
    (oq, cq), (of, cf) = q.forward(x), f.forward(x)
    np.testing.assert_allclose(np_(oq), np_(of), rtol=1e-6, atol=1e-6)
    dxq, dxf = q.backward(dout, cq), f.backward(dout, cf)
    np.testing.assert_allclose(np_(dxq), np_(dxf), rtol=1e-5, atol=1e-6)
    for k in ("lora_A", "lora_B"):
        np.testing.assert_allclose(np_(q.grads[k]), np_(f.grads[k]), rtol=1e-5, atol=1e-6)


def test_whole_model_gradcheck_after_inject_qlora():
    model = GPT(TINY, 0, dtype="float32")
    inject_qlora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                   init_lora_weights=False),
                 QuantConfig(blocksize=16))
    model.astype("float64")
    x, y = batch()
    rows = model_check(model, x, y)
    assert rows and all(r["ok"] for r in rows), format_table(rows)
    assert {r["name"].rsplit(".", 1)[-1] for r in rows} == {"lora_A", "lora_B"}


def test_memory_held_is_about_4_bits_per_weight(rng):
    w = randn(rng, 64, 256, dtype="float32")
    q = QuantWeight.quantize(w, blocksize=64, double_quant=True)
    b = q.nbytes()
    assert b["packed"] == 64 * 256 // 2 and b["dequantized"] == 0
    assert 8 * b["total"] / w.size == pytest.approx(4.127, abs=0.01)
    q.dequantize()
    assert q.nbytes()["dequantized"] == 0  # nothing cached by default
    kept = QuantWeight.quantize(w, keep_dequantized=True)
    kept.dequantize()
    assert kept.nbytes()["dequantized"] == 4 * w.size
    assert kept.dequantize() is kept.dequantize()


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
def test_qlora_at_init_equals_the_dequantised_base_model():
    model, ref = GPT(TINY, 0), GPT(TINY, 0)
    rep = inject_qlora(model, LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v", "up")),
                       QuantConfig(blocksize=16))
    assert rep["quantized_layers"] == 12 and len(rep["targets"]) == 6
    qw = quant_weights(model)
    mods = dict(ref.named_modules())
    for name, q in qw.items():  # the reference: a float model holding dequant(Q)
        mods[name].params["weight"] = q.dequantize()
    x, _ = batch()
    np.testing.assert_allclose(np_(model.forward(x)[0]), np_(ref.forward(x)[0]),
                               rtol=1e-5, atol=1e-5)
    assert all(isinstance(m, QLoRALinear) for m in lora_layers(model).values())
    names = dict(model.named_parameters())
    assert "blocks.0.attn.q.lora_A" in names and "blocks.0.attn.k.bias" in names
    assert not any(n.endswith("attn.q.weight") for n in names)


def test_qlora_and_lora_draw_the_same_initial_factors():
    from minilora.methods.lora import inject_lora
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v"), seed=5)
    a, b = GPT(TINY, 0), GPT(TINY, 0)
    inject_lora(a, cfg)
    inject_qlora(b, cfg, QuantConfig(blocksize=16))
    fa = {n: p for n, p in a.state_dict().items() if "lora_" in n}
    fb = {n: p for n, p in b.state_dict().items() if "lora_" in n}
    assert sorted(fa) == sorted(fb) and len(fa) == 8
    for n in fa:
        np.testing.assert_array_equal(np_(fa[n]), np_(fb[n]))


def test_codes_frozen_and_factors_move_in_training():
    model = GPT(TINY, 0)
    inject_qlora(model, LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v")),
                 QuantConfig(blocksize=16))
    before = {n: np_(q.packed).copy() for n, q in quant_weights(model).items()}
    digest = quant_digest(model)
    b0 = np_(model.blocks[0].attn.q.params["lora_B"]).copy()
    opt = AdamW(model, lr=1e-2)
    x, y = batch()
    losses = []
    for _ in range(5):
        losses.append(model.forward_backward(x, y))
        opt.step(1e-2)
    for n, q in quant_weights(model).items():
        np.testing.assert_array_equal(np_(q.packed), before[n])
    assert quant_digest(model) == digest
    assert not np.allclose(np_(model.blocks[0].attn.q.params["lora_B"]), b0)
    assert losses[-1] < losses[0]
    assert {n for n, _, _ in model.named_trainable()} == {
        f"blocks.{i}.attn.{t}.lora_{f}" for i in range(2) for t in "qv" for f in "AB"}


def test_merge_is_refused_and_bias_all_trains_4bit_biases():
    model = GPT(TINY, 0)
    inject_qlora(model, LoraConfig(r=2, target_modules=("q",), bias="all"),
                 QuantConfig(blocksize=16))
    for safe in (False, True):
        with pytest.raises(LoRAError, match="cannot merge"):
            merge_lora(model, safe_merge=safe)
    trainable = {n for n, _, _ in model.named_trainable()}
    assert "blocks.0.attn.k.bias" in trainable and "blocks.0.attn.q.bias" in trainable
    x, y = batch()
    model.forward_backward(x, y)
    assert model.blocks[0].attn.k.grads["bias"].shape == (16,)


# ----------------------------------------------------------------------------------------------
# LoftQ
# ----------------------------------------------------------------------------------------------
def test_loftq_residual_non_increasing_and_beats_plain_quantisation(rng):
    w = randn(rng, 48, 32, scale=0.05, dtype="float32") \
        + randn(rng, 48, 3, dtype="float32") @ randn(rng, 3, 32, scale=0.1, dtype="float32")
    res = loftq_init(w, r=4, n_iter=5, blocksize=16, scaling=2.0)
    r = res.residual_norms
    assert len(r) == 5
    assert all(b <= a * (1 + 1e-9) for a, b in zip(r, r[1:])), r
    assert r[0] < res.quant_error_norm and r[-1] < 0.9 * res.quant_error_norm
    # the reported residual is the real one: W - deq(Q) - s B A
    approx = np_(res.qweight.dequantize()).astype(np.float64) + 2.0 * res.B @ res.A
    assert np.linalg.norm(np_(w).astype(np.float64) - approx) == pytest.approx(r[-1], rel=1e-6)


def test_loftq_model_starts_closer_to_the_float_base_than_plain_qlora():
    x, y = batch()
    ref = GPT(TINY, 0)
    logits = np_(ref.forward(x)[0])
    errs = {}
    for init in (True, "loftq"):
        m = GPT(TINY, 0)
        rep = inject_qlora(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                         init_lora_weights=init),
                           QuantConfig(blocksize=16, loftq_iter=3))
        errs[init] = np.abs(np_(m.forward(x)[0]) - logits).max()
    assert errs["loftq"] < errs[True]
    assert rep["loftq"]["n_iter"] == 3 and len(rep["loftq"]["mean_relative_residual"]) == 3


def test_loftq_rejects_float_base_and_pissa_on_qlora(rng):
    with pytest.raises(LoRAError, match="4-bit base"):
        LoRALinear(Linear(randn(rng, 4, 6)), r=2, init_lora_weights="loftq")
    with pytest.raises(LoRAError, match="pissa"):
        inject_qlora(GPT(TINY, 0), LoraConfig(r=2, init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="rank r"):
        loftq_init(randn(rng, 4, 6), r=5)
    with pytest.raises(ValueError, match="n_iter"):
        loftq_init(randn(rng, 4, 6), r=2, n_iter=0)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weight_is_one_clear_error_naming_the_layer(bad):
    model = GPT(TINY, 0)
    model.blocks[1].mlp.up.params["weight"][2, 3] = bad
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.up\.weight holds 1 NaN/inf.*\[2, 3\]"):
        inject_qlora(model, LoraConfig(r=2))
    assert isinstance(model.blocks[0].attn.q, Linear), "nothing may change before the error"
    with pytest.raises(ValueError, match="NaN/inf"):
        loftq_init(model.blocks[1].mlp.up.params["weight"], r=2)


def test_mismatched_state_and_shapes_are_clear_errors(rng):
    w = randn(rng, 8, 16, dtype="float32")
    packed, state = quantize_nf4(w, blocksize=16)
    other_packed, _ = quantize_nf4(randn(rng, 8, 8, dtype="float32"), blocksize=16)
    with pytest.raises(ValueError, match="do not belong together"):
        QuantWeight(other_packed, state)
    with pytest.raises(TypeError, match="uint8"):
        QuantWeight(packed.astype("int32"), state)
    p1, s1 = quantize_nf4(randn(rng, 32, dtype="float32"), blocksize=16)
    with pytest.raises(ValueError, match=r"\(d_out, d_in\) matrix"):
        QuantWeight(p1, s1)
    state.absmax = state.absmax[:-1]  # a state that lost a block scale
    with pytest.raises(ValueError, match="inconsistent QuantState"):
        QuantWeight(packed, state)
    q = QuantWeight.quantize(w, blocksize=16)
    with pytest.raises(ValueError, match="bias has shape"):
        QuantLinear(q, randn(rng, 9))
    with pytest.raises(ValueError, match="input has 15 features"):
        QuantLinear(q).forward(randn(rng, 2, 15, dtype="float32"))
    with pytest.raises(TypeError, match="QuantLinear"):
        QLoRALinear(Linear(w), r=2)
    with pytest.raises(ValueError, match=r"\(d_out, d_in\) matrix"):
        QuantWeight.quantize(randn(rng, 2, 3, 4))


def test_config_errors():
    with pytest.raises(ConfigError, match="quant_type"):
        QuantConfig(quant_type="nf3")
    with pytest.raises(ConfigError, match="blocksize"):
        QuantConfig(blocksize=0)
    with pytest.raises(ConfigError, match="loftq_iter"):
        QuantConfig(loftq_iter=0)
    with pytest.raises(LoRAError, match="stay float32"):
        inject_qlora(GPT(TINY, 0), LoraConfig(r=2, target_modules=("q", "lm_head")))
    m = GPT(TINY, 0)
    inject_qlora(m, LoraConfig(r=2))
    with pytest.raises(LoRAError, match="already has"):
        inject_qlora(m, LoraConfig(r=2))
    assert QuantConfig.from_json(QuantConfig(quant_type="fp4").to_json()).quant_type == "fp4"
    m = GPT(TINY, 0)
    with pytest.raises(ConfigError, match="larger than min"):
        inject_qlora(m, LoraConfig(r=17, target_modules=("up",)))
    assert not quant_weights(m), "a bad rank must be refused before any layer is quantised"


# ----------------------------------------------------------------------------------------------
# adapter files and the finetune method
# ----------------------------------------------------------------------------------------------
def _save_tiny_base(tmp_path):
    from minilora.checkpoint import save_checkpoint
    from minilora.data import CharTokenizer
    tok = CharTokenizer.default()
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(tmp_path / "base.safetensors", GPT(cfg, 0), tok)
    return tmp_path / "base.safetensors", cfg


@pytest.mark.parametrize("init", [True, "loftq"])
def test_adapter_round_trip_rebuilds_the_same_4bit_base(tmp_path, init):
    from minilora.checkpoint import load_checkpoint
    base, cfg = _save_tiny_base(tmp_path)
    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v"), init_lora_weights=init)
    qcfg = QuantConfig(blocksize=16, loftq_iter=2)
    model, _, _ = load_checkpoint(base)
    rep = inject_qlora(model, lcfg, qcfg)
    model.blocks[0].attn.q.params["lora_B"] += 0.5  # "trained"
    save_qlora_adapter(tmp_path / "a.safetensors", model, lcfg, qcfg, rep["base_digest"])
    back, _, lc2, qc2 = load_qlora_adapter(tmp_path / "a.safetensors", base)
    assert (lc2, qc2) == (lcfg, qcfg)
    x = backend.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)))
    np.testing.assert_array_equal(np_(back.forward(x)[0]), np_(model.forward(x)[0]))
    # another base: refused with a clear error
    from minilora.checkpoint import save_checkpoint
    from minilora.data import CharTokenizer
    save_checkpoint(tmp_path / "other.safetensors", GPT(cfg, 1), CharTokenizer.default())
    with pytest.raises(CheckpointError, match="another base"):
        load_qlora_adapter(tmp_path / "a.safetensors", tmp_path / "other.safetensors")


def test_tiny_finetune_run_with_qlora(tmp_path):
    from minilora.experiments.finetune import finetune
    base, _ = _save_tiny_base(tmp_path)
    r = finetune("qlora", "milton", (LoraConfig(r=2, lora_alpha=4, target_modules=("q", "v"),
                                                init_lora_weights="loftq"),
                                     QuantConfig(blocksize=16, loftq_iter=2)),
                 dict(max_steps=4, batch_size=2, block_size=16), base_path=base,
                 out_dir=tmp_path / "run", progress=False, eval_batches=2)
    assert r["method"] == "qlora" and np.isfinite(r["task_metric"])
    assert r["method_config"]["quant"]["quant_type"] == "nf4"
    assert r["method_config"]["base"]["loftq"]["n_iter"] == 2
    assert (tmp_path / "run" / "adapter.safetensors").exists()
    assert r["trainable_params"] == 2 * 2 * (16 + 16) * 1
    # *_base is the float base (forgetting measured from it); the 4-bit start is *_init
    assert "task_metric_init" in r and r["task_metric_init"] != r["task_metric_base"]


def test_memory_account_counts_4bit_bytes_and_bench_section_runs():
    from minilora.bench import BenchContext, measure_qlora
    from minilora.memory import weight_bytes
    f, q = GPT(TINY, 0, dtype="float32"), GPT(TINY, 0, dtype="float32")
    inject_qlora(q, LoraConfig(r=2, target_modules=("q", "v")), QuantConfig(blocksize=16))
    block_w = 2 * 12 * 16 * 16  # 2 layers x (4 C^2 attention + 8 C^2 MLP)
    saved = weight_bytes(f) - weight_bytes(q)
    assert 0.8 * 4 * block_w < saved < 4 * block_w  # ~4.1 of 32 bits kept
    ctx = BenchContext("micro", GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16), 2, None,
                       steps=2, warmup=1, threads=1, peak_flops=1e9)
    sec = measure_qlora(ctx)
    assert sec.data["ratio_step_qlora_over_lora"] > 0
    assert sec.data["memory"]["qlora"]["weights"] < sec.data["memory"]["lora"]["weights"]


def test_loftq_study_and_figures_from_saved_results(tmp_path):
    import json

    from minilora.experiments.figures import make_figures
    from minilora.experiments.studies.loftq import loftq_residual_study
    study = loftq_residual_study(GPT(TINY, 0), ranks=(2,), n_iter=3, quant=QuantConfig(blocksize=16))
    rel = study["ranks"]["2"]["mean_relative_residual"]
    assert len(rel) == 4 and rel[-1] < rel[0] and study["ranks"]["2"]["n_layers"] == 12
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "loftq_residuals.json").write_text(json.dumps(study))
    out = make_figures(["loftq_residuals", "qlora_compare"], tmp_path, tmp_path / "fig",
                       log=lambda s: None)
    assert (tmp_path / "fig" / "loftq_residuals.png").read_bytes()[:4] == b"\x89PNG"
    assert out["qlora_compare"].startswith("skipped:") and "milton-qlora" in out["qlora_compare"]


def test_cli_qlora_errors_and_loftq_command(tmp_path, capsys):
    import json

    from minilora.cli import main
    assert main(["finetune", "--method", "qlora", "--targets", "q,lm_head", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stay float32" in err[0]
    assert main(["finetune", "--method", "lora", "--init", "loftq", "--steps", "1"]) == 2
    assert "4-bit base" in capsys.readouterr().err
    base, _ = _save_tiny_base(tmp_path)
    out = tmp_path / "loftq.json"
    assert main(["loftq", "--ckpt", str(base), "--ranks", "2", "--iters", "2", "--blocksize", "16",
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["ranks"]["2"]["n_layers"] == 6 and d["command"].startswith("minilora loftq")
