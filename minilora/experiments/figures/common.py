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
