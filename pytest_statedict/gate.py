"""The refactor gate: does an old checkpoint (or a snapshot of one) still load today?

The load goes through the model's own ``load_state_dict``, into a meta-device copy of the
model with ``assign=True``: conversion hooks a refactor adds (``_load_from_state_dict``
keyed on ``_version``) count as compatible, the user's model is not touched, and no memory
is spent on tensors. From a snapshot, the state_dict is rebuilt as meta tensors of the
recorded shapes and dtypes, with the recorded module versions, so a few kilobytes of JSON
guard a release's layout as well as its gigabytes of weights would.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_files import load_state_dict_file, model_state
from .compare import LoadCheck, Rename, _matches, compile_rename, diff_schemas
from .errors import (
    CheckpointError,
    SnapshotError,
    StateDictError,
    StateDictMismatch,
    first_line,
    hide_from_bad_input,
)
from .extract import mapping_schema, module_schema, require_module, schema_of
from .formats import registry
from .formats.reading import from_hook
from .formats.snapshot import SNAPSHOT
from .hf_rules import decide_load
from .report import SECTION_LIMIT, load_refusals, suggest_rename
from .round_trip import meta_copy
from .runtime import checkpoint_loader, recorded_check
from .schema import Schema, TensorEntry, dtype_name

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (.+?) from "
    r"checkpoint, the shape in current model is (.+?)\.$",
    re.M,
)


@recorded_check("gate", lambda model, path, *args, **kwargs: os.fspath(path))
def assert_checkpoint_loads(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    rename: Rename = None,
    map_location: Any = "cpu",
    part: str | None = None,
    rules: str = "auto",
    factory: Callable[[], nn.Module] | None = None,
) -> None:
    """Assert that the checkpoint or snapshot at ``path`` loads into ``model``.

    ``rename`` (a mapping, a callable or ``[(regex, replacement), ...]``) maps the
    checkpoint's keys to today's names. On failure, the message lists the missing,
    unexpected and shape-mismatched keys, likely renames as a ready ``rename=``, and the
    keys a ``strict=False`` load would silently drop. ``part`` names the model's entry
    in a checkpoint holding several (``"modelB_state_dict"``). ``rules`` says whose idea of
    "loads" applies: ``"torch"`` (``load_state_dict``), ``"transformers"`` (``from_pretrained``:
    tied keys, keys to ignore, checkpoint conversions) or ``"auto"``, transformers' for a
    transformers ``PreTrainedModel`` and torch's for anything else. ``factory`` builds the
    model to load into, for a model that cannot be copied onto the meta device.
    """
    __tracebackhide__ = True
    require_module(model, "assert_checkpoint_loads()")
    source, state, saved_on, recorded_only = checkpoint_state(
        Path(path), part=part, map_location=map_location, model=model
    )
    mapping = compile_rename(rename)
    if mapping is not None:
        renamed = OrderedDict((mapping(k), v) for k, v in state.items())
        renamed._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
        state = renamed
    make_target = _loading_copy(model, factory)
    verdict = decide_load(
        model,
        state,
        rules=rules,
        strict=strict,
        copy=lambda _: make_target(),
        torch_load=lambda target, loaded: _try_load(target, loaded, make_target),
    )
    missing, unexpected, shapes, error = (
        verdict.missing, verdict.unexpected, verdict.shapes, verdict.error
    )  # fmt: skip
    missing = [k for k in missing if k not in recorded_only]
    failed = bool(shapes or error or (strict and (missing or unexpected)))
    if not failed:
        return
    lines = [
        f"checkpoint {_shown(source)} does not load into {type(model).__name__} with {verdict.how}:"
    ]
    lines.extend(f"  {note}" for note in verdict.notes)
    if error:
        lines.append(f"  its load_state_dict raised: {error}")

    def section(heading: str, items: list[str]) -> None:
        if items:
            lines.append(f"  {heading} ({len(items)}):")
            lines.extend(f"    {i}" for i in items[:SECTION_LIMIT])
            if len(items) > SECTION_LIMIT:
                lines.append(f"    ... and {len(items) - SECTION_LIMIT} more")

    section("missing (in the model, not in the checkpoint)", missing)
    section("unexpected (in the checkpoint, not in the model)", unexpected)
    section("shape mismatches", [f"{k}: checkpoint {c}, model {m}" for k, c, m in shapes])
    section("accepted by transformers' rules (strict load_state_dict refuses)", verdict.accepted)
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    new_buffers = [k for k in missing if k in buffers]
    if new_buffers:
        # a buffer added since the checkpoint is often derived state (a mask, a cache) that
        # need not be saved at all: then it is no reason to break every old checkpoint
        lines.append(
            f"  missing buffer(s) {', '.join(new_buffers[:5])}"
            + (", ..." if len(new_buffers) > 5 else "")
            + ": if not needed in checkpoints, register with "
            "self.register_buffer(name, tensor, persistent=False) and old checkpoints load"
        )
    if verdict.unmatched is None:
        diff = diff_schemas(mapping_schema(state), module_schema(model))
    else:  # what transformers' rules left unmatched on each side
        diff = diff_schemas(*(mapping_schema(side) for side in verdict.unmatched))
    if diff.prefix:
        how, prefix = diff.prefix
        fix = (
            f"rename=[(r'^', {prefix!r})]"
            if how == "added"
            else f"rename=[(r'^{re.escape(prefix)}', '')]"
        )
        lines.append(
            f"  the model's keys have the prefix {prefix!r} {how} relative to the checkpoint "
            f"(a wrapper such as DataParallel or torch.compile): {fix}"
        )
    elif diff.renames:
        lines.append("  likely renamed (same shape and dtype):")
        lines.extend(f"    {old} -> {new}" for old, new in diff.renames[:SECTION_LIMIT])
        lines.append(
            "  to load it as it is, pass the checkpoint's keys through "
            + suggest_rename(diff.renames, "expected->actual")
        )
    if unexpected and not shapes and not error:
        lines.append(
            "  with strict=False it would load, silently dropping "
            f"{len(unexpected)} checkpoint key(s) ({', '.join(unexpected[:5])}"
            + (", ..." if len(unexpected) > 5 else "")
            + ")"
            + (f" and leaving {len(missing)} model key(s) uninitialised" if missing else "")
        )
    if any(loc != "cpu" for loc in saved_on):
        lines.append(f"  the checkpoint was saved on {', '.join(sorted(saved_on))}")
    raise StateDictMismatch("\n".join(lines), diff)


def checkpoint_state(
    path: Path, *, part: str | None, map_location: Any, model: nn.Module | None = None
) -> tuple[Path, OrderedDict[str, Any] | dict[str, Any], set[str], set[str]]:
    """The checkpoint the gate reads (a folder's own file), the state_dict it loads, the
    devices its tensors were saved on, and the keys it records but cannot rebuild.

    A ``pytest_statedict_load_checkpoint`` hook's object if one claims ``path``; meta
    tensors of the recorded shapes and dtypes for a format whose schema is read first
    (``schema_first``: a snapshot, a ``.safetensors`` file, a sharded index, a DCP folder;
    O(tensors), no tensor data); else the file loaded by its format (a ``torch.save`` file
    memory-mapped, with the module versions, ``_metadata``, it kept). ``model`` gives what
    a schema does not record and load hooks read (see :func:`state_from_snapshot`).
    """
    custom = from_hook(path, checkpoint_loader())
    if custom is not None:
        return path, model_state(path, custom, part=part), set(), set()
    fmt, where = registry.detect(path)
    if fmt.schema_first:
        schema = schema_of(where, part=part)
        try:
            state: OrderedDict[str, Any] | dict[str, Any] = state_from_snapshot(schema, model)
        except SnapshotError as exc:
            if fmt.name == SNAPSHOT:
                raise
            raise CheckpointError(where, exc.problem) from None  # a checkpoint, not a snapshot
        recorded_only = {entry.key for entry in schema.tensors} - set(state)
        return where, state, set(schema.saved_on), recorded_only
    state, saved_on = load_state_dict_file(where, map_location=map_location, part=part)
    return where, state, saved_on, set()


def load_check(model: nn.Module, expected: Schema, *, ignore: tuple[str, ...] = ()) -> LoadCheck:
    """Does a checkpoint of ``expected``'s layout load into ``model`` with strict=True?

    Decided as the gate decides it, through the model's own ``load_state_dict`` on a meta
    copy, so that its conversion hooks count: a report must not call a refactor breaking
    that the gate passes. Keys matching ``ignore`` count on neither side. A model that
    cannot be copied, or a layout that cannot be rebuilt, leaves the layouts to decide.
    """
    name = type(model).__name__
    make_target = _loading_copy(model, None)
    try:
        target = make_target()
    except StateDictError as exc:  # the layouts decide instead
        why = type(exc.__context__).__name__ if exc.__context__ else "no copy"
        return LoadCheck(name, None, f"{name} cannot be copied ({why})")
    try:
        state = state_from_snapshot(expected, model)
    except SnapshotError as exc:
        return LoadCheck(name, None, f"the expected layout cannot be rebuilt ({exc})")
    loader = "load_state_dict"
    try:
        verdict = decide_load(
            model,
            state,
            rules="auto",
            strict=True,
            copy=lambda _: target,
            torch_load=lambda t, loaded: _try_load(t, loaded, make_target),
        )
        missing, unexpected, shapes, error = (
            verdict.missing, verdict.unexpected, verdict.shapes, verdict.error
        )  # fmt: skip
        if verdict.rules == "transformers":
            loader = verdict.how
    except Exception as exc:  # a load hook's own error: torch's load would raise it too
        error = f"{type(exc).__name__}: {exc}"
    if error:
        return LoadCheck(name, False, f"it raises: {error}", loader)
    # entries with no tensor to rebuild (extra state, sparse, quantized) are in the checkpoint
    present = {entry.key for entry in expected.tensors}
    missing = [k for k in missing if k not in present]

    def kept(keys: list[str]) -> int:
        return sum(not _matches(k, ignore) for k in keys)

    reasons = load_refusals(kept(unexpected), kept(missing), kept([s[0] for s in shapes]))
    return LoadCheck(name, not reasons, ", ".join(reasons), loader)


def _shown(path: Path) -> str:
    """The path relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _loading_copy(
    model: nn.Module, factory: Callable[[], nn.Module] | None
) -> Callable[[], nn.Module]:
    """What builds a model to load into: the user's ``factory``, or a meta copy."""
    if factory is not None:
        return factory
    return lambda: meta_copy(model, caller="assert_checkpoint_loads()")


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
    left out (the caller counts them as present: the snapshot has them).
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
