"""Schemas of checkpoint files without importing torch: what ``statedict show`` and
``statedict diff`` read.

Importing torch costs ~1.7 s, nearly all of a CLI run. So the CLI reads each format
without it: a ``torch.save`` zip archive's ``data.pkl`` with torch's weights-only rules
re-implemented (``readers.unpickling.unpickle_torch_records``: the same opcodes, globals
and checks, records where torch builds tensors), ``.safetensors`` headers, sharded indexes,
DCP ``.metadata`` (read by its own allowlist unpickler), snapshots; and walks what it read
with the same ``layout`` functions as ``extract``, so the schema is the one
``schema_of(path)`` gives (tests compare the two on every format).

torch is imported only where a file needs it: a legacy (pre-1.6) ``torch.save`` file, a
``part`` of a ``.safetensors`` file,
anything the records cannot stand for (quantized, sparse or nested tensors, tensor
subclasses, a global torch allows that they do not model: ``records.NeedsTorch``), and a
``pytest_statedict_load_checkpoint`` hook of a running pytest session. Then the file is
read by ``extract.schema_of_file``, exactly as ``schema_of`` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedObjectError, hide_from_bad_input
from .layout import StorageViews, Tensors, mapping_schema, select_part, type_name
from .readers import (
    dcp_folder,
    dispatch,
    hf_index,
    records,
    safetensors_file,
    snapshot_file,
    torch_zip,
)
from .runtime import checkpoint_loader
from .schema import Schema, StateSpec, TensorEntry

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# A tensor hyperparameter of at most this many elements is kept by value (as extract does).
SMALL_TENSOR = 16


def schema_of_file(path: str | os.PathLike[str], *, part: str | None = None) -> Schema:
    """``schema_of(path, part=part)``, importing torch only for a file that needs it."""
    path = Path(path)
    if checkpoint_loader() is None:
        try:
            return _read(path, part)
        except records.NeedsTorch:
            pass
    from .extract import schema_of_file as read_with_torch

    return read_with_torch(path, part=part, loader=checkpoint_loader())


def _read(path: Path, part: str | None) -> Schema:
    fmt, where = dispatch.detect(path)
    if fmt == dispatch.DCP:
        return dcp_folder.read_schema(where, part=part)
    if fmt == dispatch.INDEX:
        if part is not None:
            raise CheckpointError(where, "a sharded checkpoint has no parts to choose from")
        return hf_index.sharded_schema(where, lambda shard: _single_file(shard, None))
    if fmt == dispatch.SNAPSHOT:
        if part:
            raise CheckpointError(where, "a snapshot holds one schema, without values or parts")
        return snapshot_file.read_snapshot(where)
    return _single_file(where, part)


def _single_file(path: Path, part: str | None) -> Schema:
    fmt = dispatch.file_format(path)
    if fmt == dispatch.SAFETENSORS and part is None:
        return safetensors_file.read_schema(path)
    if fmt != dispatch.TORCH_ZIP:
        raise records.NeedsTorch(f"a {fmt} file")
    obj, locations = torch_zip.read_records(path, path.stat().st_size)
    try:
        if part is not None:
            obj = select_part(obj, part)
        if not isinstance(obj, dict):
            raise UnsupportedObjectError(
                f"it holds a {type(obj).__module__}.{type(obj).__qualname__}, not a state_dict "
                "or a checkpoint dict"
            )
        schema = mapping_schema(obj, _RecordTensors(path))
    except UnsupportedObjectError as exc:
        raise CheckpointError(path, str(exc).removeprefix("schema_of(): ")) from None
    return replace(schema, ordered=True, saved_on=tuple(sorted(locations)), source=str(path))


class _RecordTensors(Tensors):
    """The tensor records of one archive, to the walks of ``layout``."""

    types = (records.Tensor,)

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(
        self, state: Mapping[str, Any], kind_of: Any, *, values: bool
    ) -> tuple[tuple[TensorEntry, ...], tuple[str, ...]]:
        """As ``extract`` makes them of the tensors torch.load would build: storages shared
        by key are tied, as torch's are by storage."""
        if values:
            raise records.NeedsTorch("tensor values")
        views = StorageViews()
        entries = []
        for key, value in state.items():
            if not isinstance(value, records.Tensor):
                entries.append(TensorEntry(key=key, kind="object", type=type_name(value)))
                continue
            storage = value.storage
            tied_to = None
            if value.numel:
                tied_to = views.add(storage, lambda s=storage: s.nbytes, key, value.nbytes)
            kind = kind_of(key)
            entries.append(
                TensorEntry(
                    key,
                    kind,
                    value.shape,
                    value.dtype,
                    value.requires_grad if kind == "parameter" else None,
                    tied_to,
                )
            )
        return tuple(entries), views.waste_notes()

    def spec(self, tensor: Any) -> StateSpec:
        return StateSpec(shape=tensor.shape, dtype=tensor.dtype)

    def hyperparam(self, tensor: Any) -> dict[str, Any]:
        if tensor.numel <= SMALL_TENSOR:
            return {"tensor": torch_zip.tensor_values(self.path, tensor), "dtype": tensor.dtype}
        return {"tensor_shape": list(tensor.shape), "dtype": tensor.dtype}
