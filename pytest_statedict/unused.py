"""Unused snapshots: files in folders of tests that ran whole that no test asked for.

The session records what each test asked for; at the end of a run that went to its end,
this decides which files nobody asked for (and which test modules look renamed), from the
session's records alone (:class:`FinishedRun`), so that it can be read and tested apart
from the bookkeeping of a running session.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import storage
from .errors import SnapshotError

if TYPE_CHECKING:
    from typing import Protocol

    import pytest

__all__ = ["FinishedRun", "ModuleRecord", "find_orphans", "find_unused", "renamed_modules"]


class ModuleRecord:
    """A test file's collected tests, to decide whether it ran whole.

    Any collected file is one: a ``.py`` module, a doctest ``.txt``/``.md``/``.rst``.
    Collection only files each item under its file (the plugin is loaded into every run,
    most of which never use it); names are worked out at the end, and only for files that
    have snapshot files.
    """

    def __init__(self, path: Path, snapshot_dir: Path, root: Path) -> None:
        self.path = path
        self.snapshot_dir = snapshot_dir
        self.root = root
        self.items: list[pytest.Item] = []
        self.merged_tests: list[tuple[str, str]] = []  # from xdist workers
        self.partial = False

    def tests(self) -> list[tuple[str, str]]:
        """(test folder name, node id) of every collected test, 0.1.0 folder names too.

        pytest-repeat's repetitions are several tests of one folder.
        """
        pairs = list(self.merged_tests)
        for item in self.items:
            parts = storage.item_parts(item)
            pairs.append((storage.test_dirname(parts), item.nodeid))
            legacy = storage.legacy_name(".".join(parts))
            if legacy != pairs[-1][0]:
                pairs.append((legacy, item.nodeid))
        return pairs


if TYPE_CHECKING:  # a type checker's protocol: building it would cost every pytest run

    class FinishedRun(Protocol):
        """What the session recorded of a run that went to its end."""

        @property
        def modules(self) -> Mapping[str, ModuleRecord]: ...

        outcomes: dict[str, str]
        used: set[str]
        missing: set[str]
        unused: list[Path]
        fixtures_ran: set[str]
        directories: set[str]
        snapshot_root: Path | None
        problems: list[str]
        linked_roots: dict[Path, Path]

        def ran_whole(self, record: ModuleRecord) -> bool: ...
        def collected_whole(self, directory: Path) -> bool: ...
        def root_base(self, root: Path) -> Path: ...


def find_unused(run: FinishedRun) -> list[Path]:
    """Files in folders of test files that ran whole that no test asked for.

    A file belongs to a test (its folder); it is unused if that test no longer exists,
    or if the test passed without asking for it. Deselected, skipped and failed tests
    never make a file unused. A fixture's folder has unused files only if the fixture
    was set up in this run. Test files sharing a folder (``x.py`` and a doctest
    ``x.txt``) are judged together.
    """
    by_folder: dict[Path, list[ModuleRecord]] = defaultdict(list)
    for record in run.modules.values():
        by_folder[record.snapshot_dir].append(record)
    unused = []
    for folder, records in by_folder.items():
        if not all(map(run.ran_whole, records)):
            continue
        files = _listed(run, folder, records[0].root)
        if not files:
            continue
        owners: dict[str, list[str]] = defaultdict(list)
        for record in records:
            for dirname, nodeid in record.tests():
                owners[dirname].append(nodeid)
        if any(n not in run.outcomes for nodeids in owners.values() for n in nodeids):
            continue  # not every test reported: the module did not run whole
        doctests = tuple(f".{record.path.stem}." for record in records)
        for path in files:
            name = path.parent.name
            if str(path) in run.used:
                continue
            if storage.is_fixture_dirname(name):
                if str(path.parent) in run.fixtures_ran:
                    unused.append(path)
                continue
            nodeids = owners.get(name, ())
            if not nodeids and any(prefix in f".{name}" for prefix in doctests):
                continue  # a --doctest-modules doctest (``<module>.<function>``) not collected
            if all(run.outcomes.get(n) == "passed" for n in nodeids):
                unused.append(path)
    return unused + find_orphans(run)


def _listed(run: FinishedRun, folder: Path, root: Path) -> list[Path]:
    if _linked(run, root):
        return []
    try:
        return storage.snapshot_files(folder, root)
    except SnapshotError as exc:
        run.problems.append(str(exc))
        return []


def find_orphans(run: FinishedRun) -> list[Path]:
    """Snapshots of test files that no longer exist, in folders collected whole.

    ``__statedict__/<module>/`` with no file of that stem beside it (``<module>.py`` or
    a doctest ``<module>.txt``, deleted or renamed) can never be asked for again. Only
    folders that the run collected as a whole (a folder named on the command line, or
    below one) are looked at, and only in the default layout (beside the test files).
    """
    if run.snapshot_root is not None:
        return []
    orphans = []
    for directory in sorted(map(Path, run.directories)):
        snapshots = directory / storage.SNAPSHOT_DIRNAME
        if not run.collected_whole(directory) or _linked(run, snapshots) or not snapshots.is_dir():
            continue
        stems = {Path(name).stem for name in os.listdir(directory)}
        owned = {storage.module_dirname(s) for s in stems} | {storage.legacy_name(s) for s in stems}
        for folder in sorted(snapshots.iterdir()):
            if folder.is_dir() and folder.name not in owned:
                orphans.extend(_listed(run, folder, snapshots))
    return orphans


def _linked(run: FinishedRun, root: Path) -> bool:
    """Whether a snapshot root is reached through a symlink: then nothing in it is listed
    (it could be anywhere), and the summary says so.
    """
    link = storage.linked_root(root, run.root_base(root))
    if link is not None:
        run.linked_roots[root] = link
    return link is not None


def renamed_modules(run: FinishedRun) -> list[tuple[Path, Path]]:
    """(old folder, new folder) of test modules that look renamed: unused snapshots in one
    folder, and missing ones of the same ``<test>/<leaf>`` under a folder not there yet.

    Renaming a test module orphans its snapshots and leaves the renamed tests without
    any; the two lists in the summary are the same files, which a move keeps.
    """
    unused: dict[Path, set[Path]] = defaultdict(set)
    for path in run.unused:
        unused[path.parent.parent].add(path.relative_to(path.parent.parent))
    missing: dict[Path, set[Path]] = defaultdict(set)
    for path in map(Path, run.missing):
        missing[path.parent.parent].add(path.relative_to(path.parent.parent))
    return [
        (old, new)
        for new, wanted in sorted(missing.items())
        if not os.path.lexists(new)
        for old, leaves in sorted(unused.items())
        if old != new and wanted & leaves
    ]
