"""Helpers for the chapters (notebooks): show the library's real source, run a chapter in quick or
full mode, and keep the committed outputs fresh.

* :func:`show_source` shows the source of a library function, collapsed and highlighted (a
  reader opens it), so a chapter can show the code that actually runs instead of a second copy.
* :func:`inline` turns a matplotlib figure into an inline picture (the PNG bytes ``minilora
  figures`` would write); :func:`draw_figure` draws a registered figure of ``minilora figures``
  from the repository's ``results/``, for ``display(...)`` in a chapter.
* **Quick mode, the papermill way.** Each chapter's first code cell is tagged ``parameters`` and
  holds ``SMALL = False`` (full mode, the reader's default). :func:`execute_notebook` with
  ``quick=True`` inserts a cell tagged ``injected-parameters`` holding ``SMALL = True`` right after
  it, exactly where papermill would put it; the chapter itself never reads the environment.
* **Committed outputs, fresh means fresh.** ``--write`` runs a chapter in full mode and writes it
  back in place with ``metadata.minilora = {"code_hash": ..., "library": {...}, "mode": "full",
  "seconds": ...}``. :func:`code_hash` is the SHA-256 of the code cells' sources; ``library``
  maps every file of the ``minilora`` package that the chapter's kernel had imported by its end
  (its own imports and theirs, lazy ones included) to a hash of its content. So
  :func:`freshness_problems` (``--check``) reports a chapter stale when its code changed *or*
  when a library module it ran changed, and names the files.

Command line (``python -m minilora.experiments.notebooks``)::

    --execute chapters/*.ipynb                 # full mode, into memory (nothing on disk changes)
    --execute --quick chapters/*.ipynb         # quick mode (also when MINILORA_QUICK=1), in memory
    --execute --full --write chapters/02-...   # full mode, outputs and code hash written in place
    --check chapters/*.ipynb                   # outputs present, code and library unchanged
    --book                                     # the static HTML book, chapters/_build/html

The book: jupyter-book 1.x (the ``book`` extra) builds ``chapters/`` with the configuration in
``chapters/_book/`` from the committed outputs, never re-executing a chapter
(:func:`book_command`).

Kernels run with ``TQDM_DISABLE=1`` (no progress-bar fragments in outputs) and the notebook's own
folder as the working directory.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import html
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import minilora
from minilora.errors import UsageError
from minilora.experiments.figures import FIGURES
from minilora.experiments.figures.common import MissingResults, png_bytes, pyplot
from minilora.experiments.paths import RESULTS
from minilora.io import atomic_write_text

#: the repository (``results/``, ``figures/``), wherever the chapter runs from
REPO = Path(minilora.__file__).resolve().parents[1]
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
QUICK_PARAMETERS = {"SMALL": True}


def quick() -> bool:
    """True when the environment asks for quick mode (``MINILORA_QUICK=1``, which CI sets)."""
    return os.environ.get("MINILORA_QUICK", "0").strip() not in ("", "0", "false", "False")


class Listing:
    """The source of a library object, as a chapter shows it: collapsed and highlighted.

    In a notebook the output is an HTML ``<details class="minilora-source">`` whose summary names
    the object, its file and line; the reader opens it (the book, JupyterLab and the code-hosting
    site all render it). Plain text (``repr``) is the same listing uncollapsed, for a terminal.
    """

    def __init__(self, obj):
        lines, self.line = inspect.getsourcelines(obj)
        self.source = "".join(lines)
        self.name = f"{getattr(obj, '__module__', '') or ''}.{getattr(obj, '__qualname__', '')}"
        self.name = self.name.strip(".") or repr(obj)
        path = inspect.getsourcefile(obj) or "?"
        try:
            path = os.path.relpath(path, os.path.dirname(os.path.dirname(minilora.__file__)))
        except ValueError:
            pass
        self.path = path.replace(os.sep, "/")

    def __repr__(self) -> str:
        return f"# {self.path}, line {self.line}\n{self.source}"

    def _repr_html_(self) -> str:
        try:  # Pygments comes with IPython, so it is there wherever a notebook runs
            from pygments import highlight
            from pygments.formatters import HtmlFormatter
            from pygments.lexers import PythonLexer
            body = highlight(self.source, PythonLexer(), HtmlFormatter(cssclass="highlight"))
        except ImportError:
            body = f'<div class="highlight"><pre>{html.escape(self.source)}</pre></div>'
        name, where = html.escape(self.name), html.escape(f"{self.path}, line {self.line}")
        n = self.source.count("\n")
        return (f'<details class="minilora-source"><summary>Source of <code>{name}</code> '
                f"({where}, {n} lines)</summary>\n{body}</details>")


def show_source(obj) -> None:
    """Show ``obj``'s source (the library's real code) as a collapsed, highlighted listing.

    In a notebook this displays a :class:`Listing` (closed until the reader opens it); outside
    IPython it prints the plain text, with the file and line number first.
    """
    listing = Listing(obj)
    try:  # lazy: IPython is there only where a notebook runs (the chapters extra)
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(listing)
    else:
        print(repr(listing), end="" if listing.source.endswith("\n") else "\n")


class PNG:
    """PNG bytes that a notebook shows inline: IPython calls ``_repr_png_`` when the object is the
    value of a cell or is passed to ``display``."""

    def __init__(self, data: bytes):
        self.data = data

    def _repr_png_(self) -> bytes:
        return self.data


def inline(fig) -> PNG:
    """A matplotlib figure as a :class:`PNG` (no date or software stamp: stable bytes); closes it."""
    data = png_bytes(fig)
    pyplot().close(fig)
    return PNG(data)


def draw_figure(name: str) -> list[PNG]:
    """Figure ``name`` of ``minilora figures``, drawn now from the repository's saved results.

    A chapter writes ``display(*draw_figure("qlora_compare"))``. Missing results print the command
    that makes them and return no picture, instead of failing the chapter.
    """
    if name not in FIGURES:
        raise UsageError(f"unknown figure {name!r}; allowed: {', '.join(FIGURES)}")
    with tempfile.TemporaryDirectory() as d:
        try:
            paths = FIGURES[name](REPO / RESULTS, Path(d))
        except MissingResults as e:
            print(f"figure {name}: {e}")
            return []
        return [PNG(Path(p).read_bytes()) for p in paths]


def _tags(cell) -> list:
    return list(cell.get("metadata", {}).get("tags", []))


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def code_hash(nb) -> str:
    """SHA-256 (hex) of the code cells' sources in order, the injected-parameters cell left out.

    Each source is hashed with its length, so moving code from one cell to the next changes the
    hash; outputs, markdown and metadata do not enter it.
    """
    h = hashlib.sha256()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or INJECTED_TAG in _tags(cell):
            continue
        src = _source(cell).encode("utf-8")
        h.update(f"{len(src)}\n".encode())
        h.update(src)
    return h.hexdigest()


#: the code the kernel runs after a chapter (in a cell that is removed again) to list the files of
#: the ``minilora`` package it imported, relative to the folder holding the package
_LIBRARY_PROBE = """\
import json as _j, os as _o, sys as _s
_r = _o.path.dirname(_o.path.dirname(_s.modules["minilora"].__file__)) if "minilora" in _s.modules else ""
print("MINILORA-LIBRARY-FILES " + _j.dumps(sorted({
    _o.path.relpath(_m.__file__, _r).replace(_o.sep, "/") for _n, _m in list(_s.modules.items())
    if _r and _n.split(".")[0] == "minilora" and getattr(_m, "__file__", None)})))"""
_LIBRARY_MARK = "MINILORA-LIBRARY-FILES "


def library_root() -> Path:
    """The folder holding the ``minilora`` package (the repository, for an editable install)."""
    return Path(minilora.__file__).resolve().parents[1]


def library_hashes(files, root=None) -> dict:
    """``{path: sha256[:16] of its bytes}`` for package files given relative to ``root``
    (default :func:`library_root`); a missing file maps to ``None``."""
    root = Path(root) if root is not None else library_root()
    out = {}
    for f in sorted(files):
        path = root / f
        out[f] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    return out


def library_problems(nb, name: str = "notebook", root=None) -> list[str]:
    """Whether the library code a chapter ran is unchanged since its outputs were made.

    Compares ``metadata.minilora.library`` (written by ``--write``) with the files now under
    ``root`` (default :func:`library_root`); one problem naming the changed files, or none.
    """
    stored = nb.get("metadata", {}).get("minilora", {}).get("library")
    if stored is None:
        return [f"{name}: no record of the library code its outputs came from (outputs older "
                f"than the library check); rerun with --full --write"]
    now = library_hashes(stored, root)
    changed = [f"{f} ({'removed' if now[f] is None else 'changed'})"
               for f, h in stored.items() if now[f] != h]
    if not changed:
        return []
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return [f"{name}: library code it ran changed since its outputs were made: "
            f"{', '.join(changed[:5])}{more}; rerun with --full --write"]


def parameters_index(nb, name: str = "notebook") -> int:
    """Index of the cell tagged ``parameters``; a notebook without one is a UsageError."""
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and PARAMETERS_TAG in _tags(cell):
            return i
    raise UsageError(f"{name}: no code cell tagged {PARAMETERS_TAG!r}; the first code cell of a "
                     f"chapter must be tagged {PARAMETERS_TAG!r} and hold SMALL = False")


def inject_parameters(nb, params: dict, name: str = "notebook"):
    """A copy of ``nb`` with a cell tagged ``injected-parameters`` after the parameters cell.

    The cell assigns ``params`` (``{"SMALL": True}`` gives ``SMALL = True``), as papermill does.
    """
    import nbformat  # lazy: optional (the chapters/test extras); only running notebooks needs it

    i = parameters_index(nb, name)
    out = copy.deepcopy(nb)
    src = "# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src.rstrip("\n"))
    cell.metadata["tags"] = [INJECTED_TAG]
    out["cells"].insert(i + 1, cell)
    return out


def execute_notebook(path, quick_mode: bool, timeout: int = 1200):
    """Execute the chapter at ``path`` into a new notebook object (the file is only read).

    ``quick_mode`` injects ``SMALL = True`` after the parameters cell. Returns ``(nb, seconds)``;
    a cell that raises raises ``nbclient.exceptions.CellExecutionError``. The files of the
    ``minilora`` package that the kernel imported are listed, by a cell run after the chapter's
    last and removed again, in ``nb.metadata.minilora.library_files`` (see :func:`write_executed`).
    """
    import nbformat  # lazy: optional (the chapters/test extras); only running notebooks needs it
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    parameters_index(nb, str(path))
    if quick_mode:
        nb = inject_parameters(nb, QUICK_PARAMETERS, str(path))
    probe = nbformat.v4.new_code_cell(_LIBRARY_PROBE)
    nb.cells.append(probe)
    old = {k: os.environ.get(k) for k in ("TQDM_DISABLE",)}
    os.environ["TQDM_DISABLE"] = "1"          # the kernel inherits it: no progress bars in outputs
    try:
        t = time.perf_counter()
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(path.resolve().parent)}})
        client.execute()
        seconds = time.perf_counter() - t
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb.cells.remove(probe)
    text = "".join(o.get("text", "") for o in probe.get("outputs", []) if o.get("name") == "stdout")
    files = next((json.loads(line[len(_LIBRARY_MARK):]) for line in text.splitlines()
                  if line.startswith(_LIBRARY_MARK)), [])
    nb.metadata.setdefault("minilora", {})["library_files"] = files
    return nb, seconds


def write_executed(path, nb, seconds: float) -> None:
    """Write a full-mode run of ``path`` in place, with its code hash and the hashes of the library
    files it ran (``nb.metadata.minilora.library_files``, from :func:`execute_notebook`) in
    ``metadata.minilora``."""
    import nbformat  # lazy: optional (the chapters/test extras); only running notebooks needs it

    if any(INJECTED_TAG in _tags(c) for c in nb["cells"]):
        raise UsageError(f"{path}: only a full-mode run is written (drop --quick / MINILORA_QUICK)")
    files = nb.metadata.get("minilora", {}).get("library_files")
    if files is None:
        raise UsageError(f"{path}: the run did not record which library files it imported "
                         f"(was it made by execute_notebook?)")
    nb.metadata["minilora"] = {"code_hash": code_hash(nb), "library": library_hashes(files),
                               "mode": "full", "seconds": round(float(seconds))}
    atomic_write_text(path, nbformat.writes(nb) + "\n")


def freshness_problems(nb, name: str = "notebook", library: bool = True, root=None) -> list[str]:
    """What is wrong with a committed chapter's outputs (empty list: fresh and complete).

    Every code cell except the parameters cell must have an output, the code hash stored in
    ``metadata.minilora.code_hash`` must equal :func:`code_hash` of the current code, and (with
    ``library``) the library files the chapter ran must be unchanged (:func:`library_problems`).
    """
    problems = []
    stored = nb.get("metadata", {}).get("minilora", {}).get("code_hash")
    if stored is None:
        problems.append(f"{name}: no metadata.minilora.code_hash (never run with --full --write)")
    elif stored != code_hash(nb):
        problems.append(f"{name}: code changed since its outputs were made (stored hash "
                        f"{stored[:12]}, current {code_hash(nb)[:12]}); rerun with --full --write")
    n = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        n += 1
        if PARAMETERS_TAG in _tags(cell) or INJECTED_TAG in _tags(cell):
            continue
        if not cell.get("outputs"):
            first = _source(cell).strip().splitlines()[:1]
            problems.append(f"{name}: code cell {n} has no output ({first[0][:60] if first else ''!r})")
    if library:
        problems += library_problems(nb, name, root)
    return problems


def book_command(out=None, source=None) -> list[str]:
    """The jupyter-book 1.x command that builds ``source`` (default ``chapters/``) as configured
    in its ``_book/`` (warnings are errors); output in ``<out or source>/_build/html``."""
    chapters = Path(source).resolve() if source is not None else REPO / "chapters"
    exe = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    # absolute --config/--toc: jupyter-book 1.0 resolves a relative --toc against the source folder
    cmd = [exe, "build", str(chapters), "--config", str(chapters / "_book" / "_config.yml"),
           "--toc", str(chapters / "_book" / "_toc.yml"), "--warningiserror", "--keep-going"]
    return cmd + (["--path-output", str(Path(out).resolve())] if out is not None else [])


def build_book(out=None, source=None) -> Path:
    """Build the book (see :func:`book_command`); returns the folder with ``index.html``."""
    cmd = book_command(out, source)
    if not Path(cmd[0]).exists():
        raise UsageError("jupyter-book is not installed: pip install -e '.[book]' "
                         "(jupyter-book 1.x; 2.x needs the network to build)")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UsageError(f"the book did not build (exit {done.returncode}):\n"
                         f"{(done.stdout + done.stderr)[-4000:]}")
    base = out if out is not None else (source if source is not None else REPO / "chapters")
    return Path(base).resolve() / "_build" / "html"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m minilora.experiments.notebooks",
        description="Execute chapters in quick or full mode, write full-mode outputs, check them.")
    ap.add_argument("notebooks", nargs="*", metavar="NOTEBOOK")
    ap.add_argument("--execute", action="store_true", help="execute the notebooks")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="inject SMALL = True after the parameters cell (default when "
                           "MINILORA_QUICK=1)")
    mode.add_argument("--full", action="store_true", help="full mode even if MINILORA_QUICK=1")
    ap.add_argument("--write", action="store_true",
                    help="write the executed notebook in place with its code hash (full mode only)")
    ap.add_argument("--check", action="store_true",
                    help="check that every code cell has an output and that neither the code nor "
                         "the library code the chapter ran changed since (names what did)")
    ap.add_argument("--book", action="store_true",
                    help="build the HTML book from the committed outputs (chapters/_build/html)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = ap.parse_args(argv)
    if args.book:
        if args.notebooks or args.execute or args.check:
            ap.error("--book takes no notebooks and no other action")
        print(f"book: {build_book() / 'index.html'}")
        return
    if not (args.execute or args.check):
        ap.error("give --execute and/or --check (or --book)")
    if not args.notebooks:
        ap.error("name at least one notebook")
    missing = [p for p in args.notebooks if not Path(p).is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    quick_mode = args.quick or (quick() and not args.full)
    if args.write and quick_mode:
        ap.error("--write stores full-mode outputs only; drop --quick (or pass --full when "
                 "MINILORA_QUICK=1 is set)")
    if args.write and not args.execute:
        ap.error("--write needs --execute")

    import nbformat  # lazy: optional (the chapters/test extras); only running notebooks needs it
    from nbclient.exceptions import CellExecutionError

    failed = []
    if args.execute:
        for p in args.notebooks:
            try:
                nb, seconds = execute_notebook(p, quick_mode, args.timeout)
            except CellExecutionError as e:
                print(f"FAILED  {p}\n{str(e)[-3000:]}", flush=True)
                failed.append(p)
                continue
            if args.write:
                write_executed(p, nb, seconds)
            print(f"ok      {p} ({'quick' if quick_mode else 'full'} mode, {seconds:.0f} s"
                  f"{', written' if args.write else ''})", flush=True)
    if args.check:
        for p in args.notebooks:
            problems = freshness_problems(nbformat.read(p, as_version=4), p)
            print("\n".join(problems) if problems else f"fresh   {p}", flush=True)
            if problems:
                failed.append(p)
    if failed:
        raise SystemExit(f"{len(failed)} chapter(s) failed: {', '.join(dict.fromkeys(failed))}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as e:
        raise SystemExit(f"error: {e}")
