"""The student versions of the homework (chapters/homework/student/, shown in the book): made from
the sources by stubbing every solution region, committed fresh, with no solution text, and
graded to zero by ``minilora grade`` until they are filled in."""
import json

import pytest

from minilora.course.assignments import (
    STUB,
    STUDENT_DIR,
    assignment_names,
    cell_kind,
    read_assignment,
    student_notebook,
)
from minilora.course.grade import grade


@pytest.mark.parametrize("name", assignment_names())
def test_committed_student_version_is_fresh_and_holds_no_solution(name):
    committed = json.loads((STUDENT_DIR / f"{name}.ipynb").read_text())
    assert committed == student_notebook(name), (
        "regenerate: python -c 'from minilora.course.assignments import write_student_notebooks; "
        "write_student_notebooks()'")
    text = json.dumps(committed)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    solutions = [c for c in committed["cells"] if cell_kind(c) == "solution"]
    assert solutions and all(STUB[1] in "".join(c["source"]) for c in solutions)
    # the lines inside the source's solution regions (the answer itself) are gone
    assert not any(ln in text for ln in solution_lines(name)), name


def solution_lines(name):
    """The distinctive lines between BEGIN and END SOLUTION in the source notebook."""
    lines, inside = [], False
    for c in read_assignment(name):
        for ln in c["source"].splitlines():
            if "### BEGIN SOLUTION" in ln:
                inside = True
            elif "### END SOLUTION" in ln:
                inside = False
            elif inside and len(ln.strip()) > 25 and not ln.strip().startswith("#"):
                lines.append(json.dumps(ln)[1:-1])  # as it would appear inside the JSON text
    return lines


def test_an_unfilled_student_version_scores_zero_with_a_reason():
    report = grade("lora_merge", STUDENT_DIR / "lora_merge.ipynb")
    assert report.score == 0 and report.max_score > 0
