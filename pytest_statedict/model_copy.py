"""Copies of a model to load into: on the meta device, tied as the original is.

The refactor gate, the snapshot check's load verdict and the round-trip all load a
checkpoint into a copy of the user's model, never into the model itself: a copy on the
meta device costs no memory for tensors, and ``load_state_dict(assign=True)`` fills it
while the model's own load hooks run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import StateDictError, first_line

__all__ = [
    "attribute_tensors",
    "copy_module",
    "materialised_copy",
    "meta_copy",
    "restore_tied_keys",
    "retie",
    "storage_key",
    "tied_parameter_groups",
]


def materialised_copy(model: nn.Module, device: str) -> nn.Module:
    """A copy with uninitialised tensors on ``device``, tied as the original is."""
    fresh = meta_copy(model).to_empty(device=device)
    retie(model, fresh, only_shared_storage=False)
    return fresh


def meta_copy(model: nn.Module, *, caller: str = "roundtrip()") -> nn.Module:
    """A deep copy of the module structure whose parameters and buffers are on meta.

    Costs no memory for tensors, and keeps ties: a tensor shared by two modules maps to
    one meta tensor. Tensors held as plain attributes (legacy ``weight_norm``'s recomputed
    ``weight``, caches) become meta tensors too: they are no state, and a non-leaf one
    cannot be deep-copied at all. A model that still cannot be copied is refused with a
    message naming ``factory=``, the way to build the copy by the user's own code.
    """
    memo: dict[int, Any] = {}
    tensors: list[torch.Tensor] = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    for tensor in tensors:
        if id(tensor) in memo:
            continue
        empty = _meta_like(tensor)
        if isinstance(tensor, nn.Parameter):
            empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = empty
    for tensor in attribute_tensors(model):
        memo.setdefault(id(tensor), _meta_like(tensor))
    return copy_module(model, memo, caller)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor shaped as ``tensor``: of its class where the class can make one, else
    a plain one of its shape and dtype.

    A tensor subclass that implements few operators (torchao's quantized ``Int8Tensor``)
    has no ``empty_like``. A plain meta tensor stands for it: the copy is only loaded into
    with ``assign=True``, which puts the checkpoint's own tensor in its place and checks
    the copy's tensor for its shape alone, so no ``factory=`` is needed for it.
    """
    try:
        return torch.empty_like(tensor, device="meta")
    except (NotImplementedError, RuntimeError, TypeError):
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def attribute_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors a module holds as plain attributes, outside its parameters and buffers."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                yield value


def copy_module(model: nn.Module, memo: dict[int, Any], caller: str) -> nn.Module:
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # whatever a module's __deepcopy__ or a tensor's raises
        raise StateDictError(
            f"{caller}: {type(model).__name__} cannot be copied to load into "
            f"({first_line(exc, 300)}); pass factory=<a function that builds a fresh "
            f"{type(model).__name__}> and the checkpoint is loaded into what it returns"
        ) from None


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter object (tied weights), for groups of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def restore_tied_keys(original: nn.Module, state: dict[str, Any]) -> None:
    """safetensors stores a tied tensor under one of its names; give it back its others.

    This is what ``safetensors.torch.load_model`` relies on the model's own tying for.
    """
    for names in tied_parameter_groups(original):
        present = [n for n in names if n in state]
        if present:
            for name in names:
                state.setdefault(name, state[present[0]])


def retie(original: nn.Module, fresh: nn.Module, *, only_shared_storage: bool = True) -> None:
    """Make the fresh copy's parameters tied where the original's are.

    ``assign=True`` and ``to_empty`` make one Parameter per key. After a load, only keys
    whose loaded tensors share storage (the file stored them as one) are re-tied, so a load
    that really broke a tie (two copies) is still reported.
    """
    for names in tied_parameter_groups(original):
        first = fresh.get_parameter(names[0])
        for name in names[1:]:
            other = fresh.get_parameter(name)
            if other is first or (only_shared_storage and storage_key(other) != storage_key(first)):
                continue
            owner, _, attr = name.rpartition(".")
            setattr(fresh.get_submodule(owner), attr, first)


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's data starts: equal for two tensors that share it (a tie)."""
    return t.untyped_storage().data_ptr(), int(t.storage_offset())
