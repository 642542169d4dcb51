"""Checkpoint files and folders read through the registry: their schema, or their object.

The one path every reader of a checkpoint goes (``schema_of(path)``, the refactor gate,
the round-trip's load): a ``pytest_statedict_load_checkpoint`` hook's object if the
caller's ``loader`` claims the path (the caller looks the hook up: ``runtime.
checkpoint_loader()``; this layer never looks up the running session), else the format the
registry detects. A :attr:`~.base.CheckpointFormat.schema_first` format's schema is read
from its headers (its shards each by their own format); any other file is loaded and its
object walked by ``describe``, the walk of torch objects that ``extract`` (above this
layer) hands in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import hide_from_bad_input
from ..readers.records import NeedsTorch
from ..schema import Schema
from . import registry
from .base import Loaded, ObjectSchema, object_schema

__all__ = ["CheckpointLoader", "from_hook", "load_file", "schema_of_file"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# What a pytest_statedict_load_checkpoint hook made of a path (None: no hook claimed it).
CheckpointLoader = Callable[[Path], Any]


def from_hook(path: Path, loader: CheckpointLoader | None) -> Any:
    """What the caller's hook makes of ``path`` (None: no hook, or none claimed it)."""
    if loader is None or not path.exists():
        return None
    return loader(path)


def load_file(
    path: Path,
    *,
    loader: CheckpointLoader | None = None,
    map_location: Any = None,
    weights_only: bool = True,
    mmap: bool = True,
) -> tuple[Any, set[str]]:
    """The object one checkpoint file holds, and the locations its storages were saved on.

    A hook's object if the caller's ``loader`` claims the path; else the file is loaded by
    its format (``weights_only=False`` only when the caller passes it by name).
    """
    custom = from_hook(path, loader)
    if custom is not None:
        return custom, set()
    fmt, where = registry.detect(path)
    loaded = fmt.load(where, map_location=map_location, weights_only=weights_only, mmap=mmap)
    return loaded.obj, set(loaded.saved_on)


def schema_of_file(
    path: str | os.PathLike[str],
    *,
    describe: ObjectSchema,
    values: bool = False,
    weights_only: bool = True,
    part: str | None = None,
    loader: CheckpointLoader | None = None,
) -> Schema:
    """The schema of a checkpoint or snapshot file or folder, reading no tensor data if it can.

    ``part`` picks one entry of a general checkpoint (``"modelA_state_dict"``, or a path
    into nested entries: ``"optimizer_states/0"``). The shards of a sharded checkpoint are
    read the same way, each with the hook too.
    """
    path = Path(path)
    custom = from_hook(path, loader)
    if custom is not None:
        schema = object_schema(path, custom, set(), describe=describe, values=values, part=part)
        return replace(schema, read_as="by a pytest_statedict_load_checkpoint hook")
    fmt, where = registry.detect(path)

    def shard_schema(shard: Path) -> Schema:
        return schema_of_file(
            shard, describe=describe, values=values, weights_only=True, loader=loader
        )

    if fmt.schema_first:
        try:
            schema = fmt.read_schema(where, part=part, values=values, nested=shard_schema)
            # a format that reads several files says itself how it read them
            how = schema.read_as or f"{fmt.name}, from its header (no tensor data)"
            return replace(schema, read_as=how)
        except NeedsTorch:  # NeedsLoading: a part, values, ...
            pass
    loaded: Loaded = fmt.load(where, map_location=None, weights_only=weights_only, mmap=True)
    schema = object_schema(
        where,
        loaded.obj,
        loaded.saved_on,
        describe=describe,
        values=values,
        part=part,
        ordered=loaded.ordered,
    )
    how = "weights_only=True" if weights_only else "weights_only=False, by request"
    return replace(schema, read_as=f"{fmt.name}, loaded ({how}, memory-mapped)")
