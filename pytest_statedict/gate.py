"""The refactor gate: does an old checkpoint (or a snapshot of one) still load today?

The load goes through the model's own ``load_state_dict``, into a meta-device copy of the
model with ``assign=True``: conversion hooks a refactor adds (``_load_from_state_dict``
keyed on ``_version``) count as compatible, the user's model is not touched, and no memory
is spent on tensors. From a snapshot, the state_dict is rebuilt as meta tensors of the
recorded shapes and dtypes, with the recorded module versions, so a few kilobytes of JSON
guard a release's layout as well as its gigabytes of weights would.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from .checkpoint_files import load_state_dict_file, model_state
from .compare import SchemaDiff, diff_schemas
from .conversion import Converter, run_conversion
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
from .printable import printable, printable_message
from .rename import (
    Rename,
    compile_rename,
    matches_any,
    normalise,
    refuse_collisions,
    renamed_versions,
)
from .report import (
    AMBIGUOUS_RENAMES,
    SECTION_LIMIT,
    ambiguous_rename_lines,
    model_verdict_line,
    optimizer_load_verdict,
    regex_literal,
    suggest_rename,
)
from .runtime import begin_check, checkpoint_loader, end_check
from .schema import Schema
from .verdict import load_into, summarised

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


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
    convert: Converter | None = None,
    ignore: Iterable[str] = (),
    adapter_name: str | None = None,
    expected_to_fail: str | None = None,
    weights_only: bool = True,
) -> None:
    """Assert that the checkpoint or snapshot at ``path`` loads into ``model``.

    ``rename`` (a mapping, a callable or ``[(regex, replacement), ...]``) maps the
    checkpoint's keys to today's names, and the module versions (``_metadata``) with them,
    as torch's ``consume_prefix_in_state_dict_if_present`` does. On failure, the message
    lists the missing, unexpected and shape-mismatched keys, likely renames as a ready
    ``rename=``, and the keys a ``strict=False`` load would silently drop. ``part`` names
    the model's entry in a checkpoint holding several (``"modelB_state_dict"``). ``rules``
    says whose idea of "loads" applies: ``"torch"`` (``load_state_dict``), ``"transformers"``
    (``from_pretrained``: tied keys, keys to ignore, checkpoint conversions), ``"peft"``
    (``set_peft_model_state_dict``: an adapter's keys without the adapter name,
    ``modules_to_save``, no base-model weights) or ``"auto"``: PEFT's for a ``PeftModel``
    checked against an adapter (``adapter_name``, by default its only adapter or
    ``"default"``), transformers' for a transformers ``PreTrainedModel`` and torch's for
    anything else. ``factory`` builds the model to load into, for a model that cannot be
    copied onto the meta device.

    ``optimizer`` (today's optimizer, or a function of the model that builds it) checks the
    checkpoint's optimizer state too: that it loads, and that every state lands on its own
    parameter (by name where the checkpoint names them, else by position, which is said).
    ``convert`` is the project's own conversion of old checkpoints, ``fn(state_dict)`` or
    ``fn(state_dict, model)``, run on the checkpoint's tensors before ``rename`` (meta
    tensors where the checkpoint was read without data; the values, memory-mapped, when it
    needs them); a failure lists the keys it changed. Keys matching an ``ignore`` glob
    count on neither side, whether missing, unexpected or of another shape (as if the
    loader dropped them); a failure lists them. ``expected_to_fail="why"`` accepts a
    deliberate break: the call passes when the checkpoint does not load (an expected
    failure in the summary) and fails once it loads again. ``weights_only=False``, asked
    for by name, unpickles a file fully (a whole ``torch.save(model)``): it runs any code
    the file holds, so only for files you trust.
    """
    __tracebackhide__ = True
    if expected_to_fail is not None and not expected_to_fail.strip():
        raise StateDictError(
            "assert_checkpoint_loads(expected_to_fail=...) takes the reason of the break"
        )
    session = begin_check("gate")
    extra = {"reason": expected_to_fail} if expected_to_fail else {}
    try:
        _check(
            model,
            Path(path),
            strict=strict,
            rename=rename,
            map_location=map_location,
            part=part,
            rules=rules,
            factory=factory,
            optimizer=optimizer,
            convert=convert,
            ignore=tuple(ignore),
            adapter_name=adapter_name,
            weights_only=weights_only,
        )
    except Exception as exc:
        end_check()
        expected = expected_to_fail is not None and isinstance(exc, StateDictMismatch)
        if session is not None:
            outcome = "xfailed" if expected else "failed"
            session.check_finished("gate", os.fspath(path), outcome, exc, **extra)
        if expected:
            return
        raise
    end_check()
    if expected_to_fail is None:
        if session is not None:
            session.check_finished("gate", os.fspath(path), "passed")
        return
    fixed = StateDictMismatch(
        f"checkpoint {_shown(Path(path))} loads into {type(model).__name__} again: the "
        f"break of expected_to_fail={expected_to_fail!r} is fixed: remove expected_to_fail"
    )
    if session is not None:
        session.check_finished("gate", os.fspath(path), "xpassed", fixed, **extra)
    raise fixed


def _check(
    model: nn.Module,
    path: Path,
    *,
    strict: bool,
    rename: Rename,
    map_location: Any,
    part: str | None,
    rules: str,
    factory: Callable[[], nn.Module] | None,
    optimizer: Any,
    convert: Converter | None,
    ignore: tuple[str, ...],
    adapter_name: str | None,
    weights_only: bool,
) -> None:
    """The gate itself (see :func:`assert_checkpoint_loads`)."""
    __tracebackhide__ = True
    require_module(model, "assert_checkpoint_loads()")
    mapping = compile_rename(rename)
    source, saved, saved_on, recorded_only, schema = checkpoint_state(
        path, part=part, map_location=map_location, model=model, weights_only=weights_only
    )
    # the schema's fingerprints decide a tie, under today's names (a conversion's are unknown)
    recorded = normalise(schema, rename=mapping) if schema and convert is None else None

    def values() -> Mapping[str, Any]:  # the checkpoint's tensors, memory-mapped
        return load_state_dict_file(
            source, part=part, map_location="cpu", weights_only=weights_only
        )[0]

    conversion = None
    if convert is not None:
        conversion = run_conversion(saved, convert, model, values=values, shown=_shown(source))
    state = _renamed(saved if conversion is None else conversion.state, mapping)
    loaded = load_into(
        model, state, rules=rules, strict=strict, factory=factory, adapter_name=adapter_name
    )

    def converted_values() -> Mapping[str, Any]:  # read only where a tie's values decide
        real = values()
        if convert is not None:
            real = run_conversion(real, convert, model, values=values, shown=_shown(source)).state
        return _renamed(real, mapping)

    verdict = summarised(
        model,
        loaded,
        state,
        strict=strict,
        ignore=ignore,
        present=recorded_only,
        recorded=recorded,
        values=converted_values,
    )
    # ignored keys count on neither side: no rename is paired from them, none listed
    # the checkpoint's key order where it has one (a .safetensors header is sorted)
    ordered = schema.ordered if schema is not None else True
    diff = diff_schemas(
        *(
            normalise(s, ignore=ignore)
            for s in (replace(mapping_schema(state), ordered=ordered), module_schema(model))
        )
    )
    diff.model_verdict = verdict
    name = type(model).__name__
    if verdict.loads:
        title = f"checkpoint {_shown(source)} loads into {name}, but its optimizer state does not:"
        lines = ["  " + model_verdict_line(verdict, diff)]
    else:
        title = f"checkpoint {_shown(source)} does not load into {name} with {loaded.how}:"
        lines = _load_failure(
            model, loaded, diff, recorded_only, ignore, strict, given=mapping is not None
        )
        if conversion is not None:
            lines += conversion.lines(SECTION_LIMIT)
    optimizer_lines = []
    if optimizer is not None:
        optimizer_lines = _optimizer_failure(model, optimizer, source, part, rename, ignore, diff)
    if not verdict.loads or optimizer_lines:
        lines += optimizer_lines
        if any(loc != "cpu" for loc in saved_on):
            where = ", ".join(printable(loc) for loc in sorted(saved_on))
            lines.append(f"  the checkpoint was saved on {where}")
        raise StateDictMismatch("\n".join([title, *lines]), diff)


def _renamed(state: Mapping[str, Any], mapping: Callable[[str], str] | None) -> Mapping[str, Any]:
    """The state under the new key names, with its module versions renamed as its keys
    were (see :func:`~.rename.renamed_versions`), so that every module finds its own."""
    if mapping is None:
        return state
    names = {key: mapping(key) for key in state}
    refuse_collisions(names)  # two trained tensors under one name: one would be lost
    renamed = OrderedDict((names[k], v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    renamed._metadata = (  # type: ignore[attr-defined]
        None if metadata is None else OrderedDict(renamed_versions(metadata, names))
    )
    return renamed


def _load_failure(
    model: nn.Module,
    loaded: LoadVerdict,
    diff: SchemaDiff,
    recorded_only: set[str],
    ignore: tuple[str, ...],
    strict: bool,
    *,
    given: bool,
) -> list[str]:
    """The model half of a failed gate: the verdict line, then every key and the way out
    (``given``: the caller passed a ``rename=``, which the suggestion comes after)."""
    assert diff.model_verdict is not None

    def kept(keys: list[str]) -> list[str]:
        return [k for k in keys if not matches_any(k, ignore)]

    all_missing = [k for k in loaded.missing if k not in recorded_only]
    missing = kept(all_missing)
    unexpected = kept(loaded.unexpected)
    shapes = [s for s in loaded.shapes if not matches_any(s[0], ignore)]
    ignored = [  # by matches_any again: `k not in missing` was quadratic (20k keys, 14 s)
        *(f"{printable(k)} (missing)" for k in all_missing if matches_any(k, ignore)),
        *(f"{printable(k)} (unexpected)" for k in loaded.unexpected if matches_any(k, ignore)),
        *(
            f"{printable(k)}: checkpoint {c}, model {m}"
            for k, c, m in loaded.shapes
            if matches_any(k, ignore)
        ),
    ]
    lines = ["  " + model_verdict_line(diff.model_verdict, diff)]
    lines.extend(f"  {printable_message(note)}" for note in loaded.notes)
    if loaded.error:
        lines.append(f"  its load_state_dict raised: {printable_message(loaded.error)}")
    lines += _section(
        "missing (in the model, not in the checkpoint)", list(map(printable, missing))
    )
    lines += _section(
        "unexpected (in the checkpoint, not in the model)", list(map(printable, unexpected))
    )
    lines += _section(
        "shape mismatches", [f"{printable(k)}: checkpoint {c}, model {m}" for k, c, m in shapes]
    )
    lines += _section(
        "accepted by transformers' rules (strict load_state_dict refuses)",
        [printable(k) for k in loaded.accepted],
    )
    lines += _section(f"ignored by ignore={list(ignore)!r}", ignored)
    lines += _new_buffer_hint(model, missing, diff)
    lines += _rename_hint(loaded, diff, missing, unexpected, given=given)
    if strict and unexpected and not shapes and not loaded.error:
        lines.append(
            "  with strict=False it would load, silently dropping "
            f"{len(unexpected)} checkpoint key(s) ({', '.join(map(printable, unexpected[:5]))}"
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
        f"  missing buffer(s) {', '.join(map(printable, new_buffers[:5]))}"
        + (", ..." if len(new_buffers) > 5 else "")
        + ": if not needed in checkpoints, register with "
        "self.register_buffer(name, tensor, persistent=False) and old checkpoints load"
    ]


def _rename_hint(
    loaded: LoadVerdict,
    diff: SchemaDiff,
    missing: list[str],
    unexpected: list[str],
    *,
    given: bool = False,
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
            else f"rename=[({regex_literal('^' + re.escape(prefix))}, '')]"
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
        *(f"    {printable(old)} -> {printable(new)}" for old, new in renames[:SECTION_LIMIT]),
        "  to load it as it is: "
        + suggest_rename(renames, "expected->actual", diff)
        + " (rename= maps the checkpoint's keys to today's"
        + ("; these come after the rename= you passed: add them to it)" if given else ")"),
        *lines,
    ]


def _optimizer_failure(
    model: nn.Module,
    optimizer: Any,
    source: Path,
    part: str | None,
    rename: Rename,
    ignore: tuple[str, ...],
    diff: SchemaDiff,
) -> list[str]:
    """The optimizer half of the gate, from the optimizer state the checkpoint holds: the
    one that goes with ``part`` where the part has one (a folder of several models and
    optimizers), else the checkpoint's (``part`` naming a general checkpoint's model)."""
    today = optimizer(model) if callable(optimizer) else optimizer
    expected = schema_of(source, part=part) if part is not None else schema_of(source)
    if expected.optimizer is None and part is not None:
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


class CheckpointState(NamedTuple):
    """What the gate reads of a checkpoint (see :func:`checkpoint_state`)."""

    # the checkpoint read (a folder's own file, ...)
    source: Path
    # the state_dict to load: real tensors (memory-mapped), or meta tensors from a schema
    state: OrderedDict[str, Any] | dict[str, Any]
    # the devices its tensors were saved on
    saved_on: set[str]
    # the keys it records but no tensor was rebuilt for (extra state, sparse)
    recorded_only: set[str]
    # the schema the state was rebuilt from (its fingerprints, its key order), if it was
    schema: Schema | None = None


def checkpoint_state(
    path: Path,
    *,
    part: str | None,
    map_location: Any,
    model: nn.Module | None = None,
    weights_only: bool = True,
) -> CheckpointState:
    """The checkpoint the gate reads and the state_dict it loads (:class:`CheckpointState`).

    A ``pytest_statedict_load_checkpoint`` hook's object if one claims ``path``; meta
    tensors of the recorded shapes and dtypes for a format whose schema is read first
    (``schema_first``: a snapshot, a ``.safetensors`` file, a sharded index, a DCP folder;
    O(tensors), no tensor data); else the file loaded by its format (a ``torch.save`` file
    memory-mapped, with the module versions, ``_metadata``, it kept). ``model`` gives what
    a schema does not record and load hooks read (see :func:`state_from_snapshot`).
    """
    custom = from_hook(path, checkpoint_loader())
    if custom is not None:
        return CheckpointState(path, model_state(path, custom, part=part), set(), set())
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
        return CheckpointState(where, state, set(schema.saved_on), recorded_only, schema)
    state, saved_on = load_state_dict_file(
        where, map_location=map_location, part=part, weights_only=weights_only
    )
    return CheckpointState(where, state, saved_on, set())


def _shown(path: Path) -> str:
    """The path relative to the working directory when it is below it."""
    try:
        shown = str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    return printable(shown)
