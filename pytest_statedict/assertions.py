"""The assertion helpers users call from their tests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .compare import SchemaDiff, diff_schemas
from .comparison import CustomComparison, EntryComparison, Tolerances, custom_comparison
from .errors import SnapshotError, StateDictError, StateDictMismatch, hide_from_bad_input
from .extract import nothing_to_check, schema_of
from .optimizer_diff import without_hyperparams
from .readers.snapshot_file import read_snapshot_text
from .rename import Rename, compile_rename, normalise, without_ignored_members
from .report import render_diff
from .runtime import (
    active_session,
    current_session,
    entry_comparison,
    key_normaliser,
    recorded_check,
    verbose,
)
from .schema import Schema
from .verdict import model_verdict, needs_a_load

if TYPE_CHECKING:
    from .session_api import SnapshotStore

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


def assert_state_dict_matches(
    actual: Any,
    expected: Any = None,
    *,
    name: str | None = None,
    optimizer: Any = None,
    values: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
    ignore: Iterable[str] = (),
    rename: Rename = None,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
    compare: EntryComparison | None = None,
    ignore_hyperparams: Iterable[str] = (),
) -> None:
    """Check a state_dict's schema against the current test's snapshot, or against ``expected``.

    ``actual`` and ``expected`` may each be a module, a state_dict, a checkpoint path, a
    snapshot path or a :class:`Schema`. ``ignore`` holds glob patterns of keys to leave
    out; ``rename`` (a mapping, a callable or ``[(regex, replacement), ...]``) is applied to
    actual's keys first. ``tolerances`` maps key globs to ``{"rtol": .., "atol": ..}`` (the
    first glob that matches a key wins; other keys keep ``rtol``/``atol``); ``compare``,
    ``fn(key, expected_entry, actual_entry)``, decides a key before the
    ``pytest_statedict_compare_entry`` hooks and the built-in comparison do (see
    ``docs/comparison.md``). ``ignore_hyperparams`` names optimizer hyperparameters to
    leave out on both sides (``("lr", "initial_lr")``: a schedule moves them), with those of
    the ini option ``statedict_ignore_hyperparams``; a snapshot is written without them.
    Raises :class:`StateDictMismatch` listing every difference.
    """
    __tracebackhide__ = True
    ignore = tuple(ignore)  # used on both sides and by the diff: a generator would run dry
    # refused before anything is read: a bad tolerance is the call's mistake, not the data's
    by_key = Tolerances(rtol, atol, tolerances)
    if by_key.per_key and not values:
        raise StateDictError(
            "tolerances= holds keys' values to a tolerance, but values are compared only "
            "with values=True: pass it, or drop tolerances="
        )
    custom = custom_comparison(compare, entry_comparison())
    volatile = _volatile_hyperparams(ignore_hyperparams)
    if expected is None:
        store = current_session()
        with store.snapshot_check():
            _check_snapshot(
                store, actual, name=name, optimizer=optimizer, values=values,
                tolerances=by_key, compare=custom, ignore=ignore, rename=rename,
                volatile=volatile,
            )  # fmt: skip
        return
    if name is not None:
        raise TypeError("assert_state_dict_matches(): name= applies to snapshots (expected=None)")
    _assert_matches_expected(
        actual, expected, optimizer=optimizer, values=values, tolerances=by_key,
        compare=custom, ignore=ignore, rename=rename, volatile=volatile,
    )  # fmt: skip


# the ini option of the hyperparameters every check leaves out (plugin.py registers it)
HYPERPARAMS_INI = "statedict_ignore_hyperparams"


def _volatile_hyperparams(names: Iterable[str]) -> frozenset[str]:
    """The hyperparameters a check leaves out: its own and the ini option's. A bare string
    would be its letters: refused."""
    if isinstance(names, str):
        raise TypeError(
            f"assert_state_dict_matches(ignore_hyperparams={names!r}): pass a tuple of "
            f"names, e.g. ignore_hyperparams=({names!r},)"
        )
    session = active_session()
    configured = session.config.getini(HYPERPARAMS_INI) if session is not None else []
    return frozenset(names) | frozenset(configured)


def _without_volatile(schema: Schema, volatile: frozenset[str]) -> Schema:
    if not volatile or schema.optimizer is None:
        return schema
    return replace(schema, optimizer=without_hyperparams(schema.optimizer, volatile))


@recorded_check("comparison", lambda actual, expected, **opts: describe(expected))
def _assert_matches_expected(
    actual: Any,
    expected: Any,
    *,
    optimizer: Any,
    values: bool,
    tolerances: Tolerances,
    compare: CustomComparison | None,
    ignore: tuple[str, ...],
    rename: Rename,
    volatile: frozenset[str],
) -> None:
    """``assert_state_dict_matches`` against a given ``expected``: one recorded check."""
    __tracebackhide__ = True
    actual_schema = _without_volatile(
        prepared_schema(actual, optimizer=optimizer, values=values, rename=rename, ignore=ignore),
        volatile,
    )
    expected_schema = _without_volatile(
        normalise(schema_of(expected, values=values), rename=key_normaliser(), ignore=ignore),
        volatile,
    )
    diff = diff_schemas(
        expected_schema, actual_schema, tolerances=tolerances, ignore=ignore, compare=compare
    )
    if diff:
        complete_diff(diff, actual, expected_schema, actual_schema, rename=rename, ignore=ignore)
    else:
        refused = refused_load(actual, expected_schema, rename=rename, ignore=ignore)
        diff = refused if refused is not None else diff
    if diff or diff.model_verdict is not None:
        raise StateDictMismatch(
            render_diff(
                diff,
                title=f"state_dict differs from the expected {describe(expected)}",
                verbose=verbose(),
            ),
            diff,
        )


def _check_snapshot(
    store: SnapshotStore,
    actual: Any,
    *,
    name: str | None,
    optimizer: Any,
    values: bool,
    tolerances: Tolerances,
    compare: CustomComparison | None,
    ignore: tuple[str, ...],
    rename: Rename,
    volatile: frozenset[str],
) -> None:
    """``assert_state_dict_matches`` against the running test's snapshot ``name``.

    Without ``--statedict-update`` nothing is written: a missing snapshot fails with the
    command that creates it. With it, a missing or changed snapshot is (re)written, unless
    the change is a problem no update can accept (an inconsistent optimizer state). A
    snapshot that differs only by what a tolerance or a custom comparison accepts is kept:
    rewriting it would move the baseline a tolerance at a time.
    """
    __tracebackhide__ = True
    slot = store.claim_snapshot(name)
    actual_schema = _without_volatile(
        prepared_schema(actual, optimizer=optimizer, values=values, rename=rename, ignore=ignore),
        volatile,
    )
    problems = actual_schema.optimizer.problems if actual_schema.optimizer else ()
    # ignored keys' optimizer members stay out of the file (the diff drops them too)
    text = without_ignored_members(actual_schema, ignore).to_json()
    if not slot.exists:
        tolerances.refuse_unmatched(actual_schema.by_key())  # no diff will see the globs
        if store.update:
            store.write_snapshot(slot, text)
            _fail_on_problems(problems, slot.path)
            return
        store.snapshot_missing(slot)
        raise StateDictMismatch(
            f"no statedict snapshot {slot.shown} yet: nothing was written. Create it with\n"
            f"  {slot.accept}\nand commit it."
        )
    moved = slot.source != slot.path  # read under its 0.1.0 name
    try:
        current = read_snapshot_text(
            slot.source, lambda problem: SnapshotError(slot.shown, problem)
        )
        if current == text and not problems and (not moved or not store.update):
            tolerances.refuse_unmatched(actual_schema.by_key())  # nor here
            store.record_snapshot(slot, "passed")
            return
        expected = _without_volatile(
            normalise(Schema.from_json(current, slot.shown), rename=key_normaliser()), volatile
        )
    except SnapshotError:
        if store.update:
            store.rewrite_snapshot(slot, text)
            return
        store.record_snapshot(slot, "failed")
        raise
    diff = diff_schemas(
        expected, actual_schema, tolerances=tolerances, ignore=ignore, compare=compare
    )
    # equal layouts the model refuses: no update can accept that
    refused = None if diff else refused_load(actual, expected, rename=rename, ignore=ignore)
    if refused is None and not diff:
        if store.update and (moved or not (tolerances.given or diff.accepted)):
            # same schema, other text (an older writer) or an old name: refresh it, or
            # it would show up in the next unrelated pull request
            store.rewrite_snapshot(slot, text)
            return
        store.record_snapshot(slot, "passed")
        return
    if refused is None and store.update and not diff.problems:
        store.rewrite_snapshot(slot, text)
        return
    store.record_snapshot(slot, "failed")
    if refused is not None:
        diff = refused
    else:
        complete_diff(diff, actual, expected, actual_schema, rename=rename, ignore=ignore)
    raise StateDictMismatch(
        render_diff(
            diff,
            title=f"state_dict does not match snapshot {slot.shown}",
            verbose=store.verbose,
            accept_hint=None if diff.problems or refused is not None else slot.accept,
        ),
        diff,
    )


def _fail_on_problems(problems: Iterable[str], path: Path) -> None:
    __tracebackhide__ = True
    problems = list(problems)
    if problems:
        raise StateDictMismatch(
            f"snapshot {path} was written, but the optimizer state is inconsistent:\n  "
            + "\n  ".join(problems)
        )


def prepared_schema(
    obj: Any,
    *,
    optimizer: Any = None,
    values: bool = False,
    rename: Rename = None,
    ignore: Iterable[str] = (),
) -> Schema:
    """The schema of ``obj`` with ``rename``, then the normalising hooks, then ``ignore``."""
    schema = schema_of(obj, optimizer=optimizer, values=values)
    if not schema.tensors and schema.optimizer is None:
        raise nothing_to_check(obj)
    user, hooks = compile_rename(rename), key_normaliser()
    if user is not None and hooks is not None:
        return normalise(schema, rename=lambda key: hooks(user(key)), ignore=ignore)
    return normalise(schema, rename=user or hooks, ignore=ignore)


def complete_diff(
    diff: SchemaDiff,
    actual: Any,
    expected: Schema,
    actual_schema: Schema,
    *,
    rename: Rename,
    ignore: tuple[str, ...],
) -> None:
    """Fill in what a mismatch's report says beyond the differences (the caller has the model).

    The load verdict is decided as the refactor gate decides it (:mod:`.verdict`), through
    a live model's own ``load_state_dict``: the layouts alone would call a refactor that its
    load hooks convert breaking. Only the model's real keys can be loaded, so a check that
    renames keys (``rename=`` or a normalising hook) keeps the layouts' verdict.
    """
    diff.notes.extend(flag_notes(expected, actual_schema))
    if _loadable(actual, expected, rename):
        diff.model_verdict = model_verdict(actual, expected, ignore=ignore)


def refused_load(
    actual: Any, expected: Schema, *, rename: Rename, ignore: tuple[str, ...]
) -> SchemaDiff | None:
    """Equal layouts that today's model still refuses to load, as a diff to report, or None.

    Equal keys and shapes load, unless the model's own load code says otherwise about a
    checkpoint that recorded no module versions (:func:`~.verdict.needs_a_load`): then
    its load decides, as the gate's would, and a NO fails the match.
    """
    if not _loadable(actual, expected, rename) or not needs_a_load(actual, expected):
        return None
    verdict = model_verdict(actual, expected, ignore=ignore)
    if verdict.loads is not False:
        return None
    return SchemaDiff(model_verdict=verdict)


def _loadable(actual: Any, expected: Schema, rename: Rename) -> bool:
    """Whether ``expected`` can be loaded through ``actual``: a live model, and keys that
    are its real ones (no ``rename=``, no normalising hook)."""
    return (
        isinstance(actual, nn.Module)
        and bool(expected.tensors)
        and rename is None
        and key_normaliser() is None
    )


def flag_notes(expected: Schema, actual: Schema) -> list[str]:
    """Implementation flags that changed, where both sides recorded them: never a failure
    (torch defaults them differently across releases), but a clue (``fused`` on a new GPU)."""
    if expected.optimizer is None or actual.optimizer is None:
        return []
    notes: list[str] = []
    pairs = zip(expected.optimizer.param_groups, actual.optimizer.param_groups, strict=False)
    for i, (old, new) in enumerate(pairs):
        notes.extend(
            f"param_group {i} {flag}: {old.flags[flag]} -> {new.flags[flag]} "
            "(implementation only, not compared)"
            for flag in old.flags
            if flag in new.flags and old.flags[flag] != new.flags[flag]
        )
    return notes


def describe(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return f"file {os.fspath(obj)}"
    if isinstance(obj, Schema):
        return f"schema ({obj.source})" if obj.source else "schema"
    return type(obj).__name__


class SnapshotFixture:
    """The ``statedict_snapshot`` fixture: ``statedict_snapshot.assert_match(obj, name=...)``."""

    def assert_match(self, obj: Any, name: str | None = None, **opts: Any) -> None:
        """Same options as :func:`assert_state_dict_matches` (``optimizer``, ``values``, ...)."""
        __tracebackhide__ = True
        assert_state_dict_matches(obj, name=name, **opts)
