"""Checkpoint formats: one module per format, a registry, and the protocol they implement.

* ``base``: :class:`CheckpointFormat` (the protocol), :class:`Loaded`, :class:`NeedsLoading`;
* ``registry``: the formats in the order they are asked (third-party ones, registered under
  the entry-point group ``pytest_statedict.formats``, then the built-ins), and which one
  reads a path;
* ``reading``: a path's schema or object, through the registry (and the
  ``pytest_statedict_load_checkpoint`` hook its caller hands in);
* the built-ins, each wrapping its reader of ``readers`` (whose hardening and limits they
  keep): ``dcp_folder``, ``peft_adapter``, ``sharded_index``, ``snapshot``, ``torch_zip``,
  ``safetensors_file``, ``torch_legacy``.

This layer sits between ``readers`` (what it wraps) and ``extract`` (which hands it the
walk of torch objects); it imports no torch until a file is loaded. A third-party format
imports its protocol from here: ``from pytest_statedict.formats import CheckpointFormat``
(see ``docs/extending.md``).
"""

from __future__ import annotations

from ..schema import Schema
from ..schema_entries import TensorEntry
from .base import CheckpointFormat, Loaded, NeedsLoading, NestedSchema
from .registry import ENTRY_POINT_GROUP

# what a format's read_schema builds: a Schema of TensorEntry rows
__all__ = [
    "ENTRY_POINT_GROUP",
    "CheckpointFormat",
    "Loaded",
    "NeedsLoading",
    "NestedSchema",
    "Schema",
    "TensorEntry",
]
