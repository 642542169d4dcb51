"""Which reader reads a path: the format recognised by name and by content.

* a folder: a DCP folder (it has ``.metadata``), or a folder with one ``*.index.json``;
* ``.metadata``: the DCP folder it indexes;
* ``*.index.json`` (e.g. ``model.safetensors.index.json``): a sharded index, never a snapshot;
* any other ``.json``: a statedict snapshot;
* otherwise by the first bytes: a zip archive (``torch.save``, or TorchScript: refused), a
  pickle (a legacy ``torch.save`` file), a safetensors header (by name or by content).

Nothing is read here beyond a file's first bytes; each format's module says what it reads
and may unpickle. A ``pytest_statedict_load_checkpoint`` hook is a ``loader`` handed in by
the caller (``runtime.checkpoint_loader()``): this layer never looks up the running session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from . import safetensors_file, torch_legacy, torch_zip
from .dcp_folder import METADATA
from .files import FORMATS_READ, magic_hex, open_regular, require_regular_file
from .hf_index import INDEX_SUFFIX

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# What a pytest_statedict_load_checkpoint hook made of a path (None: no hook claimed it).
CheckpointLoader = Callable[[Path], Any]

DCP, INDEX, SNAPSHOT = "dcp", "index", "snapshot"
SAFETENSORS, TORCH_ZIP, TORCH_LEGACY = "safetensors", "torch zip", "torch legacy"


def from_hook(path: Path, loader: CheckpointLoader | None) -> Any:
    """What the caller's hook makes of ``path`` (None: no hook, or none claimed it)."""
    if loader is None or not path.exists():
        return None
    return loader(path)


def is_snapshot_name(path: Path) -> bool:
    return path.suffix == ".json" and not path.name.endswith(INDEX_SUFFIX)


def detect(path: Path) -> tuple[str, Path]:
    """The format of ``path`` and the path its reader reads (a folder's index, ...)."""
    if path.is_dir():
        if (path / METADATA).exists():
            return DCP, path
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) == 1:
            return INDEX, indexes[0]
        raise CheckpointError(
            path,
            "is a directory but neither a torch.distributed.checkpoint folder (no .metadata) "
            f"nor a sharded checkpoint with one *{INDEX_SUFFIX}",
        )
    if path.name == METADATA:
        require_regular_file(path)
        return DCP, path.parent
    if path.name.endswith(INDEX_SUFFIX):
        return INDEX, path
    if path.suffix == ".json":
        return SNAPSHOT, path
    return file_format(path), path


def file_format(path: Path) -> str:
    """The format of one checkpoint file, from its first bytes (and its name for safetensors)."""
    size = require_regular_file(path).st_size
    with open_regular(path) as f:
        head = f.read(16)
    if head.startswith(torch_zip.ZIP_MAGIC):
        return TORCH_ZIP
    # before the pickle's: a safetensors header length of 128 + 256k starts with \x80 too
    if safetensors_file.looks_like_safetensors(head, size):
        return SAFETENSORS
    if head.startswith(torch_legacy.PICKLE_MAGIC):
        return TORCH_LEGACY
    if path.suffix == ".safetensors":
        return SAFETENSORS
    raise CheckpointError(
        path,
        f"not a checkpoint: it starts with the bytes {magic_hex(head)}, neither {FORMATS_READ}",
    )


def load_file(
    path: Path,
    *,
    loader: CheckpointLoader | None = None,
    map_location: Any = None,
    weights_only: bool = True,
    mmap: bool = True,
) -> tuple[Any, set[str]]:
    """The object one checkpoint file holds, and the locations its storages were saved on.

    A hook's object if the caller's ``loader`` claims the path; else the file is read by
    its format's reader (``weights_only=False`` only when the caller passes it by name).
    """
    custom = from_hook(path, loader)
    if custom is not None:
        return custom, set()
    fmt = file_format(path)
    if fmt == SAFETENSORS:
        device = "cpu" if map_location is None else str(map_location)
        return safetensors_file.load(path, device), set()
    if fmt == TORCH_ZIP:
        size = path.stat().st_size
        return torch_zip.load(
            path, size, map_location=map_location, weights_only=weights_only, mmap=mmap
        )
    return torch_legacy.load(path, map_location=map_location, weights_only=weights_only)
