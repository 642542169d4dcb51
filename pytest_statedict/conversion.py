"""The project's own conversion of old checkpoints (``convert=``), as the gates run it.

Projects convert old checkpoints with functions (timm's ``checkpoint_filter_fn(state_dict,
model)``, torchvision's regex outside ``load_state_dict``): they rename, drop, slice and
reshape. The gate runs that function on the checkpoint's tensors, meta tensors where the
checkpoint was read without data, so that "an old checkpoint plus our conversion still
loads" is a test; a conversion that needs values (``.item()``, a copy) gets them, read
memory-mapped, and the report says so. What the conversion changed is shown key by key,
so a failure after it can be told from a failure of it.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import StateDictError, first_line
from .printable import printable

__all__ = ["Conversion", "Converter", "run_conversion"]

Converter = Callable[..., Mapping[str, Any]]


@dataclass
class Conversion:
    """A conversion's result: the state_dict to load, and what it changed (report lines)."""

    state: Mapping[str, Any]
    renamed: list[tuple[str, str]] = field(default_factory=list)
    split: list[tuple[str, list[str]]] = field(default_factory=list)  # one tensor, sliced
    dropped: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    reshaped: list[tuple[str, str, str]] = field(default_factory=list)  # key, before, after
    needed_values: str | None = None  # why it ran on the tensors' values, not meta ones

    def lines(self, limit: int) -> list[str]:
        """One short section: each change on a line, renames first."""
        items = [
            *(f"renamed {printable(old)} -> {printable(new)}" for old, new in self.renamed),
            *(
                f"split {printable(old)} -> {', '.join(map(printable, new))}"
                for old, new in self.split
            ),
            *(
                f"reshaped {printable(key)}: {before} -> {after}"
                for key, before, after in self.reshaped
            ),
            *(f"dropped {printable(key)}" for key in self.dropped),
            *(f"added {printable(key)}" for key in self.added),
        ]
        out = []
        if self.needed_values:
            out.append(f"  convert= {self.needed_values}")
        if not items:
            return [*out, "  convert= changed no key"]
        out.append(f"  convert= changed {len(items)} key(s), before rename= and the load:")
        out += [f"    {item}" for item in items[:limit]]
        if len(items) > limit:
            out.append(f"    ... and {len(items) - limit} more")
        return out


def run_conversion(
    state: Mapping[str, Any],
    convert: Converter,
    model: nn.Module,
    *,
    values: Callable[[], Mapping[str, Any]],
    shown: str,
) -> Conversion:
    """``convert(state)`` or ``convert(state, model)`` and what it changed.

    ``state`` may hold meta tensors (a checkpoint read without data): a conversion that
    raises on them (it needs values: ``.item()``, a copy) runs again on ``values()``, the
    checkpoint's tensors read memory-mapped, and the result says so. The conversion gets a
    copy, with the module versions (``_metadata``), so one that edits in place
    (torchvision's DenseNet regex) changes nothing of the caller's. Its result is loaded as
    ``load_state_dict(fn(state_dict))`` loads it: a new plain dict carries no module
    versions, and every ``_load_from_state_dict`` hook then sees none, as in the real load.
    """
    try:
        if not _has_meta(state):
            return _compared(state, _called(convert, state, model))
        shown_to_it, stand_ins = _without_stand_ins(state)
        conversion = _compared(shown_to_it, _called(convert, shown_to_it, model))
        conversion.state = _with_stand_ins(conversion.state, stand_ins)
        return conversion
    except StateDictError:
        raise
    except Exception as exc:
        if not _has_meta(state):
            raise
        on_meta = first_line(exc, 200)
    try:
        real = values()
    except StateDictError as exc:
        problem = getattr(exc, "problem", str(exc))
        raise StateDictError(
            f"assert_checkpoint_loads(convert=...): the conversion needs the tensors' values "
            f"(on the meta tensors {shown} was read as, it raised {on_meta}), and they cannot "
            f"be read: {problem}. A conversion that looks only at keys and shapes runs on a "
            "snapshot; else gate the checkpoint file itself"
        ) from None
    if hasattr(state, "_metadata"):
        real = OrderedDict(real)
        real._metadata = state._metadata  # type: ignore[attr-defined]
    conversion = _compared(real, _called(convert, real, model))
    conversion.needed_values = (
        f"needed the tensors' values (on meta tensors it raised {on_meta}): it ran on "
        f"them, read memory-mapped from {shown}"
    )
    return conversion


def _called(convert: Converter, state: Mapping[str, Any], model: nn.Module) -> Mapping[str, Any]:
    given: OrderedDict[str, Any] = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    given._metadata = metadata  # type: ignore[attr-defined]
    how = _model_argument(convert)
    if how == "keyword":
        converted = convert(given, model=model)
    elif how == "positional":
        converted = convert(given, model)
    else:
        converted = convert(given)
    if not isinstance(converted, Mapping):
        raise StateDictError(
            f"assert_checkpoint_loads(convert=...): the conversion returned a "
            f"{type(converted).__name__}, not the state_dict to load"
        )
    kept = OrderedDict(converted)
    kept._metadata = getattr(converted, "_metadata", None)  # type: ignore[attr-defined]
    return kept


def _model_argument(convert: Converter) -> str | None:
    """How ``convert`` wants the model: by a parameter named ``model`` (``"keyword"``), as a
    second positional parameter without a default (``"positional"``), or not at all
    (``fn(sd, drop_bias=False)`` does not: its second parameter is its own)."""
    try:
        parameters = list(inspect.signature(convert).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.name == "model" and p.kind != p.POSITIONAL_ONLY for p in parameters[1:]):
        return "keyword"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    second = parameters[1] if len(parameters) >= 2 else None
    if second is not None and second.kind in positional and second.default is second.empty:
        return "positional"
    return None


def _has_meta(state: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_meta for v in state.values())


def _without_stand_ins(
    state: Mapping[str, Any],
) -> tuple[OrderedDict[str, Any], dict[int, torch.Tensor]]:
    """The state with its CPU tensors as meta tensors too, and the originals by the meta
    tensor's id.

    A state read without data holds a few CPU tensors of stand-in values (those of at most
    one element, which load hooks read, see :func:`~.meta_state.state_from_snapshot`): a
    conversion that reads one (``.item()``) must raise, and be given the real values, not
    branch on a stand-in.
    """
    shown: OrderedDict[str, Any] = OrderedDict()
    stand_ins: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and not value.is_meta and not value.is_quantized:
            meta = value.to("meta")
            stand_ins[id(meta)] = value
            value = meta
        shown[key] = value
    shown._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return shown, stand_ins


def _with_stand_ins(
    state: Mapping[str, Any], stand_ins: Mapping[int, torch.Tensor]
) -> OrderedDict[str, Any]:
    """The converted state with each tensor the conversion kept as it was back in its
    original (a load hook may read its value)."""
    restored = OrderedDict((k, stand_ins.get(id(v), v)) for k, v in state.items())
    restored._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return restored


def _compared(before: Mapping[str, Any], after: Mapping[str, Any]) -> Conversion:
    """What ``after`` changed of ``before``: a key gone whose tensor (or a view of it) is now
    under a new key was renamed (with its new shape, if reshaped), or split when views of it
    are under several; others were dropped or added; a key kept with another shape was
    reshaped."""
    gone = [k for k in before if k not in after]
    new = [k for k in after if k not in before]
    owner = {id(before[k]): k for k in gone if isinstance(before[k], torch.Tensor)}
    conversion = Conversion(after)
    sources: dict[str, list[str]] = {}
    for key in new:
        old = _source(after[key], owner)
        if old is None:
            conversion.added.append(key)
        else:
            sources.setdefault(old, []).append(key)
    for old, keys in sources.items():
        if len(keys) > 1:
            conversion.split.append((old, keys))
            continue
        conversion.renamed.append((old, keys[0]))
        was, now = _shape(before[old]), _shape(after[keys[0]])
        if was != now:
            conversion.reshaped.append((keys[0], was, now))
    conversion.dropped = [k for k in gone if k not in sources]
    conversion.reshaped[:0] = [
        (k, _shape(before[k]), _shape(after[k]))
        for k in before
        if k in after and _shape(before[k]) != _shape(after[k])
    ]
    return conversion


def _source(value: Any, owner: Mapping[int, str]) -> str | None:
    """The removed key whose tensor ``value`` is, or is a view of."""
    while isinstance(value, torch.Tensor):
        if id(value) in owner:
            return owner[id(value)]
        value = value._base
    return None


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
