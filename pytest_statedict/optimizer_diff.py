"""Two optimizers' schemas side by side: what changed, and whether the old state resumes.

``optimizer.load_state_dict`` checks only the number of param_groups and their sizes, then
hands the saved state to today's parameters by position. So a regrouped, reordered or
reshaped model can load yesterday's optimizer state without an error and resume wrong: this
module says what torch would do, and where it would go wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .printable import printable
from .schema_entries import UNKNOWN_CLASS, OptimizerSchema, StateSpec, elementwise_shapes

__all__ = [
    "ADDED_HYPERPARAMS",
    "EMPTY_STATE_ENTRIES",
    "RETYPED_STATE_ENTRIES",
    "OptimizerVerdict",
    "comparable_hyperparams",
    "comparable_state",
    "diff_optimizers",
    "optimizer_verdict",
    "uses_names",
    "without_hyperparams",
]


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


def diff_optimizers(expected: OptimizerSchema | None, actual: OptimizerSchema | None) -> list[str]:
    """Every difference between two optimizers' schemas, one line each: class, groups and
    their members, hyperparameters, and each parameter's state."""
    if expected is None and actual is None:
        return []
    if expected is None or actual is None:
        have = expected or actual
        assert have is not None
        side = "expected" if expected is not None else "actual"
        return [f"an optimizer ({printable(have.cls)}) on the {side} side only"]
    lines = []
    if expected.cls != actual.cls and UNKNOWN_CLASS not in (expected.cls, actual.cls):
        lines.append(f"class: {printable(expected.cls)} -> {printable(actual.cls)}")
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
    lines.extend(_state_lines(*comparable_state(expected, actual)))
    return lines


def _state_lines(expected: OptimizerSchema, actual: OptimizerSchema) -> list[str]:
    """Each parameter's state that was removed, added or changed (by name, or by position
    when one side has no names); one line when one side has no state at all."""
    if bool(expected.state) != bool(actual.state):
        # a fresh optimizer (no step yet) on one side: one line, not one per parameter
        # burying the difference that matters
        saved, today = _state_count(expected), _state_count(actual)
        return [
            f"state saved for {saved}, today for {today} (an optimizer before its first "
            "step, or one that keeps none, has none)"
        ]
    same_vocabulary = uses_names(expected) == uses_names(actual)
    state_old = {_member(s.param, expected, same_vocabulary): s for s in expected.state}
    state_new = {_member(s.param, actual, same_vocabulary): s for s in actual.state}
    lines = []
    for p in list(state_old) + [p for p in state_new if p not in state_old]:
        old_state, new_state = state_old.get(p), state_new.get(p)
        if old_state is None or new_state is None:
            kept = old_state or new_state
            assert kept is not None
            what = ", ".join(
                f"{printable(n)} {printable(v.describe())}" for n, v in kept.entries.items()
            )
            lines.append(f"state of {p!r}: {'removed' if new_state is None else 'added'} ({what})")
            continue
        old, new = old_state.entries, new_state.entries
        for name in list(old) + [n for n in new if n not in old]:
            before, after = old.get(name), new.get(name)
            if before != after:
                lines.append(
                    f"state of {p!r}: {printable(name)} "
                    f"{printable(before.describe()) if before else 'absent'} -> "
                    f"{printable(after.describe()) if after else 'absent'}"
                )
    return lines


def _state_count(opt: OptimizerSchema) -> str:
    """``"none"``, or ``"4 parameters (exp_avg, exp_avg_sq, step)"``."""
    if not opt.state:
        return "none"
    entries = sorted({name for s in opt.state for name in s.entries})
    many = "s" * (len(opt.state) > 1)
    return f"{len(opt.state)} parameter{many} ({', '.join(map(printable, entries))})"


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
    expected: OptimizerSchema,
    actual: OptimizerSchema,
    reshaped: Iterable[str | int] = (),
    shapes_now: Mapping[str, tuple[int, ...] | None] | None = None,
) -> OptimizerVerdict:
    """What ``optimizer.load_state_dict(yesterday's state)`` would do today (see the class).

    By name where both sides name their parameters; by position otherwise, as torch itself
    loads: ``shapes_now`` (today's tensors' shapes by key) tells what each saved state
    lands on, and a state that does not fit fails the next step.
    """
    refused = _load_refusal(expected, actual)
    if refused is not None:
        return refused
    if expected.problems:  # a saved state torch cannot restore as it stands
        return OptimizerVerdict(True, False, tuple(expected.problems))
    if not (uses_names(expected) and uses_names(actual)):
        return _positional_verdict(expected, actual, shapes_now or {})
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
    reshaped = set(reshaped)
    with_state = {s.param for s in expected.state} or set(new)
    stale = [
        p for o, p in zip(old, new, strict=True) if o == p and p in reshaped and p in with_state
    ]
    if stale:
        names = ", ".join(map(printable, stale[:3])) + (
            f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        )
        reasons.append(
            f"the state saved for {names} would keep the old shape (the next step fails)"
        )
    return OptimizerVerdict(True, not reasons, tuple(reasons))


def _load_refusal(expected: OptimizerSchema, actual: OptimizerSchema) -> OptimizerVerdict | None:
    """torch's own check: as many param_groups, each of the same size (else ValueError)."""
    old_sizes = [len(g.params) for g in expected.param_groups]
    new_sizes = [len(g.params) for g in actual.param_groups]
    if len(old_sizes) != len(new_sizes):
        return OptimizerVerdict(
            False, False, (f"{len(old_sizes)} param_groups saved, {len(new_sizes)} now",)
        )
    sizes = [
        f"param_group {i} has {o} parameters saved and {n} now"
        for i, (o, n) in enumerate(zip(old_sizes, new_sizes, strict=True))
        if o != n
    ]
    return OptimizerVerdict(False, False, tuple(sizes)) if sizes else None


def _positional_verdict(
    expected: OptimizerSchema,
    actual: OptimizerSchema,
    shapes_now: Mapping[str, tuple[int, ...] | None],
) -> OptimizerVerdict:
    """The verdict where one side names no parameters: the state saved at position ``i``
    lands on today's parameter ``i``, so its per-element state must have that shape.

    Today's shape at a position is its named parameter's, else the per-element state
    today's optimizer keeps there. Which parameter a state was saved for cannot be known,
    and the verdict says so (``exact`` None) rather than pass as if it had been checked.
    """
    new = [p for g in actual.param_groups for p in g.params]
    position = {p: i for i, p in enumerate(q for g in expected.param_groups for q in g.params)}
    state_now = {s.param: s for s in actual.state}

    def shape_now(i: int) -> tuple[int, ...] | None:
        member = new[i]
        if isinstance(member, str) and shapes_now.get(member) is not None:
            return shapes_now[member]
        kept = state_now.get(member)
        return _elementwise_shape(kept.entries) if kept is not None else None

    misfits: list[str] = []
    checked = unchecked = 0
    for saved in expected.state:
        old_shape = _elementwise_shape(saved.entries)
        i = position.get(saved.param)
        if old_shape is None or i is None:
            continue  # no per-element state (a step count fits any parameter)
        now = shape_now(i)
        if now is None:
            unchecked += 1
        elif tuple(now) != tuple(old_shape):
            where = f"position {i} ({new[i]!r})" if isinstance(new[i], str) else f"position {i}"
            misfits.append(f"{where}: saved {list(old_shape)}, now {list(now)}")
        else:
            checked += 1
    if misfits:
        more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
        return OptimizerVerdict(
            True,
            False,
            (
                f"by position, the state saved for {len(misfits)} parameter"
                f"{'s' * (len(misfits) > 1)} does not fit the parameter now at its position "
                f"({'; '.join(misfits[:3])}{more}): the next step fails",
            ),
        )
    who = "the saved state" if not uses_names(expected) else "today's optimizer"
    if checked:
        note = (
            f"the state saved at {checked} position{'s' * (checked > 1)} fits the shape of "
            "today's parameter there"
        )
    else:
        note = "no saved per-parameter state had a shape to check"
    if unchecked:
        note += f" ({unchecked} not checked: no shape known there today)"
    return OptimizerVerdict(
        True,
        None,
        (f"{note}; which parameter each state was saved for cannot be checked: {who} names "
         "no parameters",),
    )  # fmt: skip


def _elementwise_shape(entries: Mapping[str, StateSpec]) -> tuple[int, ...] | None:
    """The shape of a parameter's per-element state (``exp_avg``...): the parameter's own."""
    return next((shape for _, shape in elementwise_shapes(entries)), None)


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


def without_hyperparams(
    opt: OptimizerSchema | None, names: Iterable[str]
) -> OptimizerSchema | None:
    """``opt`` with the hyperparameters ``names`` left out of every param_group: values a
    schedule moves every step (``lr``, ``initial_lr``), not the layout a snapshot guards."""
    names = frozenset(names)
    if opt is None or not names:
        return opt
    groups = tuple(
        replace(g, hyperparams={k: v for k, v in g.hyperparams.items() if k not in names})
        for g in opt.param_groups
    )
    return replace(opt, param_groups=groups)


def uses_names(opt: OptimizerSchema) -> bool:
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
    if uses_names(expected) == uses_names(actual):
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
