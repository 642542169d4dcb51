"""A state_dict rebuilt from a schema: meta tensors of the recorded shapes and dtypes.

A snapshot, a ``.safetensors`` header, a sharded index or a DCP folder records a
checkpoint's layout, not its data; loading that layout through a model's own
``load_state_dict`` answers "does it load?" for a few kilobytes of JSON as well as the
gigabytes of weights would. Only what a load hook reads by value is built on the CPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .errors import SnapshotError, first_line
from .schema import Schema
from .schema_entries import TensorEntry, dtype_name

__all__ = ["QUANTIZED_DTYPES", "state_from_snapshot"]


QUANTIZED_DTYPES = frozenset(
    {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
)


def _meta_tensor(schema: Schema, entry: TensorEntry) -> torch.Tensor:
    """The meta tensor a snapshot entry describes, or an error naming the snapshot and key."""
    problem = None
    try:
        dtype = getattr(torch, entry.dtype or "float32")
        if dtype in QUANTIZED_DTYPES:  # a quantized tensor is recorded with its qscheme
            problem = "a quantized dtype without a qscheme"
        else:
            tensor = torch.empty(entry.shape or (), dtype=dtype, device="meta")
    except (RuntimeError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        problem = first_line(exc, 200)
    if problem:
        raise SnapshotError(
            schema.source or "<snapshot>",
            f"{entry.key!r}: no {entry.dtype}{list(entry.shape or ())} tensor can be built to "
            f"load ({problem})",
        )
    return tensor


def state_from_snapshot(schema: Schema, model: nn.Module | None = None) -> OrderedDict[str, Any]:
    """A state_dict shaped as a snapshot records, with its module versions, to load.

    Tensors are meta tensors, except where a load hook reads values: a tensor of at most
    one element (quantized modules read ``scale`` and ``zero_point`` with ``float()``) is
    built on the CPU, with its recorded value when the snapshot has values; a quantized
    tensor (packed by its module's hook) is ``model``'s own when it has that key with the
    recorded shape, dtype and qscheme, else an uninitialised one on the CPU, and so are
    the other tensors of its module (a quantized conv packs its bias with it). An object
    entry (``_extra_state``, a dynamic-quantized module's packed weights), whose contents
    a snapshot does not record, is ``model``'s own; where the model has no such key, a
    string stands in for it, which the load reports as unexpected. Sparse tensors are
    left out (the caller counts them as present: the snapshot has them). Keys recorded as
    tied share one meta tensor, as ``torch.load`` gives them one storage.
    """
    own = _own_entries(schema, model)
    packing = {e.key.rpartition(".")[0] for e in schema.tensors if e.qscheme}
    state: OrderedDict[str, Any] = OrderedDict()
    for entry in schema.tensors:
        if entry.kind == "object":
            # the model's own, or a stand-in its load reports as unexpected
            state[entry.key] = own.get(entry.key, f"<{entry.type} recorded in the snapshot>")
        elif entry.qscheme:
            mine = own.get(entry.key)
            if _same_quantized(mine, entry):
                state[entry.key] = mine
            else:
                state[entry.key] = _quantized_tensor(schema, entry)
        elif entry.layout:
            continue  # a sparse layout: no tensor to rebuild, the key is in the snapshot
        elif entry.key.rpartition(".")[0] in packing:  # packed with a quantized weight
            mine = own.get(entry.key)
            if _same_plain(mine, entry):
                state[entry.key] = mine
            else:
                meta = _meta_tensor(schema, entry)
                state[entry.key] = torch.zeros(meta.shape, dtype=meta.dtype)
        elif math.prod(entry.shape or ()) <= 1:
            state[entry.key] = _scalar_tensor(schema, entry)
        elif entry.tied_to is not None and _same_tensor(state.get(entry.tied_to), entry):
            state[entry.key] = state[entry.tied_to]  # tied: one tensor, as torch.load gives
        else:
            state[entry.key] = _meta_tensor(schema, entry)
    if schema.versions is not None:
        keys = [entry.key for entry in schema.tensors]
        prefixes = {""} | {
            key.rsplit(".", i)[0] for key in keys for i in range(1, key.count(".") + 1)
        }
        state._metadata = {  # type: ignore[attr-defined]
            p: {"version": schema.versions.get(p, 1)} for p in sorted(prefixes)
        }
    return state


def _own_entries(schema: Schema, model: nn.Module | None) -> dict[str, Any]:
    """The model's state_dict, when the snapshot has entries a load needs values of."""
    if model is None or not any(e.kind == "object" or e.qscheme for e in schema.tensors):
        return {}
    return dict(model.state_dict())


def _same_plain(value: Any, entry: TensorEntry) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and not value.is_quantized
        and tuple(value.shape) == tuple(entry.shape or ())
        and dtype_name(value.dtype) == entry.dtype
    )


def _same_tensor(value: Any, entry: TensorEntry) -> bool:
    """A rebuilt meta tensor of the same shape and dtype as ``entry`` (its tie's root)."""
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "meta"
        and tuple(value.shape) == tuple(entry.shape or ())
        and dtype_name(value.dtype) == entry.dtype
    )


def _same_quantized(value: Any, entry: TensorEntry) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.is_quantized
        and tuple(value.shape) == tuple(entry.shape or ())
        and dtype_name(value.dtype) == entry.dtype
        and str(value.qscheme()).removeprefix("torch.") == entry.qscheme
    )


def _quantized_tensor(schema: Schema, entry: TensorEntry) -> torch.Tensor:
    """An uninitialised quantized CPU tensor of the recorded shape, dtype and qscheme.

    Quantized modules pack their weights as they load, which needs real memory (the
    quantized weights of a deployment, a byte per element). Per-channel tensors are
    quantized along their first dimension, as torch's quantized convs and linears are.
    """
    shape = tuple(entry.shape or ())
    try:
        dtype = getattr(torch, entry.dtype or "")
        if entry.qscheme in ("per_tensor_affine", "per_tensor_symmetric"):
            return torch._empty_affine_quantized(shape, scale=1.0, zero_point=0, dtype=dtype)
        if entry.qscheme in ("per_channel_affine", "per_channel_symmetric",
                             "per_channel_affine_float_qparams"):  # fmt: skip
            channels = shape[0] if shape else 1
            zero_dtype = torch.float if entry.qscheme.endswith("float_qparams") else torch.long
            return torch._empty_per_channel_affine_quantized(
                shape,
                scales=torch.ones(channels, dtype=torch.double),
                zero_points=torch.zeros(channels, dtype=zero_dtype),
                axis=0,
                dtype=dtype,
            )
        problem = f"unknown qscheme {entry.qscheme!r}"
    except (RuntimeError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        problem = first_line(exc, 200)
    raise SnapshotError(
        schema.source or "<snapshot>",
        f"{entry.key!r}: no quantized {entry.dtype}{list(shape)} tensor ({entry.qscheme}) can "
        f"be built to load ({problem})",
    )


def _scalar_tensor(schema: Schema, entry: TensorEntry) -> torch.Tensor:
    """A tensor of at most one element on the CPU, holding its recorded value if any."""
    meta = _meta_tensor(schema, entry)
    if entry.fingerprint is not None and not math.isnan(entry.fingerprint.min):
        value: float = entry.fingerprint.min
    else:  # no value recorded: one where a value is a float (a valid scale), else zero
        value = 1.0 if meta.dtype.is_floating_point or meta.dtype.is_complex else 0
    try:
        return torch.full(meta.shape, value, dtype=meta.dtype)
    except (RuntimeError, TypeError, OverflowError):
        return torch.zeros(meta.shape, dtype=meta.dtype)
