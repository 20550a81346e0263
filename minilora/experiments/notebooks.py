"""Helpers for the chapters (notebooks): show the library's real source, run a chapter in quick or
full mode, and keep the committed outputs fresh.

* :func:`show_source` prints the source of a library function, so a chapter shows the code that
  actually runs instead of a second copy.
* :func:`inline` turns a matplotlib figure into an inline picture (the PNG bytes ``minilora
  figures`` would write); :func:`draw_figure` draws a registered figure of ``minilora figures``
  from the repository's ``results/``, for ``display(...)`` in a chapter.
* **Quick mode, the papermill way.** Each chapter's first code cell is tagged ``parameters`` and
  holds ``SMALL = False`` (full mode, the reader's default). :func:`execute_notebook` with
  ``quick=True`` inserts a cell tagged ``injected-parameters`` holding ``SMALL = True`` right after
  it, exactly where papermill would put it; the chapter itself never reads the environment.
* **Committed outputs.** ``--write`` runs a chapter in full mode and writes it back in place with
  ``metadata.minilora = {"code_hash": ..., "mode": "full", "seconds": ...}``. :func:`code_hash`
  is the SHA-256 of the code cells' sources, so a test can tell when the code changed after the
  outputs were made (:func:`freshness_problems`).

Command line (``python -m minilora.experiments.notebooks``)::

    --execute chapters/*.ipynb                 # full mode, into memory (nothing on disk changes)
    --execute --quick chapters/*.ipynb         # quick mode (also when MINILORA_QUICK=1), in memory
    --execute --full --write chapters/02-...   # full mode, outputs and code hash written in place
    --check chapters/*.ipynb                   # outputs present and code hash matches
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
import inspect
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


def show_source(obj) -> None:
    """Print ``obj``'s source with its file and line number (the library's real code)."""
    lines, start = inspect.getsourcelines(obj)
    path = inspect.getsourcefile(obj)
    try:
        root = os.path.dirname(os.path.dirname(minilora.__file__))
        path = os.path.relpath(path, root)
    except ValueError:
        pass
    print(f"# {path}, line {start}")
    print("".join(lines), end="")


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
    a cell that raises raises ``nbclient.exceptions.CellExecutionError``.
    """
    import nbformat  # lazy: optional (the chapters/test extras); only running notebooks needs it
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    parameters_index(nb, str(path))
    if quick_mode:
        nb = inject_parameters(nb, QUICK_PARAMETERS, str(path))
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
    return nb, seconds


def write_executed(path, nb, seconds: float) -> None:
    """Write a full-mode run of ``path`` in place, with its code hash in ``metadata.minilora``."""
    import nbformat  # lazy: optional (the chapters/test extras); only running notebooks needs it

    if any(INJECTED_TAG in _tags(c) for c in nb["cells"]):
        raise UsageError(f"{path}: only a full-mode run is written (drop --quick / MINILORA_QUICK)")
    nb.metadata["minilora"] = {"code_hash": code_hash(nb), "mode": "full",
                               "seconds": round(float(seconds))}
    atomic_write_text(path, nbformat.writes(nb) + "\n")


def freshness_problems(nb, name: str = "notebook") -> list[str]:
    """What is wrong with a committed chapter's outputs (empty list: fresh and complete).

    Every code cell except the parameters cell must have an output, and the code hash stored in
    ``metadata.minilora.code_hash`` must equal :func:`code_hash` of the current code.
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
    return problems


def book_command(out=None) -> list[str]:
    """The jupyter-book 1.x command that builds ``chapters/`` as configured in
    ``chapters/_book/`` (warnings are errors); output in ``<out or chapters>/_build/html``."""
    chapters = REPO / "chapters"
    exe = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    # absolute --config/--toc: jupyter-book 1.0 resolves a relative --toc against the source folder
    cmd = [exe, "build", str(chapters), "--config", str(chapters / "_book" / "_config.yml"),
           "--toc", str(chapters / "_book" / "_toc.yml"), "--warningiserror", "--keep-going"]
    return cmd + (["--path-output", str(Path(out).resolve())] if out is not None else [])


def build_book(out=None) -> Path:
    """Build the book (see :func:`book_command`); returns the folder with ``index.html``."""
    cmd = book_command(out)
    if not Path(cmd[0]).exists():
        raise UsageError("jupyter-book is not installed: pip install -e '.[book]' "
                         "(jupyter-book 1.x; 2.x needs the network to build)")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UsageError(f"the book did not build (exit {done.returncode}):\n"
                         f"{(done.stdout + done.stderr)[-4000:]}")
    return Path(out if out is not None else REPO / "chapters").resolve() / "_build" / "html"


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
                    help="check that every code cell has an output and the code hash is current")
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
