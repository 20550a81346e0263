"""The chapters: quick mode the papermill way, committed full-mode outputs that are fresh, clean
outputs (no progress bars), no references outside the repository.

Executing every chapter in quick mode is CI's job (``.ci/run``); here: the runner's pieces on
small synthetic notebooks, and the committed chapters as files.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from minilora.errors import UsageError  # noqa: E402
from minilora.experiments import notebooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))   # top level only: not homework, _book, _build


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    for kind, src, tags in cells:
        c = nbformat.v4.new_code_cell(src) if kind == "code" else nbformat.v4.new_markdown_cell(src)
        if tags:
            c.metadata["tags"] = list(tags)
        nb.cells.append(c)
    return nb


def _sample():
    return _nb(("markdown", "# title", ()), ("code", "SMALL = False", ("parameters",)),
               ("code", "print(SMALL)", ()))


def test_there_are_chapters():
    assert len(CHAPTERS) >= 4, [p.name for p in CHAPTERS]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_first_code_cell_is_the_parameters_cell_with_full_mode(path):
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), f"{path.name}: first code cell untagged"
    assert re.search(r"^SMALL = False\b", first.source, re.M), first.source
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "quick()" not in src and "MINILORA_QUICK" not in src, \
        f"{path.name}: the chapter reads quick mode itself; it must come from the parameters cell"
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_committed_outputs_present_and_code_unchanged(path):
    """Every code cell but the parameters cell has an output, and the code hash stored by
    ``--full --write`` matches the code as committed. (Whether the *library* code a chapter ran
    changed since is the slow test below and CI's ``--check``: every library commit makes
    chapters stale, and they are re-run together.)"""
    nb = nbformat.read(path, as_version=4)
    assert notebooks.freshness_problems(nb, path.name, library=False) == []
    assert nb.metadata["minilora"]["mode"] == "full"


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_committed_outputs_fresh_against_the_library(path):
    """The library files each chapter ran are unchanged since its outputs were made."""
    nb = nbformat.read(path, as_version=4)
    assert notebooks.library_problems(nb, path.name) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_outputs_carry_no_progress_bars_or_errors(path):
    nb = nbformat.read(path, as_version=4)
    for i, c in enumerate(c for c in nb.cells if c.cell_type == "code"):
        for o in c.get("outputs", []):
            assert o.output_type != "error", f"{path.name} code cell {i + 1}: {o.get('ename')}"
            assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), \
                f"{path.name} code cell {i + 1}: a widget (tqdm bar) in the output"
            text = o.get("text", "") + o.get("data", {}).get("text/plain", "")
            assert not re.search(r"\d+/\d+ \[\d\d:\d\d", text), \
                f"{path.name} code cell {i + 1}: a tqdm fragment in the output"
            assert o.get("name") != "stderr" or "Warning" not in text, \
                f"{path.name} code cell {i + 1}: a warning in the output: {text[:200]}"


#: the book's code column holds 91 monospace columns at a 1280 px window (chapters/_book/_static/
#: minilora.css: 744 px at ~8.1 px a character; tests/test_book.py measures the rendered pages)
MAX_CODE_COLUMNS = 90
HOMEWORK = sorted((ROOT / "chapters" / "homework" / "student").glob("*.ipynb"))


@pytest.mark.parametrize("path", CHAPTERS + HOMEWORK, ids=lambda p: p.name)
def test_code_lines_fit_the_books_column(path):
    """Code cells are not wrapped in the book (outputs are), so a longer line scrolls sideways."""
    nb = nbformat.read(path, as_version=4)
    long = [(i + 1, len(line)) for i, c in enumerate(c for c in nb.cells if c.cell_type == "code")
            for line in c.source.splitlines() if len(line) > MAX_CODE_COLUMNS]
    assert not long, f"{path.name}: code lines over {MAX_CODE_COLUMNS} columns " \
                     f"(code cell, length): {long[:10]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_references_outside_the_repository(path):
    text = path.read_text()
    # spelled in pieces so that this test file does not itself match a scan for such references
    for bad in ("../" "shared", "/" "work/", "facts" "/", "STYLE" ".md", "seeds" "/"):
        assert bad not in text, f"{path.name} mentions {bad!r}"


def test_code_hash_follows_code_only():
    nb = _sample()
    h = notebooks.code_hash(nb)
    nb.cells[0].source = "# another title"                         # markdown: same hash
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="True\n")]
    assert notebooks.code_hash(nb) == h
    injected = notebooks.inject_parameters(nb, {"SMALL": True})   # injected cell: same hash
    assert notebooks.code_hash(injected) == h
    nb.cells[2].source = "print(SMALL) "
    assert notebooks.code_hash(nb) != h
    # moving a line between cells changes it too
    a = _nb(("code", "x = 1\ny = 2", ())); b = _nb(("code", "x = 1", ()), ("code", "y = 2", ()))
    assert notebooks.code_hash(a) != notebooks.code_hash(b)


def test_inject_parameters_goes_right_after_the_parameters_cell_and_copies():
    nb = _sample()
    out = notebooks.inject_parameters(nb, {"SMALL": True})
    assert len(nb.cells) == 3 and len(out.cells) == 4              # the original is untouched
    assert out.cells[2].metadata["tags"] == ["injected-parameters"]
    assert "SMALL = True" in out.cells[2].source
    nbformat.validate(out)


def test_a_notebook_without_parameters_cell_is_refused():
    nb = _nb(("code", "SMALL = False", ()))
    with pytest.raises(UsageError, match="tagged 'parameters'"):
        notebooks.inject_parameters(nb, {"SMALL": True}, "x.ipynb")


def test_freshness_problems_names_stale_code_and_missing_outputs():
    nb = _sample()
    assert any("never run" in p for p in notebooks.freshness_problems(nb, "s"))
    nb.metadata["minilora"] = {"code_hash": notebooks.code_hash(nb), "mode": "full", "library": {}}
    problems = notebooks.freshness_problems(nb, "s")
    assert problems == ["s: code cell 2 has no output ('print(SMALL)')"]   # parameters cell exempt
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="False\n")]
    assert notebooks.freshness_problems(nb, "s") == []
    nb.cells[2].source = "print(not SMALL)"
    assert any("code changed" in p for p in notebooks.freshness_problems(nb, "s"))


def _fake_library(root: Path) -> dict:
    """A package tree under ``root`` with two modules; returns their stored hashes."""
    (root / "minilora" / "nn").mkdir(parents=True)
    (root / "minilora" / "nn" / "ops.py").write_text("def gelu(x):\n    return x\n")
    (root / "minilora" / "lora.py").write_text("RANK = 8\n")
    return notebooks.library_hashes(["minilora/nn/ops.py", "minilora/lora.py"], root)


def test_library_change_makes_a_chapter_stale_and_names_the_file(tmp_path):
    nb = _sample()
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="False\n")]
    stored = _fake_library(tmp_path)
    assert all(len(h) == 16 for h in stored.values())
    nb.metadata["minilora"] = {"code_hash": notebooks.code_hash(nb), "mode": "full",
                               "library": stored}
    assert notebooks.freshness_problems(nb, "c", root=tmp_path) == []
    # a file the chapter did not run changes: still fresh
    (tmp_path / "minilora" / "cli.py").write_text("changed = True\n")
    assert notebooks.freshness_problems(nb, "c", root=tmp_path) == []
    # one function it ran changes: stale, and the message names the file
    (tmp_path / "minilora" / "nn" / "ops.py").write_text("def gelu(x):\n    return 2 * x\n")
    problems = notebooks.freshness_problems(nb, "c", root=tmp_path)
    assert len(problems) == 1 and "minilora/nn/ops.py (changed)" in problems[0], problems
    assert "minilora/lora.py" not in problems[0]
    assert notebooks.freshness_problems(nb, "c", root=tmp_path, library=False) == []
    (tmp_path / "minilora" / "lora.py").unlink()
    assert "minilora/lora.py (removed)" in notebooks.library_problems(nb, "c", tmp_path)[0]
    # outputs made before the library was recorded are stale too
    del nb.metadata["minilora"]["library"]
    assert "no record of the library code" in notebooks.library_problems(nb, "c", tmp_path)[0]


def test_cli_refuses_to_write_quick_mode_outputs(tmp_path, monkeypatch):
    p = tmp_path / "c.ipynb"
    nbformat.write(_sample(), p)
    before = p.read_bytes()
    with pytest.raises(SystemExit):
        notebooks.main(["--execute", "--quick", "--write", str(p)])
    monkeypatch.setenv("MINILORA_QUICK", "1")
    with pytest.raises(SystemExit):
        notebooks.main(["--execute", "--write", str(p)])
    assert p.read_bytes() == before


def test_check_flag_reports_a_stale_notebook(tmp_path, capsys):
    p = tmp_path / "c.ipynb"
    nbformat.write(_sample(), p)
    with pytest.raises(SystemExit):
        notebooks.main(["--check", str(p)])
    assert "never run" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_execution_injects_small_true_and_leaves_the_file_alone(tmp_path):
    pytest.importorskip("nbclient")
    p = tmp_path / "c.ipynb"
    nbformat.write(_sample(), p)
    before = p.read_bytes()
    nb, _ = notebooks.execute_notebook(p, quick_mode=True, timeout=60)
    assert p.read_bytes() == before
    assert nb.cells[-1].outputs[0]["text"] == "True\n"
    notebooks.main(["--execute", "--full", "--write", str(p)])
    written = json.loads(p.read_text())
    assert written["metadata"]["minilora"]["code_hash"] == notebooks.code_hash(nbformat.read(p, 4))
    assert written["metadata"]["minilora"]["library"] == {}        # it imports nothing of ours
    assert len(written["cells"]) == 3                               # the library probe is gone
    assert written["cells"][-1]["outputs"][0]["text"] == ["False\n"] or \
        written["cells"][-1]["outputs"][0]["text"] == "False\n"


@pytest.mark.slow
def test_check_reports_a_chapter_stale_when_a_library_function_it_uses_changes(tmp_path, capsys):
    """End to end: a chapter that uses ``minilora.nn.ops`` is run and written; ``--check`` passes;
    in a copy of the package where ``gelu_forward`` changed the chapter is stale (naming ops.py),
    while a change to a module the chapter never imported leaves it fresh."""
    pytest.importorskip("nbclient")
    nb = _nb(("code", "SMALL = False", ("parameters",)),
             ("code", "from minilora.nn.ops import gelu_forward\nimport numpy as np\n"
                      "print(gelu_forward(np.zeros(2))[0])", ()))
    p = tmp_path / "c.ipynb"
    nbformat.write(nb, p)
    notebooks.main(["--execute", "--full", "--write", str(p)])
    capsys.readouterr()
    notebooks.main(["--check", str(p)])
    assert "fresh" in capsys.readouterr().out
    written = nbformat.read(p, as_version=4)
    files = written.metadata["minilora"]["library"]
    assert "minilora/nn/ops.py" in files and "minilora/cli/svd.py" not in files
    root = tmp_path / "copy"
    shutil.copytree(notebooks.library_root() / "minilora", root / "minilora",
                    ignore=shutil.ignore_patterns("__pycache__", "_shipped"))
    assert notebooks.library_problems(written, "c", root) == []
    (root / "minilora" / "cli" / "svd.py").write_text("# changed\n")
    assert notebooks.library_problems(written, "c", root) == []
    ops = root / "minilora" / "nn" / "ops.py"
    src = ops.read_text()
    assert "def gelu_forward(" in src
    ops.write_text(src.replace("def gelu_forward(", "def gelu_forward(  # changed\n        ", 1))
    problems = notebooks.library_problems(written, "c", root)
    assert len(problems) == 1 and "minilora/nn/ops.py (changed)" in problems[0]
