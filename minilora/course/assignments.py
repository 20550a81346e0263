"""The homework assignments as the grader reads them: nbgrader source notebooks under
``chapters/homework/source/<name>/<name>.ipynb``, their cells classified (setup, solution,
autograded test with points), and the reference solution.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from minilora.errors import MiniloraError
from minilora.io import atomic_write_text

#: Where the assignments live: ``<repository>/chapters/homework/source/<name>/<name>.ipynb``.
SOURCE_DIR = Path(__file__).resolve().parents[2] / "chapters" / "homework" / "source"

_MAGIC = re.compile(r"^\s*[%!]")  # IPython magics and shell escapes: not Python
_MARKER = re.compile(r"^\s*### (BEGIN|END) SOLUTION\s*$")
_HIDDEN = re.compile(r"^\s*### (BEGIN|END) HIDDEN TESTS\s*$")


class GradeError(MiniloraError, ValueError):
    """The assignment or the student file cannot be graded as asked (unknown name, no file)."""


# ----------------------------------------------------------------------------------------------
# reading notebooks
# ----------------------------------------------------------------------------------------------
def assignment_names() -> list[str]:
    """The assignments shipped with minilora, by name (sorted)."""
    if not SOURCE_DIR.is_dir():
        return []
    return sorted(p.name for p in SOURCE_DIR.iterdir() if (p / f"{p.name}.ipynb").is_file())


def find_assignment(assignment) -> Path:
    """The source notebook of ``assignment``: a name (``layernorm_backward``) or a path to an
    nbgrader source ``.ipynb`` (or to the folder holding ``<folder name>.ipynb``)."""
    path = Path(assignment)
    if path.is_dir() and (path / f"{path.name}.ipynb").is_file():
        return path / f"{path.name}.ipynb"
    if path.suffix == ".ipynb":
        if not path.is_file():
            raise GradeError(f"assignment notebook {str(path)!r} does not exist")
        return path
    candidate = SOURCE_DIR / str(assignment) / f"{assignment}.ipynb"
    if candidate.is_file():
        return candidate
    names = ", ".join(assignment_names()) or f"none found under {SOURCE_DIR}"
    raise GradeError(f"unknown assignment {str(assignment)!r}: give one of {names}, or the path "
                     "of an nbgrader source notebook")


def read_notebook(path: Path, what: str) -> dict:
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GradeError(f"{what} {str(path)!r} is not a readable notebook (.ipynb JSON): "
                         f"{e}") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise GradeError(f"{what} {str(path)!r} is not a Jupyter notebook (no 'cells' list)")
    return nb


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def nbgrader_meta(cell: dict) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def cell_kind(cell: dict) -> str:
    """'test', 'solution', 'setup' (any other code cell) or 'markdown'."""
    if cell.get("cell_type") != "code":
        return "markdown"
    meta = nbgrader_meta(cell)
    if meta.get("grade") and not meta.get("solution"):
        return "test"
    if meta.get("solution"):
        return "solution"
    return "setup"


def read_assignment(assignment) -> list[dict]:
    """The code cells of an assignment as ``{"kind", "grade_id", "source", "points"}`` dicts,
    in notebook order (kind: 'setup', 'solution' or 'test'). Raises :class:`GradeError` if the
    notebook has no test cell with points."""
    path = find_assignment(assignment)
    cells = []
    for i, cell in enumerate(read_notebook(path, "assignment")["cells"]):
        kind = cell_kind(cell)
        if kind == "markdown":
            continue
        meta = nbgrader_meta(cell)
        cells.append({"kind": kind, "grade_id": str(meta.get("grade_id", f"cell-{i}")),
                      "source": cell_source(cell), "points": float(meta.get("points", 0))})
    if not any(c["kind"] == "test" for c in cells):
        raise GradeError(f"{str(path)!r} has no autograded test cell (nbgrader metadata "
                         "grade: true with points); it is not an assignment")
    return cells


def reference_solution(assignment) -> str:
    """The solution cells of an assignment with the BEGIN/END SOLUTION marker lines removed:
    the reference answer, as the text of a ``.py`` file."""
    parts = []
    for c in read_assignment(assignment):
        if c["kind"] == "solution":
            lines = [ln for ln in c["source"].splitlines() if not _MARKER.match(ln)]
            parts.append("\n".join(lines))
    return "\n\n\n".join(parts) + "\n"


def strip_magics(source: str) -> str:
    """Blank out IPython magic and shell lines (keeps the line numbers of everything else)."""
    return "\n".join("" if _MAGIC.match(ln) else ln for ln in source.splitlines())


#: What replaces a solution region in the student's version (nbgrader's own default).
STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
#: Where the student versions are committed (the book shows them; the grader grades them).
STUDENT_DIR = SOURCE_DIR.parent / "student"


def without_solutions(source: str) -> str:
    """``source`` with every BEGIN/END SOLUTION region replaced by :data:`STUB`, indented as the
    region's first marker, and every BEGIN/END HIDDEN TESTS region removed (what ``nbgrader
    generate_assignment`` does)."""
    out, inside, hidden = [], False, False
    for line in source.splitlines():
        m, h = _MARKER.match(line), _HIDDEN.match(line)
        if h:
            hidden = h.group(1) == "BEGIN"
        elif hidden:
            continue
        elif m and m.group(1) == "BEGIN":
            indent = line[:len(line) - len(line.lstrip())]
            out += [indent + s for s in STUB]
            inside = True
        elif m:
            inside = False
        elif not inside:
            out.append(line)
    while out and not out[-1].strip():         # a hidden block at the end leaves no blank tail
        out.pop()
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def student_notebook(assignment) -> dict:
    """The released version of an assignment: the source notebook with every solution region
    stubbed out, the hidden tests removed and no outputs, nbgrader metadata kept (so nbgrader and ``minilora grade`` grade
    a filled-in copy)."""
    nb = read_notebook(find_assignment(assignment), "assignment")
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            text = without_solutions(cell_source(cell))
            lines = text.splitlines(keepends=True)
            cell["source"], cell["outputs"], cell["execution_count"] = lines, [], None
    return nb


def write_student_notebooks(out_dir=STUDENT_DIR) -> list[Path]:
    """Write every assignment's student version to ``out_dir/<name>.ipynb``; returns the paths."""
    out_dir = Path(out_dir)
    paths = []
    for name in assignment_names():
        path = out_dir / f"{name}.ipynb"
        atomic_write_text(path, json.dumps(student_notebook(name), indent=1, ensure_ascii=False)
                          + "\n")
        paths.append(path)
    return paths
