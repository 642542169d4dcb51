"""Which removed key became which added one: the likely renames a report suggests.

A suggested ``rename=`` is only worth printing if applying it gives the old model's
outputs back; a pairing that sends a LayerNorm's weight to one module and its bias to
another loads without an error and silently scrambles a trained model. So renames are
paired by module first: a module (the keys that share a dotted prefix) moves whole, and
only to a module with the same tensors (leaf names, shapes, dtypes). Then, per module
signature, by structure, strongest evidence first:

1. *one token renamed*: ``layers.3.attn`` and ``blocks.3.attn`` differ in one path
   token, and no other module of that signature differs from either in that token alone;
2. *the same place*: the deepest enclosing module that holds both unpaired old and new
   modules of that signature; one of each there pair; several pair in their order when
   both sides are in ``state_dict`` order and hold as many;
3. what is left is *ambiguous*: reported with its candidates, never suggested.

Tensors whose module did not move whole (a module that also gained a key) are paired the
same way one by one, and a pairing that would split one old module between two new ones
is ambiguous too. Every step groups by hashed keys: the cost is linear in keys times path
depth (10,000 renamed keys pair in well under a second, where comparing every removed key
with every added one took minutes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from .schema_entries import TensorEntry

__all__ = ["RenamePairing", "likely_renames", "same_kind"]

TENSOR_KIND, OBJECT_KIND = "tensor", "object"
# Candidates shown for one ambiguous module or key.
SHOWN_ALTERNATIVES = 3


@dataclass
class RenamePairing:
    """The renames found: ``pairs`` (old key, new key) to suggest, in the old keys'
    order; ``by_order``, the modules among them that only their order in the model paired
    (several alike, no name telling them apart), for a report to ask for a look; and
    ``ambiguous`` old modules or keys with the new ones they may have become."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    by_order: list[tuple[str, str]] = field(default_factory=list)
    ambiguous: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)


@dataclass
class _Unit:
    """What moves as one: a module's keys (``path`` the module), or one key (its own path)."""

    path: tuple[str, ...]
    entries: list[TensorEntry]
    order: int
    signature: Hashable = None
    is_module: bool = True
    # paired by its order among several alike, no name telling them apart
    by_order: bool = False

    @property
    def name(self) -> str:
        return ".".join(self.path)

    def shown(self) -> str:
        """``layers.0.norm (weight, bias)`` for a module, the key for a key."""
        if not self.is_module:
            return self.name
        leaves = ", ".join(e.key.rsplit(".", 1)[-1] for e in self.entries)
        return f"{self.name or '(top level)'} ({leaves})"


def likely_renames(
    removed: Sequence[TensorEntry], added: Sequence[TensorEntry], *, ordered: bool = True
) -> RenamePairing:
    """Pair removed and added keys by module, then by structure (see the module's doc).

    ``ordered``: both sides list their keys in ``state_dict`` order (a ``.safetensors``
    header is sorted instead), so modules of one signature may pair by their order.
    """
    result = RenamePairing()
    old_units, new_units = _modules(removed), _modules(added)
    for unit in (*old_units, *new_units):
        unit.signature = tuple(sorted((e.key.rsplit(".", 1)[-1], *_fit(e)) for e in unit.entries))
    module_pairs, module_ambiguous = _pair_units(old_units, new_units, ordered)
    moved_old: set[str] = set()
    moved_new: set[str] = set()
    for old, new in module_pairs:
        if not _kinds_agree(old.entries, new.entries):
            continue
        by_leaf = {e.key.rsplit(".", 1)[-1]: e.key for e in new.entries}
        for entry in old.entries:
            result.pairs.append((entry.key, by_leaf[entry.key.rsplit(".", 1)[-1]]))
        if old.by_order:
            result.by_order.append((old.shown(), new.shown()))
        moved_old.update(e.key for e in old.entries)
        moved_new.update(e.key for e in new.entries)
    ambiguous_old = {e.key for unit, _ in module_ambiguous for e in unit.entries}
    left_old = [e for e in removed if e.key not in moved_old and e.key not in ambiguous_old]
    left_new = [e for e in added if e.key not in moved_new]
    key_pairs, key_ambiguous = _pair_keys(left_old, left_new, ordered)
    result.pairs.extend(key_pairs)
    position = {e.key: i for i, e in enumerate(removed)}
    result.pairs.sort(key=lambda pair: position[pair[0]])
    result.ambiguous = [
        (unit.shown(), tuple(c.shown() for c in candidates))
        for unit, candidates in module_ambiguous
    ] + key_ambiguous
    return result


def _fit(entry: TensorEntry) -> tuple[Hashable, ...]:
    """What a renamed key keeps: shape, dtype, non-tensor type and whether it is a tensor."""
    return (entry.shape, entry.dtype, entry.type, entry.kind == OBJECT_KIND)


def _kinds_agree(old: Iterable[TensorEntry], new: Iterable[TensorEntry]) -> bool:
    """Parameters stay parameters and buffers buffers (a bare ``tensor`` may be either)."""
    kinds = {e.key.rsplit(".", 1)[-1]: e.kind for e in new}
    return all(same_kind(e.kind, kinds[e.key.rsplit(".", 1)[-1]]) for e in old)


def same_kind(a: str, b: str) -> bool:
    """Kinds match if equal, or if one side is a bare ``tensor`` (its kind is unknown)."""
    return a == b or (TENSOR_KIND in (a, b) and OBJECT_KIND not in (a, b))


def _modules(entries: Sequence[TensorEntry]) -> list[_Unit]:
    """The keys grouped by module (their dotted prefix), in order of first key."""
    units: dict[tuple[str, ...], _Unit] = {}
    for entry in entries:
        path = tuple(entry.key.split(".")[:-1])
        unit = units.get(path)
        if unit is None:
            units[path] = unit = _Unit(path, [], len(units))
        unit.entries.append(entry)
    return list(units.values())


def _pair_keys(
    removed: list[TensorEntry], added: list[TensorEntry], ordered: bool
) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, ...]]]]:
    """Keys whose module did not move whole, paired one by one, those of one leaf name
    (``weight`` with ``weight``) first; a pairing that sends one old module's keys to
    several new modules is ambiguous instead."""
    old_units, new_units = (
        [_Unit(tuple(e.key.split(".")), [e], i, is_module=False) for i, e in enumerate(side)]
        for side in (removed, added)
    )
    for unit in (*old_units, *new_units):
        unit.signature = (unit.path[-1], _fit(unit.entries[0]))
    pairs, _ = _pair_units(old_units, new_units, ordered)
    paired = {id(u) for pair in pairs for u in pair}
    old_units = [u for u in old_units if id(u) not in paired]
    new_units = [u for u in new_units if id(u) not in paired]
    for unit in (*old_units, *new_units):
        unit.signature = _fit(unit.entries[0])  # then whatever the leaf (gamma_1 -> ls1.gamma)
    renamed_leaves, ambiguous = _pair_units(old_units, new_units, ordered)
    pairs += renamed_leaves
    kept = [(o, n) for o, n in pairs if same_kind(o.entries[0].kind, n.entries[0].kind)]
    destinations: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
    for old, new in kept:
        destinations[old.path[:-1]].add(new.path[:-1])
    split = {module for module, targets in destinations.items() if len(targets) > 1}
    out = [(o.name, n.name) for o, n in kept if o.path[:-1] not in split]
    shown = [(u.name, tuple(c.name for c in cands)) for u, cands in ambiguous]
    # one old module's keys sent to several new modules: each key, and where its module's went
    shown += [
        (o.name, tuple(sorted(".".join(t) for t in destinations[o.path[:-1]])))
        for o, _ in kept
        if o.path[:-1] in split
    ]
    return out, shown


def _pair_units(
    old: list[_Unit], new: list[_Unit], ordered: bool
) -> tuple[list[tuple[_Unit, _Unit]], list[tuple[_Unit, list[_Unit]]]]:
    """Pair units of equal signature: one token renamed, then by place (see module doc)."""
    pairs: list[tuple[_Unit, _Unit]] = []
    ambiguous: list[tuple[_Unit, list[_Unit]]] = []
    old_by_sig: dict[Hashable, list[_Unit]] = defaultdict(list)
    new_by_sig: dict[Hashable, list[_Unit]] = defaultdict(list)
    for unit in old:
        old_by_sig[unit.signature].append(unit)
    for unit in new:
        new_by_sig[unit.signature].append(unit)
    for signature, olds in old_by_sig.items():
        news = new_by_sig.get(signature)
        if not news:
            continue
        found = _one_token_renamed(olds, news)
        paired_old = {id(o) for o, _ in found}
        paired_new = {id(n) for _, n in found}
        pairs.extend(found)
        rest_old = [u for u in olds if id(u) not in paired_old]
        rest_new = [u for u in news if id(u) not in paired_new]
        placed, unplaced = _by_place(rest_old, rest_new, ordered)
        pairs.extend(placed)
        ambiguous.extend(unplaced)
    ambiguous.sort(key=lambda item: item[0].order)
    return pairs, ambiguous


def _one_token_renamed(olds: list[_Unit], news: list[_Unit]) -> list[tuple[_Unit, _Unit]]:
    """Units whose paths differ in exactly one token, where that pairing is unique both ways."""
    slots: dict[tuple[int, int, tuple[str, ...]], tuple[list[_Unit], list[_Unit]]] = {}
    for side, group in ((0, olds), (1, news)):
        for unit in group:
            path = unit.path
            for i in range(len(path)):
                slot = (len(path), i, path[:i] + path[i + 1 :])
                slots.setdefault(slot, ([], []))[side].append(unit)
    proposed_old: dict[int, set[int]] = defaultdict(set)
    proposed_new: dict[int, set[int]] = defaultdict(set)
    units = {id(u): u for u in (*olds, *news)}
    for olds_here, news_here in slots.values():
        if len(olds_here) == 1 and len(news_here) == 1 and olds_here[0].path != news_here[0].path:
            o, n = olds_here[0], news_here[0]
            proposed_old[id(o)].add(id(n))
            proposed_new[id(n)].add(id(o))
    return [
        (units[o], units[next(iter(ns))])
        for o, ns in proposed_old.items()
        if len(ns) == 1 and len(proposed_new[next(iter(ns))]) == 1
    ]


def _by_place(
    olds: list[_Unit], news: list[_Unit], ordered: bool
) -> tuple[list[tuple[_Unit, _Unit]], list[tuple[_Unit, list[_Unit]]]]:
    """Pair units within the deepest enclosing module holding both old and new ones.

    From the deepest shared prefix up to the root: a prefix with as many unpaired old as
    new units pairs them (in order when ``ordered``, else only one of each); a prefix
    with unequal counts waits for an enclosing one. What the root leaves is ambiguous.
    """
    pairs: list[tuple[_Unit, _Unit]] = []
    nearest: dict[int, list[_Unit]] = {}
    left_old, left_new = list(olds), list(news)
    depth = max(len(u.path) for u in (*olds, *news)) if olds and news else 0
    for level in range(depth, -1, -1):
        if not left_old or not left_new:
            break
        groups: dict[tuple[str, ...], tuple[list[_Unit], list[_Unit]]] = {}
        for side, units in ((0, left_old), (1, left_new)):
            for unit in units:
                if len(unit.path) > level:  # a unit encloses nothing: its parent path counts
                    groups.setdefault(unit.path[:level], ([], []))[side].append(unit)
        paired: set[int] = set()
        for group_old, group_new in groups.values():
            for unit in group_old:  # the nearest new units of its kind, should it stay unpaired
                if group_new and id(unit) not in nearest:
                    nearest[id(unit)] = group_new[:SHOWN_ALTERNATIVES]
            if not group_old or len(group_old) != len(group_new):
                continue
            if len(group_old) > 1 and not ordered:
                continue
            for o, n in zip(group_old, group_new, strict=True):  # each side in its order
                o.by_order = len(group_old) > 1
                pairs.append((o, n))
                paired.update((id(o), id(n)))
        left_old = [u for u in left_old if id(u) not in paired]
        left_new = [u for u in left_new if id(u) not in paired]
    taken = {id(n) for _, n in pairs}
    ambiguous = [
        (u, [n for n in nearest[id(u)] if id(n) not in taken] or left_new[:SHOWN_ALTERNATIVES])
        for u in left_old
        if left_new
    ]
    return pairs, ambiguous
