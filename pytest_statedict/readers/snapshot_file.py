"""statedict snapshot ``.json`` files (what the plugin writes): parsed and validated by
:meth:`Schema.from_json <pytest_statedict.schema.Schema.from_json>`. Nothing is unpickled.

Only a regular file of at most :data:`~.limits.MAX_SNAPSHOT_BYTES` is read (a snapshot
symlinked to ``/dev/zero`` or to a FIFO is refused, not read forever); its JSON nests at
most :data:`~.limits.MAX_JSON_DEPTH` levels.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SnapshotError, hide_from_bad_input
from ..schema import Schema
from .files import read_bounded
from .limits import MAX_SNAPSHOT_BYTES

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


def read_snapshot(path: Path) -> Schema:
    """The schema a snapshot file holds; a :class:`SnapshotError` naming what is wrong."""

    def fail(problem: str) -> SnapshotError:
        return SnapshotError(path, problem)

    data = read_bounded(path, MAX_SNAPSHOT_BYTES, "snapshot", fail)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    return Schema.from_json(text, path)
