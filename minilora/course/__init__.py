"""Course homework: graders for the nbgrader assignments in ``chapters/homework/``.

This is the experiments floor: it uses the library, and nothing in the library imports it.

* :mod:`minilora.course.grade`  - ``grade(assignment, student_file)`` runs an assignment's test
  cells against a student's ``.py`` or ``.ipynb`` in a subprocess with time limits and returns a
  :class:`Report` (per-test feedback and a score); ``minilora grade`` on the command line.
* :mod:`minilora.course.checks` - the checks the test cells call, each failing with one sentence
  (``dx differs from finite differences: rel error 3.2e-01 (allowed 1e-06)``).
"""
from minilora.course.assignments import GradeError, assignment_names, reference_solution
from minilora.course.grade import Report, TestResult, format_report, grade, main

__all__ = ["GradeError", "Report", "TestResult", "assignment_names", "format_report", "grade",
           "main", "reference_solution"]
