"""``.safetensors`` files (``readers.safetensors_file``): the schema from the JSON header.

Recognised by content (an 8-byte little-endian header length that fits the file, then a
JSON object), or by the suffix ``.safetensors`` for a file that is no zip and no pickle
(whose reader then says what is wrong with its header). A ``part`` or ``values=True`` needs
the tensors: the file is loaded, memory-mapped by the safetensors package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UnsupportedFormatError, hide_from_bad_input
from ..readers import safetensors_file as reader
from ..readers.torch_legacy import PICKLE_MAGIC
from ..schema import Schema
from .base import Loaded, NeedsLoading, NestedSchema

__all__ = ["FORMAT", "SAFETENSORS", "SafetensorsFile"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

SAFETENSORS = "safetensors"


class SafetensorsFile:
    """A ``.safetensors`` file."""

    name = SAFETENSORS
    schema_first = True
    torch_free = True

    def detect(self, path: Path, head: bytes | None) -> bool:
        if not head:
            return False
        # before the pickle's one-byte magic: a header of 0x..80 bytes starts with that byte
        if reader.looks_like_safetensors(head, path.stat().st_size):
            return True
        return path.suffix == ".safetensors" and not head.startswith(PICKLE_MAGIC)

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        if part is not None or values:
            raise NeedsLoading("a part or the values of a .safetensors file")
        return reader.read_schema(path)

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        device = "cpu" if map_location is None else str(map_location)
        # the writer sorts the keys: state_dict order is lost
        return Loaded(reader.load(path, device), ordered=False)

    def save(self, state: Mapping[str, Any], path: Path) -> None:
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UnsupportedFormatError(
                "writing .safetensors needs the optional dependency: "
                "pip install 'pytest-statedict[safetensors]'"
            ) from None
        save_file(dict(state), str(path))


FORMAT = SafetensorsFile()
