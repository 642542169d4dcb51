"""``torch.save`` zip archives (torch >= 1.6): checked record by record, then loaded with
``mmap=True`` under the unpickling policy (``torch.load(weights_only=True)`` unless the caller
passes ``weights_only=False`` by name; see ``unpickling``).

Before torch reads a byte, the archive's central directory is checked: ``torch.save`` never
compresses, so a compressed record (a zip bomb: 2 MB expanding to gigabytes), a record
whose declared size differs from its stored size or runs past the end of the file, a
``data.pkl`` above :data:`~.limits.MAX_PICKLE_BYTES` or more than
:data:`~.limits.MAX_RECORDS` records are refused. The tensor bytes then stay on disk (memory
mapped): time and memory grow with the number of tensors, not their bytes. A TorchScript
archive (``torch.jit.save``) is recognised and refused with what to use instead.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointError, hide_from_bad_input
from .files import open_regular
from .limits import (
    MAX_CENTRAL_DIRECTORY_BYTES,
    MAX_PICKLE_BYTES,
    MAX_RECORDS,
    PICKLE_BYTES_BASE,
    PICKLE_BYTES_PER_RECORD,
)
from .unpickling import torch_load

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

ZIP_MAGIC = b"PK\x03\x04"
_END = b"PK\x05\x06"  # end of central directory record
_END64_LOCATOR = b"PK\x06\x07"
_END64 = b"PK\x06\x06"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # ends with the name and extra field lengths


def check_archive(path: Path, size: int) -> zipfile.ZipInfo:
    """Refuse what torch must not read; return the record of the archive's ``data.pkl``."""
    _check_central_directory_size(path, size)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            struct.error, UnicodeDecodeError, NotImplementedError):  # fmt: skip
        raise CheckpointError(
            path,
            "a zip archive with no readable central directory: the file is truncated (a "
            "torch.save that was cut short, or an incomplete download) or corrupt",
        ) from None
    if len(records) > MAX_RECORDS:
        raise CheckpointError(path, f"a zip archive of {len(records):,} records, too many")
    names = [r.filename for r in records]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(
            path,
            "a TorchScript archive (torch.jit.save), not a state_dict checkpoint: load it with "
            "torch.jit.load; the plugin reads torch.save checkpoints (save "
            "`model.state_dict()` with torch.save)",
        )
    data_pkl = next((r for r in records if r.filename.endswith("data.pkl")), None)
    if data_pkl is None:
        raise CheckpointError(
            path, "a zip archive but not a torch.save checkpoint (it has no data.pkl record)"
        )
    with open_regular(path) as f:
        for record in records:
            problem = _record_problem(f, record, size)
            if problem:
                raise CheckpointError(
                    path, f"record {record.filename[:100]!r} {problem}: not written by torch.save"
                )
    allowed = min(MAX_PICKLE_BYTES, PICKLE_BYTES_BASE + PICKLE_BYTES_PER_RECORD * len(records))
    if data_pkl.file_size > allowed:
        raise CheckpointError(
            path,
            f"its data.pkl claims {data_pkl.file_size:,} bytes, more than the pickle of a "
            f"checkpoint with {len(records):,} records may have ({allowed:,}): it holds far "
            "more than tensors",
        )
    return data_pkl


def _record_problem(f: BinaryIO, record: zipfile.ZipInfo, size: int) -> str | None:
    """What is wrong with a record's sizes: its data must lie whole inside the file (a
    memory-mapped tensor read past the end of the file would crash the process)."""
    if record.compress_type != zipfile.ZIP_STORED:
        return "is compressed (torch.save stores records uncompressed)"
    if record.file_size != record.compress_size:
        return f"declares {record.file_size:,} bytes but stores {record.compress_size:,}"
    if not 0 <= record.header_offset < size:
        return "has no local header where the directory says"
    f.seek(record.header_offset)
    local = f.read(_LOCAL_HEADER.size)
    if len(local) < _LOCAL_HEADER.size or not local.startswith(ZIP_MAGIC):
        return "has no local header where the directory says"
    name_length, extra_length = _LOCAL_HEADER.unpack(local)[-2:]
    data_start = record.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if data_start + record.compress_size > size:
        return "runs past the end of the file"
    return None


def _check_central_directory_size(path: Path, size: int) -> None:
    """Refuse a central directory larger than the limit before zipfile reads it whole."""
    with open_regular(path) as f:
        tail_start = max(0, size - (1 << 16) - 22)
        f.seek(tail_start)
        tail = f.read()
        end = tail.rfind(_END)
        if end < 0 or len(tail) - end < 22:
            return  # zipfile reports it (no end record)
        directory_bytes = struct.unpack_from("<L", tail, end + 12)[0]
        locator = end - 20
        if (
            directory_bytes == 0xFFFFFFFF
            and locator >= 0
            and tail[locator:].startswith(_END64_LOCATOR)
        ):
            offset = struct.unpack_from("<Q", tail, locator + 8)[0]
            if offset + 56 <= size:
                f.seek(offset)
                record = f.read(56)
                if record.startswith(_END64):
                    directory_bytes = struct.unpack_from("<Q", record, 40)[0]
    if directory_bytes > min(size, MAX_CENTRAL_DIRECTORY_BYTES):
        raise CheckpointError(
            path,
            f"its zip central directory claims {directory_bytes:,} bytes, more than the file "
            f"or the limit ({MAX_CENTRAL_DIRECTORY_BYTES:,}) allows: corrupt",
        )


def load(
    path: Path, size: int, *, map_location: Any, weights_only: bool, mmap: bool
) -> tuple[Any, set[str]]:
    """The object a checked archive holds, memory-mapped; and its storages' saved locations."""
    data_pkl = check_archive(path, size)

    def data_pickle() -> bytes:
        try:
            with zipfile.ZipFile(path) as archive:
                return archive.read(data_pkl)  # bounded by check_archive, stored uncompressed
        except (zipfile.BadZipFile, OSError, ValueError):
            return b""

    return torch_load(
        path,
        map_location=map_location,
        weights_only=weights_only,
        mmap=mmap,
        data_pickle=data_pickle,
    )
