"""The chapters as a static HTML book: the configuration (fast), and a real build read the way a
student reads it, in headless Chromium with the network blocked (slow).

The slow tests need jupyter-book 1.x and sphinx-mathjax-offline (``pip install -e ".[book]"``)
and, from the system, Chromium and a CJK font (``apt-get install -y chromium fonts-noto-cjk``):
the chapters' section titles are Chinese, and without the font they render as empty boxes. CI
installs them. Set ``MINILORA_BOOK_SHOTS=DIR`` to keep a screenshot of each page read.

What a page must give its reader (checked on chapters 01, 06 (NF4), 08 (ΔW) and a homework page):

* **math rendered offline**: every math element typeset by the MathJax served from the book's own
  ``_static/``, none left as raw TeX in the text (section titles and the table of contents
  included), no MathJax error;
* **no request to any other host** while the page loads (Chromium's network log, host resolution
  blocked); a control page that does load from a CDN shows the log catches it;
* **code that fits**: no code block wider than its box at a 1280 px window (inputs are at most
  ~88 columns, outputs and listings wrap), and no sideways scrolling of the page;
* **figures**: alt text (not the file name), a numbered caption, and shown at >= 60 % of their
  pixel width (legible at 1x);
* **source listings** collapsed until the reader opens them;
* **links**: every internal link of every page resolves to a file and, with ``#anchor``, an id.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from minilora.experiments import notebooks

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
BOOK = CHAPTERS / "_book"
PROBE = Path(__file__).parent / "data" / "book" / "probe.js"
#: the pages a student is shown in the test: the foundations, NF4, ΔW, and a homework page
PAGES = ["01-foundations", "06-nf4-step-by-step", "08-delta-w-analysis",
         "homework/student/lora_linear"]
WINDOW = (1280, 1000)
#: a figure shown narrower than this fraction of its pixel width is too small to read at 1x
MIN_FIGURE_SCALE = 0.6


def _toc_files(toc: dict) -> list[str]:
    files = []
    for part in [toc] + toc.get("parts", []):
        for ch in part.get("chapters", []):
            files.append(ch["file"])
            files += [s["file"] for s in ch.get("sections", [])]
    return files


def test_toc_lists_every_chapter_in_reading_order_and_the_homework_student_versions_only():
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    assert toc["format"] == "jb-book" and (CHAPTERS / f"{toc['root']}.md").is_file()
    files = _toc_files(toc)
    chapters = [f for f in files if not f.startswith("homework/")]
    assert chapters == sorted(p.stem for p in CHAPTERS.glob("*.ipynb")), \
        "chapters/_book/_toc.yml must list every chapter notebook in chapters/, in file order " \
        "(the files are numbered in reading order)"
    assert [int(c[:2]) for c in chapters] == list(range(1, len(chapters) + 1))
    homework = [f for f in files if f.startswith("homework/")]
    assert homework[0] == "homework/README"                  # the course page comes first
    assert sorted(homework[1:]) == sorted(f"homework/student/{p.stem}"
                                          for p in (CHAPTERS / "homework" / "student").glob("*.ipynb"))
    assert not any(f.startswith(("homework/source", "assets", "_")) for f in files)


def test_chapter_titles_carry_their_file_numbers():
    nbformat = pytest.importorskip("nbformat")
    for p in sorted(CHAPTERS.glob("*.ipynb")):
        title = nbformat.read(p, as_version=4).cells[0].source.splitlines()[0]
        assert title.startswith(f"# Chapter {int(p.name[:2])} "), (p.name, title)


def test_config_uses_committed_outputs_offline_math_and_no_cdn_scripts():
    cfg = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert cfg["only_build_toc_files"] is True            # homework sources hold the solutions
    assert "homework/source" in cfg["exclude_patterns"] and "_build" in cfg["exclude_patterns"]
    assert "sphinx-mathjax-offline" in cfg["sphinx"]["extra_extensions"]
    sphinx = cfg["sphinx"]["config"]
    assert sphinx["nb_ipywidgets_js"] == {}               # no require.js / widgets from CDNs
    assert "mathjax_path" not in sphinx                   # the bundled copy, not a CDN URL
    css = [CHAPTERS / d / f for d in sphinx["html_static_path"] for f in sphinx["html_css_files"]]
    assert css and all(p.is_file() for p in css), css


def test_book_command_uses_absolute_config_and_toc(tmp_path):
    cmd = notebooks.book_command(tmp_path)
    for flag in ("--config", "--toc", "--path-output"):
        assert Path(cmd[cmd.index(flag) + 1]).is_absolute()
    assert "--warningiserror" in cmd


# ---------------------------------------------------------------------------------------------
# the built book (slow)

class _Page(HTMLParser):
    """Ids, links and loaded resources of one HTML page."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.resources = set(), [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag in ("script", "img", "iframe", "source", "audio", "video", "embed") and a.get("src"):
            self.resources.append(a["src"])
        if tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & {
                "stylesheet", "preload", "icon", "modulepreload", "prefetch", "manifest"}:
            self.resources.append(a["href"])


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _external(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https") or url.startswith("//")


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    pytest.importorskip("jupyter_book", reason="pip install -e '.[book]' (jupyter-book<2)")
    return notebooks.build_book(tmp_path_factory.mktemp("book"))


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is missing: apt-get install -y chromium fonts-noto-cjk"
    return exe


#: Chromium with no network: every host name fails to resolve, no background services
_OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps"]


def _page_requests(netlog: Path) -> list[str]:
    """The http(s) URLs a page asked for, from Chromium's network log: requests made for a
    ``file://`` document (their network isolation key is file://), not the browser's own."""
    log = json.loads(netlog.read_text())
    url_of, from_page = {}, set()
    for e in log["events"]:
        params, src = e.get("params") or {}, e["source"]["id"]
        if "url" in params:
            url_of.setdefault(src, params["url"])
        if "file://" in str(params.get("network_isolation_key", "")) or \
                str(params.get("initiator", "")) in ("null", "file://"):
            from_page.add(src)
    return sorted({url_of[s] for s in from_page if s in url_of and _external(url_of[s])})


def _read_in_chromium(exe: str, page: Path, tmp: Path, shot: Path | None = None) -> tuple[dict, list]:
    """Open ``page`` (a copy with the probe appended) offline at 1280 px; returns what the probe
    saw and the external URLs the page requested."""
    probe_dir = page.parent
    shutil.copy(PROBE, probe_dir / "minilora-probe.js")
    copy = probe_dir / f"probe-{page.name}"
    text = page.read_text(encoding="utf-8")
    assert "</body>" in text
    copy.write_text(text.replace("</body>", '<script src="minilora-probe.js"></script></body>'),
                    encoding="utf-8")
    netlog = tmp / f"net-{page.stem}.json"
    run = subprocess.run([exe, *_OFFLINE, f"--window-size={WINDOW[0]},{WINDOW[1]}",
                          "--virtual-time-budget=30000", f"--log-net-log={netlog}",
                          "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=180, check=False)
    m = re.search(r'<pre id="minilora-probe"[^>]*>(.*?)</pre>', run.stdout, re.S)
    assert m, f"the probe did not report on {page.name} (Chromium exit {run.returncode}): " \
              f"{run.stderr[-1500:]}"
    seen = json.loads(html.unescape(m.group(1)))
    if shot is not None:
        subprocess.run([exe, *_OFFLINE, f"--window-size={WINDOW[0]},{WINDOW[1]}",
                        "--virtual-time-budget=30000", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=180, check=False)
        assert shot.is_file() and shot.stat().st_size > 0, f"no screenshot of {page.name}"
    return seen, _page_requests(netlog)


def _screenshot(exe, url: str, out: Path, size=(1200, 1600)) -> np.ndarray:
    subprocess.run([exe, *_OFFLINE, f"--window-size={size[0]},{size[1]}", f"--screenshot={out}",
                    url], capture_output=True, timeout=120, check=False)
    assert out.is_file() and out.stat().st_size > 0, f"Chromium wrote no screenshot of {url}"
    import matplotlib.image  # lazy in a test module: only the slow test reads PNGs
    return matplotlib.image.imread(str(out))[..., :3]     # (H, W, 3) floats in [0, 1]


@pytest.mark.slow
def test_book_builds_with_the_homework_page_and_no_solutions(book):
    assert (book / "index.html").is_file()
    for page in PAGES + ["homework/README"]:
        assert (book / f"{page}.html").is_file(), page
    assert not list(book.rglob("source/*")), "a homework source got into the book"
    for student in (book / "homework" / "student").glob("*.html"):
        text = student.read_text()
        assert "NotImplementedError" in text and "BEGIN SOLUTION" not in text, student.name
        assert "BEGIN HIDDEN TESTS" not in text, student.name
    assert (book / "_static" / "mathjax" / "tex-chtml.js").is_file()


@pytest.mark.slow
def test_no_page_loads_anything_from_another_host(book):
    """Static half of the offline check, over every page and stylesheet of the book."""
    bad = []
    for page in book.rglob("*.html"):
        bad += [f"{page.relative_to(book)}: {u}" for u in _parse(page).resources if _external(u)]
    for css in book.rglob("*.css"):
        text = css.read_text(errors="replace")
        bad += [f"{css.relative_to(book)}: {u}"
                for u in re.findall(r"""(?:url\(\s*['"]?|@import\s+['"])((?:https?:)?//[^'")\s]+)""", text)]
    assert not bad, "resources from other hosts:\n" + "\n".join(bad[:20])


@pytest.mark.slow
def test_every_internal_link_resolves(book):
    broken, n = [], 0
    ids = {}
    for page in book.rglob("*.html"):
        if page.name.startswith("probe-"):
            continue
        parsed = _parse(page)
        ids[page.resolve()] = parsed.ids
        for href in parsed.links:
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("//", "mailto:", "javascript:")):
                continue
            n += 1
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page.resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(book)}: {href} (no file)")
            elif parts.fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = _parse(target).ids
                if unquote(parts.fragment) not in ids[target]:
                    broken.append(f"{page.relative_to(book)}: {href} (no id {parts.fragment!r})")
    assert n > 100, f"only {n} internal links: the parser missed them"
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:30])


@pytest.mark.slow
def test_the_network_check_sees_a_page_that_loads_from_a_cdn(tmp_path, chromium):
    """The request log must catch what a page loads from elsewhere, or the check below is empty."""
    page = tmp_path / "control.html"
    page.write_text('<html><head><script src="https://cdn.example.com/x.js"></script></head>'
                    '<body><img src="http://example.org/a.png" alt="a"><p>x</p></body></html>')
    _, requests = _read_in_chromium(chromium, page, tmp_path)
    assert "https://cdn.example.com/x.js" in requests and "http://example.org/a.png" in requests


@pytest.mark.slow
@pytest.mark.parametrize("name", PAGES)
def test_a_page_reads_as_a_course_offline(name, book, chromium, tmp_path):
    shots = os.environ.get("MINILORA_BOOK_SHOTS")
    shot = Path(shots) / f"{name.replace('/', '-')}.png" if shots else None
    if shot is not None:
        shot.parent.mkdir(parents=True, exist_ok=True)
    seen, requests = _read_in_chromium(chromium, book / f"{name}.html", tmp_path, shot)

    assert requests == [], f"{name} requested other hosts: {requests}"
    assert seen["math"] == seen["math_rendered"] and not seen["mathjax_errors"], \
        f"{name}: {seen['math']} math elements, {seen['math_rendered']} typeset, " \
        f"{seen['mathjax_errors']} MathJax errors"
    assert not seen["raw_tex"], f"{name}: raw TeX in the text: {seen['raw_tex'][:5]}"
    if name in ("01-foundations", "homework/student/lora_linear"):
        assert seen["math"] >= 5, f"{name}: its formulas are not math elements any more"

    assert seen["page_width"] <= seen["window_width"], f"{name} scrolls sideways"
    assert seen["code_blocks"] > 0
    assert not seen["wide_code"], \
        f"{name}: {len(seen['wide_code'])} of {seen['code_blocks']} code blocks are wider than " \
        f"the column at {WINDOW[0]} px (keep code lines within ~88 columns); e.g.\n" + \
        "\n".join(f"  {w['scroll']} px in {w['box']} px: {w['line']}" for w in seen["wide_code"][:8])

    bad = []
    for im in seen["images"]:
        what = im["src"].rsplit("/", 1)[-1][:16]
        if not im["alt"] or im["alt"] == im["src"] or im["alt"].startswith("_images/"):
            bad.append(f"{what}: no alt text")
        if not im["caption"] or not im["number"]:
            bad.append(f"{what}: no numbered caption")
        if im["natural"] and im["shown"] < MIN_FIGURE_SCALE * im["natural"]:
            bad.append(f"{what}: shown at {im['shown'] / im['natural']:.0%} of its "
                       f"{im['natural']} px (legible needs >= {MIN_FIGURE_SCALE:.0%})")
    assert not bad, f"{name}: figures a reader cannot use:\n" + "\n".join(bad)

    assert seen["open_listings"] == 0, f"{name}: a source listing is open by default"


@pytest.mark.slow
def test_show_source_listings_are_collapsed_and_highlighted_in_the_book(chromium, tmp_path):
    """A notebook that calls ``show_source`` twice, executed and built with the book's own
    configuration: two closed ``<details>`` listings with Pygments' highlighting, whose summary
    names the function, file and line."""
    pytest.importorskip("jupyter_book", reason="pip install -e '.[book]' (jupyter-book<2)")
    nbformat = pytest.importorskip("nbformat")
    src = tmp_path / "src"
    shutil.copytree(BOOK, src / "_book")
    (src / "_book" / "_toc.yml").write_text("format: jb-book\nroot: README\n"
                                            "chapters:\n  - file: listing\n")
    (src / "README.md").write_text("# A listing\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Listings\n\n$y = x W^\\top$"),
                nbformat.v4.new_code_cell("SMALL = False"),
                nbformat.v4.new_code_cell("from minilora.experiments.notebooks import show_source\n"
                                          "from minilora.nn import ops\n"
                                          "show_source(ops.layernorm_forward)\n"
                                          "show_source(ops.layernorm_backward)")]
    nb.cells[1].metadata["tags"] = ["parameters"]
    nbformat.write(nb, src / "listing.ipynb")
    executed, _ = notebooks.execute_notebook(src / "listing.ipynb", quick_mode=False, timeout=120)
    nbformat.write(executed, src / "listing.ipynb")
    html_dir = notebooks.build_book(tmp_path / "out", source=src)
    page = (html_dir / "listing.html").read_text()
    assert page.count('<details class="minilora-source">') == 2 and "<details open" not in page
    assert "Source of <code>minilora.nn.ops.layernorm_backward</code> (minilora/nn/ops.py, line" \
        in page
    assert '<span class="k">def</span>' in page                 # Pygments' highlighting
    seen, requests = _read_in_chromium(chromium, html_dir / "listing.html", tmp_path)
    assert seen["listings"] == 2 and seen["open_listings"] == 0 and requests == []
    assert seen["math"] == seen["math_rendered"] == 1


@pytest.mark.slow
def test_a_chapter_figure_and_cjk_titles_render(book, chromium, tmp_path):
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout
    assert fonts.strip(), "no CJK font: apt-get install -y fonts-noto-cjk (titles render as boxes)"
    page = book / "05-lora-and-qlora.html"
    figs = [s for s in _parse(page).resources if s.startswith("_images/")]
    assert figs, "the QLoRA chapter shows no figure"
    for s in figs:
        assert (book / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", s
    shot = _screenshot(chromium, page.as_uri(), tmp_path / "page.png")
    assert shot.shape[0] >= 1000 and shot.std() > 0.05, "the chapter page rendered blank"

    # a figure renders in the browser: a page holding only the first figure shows colour
    fig_page = tmp_path / "fig.html"
    fig_page.write_text(f'<html><body style="margin:0"><img src="{(book / figs[0]).as_uri()}" '
                        'style="width:1000px"></body></html>')
    img = _screenshot(chromium, fig_page.as_uri(), tmp_path / "fig.png", (1000, 700))
    colourful = (img.max(axis=2) - img.min(axis=2)) > 0.2
    assert colourful.mean() > 0.005, "the figure did not render (no coloured pixels)"

    # CJK glyphs are real glyphs: two different characters must not render as the same box
    shots = []
    for ch in ("量", "微"):
        p = tmp_path / f"cjk{ord(ch)}.html"
        p.write_text(f'<html><head><meta charset="utf-8"></head>'
                     f'<body style="margin:0;font-size:160px">{ch}</body></html>',
                     encoding="utf-8")
        shots.append(_screenshot(chromium, p.as_uri(), tmp_path / f"cjk{ord(ch)}.png", (300, 300)))
    assert all(s.std() > 0.05 for s in shots), "a CJK character rendered as nothing"
    assert np.abs(shots[0] - shots[1]).mean() > 0.01, \
        "two different CJK characters render identically: missing CJK font (tofu boxes)"
