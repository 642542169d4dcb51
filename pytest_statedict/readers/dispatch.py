"""Which reader reads a path: the format recognised by name and by content.

* a folder: a DCP folder (it has ``.metadata``); else the one checkpoint it holds (see
  :func:`folder_checkpoint`: a Hugging Face ``save_pretrained`` folder is its weights file
  or its index), or an error listing the candidates when it holds several;
* ``.metadata``: the DCP folder it indexes;
* ``*.index.json`` (e.g. ``model.safetensors.index.json``), or any ``.json`` whose first
  bytes hold a ``"weight_map"`` and no snapshot header: a sharded index, never a snapshot;
* any other ``.json``: a statedict snapshot;
* otherwise by the first bytes: a zip archive (``torch.save``, or TorchScript: refused), a
  pickle (a legacy ``torch.save`` file), a safetensors header (by name or by content).

Nothing is read here beyond a file's first bytes and a folder's listing; each format's
module says what it reads and may unpickle. A ``pytest_statedict_load_checkpoint`` hook is
a ``loader`` handed in by the caller (``runtime.checkpoint_loader()``): this layer never
looks up the running session.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..schema import FORMAT_NAME
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


def detect(path: Path) -> tuple[str, Path]:
    """The format of ``path`` and the path its reader reads (a folder's checkpoint, ...)."""
    if path.is_dir():
        if (path / METADATA).exists():
            return DCP, path
        path = folder_checkpoint(path)
    if path.name == METADATA:
        require_regular_file(path)
        return DCP, path.parent
    if path.name.endswith(INDEX_SUFFIX) or (path.suffix == ".json" and looks_like_index(path)):
        return INDEX, path
    if path.suffix == ".json":
        return SNAPSHOT, path
    return file_format(path), path


# Files a folder may hold a model's weights in (``save_pretrained``, ``torch.save``), and
# the shards of a sharded one (``model-00001-of-00004.safetensors``), which its index reads.
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SHARD = re.compile(r"-\d+-of-\d+\.[^.]+$")
# The weights files of Hugging Face libraries (transformers ``model.safetensors`` and
# ``pytorch_model.bin``, diffusers ``diffusion_pytorch_model.*``, PEFT ``adapter_model.*``):
# a Trainer's checkpoint folder also holds ``optimizer.pt``, ``scheduler.pt``,
# ``rng_state.pth`` and ``training_args.bin``, which are not the model.
_WEIGHTS = re.compile(r"(^|_)model\.(safetensors|bin)(\.index\.json)?$")
# Candidates named in an error before "and N more".
SHOWN_CANDIDATES = 10


def folder_checkpoint(folder: Path) -> Path:
    """The one checkpoint a folder holds: its index, or its weights file.

    Its indexes (``*.index.json``) and the checkpoint files beside them that are no shard
    are the candidates; the Hugging Face weights names among them (``model.safetensors``,
    ``pytorch_model.bin``, their indexes, ...) win over other files (``optimizer.pt``). One
    candidate is the checkpoint; several are an error that lists them, for the caller to
    name one (a Hub download often has ``model.safetensors`` and ``pytorch_model.bin``).
    """
    try:
        names = sorted(
            entry.name
            for entry in os.scandir(folder)
            if (entry.name.endswith(INDEX_SUFFIX) or entry.name.endswith(CHECKPOINT_SUFFIXES))
            and not _SHARD.search(entry.name)
            and _is_regular(Path(entry.path))
        )
    except OSError as exc:
        raise CheckpointError(folder, f"is a directory that cannot be listed ({exc})") from None
    weights = [n for n in names if _WEIGHTS.search(n)]
    candidates = weights or names
    if len(candidates) == 1:
        return folder / candidates[0]
    if not candidates:
        raise CheckpointError(
            folder,
            "is a directory holding no checkpoint: no torch.distributed.checkpoint .metadata, "
            f"no sharded index *{INDEX_SUFFIX} and no {', '.join(CHECKPOINT_SUFFIXES)} file",
        )
    shown = ", ".join(candidates[:SHOWN_CANDIDATES])
    if len(candidates) > SHOWN_CANDIDATES:
        shown += f" and {len(candidates) - SHOWN_CANDIDATES} more"
    raise CheckpointError(
        folder,
        f"is a directory holding {len(candidates)} checkpoints ({shown}): name the one to "
        f"read, e.g. {folder / candidates[0]}",
    )


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)  # a symlink: what it points to
    except OSError:
        return False


# Bytes of a ``.json`` read to tell a sharded index from a snapshot: an index's "metadata"
# (its total size) comes before its "weight_map"; a snapshot's header is its first line.
INDEX_SNIFF_BYTES = 1 << 16


def looks_like_index(path: Path) -> bool:
    """A JSON file whose first bytes hold a ``"weight_map"`` and no snapshot header.

    Anything that cannot be read here (a FIFO, a folder) is left to the snapshot reader,
    whose errors name it.
    """
    if not _is_regular(path):
        return False
    try:
        with open_regular(path) as f:
            head = f.read(INDEX_SNIFF_BYTES)
    except (OSError, CheckpointError):
        return False
    return b'"weight_map"' in head and FORMAT_NAME.encode() not in head


def file_format(path: Path) -> str:
    """The format of one checkpoint file, from its first bytes (and its name for safetensors)."""
    size = require_regular_file(path).st_size
    with open_regular(path) as f:
        head = f.read(16)
    if head.startswith(torch_zip.ZIP_MAGIC):
        return TORCH_ZIP
    # before the pickle's one-byte magic: a header of 0x..80 bytes starts with that byte too
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
