"""No snapshot is ever lost, wrongly filed or wrongly counted: crashes, interrupts, reruns,
repeats, doctest files, wider-scoped fixtures, case-insensitive names, read-only folders,
full disks, symlinks and files that are not snapshots.

Every test runs pytest on a small project (pytester; a subprocess where a real crash is
needed) and checks the exit code, the summary line and the files on disk.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import match_lines

from pytest_statedict import storage
from pytest_statedict.errors import SnapshotError
from pytest_statedict.readers.limits import MAX_SNAPSHOT_BYTES
from pytest_statedict.readers.snapshot_file import read_snapshot_text

CHECKS = """
    import os
    import pytest
    import torch
    from pytest_statedict import assert_state_dict_matches

    @pytest.mark.parametrize("n", range({n}))
    def test_width(n):
        if os.environ.get("STATEDICT_BREAK") == str(n):
            {breaks}
        assert_state_dict_matches({{"w": torch.zeros(n + 1)}})
"""


def checks(n: int = 4, breaks: str = "pass") -> str:
    return CHECKS.format(n=n, breaks=breaks)


def json_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json"))


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---- a lost worker or an interrupted run deletes nothing ---------------------------------

CRASHES = {
    "os-exit": "os._exit(1)",
    "segfault": "import signal; os.kill(os.getpid(), signal.SIGSEGV)",
    "oom-kill": "import signal; os.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize("crash", CRASHES.values(), ids=CRASHES.keys())
def test_a_crashed_worker_deletes_no_snapshot(
    pytester: pytest.Pytester, crash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_a=checks(), test_b=checks(breaks=crash))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=8)
    before = json_files(pytester.path / "__statedict__")
    assert len(before) == 8

    monkeypatch.setenv("STATEDICT_BREAK", "3")  # test_b's last test kills its worker
    result = pytester.runpytest_subprocess("-n", "2", "--statedict-update")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=7, failed=1)
    assert json_files(pytester.path / "__statedict__") == before
    assert " deleted" not in result.stdout.str()
    match_lines(result, ["statedict: 7 passed; unused snapshots not checked: worker gw* crashed*"])

    monkeypatch.delenv("STATEDICT_BREAK")
    result = pytester.runpytest()
    result.assert_outcomes(passed=8)
    match_lines(result, ["statedict: 8 passed"])


@pytest.mark.parametrize("xdist", [False, True], ids=["in-process", "xdist"])
def test_ctrl_c_deletes_no_snapshot(
    pytester: pytest.Pytester, xdist: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["-n", "2", "--dist", "loadfile"] if xdist else []
    if xdist:
        pytest.importorskip("xdist")
    pytester.makepyfile(test_a=checks(), test_b=checks())
    pytester.runpytest("--statedict-update").assert_outcomes(passed=8)
    before = json_files(pytester.path / "__statedict__")

    # the last test of a file is interrupted before its check: every test has reported
    pytester.makepyfile(test_b=checks(breaks="raise KeyboardInterrupt"))
    monkeypatch.setenv("STATEDICT_BREAK", "3")
    if xdist:
        result = pytester.runpytest_subprocess(*args, "--statedict-update")
    else:  # in-process, pytester re-raises the run's KeyboardInterrupt unless told not to
        result = pytester.runpytest_inprocess("--statedict-update", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert json_files(pytester.path / "__statedict__") == before
    match_lines(result, ["statedict: * passed; unused snapshots not checked: *interrupt*"])


# ---- a rerun is the same test; so is a duplicate and a repetition ------------------------

FLAKY = """
    import pathlib
    import pytest
    import torch
    from pytest_statedict import assert_state_dict_matches

    def test_flaky():
        assert_state_dict_matches({{"w": torch.zeros(3)}}, name={name!r})
        marker = pathlib.Path(__file__).parent / "attempted"
        if not marker.exists():
            marker.write_text("once")
            pytest.fail("flaky")
"""


@pytest.mark.parametrize("name", [None, "weights"], ids=["unnamed", "named"])
def test_a_flaky_test_passes_on_rerun_and_counts_once(
    pytester: pytest.Pytester, name: str | None
) -> None:
    pytest.importorskip("pytest_rerunfailures")
    pytester.makepyfile(test_a=FLAKY.format(name=name))
    result = pytester.runpytest("--reruns", "2", "--statedict-update")
    assert result.parseoutcomes() == {"passed": 1, "rerun": 1}
    match_lines(result, ["statedict: 1 written in __statedict__/"])
    leaf = f"{name or 0}.json"
    assert json_files(pytester.path / "__statedict__") == [f"test_a/test_flaky/{leaf}"]

    (pytester.path / "attempted").unlink()
    result = pytester.runpytest("--reruns", "2")
    assert result.parseoutcomes() == {"passed": 1, "rerun": 1}
    match_lines(result, ["statedict: 1 passed"])


def test_duplicates_kept_on_the_command_line_are_one_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=checks(n=1))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    result = pytester.runpytest("--keep-duplicates", "test_a.py", "test_a.py")
    result.assert_outcomes(passed=2)
    match_lines(result, ["statedict: 2 passed"])


def test_repetitions_share_the_snapshot_of_the_test(pytester: pytest.Pytester) -> None:
    """pytest-repeat's ``test_width[0-1-3]`` is ``test_width[0]`` asked three times."""
    pytest.importorskip("pytest_repeat")
    pytester.makepyfile(test_a=checks(n=2))
    result = pytester.runpytest("--count", "3", "--statedict-update")
    result.assert_outcomes(passed=6)
    match_lines(result, ["statedict: 4 passed, 2 written in __statedict__/"])
    expected = ["test_a/test_width[0]/0.json", "test_a/test_width[1]/0.json"]
    assert json_files(pytester.path / "__statedict__") == expected

    result = pytester.runpytest()
    result.assert_outcomes(passed=2)
    match_lines(result, ["statedict: 2 passed"])
    result = pytester.runpytest("--count", "2", "--statedict-update")
    match_lines(result, ["statedict: 4 passed"])
    assert json_files(pytester.path / "__statedict__") == expected


# ---- doctest files own their snapshots ---------------------------------------------------

DOCTEST = """
>>> import torch
>>> from pytest_statedict import assert_state_dict_matches
>>> assert_state_dict_matches({"w": torch.zeros(3)})
"""


@pytest.mark.parametrize("suffix", [".txt", ".md", ".rst"])
def test_doctest_files_own_their_snapshots(pytester: pytest.Pytester, suffix: str) -> None:
    pytester.makefile(suffix, test_doc=DOCTEST)
    pytester.makepyfile(test_a=checks(n=1))
    glob = f"--doctest-glob=*{suffix}"
    result = pytester.runpytest(glob, "--statedict-update")
    result.assert_outcomes(passed=2)
    snapshot = pytester.path / f"__statedict__/test_doc/test_doc{suffix}/0.json"
    assert snapshot.is_file()
    match_lines(result, ["statedict: 2 written in __statedict__/"])

    result = pytester.runpytest(glob)
    result.assert_outcomes(passed=2)
    match_lines(result, ["statedict: 2 passed"])
    # a run that does not collect the doctest file never takes its folder for an orphan
    result = pytester.runpytest("-p", "no:doctest", "--statedict-update")
    match_lines(result, ["statedict: 1 passed"])
    assert snapshot.is_file()


def test_module_doctests_own_their_snapshots(pytester: pytest.Pytester) -> None:
    helper = f"\n\ndef helper():\n    '''{DOCTEST}'''\n"
    pytester.makepyfile(test_a=textwrap.dedent(checks(n=1)) + helper)
    result = pytester.runpytest("--doctest-modules", "--statedict-update")
    result.assert_outcomes(passed=2)
    snapshot = pytester.path / "__statedict__/test_a/test_a.helper/0.json"
    assert snapshot.is_file()
    # a run without --doctest-modules collects the module but not its doctests
    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=1)
    assert snapshot.is_file()
    match_lines(result, ["statedict: 1 passed"])


# ---- checks in wider-scoped fixtures do not depend on test order or selection ------------

FIXTURES = """
    import pytest
    import torch
    from pytest_statedict import assert_state_dict_matches

    @pytest.fixture(scope="module")
    def model():
        m = torch.nn.Linear(2, 3)
        assert_state_dict_matches(m)
        yield m
        assert_state_dict_matches(torch.nn.Linear(3, 3))  # after the module's tests

    @pytest.fixture(scope="module", params=[2, 4])
    def wide(request):
        m = torch.nn.Linear(2, request.param)
        assert_state_dict_matches(m, name="wide")
        return m

    def test_first(model):
        assert_state_dict_matches(model, name="first")

    def test_second(model, wide):
        pass

    class TestGroup:
        @pytest.fixture(scope="class")
        def head(self):
            m = torch.nn.Linear(3, 1)
            assert_state_dict_matches(m)
            return m

        def test_one(self, head):
            pass

        def test_two(self, head, session_model):
            pass
"""

SESSION_FIXTURE = """
    import pytest
    import torch
    from pytest_statedict import assert_state_dict_matches

    @pytest.fixture(scope="session")
    def session_model():
        m = torch.nn.Linear(5, 5)
        assert_state_dict_matches(m)
        return m
"""


def test_checks_in_wider_fixtures_are_filed_under_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SESSION_FIXTURE)
    pytester.makepyfile(test_fix=FIXTURES)
    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=5)
    match_lines(result, ["statedict: 7 written in __statedict__/"])
    head = storage.fixture_dirname(["TestGroup", "head"], None)
    assert json_files(pytester.path / "__statedict__") == [
        "conftest/fixture-session_model/0.json",
        f"test_fix/{head}/0.json",
        "test_fix/fixture-model/0.json",
        "test_fix/fixture-model/1.json",
        "test_fix/fixture-wide[2]/wide.json",
        "test_fix/fixture-wide[4]/wide.json",
        "test_fix/test_first/first.json",
    ]
    for args in (
        ["-k", "second or two"],
        ["-k", "TestGroup"],
        ["-p", "randomly", "--randomly-seed=3"],
        ["-p", "randomly", "--randomly-seed=7"],
        ["--statedict-update", "-p", "randomly", "--randomly-seed=11"],
    ):
        result = pytester.runpytest(*args)
        assert result.ret == pytest.ExitCode.OK, args
        assert "written" not in result.stdout.str() and "unused" not in result.stdout.str()
    assert len(json_files(pytester.path / "__statedict__")) == 7

    # a fixture that did not run never makes its files unused; one that ran does
    skipped = FIXTURES.replace("def test_second", "@pytest.mark.skip\n    def test_second")
    pytester.makepyfile(test_fix=skipped)
    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=3, skipped=2)
    match_lines(result, ["statedict: 5 passed"])
    pytester.makepyfile(test_fix=FIXTURES.replace('assert_state_dict_matches(m, name="wide")', ""))
    result = pytester.runpytest("--statedict-update")
    match_lines(result, ["statedict: 5 passed, 2 deleted"])
    assert not (pytester.path / "__statedict__/test_fix/fixture-wide[2]").exists()
    assert len(json_files(pytester.path / "__statedict__")) == 5


def test_fixture_snapshots_under_xdist(pytester: pytest.Pytester) -> None:
    """A module's fixture may run on every worker: each reports it, none deletes its files."""
    pytest.importorskip("xdist")
    pytester.makeconftest(SESSION_FIXTURE)
    pytester.makepyfile(test_fix=FIXTURES)
    pytester.runpytest("--statedict-update").assert_outcomes(passed=5)
    result = pytester.runpytest_subprocess("-n", "2", "--statedict-update", "-p", "randomly")
    assert result.ret == pytest.ExitCode.OK
    for word in ("written", "updated", "deleted", "unused"):
        assert word not in result.stdout.str()
    pytester.makepyfile(test_fix=FIXTURES.replace('assert_state_dict_matches(m, name="wide")', ""))
    result = pytester.runpytest_subprocess("-n", "2", "--statedict-update")
    match_lines(result, ["statedict: * passed, 2 deleted"])
    assert len(json_files(pytester.path / "__statedict__")) == 5


def test_random_order_really_is_random_in_inner_runs(pytester: pytest.Pytester) -> None:
    """The suite turns pytest-randomly off in inner runs; ``-p randomly`` turns it back on."""
    pytest.importorskip("pytest_randomly")
    pytester.makepyfile("\n".join(f"def test_{i}(): pass" for i in range(20)))
    plain = pytester.runpytest("-v").outlines
    shuffled = pytester.runpytest("-v", "-p", "randomly", "--randomly-seed=1").outlines
    order = [line.split(" ")[0] for line in plain if "PASSED" in line]
    assert order == sorted(order, key=lambda t: int(t.rsplit("_", 1)[1]))
    assert [line.split(" ")[0] for line in shuffled if "PASSED" in line] != order


# ---- names unique ignoring case, and none that Windows refuses ---------------------------

CASES = """
    import pytest
    import torch
    from pytest_statedict import assert_state_dict_matches

    @pytest.mark.parametrize("act", {ids!r})
    def test_act(act):
        assert_state_dict_matches({{"w": torch.zeros(len(act))}}, name=act)
"""

RESERVED = ["CON", "con.json", "Nul", "aux", "PRN.txt", "com1", "LPT9", "x.", "y . "]


def test_ids_differing_in_case_get_files_distinct_ignoring_case(
    pytester: pytest.Pytester,
) -> None:
    ids = ["GELU", "gelu", "Gelu"]
    pytester.makepyfile(test_a=CASES.format(ids=ids))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=3)
    files = json_files(pytester.path / "__statedict__")
    assert len({f.lower() for f in files}) == 3
    assert "test_a/test_act[gelu]/gelu.json" in files  # lower-case names keep their 0.1.0 name
    result = pytester.runpytest("--statedict-update")
    match_lines(result, ["statedict: 3 passed"])


def test_no_file_name_is_one_windows_reserves() -> None:
    for name in RESERVED:
        for part in (storage.sanitise(name), storage.leaf_name(name, 0)):
            stem = part.split(".")[0].rstrip(" ")
            assert stem.lower() not in {"con", "prn", "aux", "nul", "com1", "lpt9"}, part
            assert not part.endswith((".", " ")), part
    assert storage.sanitise("gelu") == "gelu" and storage.sanitise("GELU") != "GELU"


def test_reserved_ids_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=CASES.format(ids=RESERVED))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=len(RESERVED))
    for path in (pytester.path / "__statedict__").rglob("*"):
        assert path.name.split(".")[0].lower() not in {"con", "nul", "aux", "prn", "com1"}
        assert not path.name.endswith((".", " "))
    pytester.runpytest().assert_outcomes(passed=len(RESERVED))


def test_a_snapshot_under_its_0_1_0_name_is_read_then_moved(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=CASES.format(ids=["GELU"]))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    (new,) = (pytester.path / "__statedict__").rglob("*.json")
    old = pytester.path / "__statedict__/test_a/test_act[GELU]/GELU.json"  # as 0.1.0 named it
    old.parent.mkdir()
    new.rename(old)
    new.parent.rmdir()

    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    match_lines(result, ["statedict: 1 passed"])
    assert old.is_file() and not new.exists(), "nothing is written without --statedict-update"

    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=1)
    match_lines(result, ["statedict: 1 updated in __statedict__/"])
    assert new.is_file() and not old.exists() and not old.parent.exists()
    pytester.runpytest().assert_outcomes(passed=1)


# ---- a folder that cannot be written, a full disk ----------------------------------------

FAILING_OS = """
    import errno, os, pathlib

    # the run's own process: patched for this run only, as each test's in-process run is
    RESTORE = []

    def pytest_configure(config):
        what = os.environ.get("STATEDICT_OS_FAILS")
        if what == "unlink":
            def unlink(self, missing_ok=False):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            RESTORE.append((pathlib.Path, "unlink", pathlib.Path.unlink))
            pathlib.Path.unlink = unlink
        elif what == "fsync":
            def fsync(fd):
                raise OSError(errno.ENOSPC, "No space left on device")
            RESTORE.append((os, "fsync", os.fsync))
            os.fsync = fsync

    def pytest_unconfigure(config):
        for owner, name, original in RESTORE:
            setattr(owner, name, original)
"""


def test_a_read_only_folder_fails_the_run_by_name(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(FAILING_OS)
    pytester.makepyfile(test_a=checks(n=2))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=2)
    pytester.makepyfile(test_a=checks(n=1))
    monkeypatch.setenv("STATEDICT_OS_FAILS", "unlink")
    result = pytester.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    match_lines(
        result,
        [
            "*statedict: errors*",
            "*statedict snapshot __statedict__/test_a/test_width?1?/0.json: cannot be deleted "
            "(Read-only file system, EROFS)*",
            "statedict: 1 passed, 1 unused, 1 error",
        ],
    )
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert len(json_files(pytester.path / "__statedict__")) == 2


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="permissions bind no POSIX root"
)
def test_a_really_read_only_folder(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_a=checks(n=2))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=2)
    pytester.makepyfile(test_a=checks(n=1))
    folder = pytester.path / "__statedict__/test_a/test_width[1]"
    folder.chmod(0o555)
    try:
        result = pytester.runpytest("--statedict-update")
    finally:
        folder.chmod(0o755)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert (folder / "0.json").is_file()
    match_lines(result, ["*cannot be deleted (Permission denied, EACCES)*", "statedict: *1 error"])


def test_a_full_disk_fails_the_test_by_name_and_keeps_the_old_file(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(FAILING_OS)
    pytester.makepyfile(test_a=checks(n=2))
    pytester.runpytest("--statedict-update").assert_outcomes(passed=2)
    old = pytester.path / "__statedict__/test_a/test_width[1]/0.json"
    before = old.read_text()
    pytester.makepyfile(test_a=checks(n=2).replace("n + 1", "n + 5"))
    monkeypatch.setenv("STATEDICT_OS_FAILS", "fsync")
    result = pytester.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=2)
    match_lines(
        result,
        [
            "E *SnapshotError: statedict snapshot __statedict__/test_a/test_width?1?/0.json: "
            "cannot be written (No space left on device, ENOSPC)*",
            "statedict: 2 failed",
        ],
    )
    assert old.read_text() == before
    assert no_temp_files(pytester.path)


# ---- nothing is written or deleted through a symlink out of the snapshot folder ----------


@pytest.mark.parametrize("link", ["module-folder", "ini-module-folder", "test-folder", "file"])
def test_update_never_writes_or_deletes_through_a_symlink(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, link: str
) -> None:
    """The write of a changed snapshot, and the deletion of a gone test's, through a link."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "test_gone").mkdir()
    (outside / "test_gone/0.json").write_text("precious")
    (outside / "0.json").write_text("precious")
    (outside / "test_width[0]").mkdir()
    pytester.makepyfile(test_a=checks(n=1))
    root = "__statedict__"
    if link == "ini-module-folder":
        root = "snapshots"
        pytester.makeini(f"[pytest]\nstatedict_snapshot_dir = {root}\n")
    module = pytester.path / root / "test_a"
    if link.endswith("module-folder"):
        module.parent.mkdir()
        module.symlink_to(outside, target_is_directory=True)
    elif link == "test-folder":
        module.mkdir(parents=True)
        (module / "test_width[0]").symlink_to(outside, target_is_directory=True)
        (module / "test_gone").symlink_to(outside / "test_gone", target_is_directory=True)
    else:
        (module / "test_width[0]").mkdir(parents=True)
        (module / "test_width[0]/0.json").symlink_to(outside / "0.json")
        (module / "test_gone").mkdir()
        (module / "test_gone/0.json").symlink_to(outside / "test_gone/0.json")
    result = pytester.runpytest("--statedict-update")
    names = sorted(p.name for p in outside.rglob("*"))
    assert names == ["0.json", "0.json", "test_gone", "test_width[0]"]
    assert (outside / "0.json").read_text() == (outside / "test_gone/0.json").read_text()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "deleted" not in result.stdout.str() and "unused" not in result.stdout.str()
    match_lines(
        result,
        [
            f"E *SnapshotError: statedict snapshot {root}/test_a/test_width?0?/0.json: "
            "resolves to *, outside the snapshot folder *: refusing to write it*",
            "statedict: 1 failed",
        ],
    )


# ---- only regular snapshot files of bounded size are read --------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "not-utf8", "folder"])
def test_a_snapshot_that_is_not_a_text_file(pytester: pytest.Pytester, kind: str) -> None:
    pytester.makepyfile(test_a=checks(n=1))
    snapshot = pytester.path / "__statedict__/test_a/test_width[0]/0.json"
    snapshot.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(snapshot)
    elif kind == "dev-zero":
        snapshot.symlink_to("/dev/zero")
    elif kind == "folder":
        snapshot.mkdir()
    else:
        snapshot.write_bytes(b'{"format": "pytest-statedict", \xff\xfe}')
    problem = {
        "fifo": "is not a regular file*",
        "dev-zero": "is not a regular file*",
        "folder": "is a directory, not a snapshot*",
        "not-utf8": "is not UTF-8 text (byte 31)*",
    }[kind]

    # a FIFO would hang and /dev/zero fill the memory of a run that reads them: not in here
    def run(*args: str) -> pytest.RunResult:
        if kind in ("fifo", "dev-zero"):
            return pytester.runpytest_subprocess(*args, timeout=60)
        return pytester.runpytest(*args)

    result = run()
    result.assert_outcomes(failed=1)
    shown = "__statedict__/test_a/test_width?0?/0.json"
    match_lines(result, [f"E *SnapshotError: statedict snapshot {shown}: {problem}"])
    result = run("--statedict-update")
    if kind == "dev-zero":  # rewriting it would write through the symlink's way out
        result.assert_outcomes(failed=1)
        match_lines(result, ["E *refusing to write it*"])
        assert snapshot.is_symlink()
        return
    if kind == "folder":
        result.assert_outcomes(failed=1)
        match_lines(result, ["E *cannot be written (Is a directory*", "statedict: 1 failed"])
        return
    result.assert_outcomes(passed=1)
    match_lines(result, ["statedict: 1 updated in __statedict__/"])
    assert snapshot.is_file() and not snapshot.is_symlink()
    pytester.runpytest().assert_outcomes(passed=1)


# ---- the summary agrees with the outcome -------------------------------------------------


def test_a_mismatch_the_test_expects_is_no_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_a="""
        import pytest
        import torch
        from pytest_statedict import StateDictMismatch, assert_state_dict_matches

        def test_expects_a_mismatch():
            with pytest.raises(StateDictMismatch):
                assert_state_dict_matches({"w": torch.zeros(3)})

        def test_fails():
            assert_state_dict_matches({"w": torch.zeros(3)})
        """
    )
    result = pytester.runpytest("-k", "expects")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 1 passed"])
    assert "failed" not in result.stdout.str()
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    match_lines(result, ["statedict: 1 passed, 1 failed"])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and FIFOs")
def test_storage_reads_refuse_what_is_not_a_snapshot(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(SnapshotError, match="not a regular file"):
        read_snapshot_text(fifo, lambda problem: SnapshotError(fifo, problem))
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(MAX_SNAPSHOT_BYTES + 1)
    with pytest.raises(SnapshotError, match="more than a snapshot may have"):
        read_snapshot_text(big)


# ---- tests that were collected but do not run never make their files unused -------------

THREE = """
    import os
    import torch
    from pytest_statedict import assert_state_dict_matches

    def test_a():
        assert_state_dict_matches({"w": torch.zeros(2)})
        assert os.environ.get("STATEDICT_FAIL_A") != "1"

    def test_b():
        assert_state_dict_matches({"w": torch.zeros(3)})

    def test_c():
        assert_state_dict_matches({"w": torch.zeros(4)})
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["in-process", "xdist"])
def test_last_failed_never_deletes_the_snapshots_of_tests_that_passed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: bool
) -> None:
    """``--lf`` drops the tests that passed while it collects, with no deselected hook."""
    if xdist:
        pytest.importorskip("xdist")
    pytester.makepyfile(test_m=THREE)
    pytester.runpytest("--statedict-update").assert_outcomes(passed=3)
    before = json_files(pytester.path / "__statedict__")
    assert len(before) == 3
    monkeypatch.setenv("STATEDICT_FAIL_A", "1")
    pytester.runpytest().assert_outcomes(passed=2, failed=1)
    args = ["-p", "cacheprovider", "--lf", "--statedict-update"]
    result = pytester.runpytest_subprocess("-n", "2", *args) if xdist else pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        ["statedict: 1 passed; unused snapshots not checked: --lf ran only the tests that fa*"],
    )
    assert json_files(pytester.path / "__statedict__") == before
    assert "deleted" not in result.stdout.str()


RUNSLOW = """
    import pytest

    def pytest_addoption(parser):
        parser.addoption("--runslow", action="store_true")

    def pytest_collection_modifyitems(config, items):
        if not config.getoption("--runslow"):
            items[:] = [i for i in items if "slow" not in i.keywords]
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["in-process", "xdist"])
def test_a_conftest_that_drops_items_never_makes_their_files_unused(
    pytester: pytest.Pytester, xdist: bool
) -> None:
    """The common ``--runslow`` recipe removes items without ``pytest_deselected``."""
    if xdist:
        pytest.importorskip("xdist")
    pytester.makeconftest(RUNSLOW)
    pytester.makeini("[pytest]\nmarkers = slow\n")
    pytester.makepyfile(
        test_m=THREE.replace("def test_c", "@pytest.mark.slow\n    def test_c").replace(
            "import os", "import os\n    import pytest"
        )
    )
    pytester.runpytest("--runslow", "--statedict-update").assert_outcomes(passed=3)
    before = json_files(pytester.path / "__statedict__")
    assert len(before) == 3
    args = ["--statedict-update"]
    result = pytester.runpytest_subprocess("-n", "2", *args) if xdist else pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2)
    match_lines(result, ["statedict: 2 passed"])
    assert json_files(pytester.path / "__statedict__") == before
    # the whole module again: a gone test's file is still found
    pytester.makepyfile(test_m=THREE.replace("def test_c", "def _c"))
    result = pytester.runpytest("--statedict-update")
    match_lines(result, ["statedict: 2 passed, 1 deleted"])
    assert len(json_files(pytester.path / "__statedict__")) == 2


@pytest.mark.parametrize("mode", ["--setup-plan", "--setup-only", "--collect-only"])
def test_runs_that_run_no_test_delete_nothing(pytester: pytest.Pytester, mode: str) -> None:
    """Under ``--setup-plan`` and ``--setup-only`` tests report passed without running."""
    pytester.makepyfile(test_m=THREE)
    pytester.runpytest("--statedict-update").assert_outcomes(passed=3)
    before = json_files(pytester.path / "__statedict__")
    result = pytester.runpytest(mode, "--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, [f"statedict: unused snapshots not checked: {mode} runs no test"])
    assert json_files(pytester.path / "__statedict__") == before
    assert "deleted" not in result.stdout.str()


@pytest.mark.parametrize("layout", ["default", "ini", "ini-parent"])
def test_a_snapshot_root_reached_through_a_symlink_is_never_written_listed_or_emptied(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory, layout: str
) -> None:
    """``ln -s /elsewhere __statedict__``: the root's target is not the project's folder."""
    outside = tmp_path_factory.mktemp("outside")
    for name in ("test_a/test_gone/0.json", "test_a/test_width[0]/0.json", "old/t/0.json"):
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        (outside / name).write_text("precious")
    pytester.makepyfile(test_a=checks(n=1))
    root = {"default": "__statedict__", "ini": "snapshots", "ini-parent": "shared/snapshots"}
    link = pytester.path / root[layout].split("/")[0]
    if layout != "default":
        pytester.makeini(f"[pytest]\nstatedict_snapshot_dir = {root[layout]}\n")
    if layout == "ini-parent":
        (outside / "snapshots").symlink_to(outside, target_is_directory=True)
    link.symlink_to(outside, target_is_directory=True)

    result = pytester.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1)
    shown = link.name
    match_lines(
        result,
        [
            f"E *SnapshotError: statedict snapshot {root[layout]}/test_a/test_width?0?/0.json: "
            f"is in the snapshot folder *, reached through the symlink *{shown} (to *): "
            "refusing to write it*",
            f"statedict: 1 failed; unused snapshots not checked in {root[layout]}: "
            f"{shown} is a symlink",
        ],
    )
    assert "deleted" not in result.stdout.str()
    assert sorted(json_files(outside)) == [
        "old/t/0.json",
        "test_a/test_gone/0.json",
        "test_a/test_width[0]/0.json",
    ]
    assert {p.read_text() for p in outside.rglob("*.json")} == {"precious"}
