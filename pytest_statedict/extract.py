"""From models, state_dicts, optimizers, checkpoints and files to a :class:`Schema`.

Everything here is O(number of tensors): shapes, dtypes and storage identities are read
from tensor metadata, which works on the meta device and on memory-mapped checkpoints
without touching a byte of data. Only ``values=True`` reads data, one tensor at a time
(``fingerprint``). A path is read by its format (``formats.reading``), which hands what a
file held back to the walks here.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedObjectError, hide_from_bad_input
from .fingerprint import state_fingerprints
from .formats.base import unsupported_object
from .formats.reading import schema_of_file
from .layout import (
    StorageViews,
    Tensors,
    flags,
    hyperparams,
    is_optimizer_state_dict,
    optimizer_state_schema,
    select_part,
    state_specs,
    type_name,
    versions,
)
from .layout import is_state_dict as layout_is_state_dict
from .layout import mapping_schema as layout_mapping_schema
from .runtime import checkpoint_loader
from .schema import Schema
from .schema_entries import (
    ELEMENTWISE_STATE,
    Fingerprint,
    OptimizerSchema,
    ParamGroup,
    ParamState,
    StateSpec,
    TensorEntry,
    dtype_name,
)

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

_tensor_specs: dict[tuple[Any, Any], StateSpec] = {}

# The layout a nested tensor's entry records (torch.strided's nested tensors report
# ``strided`` as their layout, yet have no sizes).
NESTED_LAYOUT = "nested"


class _TorchTensors(Tensors):
    """torch tensors, to the walks of ``layout``."""

    types = (torch.Tensor,)

    def entries(
        self, state: Mapping[str, Any], kind_of: Any, *, values: bool
    ) -> tuple[tuple[TensorEntry, ...], tuple[str, ...]]:
        return _entries(state, kind_of, values=values)

    def spec(self, tensor: Any) -> StateSpec:
        # A StateSpec is frozen: the few (shape, dtype) pairs an optimizer repeats for
        # thousands of parameters are each made once and shared, keyed by torch.Size and
        # torch.dtype (hashable)
        key = (tensor.shape, tensor.dtype)
        spec = _tensor_specs.get(key)
        if spec is None:
            if len(_tensor_specs) >= 4096:
                _tensor_specs.clear()
            spec = _tensor_specs[key] = StateSpec(
                shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype)
            )
        return spec

    def hyperparam(self, tensor: Any) -> dict[str, Any]:
        if tensor.numel() <= 16 and not tensor.is_meta:
            return {"tensor": tensor.detach().cpu().tolist(), "dtype": dtype_name(tensor.dtype)}
        return {"tensor_shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


TORCH_TENSORS = _TorchTensors()


def schema_of(
    obj: Any,
    *,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    values: bool = False,
    weights_only: bool = True,
    part: str | None = None,
) -> Schema:
    """The schema of a module, state_dict, optimizer, general checkpoint or checkpoint file.

    ``optimizer`` adds an optimizer's param_groups and state layout (by parameter name when
    ``obj`` is the module it optimizes). ``values=True`` adds a fingerprint of every tensor.
    ``weights_only=False`` must be asked for by name to unpickle arbitrary objects from a
    file: only do that for files you trust. ``part`` picks one entry of a general
    checkpoint, e.g. ``"modelB_state_dict"`` (``"a/b"`` or ``"optimizer_states/0"`` for
    nested ones).
    """
    if isinstance(obj, Schema):
        if optimizer is not None:
            raise UnsupportedObjectError(
                "schema_of(): a Schema is already a schema; optimizer= applies to a module, "
                "state_dict or checkpoint"
            )
        if values and not obj.has_values:
            raise UnsupportedObjectError(
                "schema_of(): values=True needs a Schema taken with values=True (this one "
                "records no value fingerprints)"
            )
        return obj
    if isinstance(obj, (str, os.PathLike)):
        schema = schema_of_file(
            obj,
            describe=_loaded_schema,
            values=values,
            weights_only=weights_only,
            part=part,
            loader=checkpoint_loader(),
        )
        if optimizer is not None:
            schema = _with_optimizer(schema, optimizer_schema(optimizer))
        return schema
    _reject_bound_state_dict(obj)
    if part is not None:
        obj = select_part(obj, part)
    if isinstance(obj, nn.Module):
        return module_schema(obj, optimizer=optimizer, values=values)
    if isinstance(obj, torch.optim.Optimizer):
        return Schema(tensors=(), optimizer=optimizer_schema(obj))
    if isinstance(obj, Mapping):
        schema = mapping_schema(obj, values=values)
        if optimizer is not None:
            schema = _with_optimizer(schema, optimizer_schema(optimizer))
        return schema
    raise UnsupportedObjectError(
        f"schema_of(): cannot take the schema of a {type(obj).__module__}.{type(obj).__qualname__}"
        "; pass an nn.Module, a state_dict (a mapping of names to tensors), an optimizer, a "
        "general checkpoint dict, a checkpoint path or a Schema"
    )


def _reject_bound_state_dict(obj: Any) -> None:
    """``model.state_dict`` (the method) where ``model.state_dict()`` was meant."""
    if inspect.ismethod(obj) and obj.__name__ == "state_dict":
        owner = type(obj.__self__).__name__
        raise UnsupportedObjectError(
            f"got the bound method {owner}.state_dict, not a state_dict: call it, "
            f"`{owner.lower()}.state_dict()` (a classic mistake, also when saving checkpoints)"
        )


def _with_optimizer(schema: Schema, opt: OptimizerSchema) -> Schema:
    return replace(schema, optimizer=opt)


def _loaded_schema(obj: Any, values: bool) -> Schema:
    """The schema of what a checkpoint file held (``formats.reading`` reads the file)."""
    if isinstance(obj, nn.Module):
        return module_schema(obj, values=values)
    if isinstance(obj, dict):
        return mapping_schema(obj, values=values)
    raise unsupported_object(obj)


# ---- modules and state_dicts -------------------------------------------------------------


def module_schema(
    module: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    values: bool = False,
) -> Schema:
    state = module.state_dict(keep_vars=True)
    # One walk over the modules (duplicates included, as state_dict() does) for the
    # parameters, buffers and non-persistent buffers: three named_* walks cost 3x more.
    named_params: list[tuple[str, torch.Tensor]] = []
    buffers: set[str] = set()
    non_persistent: list[str] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        if sub._parameters:
            named_params += [(dot + n, p) for n, p in sub._parameters.items() if p is not None]
        if sub._buffers:
            buffers.update(dot + n for n, b in sub._buffers.items() if b is not None)
            non_persistent += [
                dot + n
                for n in sorted(sub._non_persistent_buffers_set)
                if sub._buffers.get(n) is not None
            ]
    params = {name for name, _ in named_params}

    def kind_of(key: str) -> str:
        if key in params:
            return "parameter"
        if key in buffers:
            return "buffer"
        return "tensor"

    entries, notes = _entries(state, kind_of, values=values)
    opt = None
    if optimizer is not None:
        names = {id(p): n for n, p in reversed(named_params)}  # a tied tensor: its first name
        opt = optimizer_schema(optimizer, names=names)
    return Schema(
        tensors=entries,
        versions=versions(state),
        non_persistent_buffers=tuple(non_persistent),
        optimizer=opt,
        source=f"{type(module).__name__} module",
        notes=notes,
    )


def mapping_schema(obj: Mapping[Any, Any], *, values: bool = False) -> Schema:
    """A bare state_dict, an optimizer's, or a general checkpoint with parts of usual names."""
    return layout_mapping_schema(obj, TORCH_TENSORS, values=values)


def is_state_dict(obj: Any) -> bool:
    """Names to tensors (a few non-tensor entries such as ``_extra_state`` allowed)."""
    return layout_is_state_dict(obj, TORCH_TENSORS)


def _entries(
    state: Mapping[str, Any], kind_of: Any, *, values: bool
) -> tuple[tuple[TensorEntry, ...], tuple[str, ...]]:
    """The entries of a state_dict, and notes on storage that a save would waste.

    Runs once per tensor of models with thousands of them: each attribute is read once.
    """
    views = StorageViews()
    entries = []
    strided = torch.strided
    fingerprints = state_fingerprints(state) if values else {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            entries.append(
                TensorEntry(
                    key=key,
                    kind="object",
                    type=type_name(value),
                    fingerprint=fingerprints.get(key),
                )
            )
            continue
        if value.is_nested:  # no shape of its own: its components', in a layout of its own
            entries.append(_nested_entry(key, value, kind_of(key), fingerprints.get(key)))
            continue
        layout = value.layout
        storage = _storage_of(value) if layout == strided else None
        tied_to = None
        if storage is not None:
            used = value.numel() * value.element_size()
            tied_to = views.add(storage._cdata, storage.nbytes, key, used)
        kind = kind_of(key)
        entries.append(
            TensorEntry(
                key,
                kind,
                tuple(value.shape),
                dtype_name(value.dtype),
                bool(value.requires_grad) if kind == "parameter" else None,
                tied_to,
                None if layout == strided else str(layout).removeprefix("torch."),
                str(value.qscheme()).removeprefix("torch.") if value.is_quantized else None,
                None,
                fingerprints.get(key),
            )
        )
    return tuple(entries), views.waste_notes()


def _nested_entry(
    key: str, value: torch.Tensor, kind: str, fingerprint: Fingerprint | None
) -> TensorEntry:
    """A nested tensor (``torch.nested``): its components counted as its shape, its layout
    ``nested`` (a strided nested tensor has no sizes: asking raises), like a sparse one a
    key whose layout is recorded, not rebuilt."""
    return TensorEntry(
        key,
        kind,
        (value.size(0),),
        dtype_name(value.dtype),
        bool(value.requires_grad) if kind == "parameter" else None,
        None,
        NESTED_LAYOUT,
        None,
        None,
        fingerprint,
    )


def _storage_of(tensor: torch.Tensor) -> Any:
    """The storage behind a strided tensor (meta tensors included); None if it has none."""
    if tensor.numel() == 0:
        return None
    try:
        return tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None


def require_module(obj: Any, caller: str) -> nn.Module:
    """``obj`` if it is a model; else an error that says what was passed and what to pass."""
    if isinstance(obj, nn.Module):
        return obj
    hint = ""
    if isinstance(obj, Mapping):
        hint = (
            ": that looks like a state_dict; pass the model it came from (the check loads "
            "into a fresh copy of the model with its own load_state_dict)"
        )
    elif callable(obj) and getattr(obj, "__name__", "") == "state_dict":
        hint = ": that is the bound method model.state_dict; pass the model itself"
    raise UnsupportedObjectError(
        f"{caller} needs the model (a torch.nn.Module), not a {type_name(obj)}{hint}"
    )


def nothing_to_check(obj: Any) -> UnsupportedObjectError:
    """The error for a check of an object with no tensors (and no optimizer) at all.

    An empty schema matches only another empty one, so such a check would guard nothing;
    it is nearly always a mistake, often layers kept in a plain list or dict, which
    ``nn.Module`` does not register (``nn.ModuleList`` / ``nn.ModuleDict`` do).
    """
    hint = ""
    if isinstance(obj, nn.Module):
        what = f"{type_name(obj)} has nothing in its state_dict"
        non_persistent = [name for name, _ in obj.named_buffers() if name not in obj.state_dict()]
        if non_persistent:
            what += f" (its buffers {', '.join(non_persistent[:5])} are non-persistent)"
        hidden = _unregistered_modules(obj)
        if hidden:
            hint = (
                f"; {', '.join(hidden[:5])} hold(s) modules in a plain list, tuple or dict, "
                "which nn.Module does not register: use nn.ModuleList / nn.ModuleDict"
            )
    elif isinstance(obj, (str, os.PathLike)):
        what = f"{os.fspath(obj)} holds no tensors"
    elif isinstance(obj, Schema):
        what = f"the schema {obj.source or ''} has no keys".replace("  ", " ")
    else:
        what = "an empty state_dict"
    return UnsupportedObjectError(
        f"nothing to check: {what}, so the check would guard nothing{hint}"
    )


def _unregistered_modules(model: nn.Module) -> list[str]:
    internals = set(vars(nn.Module()))  # _modules, _parameters, hooks...
    found = []
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name in internals:
                continue
            items = value.values() if isinstance(value, dict) else value
            if isinstance(value, (list, tuple, dict)) and any(
                isinstance(v, nn.Module) for v in items
            ):
                found.append(f"{prefix}.{name}" if prefix else name)
    return found


# ---- optimizers --------------------------------------------------------------------------


def optimizer_schema(
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    *,
    names: Mapping[int, str] | None = None,
) -> OptimizerSchema:
    """Param_groups (hyperparameters exactly, members by name when known) and state layout."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return _live_optimizer_schema(optimizer, names or {})
    if not is_optimizer_state_dict(optimizer):
        raise UnsupportedObjectError(
            f"optimizer=: expected a torch.optim.Optimizer or its state_dict(), got a "
            f"{type_name(optimizer)}"
        )
    return optimizer_state_schema(optimizer, TORCH_TENSORS)


def _live_optimizer_schema(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> OptimizerSchema:
    groups = []
    states = []
    problems = []
    index = 0
    for group in optimizer.param_groups:
        members: list[str | int] = []
        for param in group["params"]:
            member = names.get(id(param), index)
            members.append(member)
            entries = optimizer.state.get(param)
            if entries:
                specs = state_specs(entries, TORCH_TENSORS)
                states.append(ParamState(param=member, entries=specs))
                shape = None
                for name, spec in specs.items():
                    # a 0-d state (NovoGrad's layer-wise exp_avg_sq) is per-tensor by design
                    if name in ELEMENTWISE_STATE and spec.type is None and spec.shape:
                        shape = tuple(param.shape) if shape is None else shape
                        if spec.shape != shape:
                            problems.append(
                                f"optimizer state {name!r} of {member!r} has shape "
                                f"{list(spec.shape)} but the parameter has shape "
                                f"{list(shape)}: resuming would apply it to the wrong tensor"
                            )
            index += 1
        groups.append(
            ParamGroup(
                hyperparams=hyperparams(group, TORCH_TENSORS),
                params=tuple(members),
                flags=flags(group, TORCH_TENSORS),
            )
        )
    cls = type(optimizer)
    return OptimizerSchema(
        cls=f"{cls.__module__}.{cls.__qualname__}",
        param_groups=tuple(groups),
        state=tuple(states),
        problems=tuple(problems),
    )
