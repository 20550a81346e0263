"""Homework: the nbgrader source notebooks, the planted wrong answers, and the grader's limits.

* every assignment is a valid nbgrader source (metadata, markers, points) and its reference
  solution scores full marks with ``minilora.course.grade``;
* the homework measures the student: a wrapper of minilora's own implementation
  (``tests/data/homework/<assignment>/wrapper_library.py``) scores zero on every test, although it
  would pass them all but for the NumPy-only rule; no setup or visible test cell imports a
  reference implementation (expected values are numbers in the cells, and the hidden tests,
  which the student version lacks, check other inputs); the reference solution agrees with
  minilora's implementation, so the numbers are right;
* every planted wrong answer (``tests/data/homework/<assignment>/wrong_*.py``) scores less, and
  the tests its header names fail with the message it names (``# expect-fail: TEST: TEXT``);
* a student file that does not parse, raises at import, hangs or prints megabytes gets a clear
  report and never a traceback;
* ``nbgrader generate_assignment`` + ``nbgrader autograde`` on a temporary course give the
  same pass/fail per test as the grader (slow; needs nbgrader).
"""
import ast
import json
import os
import re
import warnings
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
WRAPPERS = sorted(DATA.glob("*/wrapper_library.py"))
EXPECT = re.compile(r"^# expect-(fail|pass): (\w+)(?:: (.*))?$")


def _notebook(name):
    return json.loads((SOURCE_DIR / name / f"{name}.ipynb").read_text(encoding="utf-8"))


def _released(name):
    """The notebook as nbgrader releases it: each solution region -> raise NotImplementedError,
    each hidden-test region removed."""
    nb = _notebook(name)
    pattern = re.compile(r"( *)### BEGIN SOLUTION\n.*?### END SOLUTION\n?", re.DOTALL)
    hidden = re.compile(r"### BEGIN HIDDEN TESTS\n.*?### END HIDDEN TESTS\n?", re.DOTALL)
    for c in nb["cells"]:
        meta = c["metadata"].get("nbgrader", {})
        if meta.get("solution"):
            c["source"] = pattern.sub(r"\1# YOUR CODE HERE\n\1raise NotImplementedError()\n",
                                      "".join(c["source"]))
        elif meta.get("grade"):
            c["source"] = hidden.sub("", "".join(c["source"]))
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


def test_every_assignment_has_two_planted_wrong_answers_and_a_library_wrapper():
    for name in ASSIGNMENTS:
        assert len(list((DATA / name).glob("wrong_*.py"))) >= 2, name
        assert (DATA / name / "wrapper_library.py").is_file(), name


# ----------------------------------------------------------------------------------------------
# the homework measures the student
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", WRAPPERS, ids=lambda p: p.parent.name)
def test_a_wrapper_of_the_library_scores_zero_on_every_test(path):
    report = grade(path.parent.name, path, timeout=20)
    assert report.max_score > 0 and report.score == 0, format_report(report)
    for t in report.tests:
        assert "may use NumPy only" in t.reason and " used minilora." in t.reason, t.reason
    _assert_no_traceback(report)


def _cells(name, kind):
    return [c["source"] for c in read_assignment(name) if c["kind"] == kind]


@pytest.mark.parametrize("path", WRAPPERS, ids=lambda p: p.parent.name)
def test_the_wrappers_are_right_answers_but_for_the_numpy_rule(path):
    """In this process, with ``numpy_only`` made a no-op, every test of the assignment passes
    with the wrapper: its zero above comes from the NumPy-only rule, not from a wrong wrapper."""
    name = path.parent.name
    ns = {"__name__": "wrapper_check"}
    for src in _cells(name, "setup"):
        exec(compile(src, f"{name} setup", "exec"), ns)  # noqa: S102 - the assignment's own cell
    ns["numpy_only"] = lambda student: student
    exec(compile(path.read_text(), str(path), "exec"), ns)  # noqa: S102
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, src in enumerate(_cells(name, "test")):
            exec(compile(src, f"{name} test {i}", "exec"), ns)  # noqa: S102 - raises if it fails


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_no_cell_a_student_sees_reaches_a_reference_implementation(name):
    """The setup cells and the visible part of the test cells import NumPy, the standard library
    and the checks only: no answer is one import away."""
    from minilora.course.assignments import student_notebook
    allowed = ("numpy", "warnings", "math", "minilora.course.checks")
    for cell in student_notebook(name)["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module]
            else:
                continue
            assert all(m in allowed for m in mods), f"{name}: a student cell imports {mods}"


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_the_graded_copy_has_hidden_tests_that_the_student_version_lacks(name):
    from minilora.course.assignments import student_notebook
    tests = _cells(name, "test")
    assert sum("### BEGIN HIDDEN TESTS" in src for src in tests) >= 1, name
    released = json.dumps(student_notebook(name))
    assert "HIDDEN TESTS" not in released and "hidden test:" not in released


def _reference(name):
    """The namespace of the assignment's setup cells and reference solution."""
    ns = {"__name__": "reference_check"}
    for src in _cells(name, "setup") + [reference_solution(name)]:
        exec(compile(src, f"{name} reference", "exec"), ns)  # noqa: S102 - the assignment's code
    return ns


def test_the_reference_solutions_agree_with_the_library():
    """The expected values in the test cells are the reference solution's (it scores full marks);
    here the reference solution is checked against minilora's own implementations."""
    from minilora.analysis import intruders_from_weights, subspace_similarity
    from minilora.methods.lora import LoRALinear
    from minilora.nn import ops
    from minilora.nn.layers import Linear
    from minilora.quant import NF4_CODE, pack_nibbles, quantize_blockwise

    rng = np.random.default_rng(0)
    ref = _reference("layernorm_backward")
    x, dout, w = rng.standard_normal((3, 4, 7)), rng.standard_normal((3, 4, 7)), rng.standard_normal(7)
    _, cache = ops.layernorm_forward(x, w, np.zeros(7), eps=0.2)
    for got, want in zip(ref["layernorm_backward"](dout, x, w, 0.2), ops.layernorm_backward(dout, cache)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

    ref = _reference("lora_linear")
    x, dout = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 5))
    W0, b, A, B = (rng.standard_normal(s) for s in ((5, 6), (5,), (3, 6), (5, 3)))
    layer = LoRALinear(Linear(W0.copy(), b.copy()), r=3, lora_alpha=6.0, init_lora_weights=False)
    layer.params["lora_A"], layer.params["lora_B"] = A.copy(), B.copy()
    y, c = layer.forward(x)
    np.testing.assert_allclose(ref["lora_forward"](x, W0, b, A, B, 2.0), y, rtol=1e-12)
    dx, dA, dB = ref["lora_backward"](dout, x, W0, A, B, 2.0)
    np.testing.assert_allclose(dx, layer.backward(dout, c), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dA, layer.grads["lora_A"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dB, layer.grads["lora_B"], rtol=1e-10, atol=1e-12)
    merge = _reference("lora_merge")["MergeableLoRA"](W0, b, A, B, 2.0)
    np.testing.assert_allclose(merge.delta_weight(), layer.delta_weight(), rtol=1e-12)

    ref = _reference("nf4_block")
    code = np.asarray(NF4_CODE, dtype=np.float32)
    assert ref["code"].dtype == np.float32 and np.array_equal(ref["code"], code)
    x = (rng.standard_normal(64) * 0.3).astype(np.float32)
    q, absmax = ref["quantize_block"](x, code)
    q_lib, absmax_lib = quantize_blockwise(x, code, 64)
    assert np.array_equal(q, q_lib) and absmax == float(absmax_lib[0])
    assert np.array_equal(ref["pack_codes"](q), pack_nibbles(q_lib))

    ref = _reference("subspace_similarity")
    A1, A2 = rng.standard_normal((4, 10)), rng.standard_normal((6, 10))
    U1, U2 = (np.linalg.svd(a, full_matrices=False)[2].T for a in (A1, A2))
    assert abs(ref["phi"](A1, A2, 3, 5) - subspace_similarity(U1, U2, 3, 5)) < 1e-12
    W0 = rng.standard_normal((20, 12))
    Wt = W0 + 3 * np.outer(rng.standard_normal(20), rng.standard_normal(12))
    assert ref["count_intruders"](W0, Wt, k=6, eps=0.6) == \
        intruders_from_weights(W0, Wt, k=6, eps=0.6).count


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


def test_numpy_only_refuses_minilora_and_other_packages_and_lets_numpy_through():
    from minilora.nn import ops

    def mine(x):
        import fractions  # noqa: F401 - a standard-library import inside is fine
        return np.linalg.svd(x)[1].sum() + len([1, 2])

    def wraps(x):
        return ops.gelu_forward(x)[0]

    def uses_scipy(x):
        import scipy.linalg
        return scipy.linalg.svd(x)

    def raises(x):
        raise ValueError("my own error")

    assert checks.numpy_only(mine)(np.eye(3)) == 3.0 + 2
    with pytest.raises(AssertionError, match=r"^wraps used minilora\.nn\.ops\.gelu_forward: the "
                                             r"graded functions may use NumPy only"):
        checks.numpy_only(wraps)(np.eye(2))
    with pytest.raises(AssertionError, match=r"^uses_scipy used scipy"):
        checks.numpy_only(uses_scipy)(np.eye(2))
    with pytest.raises(ValueError, match="my own error"):      # the student's errors pass through
        checks.numpy_only(raises)(1)

    class Layer:
        def __init__(self, w):
            self.w = w

        def forward(self, x):
            return x @ self.helper()

        def helper(self):                                   # a guarded method calling another
            return self.w.T

        def cheat(self, x):
            return ops.gelu_forward(x)[0]

    guarded = checks.numpy_only(Layer)(np.eye(2))
    assert type(guarded).__name__ == "Layer" and isinstance(guarded, Layer)
    assert np.array_equal(guarded.forward(np.ones((1, 2))), np.ones((1, 2)))
    with pytest.raises(AssertionError, match=r"^Layer\.cheat used minilora\.nn\.ops"):
        guarded.cheat(np.eye(2))
    assert sys.getprofile() is None                         # the hook is always removed


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
    # nbgrader runs `alembic` from PATH: the interpreter's own bin first, activated or not
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                 os.environ.get("PATH", "")]))
    course = tmp_path / "course"
    shutil.copytree(SOURCE_DIR, course / "source")
    shutil.copy(SOURCE_DIR.parent / "nbgrader_config.py", course / "nbgrader_config.py")
    students = {}
    for name in ASSIGNMENTS:
        proc = subprocess.run(nbgrader + ["generate_assignment", name, "--force"], cwd=course,
                              env=env, capture_output=True, text=True, timeout=300, check=False)
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
                              env=env, capture_output=True, text=True, timeout=300, check=False)
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
