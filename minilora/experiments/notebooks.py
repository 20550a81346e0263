"""Helpers for the chapters (notebooks): show the library's real source, quick mode, execution.

* :func:`show_source` prints the source of a library function, so a chapter shows the code that
  actually runs instead of a second copy.
* :func:`quick` tells a chapter whether to run its small configuration (``SMALL = quick()``):
  true when the environment sets ``MINILORA_QUICK=1`` (CI does), so every chapter runs top to
  bottom in minutes.
* ``python -m minilora.experiments.notebooks --execute chapters/*.ipynb`` executes notebooks with nbclient
  (used by ``.ci/run``); it fails on the first cell that raises and names it.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import minilora


def quick() -> bool:
    """True when chapters should run their small, fast configuration (MINILORA_QUICK=1)."""
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


def execute(paths, timeout: int = 1200) -> None:
    """Execute each notebook in place of a copy (the files on disk are not modified)."""
    import nbformat  # lazy: optional (the chapters extra); only executing notebooks needs it
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    failed = []
    for p in paths:
        t = time.perf_counter()
        nb = nbformat.read(p, as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(os.path.abspath(p))}})
        try:
            client.execute()
            print(f"ok      {p} ({time.perf_counter() - t:.0f} s)", flush=True)
        except CellExecutionError as e:
            print(f"FAILED  {p}\n{str(e)[-3000:]}", flush=True)
            failed.append(p)
    if failed:
        raise SystemExit(f"{len(failed)} chapter(s) failed: {', '.join(failed)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minilora.experiments.notebooks",
                                 description="Execute chapters (set MINILORA_QUICK=1 for quick mode).")
    ap.add_argument("--execute", nargs="+", required=True, metavar="NOTEBOOK")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = ap.parse_args(argv)
    execute(args.execute, args.timeout)


if __name__ == "__main__":
    main(sys.argv[1:])
