"""Diff two schemas: every difference at once, grouped, with the verdict a reviewer needs.

The diff is structured (:class:`SchemaDiff`); :mod:`.report` turns it into words. Keys are
compared in a fixed order of attributes (kind, shape, dtype, layout, qscheme,
requires_grad, tying, values), as ``torch.testing`` does, but nothing stops at the first
mismatch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .comparison import CustomComparison, Tolerance, Tolerances
from .errors import hide_from_bad_input
from .layout import ENTRY_DETAIL, entry_type
from .optimizer_diff import OptimizerVerdict, diff_optimizers, optimizer_verdict, uses_names
from .printable import printable
from .rename import (
    detect_prefix,
    normalise,
    renamed_optimizer,
    without_members,
)
from .rename_pairing import likely_renames, same_kind
from .schema import Schema
from .schema_entries import Fingerprint, ModuleVersion, TensorEntry

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


ATTRIBUTES = ("kind", "type", "shape", "dtype", "layout", "qscheme", "requires_grad", "tied_to")


@dataclass(frozen=True)
class Change:
    """One attribute of one key that differs. ``excess`` (values under ``rtol``/``atol``
    only): how many times the tolerance the furthest statistic moved, to report the
    largest changes first."""

    key: str
    attribute: str
    expected: Any
    actual: Any
    excess: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ModelVerdict:
    """How today's model answered "does the old checkpoint load?" (see :mod:`.verdict`).

    The layouts alone cannot see a model's own load code (a ``_load_from_state_dict`` keyed
    on ``_version`` that converts, or refuses; a load pre-hook): the expected layout is
    loaded through the model's ``load_state_dict`` on a meta copy, as the refactor gate
    does. ``loads`` is None when that could not be done (``reason`` says why) and the
    layouts decide; otherwise ``reason`` says what the load refused, counted as the
    deciding ``loader`` counts.
    """

    model: str  # the model's class name
    loads: bool | None
    reason: str = ""
    # the rules that decided, as a report names them: "load_state_dict(strict=True)", or
    # transformers' from_pretrained rules for a PreTrainedModel (hf_rules), PEFT's
    # set_peft_model_state_dict for an adapter of a PeftModel (peft_rules)
    loader: str = "load_state_dict(strict=True)"
    # whether keys and shapes alone (the checkpoint's against the model's) say "loads":
    # where they part from the real load, the report says who decided (None: not known)
    layouts_load: bool | None = None
    # what a load that works should still be told (tie_verdict: checkpoint tensors meeting
    # on a tied parameter, equal, or one split between two)
    notes: tuple[str, ...] = ()

    @property
    def by_transformers(self) -> bool:
        return "from_pretrained" in self.loader

    @property
    def by_peft(self) -> bool:
        return "set_peft_model_state_dict" in self.loader


@dataclass
class SchemaDiff:
    """Everything that differs between an expected and an actual schema."""

    removed: list[TensorEntry] = field(default_factory=list)
    added: list[TensorEntry] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    renames: list[tuple[str, str]] = field(default_factory=list)  # (expected key, actual key)
    # the keys both sides hold (a suggested rename= must leave them as they are)
    common: list[str] = field(default_factory=list)
    # removed modules or keys that may have become one of several added ones: never suggested
    ambiguous_renames: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    prefix: tuple[str, str] | None = None  # ("added" | "dropped", prefix)
    moved: list[tuple[str, int, int]] = field(default_factory=list)  # key, old pos, new pos
    versions: list[tuple[str, ModuleVersion, ModuleVersion]] = field(default_factory=list)
    non_persistent: tuple[list[str], list[str]] = ([], [])  # removed, added
    extras: list[str] = field(default_factory=list)
    optimizer: list[str] = field(default_factory=list)
    optimizer_verdict: OptimizerVerdict | None = None
    problems: list[str] = field(default_factory=list)
    expected_saved_on: tuple[str, ...] = ()
    actual_saved_on: tuple[str, ...] = ()
    # not differences: how the load verdict was decided (filled in by a caller that has the
    # model), and what the report says beside them (the order of tolerant value changes;
    # implementation flags, from the caller)
    model_verdict: ModelVerdict | None = None
    notes: list[str] = field(default_factory=list)
    # keys a custom comparison accepted although the built-in one found a difference: not
    # differences, but a snapshot is not rewritten for them (the baseline would drift)
    accepted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """True when there is a difference (so ``if diff:`` reads naturally)."""
        return any(
            (
                self.removed,
                self.added,
                self.changed,
                self.prefix,
                self.moved,
                self.versions,
                self.non_persistent[0],
                self.non_persistent[1],
                self.extras,
                self.optimizer,
                self.problems,
            )
        )

    @property
    def shape_mismatches(self) -> list[Change]:
        return [c for c in self.changed if c.attribute == "shape"]

    @property
    def loads_strict(self) -> bool:
        """Would a checkpoint with the expected layout load into the actual model, strict=True?

        ``load_state_dict`` refuses missing keys, unexpected keys and shape mismatches; a
        dtype change is converted on copy, so it still loads (with converted values). A
        real load through the model (``model_verdict``) outranks the layouts.
        """
        if self.model_verdict is not None and self.model_verdict.loads is not None:
            return self.model_verdict.loads
        return self.layouts_load_strict

    @property
    def layouts_load_strict(self) -> bool:
        """The strict-load verdict the two layouts give, with no model to ask."""
        return not (self.removed or self.added or self.shape_mismatches or self.prefix)


def diff_schemas(
    expected: Schema,
    actual: Schema,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    tolerances: Tolerances | None = None,
    ignore: Iterable[str] = (),
    compare: CustomComparison | None = None,
) -> SchemaDiff:
    """Everything that differs; ``ignore`` (globs) drops optimizer members both sides name.

    The keys themselves are expected to have gone through :func:`normalise` already.
    ``tolerances`` (per-key, see :class:`~.comparison.Tolerances`) carries a call's
    ``rtol``/``atol`` as its default, and replaces them where given (a glob that matches no
    key of either side is refused). ``compare`` decides a key both sides hold before the
    built-in comparison does (see :func:`~.comparison.custom_comparison`).
    """
    if tolerances is None:
        tolerances = Tolerances(rtol, atol)
    wrapped = ([t.key for t in expected], [t.key for t in actual])
    diff = SchemaDiff(expected_saved_on=expected.saved_on, actual_saved_on=actual.saved_on)
    diff.prefix = detect_prefix(*wrapped)
    expected, actual = _unwrapped(expected, actual, diff.prefix)
    exp, act = expected.by_key(), actual.by_key()
    # a glob may name a key before a wrapper prefix was unwrapped, or after
    tolerances.refuse_unmatched(*wrapped, exp, act)
    diff.removed = [t for k, t in exp.items() if k not in act]
    diff.added = [t for k, t in act.items() if k not in exp]
    diff.common = [k for k in exp if k in act]
    pairing = likely_renames(diff.removed, diff.added, ordered=expected.ordered and actual.ordered)
    diff.renames, diff.ambiguous_renames = pairing.pairs, pairing.ambiguous
    _compare_entries(diff, exp, act, tolerances, compare)
    if expected.ordered and actual.ordered:
        diff.moved = _moved(list(exp), list(act))
    _compare_modules(diff, expected, actual)
    _compare_optimizers(diff, expected, actual, tuple(ignore))
    return diff


def _unwrapped(
    expected: Schema, actual: Schema, prefix: tuple[str, str] | None
) -> tuple[Schema, Schema]:
    """Both sides without a wrapper's prefix (DataParallel, torch.compile): the wrapped
    model is compared, not the wrapper's names."""
    if prefix is None:
        return expected, actual
    how, added = prefix

    def unwrap(key: str) -> str:
        return key.removeprefix(added)

    if how == "added":
        return expected, normalise(_inner_versions(actual, added), rename=unwrap)
    return normalise(_inner_versions(expected, added), rename=unwrap), actual


def _compare_entries(
    diff: SchemaDiff,
    exp: Mapping[str, TensorEntry],
    act: Mapping[str, TensorEntry],
    tolerances: Tolerances,
    compare: CustomComparison | None,
) -> None:
    """The keys both sides hold, attribute by attribute (a custom comparison first)."""
    for key, e in exp.items():
        a = act.get(key)
        if a is None:
            continue
        verdict = compare(key, e, a) if compare is not None else None
        if verdict is None:
            diff.changed.extend(_entry_changes(e, a, tolerances.for_key(key)))
            continue
        who, found = verdict
        diff.changed.extend(Change(key, "compare", who, line) for line in found)
        if not found and _entry_changes(e, a, tolerances.for_key(key)):
            diff.accepted.append(key)
    if diff.accepted:
        diff.notes.append(
            f"a custom comparison accepted {', '.join(map(printable, diff.accepted))}, "
            "which the built-in comparison finds changed"
        )
    if tolerances.tolerant and sum(c.excess is not None for c in diff.changed) > 1:
        # the values furthest outside the tolerance first: a report shows only the first
        # lines of a long list, and the change that matters is the largest, not the first key
        diff.changed.sort(key=lambda c: (c.excess is not None, -(c.excess or 0.0)))
        diff.notes.append(
            "values outside rtol/atol are listed furthest first, by how many times the "
            "tolerance (atol + rtol * max(|min|, |max|) of the expected values) their "
            "furthest statistic (min, max, mean or std) moved"
        )


def _compare_modules(diff: SchemaDiff, expected: Schema, actual: Schema) -> None:
    """Module versions, non-persistent buffers and a checkpoint's other entries."""
    if expected.versions is not None and actual.versions is not None:
        for module in sorted(set(expected.versions) | set(actual.versions)):
            old, new = expected.versions.get(module, 1), actual.versions.get(module, 1)
            if old != new:
                diff.versions.append((module, old, new))
    if expected.knows_modules and actual.knows_modules:  # a file cannot know them
        npb_old, npb_new = set(expected.non_persistent_buffers), set(actual.non_persistent_buffers)
        diff.non_persistent = (sorted(npb_old - npb_new), sorted(npb_new - npb_old))
    for name in sorted(set(expected.extras) | set(actual.extras)):
        old_t, new_t = expected.extras.get(name), actual.extras.get(name)
        if not _same_entry(old_t, new_t):
            old_shown, new_shown = (printable(t) if t else "absent" for t in (old_t, new_t))
            diff.extras.append(f"{printable(name)}: {old_shown} -> {new_shown}")


def _same_entry(old: str | None, new: str | None) -> bool:
    """Whether two descriptions of a checkpoint entry agree. One without a detail (a
    snapshot from before details were recorded: ``"list"``) is compared by its type only,
    so that such a snapshot does not turn red once the reader describes the entry."""
    if old is None or new is None or (ENTRY_DETAIL in old and ENTRY_DETAIL in new):
        return old == new
    return entry_type(old) == entry_type(new)


def _compare_optimizers(
    diff: SchemaDiff, expected: Schema, actual: Schema, patterns: tuple[str, ...]
) -> None:
    """The optimizers' differences and the verdict on the old state (renamed parameters
    followed, ignored members left out where both sides name them)."""
    old_opt, new_opt = expected.optimizer, actual.optimizer
    if patterns and old_opt and new_opt and uses_names(old_opt) and uses_names(new_opt):
        old_opt, new_opt = without_members(old_opt, patterns), without_members(new_opt, patterns)
    renames = dict(diff.renames)
    old_opt = renamed_optimizer(old_opt, lambda key: renames.get(key, key))
    diff.optimizer = diff_optimizers(old_opt, new_opt)
    if old_opt is not None and new_opt is not None:
        reshaped = {c.key for c in diff.changed if c.attribute == "shape"}
        shapes_now = {t.key: t.shape for t in actual.tensors}
        diff.optimizer_verdict = optimizer_verdict(old_opt, new_opt, reshaped, shapes_now)
    if actual.optimizer is not None:
        diff.problems = list(actual.optimizer.problems)


def _inner_versions(schema: Schema, prefix: str) -> Schema:
    """The versions of the wrapped model alone: the wrapper's own modules are not compared."""
    if schema.versions is None:
        return schema
    inner = prefix.removesuffix(".")
    return replace(
        schema,
        versions={m: v for m, v in schema.versions.items() if m == inner or m.startswith(prefix)},
    )


def _entry_changes(e: TensorEntry, a: TensorEntry, tolerance: Tolerance | None) -> list[Change]:
    """One key's changes: its attributes in a fixed order, then its values."""
    changes = [
        Change(e.key, name, getattr(e, name), getattr(a, name))
        for name in ATTRIBUTES
        if getattr(e, name) != getattr(a, name)
        # a bare state_dict knows neither kinds nor requires_grad: not a difference
        and not (name == "requires_grad" and None in (e.requires_grad, a.requires_grad))
        and not (name == "kind" and same_kind(e.kind, a.kind))
    ]
    if e.fingerprint is None and a.fingerprint is None:
        return changes
    if (e.fingerprint is None) != (a.fingerprint is None):
        side = "expected" if e.fingerprint is not None else "actual"
        changes.append(Change(e.key, "values", f"recorded on the {side} side only", None))
    elif any(c.attribute in ("shape", "dtype") for c in changes):
        pass  # values of a reshaped or retyped tensor cannot match; the shape says enough
    else:
        assert e.fingerprint is not None and a.fingerprint is not None
        changes.extend(_value_changes(e, a, e.fingerprint, a.fingerprint, tolerance))
    return changes


def _value_changes(
    e: TensorEntry,
    a: TensorEntry,
    ef: Fingerprint,
    af: Fingerprint,
    tolerance: Tolerance | None,
) -> list[Change]:
    """A key's values: within ``tolerance`` by their statistics, else exactly by hash."""
    if tolerance is not None:
        bad = af.close_to(ef, tolerance.rtol, tolerance.atol)
        if not bad:
            return []
        excess = af.tolerance_excess(ef, tolerance.rtol, tolerance.atol)
        moved = f"{excess:.3g}x the tolerance: " if math.isfinite(excess) else ""
        return [Change(e.key, "values", tolerance.describe(), moved + "; ".join(bad), excess)]
    if ef == af:
        return []
    shape, dtype = e.shape or (), e.dtype or ""
    found = "; ".join(
        [
            f"xxh3 {af.xxh3[:12]} mean {af.mean:.6g}",
            *_where_values_changed(ef, af, shape, dtype),
            _how_values_changed(ef, af, shape, dtype),
        ]
    )
    return [Change(e.key, "values", f"xxh3 {ef.xxh3[:12]} mean {ef.mean:.6g}", found)]


def _where_values_changed(
    e: Fingerprint, a: Fingerprint, shape: tuple[int, ...], dtype: str
) -> list[str]:
    """The first block whose running digest differs, in elements and rows, with its mean
    on both sides, and the later blocks whose means differ.

    Blocks before the first are proven unchanged; from it on every running digest differs,
    so a later block is known changed only by its mean. Nothing when a side has no blocks
    (a snapshot written before them): the hash alone then says that values changed.
    """
    ranges = Fingerprint.block_ranges(shape)
    if not e.blocks or len(e.blocks) != len(a.blocks) or len(ranges) != len(e.blocks):
        return []
    first = next(
        (i for i, (x, y) in enumerate(zip(e.blocks, a.blocks, strict=True)) if x != y), None
    )
    if first is None:
        return []  # the 8-digit digests collided, or a hand-edited snapshot
    span = _span(ranges[first], shape)
    if first == len(ranges) - 1:
        where = [f"changed only in {span}" + (", all before unchanged" if first else "")]
    elif first == 0:
        where = [f"first change in {span}"]
    else:
        where = [f"first change in {span}, none in elements 0-{ranges[first][0] - 1}"]
    if len(e.block_means) == len(a.block_means) == len(ranges):
        means = [(_short(x), _short(y)) for x, y in zip(e.block_means, a.block_means, strict=True)]
        label = "sampled block mean" if _sampled(shape, dtype) else "block mean"
        where.append("{} {} -> {}".format(label, *means[first]))
        later = [
            _span(ranges[i], shape) for i in range(first + 1, len(ranges)) if _differ(*means[i])
        ]
        if later:
            where.append("block means differ too in " + ", ".join(later))
    return where


def _span(block: tuple[int, int], shape: tuple[int, ...]) -> str:
    """``elements 768-1023 (rows 12-15 of [64, 64])``: a block in flat elements and rows."""
    start, end = block
    span = f"element {start}" if end - start == 1 else f"elements {start}-{end - 1}"
    if len(shape) >= 2 and shape[0]:
        row = math.prod(shape) // shape[0]
        r0, r1 = start // row, (end - 1) // row
        span += (f" (row {r0}" if r0 == r1 else f" (rows {r0}-{r1}") + f" of {list(shape)})"
    return span


def _short(x: float) -> str:
    return f"{x:.6g}"  # as a snapshot keeps a block mean


def _differ(x: str, y: str) -> bool:
    return x != y and not (x == y == "nan")


def _sampled(shape: tuple[int, ...], dtype: str) -> bool:
    """Whether the statistics read a sample, not every number (a complex element is two)."""
    return math.prod(shape) * (2 if dtype.startswith("complex") else 1) > Fingerprint.SAMPLE


def _how_values_changed(e: Fingerprint, a: Fingerprint, shape: tuple[int, ...], dtype: str) -> str:
    """What the statistics and the sample's hashes tell of the change.

    Floating-point values can differ in bits and not as numbers (-0.0 and 0.0, two NaN
    payloads): no statistic shows that, the sample's hashes do. A change outside the
    sample of a big tensor leaves them, and likely the statistics, as they were.
    """
    sampled = _sampled(shape, dtype)
    if e.sample_numbers is not None and a.sample_numbers is not None:
        if sampled and e.sample_bits is not None and e.sample_bits == a.sample_bits:
            return (
                f"the change lies outside the {Fingerprint.SAMPLE} sampled elements, "
                "so no statistic shows it"
            )
        if e.sample_numbers == a.sample_numbers and (not sampled or e.sample_bits is not None):
            if e.sample_signs is not None and e.sample_signs == a.sample_signs:
                kind = "a NaN payload"
            else:
                kind = "a signed zero (-0.0 vs 0.0)"
            scope = " in the sampled elements" if sampled else ""
            return f"values equal as numbers but their bits differ{scope}: {kind}"
    moved = [m for m in a.close_to(e, rtol=0.0, atol=0.0) if not m.startswith("mean")]
    return ", ".join(moved) if moved else "min, max and std unchanged"


def _moved(exp: list[str], act: list[str]) -> list[tuple[str, int, int]]:
    """Common keys whose relative order changed (optimizer state is matched by position)."""
    common = set(exp) & set(act)
    old = [k for k in exp if k in common]
    new = [k for k in act if k in common]
    if old == new:
        return []
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    stayed = {
        k for block in matcher.get_matching_blocks() for k in old[block.a : block.a + block.size]
    }
    position = {k: i for i, k in enumerate(new)}
    return [(k, i, position[k]) for i, k in enumerate(old) if k not in stayed and i != position[k]]


# ---- optimizer ---------------------------------------------------------------------------
