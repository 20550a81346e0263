"""Homework: the nbgrader source notebooks, the planted wrong answers, and the grader's limits.

* every assignment is a valid nbgrader source (metadata, markers, points) and its reference
  solution scores full marks with ``minilora.course.grade``;
* every planted wrong answer (``tests/data/homework/<assignment>/wrong_*.py``) scores less, and
  the tests its header names fail with the message it names (``# expect-fail: TEST: TEXT``);
* a student file that does not parse, raises at import, hangs or prints megabytes gets a clear
  report and never a traceback;
* ``nbgrader generate_assignment`` + ``nbgrader autograde`` on a temporary course give the
  same pass/fail per test as the grader (slow; needs nbgrader).
"""
import ast
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minilora.course import checks
from minilora.course.assignments import (
    SOURCE_DIR,
    GradeError,
    assignment_names,
    read_assignment,
    reference_solution,
)
from minilora.course.grade import format_report, grade, main

ASSIGNMENTS = ["layernorm_backward", "lora_linear", "lora_merge", "nf4_block",
               "subspace_similarity"]
DATA = Path(__file__).parent / "data" / "homework"
WRONG = sorted(DATA.glob("*/wrong_*.py"))
EXPECT = re.compile(r"^# expect-(fail|pass): (\w+)(?:: (.*))?$")


def _notebook(name):
    return json.loads((SOURCE_DIR / name / f"{name}.ipynb").read_text(encoding="utf-8"))


def _released(name):
    """The notebook as nbgrader releases it: each solution region -> raise NotImplementedError."""
    nb = _notebook(name)
    pattern = re.compile(r"( *)### BEGIN SOLUTION\n.*?### END SOLUTION\n?", re.DOTALL)
    for c in nb["cells"]:
        if c["metadata"].get("nbgrader", {}).get("solution"):
            c["source"] = pattern.sub(r"\1# YOUR CODE HERE\n\1raise NotImplementedError()\n",
                                      "".join(c["source"]))
    return nb


def _assert_no_traceback(report):
    text = format_report(report)
    assert "Traceback" not in text and 'File "' not in text, text
    for t in report.tests:
        assert "\n" not in t.reason and len(t.reason) <= 300, t.reason
        assert t.passed or t.reason, f"{t.name} failed without a reason"


def test_five_assignments_are_shipped():
    assert set(ASSIGNMENTS) <= set(assignment_names())


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_source_notebook_is_valid_nbgrader_source(name):
    nb = _notebook(name)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    ids, n_tests = [], 0
    for c in nb["cells"]:
        meta = c["metadata"].get("nbgrader")
        src = "".join(c["source"])
        if c["cell_type"] == "code":
            assert meta is not None, f"code cell without nbgrader metadata: {src[:60]!r}"
            assert c["outputs"] == [] and c["execution_count"] is None, "source has outputs"
        if meta is None:
            continue
        assert meta["schema_version"] == 3
        ids.append(meta["grade_id"])
        if meta["solution"]:
            assert not meta["locked"]
            begins, ends = src.count("### BEGIN SOLUTION"), src.count("### END SOLUTION")
            assert begins == ends >= 1, f"unbalanced solution markers in {meta['grade_id']}"
        if meta["grade"]:
            n_tests += 1
            assert meta["locked"] and not meta["solution"] and meta["points"] > 0
            # nbgrader reads a number left as a test cell's value as partial credit: the last
            # statement must not be an expression with a value (the checks return None)
            last = ast.parse(src).body[-1]
            if isinstance(last, ast.Expr):
                assert isinstance(last.value, ast.Call) and getattr(
                    last.value.func, "id", "").startswith("expect_"), ast.dump(last)[:80]
    assert len(ids) == len(set(ids)), "grade_id values must be unique"
    assert n_tests >= 4
    assert sum(c["points"] for c in read_assignment(name) if c["kind"] == "test") >= 8


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_reference_solution_scores_full_marks(name, tmp_path):
    ref = tmp_path / f"{name}_reference.py"
    ref.write_text(reference_solution(name))
    assert "### BEGIN SOLUTION" not in ref.read_text()
    report = grade(name, ref, timeout=20)
    assert report.score == report.max_score > 0, format_report(report)
    assert report.notes == []
    # the source notebook itself (solutions between markers) is a filled-in notebook too
    report_nb = grade(name, SOURCE_DIR / name / f"{name}.ipynb", timeout=20)
    assert report_nb.score == report_nb.max_score, format_report(report_nb)


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_released_notebook_scores_zero_and_says_not_implemented(name, tmp_path):
    student = tmp_path / f"{name}.ipynb"
    student.write_text(json.dumps(_released(name)))
    report = grade(name, student, timeout=20)
    assert report.score == 0 < report.max_score
    assert any("not implemented yet" in t.reason for t in report.tests), format_report(report)
    _assert_no_traceback(report)


def test_every_assignment_has_two_planted_wrong_answers():
    for name in ASSIGNMENTS:
        assert len(list((DATA / name).glob("wrong_*.py"))) >= 2, name


@pytest.mark.parametrize("path", WRONG, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_planted_wrong_answer_scores_less_with_its_message(path):
    expectations = [EXPECT.match(ln).groups() for ln in path.read_text().splitlines()
                    if EXPECT.match(ln)]
    assert any(kind == "fail" for kind, _, _ in expectations), "header names no failing test"
    report = grade(path.parent.name, path, timeout=20)
    assert report.score < report.max_score, format_report(report)
    by_name = {t.name: t for t in report.tests}
    for kind, test, text in expectations:
        result = by_name[test]
        if kind == "pass":
            assert result.passed, f"{test}: {result.reason}"
        else:
            assert not result.passed, f"{test} passed"
            assert text in result.reason, f"{test}: {result.reason!r} lacks {text!r}"
    _assert_no_traceback(report)


# ----------------------------------------------------------------------------------------------
# students who break things
# ----------------------------------------------------------------------------------------------
def test_syntax_error_is_reported_with_its_line(tmp_path):
    bad = tmp_path / "ln.py"
    bad.write_text("import numpy as np\n\ndef layernorm_backward(dout, x, w, eps=1e-5:\n"
                   "    return x\n")
    report = grade("layernorm_backward", bad, timeout=10)
    assert report.score == 0
    assert any("syntax error in ln.py, line 3" in n for n in report.notes), report.notes
    assert all("layernorm_backward" in t.reason and "not defined" in t.reason
               for t in report.tests), format_report(report)
    _assert_no_traceback(report)


def test_raising_at_import_is_reported_and_the_tests_still_run(tmp_path):
    src = reference_solution("layernorm_backward") + "\nraise RuntimeError('left-over debug')\n"
    student = tmp_path / "ln.py"
    student.write_text(src)
    report = grade("layernorm_backward", student, timeout=10)
    note = " ".join(report.notes)
    assert "RuntimeError: left-over debug" in note and "ln.py, line" in note, note
    assert report.score == report.max_score  # the function was defined before the raise
    _assert_no_traceback(report)


def test_error_inside_the_students_function_names_the_line(tmp_path):
    student = tmp_path / "ln.py"
    student.write_text("def layernorm_backward(dout, x, w, eps=1e-5):\n"
                       "    return undefined_name\n")
    report = grade("layernorm_backward", student, timeout=10)
    assert report.score == 0
    reason = report.tests[0].reason
    assert "NameError" in reason and "ln.py, line 2" in reason, reason


def test_hanging_function_times_out_per_test(tmp_path):
    student = tmp_path / "ln.py"
    student.write_text("def layernorm_backward(dout, x, w, eps=1e-5):\n"
                       "    while True:\n        pass\n")
    t0 = time.monotonic()
    report = grade("layernorm_backward", student, timeout=0.3)
    assert time.monotonic() - t0 < 15
    assert report.score == 0
    assert all(t.reason == "timed out after 0.3 s" for t in report.tests), format_report(report)


def test_hang_at_import_and_a_swallowed_alarm_are_both_stopped(tmp_path):
    student = tmp_path / "ln.py"
    # ignores the alarm, then spins: only the overall limit can stop it
    student.write_text("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                       "while True:\n    pass\n")
    t0 = time.monotonic()
    report = grade("layernorm_backward", student, timeout=0.3, total_timeout=3)
    assert time.monotonic() - t0 < 15
    assert report.score == 0
    assert all(t.reason.startswith("not finished: grading was stopped") for t in report.tests)
    assert any("could not be interrupted" in n for n in report.notes), report.notes
    _assert_no_traceback(report)


def test_printing_megabytes_is_truncated_with_a_note(tmp_path):
    src = reference_solution("layernorm_backward").replace(
        "    return dx, dw, db", "    print('x' * 3_000_000)\n    return dx, dw, db")
    student = tmp_path / "ln.py"
    student.write_text("print('loading ' * 500_000)\n" + src)
    report = grade("layernorm_backward", student, timeout=10, max_output=500)
    assert report.score == report.max_score  # printing is not an error
    assert len(report.student_output) == 500
    assert all(len(t.output) <= 500 and t.output_chars >= 3_000_000 for t in report.tests)
    notes = " ".join(report.notes)
    assert "your code (while loading) printed 4,000,001 characters; only the first 500 are shown" \
        in notes, notes
    assert "test test_shapes printed 3,000,001 characters" in notes, notes
    assert len(format_report(report)) < 20_000


def test_plain_notebook_without_metadata_and_with_magics(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": 1,
                     "source": "%matplotlib inline\n!pip list\nimport numpy as np"},
                    {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": 2,
                     "source": reference_solution("nf4_block")}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    student = tmp_path / "mine.ipynb"
    student.write_text(json.dumps(nb))
    report = grade("nf4_block", student, timeout=10)
    assert report.score == report.max_score, format_report(report)


def test_edited_test_cells_in_a_student_notebook_are_ignored(tmp_path):
    nb = _released("lora_merge")
    wrong = (DATA / "lora_merge" / "wrong_no_guard.py").read_text()
    for c in nb["cells"]:
        meta = c["metadata"].get("nbgrader", {})
        if meta.get("solution"):
            c["source"] = wrong
        elif meta.get("grade"):
            c["source"] = "pass  # the student 'fixed' the test"
    student = tmp_path / "lora_merge.ipynb"
    student.write_text(json.dumps(nb))
    report = grade("lora_merge", student, timeout=10)
    failed = {t.name for t in report.tests if not t.passed}
    assert failed == {"test_double_merge_refused"}, format_report(report)


def test_usage_errors_raise_one_clear_message(tmp_path):
    ref = tmp_path / "ref.py"
    ref.write_text(reference_solution("layernorm_backward"))
    with pytest.raises(GradeError, match="unknown assignment 'layernorm'.*layernorm_backward"):
        grade("layernorm", ref)
    with pytest.raises(GradeError, match="does not exist"):
        grade("layernorm_backward", tmp_path / "missing.py")
    txt = tmp_path / "answer.txt"
    txt.write_text("x")
    with pytest.raises(GradeError, match=r"should be a \.py file or a \.ipynb"):
        grade("layernorm_backward", txt)
    with pytest.raises(GradeError, match="timeout must be a positive"):
        grade("layernorm_backward", ref, timeout=0)
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{not json")
    with pytest.raises(GradeError, match="not a readable notebook"):
        grade("layernorm_backward", broken)


def test_main_exit_codes_and_json(tmp_path, capsys):
    ref = tmp_path / "ref.py"
    ref.write_text(reference_solution("lora_linear"))
    assert main(["lora_linear", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "score: 10/10" in out and "PASS  test_dx_finite_differences" in out
    wrong = DATA / "lora_linear" / "wrong_dx_base_only.py"
    assert main(["lora_linear", str(wrong), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["score"] < data["max_score"] == 10
    # an assignment given as a path to its source notebook works too
    assert main([str(SOURCE_DIR / "lora_linear" / "lora_linear.ipynb"), str(ref)]) == 0
    capsys.readouterr()
    assert main(["no_such_assignment", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora grade: unknown assignment") and err.count("\n") == 1


def test_python_dash_m_entry_point(tmp_path):
    ref = tmp_path / "ref.py"
    ref.write_text(reference_solution("lora_merge"))
    proc = subprocess.run([sys.executable, "-m", "minilora.course", "lora_merge", str(ref)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "score: 10/10" in proc.stdout


def test_checks_messages():
    with pytest.raises(AssertionError, match=r"^dx should be a NumPy array of numbers, got None$"):
        checks.expect_close("dx", None, np.zeros(3), 1e-6, "x")
    with pytest.raises(AssertionError, match=r"^dx has shape \(2,\), expected \(3,\)$"):
        checks.expect_close("dx", np.zeros(2), np.zeros(3), 1e-6, "x")
    with pytest.raises(AssertionError, match=r"dx differs from finite differences: rel error "
                                             r"5\.0e-01 \(allowed 1e-06\)"):
        checks.expect_close("dx", np.array([1.0, 1.0]), np.array([1.0, 2.0]), 1e-6,
                            "finite differences")
    with pytest.raises(AssertionError, match="holds 1 NaN"):
        checks.expect_array("y", np.array([1.0, np.nan]))
    with pytest.raises(AssertionError, match=r"at 1 of 3 position\(s\); first at flat index 2: "
                                             r"got 5, expected 4"):
        checks.expect_equal("q", np.array([1, 2, 5]), np.array([1, 2, 4]), "the library")
    with pytest.raises(AssertionError, match="should raise ValueError, but returned normally"):
        checks.expect_raises(ValueError, lambda: None, "merge()")
    with pytest.raises(AssertionError, match="should raise ValueError, but raised KeyError"):
        checks.expect_raises(ValueError, lambda: {}["k"], "merge()")
    assert checks.expect_raises(ValueError, lambda: int("x"), "int('x')") is None


# ----------------------------------------------------------------------------------------------
# nbgrader itself on a temporary course
# ----------------------------------------------------------------------------------------------
def _fill(nb, code):
    nb = json.loads(json.dumps(nb))
    for c in nb["cells"]:
        if c["metadata"].get("nbgrader", {}).get("solution"):
            c["source"] = code
    return nb


@pytest.mark.slow
def test_nbgrader_generate_and_autograde_agree_with_the_grader(tmp_path):
    pytest.importorskip("nbgrader")
    # nbgrader is optional (the homework extra), so it is imported only here
    from nbgrader.api import Gradebook

    nbgrader = [sys.executable, "-m", "nbgrader"]
    course = tmp_path / "course"
    shutil.copytree(SOURCE_DIR, course / "source")
    shutil.copy(SOURCE_DIR.parent / "nbgrader_config.py", course / "nbgrader_config.py")
    students = {}
    for name in ASSIGNMENTS:
        proc = subprocess.run(nbgrader + ["generate_assignment", name, "--force"], cwd=course,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        released = json.loads((course / "release" / name / f"{name}.ipynb").read_text())
        text = json.dumps(released)
        assert "raise NotImplementedError()" in text and "BEGIN SOLUTION" not in text
        wrong = min((DATA / name).glob("wrong_*.py"))
        for student, code in [("good", reference_solution(name)), ("bad", wrong.read_text())]:
            sub = course / "submitted" / student / name / f"{name}.ipynb"
            sub.parent.mkdir(parents=True)
            sub.write_text(json.dumps(_fill(released, code)))
            students[(name, student)] = sub
    for name in ASSIGNMENTS:
        proc = subprocess.run(nbgrader + ["autograde", name, "--create"], cwd=course,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "cannot be converted to" not in proc.stderr  # no test cell leaves a value
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for (name, student), sub in students.items():
            graded = gb.find_submission(name, student)
            ours = grade(name, sub, timeout=20)
            if student == "good":
                assert graded.score == graded.max_score == ours.max_score
            else:
                assert graded.score == ours.score < graded.max_score
            nb_scores = {g.name: g.score for nb in graded.notebooks for g in nb.grades}
            for t in ours.tests:
                assert nb_scores[t.name] == t.points, (name, student, t.name)
