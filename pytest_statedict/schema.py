"""The schema of a state_dict: what one checkpoint holds, as every check sees it.

A schema is what a checkpoint's *layout* depends on: keys in order, shapes, dtypes, kinds,
tying, module versions and the optimizer's groups and state (its parts are in
:mod:`.schema_entries`), with where it was read from. It never holds tensor data (at most a
fingerprint of it), so it is small, device-agnostic and cheap to diff. Every reader returns
one, every check consumes one, and a snapshot is its JSON (:mod:`.snapshot_format`).

This module imports no torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .errors import hide_from_bad_input
from .schema_entries import DTYPE_ITEMSIZE, ModuleVersion, OptimizerSchema, TensorEntry
from .snapshot_format import snapshot_fields, snapshot_text

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


@dataclass(frozen=True)
class Schema:
    """The schema of a state_dict (and optionally of its optimizer).

    ``versions`` maps a module's prefix to its ``_metadata`` version when that is not the
    default int 1 (``None``: unknown, a bare state_dict without ``_metadata``); a version
    is kept as torch keeps it, a string included (see :func:`module_version`).
    ``ordered`` is False when the key order carries no meaning (a ``.safetensors`` header
    is sorted by the writer, not in ``state_dict`` order): moved keys are then not reported.
    ``saved_on`` (the storage locations a checkpoint file was saved from), ``source`` (the
    file), ``read_as`` (its format, and how it was read) and ``framework`` (the training
    framework that wrote it, e.g. "transformers Trainer, global step 500") are provenance
    for reports, not part of a snapshot.
    """

    tensors: tuple[TensorEntry, ...]
    ordered: bool = True
    versions: Mapping[str, ModuleVersion] | None = None
    non_persistent_buffers: tuple[str, ...] = ()
    optimizer: OptimizerSchema | None = None
    extras: Mapping[str, str] = field(default_factory=dict)
    saved_on: tuple[str, ...] = field(default=(), compare=False)
    source: str | None = field(default=None, compare=False)
    # how it was read: its format, and whether from headers or by loading (provenance)
    read_as: str | None = field(default=None, compare=False)
    # the training framework that wrote the checkpoint, as ``statedict show`` names it
    framework: str | None = field(default=None, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def by_key(self) -> dict[str, TensorEntry]:
        return {t.key: t for t in self.tensors}

    @property
    def totals(self) -> dict[str, int]:
        """Elements, parameters, trainable parameters and bytes; tied storages count once."""
        elements = params = trainable = nbytes = tensors = 0
        itemsize = DTYPE_ITEMSIZE.get
        for t in self.tensors:  # numel and nbytes inlined: once per tensor of every check
            kind = t.kind
            tensors += kind != "object"
            if t.tied_to is not None:
                continue
            numel = math.prod(t.shape) if t.shape is not None else 0
            elements += numel
            if t.dtype is not None:
                nbytes += numel * itemsize(t.dtype, 0)
            if kind == "parameter":
                params += numel
                if t.requires_grad:
                    trainable += numel
        return {
            "tensors": tensors,
            "elements": elements,
            "parameters": params,
            "trainable": trainable,
            "bytes": nbytes,
        }

    @property
    def knows_modules(self) -> bool:
        """Taken from a module (a live model, or a snapshot or pickle of one), so it knows
        which keys are parameters and buffers and which buffers are non-persistent.

        A bare state_dict, a checkpoint file of one or its snapshot knows neither: every
        key is a ``tensor`` and a non-persistent buffer (BERT's ``position_ids``, a rotary
        ``inv_freq``) was never saved, so the other side's cannot be a difference.
        """
        return bool(self.non_persistent_buffers) or any(
            t.kind in ("parameter", "buffer") for t in self.tensors
        )

    @property
    def has_values(self) -> bool:
        return any(t.fingerprint is not None for t in self.tensors)

    # ---- JSON --------------------------------------------------------------------------

    def to_json(self) -> str:
        """The snapshot text: stable byte for byte, one line per tensor and per group."""
        return snapshot_text(self)

    @classmethod
    def from_json(cls, text: str, path: str | os.PathLike[str] = "<snapshot>") -> Schema:
        """Parse and validate a snapshot; every problem names the file and, if it can, the line."""
        return cls(**snapshot_fields(text, os.fspath(path)))
