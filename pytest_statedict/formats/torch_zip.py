"""``torch.save`` zip archives (``readers.torch_zip``): loaded memory-mapped, or, for
``statedict show``, read without torch.

Recognised by the zip magic. ``schema_of`` and the gate load the archive with ``torch.load``
(``mmap=True``, under the unpickling policy): tensor data stays on disk, and torch's own
objects (module versions, tensor subclasses) come back as they are. :meth:`read_schema`
serves the command line alone: the archive's ``data.pkl`` read into ``readers.records``
with torch's weights-only rules re-implemented, and walked with the same ``layout``
functions as ``extract`` walks torch tensors, so the schema is the one ``schema_of(path)``
gives (tests compare the two); anything records cannot stand for raises ``NeedsTorch``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import hide_from_bad_input
from ..layout import KindOf, StorageViews, Tensors, mapping_schema, type_name
from ..readers import records
from ..readers import torch_zip as reader
from ..schema import Schema
from ..schema_entries import StateSpec, TensorEntry
from .base import Loaded, NeedsLoading, NestedSchema, object_schema, unsupported_object

__all__ = ["FORMAT", "SMALL_TENSOR", "TORCH_ZIP", "RecordTensors", "TorchZipFile"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

TORCH_ZIP = "torch zip"
# A tensor hyperparameter of at most this many elements is kept by value (as extract does).
SMALL_TENSOR = 16


class TorchZipFile:
    """A ``torch.save`` zip archive (a TorchScript archive is recognised and refused)."""

    name = TORCH_ZIP
    schema_first = False
    torch_free = True

    def detect(self, path: Path, head: bytes | None) -> bool:
        return head is not None and head.startswith(reader.ZIP_MAGIC)

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        if values:
            raise NeedsLoading("tensor values")
        obj, locations = reader.read_records(path, path.stat().st_size)
        tensors = RecordTensors(path)

        def describe(obj: Any, values: bool) -> Schema:
            if not isinstance(obj, dict):
                raise unsupported_object(obj)
            return mapping_schema(obj, tensors, values=values)

        return object_schema(path, obj, locations, describe=describe, values=False, part=part)

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        obj, locations = reader.load(
            path, path.stat().st_size, map_location=map_location, weights_only=weights_only,
            mmap=mmap,
        )  # fmt: skip
        return Loaded(obj, frozenset(locations))

    def save(self, state: Mapping[str, Any], path: Path) -> None:
        import torch

        torch.save(state, path)


class RecordTensors(Tensors):
    """The tensor records of one archive, to the walks of ``layout``."""

    types = (records.Tensor,)

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(
        self, state: Mapping[str, Any], kind_of: KindOf, *, values: bool
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
                tied_to = views.add(storage, _nbytes_of(storage), key, value.nbytes)
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
            return {"tensor": reader.tensor_values(self.path, tensor), "dtype": tensor.dtype}
        return {"tensor_shape": list(tensor.shape), "dtype": tensor.dtype}


def _nbytes_of(storage: records.Storage) -> Callable[[], int]:
    """The size of a storage, for ``StorageViews`` (which asks only for a new storage)."""
    return lambda: storage.nbytes


FORMAT = TorchZipFile()
