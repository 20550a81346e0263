"""The benchmark driver: a smoke run on the micro config, and the FLOP formula by hand count."""
import json
import math
import subprocess
import sys

import pytest

from minilora import bench
from minilora.config import GPTConfig


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow  # ~8 s: every bench section on the micro config; CI runs -m slow
def test_run_bench_micro_smoke(tmp_path):
    lines = []
    out = tmp_path / "bench.json"
    res = bench.run_bench(["micro"], steps=2, threads=1, torch_compare=False, out=out, warmup=1,
                          progress=False, sgemm_sizes=(128,), pause_s=0.0, print_fn=lines.append)
    for key in ("machine", "threads", "sgemm", "configs", "targets", "steps", "torch_compare",
                "load_average_end"):
        assert key in res, key
    assert "load_average" in res["machine"]
    assert res["torch_compare"] is False
    # without torch only our own ratios are judged (LoRA, many adapters, QLoRA, ... sections)
    metrics = {t["metric"] for t in res["targets"]}
    assert {"LoRA step / full FT step", "merged inference / base", "unmerged inference / base",
            "LoRA peak memory / full FT peak memory", "unmerged adapter switch / base reload",
            "merged adapter switch / base reload",
            "mixed 4-adapter batch / merged throughput",
            "LoRA / full peak memory, recomputation (chunk 1)"} <= metrics
    assert not any("torch" in m for m in metrics)
    assert all(_positive_finite(t["value"]) for t in res["targets"])
    assert _positive_finite(res["sgemm"]["peak_flops_per_s"])
    micro = res["configs"]["micro"]
    assert micro["tokens_per_step"] == 2 * 16
    step = micro["measurements"]["train_step"]
    assert set(step["median_s"]) == {"ours"} and len(step["times_s"]["ours"]) == 2
    for name in ("median_s", "tokens_per_s", "achieved_flops_per_s"):
        assert _positive_finite(step[name]["ours"]), name
    assert _positive_finite(step["flop_utilisation"])
    assert step["flops_per_step"] == bench.train_step_flops(GPTConfig(**bench.bench_configs()[
        "micro"]["model"]), 2)["total"]
    assert step["ratio_ours_over_torch"] is None
    mem = micro["measurements"]["memory"]
    for name in ("tracemalloc_ours_bytes", "optimizer_state_bytes", "weights_bytes"):
        assert _positive_finite(mem[name]), name
    assert mem["optimizer_state_bytes"] == 2 * mem["weights_bytes"]  # m and v for every weight
    rss = mem["rss_ours"]
    assert _positive_finite(rss["baseline_kb"]) and rss["peak_kb"] >= rss["baseline_kb"]
    assert rss["delta_bytes"] >= 0 and mem["rss_torch"] is None
    rc = micro["measurements"]["recompute"]
    assert set(rc["step_median_s"]) == {f"{m}/{v}" for m in ("full", "lora", "qlora")
                                        for v in ("plain", "recompute", "recompute-chunk1")}
    # recomputation never needs more memory than keeping every block's activations
    for m in ("full", "lora"):
        assert rc["peak_bytes"][f"{m}/recompute-chunk1"] <= rc["peak_bytes"][f"{m}/plain"]
    text = "\n".join(lines)
    assert "step time, ours" in text and "micro" in text and "load average" in text
    assert json.loads(out.read_text())["configs"]["micro"]["flops"] == micro["flops"]


def test_run_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown benchmark config"):
        bench.run_bench(["huge"], steps=1, threads=1, torch_compare=False, out=None)
    with pytest.raises(ValueError, match="steps"):
        bench.run_bench(["micro"], steps=0, threads=1, torch_compare=False, out=None)


def test_bench_configs_match_the_issue():
    c = bench.bench_configs()
    assert c["small"]["model"] == dict(block_size=128, n_layer=4, n_head=4, n_embd=128)
    assert c["small"]["batch_size"] == 16
    assert c["medium"]["model"] == dict(block_size=256, n_layer=6, n_head=8, n_embd=256)
    assert c["medium"]["batch_size"] == 8 and c["medium"]["flop_target"] == 0.55


def _hand_count(cfg: GPTConfig, B: int, T: int):
    """Every matmul of a step written out as (count, m, k, n): 2 m k n FLOPs each."""
    C, V, NH, L = cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_layer
    hs, N = C // NH, B * T
    linears = [(C, C)] * 4 + [(C, 4 * C), (4 * C, C)]  # q, k, v, o, up, down as (d_in, d_out)
    fwd, bwd = [], []
    for _ in range(L):
        fwd += [(1, N, di, do) for di, do in linears]
        fwd += [(B * NH, T, hs, T), (B * NH, T, T, hs)]  # q k^T, att v
        bwd += [(1, N, do, di) for di, do in linears]  # dx = dout W
        bwd += [(1, do, N, di) for di, do in linears]  # dW = dout^T x
        bwd += [(B * NH, T, hs, T), (B * NH, T, T, hs),  # datt = dy v^T, dv = att^T dy
                (B * NH, T, T, hs), (B * NH, T, T, hs)]  # dq = ds k, dk = ds^T q
    fwd.append((1, N, C, V))  # lm_head
    bwd += [(1, N, V, C), (1, V, N, C)]

    def flops(mm):
        return sum(2 * c * m * k * n for c, m, k, n in mm)

    return flops(fwd), flops(bwd)


@pytest.mark.parametrize("shape", [dict(block_size=16, n_layer=1, n_head=2, n_embd=16),
                                   dict(block_size=8, n_layer=3, n_head=4, n_embd=12)])
def test_flop_formula_equals_hand_count(shape):
    cfg = GPTConfig(vocab_size=97, **shape)
    B = 3
    fwd, bwd = _hand_count(cfg, B, cfg.block_size)
    f = bench.train_step_flops(cfg, B)
    assert f["forward"] == fwd
    assert f["backward"] == bwd
    assert f["total"] == fwd + bwd
    assert f["forward_linears"] + f["forward_attention"] == fwd


def test_micro_flops_by_arithmetic():
    # B 2, T 16, C 16, 1 layer, V 97: N = 32 tokens
    # linears 24 N C^2 = 196,608; attention 4 B T^2 C = 32,768; lm_head 2 N C V = 99,328
    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert bench.train_step_flops(cfg, 2)["total"] == 3 * (196_608 + 32_768 + 99_328)


def test_importing_the_package_never_imports_torch(tmp_path):
    """A ``torch`` that raises on import sits first on the path: importing every module of the
    package (the bench and the CLI included) must not touch it. The same probe proves it can fail:
    importing the bench's torch comparison does hit it."""
    import os
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import pkgutil, importlib, sys, minilora\n"
            "for m in pkgutil.walk_packages(minilora.__path__, 'minilora.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    probe = "from minilora.bench.core import _import_torch; print(_import_torch()[1])"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert "PyTorch is not installed (ImportError)" in r.stdout, (r.stdout, r.stderr)
