"""Where the experiments floor reads the shipped base model, and the one policy for what it writes.

* the base model: ``<data dir>/base_model/shakespeare_char.safetensors`` (the data directory
  follows one rule: :func:`minilora.data.data_dir`);
* ``results/``: records (JSON, tables) that are committed; ``figures/``: PNGs drawn from them;
* ``runs/``: weights and scratch output of runs (git-ignored).

The output policy (every command that writes goes through :class:`Output`):

1. **Default under runs/**: without a path, a command writes a fresh ``runs/<command>/<name>``
   (``<name>-2``, ``-3``, ... when taken) and says where at the end. ``results/`` and
   ``figures/`` are written only when the user names them.
2. **Nothing replaced unasked**: an existing output is refused unless ``overwrite`` (or, for a run
   that can continue, ``resume``). Overwriting a run directory first sets the earlier run's
   files aside (its marker ``.minilora-run.json`` lists what was there before it) and deletes
   them when the new run has written, so two runs never mix and a refused command restores
   them; a directory that no minilora run recorded is never emptied.
3. **One writer at a time**: while a command writes, a lock (``.minilora.lock`` in a directory,
   ``.<name>.minilora.lock`` beside a file) names it (process id, start time, command line). A
   second writer fails at once with one line naming the first; a lock left by a process that
   is gone is taken over with a note.
4. **Checked before the work**: :meth:`Output.check` looks at the disk without writing (a file in
   the way, no permission, in use, already there); :meth:`Output.open` then creates and locks;
   :meth:`Output.close` releases the lock and removes what it created if nothing was written
   (a refused or failed command leaves nothing behind). The files themselves are written
   atomically (:mod:`minilora.io`).

Sweeps (``ablate``, ``results --run``) write many keyed items into one directory: it is extended
rather than refused (an item is never rewritten once done), and each item is claimed with its own
:class:`Lock`, so two processes share the work instead of repeating it.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from minilora.data import data_dir
from minilora.io import CheckpointError, OutputError, atomic_write_text

BASE_MODEL_FILE = "base_model/shakespeare_char.safetensors"
RESULTS = Path("results")
FIGURES = Path("figures")
RUNS = Path("runs")

LOCK_NAME = ".minilora.lock"
MARKER_NAME = ".minilora-run.json"
ASIDE_PREFIX = ".minilora-replaced-"
#: the kinds of output (see :class:`Output`)
KINDS = ("run", "collection", "sweep", "file")


def base_model_path() -> Path:
    """The shipped pretrained Shakespeare model (``<data dir>/base_model/...``)."""
    p = data_dir() / BASE_MODEL_FILE
    if not p.exists():
        raise CheckpointError(
            f"the shipped base model {str(p)!r} is missing. It is committed with the repository; "
            "re-create it with the command in data/SOURCES.md (`minilora pretrain --preset base "
            "...`), or pass --ckpt PATH")
    return p


def command_line() -> str:
    """This process's command line as the user typed it (``minilora finetune --out x``)."""
    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else "python"
    if prog in ("__main__.py", "minilora") or prog.endswith("minilora"):
        prog = "minilora"
    return " ".join([prog] + argv[1:])


# ----------------------------------------------------------------------------------------------
# locks
# ----------------------------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux ``/proc``), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(info: dict) -> bool:
    """Whether the process that wrote lock ``info`` still runs (a lock from another host counts
    as alive: it cannot be checked from here)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = info.get("proc_start")
    return started is None or _proc_start(pid) in (None, started)


def describe_lock(info: dict) -> str:
    """``pid 1234 on host, started 2025-01-02 10:11:12, `minilora finetune --out x```."""
    host = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
    return (f"pid {info.get('pid')}{host}, started {info.get('started', '?')}"
            + (f", `{info['command']}`" if info.get("command") else ""))


class Lock:
    """An exclusive claim on something, held as a file created with ``O_EXCL`` that records who
    holds it (pid, host, start time, command line). A lock whose process is gone is *stale*:
    :meth:`acquire` takes it over (atomically: the stale file is renamed away first, so two
    processes cannot both take it)."""

    def __init__(self, path):
        self.path = Path(path)
        self.held = False

    def read(self) -> dict | None:
        """The holder's record, or None if free (an unreadable lock file counts as stale)."""
        try:
            info = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "stale_reason": "unreadable"}
        return info if isinstance(info, dict) else {"pid": None}

    def holder(self) -> dict | None:
        """The record of a *live* holder, or None (free or stale)."""
        info = self.read()
        return info if info is not None and _alive(info) else None

    def try_acquire(self, log=None) -> dict | None:
        """Take the lock; returns None on success, else the live holder's record. A stale lock
        is taken over, with a note to ``log`` naming the process that left it."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
              "proc_start": _proc_start(os.getpid()), "command": command_line()}
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.read()
                if info is None:
                    continue                      # released meanwhile: try again
                if _alive(info):
                    return info
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.replace(self.path, aside)  # only one taker wins this rename's source
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                if log is not None:
                    log(f"note: taking over {self.path}, left by a run that is gone "
                        f"({describe_lock(info)})")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return None
        raise OutputError(f"cannot take the lock {str(self.path)!r}: it keeps changing hands")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _first_existing(path: Path) -> Path:
    p = path if path.is_absolute() else Path.cwd() / path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _entries(path: Path) -> list[str]:
    """The names in directory ``path`` other than the policy's own files (lock, marker, the
    earlier run's files set aside while a run overwrites it)."""
    if not path.is_dir():
        return []
    return sorted(n for n in os.listdir(path) if n not in (LOCK_NAME, MARKER_NAME)
                  and not n.startswith((LOCK_NAME + ".stale-", ASIDE_PREFIX)))


def _state(path: Path) -> dict:
    """Names, sizes and modification times of a run directory's entries (did a run write?)."""
    out = {}
    for n in _entries(path):
        st = (path / n).stat()
        out[n] = (st.st_size, st.st_mtime_ns)
    return out


def _read_marker(path: Path) -> dict | None:
    try:
        m = json.loads((path / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("kept", []), list) else None


class Output:
    """One output of a command, under the policy of this module's docstring.

    Args:
        path: the path the user named, or None for a fresh ``runs/<command>/<name><suffix>``.
        kind: ``"run"``: a directory that holds one run (finetune, pretrain, svd ...);
            ``"collection"``: a directory where the command writes its named files beside others
            (figures/, results/delta_w ...; overwriting replaces only those files); ``"sweep"``:
            a directory extended item by item (ablate), never refused; ``"file"``: one file.
        flag: the flag that names it, for messages (``--out``).
        command, name, suffix: the default ``runs/<command>/<name><suffix>``.
        resume: continue the run in an existing directory (run kind); the caller checks that
            there is something to continue.
        overwrite: replace an existing output.
        can_resume: whether the command has ``--resume`` (named in the refusal).
    """

    def __init__(self, path=None, *, kind: str = "run", flag: str = "--out",
                 command: str = "run", name: str = "run", suffix: str = "",
                 resume: bool = False, overwrite: bool = False, can_resume: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.named = path is not None and str(path) != ""
        self.path = Path(path) if self.named else RUNS / command / f"{name}{suffix}"
        #: a sweep's default is one fixed directory (extended by every run), not a fresh one
        self.fixed = self.named or kind == "sweep"
        self.kind, self.flag, self.suffix = kind, flag, suffix
        self.resume, self.overwrite, self.can_resume = resume, overwrite, can_resume
        self.lock: Lock | None = None
        self.created: list[Path] = []
        self.opened = False
        self.notes: list[str] = []

    # -- where ---------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        """The directory the output lives in (itself, or a file's folder)."""
        return self.path.parent if self.kind == "file" else self.path

    def _lock_path(self) -> Path:
        if self.kind == "file":
            return self.path.with_name(f".{self.path.name}{LOCK_NAME}")
        return self.path / LOCK_NAME

    def _what(self) -> str:
        return f"{self.flag} {str(self.path)!r}" if self.named else repr(str(self.path))

    # -- before any work ------------------------------------------------------------------------
    def check(self) -> Output:
        """Refuse, naming the flag, an output that cannot or may not be written. Writes nothing."""
        p, what = self.path, self._what()
        if self.kind == "file":
            if not p.name or p.is_dir() or str(p).endswith(os.sep):
                raise OutputError(f"{what} is a directory; give a file name")
        elif p.exists() and not p.is_dir():
            raise OutputError(f"{what} is an existing file, not a directory")
        anchor = _first_existing(self.dir)
        if not anchor.is_dir():
            raise OutputError(f"{what} lies under {str(anchor)!r}, which is a file")
        if not os.access(anchor, os.W_OK | os.X_OK):
            raise OutputError(f"{what}: cannot write in {str(anchor)!r} (permission denied)")
        if self.dir.is_dir() and not os.access(self.dir, os.W_OK | os.X_OK):
            raise OutputError(f"{what}: cannot write in {str(self.dir)!r} (permission denied)")
        if not self.fixed:
            return self               # a fresh default name is chosen when it is opened
        held = Lock(self._lock_path()).holder() if self.kind != "sweep" else None
        if held is not None:
            raise OutputError(f"{what} is in use by another minilora run ({describe_lock(held)}); "
                              "wait for it to finish or choose another path")
        self._check_existing()
        return self

    def _check_existing(self) -> None:
        p, what = self.path, self._what()
        if self.kind == "sweep":
            return
        if self.kind == "file":
            if p.exists() and not self.overwrite:
                raise OutputError(f"{what} already exists; --overwrite replaces it, or choose "
                                  "another path")
            return
        entries = _entries(p)
        if not entries:
            return
        if self.resume and self.kind == "run":
            return
        if not self.overwrite:
            hint = "--resume continues it, " if self.can_resume else ""
            kind = "an earlier run" if self.kind == "run" else f"{len(entries)} file(s)"
            raise OutputError(f"{what} already holds {kind}; {hint}--overwrite replaces it, "
                              "or choose a new directory")
        if self.kind == "run" and _read_marker(p) is None:
            raise OutputError(f"{what} holds files that no minilora run recorded (yours, or a "
                              "run from before runs were recorded), so --overwrite cannot tell "
                              "which to replace; move or remove them, or choose a new directory")

    # -- the work starts -------------------------------------------------------------------------
    def open(self, log=None) -> Path:
        """Create the output's directory, take its lock and (overwriting a run) remove the
        earlier run's files; returns the path. Call :meth:`close` when done."""
        log = log or (lambda text: print(text, file=sys.stderr))
        if not self.fixed:
            self._fresh(log)
        else:
            self._make_dir(self.dir if self.kind == "file" else self.path)
            if self.kind != "sweep":
                self._take_lock(log)
            self._check_existing()    # again, now that we hold the lock
        if self.kind == "run":
            self._start_run(log)
        self.opened = True
        return self.path

    def _make_dir(self, d: Path) -> None:
        todo = []
        q = d
        while not q.exists() and q != q.parent:
            todo.append(q)
            q = q.parent
        try:
            for q in reversed(todo):
                try:
                    q.mkdir()
                    self.created.append(q)
                except FileExistsError:
                    pass
        except OSError as e:
            raise OutputError(f"{self._what()}: cannot create {str(q)!r}: "
                              f"{e.strerror or type(e).__name__}") from None

    def _take_lock(self, log) -> None:
        lock = Lock(self._lock_path())
        try:
            held = lock.try_acquire(log)
        except PermissionError:
            raise OutputError(f"{self._what()}: cannot write in {str(self.dir)!r} "
                              "(permission denied)") from None
        if held is not None:
            raise OutputError(f"{self._what()} is in use by another minilora run "
                              f"({describe_lock(held)}); wait for it to finish or choose "
                              "another path")
        self.lock = lock

    def _fresh(self, log) -> None:
        """Claim the first free ``runs/<command>/<name>[-n]<suffix>``."""
        base = self.path
        stem = base.name[:len(base.name) - len(self.suffix)] if self.suffix else base.name
        self._make_dir(base.parent)
        for n in range(1, 10_000):
            p = base.with_name(f"{stem}{'' if n == 1 else f'-{n}'}{self.suffix}")
            self.path = p
            if self.kind == "file":
                if p.exists():
                    continue
                lock = Lock(self._lock_path())
                if lock.try_acquire(log) is None:
                    if p.exists():
                        lock.release()
                        continue
                    self.lock = lock
                    return
                continue
            try:
                p.mkdir()
            except FileExistsError:
                continue
            self.created.append(p)
            self._take_lock(log)
            return
        raise OutputError(f"no free name for {str(base)!r} (10,000 taken)")

    def _start_run(self, log) -> None:
        p = self.path
        old = _read_marker(p)
        self._old_marker = (p / MARKER_NAME).read_text() if old is not None else None
        # files that are not this run's: those listed by its marker; a run resumed in a folder
        # without one (made before runs were recorded) takes what is there as its own
        kept = (old.get("kept", []) if old is not None else [] if self.resume else _entries(p))
        self._aside = None
        if self.overwrite and old is not None:
            gone = [n for n in _entries(p) if n not in kept]
            if gone:   # set aside, removed when this run ends well (restored if it is refused)
                self._aside = p / f"{ASIDE_PREFIX}{os.getpid()}"
                self._aside.mkdir()
                for n in gone:
                    os.replace(p / n, self._aside / n)
                self.notes.append(f"note: --overwrite: the earlier run's {len(gone)} file(s) in "
                                  f"{p} are replaced")
                log(self.notes[-1])
        marker = {"command": command_line(), "pid": os.getpid(),
                  "started": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                  "kept": kept}
        if self.resume and old is not None:
            marker = {**old, "resumed": old.get("resumed", []) + [marker["started"]],
                      "command": marker["command"]}
        atomic_write_text(p / MARKER_NAME, json.dumps(marker, indent=1) + "\n")
        self._state = _state(p)

    # -- the work is done (or failed) --------------------------------------------------------------
    def close(self, ok: bool = True) -> None:
        """Release the lock. A run that wrote nothing (a refused command) leaves the directory
        as it found it: the earlier run's files set aside by ``overwrite`` come back, its marker
        too, and every directory this output created is removed; otherwise the marker records
        the end and the set-aside files are deleted."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.kind == "run" and self.opened and self.path.is_dir():
            p, marker = self.path, self.path / MARKER_NAME
            aside = getattr(self, "_aside", None)
            if not ok and _state(p) == getattr(self, "_state", None):   # nothing written
                if aside is not None:
                    for n in os.listdir(aside):
                        os.replace(aside / n, p / n)
                    aside.rmdir()
                if self._old_marker is not None:
                    atomic_write_text(marker, self._old_marker)
                else:
                    marker.unlink(missing_ok=True)
            else:
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
                if not _entries(p):
                    marker.unlink(missing_ok=True)
                elif marker.exists():
                    try:
                        m = json.loads(marker.read_text())
                        m["finished" if ok else "stopped"] = datetime.datetime.now().strftime(
                            "%Y-%m-%d %H:%M:%S")
                        atomic_write_text(marker, json.dumps(m, indent=1) + "\n")
                    except (OSError, ValueError):
                        pass
        for d in reversed(self.created):
            try:
                d.rmdir()             # only if empty
            except OSError:
                pass
        self.created = []
        self.opened = False

    def __enter__(self) -> Path:
        self.check()
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


__all__ = ["BASE_MODEL_FILE", "FIGURES", "KINDS", "LOCK_NAME", "Lock", "MARKER_NAME", "Output",
           "RESULTS", "RUNS", "base_model_path", "command_line", "describe_lock"]
