"""Checkpoint files: recognise the format, read a schema without reading tensor data.

* ``torch.save`` zip archives load with ``mmap=True, weights_only=True``: the unpickler
  runs, the tensor bytes stay on disk (time and memory grow with the number of tensors).
* ``.safetensors`` files are read from their JSON header alone.
* A snapshot ``.json`` is parsed as one.
* Legacy (pre-1.6, non-zip) torch files cannot be memory-mapped and are loaded whole.

Every failure is a :class:`CheckpointError` naming the file and what is wrong: a missing
or empty file, a truncated or foreign archive, or a pickle that would need arbitrary code
(which is never run unless the caller passes ``weights_only=False`` by name).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import struct
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import CheckpointError, SnapshotError, UnsupportedObjectError, hide_from_bad_input
from .schema import Schema, TensorEntry

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "C128": "complex128",
}  # fmt: skip

ZIP_MAGIC = b"PK\x03\x04"


def schema_of_file(
    path: str | os.PathLike[str],
    *,
    values: bool = False,
    weights_only: bool = True,
    part: str | None = None,
) -> Schema:
    """The schema of a checkpoint or snapshot file, reading no tensor data if it can.

    ``part`` picks one entry of a general checkpoint (``"modelA_state_dict"``, or a path
    into nested entries: ``"optimizer_states/0"``).
    """
    from .extract import mapping_schema, module_schema, select_part

    path = Path(path)
    obj = plugin_load(path)
    locations: set[str] = set()
    if obj is None:
        if path.is_dir():
            return directory_schema(path, values=values, part=part)
        if path.name == ".metadata" and path.is_file():  # a DCP folder's index: read the folder
            return directory_schema(path.parent, values=values, part=part)
        _check_readable(path)
        if path.name.endswith(".index.json"):
            return sharded_schema(path, values=values, part=part)
        if path.suffix == ".json":
            if values or part:
                raise CheckpointError(path, "a snapshot holds one schema, without values or parts")
            return read_snapshot(path)
        if path.suffix == ".safetensors":
            if not values and not part:
                return safetensors_schema(path)
            obj = load_safetensors(path)
        else:
            obj, locations = load_checkpoint(path, weights_only=weights_only)
    try:
        import torch

        if part is not None:
            obj = select_part(obj, part)
        if isinstance(obj, torch.nn.Module):
            schema = module_schema(obj, values=values)
        elif isinstance(obj, dict):
            schema = mapping_schema(obj, values=values)
        else:
            raise UnsupportedObjectError(
                f"it holds a {type(obj).__module__}.{type(obj).__qualname__}, not a state_dict "
                "or a checkpoint dict"
            )
    except UnsupportedObjectError as exc:
        raise CheckpointError(path, str(exc).removeprefix("schema_of(): ")) from None
    return replace(
        schema,
        ordered=path.suffix != ".safetensors",
        saved_on=tuple(sorted(locations)),
        source=str(path),
    )


def directory_schema(path: Path, *, values: bool, part: str | None) -> Schema:
    """A torch.distributed.checkpoint folder, or a folder holding a sharded index."""
    if (path / ".metadata").is_file():
        if values:
            raise CheckpointError(path, "values=True is not supported for DCP checkpoints")
        return dcp_schema(path, part=part)
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        return sharded_schema(indexes[0], values=values, part=part)
    raise CheckpointError(
        path,
        "is a directory but neither a torch.distributed.checkpoint folder (no .metadata) "
        "nor a sharded checkpoint with one *.index.json",
    )


def sharded_schema(index: Path, *, values: bool, part: str | None) -> Schema:
    """A Hugging Face sharded checkpoint: its ``weight_map`` and each shard's own schema."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(index, 'not a sharded-checkpoint index (no "weight_map")') from None
    if part is not None:
        raise CheckpointError(index, "a sharded checkpoint has no parts to choose from")
    shards = list(dict.fromkeys(weight_map.values()))
    entries = []
    locations: set[str] = set()
    ordered = True
    for shard in shards:
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(index, f"its shard {shard} is missing")
        shard_schema = schema_of_file(shard_path, values=values)
        locations.update(shard_schema.saved_on)
        ordered = ordered and shard_schema.ordered
        expected = {k for k, v in weight_map.items() if v == shard}
        found = {t.key for t in shard_schema.tensors}
        if expected - found:
            missing = ", ".join(sorted(expected - found)[:5])
            raise CheckpointError(
                index, f"keys it maps to {shard} are not in that shard: {missing}"
            )
        entries.extend(t for t in shard_schema.tensors if t.key in expected)
    return Schema(
        tensors=tuple(entries),
        ordered=ordered,
        saved_on=tuple(sorted(locations)),
        source=str(index),
    )


# DCP's .metadata is a pickle: it is read with an unpickler that only knows these names,
# so that a malicious .metadata cannot run code.
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        allowed = (
            (module, name) in _DCP_GLOBALS
            or module == "torch.distributed.checkpoint.metadata"
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return super().find_class(module, name)


def dcp_schema(path: Path, *, part: str | None) -> Schema:
    """The schema of a torch.distributed.checkpoint folder, from its ``.metadata`` alone."""
    from .extract import dtype_name

    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        items = metadata.state_dict_metadata.items()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, OSError) as exc:
        raise CheckpointError(path, f"its .metadata cannot be read safely ({exc})") from None
    prefix = f"{part.replace('/', '.')}." if part else ""
    entries = []
    for key, meta in items:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if hasattr(meta, "size") and hasattr(meta, "properties"):
            entries.append(
                TensorEntry(
                    key=name,
                    kind="tensor",
                    shape=tuple(meta.size),
                    dtype=dtype_name(meta.properties.dtype),
                )
            )
        else:
            entries.append(TensorEntry(key=name, kind="object", type="bytes"))
    if part and not entries:
        raise CheckpointError(path, f"no entries under {part!r}")
    return Schema(tensors=tuple(entries), source=str(path))


def read_snapshot(path: str | os.PathLike[str]) -> Schema:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SnapshotError(path, "not UTF-8 text") from None
    return Schema.from_json(text, path)


def plugin_load(path: Path) -> Any:
    """What a ``pytest_statedict_load_checkpoint`` hook returns for ``path`` (None: no hook)."""
    from .runtime import checkpoint_loader

    loader = checkpoint_loader()
    if loader is None or not path.exists():
        return None
    return loader(path)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(
            path,
            "is a directory, not a checkpoint file (a torch.save file, .safetensors, a sharded "
            "*.index.json, a torch.distributed.checkpoint folder or a statedict snapshot .json)",
        )
    if not os.access(path, os.R_OK):
        raise CheckpointError(path, "permission denied")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty")


# ---- torch.save files --------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: Any = None,
    weights_only: bool = True,
    mmap: bool = True,
) -> tuple[Any, set[str]]:
    """``torch.load`` a file safely; returns the object and the locations it was saved on.

    Tensors saved on a device this machine lacks (``cuda:0`` on a CPU-only runner) are
    mapped to ``map_location`` (default: left on the CPU) instead of failing.
    """
    import torch

    path = Path(path)
    custom = plugin_load(path)
    if custom is not None:
        return custom, set()
    _check_readable(path)
    with open(path, "rb") as f:
        head = f.read(8)
    is_zip = zipfile.is_zipfile(path)
    if head.startswith(ZIP_MAGIC) and not is_zip:
        raise CheckpointError(
            path,
            "a zip archive with no central directory: the file is truncated (a torch.save "
            "that was cut short, or an incomplete download)",
        )
    if is_zip and not _is_torch_zip(path):
        raise CheckpointError(
            path, "a zip archive but not a torch.save checkpoint (it has no data.pkl record)"
        )
    if not is_zip and not head.startswith(b"\x80"):
        raise CheckpointError(
            path,
            f"not a checkpoint: it starts with {head!r}, neither a torch.save archive, a "
            "legacy torch pickle, .safetensors nor a statedict snapshot",
        )
    locations: set[str] = set()
    target = None if map_location is None else torch.device(map_location)

    def record_location(storage: Any, location: str) -> Any:
        locations.add(location)
        # the storage arrives on the CPU (memory-mapped): moving it to the CPU would copy it
        if target is None or target.type == "cpu":
            return storage
        return storage.to(device=target)

    try:
        obj = torch.load(
            path,
            map_location=record_location,
            weights_only=weights_only,
            mmap=mmap and is_zip,
        )
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, _explain_unpickling(path, is_zip, exc)) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            path,
            f"torch.load could not read it, the file is truncated or corrupt "
            f"({type(exc).__name__}: {_first_line(exc)})",
        ) from None
    return obj, locations


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def pickle_globals(path: Path) -> list[str]:
    """The globals a torch.save archive's pickle refers to, read without unpickling it."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        data = z.read(name)
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except (ValueError, struct.error):
        pass
    if any(g.endswith("getattr") for g in found) and "state_dict" in strings:
        found.append("<bound method state_dict>")
    return found


def _explain_unpickling(path: Path, is_zip: bool, exc: Exception) -> str:
    found = pickle_globals(path) if is_zip else []
    if "<bound method state_dict>" in found:
        return (
            "it holds the bound method `model.state_dict`, not the dict `model.state_dict()`: "
            "it was saved with `torch.save(model.state_dict, ...)`; save "
            "`model.state_dict()` instead. It was not unpickled (that would run code)"
        )
    safe_prefixes = ("torch.", "collections.OrderedDict", "builtins.", "__builtin__.")
    unsafe = sorted({g for g in found if not g.startswith(safe_prefixes) or ".nn." in g})
    what = f" ({', '.join(unsafe[:5])})" if unsafe else ""
    module = next((g for g in unsafe if ".nn.modules." in g), None)
    hint = " It holds a whole pickled module: save `model.state_dict()` instead." if module else ""
    return (
        f"it needs arbitrary code to unpickle{what}, so it was not loaded.{hint} If you trust "
        "the file, pass weights_only=False by name; the error from torch.load was: "
        f"{_last_line(exc)}"
    )


def _last_line(exc: BaseException) -> str:
    for line in reversed(str(exc).strip().splitlines()):
        if "error:" in line.lower() or "unsupported" in line.lower():
            return line.strip()[:300]
    return _first_line(exc)


# ---- safetensors -------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    """The validated JSON header of a .safetensors file (8-byte length, then JSON)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, "too short for a .safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise CheckpointError(
                path,
                f"the .safetensors header claims {length} bytes but the file has only "
                f"{size - 8} after its length prefix: truncated or not safetensors",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(path, "the .safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "the .safetensors header is not a JSON object")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _safetensors_entry_problem(info, data_size)
        if problem:
            raise CheckpointError(path, f"tensor {name!r} in the header: {problem}")
    return header


def _safetensors_entry_problem(info: Any, data_size: int) -> str | None:
    if not isinstance(info, dict):
        return "not an object"
    if info.get("dtype") not in SAFETENSORS_DTYPES:
        return f"unknown dtype {info.get('dtype')!r}"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return "shape is not a list of non-negative integers"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return "data_offsets is not a [begin, end] pair"
    if offsets[1] > data_size:
        return f"data_offsets end {offsets[1]} is past the end of the data ({data_size} bytes)"
    from .schema import DTYPE_ITEMSIZE

    expected = math.prod(shape) * DTYPE_ITEMSIZE[SAFETENSORS_DTYPES[info["dtype"]]]
    if offsets[1] - offsets[0] != expected:
        return f"data_offsets span {offsets[1] - offsets[0]} bytes, its shape needs {expected}"
    return None


def safetensors_schema(path: Path) -> Schema:
    header = safetensors_header(path)
    entries = tuple(
        TensorEntry(
            key=name,
            kind="tensor",
            shape=tuple(info["shape"]),
            dtype=SAFETENSORS_DTYPES[info["dtype"]],
        )
        for name, info in sorted(
            ((n, i) for n, i in header.items() if n != "__metadata__"),
            key=lambda item: item[1]["data_offsets"][0],
        )
    )
    # the writer sorts the header (by dtype and name): state_dict order is lost
    return Schema(tensors=entries, ordered=False, source=str(path))


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A .safetensors file as a state_dict (memory-mapped by safetensors itself)."""
    safetensors_header(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            path,
            "reading .safetensors tensor data needs the optional dependency: "
            "pip install 'pytest-statedict[safetensors]'",
        ) from None
    return load_file(path, device=device)


def load_state_dict_file(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
    part: str | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """The model state_dict inside a checkpoint file: ``part``, or the usual model entry."""
    from .extract import MODEL_KEYS, is_state_dict, select_part

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path, str(map_location)), set()
    obj, locations = load_checkpoint(path, map_location=map_location, weights_only=weights_only)
    if part is not None:
        try:
            obj = select_part(obj, part)
        except UnsupportedObjectError as exc:
            raise CheckpointError(path, str(exc).removeprefix("schema_of(): ")) from None
    if is_state_dict(obj):
        return obj, locations
    if isinstance(obj, dict):
        for key in MODEL_KEYS:
            if is_state_dict(obj.get(key)):
                return obj[key], locations
    raise CheckpointError(
        path,
        f"no model state_dict in it (looked for a mapping of names to tensors, at the top "
        f"or under {', '.join(MODEL_KEYS)})",
    )
