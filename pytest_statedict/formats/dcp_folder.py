"""``torch.distributed.checkpoint`` folders, read from their ``.metadata`` (``readers.dcp_folder``).

A folder holding ``.metadata``, or that file itself (it names its folder). Its schema is the
whole layout, so the gate rebuilds meta tensors from it; the folder is never loaded whole
(``torch.distributed.checkpoint.load`` reads into a model's own tensors, not into a dict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..readers import dcp_folder as reader
from ..readers.files import require_regular_file
from ..schema import Schema
from .base import Loaded, NestedSchema

__all__ = ["DCP", "FORMAT", "DcpFolder"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

DCP = "dcp"


class DcpFolder:
    """A DCP checkpoint folder."""

    name = DCP
    schema_first = True
    torch_free = True
    save = None

    def detect(self, path: Path, head: bytes | None) -> bool:
        if head is None:
            return (path / reader.METADATA).exists()
        if path.name == reader.METADATA:
            require_regular_file(path)  # an unreadable .metadata: its own error, here
            return True
        return False

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        folder = _folder(path)
        if values:
            raise CheckpointError(folder, "values=True is not supported for DCP checkpoints")
        return reader.read_schema(folder, part=part)

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        raise CheckpointError(
            _folder(path),
            "is a torch.distributed.checkpoint folder: it is read from its .metadata, never "
            "loaded whole (torch.distributed.checkpoint.load reads it into a model)",
        )


def _folder(path: Path) -> Path:
    """The folder of a DCP checkpoint named by itself or by its ``.metadata``."""
    return path.parent if path.name == reader.METADATA and not path.is_dir() else path


FORMAT = DcpFolder()
