"""Diff two schemas: every difference at once, grouped, with the verdict a reviewer needs.

The diff is structured (:class:`SchemaDiff`); :mod:`.report` turns it into words. Keys are
compared in a fixed order of attributes (kind, shape, dtype, layout, qscheme,
requires_grad, tying, values), as ``torch.testing`` does, but nothing stops at the first
mismatch.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import StateDictError, hide_from_bad_input
from .schema import Fingerprint, ModuleVersion, OptimizerSchema, Schema, StateSpec, TensorEntry

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

Rename = Mapping[str, str] | Callable[[str], str] | Sequence[tuple[str, str]] | None

# Wrapper prefixes that DataParallel / DDP / torch.compile / Lightning add to every key.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")

# The class of an optimizer known only by its state_dict (a checkpoint file).
UNKNOWN_CLASS = "unknown"

TENSOR_KIND, OBJECT_KIND = "tensor", "object"

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
class OptimizerVerdict:
    """Would yesterday's optimizer state load into today's optimizer, and resume exactly?

    ``optimizer.load_state_dict`` checks only the number of param_groups and each group's
    size; it then hands the saved state to today's parameters by position, whatever they
    are called. ``loads`` says whether it raises; ``exact`` whether every state lands on the
    parameter it was saved for (None: one side has no parameter names, so only positions
    are known); ``reasons`` say why not.
    """

    loads: bool
    exact: bool | None
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoadCheck:
    """How a live model answered the strict-load question, filled in by a caller that has it.

    The layouts alone cannot see a model's own conversion (a ``_load_from_state_dict``
    keyed on ``_version``, a load pre-hook): the caller loads the expected layout through
    the model's ``load_state_dict`` on a meta copy, as the refactor gate does. ``loads``
    is None when that could not be done (``reason`` says why) and the layouts decide;
    otherwise ``reason`` says what the real load refused.
    """

    model: str  # the model's class name
    loads: bool | None
    reason: str = ""
    # whose loader answered: the model's own load_state_dict, or transformers' from_pretrained
    # rules for a PreTrainedModel (hf_rules)
    loader: str = "load_state_dict"


@dataclass
class SchemaDiff:
    """Everything that differs between an expected and an actual schema."""

    removed: list[TensorEntry] = field(default_factory=list)
    added: list[TensorEntry] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    renames: list[tuple[str, str]] = field(default_factory=list)  # (expected key, actual key)
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
    load_check: LoadCheck | None = None
    notes: list[str] = field(default_factory=list)

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
        real load through the model (``load_check``) outranks the layouts.
        """
        if self.load_check is not None and self.load_check.loads is not None:
            return self.load_check.loads
        return self.layouts_load_strict

    @property
    def layouts_load_strict(self) -> bool:
        """The strict-load verdict the two layouts give, with no model to ask."""
        return not (self.removed or self.added or self.shape_mismatches or self.prefix)


def compile_rename(rename: Rename) -> Callable[[str], str] | None:
    """A key mapping from a dict (exact keys), a callable, or ``[(regex, replacement), ...]``."""
    if rename is None:
        return None
    if callable(rename):
        return rename
    if isinstance(rename, Mapping):
        table = dict(rename)
        return lambda key: table.get(key, key)
    rules = [(re.compile(pattern), replacement) for pattern, replacement in rename]

    def apply(key: str) -> str:
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        return key

    return apply


def normalise(
    schema: Schema,
    *,
    rename: Callable[[str], str] | None = None,
    ignore: Iterable[str] = (),
) -> Schema:
    """Apply ``rename`` to keys, then drop keys matching ``ignore`` globs.

    What is named after a key follows its rename: ``tied_to``, the non-persistent buffers,
    the optimizer's members and state, and the module versions (a module is renamed as its
    keys are, and its version dropped when all its keys are ignored), so that a ``rename=``
    that maps one layout onto another leaves nothing behind to report. A tie keeps naming
    its target even when that key is ignored (an untied weight is still news). Ignored
    optimizer members stay: a side that counts members by position cannot drop them, so
    :func:`diff_schemas` drops them where both sides name them (and
    :func:`without_ignored_members` before a snapshot is written).
    """
    patterns = tuple(ignore)
    if rename is None and not patterns:
        return schema
    renamed = rename or str

    names = {t.key: _checked_name(renamed(t.key), t.key) for t in schema.tensors}
    kept = {key: new for key, new in names.items() if not _matches(new, patterns)}
    _refuse_collisions(kept)
    tensors = tuple(
        replace(t, key=kept[t.key], tied_to=renamed(t.tied_to) if t.tied_to else None)
        for t in schema.tensors
        if t.key in kept
    )
    npb = tuple(n for n in map(renamed, schema.non_persistent_buffers) if not _matches(n, patterns))
    versions = (
        None if schema.versions is None else _renamed_versions(schema.versions, kept, patterns)
    )
    optimizer = None if schema.optimizer is None else renamed_optimizer(schema.optimizer, renamed)
    return replace(
        schema,
        tensors=tensors,
        non_persistent_buffers=npb,
        versions=versions,
        optimizer=optimizer,
    )


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _checked_name(new: object, key: str) -> str:
    if not isinstance(new, str):
        raise StateDictError(
            f"rename= (or a pytest_statedict_normalize_key hook) gave {new!r} for key "
            f"{key!r}: it must return the key's new name, a str"
        )
    return new


def _refuse_collisions(kept: Mapping[str, str]) -> None:
    """Two kept keys under one name: one of them would silently go unchecked."""
    seen: dict[str, str] = {}
    for key, new in kept.items():
        if new in seen:
            raise StateDictError(
                f"rename= (or a pytest_statedict_normalize_key hook) maps both {seen[new]!r} "
                f"and {key!r} to {new!r}: one of them would silently go unchecked"
            )
        seen[new] = key


def _renamed_versions(
    versions: Mapping[str, ModuleVersion], kept: Mapping[str, str], patterns: tuple[str, ...]
) -> dict[str, ModuleVersion]:
    """Module versions under the new key names.

    A module ``P`` becomes ``Q`` when every kept key below it, ``P.<rest>``, became
    ``Q.<rest>``, and keeps its name when they went different ways. A module whose keys
    were all ignored is dropped; one without keys (a versioned activation, say) moves with
    its nearest ancestor that has kept keys, and is dropped when ``ignore`` covers it.
    """
    below: dict[str, list[str]] = {"": list(kept)}  # module -> the kept keys below it
    for key in kept:
        parts = key.split(".")
        for i in range(1, len(parts)):
            below.setdefault(".".join(parts[:i]), []).append(key)
    out: dict[str, ModuleVersion] = {}
    for module, version in versions.items():
        if module and module not in below:  # no kept keys below it
            parent = _nearest_with_keys(module, below)
            moved = _moved_module(parent, below[parent], kept) if parent is not None else None
            new = module if moved is None else _below(moved, _relative(module, parent))
            if _matches(f"{new}.", patterns) or _matches(f"{module}.", patterns):
                continue
            out[new] = version
            continue
        moved = _moved_module(module, below[module], kept)
        out[module if moved is None else moved] = version
    return out


def _nearest_with_keys(module: str, below: Mapping[str, list[str]]) -> str | None:
    """The closest enclosing module (the root ``""`` last) that has kept keys."""
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if below.get(".".join(parts[:i])):
            return ".".join(parts[:i])
    return None


def _relative(module: str, parent: str) -> str:
    """``module``'s name within ``parent`` (``""`` being the root)."""
    return module[len(parent) + 1 :] if parent else module


def _below(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _moved_module(module: str, keys: list[str], kept: Mapping[str, str]) -> str | None:
    """The module's new name if all its keys moved together, else None."""
    pairs = [(_relative(key, module), kept[key]) for key in keys]
    heads = {new[: len(new) - len(rest)] for rest, new in pairs if new.endswith(rest)}
    if len(heads) == 1 and all(new.endswith(rest) for rest, new in pairs):
        head = heads.pop()
        if head == "" or head.endswith("."):
            return head.removesuffix(".")
    return None


def without_ignored_members(schema: Schema, ignore: Iterable[str]) -> Schema:
    """The schema with its optimizer's ignored named members left out: what a snapshot keeps."""
    patterns = tuple(ignore)
    if not patterns or schema.optimizer is None:
        return schema
    return replace(schema, optimizer=_without_members(schema.optimizer, patterns))


def _without_members(opt: OptimizerSchema, patterns: tuple[str, ...]) -> OptimizerSchema:
    """The optimizer without the named members (and their state) that match ``patterns``."""

    def keep(p: str | int) -> bool:
        return not (isinstance(p, str) and _matches(p, patterns))

    return replace(
        opt,
        param_groups=tuple(
            replace(g, params=tuple(p for p in g.params if keep(p))) for g in opt.param_groups
        ),
        state=tuple(s for s in opt.state if keep(s.param)),
    )


def diff_schemas(
    expected: Schema,
    actual: Schema,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    ignore: Iterable[str] = (),
) -> SchemaDiff:
    """Everything that differs; ``ignore`` (globs) drops optimizer members both sides name.

    The keys themselves are expected to have gone through :func:`normalise` already.
    """
    diff = SchemaDiff(
        expected_saved_on=expected.saved_on,
        actual_saved_on=actual.saved_on,
    )
    diff.prefix = _detect_prefix([t.key for t in expected], [t.key for t in actual])
    if diff.prefix is not None:  # compare the wrapped model, not the wrapper's names
        how, prefix = diff.prefix

        def unwrap(key: str) -> str:
            return key.removeprefix(prefix)

        if how == "added":
            actual = normalise(_inner_versions(actual, prefix), rename=unwrap)
        else:
            expected = normalise(_inner_versions(expected, prefix), rename=unwrap)
    exp, act = expected.by_key(), actual.by_key()

    diff.removed = [t for k, t in exp.items() if k not in act]
    diff.added = [t for k, t in act.items() if k not in exp]
    diff.renames = _likely_renames(diff.removed, diff.added)
    tolerant = rtol is not None or atol is not None
    for key, e in exp.items():
        a = act.get(key)
        if a is not None:
            diff.changed.extend(_entry_changes(e, a, tolerant, rtol or 0.0, atol or 0.0))
    if tolerant and sum(c.excess is not None for c in diff.changed) > 1:
        # the values furthest outside the tolerance first: a report shows only the first
        # lines of a long list, and the change that matters is the largest, not the first key
        diff.changed.sort(key=lambda c: (c.excess is not None, -(c.excess or 0.0)))
        diff.notes.append(
            "values outside rtol/atol are listed furthest first, by how many times the "
            "tolerance (atol + rtol * max(|min|, |max|) of the expected values) their "
            "furthest statistic (min, max, mean or std) moved"
        )
    if expected.ordered and actual.ordered:
        diff.moved = _moved(list(exp), list(act))

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
        if old_t != new_t:
            diff.extras.append(f"{name}: {old_t or 'absent'} -> {new_t or 'absent'}")
    old_opt, new_opt = expected.optimizer, actual.optimizer
    patterns = tuple(ignore)
    if patterns and old_opt and new_opt and _uses_names(old_opt) and _uses_names(new_opt):
        old_opt, new_opt = _without_members(old_opt, patterns), _without_members(new_opt, patterns)
    renames = dict(diff.renames)
    old_opt = renamed_optimizer(old_opt, lambda key: renames.get(key, key))
    diff.optimizer = diff_optimizers(old_opt, new_opt)
    if old_opt is not None and new_opt is not None:
        reshaped = {c.key for c in diff.changed if c.attribute == "shape"}
        diff.optimizer_verdict = optimizer_verdict(old_opt, new_opt, reshaped)
    if actual.optimizer is not None:
        diff.problems = list(actual.optimizer.problems)
    return diff


def _inner_versions(schema: Schema, prefix: str) -> Schema:
    """The versions of the wrapped model alone: the wrapper's own modules are not compared."""
    if schema.versions is None:
        return schema
    inner = prefix.removesuffix(".")
    return replace(
        schema,
        versions={m: v for m, v in schema.versions.items() if m == inner or m.startswith(prefix)},
    )


def _detect_prefix(exp: list[str], act: list[str]) -> tuple[str, str] | None:
    """A prefix added to (or dropped from) every key: DataParallel, torch.compile, ...

    Compared in sorted order (a common prefix keeps it), so a side whose order means
    nothing (a ``.safetensors`` header) is recognised too.
    """
    if not exp or not act or len(exp) != len(act):
        return None
    exp, act = sorted(exp), sorted(act)
    for how, longer, shorter in (("added", act, exp), ("dropped", exp, act)):
        first_long, first_short = longer[0], shorter[0]
        if not first_long.endswith(first_short) or first_long == first_short:
            continue
        prefix = first_long[: len(first_long) - len(first_short)]
        if all(a == prefix + b for a, b in zip(longer, shorter, strict=True)):
            return how, prefix
    return None


def _likely_renames(removed: list[TensorEntry], added: list[TensorEntry]) -> list[tuple[str, str]]:
    """Pair removed and added keys of equal kind, shape and dtype, most similar names first."""
    candidates = sorted(
        (
            (-difflib.SequenceMatcher(None, r.key, a.key).ratio(), i, j)
            for i, r in enumerate(removed)
            for j, a in enumerate(added)
            if (r.shape, r.dtype, r.type) == (a.shape, a.dtype, a.type)
            and _same_kind(r.kind, a.kind)
        ),
    )
    used_r: set[int] = set()
    used_a: set[int] = set()
    pairs = []
    for _, i, j in candidates:
        if i in used_r or j in used_a:
            continue
        used_r.add(i)
        used_a.add(j)
        pairs.append((i, removed[i].key, added[j].key))
    return [(old, new) for _, old, new in sorted(pairs)]


def _entry_changes(
    e: TensorEntry, a: TensorEntry, tolerant: bool, rtol: float, atol: float
) -> list[Change]:
    changes = [
        Change(e.key, name, getattr(e, name), getattr(a, name))
        for name in ATTRIBUTES
        if getattr(e, name) != getattr(a, name)
        # a bare state_dict knows neither kinds nor requires_grad: not a difference
        and not (name == "requires_grad" and None in (e.requires_grad, a.requires_grad))
        and not (name == "kind" and _same_kind(e.kind, a.kind))
    ]
    if e.fingerprint is None and a.fingerprint is None:
        return changes
    if (e.fingerprint is None) != (a.fingerprint is None):
        side = "expected" if e.fingerprint is not None else "actual"
        changes.append(Change(e.key, "values", f"recorded on the {side} side only", None))
    elif any(c.attribute in ("shape", "dtype") for c in changes):
        pass  # values of a reshaped or retyped tensor cannot match; the shape says enough
    elif tolerant:
        assert e.fingerprint is not None and a.fingerprint is not None
        bad = a.fingerprint.close_to(e.fingerprint, rtol, atol)
        if bad:
            excess = a.fingerprint.tolerance_excess(e.fingerprint, rtol, atol)
            moved = f"{excess:.3g}x the tolerance: " if math.isfinite(excess) else ""
            changes.append(
                Change(
                    e.key,
                    "values",
                    f"rtol={rtol}, atol={atol}",
                    moved + "; ".join(bad),
                    excess,
                )
            )
    elif e.fingerprint != a.fingerprint:
        assert e.fingerprint is not None and a.fingerprint is not None
        ef, af = e.fingerprint, a.fingerprint
        changes.append(
            Change(
                e.key,
                "values",
                f"xxh3 {ef.xxh3[:12]} mean {ef.mean:.6g}",
                "; ".join(
                    [
                        f"xxh3 {af.xxh3[:12]} mean {af.mean:.6g}",
                        *_where_values_changed(ef, af, e.shape or (), e.dtype or ""),
                        _how_values_changed(ef, af, e.shape or (), e.dtype or ""),
                    ]
                ),
            )
        )
    return changes


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


def _same_kind(a: str, b: str) -> bool:
    """Kinds match if equal, or if one side is a bare ``tensor`` (its kind is unknown)."""
    return a == b or (TENSOR_KIND in (a, b) and OBJECT_KIND not in (a, b))


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


def diff_optimizers(expected: OptimizerSchema | None, actual: OptimizerSchema | None) -> list[str]:
    if expected is None and actual is None:
        return []
    if expected is None or actual is None:
        have = expected or actual
        assert have is not None
        side = "expected" if expected is not None else "actual"
        return [f"an optimizer ({have.cls}) on the {side} side only"]
    lines = []
    if expected.cls != actual.cls and UNKNOWN_CLASS not in (expected.cls, actual.cls):
        lines.append(f"class: {expected.cls} -> {actual.cls}")
    exp_groups, act_groups = _comparable_members(expected, actual)
    if len(exp_groups) != len(act_groups):
        lines.append(f"param_groups: {len(exp_groups)} -> {len(act_groups)}")
    order = _group_permutation(exp_groups, act_groups)
    if order is not None:
        moves = ", ".join(f"{i} -> {j}" for i, j in enumerate(order) if i != j)
        lines.append(
            f"param_groups reordered ({moves}): each group kept its parameters and "
            "hyperparameters, but a checkpoint's groups load by position"
        )
        act_groups = [act_groups[j] for j in order]
        actual = replace(actual, param_groups=tuple(actual.param_groups[j] for j in order))
    lines.extend(_membership_lines(expected, actual, exp_groups, act_groups))
    exp_hyper, act_hyper = comparable_hyperparams(expected, actual)
    lines.extend(_deepdiff(exp_hyper, act_hyper, "param_groups"))
    expected, actual = comparable_state(expected, actual)
    same_vocabulary = _uses_names(expected) == _uses_names(actual)
    state_old = {_member(s.param, expected, same_vocabulary): s for s in expected.state}
    state_new = {_member(s.param, actual, same_vocabulary): s for s in actual.state}
    for p in list(state_old) + [p for p in state_new if p not in state_old]:
        old_state, new_state = state_old.get(p), state_new.get(p)
        if old_state is None or new_state is None:
            have = old_state or new_state
            assert have is not None
            what = ", ".join(f"{n} {v.describe()}" for n, v in have.entries.items())
            lines.append(f"state of {p!r}: {'removed' if new_state is None else 'added'} ({what})")
            continue
        for name in list(old_state.entries) + [
            n for n in new_state.entries if n not in old_state.entries
        ]:
            before, after = old_state.entries.get(name), new_state.entries.get(name)
            if before != after:
                lines.append(
                    f"state of {p!r}: {name} {before.describe() if before else 'absent'} -> "
                    f"{after.describe() if after else 'absent'}"
                )
    return lines


def _group_permutation(
    exp_groups: list[list[str | int]], act_groups: list[list[str | int]]
) -> list[int] | None:
    """``order[i]``: today's index of the saved group ``i``, when the groups were only reordered.

    None unless every group is found again, whole, at another index.
    """
    if len(exp_groups) != len(act_groups) or len(exp_groups) < 2:
        return None
    where = {frozenset(g): j for j, g in enumerate(act_groups)}
    if len(where) != len(act_groups):
        return None  # two groups with the same members: which went where is unknowable
    order = [where.get(frozenset(g), -1) for g in exp_groups]
    if -1 in order or order == list(range(len(order))):
        return None
    return order


def _membership_lines(
    expected: OptimizerSchema,
    actual: OptimizerSchema,
    exp_groups: list[list[str | int]],
    act_groups: list[list[str | int]],
) -> list[str]:
    """Parameters that changed group, and groups whose parameters were reordered."""
    lines = []
    where_old = {p: i for i, g in enumerate(exp_groups) for p in g}
    where_new = {p: i for i, g in enumerate(act_groups) for p in g}
    for p in list(where_old) + [p for p in where_new if p not in where_old]:
        old, new = where_old.get(p), where_new.get(p)
        if old != new:
            lines.append(
                f"{p!r}: param_group {_group(old)} -> {_group(new)}"
                + _hyper_note(expected, actual, old, new)
            )
    for i, (old_members, new_members) in enumerate(zip(exp_groups, act_groups, strict=False)):
        if old_members != new_members and sorted(map(str, old_members)) == sorted(
            map(str, new_members)
        ):
            lines.append(
                f"param_group {i}: the order of its parameters changed (state loads by "
                f"position: {_landings(old_members, new_members)})"
            )
    return lines


def _landings(old: Sequence[str | int], new: Sequence[str | int], limit: int = 3) -> str:
    """``'a' <- state of 'b'`` for the first positions where another parameter now sits."""
    moved = [(o, n) for o, n in zip(old, new, strict=False) if o != n]
    text = ", ".join(f"{n!r} <- state of {o!r}" for o, n in moved[:limit])
    return text + (f" and {len(moved) - limit} more" if len(moved) > limit else "")


def optimizer_verdict(
    expected: OptimizerSchema, actual: OptimizerSchema, reshaped: Iterable[str] = ()
) -> OptimizerVerdict:
    """What ``optimizer.load_state_dict(yesterday's state)`` would do today (see the class)."""
    old_sizes = [len(g.params) for g in expected.param_groups]
    new_sizes = [len(g.params) for g in actual.param_groups]
    if len(old_sizes) != len(new_sizes):
        return OptimizerVerdict(
            False,
            False,
            (f"{len(old_sizes)} param_groups saved, {len(new_sizes)} now",),
        )
    sizes = [
        f"param_group {i} has {o} parameters saved and {n} now"
        for i, (o, n) in enumerate(zip(old_sizes, new_sizes, strict=True))
        if o != n
    ]
    if sizes:
        return OptimizerVerdict(False, False, tuple(sizes))
    if _uses_names(expected) != _uses_names(actual):
        return OptimizerVerdict(True, None)
    old = [p for g in expected.param_groups for p in g.params]
    new = [p for g in actual.param_groups for p in g.params]
    reasons = []
    if old != new:
        moved = sum(o != n for o, n in zip(old, new, strict=True))
        reasons.append(
            f"{moved} parameter{'s' * (moved > 1)} would get another one's state "
            f"({_landings(old, new)})"
        )
    # an empty saved state (a fresh optimizer) stands for the state a trained one would have
    with_state = {s.param for s in expected.state} or set(new)
    stale = [
        p for o, p in zip(old, new, strict=True) if o == p and p in reshaped and p in with_state
    ]
    if stale:
        names = ", ".join(map(str, stale[:3])) + (
            f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        )
        reasons.append(
            f"the state saved for {names} would keep the old shape (the next step fails)"
        )
    return OptimizerVerdict(True, not reasons, tuple(reasons))


# Hyperparameters a torch release added to a param_group with a default that keeps the old
# behaviour: a group without the key means the default, so a snapshot written under an
# older torch compares equal under a newer one (and back). A real change of value is still
# reported. Keyed by the optimizer's class name. Read off torch 2.1.2, 2.2.2, 2.3.1, 2.4.1,
# 2.6.0, 2.13.0 and 2.14.1 (tests/test_cross_version.py checks the table against the torch
# it runs on); the release named is the first of those with the key, but for Adam's and
# AdamW's key (absent in 2.6.0, present in 2.13.0; added in 2.7). Flags that only pick
# an implementation (foreach, fused, capturable, differentiable) are never recorded.
ADDED_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "Adam": {"decoupled_weight_decay": False},  # AdamW became Adam with True
    "AdamW": {"decoupled_weight_decay": True},
    "LBFGS": {"maximize": False},  # 2.14
    "NAdam": {"maximize": False},  # 2.4
    "RAdam": {"decoupled_weight_decay": False, "maximize": False},  # 2.2, 2.4
}

# Optimizer state entries an older torch stored as None where a newer one stores nothing:
# SGD without momentum kept ``momentum_buffer: None`` per parameter up to torch 2.3. A None
# entry holds no data, so it compares equal to an absent one; a tensor entry still counts.
EMPTY_STATE_ENTRIES: dict[str, frozenset[str]] = {
    "SGD": frozenset({"momentum_buffer"}),
}

# Optimizer state entries an older torch stored as a Python number where a newer one stores
# a scalar tensor of the same value: ``step`` of these optimizers was an int up to torch 2.3
# and is a float32 tensor since 2.4 (``load_state_dict`` converts the old form). The old
# form compares as the new one; any other dtype or shape is still reported.
RETYPED_STATE_ENTRIES: dict[str, dict[str, tuple[str, StateSpec]]] = {
    name: {"step": ("int", StateSpec(shape=(), dtype="float32"))}
    for name in ("Adadelta", "RMSprop", "Rprop")
}


def _optimizer_name(expected: OptimizerSchema, actual: OptimizerSchema) -> str:
    """The optimizer's class name, from whichever side knows it (a checkpoint file does not)."""
    cls = expected.cls if expected.cls != UNKNOWN_CLASS else actual.cls
    return cls.rsplit(".", 1)[-1]


def comparable_state(
    expected: OptimizerSchema, actual: OptimizerSchema
) -> tuple[OptimizerSchema, OptimizerSchema]:
    """Both sides' state as the newest torch writes it (``EMPTY_STATE_ENTRIES``,
    ``RETYPED_STATE_ENTRIES``); a parameter left with no entry has no state at all."""
    name = _optimizer_name(expected, actual)
    empty = EMPTY_STATE_ENTRIES.get(name, frozenset())
    retyped = RETYPED_STATE_ENTRIES.get(name, {})
    if not empty and not retyped:
        return expected, actual

    def current(entry: str, spec: StateSpec) -> StateSpec:
        old_type, new = retyped.get(entry, (None, spec))
        return new if spec.type == old_type else spec

    def kept(opt: OptimizerSchema) -> OptimizerSchema:
        state = []
        for s in opt.state:
            entries = {
                n: current(n, v)
                for n, v in s.entries.items()
                if not (n in empty and v.type == "NoneType")
            }
            if entries:
                state.append(replace(s, entries=entries))
        return replace(opt, state=tuple(state))

    return kept(expected), kept(actual)


def comparable_hyperparams(
    expected: OptimizerSchema, actual: OptimizerSchema
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both sides' hyperparameters, without keys one torch release has and another lacks.

    A key present on one side only is dropped when its value is the default the release
    that added it gave it (``ADDED_HYPERPARAMS``) for that optimizer class; the class is
    taken from whichever side knows it (a checkpoint file does not).
    """
    defaults = ADDED_HYPERPARAMS.get(_optimizer_name(expected, actual), {})
    old = [dict(g.hyperparams) for g in expected.param_groups]
    new = [dict(g.hyperparams) for g in actual.param_groups]
    for before, after in zip(old, new, strict=False):
        for key, default in defaults.items():
            if (key in before) != (key in after):
                side = before if key in before else after
                if side[key] == default and type(side[key]) is type(default):
                    del side[key]
    return old, new


def renamed_optimizer(
    opt: OptimizerSchema | None, rename: Callable[[str], str]
) -> OptimizerSchema | None:
    """The optimizer with its parameter names mapped, so renames are not reported twice."""
    if opt is None:
        return None

    def member(p: str | int) -> str | int:
        return rename(p) if isinstance(p, str) else p

    return replace(
        opt,
        param_groups=tuple(
            replace(g, params=tuple(member(p) for p in g.params)) for g in opt.param_groups
        ),
        state=tuple(replace(s, param=member(s.param)) for s in opt.state),
    )


def _group(index: int | None) -> str:
    return "none" if index is None else str(index)


def _hyper_note(
    expected: OptimizerSchema, actual: OptimizerSchema, old: int | None, new: int | None
) -> str:
    if old is None or new is None:
        return ""
    before, after = expected.param_groups[old].hyperparams, actual.param_groups[new].hyperparams
    changed = [
        f"{k} {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    ]
    return f" ({', '.join(changed)})" if changed else ""


def _uses_names(opt: OptimizerSchema) -> bool:
    return any(isinstance(p, str) for g in opt.param_groups for p in g.params)


def _member(param: str | int, opt: OptimizerSchema, same_vocabulary: bool) -> str | int:
    """A state entry's parameter, by name, or by position when one side has no names."""
    if same_vocabulary:
        return param
    members = [p for g in opt.param_groups for p in g.params]
    return members.index(param) if param in members else param


def _comparable_members(
    expected: OptimizerSchema, actual: OptimizerSchema
) -> tuple[list[list[str | int]], list[list[str | int]]]:
    """Group members on both sides in one vocabulary: names if both have them, else positions."""
    if _uses_names(expected) == _uses_names(actual):
        return [list(g.params) for g in expected.param_groups], [
            list(g.params) for g in actual.param_groups
        ]

    def positions(opt: OptimizerSchema) -> list[list[str | int]]:
        out: list[list[str | int]] = []
        index = 0
        for g in opt.param_groups:
            out.append(list(range(index, index + len(g.params))))
            index += len(g.params)
        return out

    return positions(expected), positions(actual)


def _deepdiff(expected: Any, actual: Any, root: str) -> list[str]:
    from deepdiff import DeepDiff

    found = DeepDiff(expected, actual, ignore_order=False, verbose_level=2)
    if not found:
        return []
    return [
        line.replace("root", root, 1).rstrip(".")
        for line in found.pretty().splitlines()
        if line.strip()
    ]
