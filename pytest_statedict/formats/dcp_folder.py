"""``torch.distributed.checkpoint`` folders, read from their ``.metadata`` (``readers.dcp_folder``).

A folder holding ``.metadata``, or that file itself (it names its folder). Its schema is the
whole layout, so the gate rebuilds meta tensors from it; the folder is never loaded whole
(``torch.distributed.checkpoint.load`` reads into a model's own tensors, not into a dict).

What ``dcp.save`` was given is walked as a loaded checkpoint is (``layout``): a bare
state_dict, or a general checkpoint whose model part (``model``...) is found by itself,
whose optimizer part (``optim``...) is an optimizer, and whose other entries are extras;
``part=`` picks any entry. An optimizer is saved in one of two forms, both made torch's
own here (:func:`_as_torch_optimizer`): ``optimizer.state_dict()`` (its state keyed by
index, which DCP's flattening turned into strings) and the DCP tutorial's
``get_state_dict(model, optimizer)`` (state keyed and param_groups listing parameters by
their names), which becomes index-keyed state with each group's ``param_names``, so its
members are known by name, as torch >= 2.6 saves them. A model whose keys were flattened
to the top beside an optimizer part (torchtitan) is that model; a layout of no usual part
lists every entry by its dotted key, as DCP stored it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..layout import (
    MODEL_KEYS,
    OPTIMIZER_KEYS,
    KindOf,
    Tensors,
    is_optimizer_state_dict,
    is_state_dict,
    mapping_schema,
    optimizer_state_schema,
    type_name,
)
from ..readers import dcp_folder as reader
from ..readers.files import require_regular_file
from ..schema import Schema
from ..schema_entries import StateSpec, TensorEntry
from .base import Loaded, NestedSchema, object_schema, unsupported_object

__all__ = ["DCP", "FORMAT", "DcpFolder"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

DCP = "dcp"


class DcpFolder:
    """A DCP checkpoint folder."""

    name = DCP
    schema_first = True
    torch_free = True
    save = None

    def detect(self, path: Path, head: bytes | None) -> bool:
        if head is None:
            return (path / reader.METADATA).exists()
        if path.name == reader.METADATA:
            require_regular_file(path)  # an unreadable .metadata: its own error, here
            return True
        return False

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        folder = _folder(path)
        if values:
            raise CheckpointError(folder, "values=True is not supported for DCP checkpoints")
        checkpoint = reader.read_checkpoint(folder)
        tree = _as_torch_optimizers(folder, checkpoint.tree)

        def describe(obj: Any, values: bool) -> Schema:
            if not isinstance(obj, Mapping):
                raise unsupported_object(obj)
            at_top = _model_at_top(obj)
            if at_top is not None:
                return at_top
            if _parts(obj) or is_state_dict(obj, DCP_TENSORS) or is_optimizer_state_dict(obj):
                return mapping_schema(obj, DCP_TENSORS)
            # no part of a usual name: every entry under ``part`` by its dotted key, as stored
            prefix = f"{part.replace('/', '.')}." if part else ""
            flat = {
                key.removeprefix(prefix): value
                for key, value in checkpoint.entries.items()
                if key.startswith(prefix)
            }
            return Schema(tensors=DCP_TENSORS.entries(flat, lambda key: "tensor", values=False)[0])

        schema = object_schema(folder, tree, set(), describe=describe, values=False, part=part)
        notes = schema.notes + (_unchecked_optimizers(tree) if part is None else ())
        return replace(schema, framework=FRAMEWORK, notes=notes)

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        raise CheckpointError(
            _folder(path),
            "is a torch.distributed.checkpoint folder: it is read from its .metadata, never "
            "loaded whole (torch.distributed.checkpoint.load reads it into a model)",
        )


def _model_at_top(obj: Mapping[Any, Any]) -> Schema | None:
    """A model whose keys were flattened to the top, beside an optimizer part, as torchtitan
    saves it (``{**model.state_dict(), "optimizer": ..., "train_state": ...}``): the top's
    own entries are the model, the optimizer part is the optimizer where it is one, every
    other part an extra. None for any other layout."""
    if not any(isinstance(v, reader.TensorMeta) for v in obj.values()) or not any(
        key in OPTIMIZER_KEYS and isinstance(value, Mapping) for key, value in obj.items()
    ):
        return None
    model = {key: value for key, value in obj.items() if not isinstance(value, (Mapping, list))}
    parts = {key: value for key, value in obj.items() if key not in model}
    opt_key = next((k for k in OPTIMIZER_KEYS if is_optimizer_state_dict(parts.get(k))), None)
    optimizer = optimizer_state_schema(parts[opt_key], DCP_TENSORS) if opt_key else None
    extras = {str(key): type_name(value) for key, value in parts.items() if key != opt_key}
    return replace(mapping_schema(model, DCP_TENSORS), optimizer=optimizer, extras=extras)


class UnreadOptimizer:
    """An optimizer part whose param_groups DCP stored through one of its storage
    extensions (compressed): their members unread, it is an extra, not an optimizer."""


def _unchecked_optimizers(obj: Mapping[Any, Any]) -> tuple[str, ...]:
    """A note for each optimizer part listed as an extra: one whose members were not read,
    and one in get_optimizer_state_dict's flattened form, which keeps each parameter's
    hyperparameters apart and no param_groups (what its load does depends on today's
    groups alone, which a layout of groups cannot judge)."""
    notes = []
    for key, value in obj.items():
        if isinstance(value, UnreadOptimizer):
            notes.append(
                f"{key!r} holds an optimizer whose param_groups are stored through a DCP "
                "storage extension (compressed), not read here: it is listed as an extra, "
                "not checked as an optimizer"
            )
        elif (
            key in OPTIMIZER_KEYS
            and isinstance(value, Mapping)
            and value
            and all(str(k).startswith(("state.", "param_groups.")) for k in value)
        ):
            notes.append(
                f"{key!r} holds an optimizer's state in get_optimizer_state_dict's flattened "
                "form (flatten_optimizer_state_dict=True): it is listed as an extra, not "
                "checked as an optimizer"
            )
    return tuple(notes)


def _parts(obj: Mapping[Any, Any]) -> list[Any]:
    """The entries that ``layout`` reads as parts: under a usual name, or a state_dict."""
    return [
        key
        for key, value in obj.items()
        if key in MODEL_KEYS
        or key in OPTIMIZER_KEYS
        or is_state_dict(value, DCP_TENSORS)
        or is_optimizer_state_dict(value)
    ]


def _as_torch_optimizers(folder: Path, node: Any) -> Any:
    """Every optimizer state_dict in what DCP saved, in torch's own form (see the module)."""
    if isinstance(node, list):
        return [_as_torch_optimizers(folder, item) for item in node]
    if not isinstance(node, dict):
        return node
    groups = node.get("param_groups")
    if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
        if any(isinstance(g.get("params"), bytes) for g in groups):
            return UnreadOptimizer()
        # an optimizer that has taken no step saves no state: DCP then writes no "state"
        return _as_torch_optimizer(folder, {"state": {}, **node})
    return {key: _as_torch_optimizers(folder, value) for key, value in node.items()}


def _as_torch_optimizer(folder: Path, optimizer: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's state_dict as ``optimizer.state_dict()`` gives it: state keyed by
    each parameter's index, and its names, where it was saved by name, in ``param_names``."""
    state = optimizer["state"]
    if isinstance(state, list):  # keyed 0, 1, ...: read as the list they flatten alike
        state = dict(enumerate(state))
    members = []
    for i, group in enumerate(optimizer["param_groups"]):
        params = group.get("params")
        if not isinstance(params, list) or not all(
            isinstance(p, (int, str)) and not isinstance(p, bool) for p in params
        ):
            raise CheckpointError(
                folder, f"its optimizer's param_group {i} lists no parameters it can read"
            )
        members += params
    if not isinstance(state, dict) or not all(isinstance(s, dict) for s in state.values()):
        raise CheckpointError(folder, "its optimizer's state is not one mapping per parameter")
    if all(isinstance(p, int) for p in members):  # optimizer.state_dict(): keys were str(index)
        indexed = {_index(k): v for k, v in state.items()}
        stray = next((k for k in indexed if not isinstance(k, int)), None)
        if stray is not None:
            raise CheckpointError(
                folder, f"its optimizer's state names {stray!r}, which is no parameter's index"
            )
        return {**optimizer, "state": indexed}
    index = {name: i for i, name in enumerate(members)}
    unknown = [name for name in state if name not in index]
    if unknown or len(index) != len(members):
        raise CheckpointError(
            folder,
            f"its optimizer's state names {unknown[0]!r}, which no param_group lists"
            if unknown
            else "its optimizer lists a parameter in two places",
        )
    groups, start = [], 0
    for group in optimizer["param_groups"]:
        size = len(group["params"])
        groups.append(
            {**group, "params": list(range(start, start + size)), "param_names": group["params"]}
        )
        start += size
    return {**optimizer, "state": {index[k]: v for k, v in state.items()}, "param_groups": groups}


def _index(key: str | int) -> str | int:
    """A state key DCP's flattening made a string ("0"), as the index torch saved."""
    return int(key) if isinstance(key, str) and key.isdigit() else key


class DcpTensors(Tensors):
    """The tensors of a DCP checkpoint's ``.metadata``, to the walks of ``layout``."""

    types = (reader.TensorMeta,)

    def entries(
        self, state: Mapping[str, Any], kind_of: KindOf, *, values: bool
    ) -> tuple[tuple[TensorEntry, ...], tuple[str, ...]]:
        return tuple(
            TensorEntry(key, kind_of(key), value.shape, value.dtype)
            if isinstance(value, reader.TensorMeta)
            else TensorEntry(key=key, kind="object", type=type_name(value))
            for key, value in state.items()
        ), ()

    def spec(self, tensor: Any) -> StateSpec:
        return StateSpec(shape=tensor.shape, dtype=tensor.dtype)

    def hyperparam(self, tensor: Any) -> dict[str, Any]:
        return {"tensor_shape": list(tensor.shape), "dtype": tensor.dtype}


DCP_TENSORS = DcpTensors()
# what ``statedict show`` names as the writer of a DCP folder
FRAMEWORK = "torch.distributed.checkpoint"


def _folder(path: Path) -> Path:
    """The folder of a DCP checkpoint named by itself or by its ``.metadata``."""
    return path.parent if path.name == reader.METADATA and not path.is_dir() else path


FORMAT = DcpFolder()
