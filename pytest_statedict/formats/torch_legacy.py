"""Legacy (pre-1.6, non-zip) ``torch.save`` files (``readers.torch_legacy``): a pickle.

Recognised by the pickle's first byte, after the safetensors format (a safetensors header
of 0x..80 bytes starts with that byte too). Nothing of its layout can be read without
unpickling it with torch, so it is always loaded (whole: it cannot be memory-mapped).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import hide_from_bad_input
from ..readers import torch_legacy as reader
from ..schema import Schema
from .base import Loaded, NeedsLoading, NestedSchema

__all__ = ["FORMAT", "TORCH_LEGACY", "TorchLegacyFile"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

TORCH_LEGACY = "torch legacy"


class TorchLegacyFile:
    """A legacy ``torch.save`` pickle."""

    name = TORCH_LEGACY
    schema_first = False
    torch_free = False

    def detect(self, path: Path, head: bytes | None) -> bool:
        return head is not None and head.startswith(reader.PICKLE_MAGIC)

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        raise NeedsLoading(f"a {TORCH_LEGACY} file")

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        obj, locations = reader.load(path, map_location=map_location, weights_only=weights_only)
        return Loaded(obj, frozenset(locations))

    def save(self, state: Mapping[str, Any], path: Path) -> None:
        import torch

        torch.save(state, path, _use_new_zipfile_serialization=False)


FORMAT = TorchLegacyFile()
