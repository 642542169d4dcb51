"""The plugin's state for one pytest run: which test is running, which snapshots it asked
for, what was written, and which snapshot files nobody asked for.

The pytest hooks in :mod:`.plugin` hand straight to this object. It imports no torch: that
happens on the first snapshot check.

What a test did travels on its reports (``report.statedict``, one record per phase): the
files it asked for, each check's outcome, its round-trips and the fixtures it set up. Under
pytest-xdist those reports reach the controller as they happen, so a worker that crashes
loses nothing already reported; without xdist the same reports are read the same way. The
counts are settled from a test's last attempt (a rerun is the same test) once its outcome
is known, and snapshots are judged unused only after a run that every worker finished and
nothing cut short.
"""

from __future__ import annotations

import functools
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import storage
from .errors import SnapshotError, StateDictError, hide_from_bad_input
from .runtime import CHECK_KINDS, OUTCOMES
from .storage import SnapshotSlot
from .unused import ModuleRecord, find_unused

if TYPE_CHECKING:
    import pytest

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

REPORT_KEY = "statedict"  # the attribute of a TestReport that carries a phase's record
# exit codes of a run that went to its end: only then can a file be judged unused
FINISHED_EXIT_CODES = (0, 1, 5)  # OK, TESTS_FAILED, NO_TESTS_COLLECTED
WRITTEN = ("written", "updated")  # the outcomes of a check that wrote its snapshot file
# the snapshot folders the summary line names where files were written; more are counted
MAX_FOLDERS_SHOWN = 3


class Owner(NamedTuple):
    """Whose snapshots a check files under: a test, or a class/module/session fixture."""

    folder: Path
    legacy_folder: Path | None  # where 0.1.0 kept them, when named otherwise
    root: Path  # nothing is written or deleted outside it


class Attempt:
    """One attempt of a test as its reports tell it (a rerun starts a new one)."""

    def __init__(self, written: dict[str, str] | None = None) -> None:
        self.failed = False
        self.discarded = False  # a rerun follows: its checks do not count
        self.checks: dict[str, str] = {}  # snapshot -> outcome
        self.roundtrips: Counter[str] = Counter()
        # every check's record (see StateDictSession.check_finished), a snapshot's last one
        self.results: dict[str, dict[str, Any]] = {}
        # files an earlier, discarded attempt wrote: still written, though now they pass
        self.written = written or {}

    def settled(self, outcome: str, path: str | None = None) -> str:
        """A check's outcome once its test's is known: a failure the test expected (inside
        ``pytest.raises``) is a pass, and a file an earlier attempt wrote stays written."""
        if outcome == "passed" and path is not None:
            return self.written.get(path, outcome)
        if outcome == "failed" and not self.failed:
            return "passed"
        return outcome

    def counts(self) -> Counter[str]:
        return Counter(self.settled(outcome, path) for path, outcome in self.checks.items())

    def files_written(self) -> list[str]:
        """The snapshot files this attempt (or an earlier, discarded one) wrote or updated."""
        return [
            path for path, outcome in self.checks.items() if self.settled(outcome, path) in WRITTEN
        ]

    def add_results(self, results: Iterable[dict[str, Any]]) -> None:
        for record in results:
            key = record.get("path") or f"#{len(self.results)}"
            self.results[key] = record

    def settled_results(self, nodeid: str) -> list[dict[str, Any]]:
        settled = []
        for record in self.results.values():
            record = {**record, "test": nodeid}
            record["outcome"] = self.settled(record["outcome"], record.pop("path", None))
            settled.append(record)
        return settled


class StateDictSession:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.update = bool(config.getoption("statedict_update"))
        self.warn_unused = bool(config.getoption("statedict_warn_unused"))
        self.verbose = _verbosity(config) >= 2
        ini_dir = config.getini("statedict_snapshot_dir")
        self.snapshot_root = (config.rootpath / ini_dir) if ini_dir else None
        self.item: pytest.Item | None = None
        # settled counts of the run (checks, round-trip device pairs)
        self.counts: Counter[str] = Counter()
        self.roundtrip_counts: Counter[str] = Counter()
        # every check's settled record, in the order the tests settled (the run report)
        self.results: list[dict[str, Any]] = []
        reports = config.getoption("statedict_report", None) or []
        self.report_paths = [Path(config.invocation_params.dir, p) for p in reports]
        self.reports_written: list[Path] = []
        # what the running phase did, until its report carries it away; round_trip.py
        # counts its device pairs into ``roundtrips``
        self.roundtrips: Counter[str] = Counter()
        self._checks: list[tuple[str, str]] = []  # (snapshot, outcome)
        self._results: list[dict[str, Any]] = []  # the phase's check records
        self._used: list[str] = []
        self._missing: list[str] = []
        self._fixtures_ran: list[str] = []
        # the running attempt's files per owner folder, and its next unnamed index
        self.asked: dict[str, set[str]] = defaultdict(set)
        self.unnamed_index: Counter[str] = Counter()
        self.fixture_stack: list[tuple[Any, Any] | None] = []
        self.collected_items: list[pytest.Item] = []  # until collection finishes
        self.narrowed_by: str | None = None  # why some collected tests were never items
        self.modules: dict[str, ModuleRecord] = {}
        self.directories: set[str] = set()  # folders that hold collected test files
        self.used: set[str] = set()
        self.missing: set[str] = set()  # snapshots asked for that do not exist
        self.fixtures_ran: set[str] = set()  # fixture folders whose fixture was set up
        self.attempts: dict[str, Attempt] = {}
        self.outcomes: dict[str, str] = {}
        self.incomplete: str | None = None  # why unused files cannot be judged
        self.linked_roots: dict[Path, Path] = {}  # snapshot root -> the symlink to it
        self.unused: list[Path] = []
        self.deleted: list[Path] = []
        self.written_files: set[Path] = set()  # snapshot files written or updated
        self.problems: list[str] = []

    # ---- collection ------------------------------------------------------------------

    def root_for(self, file_path: Path) -> Path:
        """The snapshot root of a test file: its ``__statedict__``, or the ini folder."""
        if self.snapshot_root is not None:
            return self.snapshot_root
        return file_path.parent / storage.SNAPSHOT_DIRNAME

    def module_dir(self, module_path: Path, *, legacy: bool = False) -> Path:
        name = storage.legacy_name if legacy else storage.module_dirname
        if self.snapshot_root is None:
            return module_path.parent / storage.SNAPSHOT_DIRNAME / name(module_path.stem)
        try:
            relative = module_path.relative_to(self.config.rootpath)
        except ValueError:
            relative = Path(module_path.name)
        parts = [name(p) for p in relative.with_suffix("").parts]
        return self.snapshot_root.joinpath(*parts)

    def start(self) -> None:
        """Before collection: note whether ``--lf`` will run only the tests that failed.

        pytest's last-failed plugin drops the other tests while it collects each module,
        before any item exists and without ``pytest_deselected``: nothing at collection
        can tell. Its record of failures is read now, before the run's reports change it.
        """
        lf = self.config.pluginmanager.get_plugin("lfplugin")
        if self.config.getoption("lf", False) and getattr(lf, "lastfailed", None):
            self.narrowed_by = "--lf ran only the tests that failed last"

    def items_collected(self, items: list[pytest.Item]) -> None:
        """Every collected item, before collection hooks filter them."""
        self.collected_items = items

    def collection_finished(self, items: list[pytest.Item]) -> None:
        """File the items that will run under their test files; a file that lost any item
        to collection hooks (``-k``, ``-m``, a conftest's ``items[:] = ...`` that never calls
        ``pytest_deselected``, ``--sw``) did not run whole.
        """
        for record, item in self._by_module(items):
            record.items.append(item)
        kept = set(map(id, items))
        dropped = [item for item in self.collected_items if id(item) not in kept]
        for record, _ in self._by_module(dropped):
            record.partial = True
        self.collected_items = []

    def _by_module(
        self, items: Iterable[pytest.Item]
    ) -> Iterator[tuple[ModuleRecord, pytest.Item]]:
        """Each item of a test file with its file's record.

        Items of one file come together and share one ``path`` object, so the record is
        looked up once per file: this runs over every collected item of every pytest run.
        """
        path: Path | None = None
        record: ModuleRecord | None = None
        for item in items:
            item_path = getattr(item, "path", None)
            if item_path is not path:
                path = item_path
                record = self._module_record(path) if path is not None else None
            if record is not None:
                yield record, item

    def _module_record(self, path: Path) -> ModuleRecord:
        key = str(path)
        record = self.modules.get(key)
        if record is None:
            record = self.modules[key] = ModuleRecord(
                path, self.module_dir(path), self.root_for(path)
            )
            self.directories.add(str(path.parent))
        return record

    @cached_property
    def narrowed_modules(self) -> set[str]:
        """Modules named with ``::`` on the command line: only some of their tests ran."""
        return {
            str(Path(self.config.invocation_params.dir, arg.split("::")[0]).resolve())
            for arg in self.config.args
            if "::" in arg
        }

    @cached_property
    def named_folders(self) -> list[Path]:
        """Folders named on the command line: every test module in them was collected."""
        paths = (
            Path(self.config.invocation_params.dir, arg).resolve()
            for arg in self.config.args
            if "::" not in arg
        )
        return [path for path in paths if path.is_dir()]

    def ran_whole(self, record: ModuleRecord) -> bool:
        if record.partial:
            return False
        return not record.items or str(record.path.resolve()) not in self.narrowed_modules

    # ---- running tests ---------------------------------------------------------------

    def start_test(self, item: pytest.Item) -> None:
        self.item = item

    def finish_test(self, item: pytest.Item) -> None:
        self.item = None

    def start_attempt(self, item: pytest.Item) -> None:
        """A test's setup begins: a rerun (or a duplicate) asks for its files afresh.

        A wider fixture's count goes on: its teardown's checks follow its setup's.
        """
        self.item = item
        for folder in [f for f in self.asked if not storage.is_fixture_path(f)]:
            del self.asked[folder]
        for folder in [f for f in self.unnamed_index if not storage.is_fixture_path(f)]:
            del self.unnamed_index[folder]

    def fixture_starts(self, fixturedef: Any, request: Any) -> None:
        """Checks made while a wider-scoped fixture is set up are filed under the fixture.

        Which test triggers a class- or module-scoped fixture depends on order and
        selection (pytest-randomly, ``-k``); the fixture's own folder does not.
        """
        if fixturedef.scope == "function" or getattr(request.node, "path", None) is None:
            self.fixture_stack.append(None)  # checks in it are the test's
            return
        entry = (fixturedef, request)
        if fixturedef.scope in ("class", "module"):
            folder = str(self._fixture_owner(fixturedef, request).folder)
            self.asked.pop(folder, None)
            self.unnamed_index.pop(folder, None)
            # Its teardown is filed under it too. A fixture's finalizers run last in, first
            # out: this one runs after its teardown, the one added once it is set up before.
            fixturedef.addfinalizer(functools.partial(self._fixture_torn_down, entry))
        self.fixture_stack.append(entry)

    def fixture_finished(self, ok: bool) -> None:
        """A fixture set up whole may have unused files (only a folder that exists can)."""
        entry = self.fixture_stack.pop()
        if ok and entry is not None and entry[0].scope in ("class", "module"):
            entry[0].addfinalizer(functools.partial(self.fixture_stack.append, entry))
            folder = self._fixture_owner(*entry).folder
            if folder.is_dir():
                self._fixtures_ran.append(str(folder))

    def _fixture_torn_down(self, entry: tuple[Any, Any]) -> None:
        if self.fixture_stack and self.fixture_stack[-1] is entry:
            self.fixture_stack.pop()

    def take_phase_record(self) -> dict[str, Any] | None:
        """What the phase that just ended did, for its report; None when nothing."""
        if not (
            self._checks or self._used or self._fixtures_ran or self.roundtrips or self._results
        ):
            return None
        record = {
            "checks": self._checks,
            "used": self._used,
            "missing": self._missing,
            "fixtures": self._fixtures_ran,
            "roundtrips": dict(self.roundtrips),
            "results": self._results,
        }
        self._checks, self._used, self._missing, self._fixtures_ran = [], [], [], []
        self._results = []
        self.roundtrips = Counter()
        return record

    def report(self, report: pytest.TestReport) -> None:
        """Read a phase's report: files used, and the test's outcome and counts.

        A test's attempt begins with its setup report; a ``rerun`` report (pytest-
        rerunfailures) discards the attempt. The last attempt's teardown settles the
        counts: a check's failure counts only if its test failed (a mismatch the test
        expects, ``pytest.raises``, counts as passed).
        """
        nodeid, outcome = report.nodeid, report.outcome
        if report.when == "setup" or nodeid not in self.attempts:
            earlier = self.attempts.get(nodeid)
            written = None
            if earlier is not None and earlier.discarded:
                written = {p: o for p, o in earlier.checks.items() if o in WRITTEN}
                written.update(earlier.written)
            self.attempts[nodeid] = Attempt(written)
            self.outcomes.pop(nodeid, None)
        attempt = self.attempts[nodeid]
        if outcome != "passed":
            self.outcomes[nodeid] = outcome
        else:
            self.outcomes.setdefault(nodeid, "passed")
        attempt.discarded = attempt.discarded or outcome == "rerun"
        attempt.failed = attempt.failed or outcome == "failed"
        record = getattr(report, REPORT_KEY, None)
        if record:
            self.used.update(record["used"])
            self.missing.update(record.get("missing", ()))
            self.fixtures_ran.update(record["fixtures"])
            attempt.checks.update(record["checks"])
            attempt.roundtrips.update(record["roundtrips"])
            attempt.add_results(record.get("results", ()))
        if report.when == "teardown":
            self._settle(nodeid)

    def _settle(self, nodeid: str) -> None:
        attempt = self.attempts.get(nodeid)
        if attempt is None or attempt.discarded:
            return  # a discarded attempt stays until the next one takes its writes over
        del self.attempts[nodeid]
        self.counts.update(attempt.counts())
        self.written_files.update(Path(path) for path in attempt.files_written())
        roundtrips = attempt.roundtrips
        if not attempt.failed:
            roundtrips["passed"] += roundtrips.pop("failed", 0)
        self.roundtrip_counts.update(roundtrips)
        self.results.extend(attempt.settled_results(nodeid))

    def nodes_down(self, reason: str) -> None:
        """A worker crashed or was lost: its share of the run is unknown."""
        self.incomplete = self.incomplete or reason

    @contextmanager
    def snapshot_check(self) -> Iterator[None]:
        """A snapshot check runs inside: a failure's words go with its record.

        A check that failed before it had a file to record (an unsupported object) counts
        as no snapshot check.
        """
        __tracebackhide__ = True
        recorded = len(self._results)
        try:
            yield
        except Exception as exc:
            failed = [r for r in self._results[recorded:] if r["outcome"] == "failed"]
            if failed:
                failed[-1].update(self._failure(exc))
            raise

    def claim_snapshot(self, name: str | None) -> SnapshotSlot:
        """The snapshot file the running test (or fixture) asks for under ``name``.

        A test that asks for one file twice is refused; a file found only under its 0.1.0
        name is read from there (and moved under ``--statedict-update``).
        """
        item = self.item
        assert item is not None
        owner = self.current_owner()
        path, legacy = self.snapshot_paths(owner, name)
        key = str(path)
        asked = self.asked[str(owner.folder)]
        if key in asked:
            raise StateDictError(
                f"{item.nodeid} checks snapshot {self.relative(path)} twice: give each check in "
                "a test its own name= (or leave all of them unnamed)"
            )
        asked.add(key)
        self._use(key)
        source = path
        if legacy is not None and not _exists(path) and storage.exists_as_named(legacy, owner.root):
            source = legacy
            self._use(str(legacy))
        return SnapshotSlot(
            path=path,
            source=source,
            root=owner.root,
            shown=self.relative(source),
            accept=f"pytest --statedict-update {_shell_quoted(item.nodeid)}",
            exists=_exists(source),
        )

    def write_snapshot(self, slot: SnapshotSlot, text: str) -> None:
        """Write a missing snapshot (under ``--statedict-update`` only)."""
        __tracebackhide__ = True
        self._write(slot, text)
        self.record_snapshot(slot, "written")

    def rewrite_snapshot(self, slot: SnapshotSlot, text: str) -> None:
        """Update a snapshot; one read under its 0.1.0 name moves to its name now."""
        __tracebackhide__ = True
        self._write(slot, text)
        if slot.source != slot.path:
            try:
                storage.remove_snapshot(
                    slot.source,
                    slot.root,
                    base=self.root_base(slot.root),
                    display=self.relative(slot.source),
                )
            except SnapshotError:
                self.record_snapshot(slot, "failed")
                raise
        self.record_snapshot(slot, "updated")

    def snapshot_missing(self, slot: SnapshotSlot) -> None:
        """The test asked for a snapshot that does not exist (and nothing was written)."""
        self.record_snapshot(slot, "failed")
        self._missing.append(str(slot.path))

    def _use(self, key: str) -> None:
        self.used.add(key)
        self._used.append(key)

    def record_snapshot(self, slot: SnapshotSlot, outcome: str) -> None:
        """A snapshot check's outcome: passed, failed, written or updated."""
        path = slot.path
        self._checks.append((str(path), outcome))
        self._results.append(
            {
                "kind": "snapshot",
                "name": self.from_root(path),
                "path": str(path),
                "outcome": outcome,
            }
        )

    def check_finished(
        self, kind: str, name: str, outcome: str, exc: BaseException | None = None, **extra: Any
    ) -> None:
        """A check other than a snapshot's (a gate, a release, a comparison, a round-trip)
        ended: its record goes with the phase's report, as a snapshot check's does."""
        if kind == "roundtrip":
            self.roundtrips[outcome] += 1
        record = {"kind": kind, "name": name, "outcome": outcome, **extra}
        if exc is not None:
            record.update(self._failure(exc))
        self._results.append(record)

    def _failure(self, exc: BaseException) -> dict[str, Any]:
        """A failed check's message, and its structured diff (for the run report and JUnit)."""
        from .errors import first_line

        if isinstance(exc, (AssertionError, StateDictError)):
            message = str(exc)
        else:  # not a verdict but an error on the way: its type says what happened
            message = first_line(exc, 2000)
        failure: dict[str, Any] = {"message": message}
        diff = getattr(exc, "diff", None)
        if diff is not None and type(diff).__name__ == "SchemaDiff":
            from .report import diff_to_json

            failure["diff"] = diff_to_json(diff)
        return failure

    def from_root(self, path: Path) -> str:
        """A path as the run report names it: relative to the rootdir, with '/'."""
        try:
            return Path(os.path.relpath(path, self.config.rootpath)).as_posix()
        except ValueError:
            return str(path)

    def _write(self, slot: SnapshotSlot, text: str) -> None:
        __tracebackhide__ = True
        try:
            storage.write_snapshot(
                slot.path,
                text,
                slot.root,
                base=self.root_base(slot.root),
                display=self.relative(slot.path),
            )
        except SnapshotError:
            self.record_snapshot(slot, "failed")
            raise

    def current_owner(self) -> Owner:
        """The fixture being set up, if it is wider than a test, else the running test."""
        entry = self.fixture_stack[-1] if self.fixture_stack else None
        if entry is not None:
            return self._fixture_owner(*entry)
        item = self.item
        assert item is not None
        parts = storage.item_parts(item)
        folder = self.module_dir(item.path) / storage.test_dirname(parts)
        legacy = self.module_dir(item.path, legacy=True) / storage.legacy_name(".".join(parts))
        return Owner(folder, None if legacy == folder else legacy, self.root_for(item.path))

    def _fixture_owner(self, fixturedef: Any, request: Any) -> Owner:
        """``fixture-<name>`` in the module's folder (class scope: ``fixture-<Class>.<name>``).

        A session- or package-scoped fixture is set up once for many files: its checks go
        to the folder of the file that defines it (a conftest.py, most often).
        """
        import pytest

        param = _param_id(request) if hasattr(request, "param") else None
        if fixturedef.scope in ("class", "module"):
            node = request.node
            parts = [n.name for n in node.listchain() if isinstance(n, pytest.Class)]
            path = node.path
        else:
            import inspect

            source = inspect.getsourcefile(fixturedef.func)
            path = Path(source).resolve() if source else None
            if path is None or not path.is_relative_to(self.config.rootpath):
                raise StateDictError(
                    f"fixture {fixturedef.argname!r} ({fixturedef.scope} scope) checks a "
                    f"snapshot, but it is defined outside the project ({source}), where no "
                    "snapshot can be kept: check it in a test, or in a fixture of the project"
                )
            parts = []
        dirname = storage.fixture_dirname([*parts, fixturedef.argname], param)
        return Owner(self.module_dir(path) / dirname, None, self.root_for(path))

    def snapshot_paths(self, owner: Owner, name: str | None) -> tuple[Path, Path | None]:
        """The snapshot's path, and its 0.1.0 path where that differs."""
        index = 0
        if name is None:
            index = self.unnamed_index[str(owner.folder)]
            self.unnamed_index[str(owner.folder)] += 1
        path = owner.folder / storage.leaf_name(name, index)
        legacy_folder = owner.legacy_folder or owner.folder
        legacy = legacy_folder / storage.legacy_leaf_name(name, index)
        return path, None if legacy == path else legacy

    # ---- end of session --------------------------------------------------------------

    def root_base(self, root: Path) -> Path:
        """The folder a snapshot root is named from: the rootdir, or the test file's folder."""
        return self.config.rootpath if self.snapshot_root is not None else root.parent

    def collected_whole(self, directory: Path) -> bool:
        """Whether a folder named on the command line (no ``::``, no file) holds ``directory``."""
        resolved = directory.resolve()
        return any(resolved.is_relative_to(folder) for folder in self.named_folders)

    def finish(self, session: pytest.Session, exitstatus: int) -> bool:
        """Detect (and under --statedict-update delete) unused snapshots.

        Returns True when the session should fail because of them, or because a file could
        not be deleted. An xdist worker sees only its share of the run and leaves this to
        the controller. A run that did not go to its end (a lost worker, Ctrl-C, ``-x``, an
        internal error) judges nothing unused: its tests' files may look unasked for.
        """
        for nodeid in list(self.attempts):
            self._settle(nodeid)  # tests cut short have no teardown report
        if hasattr(self.config, "workerinput"):
            return False
        self.incomplete = (
            self.incomplete
            or _tests_not_run(self.config)
            or _cut_short(session, exitstatus)
            or self.narrowed_by
        )
        if self.incomplete is not None:
            return bool(self.problems)
        try:
            self.unused = find_unused(self)
        except OSError as exc:
            self.problems.append(f"statedict: cannot look for unused snapshots ({exc})")
            self.unused = []
        if self.update:
            for path in self.unused:
                try:
                    root = self._root_of(path)
                    storage.remove_snapshot(
                        path, root, base=self.root_base(root), display=self.relative(path)
                    )
                except SnapshotError as exc:
                    self.problems.append(str(exc))
                else:
                    self.deleted.append(path)
            self.unused = [p for p in self.unused if p not in self.deleted]
        return self.fails_session

    def _root_of(self, path: Path) -> Path:
        """The snapshot root above a listed file: the ini folder or its ``__statedict__``."""
        if self.snapshot_root is not None:
            return self.snapshot_root
        return next(p for p in path.parents if p.name == storage.SNAPSHOT_DIRNAME)

    @property
    def fails_session(self) -> bool:
        """Unused snapshots fail the run, unless --statedict-warn-unused (or updating)."""
        unused = bool(self.unused) and not self.warn_unused and not self.update
        return unused or bool(self.problems)

    def kind_counts(self, kind: str) -> Counter[str]:
        """The settled outcomes of one kind of check (gates, releases, comparisons)."""
        return Counter(r["outcome"] for r in self.results if r["kind"] == kind)

    @property
    def any_failed(self) -> bool:
        """Whether a check of any kind failed (the summary line is then red)."""
        return bool(
            self.counts["failed"]
            or self.roundtrip_counts["failed"]
            or any(self.kind_counts(kind)["failed"] for kind, _ in CHECK_KINDS)
        )

    def has_snapshots(self) -> bool:
        return any(record.snapshot_dir.is_dir() for record in self.modules.values())

    def summary_line(self) -> str | None:
        sections = [
            *self._snapshot_section(),
            *self._roundtrip_section(),
            *self._check_sections(),
        ]
        sections.extend(self._unused_not_checked(bool(sections)))
        return f"statedict: {'; '.join(sections)}" if sections else None

    def _snapshot_section(self) -> list[str]:
        """The snapshot checks' section of the summary line (none if nothing to count)."""
        parts = [
            f"{self.counts[k]} {k}"
            for k in ("passed", "failed", "written", "updated")
            if self.counts[k]
        ]
        if self.written_files:
            parts[-1] += f" in {self.written_folders()}"
        if self.deleted:
            parts.append(f"{len(self.deleted)} deleted")
        if self.unused:
            parts.append(f"{len(self.unused)} unused")
        if self.problems:
            parts.append(f"{len(self.problems)} error{'s' if len(self.problems) > 1 else ''}")
        return [", ".join(parts)] if parts else []

    def written_folders(self) -> str:
        """Where the run wrote snapshots: their roots, relative to the rootdir (the folder
        a user commits), e.g. ``tests/__statedict__/``."""
        folders = sorted({self.from_root(self._root_of(path)) + "/" for path in self.written_files})
        shown = folders[:MAX_FOLDERS_SHOWN]
        more = len(folders) - len(shown)
        if more:
            shown.append(f"{more} more folder{'s' if more > 1 else ''}")
        return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]

    def _roundtrip_section(self) -> list[str]:
        trips = [
            f"{self.roundtrip_counts[k]} {k}"
            for k in ("passed", "failed", "skipped")
            if self.roundtrip_counts[k]
        ]
        return ["round-trips: " + ", ".join(trips)] if trips else []

    def _check_sections(self) -> list[str]:
        """A section for each kind of check (gates, releases, comparisons) that ran."""
        sections = []
        for kind, label in CHECK_KINDS:
            counted = self.kind_counts(kind)
            words = [f"{counted[k]} {k}" for k in OUTCOMES if counted[k]]
            if words:
                sections.append(f"{label}: " + ", ".join(words))
        return sections

    def _unused_not_checked(self, counted: bool) -> list[str]:
        """Why unused snapshots went unchecked: said of an incomplete run only where it
        counted something or has snapshots, and of each root behind a symlink."""
        reasons = []
        if self.incomplete is not None and (counted or self.has_snapshots()):
            reasons.append(f"unused snapshots not checked: {self.incomplete}")
        for root, link in self.linked_roots.items():
            reasons.append(
                f"unused snapshots not checked in {self.relative(root)}: "
                f"{self.relative(link)} is a symlink"
            )
        return reasons

    def relative(self, path: Path) -> str:
        try:
            return os.path.relpath(path, self.config.invocation_params.dir)
        except ValueError:
            return str(path)


def _tests_not_run(config: pytest.Config) -> str | None:
    """Why the tests reported without running, or None: then no file was asked for."""
    for option, flag in (
        ("collectonly", "--collect-only"),
        ("setupplan", "--setup-plan"),
        ("setuponly", "--setup-only"),
    ):
        if config.getoption(option, False):
            return f"{flag} runs no test"
    return None


def _cut_short(session: pytest.Session, exitstatus: int) -> str | None:
    """Why the run did not go to its end, or None if it did."""
    stopped = session.shouldfail or session.shouldstop
    if stopped:
        return f"the run stopped early ({stopped})"
    if exitstatus == 2:
        return "the run was interrupted"
    if exitstatus not in FINISHED_EXIT_CODES:
        return f"the run ended with exit code {int(exitstatus)}"
    return None


def _exists(path: Path) -> bool:
    """Whether anything is there (a broken symlink too: it is not a missing snapshot)."""
    return os.path.lexists(path)


def _param_id(request: Any) -> str:
    """A parametrized fixture's id: its value where that is a plain scalar, else its index."""
    param = request.param
    if isinstance(param, (str, int, float, bool)) or param is None:
        return str(param)
    return str(request.param_index)


def _shell_quoted(nodeid: str) -> str:
    """Quoted for a POSIX shell always (``[id]`` is a glob in zsh), quotes in ids included."""
    return "'" + nodeid.replace("'", "'\"'\"'") + "'"


def _verbosity(config: pytest.Config) -> int:
    get = getattr(config, "get_verbosity", None)
    return int(get()) if get is not None else int(config.option.verbose)
