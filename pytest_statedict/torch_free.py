"""Schemas of checkpoint files without importing torch: what ``statedict show`` and
``statedict diff`` read.

Importing torch costs ~1.7 s, nearly all of a CLI run. So the CLI asks each format that
can (:attr:`~.formats.base.CheckpointFormat.torch_free`) for its schema before torch is
imported: ``.safetensors`` headers, sharded indexes, DCP ``.metadata``, snapshots, a
``torch.save`` zip archive's ``data.pkl`` read with torch's weights-only rules
re-implemented (``formats.torch_zip``), and any third-party format that says it can. The
schema is the one ``schema_of(path)`` gives (tests compare the two on every format).

torch is imported only where a file needs it: a format whose schema needs torch (a legacy
``torch.save`` file), a ``part`` of a ``.safetensors`` file, anything the records cannot
stand for (quantized, sparse or nested tensors, tensor subclasses, a global torch allows
that they do not model: ``records.NeedsTorch``), and a ``pytest_statedict_load_checkpoint``
hook of a running pytest session. Then the file is read by ``extract.schema_of``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .errors import hide_from_bad_input
from .formats import registry
from .formats.base import CheckpointFormat
from .readers.records import NeedsTorch
from .runtime import checkpoint_loader
from .schema import Schema

__all__ = ["read_without_torch", "schema_of_file"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


def schema_of_file(path: str | os.PathLike[str], *, part: str | None = None) -> Schema:
    """``schema_of(path, part=part)``, importing torch only for a file that needs it."""
    path = Path(path)
    if checkpoint_loader() is None:
        try:
            return read_without_torch(path, part)
        except NeedsTorch:
            pass
    from .extract import schema_of

    return schema_of(path, part=part)


def read_without_torch(path: Path, part: str | None) -> Schema:
    """The schema of ``path`` read by torch-free formats alone (its shards too), or
    :class:`NeedsTorch` where one of them cannot do without torch."""
    return _read(*registry.detect(path), part)


def _read(fmt: CheckpointFormat, path: Path, part: str | None) -> Schema:
    if not fmt.torch_free:
        raise NeedsTorch(f"a {fmt.name} file")
    schema = fmt.read_schema(
        path, part=part, values=False, nested=lambda shard: _read(*registry.detect(shard), None)
    )
    # a format that reads several files says itself how it read them
    return replace(schema, read_as=schema.read_as or f"{fmt.name}, without torch (no tensor data)")
