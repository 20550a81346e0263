"""The CuPy code path, run without a GPU on the strict stand-in (tests/fake_cupy).

Two kinds of test:

* the stand-in's own contract: it must refuse exactly what CuPy refuses (implicit conversion to
  NumPy, NumPy operands, compiled kernels) and offer what minilora uses (``.get()``, ``asnumpy``,
  managed memory, prefetch), or a green run here would prove nothing;
* whole paths (training steps, LoRA, QLoRA, paged AdamW, mixed-adapter batches, checkpoints,
  sampling) run once on NumPy and once on the stand-in. The stand-in computes with NumPy, so
  wherever both backends take the same branch the results are identical, and where the code
  branches on ``is_cupy()`` the two branches must still agree.

Where CuPy and a GPU are usable, ``test_*_on_real_cupy`` repeat the comparison on the real thing.
``python -m pytest -q -k cupy_strict`` runs these with the stand-in cases of every test that takes
the ``xpb`` fixture.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CUPY, STANDIN, STANDIN_DIR, use_backend

from minilora import backend
from minilora.backend import xp
from minilora.config import GPTConfig, QuantConfig
from minilora.methods.lora.config import LoraConfig
from minilora.data import CharTokenizer
from minilora.methods.lora import inject_lora, lora_state_dict
from minilora.model import GPT
from minilora.optim import AdamW

cp = STANDIN
TOK = CharTokenizer.default()
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
STRICT = ["cupy_strict"] + (["cupy"] if CUPY else [])


def on(name, fn):
    """Run ``fn()`` on backend ``name``; NumPy afterwards whatever happens."""
    use_backend(name)
    try:
        return fn()
    finally:
        backend.set_backend("numpy")


def host(tree):
    """Every array in a (nested) result as NumPy, for comparing runs."""
    if isinstance(tree, dict):
        return {k: host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(host(v) for v in tree)
    if backend.is_array(tree) or hasattr(tree, "get") or isinstance(tree, np.ndarray):
        return backend.to_numpy(tree)
    return tree


def assert_same(a, b, rtol=0.0, atol=0.0, where="result"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], rtol, atol, f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, rtol, atol, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=where)
    else:
        assert a == b if rtol == 0 else np.isclose(a, b, rtol=rtol, atol=atol), where


def tol(name):
    """The stand-in computes with NumPy: bit-identical. Real cuBLAS sums in another order."""
    return {"rtol": 0.0, "atol": 0.0} if name == "cupy_strict" else {"rtol": 1e-9, "atol": 1e-11}


# ------------------------------------------------------------------------------------------
# the stand-in's contract (what CuPy refuses, it refuses)
# ------------------------------------------------------------------------------------------

def test_standin_refuses_implicit_conversion_to_numpy():
    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    for convert in (np.asarray, np.array, lambda a: np.ascontiguousarray(a)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            convert(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.float32(x[0, 0])  # NumPy's float32() builds an array from its argument
    assert isinstance(x.get(), np.ndarray) and cp.asnumpy(x).tolist() == x.get().tolist()
    y = x.get()
    y[0, 0] = 99.0  # .get() is a copy, as a device -> host transfer is
    assert float(x[0, 0]) == 0.0


def test_standin_python_scalars_only_from_one_element():
    x = cp.asarray(np.arange(6.0))
    assert float(x.sum()) == 15.0 and int(x[2]) == 2 and bool(x[1])
    assert f"{x.max():.1f}" == "5.0"
    for conv in (float, int):
        with pytest.raises(TypeError, match="only length-1 arrays"):
            conv(x)
    with pytest.raises(ValueError, match="ambiguous"):
        bool(x)


def test_standin_refuses_numpy_operands_in_both_orders():
    x = cp.asarray(np.ones(3))
    a = np.ones(3)
    for op in (lambda: x + a, lambda: a + x, lambda: x * a, lambda: a @ x, lambda: x < a,
               lambda: cp.maximum(x, a), lambda: cp.concatenate([x, a]),
               lambda: cp.where(x > 0, x, a), lambda: cp.matmul(a, x)):
        with pytest.raises(TypeError, match="Unsupported type"):
            op()
    with pytest.raises(TypeError, match="out must be a cupy.ndarray"):
        cp.exp(x, out=np.empty(3))
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
        x[:] = a  # basic slicing: CuPy's fill path
    x[np.array([0, 2])] = np.array([5.0, 7.0])  # advanced indexing copies host values (CuPy too)
    assert x.get().tolist() == [5.0, 1.0, 7.0]
    # scalars of either kind are fine, NumPy scalars included
    assert (x * np.float32(2) + 1).get().tolist() == [11.0, 3.0, 15.0]


def test_standin_results_stay_on_the_device():
    x = cp.asarray(np.arange(4.0))
    assert type(x.sum()) is cp.ndarray and x.sum().shape == ()  # 0-d, never a NumPy scalar
    assert type(x[1]) is cp.ndarray
    assert type(np.exp(x)) is cp.ndarray  # NumPy functions dispatch to the device module
    assert type(np.concatenate([x, x])) is cp.ndarray
    assert backend.to_numpy(np.exp(x)).tolist() == np.exp(np.arange(4.0)).tolist()
    with pytest.raises(AttributeError, match="not in CuPy"):
        x.tostring  # noqa: B018  (a NumPy-only method)
    with pytest.raises(AttributeError):
        cp.nanquantile  # noqa: B018  (not modelled: a clear AttributeError, not a silent NumPy)
    with pytest.raises(TypeError, match="'mode'"):
        cp.take(x, cp.asarray(np.array([0, 1])), mode="wrap")  # CuPy's take has no mode
    with pytest.raises(TypeError, match="'where'"):
        x.sum(where=x > 1)


def test_standin_views_name_their_owner_as_base():
    """CuPy: a view's ``base`` is the one array that owns the memory (memory accounting relies
    on it to count each buffer once)."""
    from minilora.memory import tree_bytes
    a = cp.zeros((10, 4), dtype=np.float32)  # 160 bytes
    b = cp.ones(5)                            # 40 bytes
    assert a.base is None and a[2:].base is a and a.T.base is a and a[2:].T.base is a
    use_backend("cupy_strict")
    tree = (a, [a[2:], {"k": a.T, "b": b}], None, 3)
    assert tree_bytes(tree) == 200 and tree_bytes(tree, exclude=[a]) == 40


def test_standin_has_no_kernels():
    for kind in ("ElementwiseKernel", "RawKernel", "RawModule", "ReductionKernel"):
        with pytest.raises(NotImplementedError, match="fall back"):
            getattr(cp, kind)("float32 x", "float32 y", "y = x", "k")


def test_standin_managed_memory_and_prefetch():
    use_backend("cupy_strict")
    buf = backend.managed_zeros(4096)
    assert backend.is_cupy() and backend.is_array(buf) and buf.dtype == np.uint8
    assert backend.is_managed(buf) and backend.is_managed(buf[1024:2048])
    assert int(buf.sum()) == 0
    n = len(cp.cuda.runtime.PREFETCHES)
    assert backend.prefetch(buf[:1024]) is None and backend.prefetch(buf, to_host=True) is None
    assert [p[2] for p in cp.cuda.runtime.PREFETCHES[n:]] == [0, -1]  # device 0, then the host
    plain = xp.zeros(16)
    assert not backend.is_managed(plain)
    reason = backend.prefetch(plain)  # CUDA refuses to prefetch memory that is not managed
    assert reason is not None and "cudaMemPrefetchAsync failed" in reason


def test_real_cupy_is_still_required_for_backend_cupy():
    """The stand-in never answers for 'cupy': that still means a real CuPy and a GPU."""
    if CUPY:
        pytest.skip("CuPy is usable here")
    with pytest.raises(backend.BackendError, match="CuPy cannot be imported|no CUDA device"):
        backend.set_backend("cupy")
    assert backend.get_backend() == "numpy"
    with pytest.raises(backend.BackendError, match="only stand in for 'cupy'"):
        backend.set_backend("numpy", module=cp)


def test_env_var_runs_the_cli_on_the_standin():
    env = dict(os.environ, MINILORA_BACKEND="cupy-strict", MINILORA_CUPY_STANDIN=str(STANDIN_DIR),
               OPENBLAS_NUM_THREADS="1")
    code = ("from minilora import backend; from minilora.backend import xp; "
            "x = xp.ones(3); print(backend.get_backend(), type(x).__module__, float(x.sum()))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cupy", "cupy_strict", "3.0"]
    env.pop("MINILORA_CUPY_STANDIN")
    r = subprocess.run([sys.executable, "-m", "minilora.cli", "gradcheck"], env=env,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "MINILORA_CUPY_STANDIN" in r.stderr


# ------------------------------------------------------------------------------------------
# whole paths: NumPy and the stand-in agree
# ------------------------------------------------------------------------------------------

def _batches(n=3, B=2, T=16, seed=5):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, CFG.vocab_size, size=(B, T)),
             rng.integers(0, CFG.vocab_size, size=(B, T))) for _ in range(n)]


def _steps(model, opt, batches):
    """Forward, backward and an optimizer step per batch; returns the losses."""
    losses = []
    for x, y in batches:
        losses.append(model.forward_backward(backend.asarray(x), backend.asarray(y)))
        opt.step(lr=1e-2, grad_clip=1.0)
    return losses


def _full_training():
    model = GPT(CFG, rng=0, dtype="float64")
    opt = AdamW(model, lr=1e-2)
    losses = _steps(model, opt, _batches())
    return losses, dict(model.named_parameters()), opt.state_arrays()


@pytest.mark.parametrize("name", STRICT)
def test_full_training_steps(name):
    ref = host(_full_training())
    got = host(on(name, _full_training))
    assert all(isinstance(v, float) for v in got[0])  # losses come back as Python floats
    assert_same(ref, got, **tol(name))


def _lora_training():
    model = GPT(CFG, rng=0, dtype="float64")
    inject_lora(model, LoraConfig(r=4, target_modules=("wte", "q", "v", "up", "lm_head"),
                                  init_lora_weights=False, seed=3, lora_dropout=0.1))
    opt = AdamW(model, lr=1e-2)
    losses = _steps(model, opt, _batches())
    return losses, lora_state_dict(model)


@pytest.mark.parametrize("name", STRICT)
def test_lora_training_steps(name):
    ref = host(_lora_training())
    assert_same(ref, host(on(name, _lora_training)), **tol(name))


def _qlora_training(double_quant):
    from minilora.methods.qlora import inject_qlora
    model = GPT(CFG, rng=0, dtype="float32")
    inject_qlora(model, LoraConfig(r=4, target_modules=("q", "v", "up"), init_lora_weights=False,
                                   seed=3),
                 QuantConfig(blocksize=64, double_quant=double_quant))
    opt = AdamW(model, lr=1e-2)
    losses = _steps(model, opt, _batches(n=2))
    return losses, lora_state_dict(model)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("name", STRICT)
def test_qlora_training_steps(name, double_quant):
    ref = host(_qlora_training(double_quant))
    # float32 and the CuPy branches of the quantiser (whole-tensor passes, searchsorted): the
    # codes are identical, float32 sums may round differently
    assert_same(ref, host(on(name, lambda: _qlora_training(double_quant))), rtol=1e-5, atol=1e-6)


def _paged_training():
    from minilora.paged import PagedAdamW
    model = GPT(CFG, rng=0, dtype="float64")
    opt = PagedAdamW(model, lr=1e-2)
    losses = _steps(model, opt, _batches(n=2))
    opt.page_out()  # on CuPy: prefetch the state to the host; the next update pages it back
    losses += _steps(model, opt, _batches(n=1, seed=9))
    managed = [backend.is_managed(a) for a, _ in opt.arenas]
    return losses, dict(model.named_parameters()), opt.state_arrays(), managed, opt.prefetch_error


@pytest.mark.parametrize("name", STRICT)
def test_paged_adamw_on_managed_memory(name):
    ref = host(_paged_training())
    n = len(cp.cuda.runtime.PREFETCHES)
    got = host(on(name, _paged_training))
    assert ref[3] == [False] * len(ref[3]) and got[3] == [True] * len(got[3])
    if name == "cupy_strict":
        assert got[4] is None  # every prefetch was accepted (only managed memory is)
    else:  # a GPU without concurrent managed access refuses prefetches: a hint, results equal
        assert got[4] is None or "cudaMemPrefetchAsync" in got[4]
    if name == "cupy_strict":
        assert len(cp.cuda.runtime.PREFETCHES) > n
    assert_same(ref[:3], got[:3], **tol(name))


def _mixed_batch():
    from minilora.adapters import AdapterRegistry, generate_mixed
    ads = {}
    for seed, r in ((1, 4), (2, 2)):
        cfg = LoraConfig(r=r, target_modules=("wte", "q", "v", "lm_head"), init_lora_weights=False,
                         seed=seed)
        m = GPT(CFG, rng=0, dtype="float64")
        inject_lora(m, cfg)
        ads[f"a{seed}"] = ({k: backend.to_numpy(v).copy() for k, v in lora_state_dict(m).items()},
                           cfg)
    reg = AdapterRegistry(GPT(CFG, rng=0, dtype="float64"))
    for name, (arrays, cfg) in ads.items():
        reg.add(name, arrays, cfg)
    idx = backend.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, size=(3, 10)))
    logits = reg.forward(idx, ["a1", None, "a2"])
    logits = logits[0] if isinstance(logits, tuple) else logits
    texts = generate_mixed(reg, TOK, "ROMEO:", ["a1", None, "a2"], max_new_tokens=8)
    return logits, texts


@pytest.mark.parametrize("name", STRICT)
def test_mixed_adapter_batch_and_generation(name):
    ref = host(_mixed_batch())
    assert_same(ref, host(on(name, _mixed_batch)), **tol(name))


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("name", STRICT)
def test_checkpoint_saved_on_the_device_loads_anywhere(name, paged, tmp_path):
    from minilora.checkpoint import load_checkpoint, save_checkpoint
    from minilora.paged import PagedAdamW
    Opt = PagedAdamW if paged else AdamW  # paged: the loaded moments move into managed memory

    def train_and_save():
        model = GPT(CFG, rng=0, dtype="float64")
        opt = Opt(model, lr=1e-2)
        _steps(model, opt, _batches(n=1))
        save_checkpoint(tmp_path / "dev.safetensors", model, TOK, optimizer=opt, step=1)
        return dict(model.named_parameters()), opt.state_arrays()

    params, state = host(on(name, train_and_save))
    model, _, info = load_checkpoint(tmp_path / "dev.safetensors")  # on NumPy
    assert_same(params, host(dict(model.named_parameters())))
    assert_same(state, info["optim_arrays"])

    def load_and_step():  # ... and back onto the device, resuming the optimizer there
        m, _, inf = load_checkpoint(tmp_path / "dev.safetensors")
        opt = Opt(m, lr=1e-2)
        opt.load_state(inf["optim_arrays"], inf["optimizer"])
        if paged:
            assert all(backend.is_managed(a) for a, _ in opt.arenas) == backend.is_cupy()
        losses = _steps(m, opt, _batches(n=1, seed=11))
        return losses, dict(m.named_parameters())

    m2 = GPT(CFG, rng=0, dtype="float64")
    m2.load_state_dict(params)
    opt2 = Opt(m2, lr=1e-2)
    opt2.load_state(info["optim_arrays"], info["optimizer"])
    ref = host((_steps(m2, opt2, _batches(n=1, seed=11)), dict(m2.named_parameters())))
    assert_same(ref, host(on(name, load_and_step)), **tol(name))


def _sample():
    from minilora.sample import generate, sample_text
    model = GPT(CFG, rng=0, dtype="float64")
    idx = backend.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, size=(2, 5)))
    return generate(model, idx, 20, temperature=0.9, top_k=5, rng=3), \
        sample_text(model, TOK, "ROMEO:", max_new_tokens=20, seed=2)


@pytest.mark.parametrize("name", STRICT)
def test_sampling(name):
    ref = host(_sample())
    got = host(on(name, _sample))
    assert_same(ref, got)  # token draws: identical, not close


def _train_loop(tmp):
    from minilora.config import TrainConfig
    from minilora.train import train
    ids = TOK.encode("ROMEO: But soft, what light through yonder window breaks? " * 4)
    model = GPT(CFG, rng=0, dtype="float64")
    cfg = TrainConfig(max_steps=3, batch_size=2, block_size=16, eval_every=2, eval_batches=1,
                      lr=1e-2, warmup_steps=1, seed=0)
    hist = train(model, TOK, ids, ids, cfg, out_dir=tmp, progress=False)
    return hist.train, hist.val, dict(model.named_parameters())


@pytest.mark.parametrize("name", STRICT)
def test_train_loop(name, tmp_path):
    ref = host(_train_loop(tmp_path / "numpy"))
    got = host(on(name, lambda: _train_loop(tmp_path / name)))
    def maths(records):  # drop the timings
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in records]
    assert len(got[0]) == 3 and got[1]
    assert_same(maths(ref[0]), maths(got[0]), **tol(name))
    assert_same(ref[1:], got[1:], **tol(name))


def _nf4_round_trip(double_quant):
    from minilora.quant.nf4 import NF4_CODE, dequantize_4bit, quantize_4bit
    w = np.random.default_rng(0).standard_normal((48, 40)).astype("float32")  # tail block
    packed, state = quantize_4bit(backend.asarray(w), NF4_CODE, blocksize=64,
                                  double_quant=double_quant, quant_type="nf4")
    return packed, dequantize_4bit(packed, state)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("name", STRICT)
def test_nf4_cupy_branches_equal_numpy_branches(name, double_quant):
    """blockwise.py takes other branches on CuPy (whole-tensor max, searchsorted, take without
    mode): the codes and the dequantised weights must be the NumPy ones exactly."""
    ref = host(_nf4_round_trip(double_quant))
    got = host(on(name, lambda: _nf4_round_trip(double_quant)))
    assert_same(ref[0], got[0])                               # the 4-bit codes: exact
    # the scales: exact on the stand-in; on a GPU the double-quant offset is a float32 mean
    # summed in another order (last-bit differences)
    assert_same(ref[1], got[1], **({} if name == "cupy_strict" else {"rtol": 1e-6}))


# ------------------------------------------------------------------------------------------
# the GPU path's own kernel (fused scale + nearest code in quant/kernel.py)
# ------------------------------------------------------------------------------------------

def _quant_inputs():
    """Random blocks, exact ties on midpoints, an all-zero block, +-absmax, a partial tail."""
    from minilora.quant.blockwise import midpoints
    from minilora.quant.double import DYNAMIC_MAP
    from minilora.quant.nf4 import INT4_CODE, NF4_CODE
    rng = np.random.default_rng(0)
    cases = []
    for code in (NF4_CODE, INT4_CODE, DYNAMIC_MAP):
        mids = backend.to_numpy(midpoints(np.asarray(code, dtype=np.float32)))
        ties = np.zeros(64 * -(-(mids.size + 1) // 64), dtype=np.float32)
        ties[0] = 1.0                                   # absmax 1: scaled == value exactly
        ties[1:1 + mids.size] = mids                    # every value sits on a midpoint
        x = np.concatenate([rng.standard_normal(64 * 300).astype(np.float32) * 3.0, ties,
                            np.zeros(64, np.float32), np.float32([-2.5, 2.5] * 32),
                            rng.standard_normal(37).astype(np.float32)])
        cases.append((x, np.asarray(code, dtype=np.float32)))
    return cases


def _quantize_all(cases):
    from minilora.quant.blockwise import quantize_blockwise
    return [quantize_blockwise(backend.asarray(x), backend.asarray(code), 64)
            for x, code in cases]


def test_nf4_kernel_falls_back_on_the_standin():
    from minilora.quant import kernel
    cases = _quant_inputs()
    ref = host(_quantize_all(cases))
    use_backend("cupy_strict")
    assert kernel._nearest_kernel() is None  # the stand-in builds no kernel ...
    assert_same(ref, host(_quantize_all(cases)))  # ... and the fallback gives NumPy's codes


@pytest.mark.gpu
@pytest.mark.skipif(not CUPY, reason="needs CuPy and a CUDA device (the kernel is compiled)")
def test_nf4_kernel_equals_numpy_path_on_real_cupy(monkeypatch):
    from minilora.quant import kernel
    cases = _quant_inputs()
    ref = host(_quantize_all(cases))
    use_backend("cupy")
    try:
        assert kernel._nearest_kernel() is not None
        fused = host(_quantize_all(cases))
        monkeypatch.setattr(kernel, "USE_NEAREST_KERNEL", False)
        plain = host(_quantize_all(cases))
    finally:
        backend.set_backend("numpy")
    assert_same(ref, fused)   # codes and scales bit-identical to the NumPy path
    assert_same(ref, plain)


# ------------------------------------------------------------------------------------------
# the command line on the stand-in (MINILORA_BACKEND=cupy-strict), against the same on NumPy
# ------------------------------------------------------------------------------------------

def _cli(args, cwd, strict):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MINILORA_BACKEND="cupy-strict" if strict else "numpy",
               MINILORA_CUPY_STANDIN=str(STANDIN_DIR))
    r = subprocess.run([sys.executable, "-m", "minilora.cli", *args], env=env, cwd=cwd,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_cli_finetune_and_sample_on_the_standin_equal_numpy(tmp_path):
    import json
    keys = ("task_loss", "shakespeare_loss", "forgetting", "task_metric_init",
            "optimizer_state_bytes")
    results = {}
    for strict in (False, True):
        got = []
        for method in ("qlora", "lora"):
            out = tmp_path / f"{method}-{strict}"
            _cli(["finetune", "--method", method, "--steps", "2", "--batch-size", "2",
                  "--eval-batches", "1", "--no-progress", "--out", str(out)], tmp_path, strict)
            r = json.loads((out / "result.json").read_text())
            got.append({k: r.get(k) for k in keys})
        got.append(_cli(["sample", "--adapter", str(out / "adapter.safetensors"), "--prompt",
                         "ROMEO:", "--max-new-tokens", "40", "--seed", "3"], tmp_path, strict))
        results[strict] = got
    # The stand-in computes with NumPy, but a CuPy step runs the batch in one pass where the
    # NumPy step runs it as two micro-batches on threads (minilora.model.data_parallel_pieces):
    # the same sums in another order, so the losses agree to float32 rounding, not bit for bit.
    for got, want in zip(results[True], results[False]):
        if isinstance(got, dict):
            assert got.keys() == want.keys()
            for k in got:
                if isinstance(want[k], float):
                    assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
                else:
                    assert got[k] == want[k], k
        else:
            assert got == want   # the sampled text
