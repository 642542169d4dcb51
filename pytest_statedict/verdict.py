"""The verdict on one pair: does an old checkpoint load into today's model?

Every surface asks this one question (the snapshot check, ``assert_state_dict_matches``
against a file, ``assert_checkpoint_loads``, the release gate, ``statedict diff --model``
and so the run report) and gets its answer here, so that they print the same verdict for
the same pair. The load goes through the model's own ``load_state_dict`` (or transformers'
``from_pretrained`` rules, :mod:`.hf_rules`, or PEFT's ``set_peft_model_state_dict`` for an
adapter of a PeftModel, :mod:`.peft_rules`) on a meta-device copy: conversion hooks count,
hooks that refuse count, the counts are the deciding loader's, and the user's model is
never touched. The optimizer's half of the verdict is :mod:`.optimizer_diff`'s (a schema
question: torch's optimizer load looks at nothing else).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint_files import load_state_dict_file
from .compare import ModelVerdict
from .errors import SnapshotError, StateDictError, first_line
from .hf_rules import LoadOutcome, LoadVerdict, decide_load
from .meta_state import state_from_snapshot
from .model_copy import meta_copy
from .peft_rules import peft_load, uses_peft_rules
from .printable import printable, printable_message
from .rename import matches_any
from .report import load_refusals
from .schema import Schema
from .tie_verdict import CheckpointValues, TieOnLoad, ties_on_load

__all__ = [
    "has_load_code",
    "load_into",
    "model_verdict",
    "needs_a_load",
    "plain_layout",
    "summarised",
]


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (.+?) from "
    r"checkpoint, the shape in current model is (.+?)\.$",
    re.M,
)


def load_into(
    model: nn.Module,
    state: Mapping[str, Any],
    *,
    rules: str = "auto",
    strict: bool = True,
    factory: Callable[[], nn.Module] | None = None,
    caller: str = "assert_checkpoint_loads()",
    adapter_name: str | None = None,
) -> LoadVerdict:
    """Load ``state`` into a copy of ``model`` under ``rules``: what it refused, key by key.

    The copy is a meta copy (or ``factory()``); the model is never touched.
    ``adapter_name``: the adapter of a PeftModel that PEFT's rules load an adapter into.
    """
    make_target = _loading_copy(model, factory, caller)
    return _decide(
        model,
        state,
        rules=rules,
        strict=strict,
        make_target=make_target,
        adapter_name=adapter_name,
    )


def _decide(
    model: nn.Module,
    state: Mapping[str, Any],
    *,
    rules: str,
    strict: bool,
    make_target: Callable[[], nn.Module],
    adapter_name: str | None = None,
) -> LoadVerdict:
    """The load under ``rules``: PEFT's for an adapter of a PeftModel (:mod:`.peft_rules`),
    else torch's or transformers' (:mod:`.hf_rules`)."""

    def torch_load(target: nn.Module, loaded: Mapping[str, Any]) -> LoadOutcome:
        return _try_load(target, loaded, make_target)

    if uses_peft_rules(model, state, rules, adapter_name):
        return peft_load(
            model,
            make_target(),
            state,
            strict=strict,
            adapter_name=adapter_name,
            torch_load=torch_load,
        )
    return decide_load(
        model,
        state,
        rules=rules,
        strict=strict,
        copy=lambda _: make_target(),
        torch_load=torch_load,
    )


def summarised(
    model: nn.Module,
    verdict: LoadVerdict,
    state: Mapping[str, Any],
    *,
    strict: bool = True,
    ignore: tuple[str, ...] = (),
    present: frozenset[str] | set[str] = frozenset(),
    recorded: Schema | None = None,
    values: CheckpointValues | None = None,
) -> ModelVerdict:
    """A load's outcome as the verdict every surface prints: yes, or NO with the deciding
    loader's own counts, and whether the bare layouts (``state``'s keys and shapes against
    the model's) would have said the same. ``present``: keys the checkpoint holds but no
    tensor was rebuilt for (extra state, sparse): not missing. Keys matching ``ignore``
    count on neither side. Two different checkpoint tensors loading into one tied
    parameter are a NO too (:mod:`.tie_verdict`: ``recorded``, the schema a meta ``state``
    was rebuilt from, and ``values``, the checkpoint's own tensors, compare the two)."""
    name = type(model).__name__
    loader = verdict.how
    own = model.state_dict(keep_vars=True)  # for the layouts and the ties alike
    layouts = _layouts_load(state, own, strict=strict, ignore=ignore, present=present)
    if verdict.error:
        # one clause of a verdict line: a key a message quotes may hold a newline
        error = printable_message(verdict.error)
        return ModelVerdict(name, False, f"it raises: {error}", loader, layouts)

    def kept(keys: list[str]) -> int:
        return sum(not matches_any(k, ignore) for k in keys)

    missing = [k for k in verdict.missing if k not in present]
    reasons = load_refusals(
        kept(verdict.unexpected) if strict else 0,
        kept(missing) if strict else 0,
        kept([s[0] for s in verdict.shapes]),
    )
    if reasons:
        return ModelVerdict(name, False, ", ".join(reasons), loader, layouts)
    # an ignored key is still loaded (ignore= only stops counting it): its tie still counts
    ties = ties_on_load(own, state, recorded, values)
    if "from_pretrained" in loader:  # transformers unties keys saved apart with other values
        notes = tuple(_untied_by_transformers(t) for t in ties)
        return ModelVerdict(name, True, "", loader, layouts, notes=notes)
    dropped = [t.describe() for t in ties if t.may_drop_a_tensor]
    if dropped:
        return ModelVerdict(name, False, "; ".join(dropped), loader, layouts)
    return ModelVerdict(name, True, "", loader, layouts, notes=tuple(t.describe() for t in ties))


def _untied_by_transformers(tie: TieOnLoad) -> str:
    """A tie as ``from_pretrained`` treats it: two keys the checkpoint holds apart, with
    values that differ, are not tied (transformers 5 warns, and keeps both)."""
    if not tie.may_drop_a_tensor:
        return tie.describe()
    return (
        f"{', '.join(map(printable, tie.keys))} are separate tensors in the checkpoint: "
        "from_pretrained "
        "keeps them apart (it unties them) where their values differ"
    )


def _layouts_load(
    state: Mapping[str, Any],
    model_state: Mapping[str, Any],
    *,
    strict: bool,
    ignore: tuple[str, ...],
    present: frozenset[str] | set[str],
) -> bool:
    """Whether keys and shapes alone say "loads": what a report compares the real load with
    (a hook that converts, or refuses, is where the two part)."""
    own = {k: v for k, v in model_state.items() if not matches_any(k, ignore)}
    saved = {k: v for k, v in state.items() if not matches_any(k, ignore)}
    if strict and set(own) != set(saved) | (set(present) & set(own)):
        return False
    return all(
        tuple(value.shape) == tuple(own[key].shape)
        for key, value in saved.items()
        if key in own and isinstance(value, torch.Tensor) and isinstance(own[key], torch.Tensor)
    )


def model_verdict(
    model: nn.Module,
    expected: Schema,
    *,
    ignore: tuple[str, ...] = (),
    rules: str = "auto",
) -> ModelVerdict:
    """Does a checkpoint of ``expected``'s layout load into ``model`` with strict=True?

    Decided as the gate decides it, through the model's own ``load_state_dict`` on a meta
    copy, so that its conversion hooks count (and hooks that refuse): a report must not call
    a refactor breaking that the gate passes, nor pass what the gate refuses. A model that
    cannot be copied, or a layout that cannot be rebuilt, leaves the layouts to decide
    (``loads`` is None, and ``reason`` says why).
    """
    name = type(model).__name__
    make_target = _loading_copy(model, None, "assert_state_dict_matches()")
    try:
        target = make_target()
    except StateDictError as exc:  # the layouts decide instead
        why = type(exc.__context__).__name__ if exc.__context__ else "no copy"
        return ModelVerdict(name, None, f"{name} cannot be copied ({why})")
    try:
        state = state_from_snapshot(expected, model)
    except SnapshotError as exc:
        return ModelVerdict(name, None, f"the expected layout cannot be rebuilt ({exc})")
    # entries with no tensor to rebuild (extra state, sparse, quantized) are in the checkpoint
    present = {entry.key for entry in expected.tensors}
    made = [target]

    def copy() -> nn.Module:  # the copy made above, then fresh ones
        return made.pop() if made else make_target()

    try:
        verdict = _decide(model, state, rules=rules, strict=True, make_target=copy)
    except Exception as exc:  # a load hook's own error: torch's load would raise it too
        error = f"{type(exc).__name__}: {exc}"
        verdict = LoadVerdict([], [], [], error, "torch", "load_state_dict(strict=True)")
    return summarised(
        model, verdict, state, ignore=ignore, present=present, recorded=expected,
        values=_file_values(expected),
    )  # fmt: skip


def _file_values(expected: Schema) -> CheckpointValues | None:
    """The tensors of the checkpoint file ``expected`` was read from (memory-mapped), for
    a tie whose values decide; a snapshot has none (its fingerprints stand in)."""
    source = expected.source
    if source is None:
        return None
    return lambda: load_state_dict_file(source, map_location="cpu")[0]


def needs_a_load(model: Any, expected: Schema) -> bool:
    """Whether equal layouts still need the model's own load to say "loads".

    A checkpoint that recorded no module versions (a ``.safetensors`` file, a bare
    state_dict) reaches every ``_load_from_state_dict`` with ``version=None``: code of the
    model's own may refuse it (torchvision's MNASNet does) or convert it. Where the model
    has no such code, or the versions were recorded, equal layouts load.
    """
    return isinstance(model, nn.Module) and expected.versions is None and has_load_code(model)


def has_load_code(model: nn.Module) -> bool:
    """Whether code of the model's own runs on load (see :func:`plain_layout`)."""
    return plain_layout(model) is None


def _loading_copy(
    model: nn.Module, factory: Callable[[], nn.Module] | None, caller: str
) -> Callable[[], nn.Module]:
    """What builds a model to load into: the user's ``factory``, or a meta copy."""
    if factory is not None:
        return factory
    return lambda: meta_copy(model, caller=caller)


def _try_load(
    target: nn.Module, state: Any, make_target: Callable[[], nn.Module]
) -> tuple[list[str], list[str], list[tuple[str, str, str]], str | None]:
    """missing, unexpected, shape mismatches (key, checkpoint, model) and any other error.

    After shape mismatches the load is tried again, without those keys, into a fresh
    ``make_target()``: the first load may have changed ``target`` half way.

    A load hook may raise anything (a ``ValueError`` on a version it does not know, a
    ``KeyError`` for an entry it expects): that is the load failing, reported with its
    message, as torch's own ``RuntimeError`` is.
    """
    shapes: list[tuple[str, str, str]] = []
    try:
        result = target.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        shapes = [(k, _shape(c), _shape(m)) for k, c, m in _SIZE_MISMATCH.findall(str(exc))]
        if not shapes:
            return [], [], [], _last_line(exc)
        kept = OrderedDict((k, v) for k, v in state.items() if k not in {s[0] for s in shapes})
        kept._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
        try:
            result = make_target().load_state_dict(kept, strict=False, assign=True)
        except RuntimeError as again:
            # a load hook renamed those keys: they are still in the state under their old
            # names, and mismatch again; the shape mismatches are the verdict
            if {k for k, _, _ in _SIZE_MISMATCH.findall(str(again))} <= {s[0] for s in shapes}:
                return [], [], shapes, None
            return [], [], shapes, _last_line(again)
        except StateDictError:
            raise
        except Exception as again:
            return [], [], shapes, first_line(again)
    except StateDictError:
        raise
    except Exception as exc:  # a load hook's own error
        return [], [], [], first_line(exc)
    bad = {s[0] for s in shapes}
    return (
        [k for k in result.missing_keys if k not in bad],
        list(result.unexpected_keys),
        shapes,
        None,
    )


def _last_line(exc: RuntimeError) -> str:
    """torch's load errors end with the problem; any other error (a hook's) starts with it."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return lines[-1] if lines[0].startswith("Error(s) in loading state_dict") else lines[0]


def _shape(text: str) -> str:
    return text.replace("torch.Size(", "").rstrip(")")


def plain_layout(model: nn.Module) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of what ``load_state_dict`` expects, or None when the model has load
    code of its own (a ``load_state_dict`` or ``_load_from_state_dict`` override, extra
    state, a load hook): then only a real load can say what it accepts."""
    base = nn.Module
    if type(model).load_state_dict is not base.load_state_dict:
        return None
    plain = {base._load_from_state_dict, *_only_filling_in()}
    layout: dict[str, tuple[int, ...]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        if (
            cls._load_from_state_dict not in plain
            or cls.get_extra_state is not base.get_extra_state
            or cls.set_extra_state is not base.set_extra_state
            or module._load_state_dict_pre_hooks
            or getattr(module, "_load_state_dict_post_hooks", None)
        ):
            return None
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                layout[dot + name] = tuple(param.shape)
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                layout[dot + name] = tuple(buffer.shape)
    return layout


def _only_filling_in() -> tuple[Any, ...]:
    """torch's own load code that can only make a checkpoint with every key load *more*:
    BatchNorm's fills in a ``num_batches_tracked`` that a version-1 checkpoint lacks. A
    layout the gate passes from keys and shapes loads through it the same."""
    norm = getattr(nn.modules.batchnorm, "_NormBase", None)
    return (norm._load_from_state_dict,) if norm is not None else ()
