"""Hugging Face sharded checkpoints, ``*.index.json`` (``readers.hf_index``).

Recognised by the name ``*.index.json``, or by a ``.json`` whose first bytes hold a
``"weight_map"`` and no snapshot header. Each shard is read by its own format, through the
caller's ``nested`` reader (without torch for ``statedict show``, with values and hooks for
``schema_of``); the index is never loaded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..readers import hf_index as reader
from ..schema import Schema
from ..snapshot_format import FORMAT_NAME
from .base import Loaded, NestedSchema

__all__ = ["FORMAT", "INDEX", "ShardedIndex"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

INDEX = "index"


class ShardedIndex:
    """A sharded checkpoint's index and the shards beside it."""

    name = INDEX
    schema_first = True
    torch_free = True
    save = None

    def detect(self, path: Path, head: bytes | None) -> bool:
        if head is None:
            return False
        if path.name.endswith(reader.INDEX_SUFFIX):
            return True
        # an index's "metadata" (its total size) comes before its "weight_map"; a
        # snapshot's header is its first line
        return (
            path.suffix == ".json" and b'"weight_map"' in head and FORMAT_NAME.encode() not in head
        )

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        if part is not None:
            raise CheckpointError(path, "a sharded checkpoint has no parts to choose from")
        return reader.sharded_schema(path, nested)

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        raise CheckpointError(
            path, "is a sharded checkpoint's index: it is read shard by shard, never loaded whole"
        )


FORMAT = ShardedIndex()
