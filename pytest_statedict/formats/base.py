"""What a checkpoint format is to the plugin: :class:`CheckpointFormat`, and what it returns.

Modelled on ``torch.distributed.checkpoint``'s ``StorageReader``: a small protocol that
each format implements in a module of its own, and a registry (``registry``) that asks the
formats in order which one reads a path. A format answers four questions:

* :meth:`~CheckpointFormat.detect`: is this path mine? (by its name, its first bytes, or a
  folder's listing);
* :meth:`~CheckpointFormat.read_schema`: its layout, from headers, without tensor data,
  or :class:`NeedsLoading` where the format cannot tell it without loading the file;
* :meth:`~CheckpointFormat.load`: the object the file holds (a state_dict or a general
  checkpoint), as ``torch.load`` would give it;
* :attr:`~CheckpointFormat.save`: how to write a state_dict in the format, or None.

and two flags tell its callers how to use it: :attr:`~CheckpointFormat.schema_first`
(``schema_of`` and the refactor gate take the header's schema, and the gate rebuilds meta
tensors from it, instead of loading the file) and :attr:`~CheckpointFormat.torch_free`
(``statedict show`` may call ``read_schema`` before it imports torch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ..errors import CheckpointError, UnsupportedObjectError, hide_from_bad_input
from ..layout import select_part
from ..readers.records import NeedsTorch
from ..schema import Schema

__all__ = [
    "CheckpointFormat",
    "Loaded",
    "NeedsLoading",
    "NestedSchema",
    "ObjectSchema",
    "Saver",
    "object_schema",
    "unsupported_object",
]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# The schema of a file a checkpoint points to (a shard of a sharded index), read the way
# the caller reads files: without torch for ``statedict show``, with values and the
# ``pytest_statedict_load_checkpoint`` hook for ``schema_of``.
NestedSchema = Callable[[Path], Schema]
# How a state_dict is written in a format (``CheckpointFormat.save``).
Saver = Callable[[Mapping[str, Any], Path], None]
# The schema of an object a file held, ``(obj, values)``: extract's walk of torch objects
# (modules, state_dicts, general checkpoints), which sits above the formats and hands it in.
ObjectSchema = Callable[[Any, bool], Schema]


class NeedsLoading(NeedsTorch):
    """``read_schema`` cannot tell this layout without loading the file (a ``part`` of a
    file whose header lists only tensors, ``values=True``, a pickle): the caller loads it.

    A :class:`~pytest_statedict.readers.records.NeedsTorch`, so that ``statedict show``
    falls back to loading with torch for it as for anything its torch-free reader lacks.
    """


class Loaded(NamedTuple):
    """What :meth:`CheckpointFormat.load` read."""

    # the object the file holds: a state_dict, a general checkpoint dict (or, loaded with
    # weights_only=False, a module)
    obj: Any
    # the devices its tensors were saved on (``torch.save`` records them), e.g. {"cuda:0"}
    saved_on: frozenset[str] = frozenset()
    # whether the keys are in state_dict order (the safetensors writer sorts them)
    ordered: bool = True


class CheckpointFormat(Protocol):
    """One checkpoint format: what the registry asks of a built-in or third-party one.

    A third-party format is an object with these members (a class instance; see
    ``docs/extending.md``), registered under the entry-point group
    ``pytest_statedict.formats``. Errors about a file should be
    :class:`~pytest_statedict.errors.CheckpointError` (``CheckpointError(path, problem)``):
    the plugin shows them as one paragraph naming the file, never as a traceback.
    """

    # a short name for messages and :func:`registry.format_named`, e.g. "safetensors"
    name: str
    # True: ``read_schema`` is the format's whole layout, read from headers, so that
    # ``schema_of(path)`` and ``assert_checkpoint_loads`` use it (the gate loads meta tensors
    # of its shapes and dtypes) and load only where it raises NeedsLoading. False: they load
    # the file, and ``read_schema`` serves ``statedict show`` alone (see ``torch_free``).
    schema_first: bool
    # True: ``read_schema`` imports no torch, so ``statedict show`` and ``statedict diff``
    # call it before importing torch (~1.7 s); False: they load the file with torch.
    torch_free: bool

    def detect(self, path: Path, head: bytes | None) -> bool:
        """Whether this format reads ``path``.

        ``head`` holds the first bytes of a file (up to :data:`registry.HEAD_BYTES`; empty
        when it cannot be read, which the reader's own errors then name), None when
        ``path`` is a folder. Called for every path read, so it reads nothing more itself.
        """
        ...

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        """The schema of ``path``, reading no tensor data, or :class:`NeedsLoading`.

        ``part`` names one entry of a general checkpoint (``"a/b"`` for nested ones);
        ``values=True`` asks for value fingerprints, which only a format that records them
        (a snapshot) can give without loading. ``nested`` reads a file the checkpoint points
        to (a shard), the way the caller reads files.
        """
        ...

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        """The object ``path`` holds, tensors on ``map_location`` (None: where the file
        puts them, the CPU for a memory map). ``weights_only=False`` (asked for by name:
        it may run code from the file) and ``mmap`` apply where the format has them."""
        ...

    @property
    def save(self) -> Saver | None:
        """``save(state_dict, path)`` writing the format, or None where it cannot be written."""
        ...


def object_schema(
    path: Path,
    obj: Any,
    saved_on: frozenset[str] | set[str],
    *,
    describe: ObjectSchema,
    values: bool,
    part: str | None,
    ordered: bool = True,
) -> Schema:
    """The schema of what a file held: ``part`` of it, walked by ``describe``; any object
    that is no state_dict or checkpoint is a :class:`CheckpointError` naming the file."""
    try:
        if part is not None:
            obj = select_part(obj, part)
        schema = describe(obj, values)
    except UnsupportedObjectError as exc:
        raise CheckpointError(path, str(exc).removeprefix("schema_of(): ")) from None
    return replace(schema, ordered=ordered, saved_on=tuple(sorted(saved_on)), source=str(path))


def unsupported_object(obj: Any) -> UnsupportedObjectError:
    """The error for a file that holds something other than a state_dict or a checkpoint."""
    return UnsupportedObjectError(
        f"it holds a {type(obj).__module__}.{type(obj).__qualname__}, not a state_dict "
        "or a checkpoint dict"
    )
