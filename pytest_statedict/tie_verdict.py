"""Ties on load: two checkpoint tensors landing on one (tied) parameter, or one split in two.

A refactor that ties ``lm_head.weight`` to ``transformer.wte.weight`` still loads an old,
untied checkpoint with ``strict=True``: both keys exist, torch copies both into the one
parameter, and the one loaded last wins. If the two trained matrices differed, one of them
is silently thrown away and the model's outputs change. So a tie is part of the load
verdict: the two tensors' values decide, read where the checkpoint has them (memory-mapped
tensors) or compared by the fingerprints of a snapshot with values; equal values load (the
checkpoint was tied in all but storage), different ones do not, and where neither is
known the verdict is NO too, saying it could not compare them: a trained tensor that may
be lost is never a "loads". The other way, one checkpoint tensor feeding
two parameters that are no longer tied, loads both from it: a note, not a failure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import StateDictError
from .printable import printable
from .schema import Schema

__all__ = ["CheckpointValues", "TieOnLoad", "tied_groups", "ties_on_load"]

# The checkpoint's own tensors (memory-mapped), read only when a tie needs their values.
CheckpointValues = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class TieOnLoad:
    """One tied parameter of the model that several checkpoint keys load into (``merged``),
    or one checkpoint tensor that now loads into several independent ones (``split``).

    ``keys`` are in load order: for ``merged`` the last one's value is what the parameter
    keeps. ``equal``: whether the checkpoint's tensors under those keys hold equal values
    (None: not known, the checkpoint was read without data).
    """

    keys: tuple[str, ...]
    split: bool = False
    equal: bool | None = None

    @property
    def may_drop_a_tensor(self) -> bool:
        """Two checkpoint tensors on one parameter, not known to be equal: one is lost."""
        return not self.split and self.equal is not True

    def describe(self) -> str:
        """One clause for a verdict line."""
        keys = [printable(key) for key in self.keys]  # names from the checkpoint
        last, others = keys[-1], ", ".join(keys[:-1])
        if self.split:
            return (
                f"{', '.join(keys)} were one tensor in the checkpoint and now load as "
                "independent parameters, each from it"
            )
        if self.equal is None:
            return (
                f"{last} would overwrite {others} (separate tensors in the checkpoint, one "
                "tied parameter now), and their values could not be compared (read without "
                "tensor data: a snapshot with values=True can tell)"
            )
        if self.equal:
            return f"{others} and {last} load into one tied parameter; equal in the checkpoint"
        return f"it loads, but {last} overwrites the trained {others}: one tied parameter now"


def ties_on_load(
    own: Mapping[str, Any],
    state: Mapping[str, Any],
    recorded: Schema | None = None,
    values: CheckpointValues | None = None,
) -> list[TieOnLoad]:
    """How the model's tied parameters and the checkpoint's tied tensors meet on load.

    ``own`` is the model's ``state_dict(keep_vars=True)``; ``state`` is what is loaded
    (real tensors, memory-mapped, or meta tensors rebuilt from a schema); ``recorded``, the
    schema it was rebuilt from, gives the value fingerprints of a snapshot with values;
    ``values`` reads a meta state's tensors from the checkpoint file where it has them (a
    :class:`~.errors.StateDictError` from it: not known).
    """
    if values is not None:
        values = functools.cache(values)  # one read for every tie
    found = [
        _merged(keys, state, recorded, values)
        for keys in tied_groups(own)
        if sum(k in state for k in keys) > 1
    ]
    tied_in_checkpoint = _checkpoint_ties(state)
    for keys in tied_in_checkpoint:
        present = [k for k in keys if k in own]
        if len({id(own[k]) for k in present}) > 1:
            found.append(TieOnLoad(tuple(present), split=True))
    return found


def tied_groups(state: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Keys of a ``state_dict(keep_vars=True)`` that share one tensor (a tied parameter),
    in state_dict order."""
    by_tensor: dict[int, list[str]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            by_tensor.setdefault(id(value), []).append(key)
    return [tuple(keys) for keys in by_tensor.values() if len(keys) > 1]


def _merged(
    keys: tuple[str, ...],
    state: Mapping[str, Any],
    recorded: Schema | None,
    values: CheckpointValues | None,
) -> TieOnLoad:
    present = tuple(k for k in keys if k in state)
    tensors = [state[k] for k in present]
    if len({_identity(t) for t in tensors}) == 1:
        return TieOnLoad(present, equal=True)  # one tensor in the checkpoint too
    entries = recorded.by_key() if recorded is not None else {}
    prints = [entries[k].fingerprint if k in entries else None for k in present]
    if all(p is not None for p in prints):
        return TieOnLoad(present, equal=len(set(prints)) == 1)
    if values is not None and not _have_data(tensors):
        try:
            read = values()
        except StateDictError:
            read = {}
        if all(k in read for k in present):
            tensors = [read[k] for k in present]
    if _have_data(tensors):
        first = tensors[0]
        try:
            equal = all(_same_values(first, t) for t in tensors[1:])
        except (RuntimeError, NotImplementedError):  # a subclass without aten.equal
            return TieOnLoad(present)
        return TieOnLoad(present, equal=equal)
    return TieOnLoad(present)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether loading either gives the parameter the same values: equal shapes and
    numbers, NaN where the other has NaN, and across dtypes (torch casts on load) equal
    once ``b`` is in ``a``'s dtype."""
    if a.shape != b.shape:
        return False
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if torch.equal(a, b):
        return True
    if not a.is_floating_point() and not a.is_complex():
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _have_data(tensors: list[Any]) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in tensors)


def _checkpoint_ties(state: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Keys that are one tensor in the checkpoint (a meta state rebuilt from a schema shares
    one meta tensor between tied keys, as ``torch.load`` shares storage)."""
    groups: dict[Any, list[str]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel():
            groups.setdefault(_identity(value), []).append(key)
    return [tuple(keys) for keys in groups.values() if len(keys) > 1]


def _identity(value: Any) -> Any:
    """What makes two loaded tensors one: the same object, or the same view of one storage."""
    if not isinstance(value, torch.Tensor) or value.device.type == "meta" or not value.numel():
        return id(value)
    try:
        return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                tuple(value.stride()), value.dtype)  # fmt: skip
    except (RuntimeError, NotImplementedError):  # a tensor subclass with no plain storage
        return id(value)
