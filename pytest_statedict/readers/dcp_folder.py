"""``torch.distributed.checkpoint`` (DCP) folders: the schema from ``.metadata`` alone.

``.metadata`` is a pickle. It is read, without torch, whole (a regular file of at most
:data:`~.limits.MAX_PICKLE_BYTES`) and unpickled with the DCP allowlist of ``unpickling``
(exact ``(module, qualname)`` pairs of DCP's own metadata classes, ``torch.Size``, torch
dtypes and layouts, paths; never a dotted name, never another module's attribute), then
checked: a ``Metadata`` whose ``state_dict_metadata`` maps string keys to tensor metadata
(a dtype and a ``torch.Size`` of at most :data:`~.limits.MAX_DIMS` dimensions) or to
bytes metadata. No tensor data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeGuard

from ..errors import CheckpointError, hide_from_bad_input
from ..schema import Schema
from ..schema_entries import TensorEntry
from . import records
from .files import read_bounded
from .limits import MAX_DIM, MAX_DIMS, MAX_PICKLE_BYTES
from .unpickling import unpickle_dcp_metadata

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

METADATA = ".metadata"


def read_schema(folder: Path, *, part: str | None) -> Schema:
    """The schema of a DCP folder; ``part`` ("a/b") keeps the entries under that prefix."""
    data = read_bounded(folder / METADATA, MAX_PICKLE_BYTES, "DCP .metadata pickle")
    metadata = unpickle_dcp_metadata(data, folder)
    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(metadata, records.Metadata) or not isinstance(items, dict):
        raise CheckpointError(folder, "its .metadata holds no DCP Metadata")
    prefix = f"{part.replace('/', '.')}." if part else ""
    entries = []
    for key, meta in items.items():
        if not isinstance(key, str):
            raise CheckpointError(folder, f"its .metadata has a {type(key).__name__} key")
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if isinstance(meta, records.BytesStorageMetadata):
            entries.append(TensorEntry(key=name, kind="object", type="bytes"))
            continue
        dtype = getattr(getattr(meta, "properties", None), "dtype", None)
        size = getattr(meta, "size", None)
        if not (
            isinstance(meta, records.TensorStorageMetadata)
            and isinstance(dtype, records.dtype)
            and _is_shape(size)
        ):
            raise CheckpointError(folder, f"its .metadata entry {key[:200]!r} is not valid")
        entries.append(TensorEntry(key=name, kind="tensor", shape=tuple(size), dtype=dtype.name))
    if part and not entries:
        raise CheckpointError(folder, f"no entries under {part!r}")
    return Schema(tensors=tuple(entries), source=str(folder))


def _is_shape(size: Any) -> TypeGuard[tuple[int, ...]]:
    return (
        isinstance(size, tuple)
        and len(size) <= MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in size)
    )
