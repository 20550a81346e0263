"""The GPU check: one command that proves the CuPy path on a CUDA machine, in about 8 minutes.

::

    .ci/gpu-check [--out DIR] [--quick]          # a bare CUDA machine: only numpy, scipy,
                                                 # safetensors, pytest and a CUDA build of CuPy
    minilora gpu-check [--out DIR] [--quick]     # where minilora is installed

Five parts, each timed, each with its own status; a part that fails never stops the others:

1. **device**: CuPy, the CUDA runtime and driver, the device's name, memory and compute
   capability; NumPy and SciPy.
2. **tests**: ``pytest -m gpu`` on the test files that run on the real CuPy (every test
   parametrised with the ``cupy`` backend, and those marked ``gpu`` by hand, among them the NF4
   kernel's), each file only if its imports are available on this machine.
3. **gradcheck**: every op's backward and a whole tiny model against centred finite
   differences in float64, on CuPy (``minilora gradcheck``'s suite).
4. **nf4**: the ``ElementwiseKernel`` of :mod:`minilora.quant.kernel` compiled; its codes,
   scales, packed bytes and dequantised floats compared byte for byte with NumPy's on the CPU
   (random tensors with a ragged tail, tiny and huge scales, an all-zero block, values on the
   midpoints; double quantisation too, whose second level may differ by the rounding of a
   mean summed in another order), and with CuPy's path without the kernel; then
   quantise + dequantise against a device copy of the same tensor (target >= 0.5 of the copy's
   bandwidth).
5. **bench**: ``minilora bench`` on CuPy for the training step (small, medium), LoRA, QLoRA and
   decoding, and the NumPy training step at medium on this machine's CPU (the library's thread
   setting): target CuPy / NumPy speed-up >= 30.

Everything goes to ``OUT/gpu_check.json`` (one JSON: machine, device, every part's figures,
every target) and ``OUT/gpu_check.md`` (the table), and is printed. Exit status 0 when every part
ran and passed (a missed speed target is reported, not an error), 1 otherwise.

``--standin`` (and ``MINILORA_BACKEND=cupy-strict``) runs the whole check on the strict CuPy
stand-in of the tests (NumPy underneath, CuPy's refusals of implicit host/device copies on top):
that is how CI runs it on every change, so the check cannot rot; the figures then mean nothing
and no kernel is compiled (the fallback path is compared instead).
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy

from minilora import backend, gradcheck
from minilora.bench import run_bench
from minilora.bench.core import Check, machine_info
from minilora.bench.quant_throughput import bench_quant
from minilora.io import atomic_write_text
from minilora.quant import NF4_CODE, dequantize_nf4, kernel, quantize_nf4

FORMAT = "minilora-gpu-check/1"
#: the tests folder of a repository checkout (the check's pytest part needs it)
TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"
#: test-file modules that are not third-party packages
LOCAL_TEST_MODULES = {"conftest", "helpers", "peft_gpt", "minilora"}
NF4_TARGET = 0.5
SPEEDUP_TARGET = 30.0


def _backend_name(standin: bool) -> str:
    return "cupy-strict" if standin else "cupy"


def _timed_part(name, fn, parts, print_fn):
    """Run one part, record ``{"status", "seconds", ...}`` under ``parts[name]``."""
    print_fn(f"== {name}")
    t0 = time.perf_counter()
    try:
        rec = fn()
        rec.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - one part's failure must not stop the others
        line = f"{type(e).__name__}: {e}".splitlines()[0]
        rec = {"status": "failed", "error": line}
    finally:
        backend.set_backend("numpy")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    parts[name] = rec
    print_fn(f"   {rec['status']} ({rec['seconds']} s){': ' + rec['error'] if 'error' in rec else ''}")
    return rec


# ----------------------------------------------------------------------------------------------
# 1. device
# ----------------------------------------------------------------------------------------------
def device_info(standin: bool) -> dict:
    backend.set_backend(_backend_name(standin))
    cp = backend.xp
    info = {"cupy": getattr(cp, "__version__", "?"), "standin": standin,
            "numpy": np.__version__, "python": platform.python_version()}
    info["scipy"] = scipy.__version__
    rt = cp.cuda.runtime
    for key, call in (("cuda_runtime", "runtimeGetVersion"), ("cuda_driver", "driverGetVersion"),
                      ("devices", "getDeviceCount")):
        try:
            info[key] = getattr(rt, call)()
        except Exception as e:  # noqa: BLE001 - the stand-in has no such call
            info[key] = f"unavailable ({type(e).__name__})"
    try:
        props = rt.getDeviceProperties(cp.cuda.Device().id)
        name = props.get("name", b"")
        info["device"] = name.decode() if isinstance(name, bytes) else str(name)
        info["memory_gib"] = round(props.get("totalGlobalMem", 0) / 2 ** 30, 1)
        info["compute_capability"] = f"{props.get('major')}.{props.get('minor')}"
    except Exception as e:  # noqa: BLE001
        info["device"] = "the strict CuPy stand-in (CPU)" if standin else \
            f"unknown ({type(e).__name__}: {e})"
    return info


# ----------------------------------------------------------------------------------------------
# 2. tests
# ----------------------------------------------------------------------------------------------
def _importable(path: Path) -> bool:
    """Whether every third-party module ``path`` imports at its top level is installed."""
    for line in path.read_text().splitlines():
        m = re.match(r"(?:from|import)\s+([A-Za-z_][\w]*)", line)
        if m and m.group(1) not in LOCAL_TEST_MODULES and m.group(1) not in sys.builtin_module_names:
            try:
                if importlib.util.find_spec(m.group(1)) is None:
                    return False
            except (ImportError, ValueError):
                return False
    return True


def gpu_test_files() -> tuple[list, list]:
    """(files to run, files left out because an import is missing) among the test files that
    have a test on the real CuPy."""
    run, left = [], []
    for path in sorted(TESTS_DIR.glob("test_*.py")):
        text = path.read_text()
        if not re.search(r"\bxpb\b|\bCUPY\b|mark\.gpu|\bSTRICT\b", text):
            continue
        (run if _importable(path) else left).append(path)
    return run, left


def run_tests(standin: bool, quick: bool) -> dict:
    if not TESTS_DIR.is_dir():
        return {"status": "skipped", "reason": f"no tests folder at {TESTS_DIR} (run the check "
                                               "from a repository checkout)"}
    files, left = gpu_test_files()
    if standin:  # no real CuPy: `-m gpu` selects nothing; run the stand-in's NF4 tests instead
        args = [str(TESTS_DIR / "test_cupy_strict.py"), "-k", "nf4 and cupy_strict"]
    else:
        args = ["-m", "gpu", *map(str, files)]
    env = dict(os.environ)
    env.pop("MINILORA_BACKEND", None)  # the tests choose their backends themselves
    root = str(TESTS_DIR.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                               tail[0])}
    ok = proc.returncode == 0 and counts.get("passed", 0) > 0
    rec = {"status": "ok" if ok else "failed", "command": " ".join(cmd[1:]), "summary": tail[0],
           "counts": counts, "files": [p.name for p in files],
           "left_out": [p.name for p in left]}
    if not ok:
        rec["error"] = (f"pytest exit {proc.returncode}: {tail[0]}" if proc.returncode != 5
                        else "pytest collected no GPU test (is CuPy usable by the tests?)")
        rec["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return rec


# ----------------------------------------------------------------------------------------------
# 3. gradcheck
# ----------------------------------------------------------------------------------------------
def run_gradcheck(standin: bool, seed: int = 0) -> dict:
    backend.set_backend(_backend_name(standin))
    rows = gradcheck.op_suite(seed) + gradcheck.tiny_model_check(seed)
    bad = [r["name"] for r in rows if not r["ok"]]
    worst = max((float(r["rel_error"]) for r in rows), default=0.0)
    rec = {"checks": len(rows), "failed": bad, "largest_rel_error": worst}
    if bad:
        rec.update(status="failed", error=f"{len(bad)} of {len(rows)} gradients disagree: "
                                          f"{', '.join(bad[:5])}")
    return rec


# ----------------------------------------------------------------------------------------------
# 4. NF4: the kernel, byte for byte, and its throughput
# ----------------------------------------------------------------------------------------------
def nf4_cases(n: int, seed: int = 0) -> list:
    """(name, float32 NumPy array) inputs whose codes must not depend on the device."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n + 37).astype(np.float32)  # a ragged tail: not whole blocks
    zeros = x.copy()
    zeros[64:128] = 0.0  # an all-zero block
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    ties = np.resize(np.concatenate([mids, -mids, NF4_CODE, [1.0, -1.0]]).astype(np.float32),
                     64 * 64)  # values on the midpoints, blocks whose absmax is exactly 1
    return [("normal", x), ("tiny scale", x * np.float32(1e-30)), ("huge scale", x * np.float32(1e30)),
            ("zero block", zeros), ("midpoints", ties)]


def _nf4_bytes(x_np, double_quant: bool) -> dict:
    """Every output of the NF4 round trip on the active backend, as NumPy arrays."""
    packed, state = quantize_nf4(backend.asarray(x_np), blocksize=64, double_quant=double_quant)
    out = {"packed": packed, "absmax": state.absmax, "dequantised": dequantize_nf4(packed, state)}
    if double_quant:
        out.update(absmax2=state.absmax2, offset=backend.xp.asarray(state.offset))
    return {k: backend.to_numpy(v) for k, v in out.items()}


def _close_after_mean(ref: dict, got: dict, key: str) -> bool:
    """Double quantisation's offset is a mean of the scales, whose summation order differs on
    a GPU: it may differ from NumPy's in its last bit, and the second level with it. Within
    that rounding: the offset to float32 precision, the 8-bit codes to one step in 0.1 % of
    the blocks, the floats to 1e-5 of the block's scale."""
    a, b = ref[key], got[key]
    if a.shape != b.shape:
        return False
    if key == "absmax":  # the 8-bit codes of the scales
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        return diff.max() <= 1 and (diff > 0).mean() <= 1e-3
    scale = float(np.abs(a).max()) or 1.0
    return bool(np.abs(a.astype(np.float64) - b).max() <= 1e-5 * scale)


def run_nf4(standin: bool, quick: bool) -> dict:
    n = 4096 if quick else 1 << 20
    backend.set_backend(_backend_name(standin))
    compiled = kernel._nearest_kernel() is not None
    rec = {"kernel_compiled": compiled, "cases": {}, "mismatches": [], "rounding_only": []}
    if not compiled and not standin:
        rec["mismatches"].append("the NF4 ElementwiseKernel did not compile")
    for name, x in nf4_cases(n):
        for dq in (False, True):
            backend.set_backend("numpy")
            ref = _nf4_bytes(x, dq)
            backend.set_backend(_backend_name(standin))
            paths = {"kernel" if compiled else "fallback": _nf4_bytes(x, dq)}
            if compiled:  # and CuPy's array-function path without the kernel
                kernel.USE_NEAREST_KERNEL = False
                try:
                    paths["array functions"] = _nf4_bytes(x, dq)
                finally:
                    kernel.USE_NEAREST_KERNEL = True
            label = f"{name}{', double quant' if dq else ''}"
            for path, got in paths.items():
                same = {k: bool(ref[k].dtype == got[k].dtype and ref[k].shape == got[k].shape
                                and ref[k].tobytes() == got[k].tobytes()) for k in ref}
                rec["cases"][f"{label} [{path}]"] = same
                for k, ok in same.items():
                    if ok:
                        continue
                    if dq and k != "packed" and _close_after_mean(ref, got, k):
                        rec["rounding_only"].append(f"{label} [{path}]: {k}")
                    else:
                        rec["mismatches"].append(f"{label} [{path}]: {k}")
    r = bench_quant(1 << 16 if quick else 1 << 26, repeats=3 if quick else 10)
    rec["throughput"] = {k: r[k] for k in ("n", "copy_gbps", "quantize_gbps", "dequantize_gbps",
                                           "roundtrip_gbps", "ratio")}
    if rec["mismatches"]:
        rec.update(status="failed", error=f"{len(rec['mismatches'])} NF4 outputs differ from "
                                          f"NumPy's: {'; '.join(rec['mismatches'][:3])}")
    return rec


# ----------------------------------------------------------------------------------------------
# 5. bench
# ----------------------------------------------------------------------------------------------
def run_benchmarks(standin: bool, quick: bool, print_fn) -> dict:
    configs = ["micro"] if quick else ["small", "medium"]
    ref_config = configs[-1]
    steps = 2 if quick else 10
    common = dict(torch_compare=False, memory=False, progress=False, print_fn=print_fn,
                  sgemm_sizes=(256,) if quick else (2048, 4096, 8192), threads=os.cpu_count() or 1)
    backend.set_backend("numpy")
    print_fn(f"-- NumPy on the CPU, {ref_config} (the reference of the speed-up)")
    ref = run_bench([ref_config], steps=2 if quick else 3, only=["train_step"],
                    **{**common, "sgemm_sizes": (256,) if quick else (1024,)})
    backend.set_backend(_backend_name(standin))
    print_fn(f"-- CuPy: {', '.join(configs)}")
    res = run_bench(configs, steps=steps, only=["train_step", "lora", "qlora", "decode"],
                    **common)
    numpy_s = ref["configs"][ref_config]["measurements"]["train_step"]["median_s"]["ours"]
    cupy_s = res["configs"][ref_config]["measurements"]["train_step"]["median_s"]["ours"]
    return {"numpy_reference": ref, "cupy": res, "speedup_config": ref_config,
            "numpy_step_s": numpy_s, "cupy_step_s": cupy_s, "speedup": numpy_s / cupy_s}


# ----------------------------------------------------------------------------------------------
# the whole check
# ----------------------------------------------------------------------------------------------
def _targets(parts: dict) -> list:
    checks = []
    nf4 = parts.get("nf4", {})
    if "throughput" in nf4:
        checks.append(Check("nf4", "quantise + dequantise / device copy bandwidth",
                            nf4["throughput"]["ratio"], ">=", NF4_TARGET))
    bench = parts.get("bench", {})
    if "speedup" in bench:
        checks.append(Check(bench["speedup_config"], "training step, CuPy speed-up over NumPy",
                            bench["speedup"], ">=", SPEEDUP_TARGET))
        checks += [Check(**{k: t[k] for k in ("config", "metric", "value", "op", "target")})
                   for t in bench["cupy"]["targets"]]
    return checks


def format_report(result: dict) -> str:
    """The markdown table of ``gpu_check.md``."""
    d = result["device"]
    lines = [f"# GPU check ({result['started']})", "",
             f"Device: {d.get('device')}, {d.get('memory_gib', '?')} GiB, compute capability "
             f"{d.get('compute_capability', '?')}; CUDA runtime {d.get('cuda_runtime')}, driver "
             f"{d.get('cuda_driver')}; CuPy {d.get('cupy')}, NumPy {d.get('numpy')}, SciPy "
             f"{d.get('scipy')}; CPU {result['machine'].get('cpu_model')} "
             f"({result['machine'].get('usable_cores')} cores).", "",
             f"Command: `{result['command']}`" + (" (on the strict CuPy stand-in: figures "
                                                  "meaningless)" if result["standin"] else ""),
             "", "| part | status | seconds | detail |", "|---|---|---|---|"]
    for name, rec in result["parts"].items():
        detail = rec.get("error") or rec.get("reason") or {
            "tests": rec.get("summary"),
            "gradcheck": f"{rec.get('checks')} gradients agree with finite differences",
            "nf4": f"kernel compiled: {rec.get('kernel_compiled')}; "
                   f"{len(rec.get('cases', {}))} cases byte for byte",
            "bench": f"{rec.get('speedup_config')} training step: NumPy "
                     f"{rec.get('numpy_step_s', 0) * 1e3:.1f} ms, CuPy "
                     f"{rec.get('cupy_step_s', 0) * 1e3:.1f} ms",
        }.get(name, "")
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | {detail} |")
    lines += ["", "| figure | value | target | |", "|---|---|---|---|"]
    for t in result["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.3g}"
        status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"| {t['config']}: {t['metric']} | {v} | {t['op']} {t['target']} | {status} |")
    return "\n".join(lines) + "\n"


def run_check(out_dir, *, quick: bool = False, standin: bool = False, tests: bool = True,
              print_fn=print) -> dict:
    """Run the five parts, write ``gpu_check.json`` and ``gpu_check.md`` into ``out_dir``, and
    return the result (``result["ok"]``: every part ran and passed)."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    result = {"format": FORMAT, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "quick": quick,
              "standin": standin, "machine": machine_info(), "device": {}, "parts": {}}
    parts = result["parts"]
    result["device"] = _timed_part("device", lambda: device_info(standin), parts, print_fn)
    if tests:
        _timed_part("tests", lambda: run_tests(standin, quick), parts, print_fn)
    _timed_part("gradcheck", lambda: run_gradcheck(standin), parts, print_fn)
    _timed_part("nf4", lambda: run_nf4(standin, quick), parts, print_fn)
    _timed_part("bench", lambda: run_benchmarks(standin, quick, print_fn), parts, print_fn)
    result["targets"] = [c.to_dict() for c in _targets(parts)]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["ok"] = all(p["status"] in ("ok", "skipped") for p in parts.values())
    report = format_report(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(result, indent=2, default=str))
    atomic_write_text(out_dir / "gpu_check.md", report)
    print_fn("\n" + report)
    return result

