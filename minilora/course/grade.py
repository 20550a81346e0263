"""Grade a homework assignment without nbgrader: per-test feedback and a score.

An assignment is an nbgrader source notebook, ``chapters/homework/source/<name>/<name>.ipynb``.
Its cells carry nbgrader's metadata: locked *setup* cells (imports, helpers), *solution* cells
(the student's part, between ``### BEGIN SOLUTION`` / ``### END SOLUTION``) and autograded *test*
cells (``grade: true``, a ``grade_id`` and ``points``). The notebook is the single source of the
tests: nbgrader and this grader run the same cells.

``grade(assignment, student_file)`` runs, in a fresh Python process with a time limit per step:

1. the setup cells, in the notebook's order;
2. the student's code in place of the solution cells: a ``.py`` file as a whole, or the code cells
   of a filled-in ``.ipynb`` (its test and setup cells are replaced by the assignment's own, so
   editing a test changes nothing; IPython magics are dropped);
3. each test cell on its own: it passes if it raises nothing, and scores its points.

A failure becomes one line (the test's assertion message, e.g. ``dx differs from finite
differences: rel error 3.2e-01 (allowed 1e-06)``, or ``NameError: ... (your code, line 12)``),
never a traceback. A step that runs longer than ``timeout`` seconds is stopped ("timed out after
N s"); printed output is kept up to ``max_output`` characters per step, with a note saying how
much was cut. The whole run is also bounded, so code that hangs where the alarm cannot reach
(inside a C call) is killed and the unfinished tests are reported as timed out.

This is a grader, not a sandbox: the student's code runs with the caller's permissions and in
the process that runs the tests, so it is no guard against deliberate cheating (nor is nbgrader).

    report = grade("layernorm_backward", "my_layernorm.py", timeout=10)
    print(format_report(report))            # one line per test, then "score: 8/8"
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minilora.course.assignments import (
    GradeError,
    assignment_names,
    cell_kind,
    cell_source,
    find_assignment,
    nbgrader_meta,
    read_assignment,
    read_notebook,
    strip_magics,
)

#: The directory that holds the ``minilora`` package (put on the child's PYTHONPATH).
PACKAGE_PARENT = Path(__file__).resolve().parents[2]

DEFAULT_TIMEOUT = 10.0  # seconds per step (setup cell, student code, one test)
DEFAULT_MAX_OUTPUT = 2000  # characters of printed output kept per step
STARTUP_ALLOWANCE = 30.0  # seconds for the child to start (imports numpy, scipy, minilora)




# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
@dataclass
class TestResult:
    """One autograded test: its nbgrader ``grade_id``, points and a one-line reason if failed."""

    name: str
    max_points: float
    passed: bool
    reason: str = ""  # empty when passed
    output: str = ""  # what the test printed (the first max_output characters)
    output_chars: int = 0  # how many characters it printed in all

    @property
    def points(self) -> float:
        return self.max_points if self.passed else 0.0


@dataclass
class Report:
    """What :func:`grade` found: the tests in notebook order and notes on the student's code."""

    assignment: str
    student_file: str
    tests: list[TestResult]
    notes: list[str] = field(default_factory=list)  # load errors, timeouts, truncated output
    student_output: str = ""  # what the student's code printed while loading

    @property
    def score(self) -> float:
        return sum(t.points for t in self.tests)

    @property
    def max_score(self) -> float:
        return sum(t.max_points for t in self.tests)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"], d["max_score"] = self.score, self.max_score
        return d



# ----------------------------------------------------------------------------------------------
# the steps the child runs
# ----------------------------------------------------------------------------------------------
def _steps(cells: list[dict], student_path: Path) -> list[dict]:
    """Setup, student and test steps, in the order a notebook would run them."""
    setup_ids = {c["grade_id"] for c in cells if c["kind"] == "setup"}
    test_ids = {c["grade_id"] for c in cells if c["kind"] == "test"}
    by_id = {c["grade_id"]: c for c in cells}

    def step(kind, label, source):
        return {"kind": kind, "label": label, "source": source}

    def own(c):  # the assignment's own version of a setup or test cell
        return step(c["kind"], c["grade_id"], c["source"])

    if student_path.suffix == ".ipynb":
        nb = read_notebook(student_path, "student notebook")
        student_cells = [c for c in nb["cells"] if c.get("cell_type") == "code"]
        ids = [str(nbgrader_meta(c).get("grade_id", "")) for c in student_cells]
        if any(i in setup_ids or i in test_ids for i in ids):
            # a filled-in copy of the released notebook: keep its order, use our setup and tests
            steps, seen = [], set()
            for n, (c, gid) in enumerate(zip(student_cells, ids), start=1):
                if gid in setup_ids or gid in test_ids:
                    if gid not in seen:
                        steps.append(own(by_id[gid]))
                        seen.add(gid)
                elif cell_kind(c) in ("solution", "setup"):  # the student's answer or own cells
                    steps.append(step("student", f"{student_path.name}, code cell {n}",
                                      strip_magics(cell_source(c))))
            missing_setup = [own(c) for c in cells if c["kind"] == "setup" and c["grade_id"]
                             not in seen]
            missing_tests = [own(c) for c in cells if c["kind"] == "test" and c["grade_id"]
                             not in seen]
            return missing_setup + steps + missing_tests
        # a notebook without nbgrader's metadata: all of its code is the student's answer
        student = [step("student", f"{student_path.name}, code cell {n}",
                        strip_magics(cell_source(c)))
                   for n, c in enumerate(student_cells, start=1) if cell_kind(c) != "test"]
    else:
        try:
            text = student_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GradeError(f"cannot read the student file {str(student_path)!r}: {e}") from None
        student = [step("student", student_path.name, text)]
    steps, placed = [], False
    for c in cells:
        if c["kind"] == "solution":
            if not placed:
                steps += student
                placed = True
        else:
            steps.append(own(c))
    return steps


# ----------------------------------------------------------------------------------------------
# grading
# ----------------------------------------------------------------------------------------------
def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_PARENT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")  # small arrays: threads only cost start-up time
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _truncation_note(what: str, shown: int, total: int) -> str:
    return (f"{what} printed {total:,} characters; only the first {shown:,} are shown")


def grade(assignment, student_file, timeout: float = DEFAULT_TIMEOUT,
          max_output: int = DEFAULT_MAX_OUTPUT, total_timeout: float | None = None) -> Report:
    """Run an assignment's tests against a student's code, in a subprocess.

    Args:
        assignment: a name (``"layernorm_backward"``, see :func:`assignment_names`) or the path
            of an nbgrader source notebook.
        student_file: the student's ``.py`` file, or their filled-in ``.ipynb``.
        timeout: seconds allowed for each step (loading the student's code, each test).
        max_output: characters of printed output kept per step.
        total_timeout: seconds for the whole run, after which the process is killed (a hang the
            per-step alarm cannot break); default ``timeout * (number of steps) + 30``.
    Returns:
        a :class:`Report`; a failing, raising, hanging or printing student never raises here.
    Raises:
        GradeError: unknown assignment, missing or unreadable student file, bad limits.
    """
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise GradeError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(max_output, int) and max_output >= 0):
        raise GradeError(f"max_output must be a non-negative integer, got {max_output!r}")
    student_path = Path(student_file)
    if not student_path.is_file():
        raise GradeError(f"student file {str(student_file)!r} does not exist")
    if student_path.suffix not in (".py", ".ipynb"):
        raise GradeError(f"student file {str(student_file)!r} should be a .py file or a "
                         f".ipynb notebook, not {student_path.suffix or 'a file without suffix'}")
    cells = read_assignment(assignment)
    name = find_assignment(assignment).stem
    steps = _steps(cells, student_path)
    if total_timeout is not None and not (isinstance(total_timeout, (int, float))
                                          and total_timeout > 0):
        raise GradeError(f"total_timeout must be a positive number of seconds, got "
                         f"{total_timeout!r}")
    budget = timeout * len(steps) + STARTUP_ALLOWANCE if total_timeout is None else total_timeout
    with tempfile.TemporaryDirectory(prefix="minilora-grade-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({"steps": steps, "timeout": timeout,
                                         "max_output": max_output}), encoding="utf-8")
        log_path = Path(tmp) / "child.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "minilora.course._runner",
                                     str(spec_path)], cwd=tmp, env=_child_env(),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
                killed = False
            except subprocess.TimeoutExpired:
                if hasattr(os, "killpg"):  # the child and anything the student started
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                proc.wait()
                rc, killed = None, True
        elapsed = time.monotonic() - started
        results_path = Path(str(spec_path) + ".results.jsonl")
        lines = results_path.read_text(encoding="utf-8").splitlines() if \
            results_path.is_file() else []
        with open(log_path, "rb") as f:
            child_log = f.read(max_output + 1).decode("utf-8", "replace")
    done = [json.loads(ln) for ln in lines if ln.strip()]
    points = {c["grade_id"]: c["points"] for c in cells if c["kind"] == "test"}
    return _report(name, str(student_file), steps, points, done, killed, rc, elapsed, timeout,
                   max_output, child_log)


def _report(name, student_file, steps, points, done, killed, rc, elapsed, timeout, max_output,
            child_log) -> Report:
    """Turn the child's per-step records (``done``, in step order) into a :class:`Report`."""
    report = Report(assignment=name, student_file=student_file, tests=[])
    student_out, student_chars = [], 0
    for i, s in enumerate(steps):
        r = done[i] if i < len(done) else None
        if r is None:
            why = (f"not finished: grading was stopped after {elapsed:.0f} s (something hung "
                   f"where the {timeout:g} s alarm could not stop it)" if killed else
                   f"not run: the grading process ended unexpectedly (exit code {rc})")
            if s["kind"] == "test":
                report.tests.append(TestResult(s["label"], points.get(s["label"], 0.0), False,
                                               why))
            continue
        if s["kind"] == "test":
            report.tests.append(TestResult(s["label"], points.get(s["label"], 0.0), r["ok"],
                                           r["reason"], r["output"], r["output_chars"]))
            if r["output_chars"] > len(r["output"]):
                report.notes.append(_truncation_note(f"test {s['label']}", len(r["output"]),
                                                     r["output_chars"]))
        elif s["kind"] == "student":
            student_out.append(r["output"])
            student_chars += r["output_chars"]
            if not r["ok"]:
                report.notes.append(f"your code did not load cleanly: {r['reason']}. The tests "
                                    "ran with whatever was defined before that point")
        elif not r["ok"]:
            report.notes.append(f"the assignment's setup cell {s['label']} failed: {r['reason']} "
                                "(a problem with the installation, not with your code)")
    report.student_output = "".join(student_out)[:max_output]
    if student_chars > len(report.student_output):
        report.notes.append(_truncation_note("your code (while loading)",
                                             len(report.student_output), student_chars))
    if rc not in (0, None) and len(done) < len(steps):
        first = child_log.strip().splitlines()[-1:] if child_log.strip() else []
        report.notes.append(f"the grading process ended with exit code {rc} after "
                            f"{len(done)} of {len(steps)} steps"
                            + (f": {first[0][:200]}" if first else ""))
    if killed:
        report.notes.append(f"grading was stopped after {elapsed:.0f} s: a step ran past its "
                            f"{timeout:g} s limit and could not be interrupted")
    return report


def format_report(report: Report) -> str:
    """A plain-text report: one line per test (PASS/FAIL, points, reason), notes, the score."""
    lines = [f"assignment {report.assignment}, file {report.student_file}", ""]
    w = max((len(t.name) for t in report.tests), default=4)
    for t in report.tests:
        mark = "PASS" if t.passed else "FAIL"
        lines.append(f"  {mark}  {t.name:<{w}}  {t.points:g}/{t.max_points:g}"
                     + (f"  {t.reason}" if t.reason else ""))
        if t.output.strip():
            shown = t.output.rstrip("\n").splitlines()[:20]
            lines += [f"        | {ln[:200]}" for ln in shown]
            if t.output_chars > len(t.output) or len(t.output.splitlines()) > 20:
                lines.append("        | ... (output truncated)")
    if report.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in report.notes]
    lines += ["", f"score: {report.score:g}/{report.max_score:g}"]
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``grade`` command's arguments (on ``parser`` if given, e.g. a CLI subparser)."""
    p = parser or argparse.ArgumentParser(
        prog="minilora grade", description="Grade a homework answer without nbgrader: runs the "
        "assignment's tests against your code and prints per-test feedback and a score.")
    p.add_argument("assignment", help="assignment name (" + ", ".join(assignment_names())
                   + ") or the path of an nbgrader source notebook")
    p.add_argument("student_file", help="your answer: a .py file defining the functions, or "
                   "the filled-in .ipynb")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds allowed per test (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Grade as the parsed arguments say; print the report. Exit status: 0 full marks, 1 some
    test failed, 2 the assignment or file could not be graded."""
    try:
        report = grade(args.assignment, args.student_file, timeout=args.timeout)
    except GradeError as e:
        print(f"minilora grade: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.score == report.max_score else 1


def main(argv=None) -> int:
    """``minilora grade ASSIGNMENT FILE [--timeout S] [--json]``."""
    return run_cli(build_parser().parse_args(argv))
