"""toyckpt: a third-party checkpoint format for pytest-statedict, as small as one can be.

A ``.toyckpt`` file is a magic line, a JSON header line (each tensor's shape, dtype and
byte range) and the tensors' bytes. The header gives the layout without reading any tensor
data or importing torch, so ``statedict show`` lists it at once and the refactor gate
checks a model against it with meta tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_statedict import CheckpointError
from pytest_statedict.formats import Loaded, NeedsLoading, NestedSchema, Schema, TensorEntry

MAGIC = b"TOYCKPT1\n"


class ToyFormat:
    name = "toyckpt"
    schema_first = True  # the header is the whole layout: schema_of and the gate use it
    torch_free = True  # read_schema imports no torch: `statedict show` stays fast

    def detect(self, path: Path, head: bytes | None) -> bool:
        return head is not None and head.startswith(MAGIC)

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        if part is not None or values:
            raise NeedsLoading("a part or the values of a toyckpt file")  # load() it is
        header, _ = _header(path)
        entries = tuple(
            TensorEntry(key, "tensor", tuple(info["shape"]), info["dtype"])
            for key, info in header.items()
        )
        return Schema(tensors=entries, source=str(path))

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        import torch

        header, start = _header(path)
        data = bytearray(path.read_bytes()[start:])
        state = {}
        for key, info in header.items():
            begin, end = info["bytes"]
            flat = torch.frombuffer(data[begin:end], dtype=getattr(torch, info["dtype"]))
            tensor = flat.reshape(info["shape"])
            state[key] = tensor if map_location is None else tensor.to(map_location)
        return Loaded(state)

    def save(self, state: Mapping[str, Any], path: Path) -> None:
        import torch

        header, chunks, offset = {}, [], 0
        for key, tensor in state.items():
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            chunk = bytes(raw.tolist())
            dtype = str(tensor.dtype).removeprefix("torch.")
            header[key] = {"shape": list(tensor.shape), "dtype": dtype}
            header[key]["bytes"] = [offset, offset + len(chunk)]
            chunks.append(chunk)
            offset += len(chunk)
        path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + b"".join(chunks))


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of a toyckpt file and where its data starts."""
    with open(path, "rb") as f:
        if f.readline() != MAGIC:
            raise CheckpointError(path, "not a toyckpt file (no magic line)")
        try:
            header = json.loads(f.readline())
        except ValueError as exc:
            raise CheckpointError(path, f"its toyckpt header is not JSON ({exc})") from None
        return header, f.tell()
