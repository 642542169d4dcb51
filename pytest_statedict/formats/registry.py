"""Which format reads a path: the registered formats, asked in order.

The order is third-party formats first (entry-point group :data:`ENTRY_POINT_GROUP`, by
entry-point name), then the built-ins of :data:`BUILTIN_FORMATS`. Third-party formats come
first so that one can claim what a built-in would otherwise take: a suffix (``.ckpt``), a
zip-based format (which the ``torch.save`` format would claim by its magic), a ``.json``
(which would otherwise be read as a snapshot). The built-ins recognise their files by
content, so a third-party format sees only what it claims; asking it first costs one
``detect`` call per read.

Entry points are read once, on the first read of a checkpoint (never when the plugin or
the package is imported: a pytest run that uses no statedict feature neither scans them nor
imports torch). A broken one (an import error, an object that is no format) is a
:class:`FormatPluginError` naming it, on every read: a format that claims a suffix must not
silently fall back to a built-in that reads the file differently.

Paths: a folder is offered to every format first (``detect(folder, None)``: a DCP folder, a
third-party folder format); a folder no format claims stands for the one checkpoint file it
holds (:func:`folder_checkpoint`). A file is offered with its first :data:`HEAD_BYTES`.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, StateDictError, first_line, hide_from_bad_input
from ..readers.files import FORMATS_READ, magic_hex, open_regular, require_regular_file
from ..readers.hf_index import INDEX_SUFFIX
from . import (
    dcp_folder,
    peft_adapter,
    safetensors_file,
    sharded_index,
    snapshot,
    torch_legacy,
    torch_zip,
    training_folder,
)
from .base import CheckpointFormat

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = [
    "BUILTIN_FORMATS",
    "CHECKPOINT_SUFFIXES",
    "ENTRY_POINT_GROUP",
    "HEAD_BYTES",
    "FormatPluginError",
    "detect",
    "folder_checkpoint",
    "format_named",
    "registered_formats",
]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

ENTRY_POINT_GROUP = "pytest_statedict.formats"

# In the order they are asked: by name first (a DCP folder or its .metadata, a training
# framework's checkpoint folder, a PEFT adapter folder or its adapter_config.json, a sharded
# index, then any other .json), then by content: the zip magic, a safetensors header (before
# the pickle's one-byte magic, which such a header can start with), a pickle.
BUILTIN_FORMATS: tuple[CheckpointFormat, ...] = (
    dcp_folder.FORMAT,
    training_folder.FORMAT,
    peft_adapter.FORMAT,
    sharded_index.FORMAT,
    snapshot.FORMAT,
    torch_zip.FORMAT,
    safetensors_file.FORMAT,
    torch_legacy.FORMAT,
)

# Bytes of a file handed to ``detect``: enough for a sharded index's "weight_map" after its
# "metadata" (its total size), which is how an index not named *.index.json is told from
# a snapshot.
HEAD_BYTES = 1 << 16

# What a format object must have (CheckpointFormat's members).
_MEMBERS = ("name", "schema_first", "torch_free", "detect", "read_schema", "load", "save")


class FormatPluginError(StateDictError):
    """A third-party checkpoint format that cannot be used: its entry point is named."""

    def __init__(self, entry_point: EntryPoint, problem: str) -> None:
        dist = getattr(entry_point, "dist", None)
        source = f" of the distribution {dist.name} {dist.version}" if dist is not None else ""
        super().__init__(
            f"checkpoint format entry point {entry_point.name} = {entry_point.value} (group "
            f"{ENTRY_POINT_GROUP}){source}: {problem}. No checkpoint is read while an "
            "installed format is broken (it may claim files a built-in would read otherwise): "
            "fix or uninstall that distribution"
        )


@functools.cache
def registered_formats() -> tuple[CheckpointFormat, ...]:
    """Every format, in the order they are asked: third-party ones, then the built-ins."""
    return (*_third_party_formats(), *BUILTIN_FORMATS)


def _third_party_formats() -> list[CheckpointFormat]:
    if not _group_declared():
        return []
    from importlib.metadata import entry_points

    seen = set()
    found = []
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if (entry_point.name, entry_point.value) in seen:  # a distribution on the path twice
            continue
        seen.add((entry_point.name, entry_point.value))
        found.append(_load_format(entry_point))
    return found


def _group_declared() -> bool:
    """Whether a distribution on ``sys.path`` may declare the entry-point group.

    Inside pytest ``importlib.metadata`` is already imported (pytest loads its plugins
    through it), and it is asked. The command line would import it only to find, as almost
    everywhere, no format installed: it brings in the ``email`` package and costs about a
    third of a ``statedict show``. So the one file it would read for the group, each
    distribution's ``entry_points.txt``, is looked at first for the group's header; a path
    entry that is no folder (a zipped egg) is left to ``importlib.metadata``.
    """
    if "importlib.metadata" in sys.modules:
        return True
    header = f"[{ENTRY_POINT_GROUP}]".encode()
    for entry in sys.path:
        folder = entry or os.curdir
        try:
            with os.scandir(folder) as listing:
                found = [e.path for e in listing if e.name.endswith((".dist-info", ".egg-info"))]
        except NotADirectoryError:
            return True  # a zip on the path: only importlib.metadata reads inside it
        except OSError:
            continue
        for dist in found:
            try:
                with open(os.path.join(dist, "entry_points.txt"), "rb") as f:
                    if header in f.read():
                        return True
            except OSError:
                continue
    return False


def _load_format(entry_point: EntryPoint) -> CheckpointFormat:
    """The format an entry point names: an object with the protocol's members, or a class
    that makes one when called without arguments."""
    try:
        obj = entry_point.load()
        if isinstance(obj, type):
            obj = obj()
    except Exception as exc:
        raise FormatPluginError(entry_point, f"cannot be loaded ({first_line(exc)})") from None
    missing = [member for member in _MEMBERS if not hasattr(obj, member)]
    if missing:
        raise FormatPluginError(
            entry_point,
            f"names a {type(obj).__qualname__}, which is no checkpoint format: it lacks "
            f"{', '.join(missing)} (see pytest_statedict.formats.CheckpointFormat)",
        )
    if not isinstance(obj.name, str) or not obj.name:
        raise FormatPluginError(entry_point, "its format has no name (a non-empty str)")
    fmt: CheckpointFormat = obj
    return fmt


def format_named(name: str) -> CheckpointFormat:
    """The first registered format called ``name`` (e.g. to ``save`` in it)."""
    for fmt in registered_formats():
        if fmt.name == name:
            return fmt
    names = ", ".join(f.name for f in registered_formats())
    raise StateDictError(f"no checkpoint format is named {name!r}; the formats are: {names}")


def detect(path: Path) -> tuple[CheckpointFormat, Path]:
    """The format of ``path`` and the path it reads (a folder's checkpoint file, ...)."""
    formats = registered_formats()
    if path.is_dir():
        for fmt in formats:
            if fmt.detect(path, None):
                return fmt, path
        path = folder_checkpoint(path)
    head = _head(path)
    for fmt in formats:
        if fmt.detect(path, head):
            return fmt, path
    require_regular_file(path)  # a path that cannot be read: that is what is wrong with it
    others = [f.name for f in formats if f not in BUILTIN_FORMATS]
    also = f", nor of the installed formats {', '.join(others)}" if others else ""
    raise CheckpointError(
        path,
        f"not a checkpoint: it starts with the bytes {magic_hex(head)}, neither {FORMATS_READ}"
        + also,
    )


def _head(path: Path) -> bytes:
    """The first bytes of a regular file; b"" where it cannot be read (the format that
    claims it by name then says why, or :func:`detect` does)."""
    try:
        # a symlink: what it points to; unreadable: as ``require_regular_file`` sees it
        if not stat.S_ISREG(path.stat().st_mode) or not os.access(path, os.R_OK):
            return b""
        with open_regular(path) as f:
            return f.read(HEAD_BYTES)
    except (OSError, CheckpointError):
        return b""


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
    A third-party format's files are not looked for here: name the file, or claim the
    folder in the format's ``detect``.
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
