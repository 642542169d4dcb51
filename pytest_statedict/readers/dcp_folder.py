"""``torch.distributed.checkpoint`` (DCP) folders: what they hold, without tensor data.

``.metadata`` is a pickle. It is read, without torch, whole (a regular file of at most
:data:`~.limits.MAX_PICKLE_BYTES`) and unpickled with the DCP allowlist of ``unpickling``
(exact ``(module, qualname)`` pairs of DCP's own metadata classes, ``torch.Size``, torch
dtypes and layouts, paths; never a dotted name, never another module's attribute), then
checked: a ``Metadata`` whose ``state_dict_metadata`` maps string keys to tensor metadata
(a dtype and a ``torch.Size`` of at most :data:`~.limits.MAX_DIMS` dimensions) or to
bytes metadata. No tensor data is read.

``dcp.save`` flattens what it is given (``{"model": ..., "optim": ...}``, the DCP
tutorial's checkpoint) into dotted keys, and records in ``planner_data`` the path each key
came from (``optim.state.0.weight.exp_avg`` from ``("optim", "state", "0.weight",
"exp_avg")``: a parameter's name has dots of its own, so only that path tells the parts
apart). :func:`read_checkpoint` rebuilds the nested object from those paths, as
``dcp.load`` would: a :class:`TensorMeta` where a tensor was, and the value of each
non-tensor entry (an optimizer's hyperparameters and the names of its parameters, an
epoch): DCP writes each as a small ``torch.save`` archive inside a data file, read here
with torch's weights-only rules re-implemented (``unpickling.unpickle_torch_records``),
never with DCP's own ``torch.load(weights_only=False)``. A value those rules refuse, or
that needs torch, stays its raw ``bytes``: described, never run.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

from ..errors import CheckpointError, hide_from_bad_input
from . import records
from .files import open_regular, read_bounded, require_regular_file
from .limits import (
    MAX_DIM,
    MAX_DIMS,
    MAX_PICKLE_BYTES,
    PICKLE_BYTES_BASE,
    PICKLE_BYTES_PER_RECORD,
    PICKLE_COST_BASE,
)
from .unpickling import Budget, unpickle_dcp_metadata, unpickle_torch_records

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

METADATA = ".metadata"


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """A tensor of a DCP checkpoint, as its ``.metadata`` records it (its data unread)."""

    shape: tuple[int, ...]
    dtype: str


class Checkpoint(NamedTuple):
    """What a DCP folder holds: rebuilt, and as stored."""

    # what ``dcp.save`` was given, nested as it was
    tree: dict[str, Any]
    # each stored entry by its dotted key, in the order it was saved
    entries: dict[str, Any]


def read_checkpoint(folder: Path) -> Checkpoint:
    """What ``dcp.save`` was given, rebuilt from ``.metadata`` and the non-tensor entries."""
    data = read_bounded(folder / METADATA, MAX_PICKLE_BYTES, "DCP .metadata pickle")
    metadata = unpickle_dcp_metadata(data, folder)
    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(metadata, records.Metadata) or not isinstance(items, dict):
        raise CheckpointError(folder, "its .metadata holds no DCP Metadata")
    leaves: dict[str, Any] = {}
    pickled = []
    for key, meta in items.items():
        if not isinstance(key, str):
            raise CheckpointError(folder, f"its .metadata has a {type(key).__name__} key")
        if isinstance(meta, records.BytesStorageMetadata):
            pickled.append(key)
            continue
        dtype = getattr(getattr(meta, "properties", None), "dtype", None)
        size = getattr(meta, "size", None)
        if not (
            isinstance(meta, records.TensorStorageMetadata)
            and isinstance(dtype, records.dtype)
            and _is_shape(size)
        ):
            raise CheckpointError(folder, f"its .metadata entry {key[:200]!r} is not valid")
        leaves[key] = TensorMeta(tuple(size), dtype.name)
    values = _pickled_values(folder, metadata, pickled, len(items))
    paths = getattr(metadata, "planner_data", None)
    entries = {key: values[key] if key in values else leaves[key] for key in items}
    tree: dict[Any, Any] = {}
    for key, leaf in entries.items():  # in the order dcp.save wrote them: state_dict order
        path = paths.get(key) if isinstance(paths, dict) else None
        _insert(folder, tree, _checked_path(folder, key, path), leaf)
    rebuilt = _lists(tree)
    assert isinstance(rebuilt, dict)
    return Checkpoint(rebuilt, entries)


def _checked_path(folder: Path, key: str, path: Any) -> tuple[str | int, ...]:
    """The path ``dcp.save`` flattened ``key`` from; the key itself where the planner
    recorded none (a planner that does not flatten)."""
    if path is None:
        return (key,)
    if (
        not isinstance(path, tuple)
        or not 0 < len(path) <= MAX_DIMS
        or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in path)
        or ".".join(map(str, path)) != key
    ):
        raise CheckpointError(
            folder, f"its .metadata gives {key[:200]!r} a path that is not its own"
        )
    return path


def _insert(folder: Path, tree: dict[Any, Any], path: tuple[str | int, ...], leaf: Any) -> None:
    node = tree
    for step in path[:-1]:
        node = node.setdefault(step, {})
        if not isinstance(node, dict):
            raise CheckpointError(folder, f"its .metadata nests an entry inside {step!r}, a value")
    if path[-1] in node:
        raise CheckpointError(
            folder, f"its .metadata has two entries at {'.'.join(map(str, path))!r}"
        )
    node[path[-1]] = leaf


def _lists(node: Any) -> Any:
    """The nodes a list was flattened from (steps 0, 1, ... n-1) made lists again; any
    other node stays a mapping (one keyed by ints too: a torch that kept int keys)."""
    if not isinstance(node, dict):
        return node
    children = {step: _lists(child) for step, child in node.items()}
    if list(children) != list(range(len(children))):
        return children
    return list(children.values())


def _pickled_values(folder: Path, metadata: Any, keys: list[str], entries: int) -> dict[str, Any]:
    """Each non-tensor entry's value, read from where ``storage_data`` puts it.

    Bounded as a ``torch.save`` archive's ``data.pkl`` is (a fixed allowance and one per
    entry): hyperparameters and parameter names take kilobytes.
    """
    if not keys:
        return {}
    wanted = set(keys)
    where: dict[str, Any] = {}
    storage = getattr(metadata, "storage_data", None)
    for index, info in storage.items() if isinstance(storage, dict) else ():
        fqn = getattr(index, "fqn", None)
        if isinstance(fqn, str) and fqn in wanted:
            where[fqn] = info
    budget = min(MAX_PICKLE_BYTES, PICKLE_BYTES_BASE + PICKLE_BYTES_PER_RECORD * entries)
    cost = Budget(PICKLE_COST_BASE)  # all of them together: each kept, none may spend it all
    values = {}
    for key in keys:
        info = where.get(key)
        file, offset, length = (
            getattr(info, f, None) for f in ("relative_path", "offset", "length")
        )
        if not (
            isinstance(file, str)
            and file not in ("", ".", "..")
            and "/" not in file
            and "\\" not in file
            and _is_count(offset)
            and _is_count(length)
        ):
            raise CheckpointError(folder, f"its .metadata does not say where {key[:200]!r} is")
        budget -= length
        if budget < 0:
            raise CheckpointError(
                folder, "its non-tensor entries claim more bytes than a checkpoint's values need"
            )
        values[key] = _value(folder / file, key, offset, length, info, cost)
    return values


# where a StorageInfo puts an entry's bytes: a data file beside .metadata, a start, a size
_WHERE = ("relative_path", "offset", "length")


def _value(path: Path, key: str, offset: int, length: int, info: Any, cost: Budget) -> Any:
    """One non-tensor entry: what its ``torch.save`` archive holds, or its raw bytes where
    torch's weights-only rules refuse it or only torch can read it."""
    size = require_regular_file(path, what="DCP data file").st_size
    if offset + length > size:
        raise CheckpointError(path, f"the entry {key[:200]!r} runs past the end of the file")
    with open_regular(path) as f:
        f.seek(offset)
        blob = f.read(length)
    if getattr(info, "transform_descriptors", None):  # compressed, ...: DCP's extensions
        return blob
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            infos = archive.infolist()
            data_pkl = next((i for i in infos if i.filename.endswith("data.pkl")), None)
            if data_pkl is None or data_pkl.compress_type != zipfile.ZIP_STORED:
                raise zipfile.BadZipFile("no stored data.pkl")
            data = archive.read(data_pkl)  # stored: no larger than the blob
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            UnicodeDecodeError, NotImplementedError):  # fmt: skip
        raise CheckpointError(
            path, f"the entry {key[:200]!r} at byte {offset} is not a torch.save archive"
        ) from None

    def no_storage(pid: Any) -> Any:
        raise records.NeedsTorch("a tensor inside a non-tensor entry")

    try:
        return unpickle_torch_records(data, path, no_storage, cost)
    except (records.NeedsTorch, CheckpointError):
        return blob


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_DIM


def _is_shape(size: Any) -> TypeGuard[tuple[int, ...]]:
    return (
        isinstance(size, tuple)
        and len(size) <= MAX_DIMS
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in size)
    )
