"""Honest verdicts: what a report concludes agrees with what torch (and the gate) would do."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import match_lines
from torch import nn

from pytest_statedict import (
    StateDictMismatch,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.errors import SnapshotError
from pytest_statedict.schema import Schema

# The README's "Gating a refactor" example: v1 called the head "fc"; v2 converts on load.
V1_SOURCE = textwrap.dedent(
    """
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 8)
            self.fc = nn.Linear(8, 2)
    """
)
V2_SOURCE = textwrap.dedent(
    """
    from torch import nn


    class Net(nn.Module):
        _version = 2  # v1 checkpoints called the head "fc"

        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 8)
            self.head = nn.Linear(8, 2)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
            if local_metadata.get("version", 1) < 2:
                for name in ("weight", "bias"):
                    if f"{prefix}fc.{name}" in state_dict:
                        state_dict[f"{prefix}head.{name}"] = state_dict.pop(f"{prefix}fc.{name}")
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)
    """
)
HOOK_VERDICT = (
    "an old checkpoint still loads with load_state_dict(strict=True): yes, through Net's own "
    "load_state_dict (its load hooks convert the old layout)"
)


class V1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 2)


class Net(nn.Module):
    """The rename without a conversion hook: old checkpoints really do not load."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)


class Converting(Net):
    _version = 2

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any
    ) -> None:
        if local_metadata.get("version", 1) < 2:
            for name in ("weight", "bias"):
                if f"{prefix}fc.{name}" in state_dict:
                    state_dict[f"{prefix}head.{name}"] = state_dict.pop(f"{prefix}fc.{name}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class Uncopyable(Converting):
    def __deepcopy__(self, memo: dict[int, Any]) -> Uncopyable:
        raise TypeError("holds a handle that cannot be copied")


def mismatch(actual: nn.Module, **opts: Any) -> str:
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(actual, schema_of(V1()), **opts)
    return str(info.value)


def test_snapshot_check_fails_but_says_the_hook_converts(pytester: pytest.Pytester) -> None:
    """The README's example in one run: the gate passes, torch loads v1 strictly, the snapshot
    check fails (the layout did change) and its verdict agrees with both."""
    pytester.makepyfile(
        netmod=V1_SOURCE,
        test_net="""
        from pathlib import Path

        import torch
        from netmod import Net
        from pytest_statedict import assert_checkpoint_loads, assert_state_dict_matches

        V1_FILE = Path(__file__).parent / "v1.pt"

        def test_layout():
            assert_state_dict_matches(Net())

        def test_gate():
            assert_checkpoint_loads(Net(), V1_FILE)

        def test_torch():
            Net().load_state_dict(torch.load(V1_FILE, weights_only=True), strict=True)
        """,
    )
    torch.save(V1().state_dict(), pytester.path / "v1.pt")
    pytester.runpytest("--statedict-update", "-p", "no:randomly").assert_outcomes(passed=3)
    pytester.makepyfile(netmod=V2_SOURCE)
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    match_lines(
        result,
        [
            "*likely renamed (same shape and dtype) (2):",
            "*fc.weight -> head.weight*",
            f"*{HOOK_VERDICT}",
        ],
    )
    result.stdout.no_fnmatch_line("*strict=True): NO*")


def test_gate_torch_and_report_agree() -> None:
    """The direct comparison says what the gate and a strict torch load say."""
    model = Converting()
    old = V1().state_dict()
    model.load_state_dict(copy.deepcopy(old), strict=True)  # torch: loads
    report = mismatch(model)
    assert "- fc.weight" in report or "fc.weight -> head.weight" in report  # layout changed
    assert HOOK_VERDICT.replace("Net", "Converting") in report


def test_without_the_hook_the_verdict_stays_no() -> None:
    report = mismatch(Net())
    assert (
        "  an old checkpoint still loads with load_state_dict(strict=True): NO, through Net's own "
        "load_state_dict (2 unexpected keys, 2 missing keys)"
    ) in report.splitlines()


class Refusing(V1):
    """Same keys as v1, but version 2 refuses version-1 checkpoints outright."""

    _version = 2

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any
    ) -> None:
        if local_metadata.get("version", 1) < 2:
            raise RuntimeError("version 1 checkpoints are no longer supported")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_model_that_refuses_an_old_layout_says_no() -> None:
    """Same keys, so the layouts would say yes; the model's own load_state_dict raises."""
    report = mismatch(Refusing())
    assert (
        "strict=True): NO, through Refusing's own load_state_dict (it raises: "
        "version 1 checkpoints are no longer supported)"
    ) in report


def test_a_model_that_cannot_be_copied_is_decided_from_the_layouts() -> None:
    report = mismatch(Uncopyable())
    assert (
        "strict=True): NO (2 unexpected keys, 2 missing keys, decided from the layouts: "
        "Uncopyable cannot be copied (TypeError))"
    ) in report


def test_a_rename_keeps_the_layouts_verdict() -> None:
    """Renamed keys are not the model's: only the layouts can answer for them."""
    report = mismatch(Net(), rename={"head.weight": "head.w"})
    assert "strict=True): NO (2 unexpected keys, 2 missing keys)" in report


def test_ignored_keys_count_on_neither_side() -> None:
    report = mismatch(Converting(), ignore=("encoder.*",), values=False)
    assert "yes, through Converting's own load_state_dict" in report


# ---- implementation flags: noted, never compared ------------------------------------------


def adam(model: nn.Module, **opts: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), **opts)


def test_flags_are_recorded_apart_and_read_back() -> None:
    model = nn.Linear(2, 3)
    schema = schema_of(model, optimizer=adam(model, foreach=True))
    group = schema.optimizer.param_groups[0]  # type: ignore[union-attr]
    assert group.flags["foreach"] is True
    assert not set(group.flags) & set(group.hyperparams)
    text = schema.to_json()
    assert '"implementation_flags": [' in text
    assert Schema.from_json(text, "x").optimizer.param_groups[0].flags == group.flags  # type: ignore[union-attr]


def test_a_snapshot_without_flags_still_reads() -> None:
    model = nn.Linear(2, 3)
    text = schema_of(model, optimizer=adam(model)).to_json()
    start = text.index('"implementation_flags"')
    older = text[:start] + text[text.index('"state"', start) :]
    group = Schema.from_json(older, "old.json").optimizer.param_groups[0]  # type: ignore[union-attr]
    assert group.flags == {}
    assert_state_dict_matches(model, Schema.from_json(older, "old.json"), optimizer=adam(model))


def test_flags_that_do_not_fit_the_groups_are_bad_input() -> None:
    model = nn.Linear(2, 3)
    text = schema_of(model, optimizer=adam(model)).to_json()
    start = text.index('"implementation_flags"')
    broken = text[:start] + '"implementation_flags": [{}, {}],\n' + text[text.index('"state"') :]
    with pytest.raises(SnapshotError, match="implementation_flags"):
        Schema.from_json(broken, "bad.json")


def test_a_flag_alone_does_not_fail_a_comparison() -> None:
    model = nn.Linear(2, 3)
    expected = schema_of(model, optimizer=adam(model))
    assert_state_dict_matches(model, expected, optimizer=adam(model, foreach=True))


def test_a_changed_flag_is_a_note_when_something_else_differs() -> None:
    model = nn.Linear(2, 3)
    expected = schema_of(model, optimizer=adam(model))
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(model, expected, optimizer=adam(model, lr=0.1, foreach=True))
    lines = str(info.value).splitlines()
    assert (
        "  note: param_group 0 foreach: None -> True (implementation only, not compared)" in lines
    )
    assert not any("capturable" in line or "fused" in line for line in lines)


def test_a_flag_alone_passes_a_snapshot_and_update_refreshes_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_opt="""
        import os
        import torch
        from torch import nn
        from pytest_statedict import assert_state_dict_matches

        def test_opt():
            torch.manual_seed(0)
            model = nn.Linear(2, 3)
            foreach = True if os.environ.get("FOREACH") else None
            opt = torch.optim.Adam(model.parameters(), foreach=foreach)
            assert_state_dict_matches(model, optimizer=opt)
        """
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    snapshot = pytester.path / "__statedict__" / "test_opt" / "test_opt" / "0.json"
    before = snapshot.read_text()
    assert '"foreach": null' in before
    monkeypatch.setenv("FOREACH", "1")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["statedict: 1 passed"])
    assert snapshot.read_text() == before  # nothing is written without the flag
    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["statedict: 1 updated in __statedict__/"])
    assert '"foreach": true' in snapshot.read_text()


# ---- smaller things a new user met --------------------------------------------------------


def test_a_round_trip_whose_format_is_not_installed_counts_as_failed(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        """
        import sys
        import pytest

        @pytest.fixture(autouse=True)
        def no_safetensors(monkeypatch):
            monkeypatch.setitem(sys.modules, "safetensors", None)
            monkeypatch.setitem(sys.modules, "safetensors.torch", None)
        """
    )
    pytester.makepyfile(
        """
        import pytest
        from torch import nn

        @pytest.mark.statedict_roundtrip(formats=("torch", "safetensors"))
        def test_trip(statedict_roundtrip):
            statedict_roundtrip(nn.Linear(2, 3))
        """
    )
    result = pytester.runpytest("--statedict-devices=cpu,cuda", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1, skipped=6)
    match_lines(
        result,
        [
            "*needs the optional dependency: pip install 'pytest-statedict[safetensors]'*",
            "statedict: round-trips: 1 passed, 1 failed, 6 skipped",
        ],
    )


class WithMask(V1):
    """v1 plus a persistent buffer: every v1 checkpoint now misses it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(8))


def test_the_gate_suggests_a_non_persistent_buffer(tmp_path: Path) -> None:
    path = tmp_path / "v1.pt"
    torch.save(V1().state_dict(), path)
    with pytest.raises(StateDictMismatch) as info:
        assert_checkpoint_loads(WithMask(), path)
    message = str(info.value)
    assert "missing (in the model, not in the checkpoint) (1):\n    mask" in message
    assert (
        "missing buffer(s) mask: if not needed in checkpoints, register with "
        "self.register_buffer(name, tensor, persistent=False) and old checkpoints load"
    ) in message


def test_a_missing_parameter_gets_no_buffer_hint(tmp_path: Path) -> None:
    path = tmp_path / "v1.pt"
    torch.save(V1().state_dict(), path)
    with pytest.raises(StateDictMismatch) as info:
        assert_checkpoint_loads(Net(), path)
    assert "persistent=False" not in str(info.value)


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_a_renamed_test_module_gets_a_git_mv(pytester: pytest.Pytester, workers: list[str]) -> None:
    """Under xdist, the missing snapshots reach the controller on the tests' reports."""
    test_source = """
        from torch import nn
        from pytest_statedict import assert_state_dict_matches

        def test_model():
            assert_state_dict_matches(nn.Linear(2, 3))

        def test_other():
            assert_state_dict_matches(nn.Linear(3, 3), name="other")
        """
    pytester.makepyfile(test_old=test_source)
    pytester.runpytest("--statedict-update").assert_outcomes(passed=2)
    (pytester.path / "test_old.py").rename(pytester.path / "test_new.py")
    run = pytester.runpytest_subprocess if workers else pytester.runpytest
    result = run(*workers)
    result.assert_outcomes(failed=2)
    match_lines(
        result,
        [
            "*statedict: unused snapshots*",
            "  __statedict__/test_old/test_model/0.json",
            "  __statedict__/test_old/test_other/other.json",
            "*",
            "The snapshots of __statedict__/test_old match tests that have none yet: if the test "
            "module was renamed, keep them by moving the folder:",
            "  git mv __statedict__/test_old __statedict__/test_new",
        ],
    )


def test_no_git_mv_when_the_names_do_not_match(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_old="""
        from torch import nn
        from pytest_statedict import assert_state_dict_matches

        def test_model():
            assert_state_dict_matches(nn.Linear(2, 3))
        """
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    (pytester.path / "test_old.py").unlink()
    pytester.makepyfile(
        test_new="""
        from torch import nn
        from pytest_statedict import assert_state_dict_matches

        def test_something_else():
            assert_state_dict_matches(nn.Linear(2, 3))
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*statedict: unused snapshots*"])
    result.stdout.no_fnmatch_line("*git mv*")


class KeyErrorOnOld(V1):
    """A conversion hook that fails with something other than a RuntimeError."""

    _version = 2

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any
    ) -> None:
        if local_metadata.get("version", 1) < 2:
            raise KeyError("old_layout")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_hook_that_raises_anything_still_gets_its_report() -> None:
    report = mismatch(KeyErrorOnOld())
    assert "NO, through KeyErrorOnOld's own load_state_dict (it raises: KeyError: " in report


class WithExtraState(V1):
    """Extra state is recorded as an object: no tensor to rebuild, yet in the checkpoint."""

    def get_extra_state(self) -> dict[str, int]:
        return {"step": 1}

    def set_extra_state(self, state: Any) -> None:
        self.step = state["step"]


def test_extra_state_is_not_counted_missing() -> None:
    """Only requires_grad changed: the real load must not find the extra state missing."""
    model = WithExtraState()
    model.encoder.weight.requires_grad_(False)
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(model, schema_of(WithExtraState()))
    lines = str(info.value).splitlines()
    assert "  an old checkpoint still loads with load_state_dict(strict=True): yes" in lines
