"""The refactor gate: does an old checkpoint (or a snapshot of one) still load today?

The load goes through the model's own ``load_state_dict``, into a meta-device copy of the
model with ``assign=True``: conversion hooks a refactor adds (``_load_from_state_dict``
keyed on ``_version``) count as compatible, the user's model is not touched, and no memory
is spent on tensors. From a snapshot, the state_dict is rebuilt as meta tensors of the
recorded shapes and dtypes, with the recorded module versions, so a few kilobytes of JSON
guard a release's layout as well as its gigabytes of weights would.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint_files import load_state_dict_file, model_state
from .compare import SchemaDiff, diff_schemas
from .errors import (
    CheckpointError,
    SnapshotError,
    StateDictError,
    StateDictMismatch,
    StateDictWarning,
    hide_from_bad_input,
)
from .extract import mapping_schema, module_schema, require_module, schema_of
from .formats import registry
from .formats.reading import from_hook
from .formats.snapshot import SNAPSHOT
from .hf_rules import LoadVerdict
from .meta_state import state_from_snapshot
from .rename import Rename, compile_rename, matches_any, normalise
from .report import (
    AMBIGUOUS_RENAMES,
    SECTION_LIMIT,
    ambiguous_rename_lines,
    model_verdict_line,
    optimizer_load_verdict,
    suggest_rename,
)
from .runtime import checkpoint_loader, recorded_check
from .schema import Schema
from .verdict import load_into, summarised

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


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
    optimizer: Any = None,
    convert: Callable[..., Mapping[str, Any]] | None = None,
    ignore: Iterable[str] = (),
    adapter_name: str | None = None,
) -> None:
    """Assert that the checkpoint or snapshot at ``path`` loads into ``model``.

    ``rename`` (a mapping, a callable or ``[(regex, replacement), ...]``) maps the
    checkpoint's keys to today's names. On failure, the message lists the missing,
    unexpected and shape-mismatched keys, likely renames as a ready ``rename=``, and the
    keys a ``strict=False`` load would silently drop. ``part`` names the model's entry
    in a checkpoint holding several (``"modelB_state_dict"``). ``rules`` says whose idea of
    "loads" applies: ``"torch"`` (``load_state_dict``), ``"transformers"`` (``from_pretrained``:
    tied keys, keys to ignore, checkpoint conversions), ``"peft"`` (``set_peft_model_state_dict``:
    an adapter's keys without the adapter name, ``modules_to_save``, no base-model weights) or
    ``"auto"``: PEFT's for a ``PeftModel`` checked against an adapter (``adapter_name``, by
    default its only adapter or ``"default"``), transformers' for a transformers
    ``PreTrainedModel`` and torch's for anything else. ``factory`` builds the model to load
    into, for a model that cannot be copied onto the meta device.

    ``optimizer`` (today's optimizer, or a function of the model that builds it) checks the
    checkpoint's optimizer state too: that it loads, and that every state lands on its own
    parameter (by name where the checkpoint names them, else by position, which is said).
    ``convert`` is the project's own conversion of old checkpoints, ``fn(state_dict)`` or
    ``fn(state_dict, model)``, applied before ``rename``; keys matching an ``ignore`` glob
    count on neither side.
    """
    __tracebackhide__ = True
    require_module(model, "assert_checkpoint_loads()")
    ignore = tuple(ignore)
    source, saved, saved_on, recorded_only = checkpoint_state(
        Path(path), part=part, map_location=map_location, model=model
    )
    mapping = compile_rename(rename)
    state = _renamed(_converted(saved, convert, model), mapping)
    loaded = load_into(
        model, state, rules=rules, strict=strict, factory=factory, adapter_name=adapter_name
    )

    def values() -> Mapping[str, Any]:  # read only where a tie's values decide
        saved = load_state_dict_file(source, part=part, map_location="cpu")[0]
        return _renamed(_converted(saved, convert, model), mapping)

    verdict = summarised(
        model, loaded, state, strict=strict, ignore=ignore, present=recorded_only, values=values
    )
    diff = diff_schemas(mapping_schema(state), module_schema(model))
    diff.model_verdict = verdict
    name = type(model).__name__
    if verdict.loads:
        title = f"checkpoint {_shown(source)} loads into {name}, but its optimizer state does not:"
        lines = ["  " + model_verdict_line(verdict, diff)]
    else:
        title = f"checkpoint {_shown(source)} does not load into {name} with {loaded.how}:"
        lines = _load_failure(model, loaded, diff, recorded_only, ignore, strict)
    optimizer_lines = []
    if optimizer is not None:
        optimizer_lines = _optimizer_failure(model, optimizer, source, rename, ignore, diff)
    if not verdict.loads or optimizer_lines:
        lines += optimizer_lines
        if any(loc != "cpu" for loc in saved_on):
            lines.append(f"  the checkpoint was saved on {', '.join(sorted(saved_on))}")
        raise StateDictMismatch("\n".join([title, *lines]), diff)


def _converted(
    state: Mapping[str, Any], convert: Callable[..., Mapping[str, Any]] | None, model: nn.Module
) -> Mapping[str, Any]:
    """``convert(state)`` or ``convert(state, model)``, keeping the module versions of a
    conversion that returns a plain dict (their ``_load_from_state_dict`` reads them)."""
    if convert is None:
        return state
    how = _model_argument(convert)
    if how == "keyword":
        converted = convert(state, model=model)
    elif how == "positional":
        converted = convert(state, model)
    else:
        converted = convert(state)
    if not isinstance(converted, Mapping):
        raise StateDictError(
            f"assert_checkpoint_loads(convert=...): the conversion returned a "
            f"{type(converted).__name__}, not the state_dict to load"
        )
    metadata = getattr(converted, "_metadata", getattr(state, "_metadata", None))
    kept = OrderedDict(converted)
    kept._metadata = metadata  # type: ignore[attr-defined]
    return kept


def _model_argument(convert: Callable[..., Any]) -> str | None:
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


def _renamed(state: Mapping[str, Any], mapping: Callable[[str], str] | None) -> Mapping[str, Any]:
    if mapping is None:
        return state
    renamed = OrderedDict((mapping(k), v) for k, v in state.items())
    renamed._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return renamed


def _load_failure(
    model: nn.Module,
    loaded: LoadVerdict,
    diff: SchemaDiff,
    recorded_only: set[str],
    ignore: tuple[str, ...],
    strict: bool,
) -> list[str]:
    """The model half of a failed gate: the verdict line, then every key and the way out."""
    assert diff.model_verdict is not None

    def kept(keys: list[str]) -> list[str]:
        return [k for k in keys if not matches_any(k, ignore)]

    missing = kept([k for k in loaded.missing if k not in recorded_only])
    unexpected = kept(loaded.unexpected)
    shapes = [s for s in loaded.shapes if not matches_any(s[0], ignore)]
    lines = ["  " + model_verdict_line(diff.model_verdict, diff)]
    lines.extend(f"  {note}" for note in loaded.notes)
    if loaded.error:
        lines.append(f"  its load_state_dict raised: {loaded.error}")
    lines += _section("missing (in the model, not in the checkpoint)", missing)
    lines += _section("unexpected (in the checkpoint, not in the model)", unexpected)
    lines += _section("shape mismatches", [f"{k}: checkpoint {c}, model {m}" for k, c, m in shapes])
    lines += _section(
        "accepted by transformers' rules (strict load_state_dict refuses)", loaded.accepted
    )
    lines += _new_buffer_hint(model, missing, diff)
    lines += _rename_hint(loaded, diff, missing, unexpected)
    if strict and unexpected and not shapes and not loaded.error:
        lines.append(
            "  with strict=False it would load, silently dropping "
            f"{len(unexpected)} checkpoint key(s) ({', '.join(unexpected[:5])}"
            + (", ..." if len(unexpected) > 5 else "")
            + ")"
            + (f" and leaving {len(missing)} model key(s) uninitialised" if missing else "")
        )
    return lines


def _section(heading: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {heading} ({len(items)}):", *(f"    {i}" for i in items[:SECTION_LIMIT])]
    if len(items) > SECTION_LIMIT:
        lines.append(f"    ... and {len(items) - SECTION_LIMIT} more")
    return lines


def _new_buffer_hint(model: nn.Module, missing: list[str], diff: SchemaDiff) -> list[str]:
    """A buffer added since the checkpoint is often derived state (a mask, a cache) that
    need not be saved at all: then it is no reason to break every old checkpoint. A buffer
    missing only under a wrapper's prefix (the checkpoint has it without) is not new."""
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    new_buffers = [k for k in missing if k in buffers and not diff.prefix]
    if not new_buffers:
        return []
    return [
        f"  missing buffer(s) {', '.join(new_buffers[:5])}"
        + (", ..." if len(new_buffers) > 5 else "")
        + ": if not needed in checkpoints, register with "
        "self.register_buffer(name, tensor, persistent=False) and old checkpoints load"
    ]


def _rename_hint(
    loaded: LoadVerdict, diff: SchemaDiff, missing: list[str], unexpected: list[str]
) -> list[str]:
    """A wrapper's prefix, or the likely renames as a ready ``rename=``: only for keys the
    load itself refused (``missing`` model keys, ``unexpected`` checkpoint keys), so a
    rename that the model's own load hook converts is not suggested again."""
    # transformers' unmatched sides are what its load refused already; a load that raised
    # refused no key by name, so the layouts' renames stand
    keep_all_renames = loaded.unmatched is not None or loaded.error is not None
    if loaded.unmatched is not None:  # what transformers' rules left unmatched on each side
        diff = diff_schemas(*(mapping_schema(side) for side in loaded.unmatched))
    if not ((missing and unexpected) or keep_all_renames):
        return []  # nothing a rename could pair
    if diff.prefix:
        how, prefix = diff.prefix
        fix = (
            f"rename=[(r'^', {prefix!r})]"
            if how == "added"
            else f"rename=[(r'^{re.escape(prefix)}', '')]"
        )
        return [
            f"  the model's keys have the prefix {prefix!r} {how} relative to the checkpoint "
            f"(a wrapper such as DataParallel or torch.compile): {fix} (rename= maps the "
            "checkpoint's keys to today's)"
        ]
    refused = set(missing) | set(unexpected)
    renames = [
        (old, new)
        for old, new in diff.renames
        if keep_all_renames or (old in refused and new in refused)
    ]
    lines = _section(AMBIGUOUS_RENAMES, ambiguous_rename_lines(diff))
    if not renames:
        return lines
    return [
        "  likely renamed (same shape and dtype):",
        *(f"    {old} -> {new}" for old, new in renames[:SECTION_LIMIT]),
        "  to load it as it is: "
        + suggest_rename(renames, "expected->actual")
        + " (rename= maps the checkpoint's keys to today's)",
        *lines,
    ]


def _optimizer_failure(
    model: nn.Module,
    optimizer: Any,
    source: Path,
    rename: Rename,
    ignore: tuple[str, ...],
    diff: SchemaDiff,
) -> list[str]:
    """The optimizer half of the gate, from the optimizer state the checkpoint holds."""
    today = optimizer(model) if callable(optimizer) else optimizer
    expected = schema_of(source)
    if expected.optimizer is None:
        return [
            f"  optimizer= was given, but {_shown(source)} holds no optimizer state (a "
            "general checkpoint keeps it under optimizer_state_dict, optimizer or optim)"
        ]
    lines, judged = optimizer_failure(
        model, today, expected, rename=rename, ignore=ignore, shown=_shown(source)
    )
    diff.optimizer, diff.optimizer_verdict = judged.optimizer, judged.optimizer_verdict
    return lines


def optimizer_failure(
    model: nn.Module,
    today: Any,
    expected: Schema,
    *,
    rename: Rename,
    ignore: tuple[str, ...],
    shown: str,
) -> tuple[list[str], SchemaDiff]:
    """Why ``expected``'s optimizer state would not load or resume into ``today``'s, as
    report lines (none when it would), and the diff that judged it.

    Judged as the snapshot check judges it (:func:`~.optimizer_diff.optimizer_verdict`):
    the gate and the release gate call this. A verdict that could check positions only
    passes with a :class:`StateDictWarning` that says so, never silently.
    """
    expected = normalise(expected, rename=compile_rename(rename))
    judged = diff_schemas(expected, schema_of(model, optimizer=today), ignore=ignore)
    verdict = judged.optimizer_verdict
    if verdict is None:
        return [], judged
    if verdict.loads and verdict.exact is None:
        warnings.warn(
            StateDictWarning(f"checkpoint {shown}: {optimizer_load_verdict(verdict)}"),
            stacklevel=4,
        )
    if verdict.loads and verdict.exact is not False:
        return [], judged
    lines = ["  " + optimizer_load_verdict(verdict), *_section("optimizer", judged.optimizer)]
    return lines, judged


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


def _shown(path: Path) -> str:
    """The path relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
