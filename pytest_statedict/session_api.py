"""The seam between the checks and the running session: what a check may ask of it.

The assertion drives (schema, comparison, report); the session stores (which file a test
asks for, writing it under ``--statedict-update``, the outcomes), as syrupy splits its
assertion from its session. The checks see the session only through these protocols, so
that none of them imports it; the session implements them. Nothing imports this module at
run time (the protocols are for type checkers), so it costs a pytest run nothing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

from .storage import SnapshotSlot

__all__ = ["CheckRecorder", "SnapshotStore"]


class CheckRecorder(Protocol):
    """What a check needs of the running session: a place to record its outcome.

    The session implements it; the checks see only this, so that no check imports the
    session (the assertion drives, the session stores).
    """

    def check_finished(
        self, kind: str, name: str, outcome: str, exc: BaseException | None = None, **extra: Any
    ) -> None: ...


class SnapshotStore(CheckRecorder, Protocol):
    """What the snapshot check needs of the running session: the files, never the verdict.

    The assertion drives (schema, comparison, report); the session stores (which file a
    test asks for, writing it under ``--statedict-update``, the outcomes), as syrupy splits
    its assertion from its session.
    """

    update: bool
    verbose: bool

    def snapshot_check(self) -> AbstractContextManager[None]: ...
    def claim_snapshot(self, name: str | None) -> SnapshotSlot: ...
    def write_snapshot(self, slot: SnapshotSlot, text: str) -> None: ...
    def rewrite_snapshot(self, slot: SnapshotSlot, text: str) -> None: ...
    def snapshot_missing(self, slot: SnapshotSlot) -> None: ...
    def record_snapshot(self, slot: SnapshotSlot, outcome: str) -> None: ...
