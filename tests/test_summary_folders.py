"""The summary line says where a run wrote snapshots: the folders to review and commit."""

from __future__ import annotations

import pytest
from conftest import match_lines

CHECKS_A_TENSOR = """
import torch
from pytest_statedict import assert_state_dict_matches

def test_layout():
    assert_state_dict_matches({{"w": torch.zeros({size})}})
"""


def write_tests(pytester: pytest.Pytester, files: dict[str, int]) -> None:
    """One test per file, each checking a tensor of the given size against its snapshot."""
    for path, size in files.items():
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(CHECKS_A_TENSOR.format(size=size), encoding="utf-8")


def test_the_summary_names_the_folders_written_relative_to_the_rootdir(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\n")
    write_tests(pytester, {"tests/test_user_a.py": 2, "tests/unit/test_user_b.py": 2})
    result = pytester.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(
        result, ["statedict: 2 written in tests/__statedict__/ and tests/unit/__statedict__/"]
    )

    # one file changed: what passed is not counted as written; the folder is the rootdir's
    # (what `git add` takes), wherever pytest was started
    write_tests(pytester, {"tests/unit/test_user_b.py": 3})
    monkeypatch.chdir(pytester.path / "tests")
    result = pytester.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 1 passed, 1 updated in tests/unit/__statedict__/"])

    # nothing written: no folder named
    result = pytester.runpytest()
    match_lines(result, ["statedict: 2 passed"])


def test_the_summary_counts_the_folders_past_three(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")
    write_tests(pytester, {f"pkg{i}/test_user_{i}.py": 1 for i in range(5)})
    result = pytester.runpytest("--statedict-update")
    match_lines(
        result,
        [
            "statedict: 5 written in pkg0/__statedict__/, pkg1/__statedict__/, "
            "pkg2/__statedict__/ and 2 more folders"
        ],
    )


def test_the_summary_names_the_ini_snapshot_folder(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nstatedict_snapshot_dir = checks/snapshots\n")
    write_tests(pytester, {"tests/test_user_a.py": 1, "tests/unit/test_user_b.py": 1})
    result = pytester.runpytest("--statedict-update")
    match_lines(result, ["statedict: 2 written in checks/snapshots/"])
