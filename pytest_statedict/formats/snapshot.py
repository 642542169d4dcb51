"""statedict snapshot ``.json`` files (``readers.snapshot_file``): a schema, nothing to load.

Any ``.json`` that is no sharded index (the sharded-index format comes first). The snapshot
is the layout, with value fingerprints if it was taken with ``values=True``; the gate
rebuilds meta tensors from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..readers.snapshot_file import read_snapshot
from ..schema import Schema
from .base import Loaded, NestedSchema

__all__ = ["FORMAT", "SNAPSHOT", "SnapshotFile"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

SNAPSHOT = "snapshot"


class SnapshotFile:
    """A statedict snapshot."""

    name = SNAPSHOT
    schema_first = True
    torch_free = True
    save = None

    def detect(self, path: Path, head: bytes | None) -> bool:
        return head is not None and path.suffix == ".json"

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        if part:
            raise CheckpointError(path, "a snapshot holds one schema, without parts")
        snapshot = read_snapshot(path)
        if values and not snapshot.has_values:
            raise CheckpointError(
                path,
                "values=True needs a snapshot taken with values=True (this one records no "
                "value fingerprints)",
            )
        return snapshot

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        raise CheckpointError(path, "is a statedict snapshot: a schema, with no tensors to load")


FORMAT = SnapshotFile()
