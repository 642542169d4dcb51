"""Keys under other names: ``rename=``, ignored keys, wrapper prefixes and likely renames.

A refactor renames; a check must compare like with like. This module maps a schema's keys
(and everything named after a key: ties, non-persistent buffers, optimizer members, module
versions) through a user's ``rename=`` and ``ignore=``, and finds a wrapper's prefix
(which removed key became which added one is ``rename_pairing``'s).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from .errors import StateDictError
from .schema import Schema
from .schema_entries import OptimizerSchema

__all__ = [
    "Rename",
    "compile_rename",
    "detect_prefix",
    "matches_any",
    "normalise",
    "refuse_collisions",
    "renamed_optimizer",
    "renamed_versions",
    "without_ignored_members",
    "without_members",
]


V = TypeVar("V")  # a module's version, as a schema or a state_dict's _metadata records it

Rename = Mapping[str, str] | Callable[[str], str] | Sequence[tuple[str, str]] | None


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
    kept = {key: new for key, new in names.items() if not matches_any(new, patterns)}
    refuse_collisions(kept)
    tensors = tuple(
        replace(t, key=kept[t.key], tied_to=renamed(t.tied_to) if t.tied_to else None)
        for t in schema.tensors
        if t.key in kept
    )
    npb = tuple(
        n for n in map(renamed, schema.non_persistent_buffers) if not matches_any(n, patterns)
    )
    versions = (
        None if schema.versions is None else renamed_versions(schema.versions, kept, patterns)
    )
    optimizer = None if schema.optimizer is None else renamed_optimizer(schema.optimizer, renamed)
    return replace(
        schema,
        tensors=tensors,
        non_persistent_buffers=npb,
        versions=versions,
        optimizer=optimizer,
    )


def matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _checked_name(new: object, key: str) -> str:
    if not isinstance(new, str):
        raise StateDictError(
            f"rename= (or a pytest_statedict_normalize_key hook) gave {new!r} for key "
            f"{key!r}: it must return the key's new name, a str"
        )
    return new


def refuse_collisions(kept: Mapping[str, str]) -> None:
    """Two kept keys under one name: one of them would silently go unchecked."""
    seen: dict[str, str] = {}
    for key, new in kept.items():
        if new in seen:
            raise StateDictError(
                f"rename= (or a pytest_statedict_normalize_key hook) maps both {seen[new]!r} "
                f"and {key!r} to {new!r}: one of them would silently go unchecked"
            )
        seen[new] = key


def renamed_versions(
    versions: Mapping[str, V], kept: Mapping[str, str], patterns: tuple[str, ...] = ()
) -> dict[str, V]:
    """Module versions (a schema's, or a state_dict's ``_metadata``) under the new key names.

    A module ``P`` becomes ``Q`` when every kept key below it, ``P.<rest>``, became
    ``Q.<rest>``, and keeps its name when they went different ways. A module whose keys
    were all ignored is dropped; one without keys (a versioned activation, say) moves with
    its nearest ancestor that has kept keys, and is dropped when ``ignore`` covers it.

    Where a module moves onto a name another keeps (stripping ``module.`` moves the wrapped
    model onto the root, the wrapper's name), the module that moved wins: it owns the keys
    now there, as torch's ``consume_prefix_in_state_dict_if_present`` decides.
    """
    below: dict[str, list[str]] = {"": list(kept)}  # module -> the kept keys below it
    for key in kept:
        parts = key.split(".")
        for i in range(1, len(parts)):
            below.setdefault(".".join(parts[:i]), []).append(key)
    stayed: dict[str, V] = {}
    moved: dict[str, V] = {}
    for module, version in versions.items():
        if module and module not in below:  # no kept keys below it
            parent = _nearest_with_keys(module, below)
            head = _moved_module(parent, below[parent], kept) if parent is not None else None
            new = (
                module
                if head is None or parent is None
                else _below(head, _relative(module, parent))
            )
            if matches_any(f"{new}.", patterns) or matches_any(f"{module}.", patterns):
                continue
        else:
            head = _moved_module(module, below[module], kept)
            new = module if head is None else head
        (stayed if new == module else moved)[new] = version
    return {**stayed, **moved}


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
    return replace(schema, optimizer=without_members(schema.optimizer, patterns))


def without_members(opt: OptimizerSchema, patterns: tuple[str, ...]) -> OptimizerSchema:
    """The optimizer without the named members (and their state) that match ``patterns``."""

    def keep(p: str | int) -> bool:
        return not (isinstance(p, str) and matches_any(p, patterns))

    return replace(
        opt,
        param_groups=tuple(
            replace(g, params=tuple(p for p in g.params if keep(p))) for g in opt.param_groups
        ),
        state=tuple(s for s in opt.state if keep(s.param)),
    )


def detect_prefix(exp: list[str], act: list[str]) -> tuple[str, str] | None:
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
