"""The chapters as a static HTML book: the configuration (fast), and a real build opened in
headless Chromium (slow).

The slow test needs jupyter-book 1.x (``pip install -e ".[book]"``) and, from the system,
Chromium and a CJK font (``apt-get install -y chromium fonts-noto-cjk``): the chapters' section
titles are Chinese, and without the font they render as empty boxes. CI installs them.
"""
from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from minilora.experiments import notebooks

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
BOOK = CHAPTERS / "_book"
PAGE = "05-lora-and-qlora"          # the chapter page the browser opens: Chinese titles, figures


def _toc_files(toc: dict) -> list[str]:
    files = []
    for part in [toc] + toc.get("parts", []):
        for ch in part.get("chapters", []):
            files.append(ch["file"])
            files += [s["file"] for s in ch.get("sections", [])]
    return files


def test_toc_lists_every_chapter_and_the_homework_student_versions_only():
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    assert toc["format"] == "jb-book" and (CHAPTERS / f"{toc['root']}.md").is_file()
    files = _toc_files(toc)
    chapters = [f for f in files if not f.startswith("homework/")]
    assert sorted(chapters) == sorted(p.stem for p in CHAPTERS.glob("*.ipynb")), \
        "chapters/_book/_toc.yml must list every chapter notebook in chapters/ (and only those)"
    homework = [f for f in files if f.startswith("homework/")]
    assert sorted(homework) == sorted(f"homework/student/{p.stem}"
                                      for p in (CHAPTERS / "homework" / "student").glob("*.ipynb"))
    assert not any(f.startswith(("homework/source", "assets", "_")) for f in files)


def test_config_uses_committed_outputs_and_builds_only_the_toc():
    cfg = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert cfg["only_build_toc_files"] is True            # homework sources hold the solutions
    assert "homework/source" in cfg["exclude_patterns"] and "_build" in cfg["exclude_patterns"]


def test_book_command_uses_absolute_config_and_toc(tmp_path):
    cmd = notebooks.book_command(tmp_path)
    for flag in ("--config", "--toc", "--path-output"):
        assert Path(cmd[cmd.index(flag) + 1]).is_absolute()
    assert "--warningiserror" in cmd


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is missing: apt-get install -y chromium fonts-noto-cjk"
    return exe


def _screenshot(exe, url: str, out: Path, size=(1200, 1600)) -> np.ndarray:
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", url],
                   capture_output=True, timeout=120, check=False)
    assert out.is_file() and out.stat().st_size > 0, f"Chromium wrote no screenshot of {url}"
    import matplotlib.image  # lazy in a test module: only the slow test reads PNGs
    return matplotlib.image.imread(str(out))[..., :3]     # (H, W, 3) floats in [0, 1]


@pytest.mark.slow
def test_book_builds_and_a_chapter_renders_with_its_figures_in_chromium(tmp_path):
    pytest.importorskip("jupyter_book", reason="pip install -e '.[book]' (jupyter-book<2)")
    exe = _chromium()
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout
    assert fonts.strip(), "no CJK font: apt-get install -y fonts-noto-cjk (titles render as boxes)"

    html_dir = notebooks.build_book(tmp_path)
    page = html_dir / f"{PAGE}.html"
    assert (html_dir / "index.html").is_file() and page.is_file()
    assert not list(html_dir.rglob("source/*")), "a homework source got into the book"
    student = html_dir / "homework" / "student" / "layernorm_backward.html"
    assert student.is_file() and "NotImplementedError" in student.read_text()
    assert "BEGIN SOLUTION" not in student.read_text()

    # the chapter's figures are <img> elements whose files were written, as many as its outputs
    import nbformat  # lazy in a test module: the chapters extra
    nb = nbformat.read(CHAPTERS / f"{PAGE}.ipynb", as_version=4)
    n_png = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                for o in c.get("outputs", []))
    parser = _Images()
    parser.feed(page.read_text())
    figs = [s for s in parser.srcs if s.startswith("_images/")]
    assert n_png >= 1 and len(figs) == n_png, (n_png, parser.srcs)
    for s in figs:
        assert (html_dir / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", s

    # the page renders: a screenshot with text on it (not blank)
    shot = _screenshot(exe, page.as_uri(), tmp_path / "page.png")
    assert shot.shape[0] >= 1000 and shot.std() > 0.05, "the chapter page rendered blank"

    # a figure renders in the browser: a page holding only the first figure shows colour
    fig_page = tmp_path / "fig.html"
    fig_page.write_text(f'<html><body style="margin:0"><img src="{(html_dir / figs[0]).as_uri()}" '
                        'style="width:1000px"></body></html>')
    img = _screenshot(exe, fig_page.as_uri(), tmp_path / "fig.png", (1000, 700))
    colourful = (img.max(axis=2) - img.min(axis=2)) > 0.2
    assert colourful.mean() > 0.005, "the figure did not render (no coloured pixels)"

    # CJK glyphs are real glyphs: two different characters must not render as the same box
    shots = []
    for ch in ("量", "微"):
        p = tmp_path / f"cjk{ord(ch)}.html"
        p.write_text(f'<html><head><meta charset="utf-8"></head>'
                     f'<body style="margin:0;font-size:160px">{ch}</body></html>',
                     encoding="utf-8")
        shots.append(_screenshot(exe, p.as_uri(), tmp_path / f"cjk{ord(ch)}.png", (300, 300)))
    assert all(s.std() > 0.05 for s in shots), "a CJK character rendered as nothing"
    assert np.abs(shots[0] - shots[1]).mean() > 0.01, \
        "two different CJK characters render identically: missing CJK font (tofu boxes)"
