"""What every figure shares: reading saved results, matplotlib on Agg, byte-stable PNG writes.

A figure is drawn only from ``results/`` (never by training). A figure whose results are missing
raises :class:`MissingResults` naming the command that makes them.

``save_figure`` writes PNGs without a "Software" or date entry and leaves a file untouched when the
new bytes equal the old ones, so re-running ``minilora figures`` on unchanged results changes no
committed file.

**Legible at 1x in the book.** The book's text column shows about :data:`COLUMN_PX` pixels of a
figure at a 1280 px window. A figure is drawn at most :data:`BOOK_WIDTH` inches wide (~1,010 px
at :data:`DPI`, shown at ~77 %) with no text under :data:`MIN_FONT` points (~10 px on screen);
:func:`book_axes` lays out several panels at most two side by side instead of one long row.
``tests/test_figures_legible.py`` draws every figure and checks both.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from minilora.errors import MiniloraError
from minilora.io import atomic_write_bytes


class MissingResults(MiniloraError, FileNotFoundError):
    """A figure's input is not in ``results/`` yet; the message says which command makes it."""


def _parse(path: Path, text: str, made_by: str, line: int = 0):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MissingResults(f"{path} is not valid JSON (line {e.lineno + line}, column "
                             f"{e.colno}: {e.msg}); make it again with: {made_by}") from None


def _read_text(path: Path, made_by: str) -> str:
    if not path.exists():
        raise MissingResults(f"{path} not found; make it with: {made_by}")
    if not path.is_file():
        raise MissingResults(f"{path} is not a file; make it with: {made_by}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MissingResults(f"{path} cannot be read ({type(e).__name__}); make it again with: "
                             f"{made_by}") from None


def read_json(path: Path, made_by: str) -> dict:
    """Load a results JSON file (an object), or raise :class:`MissingResults` (missing,
    unreadable, not JSON, not an object) naming ``made_by``."""
    path = Path(path)
    data = _parse(path, _read_text(path, made_by), made_by)
    if not isinstance(data, dict):
        raise MissingResults(f"{path} holds a JSON {type(data).__name__}, not the object its "
                             f"figure reads; make it again with: {made_by}")
    return data


def read_jsonl(path: Path, made_by: str) -> list[dict]:
    """Load a JSON-lines results file (one object a line), or raise :class:`MissingResults`."""
    path = Path(path)
    out = []
    for i, line in enumerate(_read_text(path, made_by).splitlines()):
        if line.strip():
            rec = _parse(path, line, made_by, i)
            if not isinstance(rec, dict):
                raise MissingResults(f"{path} line {i + 1} is not a JSON object; make it again "
                                     f"with: {made_by}")
            out.append(rec)
    return out


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib  # lazy: optional (the chapters/test extras), needed only to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.hashsalt"] = "minilora"  # deterministic ids if a figure is ever saved as SVG
    return plt


#: the resolution of every saved figure (pixels per inch)
DPI = 120
#: how many pixels of a figure the book's text column shows at a 1280 px window
COLUMN_PX = 780
#: the widest a figure is drawn, in inches (~1,010 px: shown at ~77 % in the column)
BOOK_WIDTH = 8.4
#: the smallest text, in points (at BOOK_WIDTH: ~10 px on the reader's screen)
MIN_FONT = 8


def book_axes(plt, n: int, row_height: float, top=None, **kwargs):
    """A figure :data:`BOOK_WIDTH` wide holding ``n`` panels, at most two side by side, each row
    ``row_height`` inches tall; panel ``top`` (an index), if given, has the first row to itself.
    Returns ``(fig, axes)`` with ``axes`` a list in panel order; ``kwargs`` go to
    ``plt.figure``."""
    order = list(range(n))
    rows = []
    if top is not None:
        rows.append([top])
        order.remove(top)
    ncols = 1 if n == 1 else 2
    rows += [order[i:i + ncols] for i in range(0, len(order), ncols)]
    fig = plt.figure(figsize=(BOOK_WIDTH, row_height * len(rows)), **kwargs)
    grid = fig.add_gridspec(len(rows), ncols)
    axes = [None] * n
    for r, row in enumerate(rows):
        for c, i in enumerate(row):
            axes[i] = fig.add_subplot(grid[r, :] if len(row) == 1 else grid[r, c])
    return fig, axes


def png_bytes(fig) -> bytes:
    """``fig`` as PNG bytes with no Software/date metadata (the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically and close it; an unchanged file is not rewritten."""
    path = Path(path)
    data = png_bytes(fig)
    pyplot().close(fig)
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)
    return path
