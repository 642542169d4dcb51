"""The plugin's exception types.

Two families, kept apart on purpose: a *mismatch* is a test failure (an ``AssertionError``,
so pytest reports it as a failed assertion with our message), while a *bad input* is a
usage or data problem (a corrupt snapshot, a foreign file, an unsupported object) that must
name the file or object and say what to do, never surface as a traceback from inside torch.
"""

from __future__ import annotations

import os
from typing import Any

from .printable import printable, printable_message


class StateDictMismatch(AssertionError):
    """A state_dict, checkpoint or round-trip differs from what was expected.

    The message is the full report; ``diff`` (when set) is the structured
    :class:`~pytest_statedict.compare.SchemaDiff` behind it. The report names each key
    escaped (:func:`~.printable.printable`); what it quotes of others (torch's load error,
    a custom comparison's words) is escaped here, its lines kept.
    """

    def __init__(self, message: str, diff: object = None) -> None:
        super().__init__(printable_message(message, lines=True))
        self.diff = diff


class StateDictWarning(UserWarning):
    """A check passed without checking something it says it could not (pytest lists it)."""


class StateDictError(Exception):
    """Bad input: the message names the file or object and what is wrong with it.

    Whatever of the input it quotes reaches the terminal escaped (its lines kept), as a
    failure report does (see :class:`StateDictMismatch`).
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (printable_message(args[0], lines=True),)
        super().__init__(*args)


class SnapshotError(StateDictError):
    """A snapshot file that cannot be read: invalid JSON, a wrong field, a stale format."""

    REMEDY = "fix it by hand or regenerate it with `pytest --statedict-update`"

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        line: int | None = None,
        remedy: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        shown = printable(self.path)
        where = f"{shown}:{line}" if line else shown
        super().__init__(
            f"statedict snapshot {where}: {printable_message(problem)}. The file was left "
            "untouched; "
            f"{remedy or self.REMEDY}."
        )


class StaleSnapshotError(SnapshotError):
    """A snapshot written by another format version: regenerate (or upgrade), do not diff."""


class CheckpointError(StateDictError):
    """A checkpoint file that is missing, truncated, foreign, or unsafe to unpickle.

    One paragraph whatever the file holds: the path, and each name the problem quotes (a
    shard's, a key's), escaped, a newline in a name included (no forged traceback).
    ``path`` and ``problem`` keep them as they are.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"checkpoint {printable(self.path)}: {printable_message(problem)}")


class UnsupportedFormatError(StateDictError):
    """A model whose state a checkpoint format cannot hold (safetensors: quantized tensors,
    ``_extra_state`` and other objects); the message names each key and why.

    The ``statedict_roundtrip`` fixture skips that format with the message as the reason.
    """


class UnsupportedObjectError(StateDictError, TypeError):
    """An object the plugin cannot take a schema of."""


def hide_from_bad_input(excinfo: Any) -> bool:
    """A module-level ``__tracebackhide__`` for the package's modules (pytest reads it).

    A bad-input error's message names the file or object and what to do, so pytest shows
    it at the caller's line, without the plugin's frames below; any other exception (a
    bug) keeps them, and ``--full-trace`` shows everything.
    """
    return excinfo is not None and excinfo.errisinstance(StateDictError)


def first_line(exc: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``, for an error that names another one.

    An exception whose own formatting fails, or whose message is empty, must not hide the
    failure it reports (``str(exc).splitlines()[0]`` would raise an IndexError of its own).
    """
    try:
        text = str(exc)
    except Exception:
        text = repr(exc.args)
    lines = text.strip().splitlines()
    return printable_message(f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit])
