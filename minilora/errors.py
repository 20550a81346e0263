"""minilora's own error classes: one base for every mistake a user can make.

A :class:`MiniloraError` means *the input was wrong* (a flag out of range, a broken file, a config
that does not fit the model): the command line prints its message on one line and exits 2. Any
other exception is a bug in minilora and keeps its traceback. ``MINILORA_DEBUG=1`` shows the
traceback for user errors too.

Each subclass also derives from the built-in exception a Python user would expect
(``ValueError`` for bad values, ``FileNotFoundError`` for missing results, ...), so
``except ValueError`` keeps working.
"""
from __future__ import annotations


class MiniloraError(Exception):
    """Base class of every user-facing error in minilora (bad input, not a bug)."""


class UsageError(MiniloraError, ValueError):
    """An argument is outside what is allowed: a command-line flag (the message names the flag)
    or a function's parameter (the message names the parameter)."""


class PeftError(MiniloraError, ValueError):
    """A PEFT method cannot be applied or loaded as asked (wrong model, shapes, files)."""
