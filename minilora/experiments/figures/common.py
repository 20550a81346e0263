"""What every figure shares: reading saved results, matplotlib on Agg, byte-stable PNG writes.

A figure is drawn only from ``results/`` (never by training). A figure whose results are missing
raises :class:`MissingResults` naming the command that makes them.

``save_figure`` writes PNGs without a "Software" or date entry and leaves a file untouched when the
new bytes equal the old ones, so re-running ``minilora figures`` on unchanged results changes no
committed file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from minilora.errors import MiniloraError
from minilora.io import atomic_write_bytes


class MissingResults(MiniloraError, FileNotFoundError):
    """A figure's input is not in ``results/`` yet; the message says which command makes it."""


def read_json(path: Path, made_by: str):
    """Load a results JSON file, or raise :class:`MissingResults` naming ``made_by``."""
    path = Path(path)
    if not path.exists():
        raise MissingResults(f"{path} not found; make it with: {made_by}")
    return json.loads(path.read_text())


def read_jsonl(path: Path, made_by: str) -> list[dict]:
    """Load a JSON-lines results file (one record a line)."""
    path = Path(path)
    if not path.exists():
        raise MissingResults(f"{path} not found; make it with: {made_by}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib  # lazy: optional (the chapters/test extras), needed only to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams["svg.hashsalt"] = "minilora"  # deterministic ids if a figure is ever saved as SVG
    return plt


def png_bytes(fig) -> bytes:
    """``fig`` as PNG bytes with no Software/date metadata (the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically and close it; an unchanged file is not rewritten."""
    path = Path(path)
    data = png_bytes(fig)
    pyplot().close(fig)
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)
    return path
