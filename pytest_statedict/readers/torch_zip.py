"""``torch.save`` zip archives (torch >= 1.6): checked record by record, then loaded with
``mmap=True`` under the unpickling policy (``torch.load(weights_only=True)`` unless the caller
passes ``weights_only=False`` by name; see ``unpickling``).

Before torch reads a byte, the archive's central directory is checked: ``torch.save`` never
compresses, so a compressed record (a zip bomb: 2 MB expanding to gigabytes), a record
whose declared size differs from its stored size or runs past the end of the file, a
``data.pkl`` above :data:`~.limits.MAX_PICKLE_BYTES` or more than
:data:`~.limits.MAX_RECORDS` records are refused, and so is what torch's zip reader (miniz,
stricter than Python's ``zipfile``) refuses: end records that disagree on the disks or the
number of records, a directory its records overrun, an encrypted record. The tensor bytes
then stay on disk (memory mapped): time and memory grow with the number of tensors, not
their bytes. A TorchScript archive (``torch.jit.save``) is recognised and refused with what
to use instead.

:func:`read_records` reads a checked archive without torch (the command line) as
``torch.load`` reads it: the records torch checks first (version, byte order, alignment,
serialization id) checked alike, its ``data.pkl`` unpickled by
``unpickling.unpickle_torch_records``, each storage's persistent id resolved to a
:class:`records.Storage` sliced from the file as a memory-mapped load slices it, no tensor
byte read. Where the two zip readers could list different records, it hands the archive to
torch (``tests/test_differential.py`` holds the two readers side by side).

A tensor subclass of a library (torchao's quantized weights) is rebuilt by torch once that
library is imported (``tensor_libraries``): :func:`load` imports it first, and
:func:`read_records` hands such an archive to torch.
"""

from __future__ import annotations

import importlib.util
import re
import struct
import sys
import zipfile
from _compat_pickle import IMPORT_MAPPING
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointError, hide_from_bad_input
from ..schema_entries import DTYPE_ITEMSIZE
from . import records
from .files import open_regular
from .limits import (
    MAX_CENTRAL_DIRECTORY_BYTES,
    MAX_PICKLE_BYTES,
    MAX_RECORDS,
    PICKLE_BYTES_BASE,
    PICKLE_BYTES_PER_RECORD,
)
from .tensor_libraries import import_named_libraries, named_libraries
from .unpickling import check_cost, pickle_globals, torch_load, unpickle_torch_records

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

ZIP_MAGIC = b"PK\x03\x04"
_END = b"PK\x05\x06"  # end of central directory record
_END64_LOCATOR = b"PK\x06\x07"
_END64 = b"PK\x06\x06"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # ends with the name and extra field lengths
# General purpose flags miniz (torch's zip reader) refuses a record for: encrypted, patched
# data, strong encryption, a masked local header.
_UNREADABLE_FLAGS = 0x1 | 0x20 | 0x40 | 0x2000
# The records torch reads whole (the others it maps): one marked a DOS directory, miniz
# extracts nothing of.
_READ_WHOLE = frozenset(
    {"data.pkl", "version", ".data/version", "byteorder", ".storage_alignment",
     ".data/serialization_id", ".format_version"}
)  # fmt: skip


def check_archive(path: Path, size: int) -> zipfile.ZipInfo:
    """Refuse what torch must not read; return the record of the archive's ``data.pkl``."""
    return _checked_records(path, size)[0]


def _checked_records(path: Path, size: int) -> tuple[zipfile.ZipInfo, list[zipfile.ZipInfo], bool]:
    """The archive's ``data.pkl`` record and all its records, once checked; and whether they
    are the records torch's zip reader lists."""
    end = _end_of_directory(path, size)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            as_miniz = end is not None and _as_miniz_lists(path, archive, records, end)
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
    # an empty record (an empty tensor's storage) raises nothing: 16k of them cost 2 MB of
    # file and would allow 256 MB of pickle
    holding = sum(1 for r in records if r.file_size)
    allowed = min(MAX_PICKLE_BYTES, PICKLE_BYTES_BASE + PICKLE_BYTES_PER_RECORD * holding)
    if data_pkl.file_size > allowed:
        raise CheckpointError(
            path,
            f"its data.pkl claims {data_pkl.file_size:,} bytes, more than the pickle of a "
            f"checkpoint with {holding:,} records that hold data may have ({allowed:,}): it "
            "holds far more than tensors",
        )
    return data_pkl, records, as_miniz


def _record_problem(f: BinaryIO, record: zipfile.ZipInfo, size: int) -> str | None:
    """What is wrong with a record's sizes: its data must lie whole inside the file (a
    memory-mapped tensor read past the end of the file would crash the process)."""
    if record.compress_type != zipfile.ZIP_STORED:
        return "is compressed (torch.save stores records uncompressed)"
    if record.flag_bits & _UNREADABLE_FLAGS:
        return "is encrypted or patched (torch's zip reader reads neither)"
    if record.volume not in (0, 1):  # miniz takes either for the one disk
        return "lies on another disk of a multi-disk archive (torch's zip reader reads one)"
    if record.external_attr & 0x10 and record.filename.partition("/")[2].lower() in _READ_WHOLE:
        return "is marked a directory (torch's zip reader would read none of its bytes)"
    if record.file_size != record.compress_size:
        return f"declares {record.file_size:,} bytes but stores {record.compress_size:,}"
    data_start = _data_start(f, record, size)
    if data_start is None:
        return "has no local header where the directory says"
    if data_start + record.compress_size > size:
        return "runs past the end of the file"
    return None


def _data_start(f: BinaryIO, record: zipfile.ZipInfo, size: int) -> int | None:
    """Where a record's bytes begin in the file: after its local header (None: no header)."""
    if not 0 <= record.header_offset < size:
        return None
    f.seek(record.header_offset)
    local = f.read(_LOCAL_HEADER.size)
    if len(local) < _LOCAL_HEADER.size or not local.startswith(ZIP_MAGIC):
        return None
    name_length, extra_length = _LOCAL_HEADER.unpack(local)[-2:]
    return int(record.header_offset + _LOCAL_HEADER.size + name_length + extra_length)


def _end_of_directory(path: Path, size: int) -> tuple[int, int, int] | None:
    """Where the central directory starts, its bytes and its number of records, read from
    the end records as torch's zip reader (miniz) reads them (the zip64 one where its locator
    points to one), refusing what miniz refuses and a directory over the limit. None: no end
    record (zipfile says what is wrong)."""
    with open_regular(path) as f:
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
        end = tail.rfind(_END)
        if end < 0 or len(tail) - end < 22:
            return None
        this_disk, directory_disk, on_this_disk, entries, directory_bytes, offset = (
            struct.unpack_from("<4H2L", tail, end + 4)
        )
        locator = end - 20
        if locator >= 0 and tail[locator:].startswith(_END64_LOCATOR):
            end64, disks = struct.unpack_from("<QL", tail, locator + 8)
            if end64 > size - 56:
                raise CheckpointError(path, "its zip64 end record lies past the end: corrupt")
            f.seek(end64)
            record = f.read(56)
            if record.startswith(_END64):
                (record_bytes,) = struct.unpack_from("<Q", record, 4)
                this_disk, directory_disk, on_this_disk, entries, directory_bytes, offset = (
                    struct.unpack_from("<2L4Q", record, 16)
                )
                if record_bytes < 44 or disks != 1 or max(entries, on_this_disk) > 0xFFFFFFFF:
                    raise CheckpointError(path, "its zip64 end record is corrupt")
    if directory_bytes > min(size, MAX_CENTRAL_DIRECTORY_BYTES):
        raise CheckpointError(
            path,
            f"its zip central directory claims {directory_bytes:,} bytes, more than the file "
            f"or the limit ({MAX_CENTRAL_DIRECTORY_BYTES:,}) allows: corrupt",
        )
    if entries != on_this_disk or (this_disk, directory_disk) not in ((0, 0), (1, 1)):
        raise CheckpointError(path, "a multi-disk zip archive: torch reads one file")
    if directory_bytes < entries * 46 or offset + directory_bytes > size:
        raise CheckpointError(
            path, "its zip central directory does not fit its records or the file: corrupt"
        )
    return offset, directory_bytes, entries


def _as_miniz_lists(
    path: Path, archive: zipfile.ZipFile, records: list[zipfile.ZipInfo], end: tuple[int, int, int]
) -> bool:
    """Whether zipfile listed the records miniz lists (the ones in the directory the end
    record places); refuses a directory miniz finds short of records or overrun by one."""
    offset, directory_bytes, entries = end
    sizes = [
        46 + len(r.orig_filename.encode("utf-8" if r.flag_bits & 0x800 else "cp437"))
        + len(r.extra) + len(r.comment)
        for r in records
    ]  # fmt: skip
    if records:
        # zipfile reads the directory into a buffer of its declared size, so the last
        # record's name, extra field and comment may have been cut: their declared lengths
        with open_regular(path) as f:
            f.seek(archive.start_dir + sum(sizes[:-1]) + 28)  # type: ignore[attr-defined]
            sizes[-1] = 46 + sum(struct.unpack("<3H", f.read(6)))
    listed = sum(sizes[:entries])
    if len(records) < entries or listed > directory_bytes:
        raise CheckpointError(
            path, "its zip central directory holds fewer records than its end record counts"
        )
    return len(records) == entries and archive.start_dir == offset  # type: ignore[attr-defined]


def load(
    path: Path, size: int, *, map_location: Any, weights_only: bool, mmap: bool
) -> tuple[Any, set[str]]:
    """The object a checked archive holds, memory-mapped; and its storages' saved locations."""
    data_pkl, infos, _ = _checked_records(path, size)

    try:
        with zipfile.ZipFile(path) as archive:
            pickled = archive.read(data_pkl)  # bounded by check_archive, stored uncompressed
    except (zipfile.BadZipFile, OSError, ValueError):
        pickled = b""  # torch.load says what is wrong with it
    # its tensor subclasses' library (torchao), which torch needs imported to rebuild them
    import_named_libraries(path, pickled)
    if weights_only:  # torch's unpickler has no budget: the pickle is charged here first
        folder = data_pkl.filename.removesuffix("data.pkl") + "data/"
        sizes = {info.filename.removeprefix(folder): info.file_size for info in infos}
        check_cost(pickled, path, lambda key: sizes.get(key, 0))
    else:
        _require_importable(path, pickled)
    return torch_load(
        path,
        map_location=map_location,
        weights_only=weights_only,
        mmap=mmap,
        data_pickle=lambda: pickled,
    )


def _require_importable(path: Path, pickled: bytes) -> None:
    """Before a full unpickling (``weights_only=False``), the classes it needs that cannot
    be found here, named: a module that is not installed, or a class pickled from the
    ``__main__`` of the script that saved it (``torch.save(model)`` in a script), which
    only that script can unpickle. Looked up without importing anything."""
    main = sys.modules.get("__main__")
    for name in pickle_globals(pickled):
        module, _, attribute = name.rpartition(".")
        module = IMPORT_MAPPING.get(module, module)  # protocol 2's Python 2 names: __builtin__
        if module == "__main__" and not hasattr(main, attribute):
            raise CheckpointError(
                path,
                f"it holds a {name}: a class of the script that saved it, which only that "
                "script (run as __main__) can unpickle; save `model.state_dict()` instead, "
                "or load it where the class is importable from its module",
            )
        top = module.partition(".")[0]
        if top and top != "__main__" and importlib.util.find_spec(top) is None:
            raise CheckpointError(
                path, f"it holds a {name}, but {top} is not installed here: it cannot be unpickled"
            )


def read_records(path: Path, size: int) -> tuple[Any, set[str]]:
    """What a checked archive holds, as ``load`` would return it but with
    :mod:`.records` for its tensors, and its storages' saved locations: no torch, no
    tensor byte read. Raises :class:`records.NeedsTorch` for what records cannot stand for.
    """
    data_pkl, infos, as_miniz = _checked_records(path, size)
    if not as_miniz:
        raise records.NeedsTorch("an archive whose directory zipfile and miniz read apart")
    # torch reads the records under the first one's folder (``archive/``): an archive whose
    # first data.pkl lies elsewhere is torch's to make sense of
    prefix = infos[0].filename.partition("/")[0] + "/"
    if data_pkl.filename != f"{prefix}data.pkl":
        raise records.NeedsTorch(f"an archive whose data.pkl is not under {prefix}")
    if not all(info.filename.startswith(prefix) for info in infos):
        # torch 2.13 refuses a record outside the archive's folder; older releases may not
        raise records.NeedsTorch(f"an archive with records outside {prefix}")
    # torch's zip reader (miniz) finds a record by its name in any case
    by_name = {info.filename.lower(): info for info in infos}
    if len(by_name) != len(infos):
        raise records.NeedsTorch("an archive with two records of one name")
    storages: dict[Any, records.Storage] = {}
    locations: set[str] = set()

    with open_regular(path) as f:
        _check_torch_records(path, f, by_name, prefix.lower(), size)
        f.seek(_data_start(f, data_pkl, size) or 0)
        data = f.read(data_pkl.file_size)  # bounded by _checked_records, stored uncompressed
        libraries = named_libraries(data)
        if libraries:
            raise records.NeedsTorch(f"tensors of {', '.join(libraries)}")

        def storage(pid: Any) -> records.Storage:
            """torch.load's persistent_load: a storage of the archive, by its key."""
            if not isinstance(pid, tuple) or len(pid) != 5:
                raise records.CorruptRecord("a persistent id that is no storage tuple")
            _, storage_type, key, location, numel = pid
            if key in storages:
                return storages[key]
            location = location.decode("ascii") if isinstance(location, bytes) else location
            if not isinstance(storage_type, records.StorageType):
                raise records.CorruptRecord(f"a storage of type {type(storage_type).__name__}")
            if not isinstance(numel, int):
                raise records.CorruptRecord("a storage's size is no int")
            info = by_name.get(f"{prefix}data/{key}".lower())
            if info is None:
                raise records.CorruptRecord(f"no record data/{key} for a storage")
            start = _data_start(f, info, size) or 0
            # torch maps the whole file and slices it: the storage is the bytes its size
            # claims from the record's start (a slice, so cut at the end of the file), its
            # record's or not (mmap=False refuses a size other than the record's)
            nbytes = len(range(size)[start : start + numel * DTYPE_ITEMSIZE[storage_type.dtype]])
            if not isinstance(location, str):
                # the plugin's map_location takes any location to the CPU, and records it as
                # str() writes it: torch's objects are torch's to write
                raise records.NeedsTorch(f"a storage location of type {type(location).__name__}")
            storages[key] = records.Storage(str(key), storage_type.dtype, nbytes, location, start)
            locations.add(location)
            return storages[key]

        return unpickle_torch_records(data, path, storage), locations


# A version, byte order or alignment record is a few bytes: a longer one is torch's to read.
_SMALL_RECORD = 4096
# What std::stoull reads of torch's version record: C whitespace, a sign, decimal digits.
_STOULL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
# The archive versions every torch from 2.3 on reads (torch.save writes 3).
_VERSIONS = range(1, 11)


def _check_torch_records(
    path: Path, f: BinaryIO, by_name: dict[str, zipfile.ZipInfo], prefix: str, size: int
) -> None:
    """Refuse what torch's archive reader refuses before it reads the pickle: no version
    record, a version it cannot parse or read, a byte order other than ``little`` or
    ``big``, a serialization id that is not UTF-8, an alignment that is no int."""

    def content(name: str) -> bytes | None:
        info = by_name.get(prefix + name)
        if info is None:
            return None
        if info.file_size > _SMALL_RECORD:
            raise records.NeedsTorch(f"a {info.file_size:,}-byte {name} record")
        f.seek(_data_start(f, info, size) or 0)
        return f.read(info.file_size)

    version = content(".data/version")
    if version is None:
        version = content("version")
    if version is None:
        raise CheckpointError(
            path, "its zip archive has no version record: not written by torch.save"
        )
    parsed = _STOULL.match(version)
    if parsed is None:
        raise CheckpointError(path, f"its archive version {version[:20]!r} is not a number")
    number = int(parsed[2]) * (-1 if parsed[1] == b"-" else 1) % (1 << 64)
    if number < _VERSIONS.start:
        raise CheckpointError(path, f"its archive version {number} is older than torch reads")
    if number not in _VERSIONS:
        raise records.NeedsTorch(f"archive version {number}")  # the installed torch decides
    byteorder = content("byteorder")
    if byteorder not in (None, b"little", b"big"):
        raise CheckpointError(path, f"its archive has an unknown byte order {byteorder[:20]!r}")
    serialization_id = content(".data/serialization_id")
    if serialization_id is not None:
        try:
            serialization_id.decode()  # torch.load logs it as a str
        except UnicodeDecodeError:
            raise CheckpointError(path, "its archive's serialization id is not UTF-8") from None
    alignment = content(".storage_alignment")
    if alignment is not None:
        try:
            int(alignment)  # as torch.load reads it
        except ValueError:
            raise CheckpointError(
                path, f"its archive's storage alignment {alignment[:20]!r} is not a number"
            ) from None


def tensor_values(path: Path, tensor: records.Tensor) -> Any:
    """A small tensor's values as ``tolist()`` gives them, read from the archive (a tensor
    hyperparameter: a schema keeps those of at most 16 elements)."""
    code = _STRUCT_CODES.get(tensor.dtype)
    if code is None:
        raise records.NeedsTorch(f"the values of a {tensor.dtype} tensor")
    itemsize = DTYPE_ITEMSIZE[tensor.dtype]
    order = ">" if _byteorder(path) == "big" else "<"
    with open_regular(path) as f:

        def element(offset: int) -> Any:
            f.seek(tensor.storage.data_start + offset * itemsize)
            raw = f.read(itemsize)
            if tensor.dtype == "bfloat16":
                (bits,) = struct.unpack(order + "H", raw)
                return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
            values = struct.unpack(order + code, raw)
            return complex(*values) if len(values) == 2 else values[0]

        def nested(dim: int, offset: int) -> Any:
            if dim == len(tensor.shape):
                return element(offset)
            step = tensor.stride[dim]
            return [nested(dim + 1, offset + i * step) for i in range(tensor.shape[dim])]

        return nested(0, tensor.offset)


# struct codes of the dtypes whose values ``tensor_values`` reads (bfloat16: by hand).
_STRUCT_CODES = {
    "float64": "d", "float32": "f", "float16": "e", "bfloat16": "H", "int64": "q",
    "int32": "i", "int16": "h", "int8": "b", "uint64": "Q", "uint32": "I", "uint16": "H",
    "uint8": "B", "bool": "?", "complex128": "dd", "complex64": "ff",
}  # fmt: skip


def _byteorder(path: Path) -> str:
    """The byte order an archive records (``little`` when it records none, as torch reads)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/byteorder")), None)
            return archive.read(name).decode("ascii", "replace") if name else "little"
    except (zipfile.BadZipFile, OSError, ValueError):
        return "little"
