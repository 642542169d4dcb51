"""The layout of what a checkpoint holds, whatever its tensors are made of.

A loaded checkpoint is a state_dict, an optimizer's state_dict or a general checkpoint
(``{"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": 3}``): which of them it
is, where its parts are and what its param_groups say do not depend on what a tensor is.
``extract`` walks torch tensors with these functions; ``formats.torch_zip`` walks the
records the torch-free reader makes of a ``torch.save`` pickle (``readers.records``) with
the same ones, so the two give the same schema. A :class:`Tensors` says what a tensor is
and what the schema keeps of one. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .errors import UnsupportedObjectError
from .schema import Schema
from .schema_entries import (
    UNKNOWN_CLASS,
    ModuleVersion,
    OptimizerSchema,
    ParamGroup,
    ParamState,
    StateSpec,
    TensorEntry,
    module_version,
)

# Names under which the usual general checkpoints keep their parts (the PyTorch
# "saving and loading a general checkpoint" recipe, Lightning, Hugging Face Trainer...).
MODEL_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "model_state")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim", "optimizer_states")

# Switches that choose an implementation, not the maths (torch adds them over releases):
# comparing them would fail every optimizer snapshot on a torch upgrade, so they are kept
# apart from the hyperparameters (``ParamGroup.flags``), for the report's notes only.
# A group's members: its parameters, and their names where torch saved them.
NOT_HYPERPARAMS = frozenset({"params", "param_names"})
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})

# General checkpoints nest (a trainer's state holding the model's checkpoint), but not
# without end: past this, a model part inside a model part is a hostile file, not a layout.
MAX_PART_DEPTH = 32

# A hyperparameter is a number, a few numbers (betas) or a small dict: these bounds only
# stop a checkpoint whose param_group nests without end or repeats one container through
# shared references (1.4 KB of pickle expanding to 2^22 values) from costing the run.
MAX_HYPERPARAM_DEPTH = 32
MAX_HYPERPARAM_VALUES = 100_000

# An ``extras`` value is a type name, or "<type>: <detail>" (see describe_entry); the
# snapshots of earlier releases hold type names alone.
ENTRY_DETAIL = ": "
# The key that marks a Lightning checkpoint (the Lightning version that wrote it).
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"

KindOf = Callable[[str], str]


class Tensors:
    """What a tensor is to a walk, and what a schema keeps of one (subclassed per kind)."""

    # the classes whose instances are tensors
    types: tuple[type, ...] = ()

    def entries(
        self, state: Mapping[str, Any], kind_of: KindOf, *, values: bool
    ) -> tuple[tuple[TensorEntry, ...], tuple[str, ...]]:
        """A state_dict's entries, and notes on storage a save would waste."""
        raise NotImplementedError

    def spec(self, tensor: Any) -> StateSpec:
        """The shape and dtype of an optimizer state tensor."""
        raise NotImplementedError

    def hyperparam(self, tensor: Any) -> dict[str, Any]:
        """A tensor hyperparameter (a tensor ``lr``): its values when small, else its shape."""
        raise NotImplementedError


def type_name(value: Any) -> str:
    cls = type(value)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def is_state_dict(obj: Any, tensors: Tensors) -> bool:
    """Names to tensors (a few non-tensor entries such as ``_extra_state`` allowed)."""
    if not isinstance(obj, Mapping):
        return False
    if not obj:
        return True
    saw_tensor = False
    tensor_types = tensors.types
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, tensor_types):
            saw_tensor = True
        elif isinstance(value, (Mapping, list)) and not key.endswith("_extra_state"):
            return False
    return saw_tensor


def is_optimizer_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def versions(state: Mapping[str, Any]) -> dict[str, ModuleVersion] | None:
    """The module versions ``state_dict()`` records in ``_metadata``, as torch keeps them
    (Phi-3's string ``"0.0.5"`` too), but the default int 1."""
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):  # torch's load_state_dict would fail on it
        raise UnsupportedObjectError(
            f"schema_of(): its _metadata is a {type_name(metadata)}, not the mapping of "
            "module versions state_dict() keeps (load_state_dict would fail on it)"
        )
    return {
        prefix: module_version(version)
        for prefix, meta in metadata.items()
        if isinstance(meta, Mapping)
        and not ((version := meta.get("version", 1)) == 1 and type(version) is int)
    }


def select_part(obj: Any, part: str) -> Any:
    """The entry at ``part`` ("a/b/0") of a nested checkpoint, or a clear error."""
    current = obj
    for step in part.split("/"):
        if isinstance(current, Mapping) and step in current:
            current = current[step]
        elif isinstance(current, (list, tuple)) and step.isdigit() and int(step) < len(current):
            current = current[int(step)]
        else:
            where = (
                f"its keys are {', '.join(map(repr, list(current)[:10]))}"
                if isinstance(current, Mapping)
                else f"it is a {type_name(current)}"
            )
            raise UnsupportedObjectError(
                f"schema_of(): no part {part!r} ({step!r} not found: {where})"
            )
    return current


def mapping_schema(
    obj: Mapping[Any, Any], tensors: Tensors, *, values: bool = False, depth: int = 0
) -> Schema:
    """A bare state_dict, an optimizer's, or a general checkpoint with parts of usual names
    (a model part may itself be a general checkpoint, down to :data:`MAX_PART_DEPTH`)."""
    if depth > MAX_PART_DEPTH:
        raise UnsupportedObjectError(
            f"schema_of(): its model parts nest deeper than {MAX_PART_DEPTH} levels "
            "(a checkpoint holding a checkpoint holding ...): no state_dict found"
        )
    if is_optimizer_state_dict(obj):
        return Schema(tensors=(), optimizer=optimizer_state_schema(obj, tensors))
    if is_state_dict(obj, tensors):
        entries, notes = tensors.entries(obj, lambda key: "tensor", values=values)
        return Schema(tensors=entries, versions=versions(obj), notes=notes)
    model_key = _model_part(obj, tensors)
    opt_key = _optimizer_part(obj)
    if model_key is None and opt_key is None:
        raise _no_known_part(obj, tensors)
    model = (
        mapping_schema(obj[model_key], tensors, values=values, depth=depth + 1)
        if model_key
        else Schema(tensors=())
    )
    opt = None
    if opt_key is not None:
        raw = obj[opt_key]
        opt = optimizer_state_schema(raw[0] if isinstance(raw, list) else raw, tensors)
    extras = {str(k): describe_entry(k, v) for k, v in obj.items() if k not in (model_key, opt_key)}
    return replace(model, optimizer=opt, extras=extras, framework=lightning_framework(obj))


def describe_entry(key: Any, value: Any) -> str:
    """A general checkpoint's entry that is no model or optimizer, as ``extras`` keep it:
    its type, and, where the layout of what it holds decides whether a run resumes,
    ``"<type>: <detail>"`` (an LR scheduler's param groups, a Lightning checkpoint's
    callback states). The one description for torch objects and torch-free records alike
    (both walks call it), so ``schema_of`` and ``statedict show`` agree; a detail holds
    no value that changes as training goes on (the epoch a scheduler reached), so the
    snapshot of a checkpoint stays green from one save to the next.
    """
    kind = type_name(value)
    if is_scheduler_state(value):
        return f"{kind}{ENTRY_DETAIL}LR scheduler state, {scheduler_detail(value)}"
    if isinstance(value, (list, tuple)) and value and all(map(is_scheduler_state, value)):
        states = "; ".join(scheduler_detail(state) for state in value)
        return f"{kind}{ENTRY_DETAIL}{len(value)} LR scheduler state(s): {states}"
    if (
        key == "callbacks"
        and isinstance(value, Mapping)
        and value
        and all(isinstance(state, Mapping) for state in value.values())
    ):
        states = "; ".join(
            f"{name} ({', '.join(sorted(map(str, state)))})" for name, state in value.items()
        )
        return f"{kind}{ENTRY_DETAIL}{len(value)} callback state(s): {states}"
    return kind


def entry_type(description: str) -> str:
    """The type an ``extras`` description names (all of one that has no detail)."""
    return description.partition(ENTRY_DETAIL)[0]


# What an LR scheduler keeps one of per param group of its optimizer: a base learning
# rate (every LRScheduler), or a floor (ReduceLROnPlateau, which is no LRScheduler).
PER_GROUP_SCHEDULER_KEYS = ("base_lrs", "min_lrs")


def is_scheduler_state(obj: Any) -> bool:
    """An LR scheduler's ``state_dict()`` (``torch.optim.lr_scheduler``): a learning rate
    (or floor) per param group of its optimizer, and the epoch it reached."""
    return isinstance(obj, Mapping) and "last_epoch" in obj and _groups_key(obj) is not None


def _groups_key(state: Mapping[str, Any]) -> str | None:
    return next(
        (k for k in PER_GROUP_SCHEDULER_KEYS if isinstance(state.get(k), (list, tuple))), None
    )


def scheduler_detail(state: Mapping[str, Any]) -> str:
    """Its param-group count (one base learning rate each) and its public keys with their
    types. The private ones (``_step_count``, ``_is_initial``...) are torch's bookkeeping,
    which torch releases add to: comparing them would fail every snapshot on an upgrade."""
    public = ", ".join(
        f"{key} {type_name(state[key])}"
        for key in sorted(state, key=str)
        if not str(key).startswith("_")
    )
    return f"{len(state[_groups_key(state) or 'base_lrs'])} param group(s) ({public})"


def lightning_framework(obj: Mapping[Any, Any]) -> str | None:
    """What a Lightning checkpoint says of itself (its version, epoch and global step),
    None for any other mapping."""
    version = obj.get(LIGHTNING_VERSION_KEY)
    if not isinstance(version, str):
        return None
    found = [f"version {version}"]
    for key, label in (("epoch", "epoch"), ("global_step", "global step")):
        value = obj.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            found.append(f"{label} {value}")
    return f"Lightning checkpoint ({', '.join(found)})"


def _model_part(obj: Mapping[Any, Any], tensors: Tensors) -> Any:
    """A general checkpoint's model part: a mapping under a usual name, else its only
    state_dict; None if neither."""
    model_key = next((k for k in MODEL_KEYS if isinstance(obj.get(k), Mapping)), None)
    if model_key is None:
        nested = [k for k, v in obj.items() if isinstance(v, Mapping) and is_state_dict(v, tensors)]
        model_key = nested[0] if len(nested) == 1 else None
    return model_key


def _optimizer_part(obj: Mapping[Any, Any]) -> Any:
    """A general checkpoint's optimizer part, under a usual name (alone, or first in a list)."""
    return next(
        (
            k
            for k in OPTIMIZER_KEYS
            if is_optimizer_state_dict(obj.get(k))
            or (isinstance(obj.get(k), list) and obj[k] and is_optimizer_state_dict(obj[k][0]))
        ),
        None,
    )


def _no_known_part(obj: Mapping[Any, Any], tensors: Tensors) -> UnsupportedObjectError:
    """Why a mapping with no part of a usual name has no schema: several state_dicts (pick
    one with part=), or none."""
    parts = [
        str(k) for k, v in obj.items() if is_state_dict(v, tensors) or is_optimizer_state_dict(v)
    ]
    if len(parts) > 1:
        return UnsupportedObjectError(
            f"schema_of(): this checkpoint holds several state_dicts ({', '.join(parts)}); "
            f"choose one with part={parts[0]!r} (on the command line: statedict show "
            f"--part {parts[0]}, statedict diff --expected-part/--actual-part {parts[0]})"
        )
    return UnsupportedObjectError(
        "schema_of(): this mapping is neither a state_dict (names to tensors) nor a general "
        f"checkpoint with a model state_dict under one of {', '.join(MODEL_KEYS)}; its keys "
        f"are {', '.join(map(repr, list(obj)[:8]))}"
    )


def optimizer_state_schema(optimizer: Mapping[str, Any], tensors: Tensors) -> OptimizerSchema:
    """An optimizer's ``state_dict()``: its class unknown, its members by index, or by name
    where the optimizer was built from ``model.named_parameters()`` (torch 2.6 and newer
    save their names as each group's ``param_names``). One that ``optimizer.load_state_dict``
    could not read (no ``params``, ``state`` that is no mapping, ...) is an
    :class:`UnsupportedObjectError` saying what is wrong."""
    problem = _malformed(optimizer)
    if problem:
        raise UnsupportedObjectError(
            f"schema_of(): its optimizer state_dict is malformed: {problem} "
            "(optimizer.load_state_dict could not read it)"
        )
    names: dict[int, str] = {}
    for group in optimizer["param_groups"]:
        given = group.get("param_names")
        if (
            isinstance(given, (list, tuple))
            and len(given) == len(group["params"])
            and all(isinstance(n, str) for n in given)
        ):
            names.update(zip((int(p) for p in group["params"]), given, strict=True))
    named = len(names) == sum(len(g["params"]) for g in optimizer["param_groups"])

    def member(index: Any) -> str | int:
        return names.get(int(index), int(index)) if named else int(index)

    groups = tuple(
        ParamGroup(
            hyperparams=hyperparams(group, tensors),
            params=tuple(member(p) for p in group["params"]),
            flags=flags(group, tensors),
        )
        for group in optimizer["param_groups"]
    )
    state = tuple(
        ParamState(param=member(index), entries=state_specs(entries, tensors))
        for index, entries in sorted(optimizer["state"].items(), key=lambda kv: int(kv[0]))
    )
    return OptimizerSchema(
        cls=UNKNOWN_CLASS, param_groups=groups, state=state, problems=_stray_keys(optimizer)
    )


def _malformed(optimizer: Mapping[str, Any]) -> str | None:
    """What keeps an optimizer state_dict from being one torch writes, or None."""
    groups, state = optimizer["param_groups"], optimizer["state"]
    if not isinstance(groups, (list, tuple)):
        return f"param_groups is a {type_name(groups)}, not a list of groups"
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            return f"param_groups[{i}] is a {type_name(group)}, not a dict"
        params = group.get("params")
        if not isinstance(params, (list, tuple)):
            return f"param_groups[{i}] has no list of params"
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in params):
            return f"param_groups[{i}]'s params are not parameter indices (ints)"
    if not isinstance(state, Mapping):
        return f"state is a {type_name(state)}, not a dict of per-parameter state"
    for key, entries in state.items():
        if not isinstance(entries, Mapping):
            return f"the state of {key!r} is a {type_name(entries)}, not a dict"
    return None


def _stray_keys(optimizer: Mapping[str, Any]) -> tuple[str, ...]:
    """State keyed by anything but a parameter's index (``"0"`` after a trip through JSON):
    torch's ``load_state_dict`` keeps it under that key and restores none of it."""
    stray = [key for key in optimizer["state"] if not isinstance(key, int)]
    if not stray:
        return ()
    shown = ", ".join(repr(k) for k in stray[:3]) + (" ..." if len(stray) > 3 else "")
    return (
        f"its state is keyed by {len(stray)} {type(stray[0]).__name__}(s) ({shown}), not "
        "parameter indices: optimizer.load_state_dict restores none of that state",
    )


def state_specs(entries: Mapping[str, Any], tensors: Tensors) -> dict[str, StateSpec]:
    return {
        str(name): tensors.spec(v) if isinstance(v, tensors.types) else StateSpec(type=type_name(v))
        for name, v in entries.items()
    }


def flags(group: Mapping[str, Any], tensors: Tensors) -> dict[str, Any]:
    return {k: jsonable(group[k], tensors) for k in sorted(IMPLEMENTATION_FLAGS) if k in group}


def hyperparams(group: Mapping[str, Any], tensors: Tensors) -> dict[str, Any]:
    return {
        str(k): jsonable(group[k], tensors)
        for k in sorted(group, key=str)
        if k not in NOT_HYPERPARAMS and k not in IMPLEMENTATION_FLAGS
    }


def jsonable(value: Any, tensors: Tensors, budget: list[int] | None = None, depth: int = 0) -> Any:
    """Hyperparameters exactly, in a JSON-stable form (tuples as lists, tensors by value)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    budget = [MAX_HYPERPARAM_VALUES] if budget is None else budget
    budget[0] -= 1
    if depth > MAX_HYPERPARAM_DEPTH or budget[0] < 0:
        raise UnsupportedObjectError(
            f"schema_of(): an optimizer hyperparameter nests deeper than {MAX_HYPERPARAM_DEPTH} "
            f"levels or holds more than {MAX_HYPERPARAM_VALUES:,} values: not a param_group"
        )
    if isinstance(value, (list, tuple)):
        return [jsonable(v, tensors, budget, depth + 1) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, tensors, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, tensors.types):
        return tensors.hyperparam(value)
    return {"object": type_name(value)}


class StorageViews:
    """Which keys use which storage, to find small views of big storages.

    ``torch.save`` writes a tensor's whole storage: a 10-element slice of a 1M-element
    tensor makes a 4 MB file. Worth a warning, not a failure.
    """

    # Report when the storage holds this many times the bytes its keys use, and more than:
    RATIO, MIN_BYTES = 2, 1 << 16

    def __init__(self) -> None:
        # storage identity -> [storage bytes, bytes its keys use, its keys]
        self.storages: dict[Any, list[Any]] = {}

    def add(
        self, storage: Any, storage_bytes: Callable[[], int], key: str, used: int
    ) -> str | None:
        """Record that ``key`` uses ``used`` bytes of ``storage`` (its identity, whose size
        ``storage_bytes`` tells); return the first key that used it before."""
        shared = self.storages.get(storage)
        if shared is None:
            self.storages[storage] = [storage_bytes(), used, [key]]
            return None
        shared[1] += used
        shared[2].append(key)
        return shared[2][0]

    def waste_notes(self) -> tuple[str, ...]:
        notes = []
        for size, used, keys in self.storages.values():
            used = min(used, size)
            if size - used > self.MIN_BYTES and size > self.RATIO * used:
                notes.append(
                    f"{', '.join(keys)}: a view of a {size:,}-byte storage; torch.save writes all "
                    f"of it ({size - used:,} bytes more than the tensor holds): save a .clone()"
                )
        return tuple(notes)
