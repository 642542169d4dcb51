"""The plugin's exception types.

Two families, kept apart on purpose: a *mismatch* is a test failure (an ``AssertionError``,
so pytest reports it as a failed assertion with our message), while a *bad input* is a
usage or data problem (a corrupt snapshot, a foreign file, an unsupported object) that must
name the file or object and say what to do, never surface as a traceback from inside torch.
"""

from __future__ import annotations

import os
from typing import Any


class StateDictMismatch(AssertionError):
    """A state_dict, checkpoint or round-trip differs from what was expected.

    The message is the full report; ``diff`` (when set) is the structured
    :class:`~pytest_statedict.compare.SchemaDiff` behind it.
    """

    def __init__(self, message: str, diff: object = None) -> None:
        super().__init__(message)
        self.diff = diff


class StateDictWarning(UserWarning):
    """A check passed without checking something it says it could not (pytest lists it)."""


class StateDictError(Exception):
    """Bad input: the message names the file or object and what is wrong with it."""


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
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(
            f"statedict snapshot {where}: {problem}. The file was left untouched; "
            f"{remedy or self.REMEDY}."
        )


class StaleSnapshotError(SnapshotError):
    """A snapshot written by another format version: regenerate (or upgrade), do not diff."""


class CheckpointError(StateDictError):
    """A checkpoint file that is missing, truncated, foreign, or unsafe to unpickle."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


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
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit]
