"""Words for a :class:`SchemaDiff`: grouped, bounded, with the verdict and the way out."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .compare import ModelVerdict, SchemaDiff
from .optimizer_diff import OptimizerVerdict
from .printable import printable
from .schema_entries import TensorEntry

# Lines shown per section before "... and N more" (all of them under ``-vv``).
SECTION_LIMIT = 12


def render_diff(
    diff: SchemaDiff,
    *,
    title: str,
    verbose: bool = False,
    accept_hint: str | None = None,
    rename_direction: str = "actual->expected",
) -> str:
    """The report of a mismatch: what was removed, added, changed, and what to do."""
    limit = None if verbose else SECTION_LIMIT
    out = [title]
    if diff.prefix:
        out.append(_prefix_line(diff.prefix, rename_direction))
    for heading, lines in _sections(diff):
        out.extend(_section(heading, lines, limit))
    out.extend(f"  note: {note}" for note in diff.notes)
    if diff.renames:
        out.append(
            f"  suggested: {suggest_rename(diff.renames, rename_direction, diff)} "
            f"({RENAME_DIRECTION[rename_direction]})"
        )
    out.append("  " + load_verdict(diff))
    if diff.optimizer_verdict is not None:
        out.append("  " + optimizer_load_verdict(diff.optimizer_verdict))
    for side, where in (("expected", diff.expected_saved_on), ("actual", diff.actual_saved_on)):
        if any(loc != "cpu" for loc in where):
            out.append(f"  the {side} checkpoint was saved on {', '.join(map(printable, where))}")
    if accept_hint:
        out.append(f"  to accept this change: {accept_hint}")
    return "\n".join(out)


# What a suggested ``rename=`` maps, said beside it: the snapshot check's and
# ``assert_state_dict_matches``' rename= applies to today's keys (compared under the old
# names), ``assert_checkpoint_loads``' to the checkpoint's (loaded under today's), so the
# same change is suggested in opposite directions and each says which.
RENAME_DIRECTION = {
    "actual->expected": "rename= here maps today's keys to the old names; "
    "assert_checkpoint_loads' rename= maps the other way",
    "expected->actual": "for assert_checkpoint_loads, whose rename= maps the checkpoint's "
    "keys to today's",
}


def _prefix_line(prefix: tuple[str, str], rename_direction: str) -> str:
    how, added = prefix
    fix = (
        f"strip it with rename=[({regex_literal('^' + re.escape(added))}, '')]"
        if (how == "added") == (rename_direction == "actual->expected")
        else f"add it with rename=[(r'^', {added!r})]"
    )
    return (
        f"  every key has the prefix {added!r} {how} (a wrapper: DataParallel/DDP "
        f"'module.', torch.compile '_orig_mod.'); {fix} ({RENAME_DIRECTION[rename_direction]})"
    )


def _sections(diff: SchemaDiff) -> list[tuple[str, list[str]]]:
    """The report's sections in order, each a heading and its lines (empty ones are left out)."""
    renamed_old = {old for old, _ in diff.renames}
    renamed_new = {new for _, new in diff.renames}
    by_key = {t.key: t for t in diff.removed}
    gone, new_npb = diff.non_persistent
    return [
        (
            "removed",
            [f"- {entry_line(t)}" for t in diff.removed if t.key not in renamed_old],
        ),
        ("added", [f"+ {entry_line(t)}" for t in diff.added if t.key not in renamed_new]),
        (
            "likely renamed (same shape and dtype)",
            [
                f"{printable(old)} -> {entry_line(by_key[old], key=new)}"
                for old, new in diff.renames
            ],
        ),
        (AMBIGUOUS_RENAMES, ambiguous_rename_lines(diff)),
        ("changed", [_change_line(c) for c in diff.changed]),
        (
            "moved (state_dict order; optimizer state follows parameter order)",
            [f"{printable(key)}: position {old} -> {new}" for key, old, new in diff.moved],
        ),
        (
            "module versions (_metadata; a _load_from_state_dict may convert old checkpoints)",
            [
                f"{printable(prefix) or '<root>'}: version {printable(old)} -> {printable(new)}"
                for prefix, old, new in diff.versions
            ],
        ),
        (
            "non-persistent buffers (not in the state_dict)",
            [f"- {printable(k)}" for k in gone] + [f"+ {printable(k)}" for k in new_npb],
        ),
        ("checkpoint entries", list(diff.extras)),
        ("optimizer", list(diff.optimizer)),
        ("optimizer state problems", list(diff.problems)),
    ]


def _section(heading: str, lines: Sequence[str], limit: int | None) -> list[str]:
    """``heading (n):`` and its lines, the first ``limit`` of them (all under ``-vv``)."""
    if not lines:
        return []
    shown = lines if limit is None else lines[:limit]
    out = [f"  {heading} ({len(lines)}):", *(f"    {line}" for line in shown)]
    if len(shown) < len(lines):
        out.append(f"    ... and {len(lines) - len(shown)} more (-vv shows all)")
    return out


def entry_line(entry: TensorEntry, key: str | None = None) -> str:
    """``key  parameter float32[6, 3]``: a key (``entry``'s own unless given) and what it
    holds, each name in it escaped (:func:`~.printable.printable`)."""
    return f"{printable(entry.key if key is None else key)}  {describe(entry)}"


def describe(entry: TensorEntry) -> str:
    """``entry.describe()`` with the names a file gave it escaped: the key it is tied to,
    an object's type, a dtype, layout or qscheme a file wrote as it pleased."""
    text = entry.describe()
    if text.isprintable() and "\\" not in text:  # nothing to escape: most entries
        return text

    def shown(name: str | None) -> str | None:
        return None if name is None else printable(name)

    return replace(
        entry,
        tied_to=shown(entry.tied_to),
        type=shown(entry.type),
        dtype=shown(entry.dtype),
        layout=shown(entry.layout),
        qscheme=shown(entry.qscheme),
    ).describe()


def _change_line(change: object) -> str:
    key, attribute = printable(change.key), change.attribute  # type: ignore[attr-defined]
    old, new = change.expected, change.actual  # type: ignore[attr-defined]
    if attribute == "values":
        if new is None:
            return f"~ {key}: values {old}"
        return f"~ {key}: values {old} -> {new}"
    if attribute == "compare":  # a custom comparison's own words, and who said them
        return f"~ {key}: {new} ({old})"
    if attribute == "shape":
        old, new = list(old or ()), list(new or ())
    if attribute == "tied_to":
        attribute = "tying"
        old = f"tied to {printable(old)}" if old else "untied"
        new = f"tied to {printable(new)}" if new else "untied"
    elif isinstance(old, str) or isinstance(new, str):  # a type, dtype... a file wrote
        old, new = (None if v is None else printable(v) for v in (old, new))
    return f"~ {key}: {attribute} {old} -> {new}"


# The heading of the renames the pairing could not decide (rename_pairing).
AMBIGUOUS_RENAMES = "renamed, but to which is ambiguous (not in the suggested rename=)"


def ambiguous_rename_lines(diff: SchemaDiff) -> list[str]:
    """``old -> one of a, b``: a module or key that may have become several others."""
    return [
        f"{printable(old)} -> one of {', '.join(map(printable, alts))}"
        for old, alts in diff.ambiguous_renames
    ]


def suggest_rename(
    renames: Sequence[tuple[str, str]], direction: str, diff: SchemaDiff | None = None
) -> str:
    """A ``rename=`` for the renames found: one regex when they share a prefix change that
    touches no other key of the side it maps (``diff``'s: its common keys, and the removed
    or added ones not renamed), else a mapping of each key."""
    pairs = [(new, old) if direction == "actual->expected" else (old, new) for old, new in renames]
    prefixes = {_prefix_change(src, dst) for src, dst in pairs}
    if len(prefixes) == 1 and None not in prefixes:
        (src_prefix, dst_prefix) = next(iter(prefixes))  # type: ignore[misc]
        if diff is None or not _other_keys_under(src_prefix, pairs, diff, direction):
            return f"rename=[({regex_literal('^' + re.escape(src_prefix))}, {dst_prefix!r})]"
    mapping = ", ".join(f"{src!r}: {dst!r}" for src, dst in pairs)
    return f"rename={{{mapping}}}"


def _other_keys_under(
    prefix: str, pairs: list[tuple[str, str]], diff: SchemaDiff, direction: str
) -> bool:
    """Whether a key the rename should leave alone starts with ``prefix``."""
    renamed = {src for src, _ in pairs}
    own = diff.added if direction == "actual->expected" else diff.removed
    keys = [*diff.common, *(t.key for t in own)]
    return any(key.startswith(prefix) and key not in renamed for key in keys)


def regex_literal(pattern: str) -> str:
    """``r'...'`` where that spells the pattern (readable), else its ``repr`` (a quote in
    it, or a character that does not print as itself: the ``repr`` escapes it)."""
    if "'" in pattern or pattern.endswith("\\") or not pattern.isprintable():
        return repr(pattern)
    return f"r'{pattern}'"


def _prefix_change(src: str, dst: str) -> tuple[str, str] | None:
    """The (old prefix, new prefix) that turns src into dst, split at a '.' boundary."""
    i = 0
    while i < min(len(src), len(dst)) and src[-1 - i] == dst[-1 - i]:
        i += 1
    suffix = src[len(src) - i :]
    if "." not in suffix:
        return None
    suffix = suffix[suffix.index(".") :]
    return src[: len(src) - len(suffix)] + ".", dst[: len(dst) - len(suffix)] + "."


def load_verdict(diff: SchemaDiff) -> str:
    """Would a checkpoint of the expected layout load, and how that is known: the one line
    every surface prints for the model's half of the verdict.

    A real load through today's model (``diff.model_verdict``) decides whenever there was
    one, with the deciding loader's own counts (transformers' for a ``PreTrainedModel``;
    torch's own hooks fill in what they fill in); the layouts decide only where no model
    could be asked (a file against a file), and the line says so.
    """
    check = diff.model_verdict
    if check is not None and check.loads is not None:
        return model_verdict_line(check, diff)
    head = "an old checkpoint still loads with load_state_dict(strict=True)"
    fallback = None
    if check is not None:
        fallback = f"decided from the layouts: {check.reason}"
    if diff.layouts_load_strict:
        note = _layout_note(diff)
        if fallback:
            note = f"{note} ({fallback})"
        return f"{head}: yes{note}"
    reasons = []
    if diff.prefix:
        reasons.append(f"every key's prefix {diff.prefix[1]!r} {diff.prefix[0]}")
    reasons += load_refusals(len(diff.removed), len(diff.added), len(diff.shape_mismatches))
    if fallback:
        reasons.append(fallback)
    return f"{head}: NO ({', '.join(reasons)})"


def model_verdict_line(check: ModelVerdict, diff: SchemaDiff | None = None) -> str:
    """The verdict of a real load; where it disagrees with the layouts (``diff``), who decided.

    The same model, the same checkpoint and the same loader give the same line on every
    surface, whatever else each one reports.
    """
    if check.by_transformers:
        head = "an old checkpoint still loads with from_pretrained"
        through = f"by {check.loader} for {check.model}"
        why = "its tied keys, keys to ignore and checkpoint conversions accept the old layout"
    elif check.by_peft:
        head = f"an old adapter still loads with {check.loader}"
        through = f"by PEFT's key mapping for {check.model}"
        why = "an adapter holds no base-model weights, and names no adapter in its keys"
    else:
        head = f"an old checkpoint still loads with {check.loader}"
        through = f"through {check.model}'s own load_state_dict"
        why = "its load hooks convert the old layout"
    layouts = check.layouts_load
    if layouts is None and diff is not None:
        layouts = diff.layouts_load_strict
    if check.loads:
        if layouts is False:
            return f"{head}: yes, {through} ({why})"
        note = _layout_note(diff) if diff is not None else ""
        return f"{head}: yes{note}" + "".join(f"; {n}" for n in check.notes)
    # torch's head names load_state_dict, not whose: its counts are the model's own load's
    # (what a hook converts or fills in is not missing), so the line says so, on every
    # surface alike; transformers' and PEFT's heads name their loader already
    own_load = not (check.by_transformers or check.by_peft)
    if own_load or layouts is True or check.reason.startswith("it raises"):
        return f"{head}: NO, {through} ({check.reason})"
    return f"{head}: NO ({check.reason})"


def _layout_note(diff: SchemaDiff | None) -> str:
    if diff is None:
        return ""
    if diff.versions:
        return " (module versions changed: their _load_from_state_dict decides)"
    if any(c.attribute == "dtype" for c in diff.changed):
        return " (dtypes changed: values are converted on load)"
    return ""


def load_refusals(unexpected: int, missing: int, shapes: int) -> list[str]:
    """Why ``load_state_dict(strict=True)`` refuses, counted: ``["2 unexpected keys", ...]``."""
    counted = ((unexpected, "unexpected key", "s"), (missing, "missing key", "s"),
               (shapes, "shape mismatch", "es"))  # fmt: skip
    return [f"{n} {what}{plural * (n > 1)}" for n, what, plural in counted if n]


def optimizer_load_verdict(verdict: OptimizerVerdict) -> str:
    """Would ``optimizer.load_state_dict(old)`` work, and put every state where it was?"""
    head = "an old optimizer state still loads with optimizer.load_state_dict:"
    if not verdict.loads:
        return f"{head} NO, it raises ValueError ({'; '.join(verdict.reasons)})"
    if verdict.exact is None:
        return f"{head} yes, by position: {'; '.join(verdict.reasons)}"
    if verdict.exact:
        return f"{head} yes, every state on its own parameter"
    return f"{head} yes, but it would not resume exactly: {'; '.join(verdict.reasons)}"


def diff_to_json(diff: SchemaDiff) -> dict[str, Any]:
    """A schema diff as plain JSON: every difference, none cut short."""
    verdict = diff.optimizer_verdict
    return {
        "removed": [_entry_json(t) for t in diff.removed],
        "added": [_entry_json(t) for t in diff.added],
        "renamed": [{"from": old, "to": new} for old, new in diff.renames],
        "changed": [
            {
                "key": c.key,
                "attribute": c.attribute,
                "expected": _plain_json(c.expected),
                "actual": _plain_json(c.actual),
            }
            for c in diff.changed
        ],
        "moved": [{"key": k, "from": a, "to": b} for k, a, b in diff.moved],
        "prefix": None
        if diff.prefix is None
        else {"how": diff.prefix[0], "prefix": diff.prefix[1]},
        "module_versions": [{"module": m, "from": a, "to": b} for m, a, b in diff.versions],
        "non_persistent_buffers": {
            "removed": list(diff.non_persistent[0]),
            "added": list(diff.non_persistent[1]),
        },
        "checkpoint_entries": list(diff.extras),
        "optimizer": list(diff.optimizer),
        "optimizer_problems": list(diff.problems),
        "loads_strict": diff.loads_strict,
        "load_verdict": load_verdict(diff),
        "optimizer_verdict": None
        if verdict is None
        else {
            "loads": verdict.loads,
            "exact": verdict.exact,
            "reasons": list(verdict.reasons),
            "text": optimizer_load_verdict(verdict),
        },
        "notes": list(diff.notes),
    }


def _entry_json(entry: Any) -> dict[str, Any]:
    return {
        "key": entry.key,
        "kind": entry.kind,
        "shape": None if entry.shape is None else list(entry.shape),
        "dtype": entry.dtype,
        "description": entry.describe(),
    }


def _plain_json(value: Any) -> Any:
    """A JSON value for an attribute's old or new value (shapes become lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain_json(v) for v in value]
    return str(value)
