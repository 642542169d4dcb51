"""``.safetensors`` files: the schema from the JSON header alone; tensor data only for
``values=True`` (memory-mapped by the safetensors package). Nothing is unpickled.

The header is validated before use: its claimed length is at most
:data:`~.limits.MAX_HEADER_BYTES` (the cap safetensors itself enforces; a sparse file
claiming a 36 GB header is refused before it is read) and within the file, its JSON nests at
most :data:`~.limits.MAX_JSON_DEPTH` levels, and every tensor has a known dtype, at most
:data:`~.limits.MAX_DIMS` dimensions of at most :data:`~.limits.MAX_DIM` each, and data
offsets that lie in the file and span exactly its shape's bytes.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..schema import Schema
from ..schema_entries import DTYPE_ITEMSIZE, TensorEntry
from .files import open_regular, parse_json, require_regular_file
from .limits import MAX_DIM, MAX_DIMS, MAX_HEADER_BYTES

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "C128": "complex128",
}  # fmt: skip


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian length that fits the file, then a JSON object."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8 and head[8:9] == b"{"


def read_header(path: Path) -> dict[str, Any]:
    """The validated JSON header of a .safetensors file (8-byte length, then JSON)."""
    size = require_regular_file(path).st_size
    with open_regular(path) as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, "too short for a .safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(
                path,
                f"the .safetensors header claims {length} bytes, more than safetensors allows "
                f"({MAX_HEADER_BYTES}): corrupt or not safetensors",
            )
        if length > size - 8:
            raise CheckpointError(
                path,
                f"the .safetensors header claims {length} bytes but the file has only "
                f"{size - 8} after its length prefix: truncated or not safetensors",
            )
        raw = f.read(length)

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(path, problem)

    header = parse_json(raw, fail, "the .safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(path, "the .safetensors header is not a JSON object")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(info, data_size)
        if problem:
            raise CheckpointError(path, f"tensor {name[:200]!r} in the header: {problem}")
    return header


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry_problem(info: Any, data_size: int) -> str | None:
    if not isinstance(info, dict):
        return "not an object"
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"unknown dtype {str(dtype)[:40]!r}"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        return "shape is not a list of non-negative integers"
    if len(shape) > MAX_DIMS:
        return f"{len(shape)} dimensions, more than {MAX_DIMS}"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return "data_offsets is not a [begin, end] pair"
    if offsets[1] > data_size:
        return f"data_offsets end {offsets[1]} is past the end of the data ({data_size} bytes)"
    expected = math.prod(shape) * DTYPE_ITEMSIZE[SAFETENSORS_DTYPES[dtype]]
    if offsets[1] - offsets[0] != expected:
        return f"data_offsets span {offsets[1] - offsets[0]} bytes, its shape needs {expected}"
    return None


def read_schema(path: Path) -> Schema:
    """The schema of a .safetensors file from its header, in the order of the data."""
    header = read_header(path)
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


def load(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A .safetensors file as a state_dict (memory-mapped by safetensors itself)."""
    read_header(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            path,
            "reading .safetensors tensor data needs the optional dependency: "
            "pip install 'pytest-statedict[safetensors]'",
        ) from None
    try:
        return load_file(path, device=device)
    except Exception as exc:  # the package's own errors on a file the header check passed
        raise CheckpointError(
            path, f"safetensors could not read it ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
