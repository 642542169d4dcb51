"""Legacy (pre-1.6, non-zip) ``torch.save`` files: a sequence of pickles then raw storages.

They are loaded with ``torch.load`` under the unpickling policy (``weights_only=True``:
torch's allowlist unpickler reads legacy files too, so a payload global in them is refused;
``weights_only=False`` only when the caller passes it by name; see ``unpickling``). They
cannot be memory-mapped, so unlike a zip archive they are read whole. A truncated or
damaged file (``struct.error``, ``IndexError``, ``EOFError`` inside torch) is a
:class:`CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import hide_from_bad_input
from .unpickling import torch_load

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# Every pickle starts with PROTO (protocol 2 and up); legacy torch files are protocol 2.
PICKLE_MAGIC = b"\x80"


def load(path: Path, *, map_location: Any, weights_only: bool) -> tuple[Any, set[str]]:
    """The object a legacy file holds, and its storages' saved locations."""
    return torch_load(path, map_location=map_location, weights_only=weights_only, mmap=False)
