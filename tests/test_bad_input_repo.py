"""Bad input in a user's checkout: every row runs ``minilora`` in a clone of this repository and
must exit 2 with one line ``minilora: error: ...`` (holding the expected fragment, no traceback),
before any work, leaving the clone exactly as it was (``git status --ignored`` unchanged: nothing
written, no committed result or figure touched) and the fixtures untouched.

The rows are the issue's (outputs written over committed results, an existing run reused, an
unwritable path, ``adapter_config.json`` with ``"r": "four"``, a size past the memory) and more
of the same kind. Placeholders: ``{fx}`` a scratch folder outside the clone holding the fixtures
(``FILE`` a regular file, ``run`` an earlier run, ``mine`` a folder of the user's own files,
``locked`` / ``.lockedfile.safetensors.minilora.lock`` outputs held by a live process, PEFT
directories with broken configs, broken ``result.json`` files, sweeps without records), ``{ad}``
a LoRA adapter of the shipped base, ``{peft}`` the clone's PEFT test fixture.
"""
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from minilora import cli
from minilora.methods.lora.config import LoraConfig
from minilora.experiments.paths import LOCK_NAME, MARKER_NAME, base_model_path

ROOT = Path(__file__).resolve().parents[1]
PEFT = "tests/data/peft/llama_lora"
RUN_HINT = "already holds an earlier run; --resume continues it, --overwrite replaces it"
TINY_SWEEP = ["--ranks", "1", "--targets", "q", "--serial", "--steps", "1"]

ROWS = [
    # -- the committed results and figures are never written unasked ------------------------
    (["delta-w", "--out", "results/delta_w"], "--out 'results/delta_w' already holds"),
    (["delta-w", "--sweep", "results/ablate", "--out", "results/delta_w", "--only", "spectra"],
     "--overwrite replaces it"),
    (["figures", "--figures", "figures"], "--figures 'figures' already holds"),
    (["figures", "--figures", "figures", "--only", "ablate_pareto"], "--overwrite replaces it"),
    (["loftq", "--out", "results/quant/loftq_residuals.json"],
     "--out 'results/quant/loftq_residuals.json' already exists; --overwrite replaces it"),
    (["paged-demo", "--out", "results/paged/trace.json"], "already exists; --overwrite"),
    (["quantize", "--compare", "--results", "results"], "--results 'results/quant' already holds"),
    (["adapter", "claim", "--out", "results/multi_adapter"], "already holds"),
    (["bench", "--out", "results/bench.json", "--no-torch"], "'results/bench.json' already exists"),
    (["svd", PEFT, "--out", "results/svd/milton-lora"], RUN_HINT.split(";")[0]),
    (["finetune", "--out", "results/finetune/milton-lora"], RUN_HINT),
    (["finetune", "--out", "results/finetune/milton-lora", "--overwrite"],
     "holds files that no minilora run recorded"),
    (["pretrain", "--out", "results/finetune/milton-lora"], RUN_HINT),
    (["adapter", "export-peft", "{ad}", "--out", "results/svd/milton-lora"],
     "file(s); --overwrite replaces it, or choose a new directory"),
    (["adapter", "merge", "{ad}", "--out", "data/base_model/shakespeare_char.safetensors"],
     "already exists"),
    (["adapter", "import-peft", PEFT, "--out", "data/base_model/shakespeare_char.safetensors"],
     "already exists"),
    (["quantize", "--out", "data/base_model/shakespeare_char.safetensors"], "already exists"),
    (["pretrain", "--export", "data/base_model/shakespeare_char.safetensors"], "already exists"),
    (["ablate", *TINY_SWEEP, "--time-modes", "results/ablate"], "already holds"),
    (["results", "--run", "--out", "results/finetune", "--tasks", "nope"],
     "unknown task/method nope"),
    # -- an output in use by another run: one line naming it, at once -------------------------
    (["finetune", "--out", "{fx}/locked"], "is in use by another minilora run (pid {pid}, "),
    (["pretrain", "--out", "{fx}/locked"], "is in use by another minilora run (pid {pid}, "),
    (["figures", "--figures", "{fx}/locked"], "wait for it to finish or choose another path"),
    (["svd", PEFT, "--out", "{fx}/locked"], "is in use by another minilora run"),
    (["delta-w", "--out", "{fx}/locked"], "is in use by another minilora run"),
    (["quantize", "--out", "{fx}/lockedfile.safetensors"], "in use by another minilora run"),
    # -- an earlier run, or the user's own files ----------------------------------------------
    (["finetune", "--out", "{fx}/run"], RUN_HINT),
    (["pretrain", "--out", "{fx}/run"], RUN_HINT),
    (["adapter", "export-peft", "{ad}", "--out", "{fx}/run"], "already holds 1 file(s); "
                                                               "--overwrite replaces it"),
    (["svd", PEFT, "--out", "{fx}/run"], "already holds an earlier run"),
    (["finetune", "--out", "{fx}/mine", "--overwrite"], "no minilora run recorded"),
    (["pretrain", "--out", "{fx}/mine", "--overwrite"], "no minilora run recorded"),
    (["finetune", "--out", "{fx}/run", "--resume", "--overwrite"],
     "--resume and --overwrite exclude each other"),
    (["pretrain", "--resume"], "--resume needs --out DIR"),
    # -- outputs that cannot be written (under a file: refused even for root) -----------------
    (["delta-w", "--out", "{fx}/FILE/x"], "--out '{fx}/FILE/x' lies under"),
    (["figures", "--figures", "{fx}/FILE/x"], "--figures '{fx}/FILE/x' lies under"),
    (["adapter", "merge", "{ad}", "--out", "{fx}/FILE/m.safetensors"], "lies under"),
    (["quantize", "--out", "{fx}/FILE/q.safetensors"], "lies under"),
    (["loftq", "--out", "{fx}/FILE/l.json"], "lies under"),
    (["paged-demo", "--out", "{fx}/FILE/t.json"], "lies under"),
    (["bench", "--out", "{fx}/FILE/b.json"], "lies under"),
    (["svd", PEFT, "--out", "{fx}/FILE/s"], "lies under"),
    (["adapter", "export-peft", "{ad}", "--out", "{fx}/FILE/p"], "lies under"),
    (["adapter", "import-peft", PEFT, "--out", "{fx}/FILE/a.safetensors"], "lies under"),
    (["ablate", *TINY_SWEEP, "--out", "{fx}/FILE/x"], "--out '{fx}/FILE/x' lies under"),
    (["ablate", *TINY_SWEEP, "--runs", "{fx}/FILE/x"], "--runs '{fx}/FILE/x' lies under"),
    (["results", "--run", "--out", "{fx}/FILE/x"], "lies under"),
    (["adapter", "claim", "--runs", "{fx}/FILE/x"], "--runs '{fx}/FILE/x' lies under"),
    (["pretrain", "--export", "{fx}/FILE/x.safetensors"], "--export '{fx}/FILE/x.safetensors'"),
    (["delta-w", "--out", "{fx}/FILE"], "is an existing file, not a directory"),
    (["svd", PEFT, "--out", "{fx}/FILE"], "is an existing file, not a directory"),
    (["adapter", "merge", "{ad}", "--out", "{fx}"], "is a directory; give a file name"),
    # -- input files: one reader, every field checked ---------------------------------------------
    (["svd", "{fx}/peft_r_four"], "r must be an integer >= 1, got 'four'"),
    (["svd", "{fx}/peft_alpha_null"], "lora_alpha"),
    (["svd", "{fx}/peft_r_negative"], "r must be an integer >= 1, got -2"),
    (["svd", "{fx}/peft_not_json"], "adapter_config.json"),
    (["svd", "{fx}/peft_no_config"], "adapter_config.json"),
    (["adapter", "import-peft", "{fx}/peft_r_four", "--out", "{fx}/new.safetensors"],
     "got 'four'"),
    (["adapter", "import-peft", "{fx}/peft_alpha_null", "--out", "{fx}/new.safetensors"],
     "lora_alpha"),
    (["results", "--out", "{fx}/res_not_json"], "result.json is not readable JSON"),
    (["results", "--out", "{fx}/res_missing"],
     "field 'trainable_params' must be an integer, got nothing (missing)"),
    (["results", "--out", "{fx}/res_null"], "field 'forgetting' must be a finite number, got null"),
    (["results", "--out", "{fx}/res_negative"], "field 'total_params' must be >= 1, got -5"),
    (["results", "--out", "{fx}/res_list"], "holds a JSON list, not a run's result object"),
    (["delta-w", "--sweep", "{fx}/mine", "--out", "{fx}/new"], "has no cells/ directory"),
    (["delta-w", "--sweep", "{fx}/sweep_broken", "--out", "{fx}/new"],
     "no Milton records in the sweep"),
    (["delta-w", "--phi-ranks", "64,8", "--out", "{fx}/new"], "--phi-ranks takes two ranks"),
    (["delta-w", "--budget", "q", "--out", "{fx}/new"], "--budget"),
    (["delta-w", "--only", "nope", "--out", "{fx}/new"], "--only: unknown study nope"),
    (["sample", "--adapter", "{fx}/FILE"], "not a safetensors file"),
    # -- sizes past what fits: what was asked and what fits, before anything is allocated ----------
    (["sample", "--max-new-tokens", "99999999999999999999"],
     "max_new_tokens 99,999,999,999,999,999,999 needs about"),
    (["finetune", "--batch-size", "100000", "--out", "{fx}/new"],
     "--batch-size 100000: a training step of 100000 x 128 tokens needs about"),
    (["finetune", "--eval-batches", "99999999999", "--out", "{fx}/new"],
     "eval_batches 99,999,999,999 (--eval-batches)"),
    (["pretrain", "--n-embd", "40000", "--n-head", "4", "--out", "{fx}/new"],
     "--n-embd 40000 --n-layer 2: a model of about"),
    (["pretrain", "--batch-size", "100000000", "--out", "{fx}/new"],
     "batch_size 100000000: a training step"),
    (["score", "--batch-size", "1000000"], "one scoring batch of 1000000 x 128 tokens"),
    (["score", "--eval-batches", "99999999999"], "--eval-batches 99,999,999,999 of 8 x 128"),
    (["quantize", "--eval-batches", "99999999999", "--out", "{fx}/q.safetensors"],
     "--eval-batches 99,999,999,999 of 8 x 128 windows needs about"),
    (["paged-demo", "--batch-size", "1000000", "--out", "{fx}/t.json"],
     "--batch-size 1000000: a training step"),
    (["ablate", *TINY_SWEEP, "--workers", "100000"], "--workers 100000"),
    (["ablate", *TINY_SWEEP, "--blas-threads", "100000"], "--blas-threads 100000 exceeds"),
]


def _git_state(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                          cwd=repo, capture_output=True, text=True, check=True).stdout


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A clone of this repository (its committed state), as a user has it."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    d = tmp_path_factory.mktemp("checkout") / "minilora"
    r = subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(d)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot clone the repository here: {r.stderr.strip()}")
    assert _git_state(d) == ""
    return d


@pytest.fixture(scope="module")
def fx(tmp_path_factory, repo):
    from minilora.checkpoint import load_checkpoint
    from minilora.methods.lora import inject_lora, save_adapter

    d = tmp_path_factory.mktemp("fixtures")
    (d / "FILE").write_text("not a checkpoint\n")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2025-01-01 00:00:00",
          "command": "minilora finetune --out locked"}
    (d / "locked").mkdir()
    (d / "locked" / LOCK_NAME).write_text(json.dumps(me))
    (d / f".lockedfile.safetensors{LOCK_NAME}").write_text(json.dumps(me))
    (d / "run").mkdir()
    (d / "run" / "result.json").write_text("{}\n")
    (d / "run" / MARKER_NAME).write_text(json.dumps({"command": "minilora finetune", "kept": []}))
    (d / "mine").mkdir()
    (d / "mine" / "thesis.tex").write_text("months of work\n")
    model, _, _ = load_checkpoint(base_model_path())
    cfg = LoraConfig(r=2, target_modules=("q", "v"))
    inject_lora(model, cfg)
    save_adapter(d / "ad.safetensors", model, cfg)
    config = json.loads((repo / PEFT / "adapter_config.json").read_text())
    for name, change in (("peft_r_four", {"r": "four"}), ("peft_alpha_null", {"lora_alpha": None}),
                         ("peft_r_negative", {"r": -2})):
        shutil.copytree(repo / PEFT, d / name)
        (d / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
    shutil.copytree(repo / PEFT, d / "peft_not_json")
    (d / "peft_not_json" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    shutil.copytree(repo / PEFT, d / "peft_no_config")
    (d / "peft_no_config" / "adapter_config.json").unlink()
    good = json.loads((repo / "results/finetune/milton-lora/result.json").read_text())
    for name, text in (("res_not_json", '{"method": "lora", '),
                       ("res_missing", json.dumps({k: v for k, v in good.items()
                                                   if k != "trainable_params"})),
                       ("res_null", json.dumps({**good, "forgetting": None})),
                       ("res_negative", json.dumps({**good, "total_params": -5})),
                       ("res_list", "[1, 2]")):
        (d / name / "run").mkdir(parents=True)
        (d / name / "run" / "result.json").write_text(text)
    (d / "sweep_broken" / "cells").mkdir(parents=True)
    (d / "sweep_broken" / "cells" / "0123456789abcdef.json").write_text('{"format": 1, "ke')
    return d


def test_the_table_has_sixty_rows_or_more():
    assert len(ROWS) >= 60


@pytest.mark.parametrize("argv, fragment", ROWS, ids=[" ".join(r[0])[:70] for r in ROWS])
def test_bad_input_in_a_checkout_is_one_line_and_changes_nothing(argv, fragment, repo, fx,
                                                                  monkeypatch, capsys):
    fill = {"fx": str(fx), "ad": str(fx / "ad.safetensors"), "pid": str(os.getpid())}
    argv = [a.format(**fill) for a in argv]
    fragment = fragment.format(**fill)
    monkeypatch.chdir(repo)
    git_before, fx_before = _git_state(repo), _snapshot(fx)
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error: "), err
    assert fragment in lines[0], lines[0]
    assert _git_state(repo) == git_before, "the checkout changed"
    assert _snapshot(fx) == fx_before, "a fixture changed"
