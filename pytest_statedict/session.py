"""The plugin's state for one pytest run: which test is running, which snapshots it asked
for, what was written, and which snapshot files nobody asked for.

The pytest hooks in :mod:`.plugin` hand straight to this object. It imports no torch: that
happens on the first snapshot check.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .errors import SnapshotError, StateDictError, StateDictMismatch, hide_from_bad_input
from .runtime import key_normaliser

if TYPE_CHECKING:
    import pytest

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


class ModuleRecord:
    """A test module's collected tests, to decide whether it ran whole.

    Collection only files each item under its module (the plugin is loaded into every run,
    most of which never use it); names are worked out at the end, and only for modules
    that have snapshot files.
    """

    def __init__(self, path: Path, snapshot_dir: Path) -> None:
        self.path = path
        self.snapshot_dir = snapshot_dir
        self.items: list[pytest.Item] = []
        self.merged_tests: dict[str, str] = {}  # from xdist workers
        self.partial = False

    def tests(self) -> dict[str, str]:
        """Test folder name -> node id, for every collected test of the module."""
        names = {storage.test_dirname(_test_parts(item)): item.nodeid for item in self.items}
        return {**self.merged_tests, **names}


class StateDictSession:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.update = bool(config.getoption("statedict_update"))
        self.warn_unused = bool(config.getoption("statedict_warn_unused"))
        self.verbose = _verbosity(config) >= 2
        ini_dir = config.getini("statedict_snapshot_dir")
        self.snapshot_root = (config.rootpath / ini_dir) if ini_dir else None
        self.item: pytest.Item | None = None
        self.counts: Counter[str] = Counter()
        self.roundtrips: Counter[str] = Counter()
        self.modules: dict[str, ModuleRecord] = {}
        self.directories: set[str] = set()  # folders that hold collected test modules
        self.used: set[str] = set()
        self.asked_by_test: dict[str, set[str]] = defaultdict(set)
        self.unnamed_index: Counter[str] = Counter()
        self.outcomes: dict[str, str] = {}
        self.unused: list[Path] = []
        self.deleted: list[Path] = []
        self.problems: list[str] = []

    # ---- collection ------------------------------------------------------------------

    def module_dir(self, module_path: Path) -> Path:
        if self.snapshot_root is None:
            return storage.module_snapshot_dir(module_path)
        try:
            relative = module_path.relative_to(self.config.rootpath)
        except ValueError:
            relative = Path(module_path.name)
        parts = [storage.sanitise(p) for p in relative.with_suffix("").parts]
        return self.snapshot_root.joinpath(*parts)

    def collected(self, items: Iterable[pytest.Item]) -> None:
        for record, item in self._by_module(items):
            record.items.append(item)

    def deselected(self, items: Iterable[pytest.Item]) -> None:
        for record, _ in self._by_module(items):
            record.partial = True

    def _by_module(
        self, items: Iterable[pytest.Item]
    ) -> Iterator[tuple[ModuleRecord, pytest.Item]]:
        """Each item of a ``.py`` test module with its module's record.

        Items of one module come together and share one ``path`` object, so the record is
        looked up once per module: this runs over every collected item of every pytest run.
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

    def _module_record(self, path: Path) -> ModuleRecord | None:
        if path.suffix != ".py":
            return None
        key = str(path)
        record = self.modules.get(key)
        if record is None:
            record = self.modules[key] = ModuleRecord(path, self.module_dir(path))
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

    def report(self, nodeid: str, when: str, outcome: str) -> None:
        """Keep each test's worst outcome: it decides whether its unasked files are unused."""
        if outcome != "passed":
            self.outcomes[nodeid] = outcome
        else:
            self.outcomes.setdefault(nodeid, "passed")

    def check_snapshot(self, actual: Any, *, name: str | None, **opts: Any) -> None:
        """Check ``actual`` against the current test's snapshot (written under the update flag)."""
        __tracebackhide__ = True
        from .assertions import prepared_schema
        from .compare import diff_schemas, normalise, without_ignored_members
        from .report import render_diff
        from .schema import Schema

        item = self.item
        assert item is not None
        path = self.snapshot_path_for(item, name)
        key = str(path)
        if key in self.asked_by_test[item.nodeid]:
            raise StateDictError(
                f"{item.nodeid} checks snapshot {self.relative(path)} twice: give each check in "
                "a test its own name= (or leave all of them unnamed)"
            )
        self.asked_by_test[item.nodeid].add(key)
        self.used.add(key)
        rtol, atol = opts.pop("rtol"), opts.pop("atol")
        actual_schema = prepared_schema(actual, **opts)
        problems = actual_schema.optimizer.problems if actual_schema.optimizer else ()
        # ignored keys' optimizer members stay out of the file (the diff drops them too)
        text = without_ignored_members(actual_schema, opts["ignore"]).to_json()
        accept = f"pytest --statedict-update {_shell_quoted(item.nodeid)}"

        if not path.exists():
            if self.update:
                storage.atomic_write(path, text)
                self.counts["written"] += 1
                self._fail_on_problems(problems, path)
                return
            self.counts["failed"] += 1
            raise StateDictMismatch(
                f"no statedict snapshot {self.relative(path)} yet: nothing was written. "
                "Create it with\n"
                f"  {accept}\nand commit it."
            )
        try:
            current = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.counts["failed"] += 1
            raise SnapshotError(self.relative(path), f"cannot be read ({exc})") from None
        if current == text and not problems:
            self.counts["passed"] += 1
            return
        try:
            expected = normalise(
                Schema.from_json(current, self.relative(path)), rename=key_normaliser()
            )
        except SnapshotError:
            if self.update:
                storage.atomic_write(path, text)
                self.counts["updated"] += 1
                return
            self.counts["failed"] += 1
            raise
        diff = diff_schemas(expected, actual_schema, rtol=rtol, atol=atol, ignore=opts["ignore"])
        if not diff:
            if self.update and rtol is None and atol is None:
                # same schema, other text (an older writer): refresh it, or it would show
                # up in the next unrelated pull request
                storage.atomic_write(path, text)
                self.counts["updated"] += 1
                return
            self.counts["passed"] += 1
            return
        if self.update and not diff.problems:
            storage.atomic_write(path, text)
            self.counts["updated"] += 1
            return
        self.counts["failed"] += 1
        raise StateDictMismatch(
            render_diff(
                diff,
                title=f"state_dict does not match snapshot {self.relative(path)}",
                verbose=self.verbose,
                accept_hint=None if diff.problems else accept,
            ),
            diff,
        )

    def _fail_on_problems(self, problems: Iterable[str], path: Path) -> None:
        __tracebackhide__ = True
        problems = list(problems)
        if problems:
            raise StateDictMismatch(
                f"snapshot {path} was written, but the optimizer state is inconsistent:\n  "
                + "\n  ".join(problems)
            )

    def snapshot_path_for(self, item: pytest.Item, name: str | None) -> Path:
        index = 0
        if name is None:
            index = self.unnamed_index[item.nodeid]
            self.unnamed_index[item.nodeid] += 1
        return storage.snapshot_path(self.module_dir(item.path), _test_parts(item), name, index)

    # ---- end of session --------------------------------------------------------------

    def find_unused(self) -> list[Path]:
        """Files in modules that ran whole that no test asked for.

        A file belongs to a test (its folder); it is unused if that test no longer exists,
        or if the test passed without asking for it. Deselected, skipped and failed tests
        never make a file unused.
        """
        unused = []
        for record in self.modules.values():
            files = storage.snapshot_files(record.snapshot_dir)
            if not files or not self.ran_whole(record):
                continue
            tests = record.tests()
            if any(nodeid not in self.outcomes for nodeid in tests.values()):
                continue  # the run stopped early (-x, a crash): the module did not run whole
            for path in files:
                if str(path) in self.used:
                    continue
                owner = tests.get(path.parent.name)
                if owner is None or self.outcomes.get(owner) == "passed":
                    unused.append(path)
        return unused + self.find_orphans()

    def find_orphans(self) -> list[Path]:
        """Snapshots of test modules that no longer exist, in folders collected whole.

        ``__statedict__/<module>/`` whose ``<module>.py`` is gone (deleted or renamed) can
        never be asked for again. Only folders that the run collected as a whole (a folder
        named on the command line, or below one) are looked at, and only in the default
        layout (beside the test files).
        """
        if self.snapshot_root is not None:
            return []
        orphans = []
        for directory in sorted(map(Path, self.directories)):
            snapshots = directory / storage.SNAPSHOT_DIRNAME
            if not snapshots.is_dir() or not self.collected_whole(directory):
                continue
            modules = {storage.sanitise(p.stem) for p in directory.glob("*.py")}
            for folder in sorted(snapshots.iterdir()):
                if folder.is_dir() and folder.name not in modules:
                    orphans.extend(storage.snapshot_files(folder))
        return orphans

    def collected_whole(self, directory: Path) -> bool:
        """Whether a folder named on the command line (no ``::``, no file) holds ``directory``."""
        resolved = directory.resolve()
        return any(resolved.is_relative_to(folder) for folder in self.named_folders)

    def finish(self) -> bool:
        """Detect (and under --statedict-update delete) unused snapshots.

        Returns True when the session should fail because of them. An xdist worker sees
        only its share of the run and leaves this to the controller.
        """
        if hasattr(self.config, "workerinput"):
            return False
        self.unused = self.find_unused()
        if self.update:
            for path in self.unused:
                storage.remove_snapshot(path)
            self.deleted = self.unused
            return False
        return self.fails_session

    @property
    def fails_session(self) -> bool:
        """Unused snapshots fail the run, unless --statedict-warn-unused (or updating)."""
        return bool(self.unused) and not self.warn_unused and not self.update

    def summary_line(self) -> str | None:
        parts = [
            f"{self.counts[k]} {k}"
            for k in ("passed", "failed", "written", "updated")
            if self.counts[k]
        ]
        if self.deleted:
            parts.append(f"{len(self.deleted)} deleted")
        elif self.unused:
            parts.append(f"{len(self.unused)} unused")
        line = f"statedict: {', '.join(parts)}" if parts else ""
        trips = [
            f"{self.roundtrips[k]} {k}"
            for k in ("passed", "failed", "skipped")
            if self.roundtrips[k]
        ]
        if trips:
            line = (line + "; " if line else "statedict: ") + "round-trips: " + ", ".join(trips)
        return line or None

    def relative(self, path: Path) -> str:
        try:
            return os.path.relpath(path, self.config.invocation_params.dir)
        except ValueError:
            return str(path)


def _test_parts(item: pytest.Item) -> list[str]:
    """The names from the module down to the test: ``["TestA", "test_x[id]"]``."""
    import pytest

    parts = []
    for node in item.listchain():
        if isinstance(node, pytest.Module):
            parts = []
        else:
            parts.append(node.name)
    return parts


def _shell_quoted(nodeid: str) -> str:
    """Quoted for a POSIX shell always (``[id]`` is a glob in zsh), quotes in ids included."""
    return "'" + nodeid.replace("'", "'\"'\"'") + "'"


def _verbosity(config: pytest.Config) -> int:
    get = getattr(config, "get_verbosity", None)
    return int(get()) if get is not None else int(config.option.verbose)
