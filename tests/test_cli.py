"""The command line as a user types it: help, errors, and small real runs."""
import subprocess
import sys

import pytest

from minilora import cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "minilora.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("cmd", [[], ["tour"], ["pretrain"], ["sample"], ["gradcheck"], ["bench"], ["finetune"], ["quantize"]])
def test_every_command_has_help_with_examples(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "example" in r.stdout


@pytest.mark.slow  # an end-to-end run; CI runs -m slow
def test_pretrain_tiny_then_sample(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["pretrain", "--preset", "tiny", "--max-steps", "6", "--eval-every", "3",
                     "--ckpt-every", "3", "--out", str(out), "--no-progress",
                     "--export", str(tmp_path / "w.safetensors")]) == 0
    assert (out / "ckpt.safetensors").exists() and (out / "metrics.jsonl").exists()
    r = run("sample", "--ckpt", str(tmp_path / "w.safetensors"), "--prompt", "ROMEO:",
            "--max-new-tokens", "20", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.rstrip("\n")) >= 6 + 15
    r2 = run("sample", "--ckpt", str(tmp_path / "w.safetensors"), "--prompt", "ROMEO:",
             "--max-new-tokens", "20", "--seed", "3")
    assert r2.stdout == r.stdout  # seeded


def test_sample_prompt_outside_vocabulary_is_one_clear_error(tmp_path):
    cli.main(["pretrain", "--preset", "tiny", "--max-steps", "1", "--out", str(tmp_path),
              "--no-progress"])
    r = run("sample", "--ckpt", str(tmp_path / "ckpt.safetensors"), "--prompt", "caf\u00e9 \u4f60")
    assert r.returncode == 2
    assert r.stderr.startswith("minilora: error:") and "Traceback" not in r.stderr
    assert "'\u00e9'" in r.stderr
    assert r.stdout == ""  # nothing streamed before the check


@pytest.mark.parametrize("args, match", [
    (["sample", "--ckpt", "does/not/exist.safetensors"], "does not exist"),
    (["sample", "--temperature", "0", "--ckpt", "{ck}"], "temperature"),
    (["sample", "--top-k", "0", "--ckpt", "{ck}"], "--top-k must be >= 1"),
    (["sample", "--keep", "3", "--exact-window", "--ckpt", "{ck}"], "--keep and --exact-window"),
    (["pretrain", "--preset", "tiny", "--n-embd", "30", "--n-head", "4", "--out", "{tmp}"],
     "divisible"),
    (["pretrain", "--preset", "tiny", "--val-plays", "nosuchplay", "--out", "{tmp}"],
     "nosuchplay"),
    (["pretrain", "--preset", "tiny", "--lr", "-1", "--out", "{tmp}"], "lr"),
    (["gradcheck", "--backend", "cupy"], "cupy"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, match):
    ck = tmp_path / "ck.safetensors"
    if any("{ck}" in a for a in args):
        cli.main(["pretrain", "--preset", "tiny", "--max-steps", "1", "--out", str(tmp_path / "r"),
                  "--no-progress", "--export", str(ck)])
    args = [a.replace("{ck}", str(ck)).replace("{tmp}", str(tmp_path / "new")) for a in args]
    r = run(*args)
    if args[0] == "gradcheck" and r.returncode == 0:
        pytest.skip("CuPy and a GPU are available here")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and match in r.stderr
    assert not (tmp_path / "new").exists()  # nothing written on bad input


def test_gradcheck_command_passes():
    r = run("gradcheck")
    assert r.returncode == 0, r.stdout[-2000:]
    assert " 0 failed" in r.stdout


def test_gradcheck_table_shows_both_errors_and_the_rule_each_row_passed():
    """A row passing on the absolute test says so (its relative error may exceed tol), and the
    footer counts rows per rule with the same thresholds."""
    from minilora.gradcheck import format_table

    rows = [{"name": "a", "shape": (2,), "rel_error": 3e-8, "abs_error": 2e-11, "tol": 1e-6,
             "atol": 1e-9, "rule": "rel", "ok": True},
            {"name": "k bias", "shape": (8,), "rel_error": 5.6e-6, "abs_error": 5.6e-18,
             "tol": 1e-6, "atol": 1e-9, "rule": "abs", "ok": True},
            {"name": "bad", "shape": (3,), "rel_error": 0.5, "abs_error": 0.1, "tol": 1e-6,
             "atol": 1e-9, "rule": None, "ok": False}]
    lines = format_table(rows).splitlines()
    assert "rel. error" in lines[0] and "abs. error" in lines[0] and "passed by" in lines[0]
    assert lines[2].endswith("rel < 1e-06") and "3.00e-08" in lines[2]
    assert lines[3].endswith("abs < 1e-09") and "5.60e-06" in lines[3] and "5.60e-18" in lines[3]
    assert lines[4].endswith("NO: failed both")
    assert lines[-1] == "2 passed (1 by abs < 1e-09; 1 by rel < 1e-06), 1 failed"
    assert "relative error is below tol" in lines[-2] and "absolute error is below atol" in lines[-2]


@pytest.mark.slow  # ~11 s: draws every figure three times
def test_figures_are_byte_stable_and_unchanged_files_are_not_rewritten(tmp_path):
    """Every registered figure drawn twice from the committed results/ gives the same bytes, and
    a second `minilora figures` into the same folder rewrites nothing (figures whose results are
    missing are skipped by the command itself)."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "results"
    a, b = tmp_path / "a", tmp_path / "b"

    def draw(out):
        assert cli.main(["figures", "--results", str(results), "--figures", str(out),
                         "--overwrite"]) == 0
        return {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    first = draw(a)
    if not first:
        pytest.skip("no committed results to draw from")
    assert draw(a) == first  # same names, and no file rewritten
    assert sorted(draw(b)) == sorted(first)
    for name in first:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("argv, attr, default", [
    (["loftq"], "out", None),
    (["paged-demo"], "out", None),
    (["quantize", "--compare"], "results", None),
    (["adapter", "claim"], "out", None),
])
def test_result_writing_commands_default_to_runs(argv, attr, default):
    """Committed results/ change only when a flag names them (see each command's --help)."""
    args = cli.build_parser().parse_args(argv)
    assert getattr(args, attr) == default
