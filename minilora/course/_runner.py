"""The child process of :func:`minilora.course.grade.grade`: runs one student's code and the tests.

Run as ``python -m minilora.course._runner SPEC.json``. The spec lists steps in order, each
``{"kind": "setup" | "student" | "test", "label": ..., "source": ...}``, plus ``timeout`` (seconds
per step) and ``max_output`` (characters of printed output kept per step). For each step one JSON
line is appended to ``SPEC.results.jsonl`` and flushed at once, so if this process is killed (a
hang the per-step alarm cannot break) the parent still knows which steps finished.

Each step runs under ``signal.setitimer`` (a Python-level hang is stopped after ``timeout``
seconds), with ``sys.stdout`` / ``sys.stderr`` replaced by a writer that keeps the first
``max_output`` characters and counts the rest. A failure is turned into one line (the assertion
message, or ``TypeError: ... (your code, line 12)``), never a traceback. Standard library only,
so a broken install of anything else is reported, not crashed on.
"""
from __future__ import annotations

import json
import linecache
import signal
import sys
import traceback
import types
import warnings

MAX_REASON = 300  # characters of one feedback line


class StepTimeout(BaseException):
    """Raised by the alarm; a BaseException so a student's ``except Exception`` cannot eat it."""


class CappedWriter:
    """A text stream that keeps the first ``limit`` characters and counts everything."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.total = 0

    def write(self, s) -> int:
        s = str(s)
        self.total += len(s)
        if self.kept < self.limit:
            piece = s[: self.limit - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def text(self) -> str:
        return "".join(self.parts)


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


def _where(tb, student_labels: set[str], step_label: str) -> str:
    """' (FILE, line N: CODE)' for the deepest traceback frame in the student's code, else for
    the deepest one in the step itself (the test cell: '(in the test, line N: CODE)'), else ''."""
    frames = traceback.extract_tb(tb)
    mine = [f for f in frames if f.filename in student_labels]
    own = [f for f in frames if f.filename == step_label]
    if mine:
        frame, name = mine[-1], mine[-1].filename
    elif own:
        frame, name = own[-1], "in the test" if step_label not in student_labels else step_label
    else:
        return ""
    return f" ({name}, line {frame.lineno}" + (f": {frame.line.strip()})" if frame.line else ")")


def explain(exc: BaseException, timeout: float, student_labels: set[str],
            step_label: str = "") -> str:
    """One line saying why a step failed."""
    if isinstance(exc, StepTimeout):
        return f"timed out after {timeout:g} s"
    where = _where(exc.__traceback__, student_labels, step_label)
    if isinstance(exc, NotImplementedError):
        return _one_line("not implemented yet (NotImplementedError raised" + (
            f" in {where[2:]}" if where else ")"))
    if isinstance(exc, AssertionError):
        msg = str(exc).strip()
        if msg:
            return _one_line(msg)
        frames = traceback.extract_tb(exc.__traceback__)
        line = frames[-1].line if frames else ""
        return _one_line(f"assertion failed: {line}" if line else "assertion failed")
    if isinstance(exc, SystemExit):
        return _one_line(f"the code called sys.exit({exc.code!r}){where}")
    if isinstance(exc, MemoryError):
        return _one_line(f"ran out of memory{where}")
    if isinstance(exc, SyntaxError):
        text = f" `{exc.text.strip()}`" if exc.text else ""
        return _one_line(f"syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}{text}")
    return _one_line(f"{type(exc).__name__}: {exc}{where}")


def _alarm(signum, frame):
    raise StepTimeout()


def run(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    timeout, max_output = float(spec["timeout"]), int(spec["max_output"])
    student_labels = {s["label"] for s in spec["steps"] if s["kind"] == "student"}
    module = types.ModuleType("homework")  # a real module, so dataclasses etc. work in it
    sys.modules["homework"] = module
    ns = module.__dict__
    # per-step alarms need SIGALRM (POSIX); elsewhere only the parent's overall limit applies
    alarm = hasattr(signal, "setitimer")
    if alarm:
        signal.signal(signal.SIGALRM, _alarm)
    real_out, real_err = sys.stdout, sys.stderr
    for step in spec["steps"]:  # let tracebacks quote the lines of code run from strings
        text = step["source"]
        linecache.cache[step["label"]] = (len(text), None, text.splitlines(True), step["label"])
    with open(spec_path + ".results.jsonl", "a", encoding="utf-8") as results:
        for step in spec["steps"]:
            writer = CappedWriter(max_output)
            ok, reason = True, ""
            sys.stdout = sys.stderr = writer
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # tests that expect a warning record their own
                    if alarm:
                        signal.setitimer(signal.ITIMER_REAL, timeout)
                    try:
                        code = compile(step["source"], step["label"], "exec")
                        exec(code, ns)  # noqa: S102 - running the student's code is the job
                    finally:
                        if alarm:
                            signal.setitimer(signal.ITIMER_REAL, 0)
            except BaseException as e:  # noqa: BLE001 - every failure becomes one feedback line
                ok, reason = False, explain(e, timeout, student_labels, step["label"])
            finally:
                sys.stdout, sys.stderr = real_out, real_err
            results.write(json.dumps({"kind": step["kind"], "label": step["label"], "ok": ok,
                                      "reason": reason, "output": writer.text(),
                                      "output_chars": writer.total}) + "\n")
            results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
