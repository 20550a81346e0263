"""What every command shares: the parser and its help formatter, the backend flag, loading a
checkpoint, and the checks every flag goes through before any work starts.

Errors: a user mistake raises a :class:`minilora.errors.MiniloraError` (here :class:`UsageError`
for a bad flag, naming it); :func:`minilora.cli.main` prints it as one line and exits 2.

Flags with a range use the ``type=`` functions below (:func:`int_range`, :func:`float_range`,
:func:`int_list`): argparse calls them while parsing, so ``--eval-examples -5`` is refused before
anything is loaded, with ``minilora: error: --eval-examples must be >= 1 (got -5)``; the help
formatter adds the range to the flag's ``--help`` line.

Outputs: every path a command writes goes through :func:`output` at the start of the command
(the policy of :mod:`minilora.experiments.paths`: a fresh ``runs/<command>/<name>`` by default,
an existing output refused unless ``--overwrite`` / ``--resume``, a lock naming the writer, the
path checked writable before any work). :func:`minilora.cli.main` closes the outputs when the
command ends, removing what a refused or failed command created.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from minilora import backend
from minilora.adapters import AdapterRegistry
from minilora.checkpoint import load_checkpoint
from minilora.errors import UsageError
from minilora.experiments.paths import Output, base_model_path
from minilora.io import CheckpointError


class MiniloraParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``minilora: error: --flag ...``, exit 2.

    argparse reports a refused value as ``argument --top-k: must be >= 1 (got 0)``; this becomes
    ``--top-k must be >= 1 (got 0)`` (the other argparse messages keep their wording after the
    flag). No usage block: the one line says what was wrong, ``--help`` says what is allowed.
    """

    def error(self, message):
        if message.startswith("argument ") and ": " in message:
            flag, _, rest = message[len("argument "):].partition(": ")
            flag = flag.split("/")[-1]  # "-o/--out" -> "--out"
            message = f"{flag} {rest}" if rest.startswith("must ") else f"{flag}: {rest}"
        sys.stderr.write(f"minilora: error: {message}\n")
        raise SystemExit(2)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends a flag's allowed range (from its ``type=``
    function's ``range`` attribute) and its default to its help line."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action):
        text = action.help or ""
        allowed = getattr(action.type, "range", None)
        if allowed and allowed not in text:
            text = f"{text} [{allowed}]" if text else f"[{allowed}]"
        d = action.default
        if (d is not None and d is not False and d is not argparse.SUPPRESS
                and action.option_strings and "default" not in text
                and not isinstance(d, list)):
            text += f" (default: {action.default})"
        return text


def _formatter(prog):
    return _Formatter(prog)


# ----------------------------------------------------------------------------------------------
# flag types: argparse calls them on the string; they raise ArgumentTypeError("must be ...")
# ----------------------------------------------------------------------------------------------
def _bounds_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def int_range(lo: int | None = None, hi: int | None = None):
    """An argparse ``type=``: an integer with ``lo <= value <= hi`` (None: no bound)."""
    allowed = "an integer " + _bounds_text(lo, hi) if (lo, hi) != (None, None) else "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed} (got {text!r})") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(lo, hi)} (got {value})")
        return value
    parse.range = _bounds_text(lo, hi) if (lo, hi) != (None, None) else "integer"
    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False):
    """An argparse ``type=``: a finite float in the given range (``lo_open``: ``value > lo``).
    ``inf`` and ``nan`` are always refused: no flag of minilora means anything with them."""
    bounds = _bounds_text(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bounds} (got {text!r})") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds} (got {text})")
        if ((lo is not None and (value <= lo if lo_open else value < lo))
                or (hi is not None and (value >= hi if hi_open else value > hi))):
            raise argparse.ArgumentTypeError(f"must be {bounds} (got {text})")
        return value
    parse.range = bounds
    parse.__name__ = "number"
    return parse


def int_list(lo: int | None = None, allow_empty: bool = False):
    """An argparse ``type=``: comma-separated integers, each ``>= lo``; returns a list."""
    each = int_range(lo)

    def parse(text: str) -> list[int]:
        parts = [s.strip() for s in text.split(",") if s.strip()]
        if not parts and not allow_empty:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers "
                                             f"{_bounds_text(lo, None)} (got {text!r})")
        try:
            return [each(s) for s in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers "
                                             f"{_bounds_text(lo, None)} (got {text!r})") from None
    parse.range = f"comma-separated integers {_bounds_text(lo, None)}"
    parse.__name__ = "list"
    return parse


#: the flags most commands share
POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)
SEED = int_range(0)


# ----------------------------------------------------------------------------------------------
# outputs (the policy: minilora.experiments.paths) and inputs: checked before the work starts
# ----------------------------------------------------------------------------------------------
#: the outputs the running command opened; :func:`close_outputs` (called by ``cli.main``) closes them
_OPEN: list[Output] = []


def add_overwrite(p, what: str = "the output") -> None:
    """The ``--overwrite`` flag of a command that writes (see :func:`output`)."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} if it already exists (default: refuse, so nothing is "
                        "lost)")


def output(path, flag: str, *, command: str, name: str, kind: str = "run", suffix: str = "",
           args=None, can_resume: bool = False) -> Path:
    """Check and open one output of the running command under the output policy
    (:class:`minilora.experiments.paths.Output`) and return its path: ``path`` if the user gave
    one, else a fresh ``runs/<command>/<name><suffix>``. ``args``: the parsed flags, whose
    ``overwrite`` / ``resume`` apply. Refuses (one line naming ``flag``) an output that cannot be
    written, is in use by another run, or already exists without ``--overwrite`` (or
    ``--resume``). Closed by ``cli.main`` when the command ends."""
    resume = bool(getattr(args, "resume", False))
    overwrite = bool(getattr(args, "overwrite", False))
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    out = Output(path, kind=kind, flag=flag, command=command, name=name, suffix=suffix,
                 resume=resume, overwrite=overwrite, can_resume=can_resume).check()
    _OPEN.append(out)
    return out.open()


def close_outputs(ok: bool) -> None:
    """Close every output :func:`output` opened (lock released; left empty: removed)."""
    while _OPEN:
        _OPEN.pop().close(ok)


def written(what: str, path) -> None:
    """The last line of a command: ``<what> written to <path>``."""
    print(f"{what} written to {path}")


def check_input_file(path, flag: str) -> Path:
    """Refuse a missing input file (or a directory given as one), naming ``flag``."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {str(path)!r} does not exist")
    if not path.is_file():
        raise UsageError(f"{flag} {str(path)!r} is not a file")
    return path


def check_block_size(block_size: int, model, flag: str = "--block-size") -> None:
    """Refuse windows longer than the model's context (its position table has that many rows)."""
    if block_size > model.config.block_size:
        raise UsageError(f"{flag} {block_size} exceeds the base model's context of "
                         f"{model.config.block_size} characters; give {flag} "
                         f"{model.config.block_size} or less")


# ----------------------------------------------------------------------------------------------
def _add_backend(p):
    p.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                   help="array backend (default: $MINILORA_BACKEND or numpy)")


def _add_allow_nonfinite(p):
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a checkpoint holding NaN/inf anyway (debugging a broken file only)")


def _use_backend(args):
    if getattr(args, "backend", None):
        backend.set_backend(args.backend)


def flag_hint(error: CheckpointError) -> CheckpointError:
    """The same error with the library's ``allow_nonfinite=True`` hint named as the flag."""
    text = str(error).replace("allow_nonfinite=True loads it anyway", "--allow-nonfinite loads "
                              "it anyway")
    return CheckpointError(text)


def _load(path, allow_nonfinite: bool | None = None):
    """Load a checkpoint (default: the shipped base). ``allow_nonfinite``: None for a command
    without ``--allow-nonfinite``, else the flag's value (and errors name the flag)."""
    try:
        return load_checkpoint(path or base_model_path(), allow_nonfinite=bool(allow_nonfinite))
    except CheckpointError as e:
        if allow_nonfinite is None:
            raise
        raise flag_hint(e) from None


def _adapter_registry(model, paths):
    """An AdapterRegistry on ``model`` holding the adapter files ``paths``; returns (registry,
    labels). A label is the file stem, or the folder name for finetune's ``adapter.safetensors``."""

    reg, labels = AdapterRegistry(model), []
    for path in paths:
        p = Path(path)
        label = p.parent.name if p.stem == "adapter" and p.parent.name else p.stem
        base, k = label, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        reg.load(label, p)
        labels.append(label)
    return reg, labels


def _recompute_chunk(args):
    """``--recompute-chunk`` checked against ``--recompute`` (one without the other is a mistake)."""
    if args.recompute_chunk is not None and not args.recompute:
        raise UsageError("--recompute-chunk only applies with --recompute")
    return args.recompute_chunk
