"""The plugin's exception types.

Two families, kept apart on purpose: a *mismatch* is a test failure (an ``AssertionError``,
so pytest reports it as a failed assertion with our message), while a *bad input* is a
usage or data problem (a corrupt snapshot, a foreign file, an unsupported object) that must
name the file or object and say what to do, never surface as a traceback from inside torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class StateDictMismatch(AssertionError):
    """A state_dict, checkpoint or round-trip differs from what was expected.

    The message is the full report; ``diff`` (when set) is the structured
    :class:`~pytest_statedict.compare.SchemaDiff` behind it.
    """

    def __init__(self, message: str, diff: object = None) -> None:
        super().__init__(message)
        self.diff = diff


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


class UnsupportedObjectError(StateDictError, TypeError):
    """An object the plugin cannot take a schema of."""


def raised_at_call_site(func: F) -> F:
    """Bad-input errors of a public function point at the caller's line, not our internals.

    Their message already names the file or object and what to do; the plugin's frames
    below the call would only bury it in pytest's output (this wrapper's own frame is
    hidden with ``__tracebackhide__``).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        try:
            return func(*args, **kwargs)
        except StateDictError as exc:
            raise exc.with_traceback(None)  # noqa: B904 (the same exception, shorter)

    return wrapper  # type: ignore[return-value]
