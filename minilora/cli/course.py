"""``minilora grade``: grade a homework answer without nbgrader (:mod:`minilora.course.grade`)."""
from __future__ import annotations

import json

from minilora.cli.common import _formatter
from minilora.course.grade import build_parser as add_grade_arguments
from minilora.course.grade import format_report, grade


def cmd_grade(args):
    # an assignment or file that cannot be graded is a GradeError: one line, exit 2 (cli.main)
    report = grade(args.assignment, args.student_file, timeout=args.timeout)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    if report.score != report.max_score:
        raise SystemExit(1)  # some test failed: the report above says which and why


def add_parsers(sub):
    """Add this group's subcommands to the ``minilora`` parser."""
    s = sub.add_parser(
        "grade", formatter_class=_formatter,
        help="grade a homework answer (.py or .ipynb): per-test feedback and a score",
        description="Run a homework assignment's tests (chapters/homework) against your code in "
                    "a subprocess with time limits; exit 0 for full marks, 1 if a test failed.",
        epilog="examples:\n  minilora grade layernorm_backward my_answer.ipynb\n"
               "  minilora grade lora_linear answer.py --timeout 20 --json")
    add_grade_arguments(s)  # ASSIGNMENT FILE [--timeout S] [--json]
    s.set_defaults(func=cmd_grade)
