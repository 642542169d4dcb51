"""Hugging Face sharded checkpoints: ``*.index.json`` (a ``weight_map`` from each key to the
shard file holding it). Nothing is unpickled here: each shard is read by its own reader.

The index is JSON of at most :data:`~.limits.MAX_INDEX_BYTES`; every shard is named by a
relative path that, symlinks resolved, lies inside the index's folder (``../../etc/shadow``,
an absolute path or a symlink out of the folder is refused, and nothing of such a file is
read or echoed), and is a checkpoint file, never an index or a snapshot (so an index
naming itself or another index cannot loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, hide_from_bad_input
from ..schema import Schema
from ..schema_entries import TensorEntry
from .files import parse_json, read_bounded, require_regular_file
from .limits import MAX_INDEX_BYTES

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

INDEX_SUFFIX = ".index.json"


@dataclass(frozen=True)
class Shard:
    """One shard of a sharded checkpoint: its file and the keys the index maps to it."""

    name: str
    path: Path
    keys: frozenset[str]


def read_index(index: Path) -> list[Shard]:
    """The shards of a sharded checkpoint, in the order the index first names them."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(index, problem)

    data = parse_json(read_bounded(index, MAX_INDEX_BYTES, "sharded-checkpoint index"), fail,
                      "the index")  # fmt: skip
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise fail('not a sharded-checkpoint index (no "weight_map" object)')
    if not weight_map:
        raise fail("its weight_map is empty: the index names no tensor, no shard")
    keys: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise fail(
                f"the weight_map maps {key[:200]!r} to a {type(shard).__name__}, not a file name"
            )
        keys.setdefault(shard, set()).add(key)
    folder = index.parent.resolve()
    shards = []
    for name, shard_keys in keys.items():
        shown = name[:200]
        if name.endswith(".json") or "\0" in name:
            raise fail(f"its shard {shown!r} is not a checkpoint file (an index or a snapshot)")
        path = index.parent / name
        try:
            inside = path.resolve().is_relative_to(folder) and not Path(name).is_absolute()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, an odd name
            inside = False
        if not inside:
            raise fail(
                f"its shard {shown!r} lies outside the index's folder {folder} (symlinks "
                "resolved): refused, shards must be files beside their index"
            )
        if not path.exists():
            raise fail(f"its shard {shown} is missing")
        require_regular_file(path)  # not a folder, a FIFO or a device
        shards.append(Shard(name=name, path=path, keys=frozenset(shard_keys)))
    return shards


def sharded_schema(index: Path, shard_schema: Callable[[Path], Schema]) -> Schema:
    """A sharded checkpoint's schema: of each shard (``shard_schema`` reads one), the
    entries of the keys its index maps to it, in the order the index names the shards."""
    entries: list[TensorEntry] = []
    locations: set[str] = set()
    ordered = True
    for shard in read_index(index):
        schema = shard_schema(shard.path)
        locations.update(schema.saved_on)
        ordered = ordered and schema.ordered
        missing = shard.keys - {t.key for t in schema.tensors}
        if missing:
            raise CheckpointError(
                index,
                f"keys it maps to {shard.name} are not in that shard: "
                + ", ".join(sorted(missing)[:5]),
            )
        entries.extend(t for t in schema.tensors if t.key in shard.keys)
    return Schema(
        tensors=tuple(entries),
        ordered=ordered,
        saved_on=tuple(sorted(locations)),
        source=str(index),
    )
