"""Bad input never costs a run: one table of mistakes, each refused before any work.

Every row runs the command line in-process (``minilora.cli.main``; in a subprocess where an
environment variable is read at import) inside an empty temporary working directory and checks:
exit status 2, exactly one line on stderr, starting ``minilora: error:`` and holding the
expected fragment (the flag's name, the tensor's name...), no traceback, and no file created,
changed or removed (a snapshot of the working directory and of the fixtures before and after).

Placeholders in the argv: ``{ck}`` a tiny checkpoint (context 64), ``{nan}`` the same with one NaN
weight, ``{ad}`` a LoRA adapter for ``{ck}``, ``{peft}`` a PEFT directory exported from it,
``{embcopy}`` a PEFT directory whose ``embed_tokens.base_layer.weight`` differs from the base,
``FILE`` a regular file and ``DIR`` an existing directory in the working directory.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CUPY
from safetensors.numpy import load_file, save_file

from minilora import cli
from minilora.checkpoint import save_checkpoint
from minilora.config import GPTConfig
from minilora.methods.lora.config import LoraConfig
from minilora.data import CharTokenizer
from minilora.io import read_typed
from minilora.methods.lora import inject_lora, save_adapter
from minilora.methods.lora.peft_io import export_peft, import_peft
from minilora.peft_format import WEIGHTS_NAME
from minilora.model import GPT

NAN_TENSOR = "blocks.0.attn.q.weight"

# (argv, expected fragment of the one error line)
ROWS = [
    # -- the table -----------------------------------------------------------------
    (["sample", "--ckpt", "{nan}"], (f"tensor 'model.{NAN_TENSOR}' holds NaN or inf (the file "
                                     "is damaged or was saved from a diverged run; "
                                     "--allow-nonfinite loads it anyway")),
    (["finetune", "--base", "{nan}", "--out", "newrun", "--steps", "2"],
     f"tensor 'model.{NAN_TENSOR}' holds NaN"),
    (["score", "--ckpt", "{nan}"], f"tensor 'model.{NAN_TENSOR}' holds NaN"),
    (["finetune", "--block-size", "1000"], "block_size 1000 (--block-size) exceeds the base"),
    (["finetune", "--base", "{ck}", "--out", "newrun"], "exceeds the base model's context of 64"),
    (["quantize", "--out", "DIR"], "--out 'DIR' is a directory"),
    (["quantize", "--out", "FILE/q.safetensors"], "lies under"),
    (["figures", "--figures", "FILE"], "--figures 'FILE' is an existing file"),
    (["finetune", "--out", "FILE/run"], "--out 'FILE/run' lies under"),
    (["finetune", "--out", "FILE"], "--out 'FILE' is an existing file"),
    (["quantize", "--eval-batches", "0"], "--eval-batches must be >= 1 (got 0)"),
    (["finetune", "--task", "sentiment", "--eval-examples", "0"],
     "--eval-examples must be >= 1 (got 0)"),
    (["finetune", "--task", "sentiment", "--eval-examples", "-5"],
     "--eval-examples must be >= 1 (got -5)"),
    (["sample", "--temperature", "inf"], "--temperature must be a finite number > 0 (got inf)"),
    (["sample", "--temperature", "nan"], "--temperature must be a finite number"),
    (["sample", "--temperature", "0"], "--temperature must be > 0 (got 0)"),
    (["gradcheck", "--seed", "-1"], "--seed must be >= 0 (got -1)"),
    (["loftq", "--ranks", "abc"], "--ranks must be comma-separated integers >= 1 (got 'abc')"),
    # -- sample ------------------------------------------------------------------------------
    (["sample", "--top-k", "0"], "--top-k must be >= 1 (got 0)"),
    (["sample", "--top-k", "x"], "--top-k must be an integer >= 1 (got 'x')"),
    (["sample", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["sample", "--seed", "1.5"], "--seed must be an integer"),
    (["sample", "--ckpt", "missing.safetensors"], "does not exist"),
    (["sample", "--ckpt", "DIR"], "is not a file"),
    (["sample", "--ckpt", "FILE"], "not a safetensors file"),
    (["sample", "--adapter", "missing.safetensors"], "--adapter 'missing.safetensors' does not"),
    (["sample", "--adapter", "{ad}"], "another base model"),
    (["sample", "--ckpt", "{ck}", "--prompt", ""], "prompt must contain"),
    (["sample", "--ckpt", "{ck}", "--prompt", "caf\u00e9"], "'\u00e9'"),
    (["sample", "--backend", "tpu"], "--backend: invalid choice"),
    # -- pretrain ----------------------------------------------------------------------------
    (["pretrain", "--max-steps", "0"], "--max-steps must be >= 1 (got 0)"),
    (["pretrain", "--batch-size", "-1"], "--batch-size must be >= 1"),
    (["pretrain", "--lr", "0"], "--lr must be > 0 (got 0)"),
    (["pretrain", "--lr", "nan"], "--lr must be a finite number"),
    (["pretrain", "--min-lr", "-1"], "--min-lr must be >= 0"),
    (["pretrain", "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["pretrain", "--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["pretrain", "--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["pretrain", "--eval-every", "0"], "--eval-every must be >= 1"),
    (["pretrain", "--n-embd", "30", "--n-head", "4", "--out", "newrun"], "divisible"),
    (["pretrain", "--val-plays", "nosuchplay", "--out", "newrun"], "nosuchplay"),
    (["pretrain", "--preset", "huge"], "--preset: invalid choice"),
    (["pretrain", "--out", "FILE"], "--out 'FILE' is an existing file"),
    (["pretrain", "--out", "DIR", "--resume"], "nothing to continue"),
    (["pretrain", "--out", "newrun", "--export", "DIR"], "--export 'DIR' is a directory"),
    (["pretrain", "--min-lr", "0.1", "--lr", "0.01", "--out", "newrun"], "min_lr"),
    # -- gradcheck, tour, top level -----------------------------------------------------------
    (["gradcheck", "--seed", "abc"], "--seed must be an integer >= 0 (got 'abc')"),
    (["tour", "--bogus"], "unrecognized arguments: --bogus"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    # -- finetune ----------------------------------------------------------------------------
    (["finetune", "--method", "nope"], "--method: unknown method 'nope'; allowed: full, lora"),
    (["finetune", "--task", "nope"], "--task: invalid choice"),
    (["finetune", "--r", "0"], "--r must be >= 1 (got 0)"),
    (["finetune", "--alpha", "0"], "--alpha must be > 0"),
    (["finetune", "--dropout", "1"], "--dropout must be in [0, 1) (got 1)"),
    (["finetune", "--steps", "0"], "--steps must be >= 1"),
    (["finetune", "--lr", "-1"], "--lr must be > 0"),
    (["finetune", "--lm-weight", "-1"], "--lm-weight must be >= 0"),
    (["finetune", "--task", "milton", "--lm-weight", "1"], "lm_weight is for classification"),
    (["finetune", "--targets", "q,nope"], "nope"),
    (["finetune", "--init", "nope"], "init_lora_weights"),
    (["finetune", "--bias", "nope"], "--bias: invalid choice"),
    (["finetune", "--method", "qlora", "--quant-type", "nf8"], "--quant-type: invalid choice"),
    (["finetune", "--method", "qlora", "--blocksize", "0"], "--blocksize must be >= 1"),
    (["finetune", "--method", "qlora", "--loftq-iter", "0"], "--loftq-iter must be >= 1"),
    (["finetune", "--method", "houlsby", "--bottleneck", "0"], "--bottleneck must be >= 1"),
    (["finetune", "--method", "adapter"], "method 'adapter' is now called 'houlsby'"),
    (["finetune", "--method", "prefix", "--prefix-len", "0"], "--prefix-len must be >= 1"),
    (["finetune", "--method", "prompt", "--prompt-len", "-1"], "--prompt-len must be >= 1"),
    (["finetune", "--eval-batches", "0"], "--eval-batches must be >= 1"),
    (["finetune", "--save-every", "0", "--out", "newrun"], "--save-every must be >= 1"),
    (["finetune", "--resume"], "--resume needs --out"),
    (["finetune", "--resume", "--out", "DIR"], "cannot resume"),
    (["finetune", "--base", "missing.safetensors"], "--base 'missing.safetensors' does not exist"),
    (["finetune", "--task", "milton", "--eval-examples", "5"],
     "--eval-examples is for the labelled tasks"),
    (["finetune", "--seed", "-1"], "--seed must be >= 0"),
    (["finetune", "--method", "full", "--r", "4"], "--r does not apply to --method full"),
    (["finetune", "--method", "lora", "--bottleneck", "8", "--quant-type", "fp4"],
     "--quant-type, --bottleneck do not apply to --method lora"),
    # -- results, figures ----------------------------------------------------------------------
    (["results", "--out", "DIR"], "no runs under DIR"),
    (["results", "--run", "--tasks", "nope", "--out", "newrun"], "unknown task/method nope"),
    (["figures", "--only", "nope", "--figures", "newfigs"], "--only: unknown figure(s) nope"),
    (["figures", "--results", "missing", "--figures", "newfigs"], "--results 'missing' is not a"),
    # -- quantize, loftq, paged-demo -----------------------------------------------------------
    (["quantize", "--type", "nf8"], "--type: invalid choice"),
    (["quantize", "--blocksize", "0"], "--blocksize must be >= 1"),
    (["quantize", "--ckpt", "missing.safetensors"], "does not exist"),
    (["quantize", "--compare", "--out", "x.json"], "with --compare the JSON goes to --results"),
    (["quantize", "--compare", "--results", "FILE"], "lies under"),
    (["loftq", "--ranks", "0"], "--ranks must be comma-separated integers >= 1 (got '0')"),
    (["loftq", "--ranks", ","], "--ranks must be comma-separated integers"),
    (["loftq", "--iters", "0"], "--iters must be >= 1"),
    (["loftq", "--out", "DIR"], "--out 'DIR' is a directory"),
    (["paged-demo", "--steps", "0"], "--steps must be >= 1"),
    (["paged-demo", "--spike-steps", "a,b"], "--spike-steps must be comma-separated integers"),
    (["paged-demo", "--spike-steps", "12"], "--spike-steps [12] lie beyond the run"),
    (["paged-demo", "--page-kib", "0"], "--page-kib must be > 0"),
    (["paged-demo", "--bandwidth-gbs", "inf"], "--bandwidth-gbs must be a finite number"),
    (["paged-demo", "--budget-mb", "-1"], "--budget-mb must be > 0"),
    (["paged-demo", "--out", "DIR"], "--out 'DIR' is a directory"),
    # -- adapter, score, bench -----------------------------------------------------------------
    (["adapter", "merge", "missing.safetensors", "--out", "m.safetensors"], "does not exist"),
    (["adapter", "merge", "{ad}", "--out", "DIR"], "--out 'DIR' is a directory"),
    (["adapter", "merge", "{ad}"], "was built for another base model"),
    (["adapter", "export-peft", "{ad}", "--out", "FILE"], "--out 'FILE' is an existing file"),
    (["adapter", "import-peft", "missing", "--out", "a.safetensors"], "is not a directory"),
    (["adapter", "import-peft", "{peft}", "--out", "DIR"], "--out 'DIR' is a directory"),
    (["adapter", "import-peft", "{embcopy}", "--base", "{ck}", "--out", "a.safetensors"],
     "full copy of the base layer's weight"),
    (["adapter", "claim", "--tasks", "milton", "--out", "newrun"], "at least two distinct tasks"),
    (["adapter", "claim", "--steps", "0"], "--steps must be >= 1"),
    (["adapter", "claim", "--out", "FILE"], "--out 'FILE' is an existing file"),
    (["score", "--no-base"], "nothing to score"),
    (["score", "--ckpt", "{ck}", "--block-size", "1000"], "--block-size 1000 exceeds"),
    (["score", "--eval-batches", "0"], "--eval-batches must be >= 1"),
    (["score", "--task", "nope"], "--task: invalid choice"),
    (["score", "--adapter", "missing.safetensors"], "does not exist"),
    (["bench", "--steps", "0"], "--steps must be >= 1"),
    (["bench", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "--configs", "nope", "--no-torch"], "unknown benchmark config"),
    (["bench", "--out", "DIR"], "--out 'DIR' is a directory"),
]

# rows whose mistake is an environment variable read at import: run in a subprocess
ENV_ROWS = [
    ({"MINILORA_BACKEND": "bogus"}, ["sample"], "MINILORA_BACKEND='bogus'"),
    ({"MINILORA_BACKEND": "bogus"}, ["gradcheck"], "MINILORA_BACKEND='bogus'"),
] + ([] if CUPY else [({"MINILORA_BACKEND": "cupy"}, ["sample"], "cupy")])


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Tiny files the rows refer to (outside the working directory, and snapshotted too)."""
    d = tmp_path_factory.mktemp("fixtures")
    tok = CharTokenizer.default()
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, rng=0)
    save_checkpoint(d / "ck.safetensors", model, tok)
    arrays, meta = read_typed(d / "ck.safetensors", None)
    arrays[f"model.{NAN_TENSOR}"][1, 2] = np.nan
    save_file(arrays, str(d / "nan.safetensors"), metadata={"minilora": json.dumps(meta)})
    lc = LoraConfig(r=2, target_modules=("q", "wte"))
    inject_lora(model, lc)
    save_adapter(d / "ad.safetensors", model, lc)
    export_peft(d / "peft", model, lc)
    # what PEFT's save_embedding_layers="auto" writes beside the factors: the embedding itself
    emb_key = "base_model.model.model.embed_tokens.base_layer.weight"
    shutil.copytree(d / "peft", d / "embcopy")
    t = load_file(str(d / "embcopy" / WEIGHTS_NAME))
    wte = arrays["model.wte.weight"].copy()
    wte[5, 3] += 0.25  # a trained / changed embedding
    save_file({**t, emb_key: wte}, str(d / "embcopy" / WEIGHTS_NAME))
    shutil.copytree(d / "peft", d / "embsame")
    save_file({**t, emb_key: arrays["model.wte.weight"].astype(np.float16)},
              str(d / "embsame" / WEIGHTS_NAME))
    return {"ck": d / "ck.safetensors", "nan": d / "nan.safetensors", "ad": d / "ad.safetensors",
            "peft": d / "peft", "embcopy": d / "embcopy", "embsame": d / "embsame", "dir": d}


def _snapshot(*roots) -> dict:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = "dir"
            for f in filenames:
                p = Path(dirpath) / f
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch, fixtures):
    (tmp_path / "FILE").write_text("not a checkpoint\n")
    (tmp_path / "DIR").mkdir()
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path, fixtures["dir"])
    yield tmp_path
    assert _snapshot(tmp_path, fixtures["dir"]) == before, "a refused command left files behind"


def _fill(argv, fixtures):
    return [a.format(**{k: str(v) for k, v in fixtures.items()}) if "{" in a else a
            for a in argv]


def _check_one_line(rc, err, fragment):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error: "), err
    assert fragment in lines[0], lines[0]


def test_the_table_is_long_enough():
    assert len(ROWS) + len(ENV_ROWS) >= 60


@pytest.mark.parametrize("argv, fragment", ROWS, ids=[" ".join(r[0])[:60] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(argv, fragment, fixtures, workdir,
                                                         capsys):
    try:
        rc = cli.main(_fill(argv, fixtures))
    except SystemExit as e:  # argparse's refusals
        rc = e.code
    _check_one_line(rc, capsys.readouterr().err, fragment)


@pytest.mark.parametrize("env, argv, fragment", ENV_ROWS)
def test_bad_environment_is_one_line_exit_2(env, argv, fragment, workdir):
    r = subprocess.run([sys.executable, "-m", "minilora.cli", *argv], capture_output=True,
                       text=True, timeout=120, env={**os.environ, **env}, check=False)
    _check_one_line(r.returncode, r.stderr, fragment)


def test_method_flags_default_to_not_given():
    """finetune refuses a method flag given for a method whose config lacks its field: so every
    method flag's parser default is "not given" (None; the method's own default applies)."""
    from minilora.cli.finetune import method_flags

    args = cli.build_parser().parse_args(["finetune"])
    flags = method_flags()
    assert {f: getattr(args, s.dest) for f, s in flags.items()} == {f: None for f in flags}


def test_help_shows_the_ranges(capsys):
    for argv, shown in ((["finetune", "--help"], "--eval-examples"),
                        (["sample", "--help"], "--temperature")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert shown in out
    assert "[> 0]" in out and ">= 1" in out  # the temperature's and top-k's ranges


def test_import_peft_accepts_an_embedding_copy_equal_to_the_base(fixtures):
    """PEFT's save_embedding_layers="auto" writes embed_tokens.base_layer.weight; a copy equal
    to the base (here rounded to float16) is checked and dropped, a different one refused."""
    from minilora.checkpoint import load_checkpoint
    from minilora.methods.lora import lora_state_dict
    from minilora.peft_format import PeftFormatError

    ref, _, _ = load_checkpoint(fixtures["ck"])
    import_peft(fixtures["peft"], ref)
    m, _, _ = load_checkpoint(fixtures["ck"])
    cfg = import_peft(fixtures["embsame"], m)
    assert set(cfg.target_modules) == {"q", "wte"}
    a, b = lora_state_dict(m), lora_state_dict(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(PeftFormatError, match=r"full copy .* differs from this base's weight "
                                              r"\(at \(5, 3\)"):
        import_peft(fixtures["embcopy"], load_checkpoint(fixtures["ck"])[0])
