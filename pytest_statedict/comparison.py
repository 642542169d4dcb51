"""The comparison seam: how the two entries of one key are compared, where a user says so.

Two ways in, both per key, so that one deliberate exception does not loosen a whole model:
``tolerances=`` (as pytest-regressions' ``tolerances=``) gives some keys their own
``rtol``/``atol``; a custom comparison (``compare=`` of the call, or the
``pytest_statedict_compare_entry`` hooks) decides a key outright, or leaves it to the
built-in comparison of :mod:`.compare`. Nothing here imports torch or pytest.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import StateDictError
from .schema_entries import TensorEntry

TOLERANCE_NAMES = ("rtol", "atol")
HOOK = "pytest_statedict_compare_entry"

# a custom comparison as a user writes it: None (no opinion), True or [] (equal), or the
# differences as a list of strings
EntryComparison = Callable[[str, TensorEntry, TensorEntry], Any]
# what the built-in comparison asks of the custom ones: None, or who answered and the
# differences they gave ([] for equal)
Verdict = tuple[str, list[str]]
CustomComparison = Callable[[str, TensorEntry, TensorEntry], "Verdict | None"]


@dataclass(frozen=True)
class Tolerance:
    """How far a key's value statistics may move; ``pattern``: the ``tolerances=`` glob that
    chose it (None: the call's ``rtol``/``atol``), so that a report says where it came from."""

    rtol: float
    atol: float
    pattern: str | None = None

    def describe(self) -> str:
        text = f"rtol={self.rtol}, atol={self.atol}"
        return text if self.pattern is None else f"{text} (tolerances[{self.pattern!r}])"


class Tolerances:
    """The tolerance of every key: the first glob of ``tolerances=`` that matches it, in
    the mapping's order, else the call's ``rtol``/``atol``, else None (exact: the hash).

    An entry replaces the call's tolerance whole (a name it leaves out is 0), so that what
    a key is held to can be read off one line; an empty entry ``{}`` makes its keys exact
    again under a call-wide ``rtol``/``atol``. First match wins, as in a ``.gitignore``
    read top down: a specific glob goes before a broad one.
    """

    def __init__(
        self,
        rtol: float | None = None,
        atol: float | None = None,
        per_key: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self.default = (
            None if rtol is None and atol is None else Tolerance(rtol or 0.0, atol or 0.0)
        )
        self.per_key = _parsed(per_key)

    @property
    def tolerant(self) -> bool:
        """Whether any key may be compared within a tolerance (the report orders those)."""
        return self.default is not None or any(t is not None for _, t in self.per_key)

    @property
    def given(self) -> bool:
        """Whether the call gave any tolerance: such a check never rewrites its snapshot
        for a change it accepted, or the baseline would drift by a tolerance per update."""
        return self.default is not None or bool(self.per_key)

    def for_key(self, key: str) -> Tolerance | None:
        for pattern, tolerance in self.per_key:
            if fnmatch.fnmatchcase(key, pattern):
                return tolerance
        return self.default

    def refuse_unmatched(self, *sides: Iterable[str]) -> None:
        """A glob that matches no key of either side is a typo, not a tolerance: refuse it,
        or the key it meant would be held to the call's tolerance and the test still pass."""
        keys = {key for side in sides for key in side}
        unmatched = [
            pattern
            for pattern, _ in self.per_key
            if not any(fnmatch.fnmatchcase(key, pattern) for key in keys)
        ]
        if unmatched:
            raise StateDictError(
                f"tolerances=: {', '.join(map(repr, unmatched))} "
                f"{'matches' if len(unmatched) == 1 else 'match'} no key of either side (keys "
                "are matched as compared: after rename=, the normalising hooks and ignore=); "
                "fix the glob or drop it"
            )


def _parsed(
    per_key: Mapping[str, Mapping[str, float]] | None,
) -> tuple[tuple[str, Tolerance | None], ...]:
    if per_key is None:
        return ()
    if not isinstance(per_key, Mapping):
        raise StateDictError(
            f"tolerances= must be a mapping of key globs to {{'rtol': .., 'atol': ..}}, "
            f"not {type(per_key).__name__}"
        )
    return tuple((pattern, _tolerance(pattern, entry)) for pattern, entry in per_key.items())


def _tolerance(pattern: object, entry: object) -> Tolerance | None:
    if not isinstance(pattern, str):
        raise StateDictError(f"tolerances=: the key {pattern!r} must be a glob, a str")
    if not isinstance(entry, Mapping):
        raise StateDictError(
            f"tolerances[{pattern!r}] must be a mapping such as {{'rtol': 1e-3, 'atol': 1e-5}}, "
            f"not {entry!r}"
        )
    unknown = [name for name in entry if name not in TOLERANCE_NAMES]
    if unknown:
        raise StateDictError(
            f"tolerances[{pattern!r}]: unknown {', '.join(map(repr, unknown))}; "
            "a tolerance has 'rtol' and 'atol' only"
        )
    for name, value in entry.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise StateDictError(
                f"tolerances[{pattern!r}][{name!r}] is {value!r}: it must be a finite number >= 0"
            )
    if not entry:
        return None
    return Tolerance(float(entry.get("rtol", 0.0)), float(entry.get("atol", 0.0)), pattern)


def custom_comparison(
    compare: EntryComparison | None, hooks: EntryComparison | None
) -> CustomComparison | None:
    """``compare=`` of the call, then the hooks: the first that has an opinion decides.

    The call's own function is the most specific word on its check, so it is asked first;
    its None hands the key on to the hooks, theirs to the built-in comparison.
    """
    asked = [(who, f) for who, f in (("compare=", compare), (HOOK, hooks)) if f is not None]
    if not asked:
        return None

    def decide(key: str, expected: TensorEntry, actual: TensorEntry) -> Verdict | None:
        for who, comparison in asked:
            found = differences(comparison(key, expected, actual), key, who)
            if found is not None:
                return who, found
        return None

    return decide


def differences(answer: object, key: str, who: str) -> list[str] | None:
    """A custom comparison's answer as the differences it reports: None for no opinion,
    [] for equal. A wrong type is refused, not read as "equal": a test must not pass
    because a comparison returned something it was not meant to."""
    if answer is None:
        return None
    if answer is True:
        return []
    if answer is False:
        return ["differ"]
    if isinstance(answer, (list, tuple)) and all(isinstance(line, str) for line in answer):
        return list(answer)
    raise StateDictError(
        f"{who} returned {answer!r} for key {key!r}: it must return None (no opinion), True "
        "or [] (equal), False or a list of strings (the differences)"
    )
