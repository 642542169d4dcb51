"""statedict snapshot ``.json`` files (what the plugin writes): parsed and validated by
:meth:`Schema.from_json <pytest_statedict.schema.Schema.from_json>`. Nothing is unpickled.

Only a regular file of at most :data:`~.limits.MAX_SNAPSHOT_BYTES` is read (a snapshot
symlinked to ``/dev/zero`` or to a FIFO is refused, not read forever); its JSON nests at
most :data:`~.limits.MAX_JSON_DEPTH` levels.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SnapshotError, StateDictError, hide_from_bad_input
from ..schema import Schema
from .files import Fail, read_bounded
from .limits import MAX_SNAPSHOT_BYTES

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


def read_snapshot(path: Path) -> Schema:
    """The schema a snapshot file holds; a :class:`SnapshotError` naming what is wrong.

    A path that is no readable file (missing, a folder, a FIFO) is a :class:`CheckpointError`,
    as for every other file a user names.
    """
    return Schema.from_json(read_snapshot_text(path), path)


def read_snapshot_text(path: Path, fail: Fail | None = None) -> str:
    """A snapshot file's text, or ``fail(problem)``.

    The session reads its own snapshots through here (each problem a
    :class:`SnapshotError` of that snapshot), before it decides what to do with a file it
    cannot use: fail the test, or rewrite it under ``--statedict-update``.
    """

    def too_big_or_garbled(problem: str) -> StateDictError:
        return fail(problem) if fail is not None else SnapshotError(path, problem)

    data = read_bounded(path, MAX_SNAPSHOT_BYTES, "snapshot", fail, too_big_or_garbled)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise too_big_or_garbled(f"is not UTF-8 text (byte {exc.start})") from None
