"""The comparison seam, through pytest itself: per-key tolerances, custom comparisons (the
``compare=`` argument and the ``pytest_statedict_compare_entry`` hook) and composing
``pytest_statedict_normalize_key`` hooks. See docs/comparison.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import match_lines

# A user's model, nudged per parameter by the environment: NUDGE_enc_weight=1e-4 adds 1e-4
# to every element of enc.weight.
MODEL = """
import os

import torch
from torch import nn

from pytest_statedict import assert_state_dict_matches


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def model():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(float(os.environ.get("NUDGE_" + name.replace(".", "_"), 0)))
    return net


def baseline():
    torch.manual_seed(0)
    return Net()
"""


def project(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_seam=MODEL + body)


def snapshots(pytester: pytest.Pytester) -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(pytester.path.glob("__statedict__/**/*.json"))}


def nudge(monkeypatch: pytest.MonkeyPatch, **by: float) -> None:
    for name in ("enc_weight", "head_bias"):
        monkeypatch.delenv(f"NUDGE_{name}", raising=False)
    for name, value in by.items():
        monkeypatch.setenv(f"NUDGE_{name}", str(value))


def test_per_key_tolerances_pass_within_and_fail_outside_naming_the_key(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project(
        pytester,
        """
TOLERANCES = {"enc.*": {"atol": 1e-3}}

def test_snapshot(statedict_snapshot):
    statedict_snapshot.assert_match(model(), values=True, tolerances=TOLERANCES)

def test_direct():
    assert_state_dict_matches(model(), baseline(), values=True, tolerances=TOLERANCES)
""",
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=2)
    nudge(monkeypatch, enc_weight=1e-4)  # within enc.*'s atol
    pytester.runpytest().assert_outcomes(passed=2)
    nudge(monkeypatch, enc_weight=0.5)
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    match_lines(
        result,
        ["*~ enc.weight: values rtol=0.0, atol=0.001 (tolerances['enc.*']) -> 500x the tolerance*"],
    )
    nudge(monkeypatch, head_bias=1e-6)  # no glob matches head.bias: compared exactly
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    match_lines(result, ["*~ head.bias: values xxh3 * mean * -> xxh3 *"])
    assert "enc.weight" not in result.stdout.str()


def test_the_first_matching_glob_wins(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project(
        pytester,
        """
def test_exact_first():
    # enc.weight is held exact ({}) although enc.* and the call allow more
    tol = {"enc.weight": {}, "enc.*": {"atol": 1.0}}
    assert_state_dict_matches(model(), baseline(), values=True, atol=1.0, tolerances=tol)

def test_broad_first():
    tol = {"enc.*": {"atol": 1.0}, "enc.weight": {}}
    assert_state_dict_matches(model(), baseline(), values=True, tolerances=tol)
""",
    )
    nudge(monkeypatch, enc_weight=1e-4)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    match_lines(result, ["*~ enc.weight: values xxh3 *", "FAILED test_seam.py::test_exact_first*"])


def test_a_glob_that_matches_no_key_is_refused(pytester: pytest.Pytester) -> None:
    project(
        pytester,
        """
def test_snapshot():
    assert_state_dict_matches(model(), values=True, tolerances={"encoder.*": {"rtol": 1e-3}})

def test_direct():
    tol = {"enc.*": {"rtol": 1e-3}, "haed.*": {"atol": 1.0}}
    assert_state_dict_matches(model(), baseline(), values=True, tolerances=tol)

def test_ignored_keys_are_not_matched():
    tol = {"head.*": {"atol": 1.0}}
    assert_state_dict_matches(model(), baseline(), values=True, ignore=["head.*"], tolerances=tol)
""",
    )
    # refused when the snapshot is written, and when it is unchanged (no diff is made)
    for args in (["--statedict-update"], []):
        result = pytester.runpytest(*args)
        result.assert_outcomes(failed=3)
        match_lines(
            result,
            [
                "*StateDictError: tolerances=: 'encoder.*' matches no key of either side*",
                "*StateDictError: tolerances=: 'haed.*' matches no key of either side*",
                "*StateDictError: tolerances=: 'head.*' matches no key of either side*",
            ],
        )


def test_bad_tolerances_and_comparisons_are_refused(pytester: pytest.Pytester) -> None:
    project(
        pytester,
        """
import pytest

@pytest.mark.parametrize("tol", [
    {"enc.*": {"rtl": 1e-3}},
    {"enc.*": {"rtol": -1e-3}},
    {"enc.*": {"atol": "1e-3"}},
    {"enc.*": {"atol": float("nan")}},
    {"enc.*": {"atol": True}},
    {"enc.*": 1e-3},
    [("enc.*", {"atol": 1e-3})],
])
def test_tolerance(tol):
    assert_state_dict_matches(model(), baseline(), values=True, tolerances=tol)

def test_tolerances_without_values():
    assert_state_dict_matches(model(), baseline(), tolerances={"enc.*": {"atol": 1e-3}})

def test_compare_returns_a_bare_string():
    assert_state_dict_matches(model(), baseline(), compare=lambda key, e, a: "differs")
""",
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=9)
    match_lines(
        result,
        [
            "*StateDictError: tolerances['enc.*']: unknown 'rtl'; a tolerance has 'rtol' and "
            "'atol' only",
            "*StateDictError: tolerances['enc.*']['rtol'] is -0.001: it must be a finite number*",
            "*StateDictError: tolerances['enc.*']['atol'] is '1e-3': *",
            "*StateDictError: tolerances['enc.*']['atol'] is nan: *",
            "*StateDictError: tolerances['enc.*']['atol'] is True: *",
            "*StateDictError: tolerances['enc.*'] must be a mapping such as *",
            "*StateDictError: tolerances= must be a mapping of key globs to *, not list",
            "*StateDictError: tolerances= holds keys' values to a tolerance, but values are "
            "compared only with values=True: pass it, or drop tolerances=",
            "*StateDictError: compare= returned 'differs' for key 'enc.weight': it must return *",
        ],
    )


HOOKS = """
def pytest_statedict_compare_entry(key, expected, actual):
    if key == "head.bias":
        return True  # retrained on purpose: any values will do
    if key == "enc.bias" and actual.fingerprint is not None:
        moved = abs(actual.fingerprint.mean - expected.fingerprint.mean)
        return [f"mean moved by {moved:.2g}"] if moved > 0.01 else None
    return None
"""


def test_a_compare_hook_accepts_or_reports_a_key(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(HOOKS)
    project(
        pytester,
        """
def test_snapshot():
    assert_state_dict_matches(model(), values=True)

def test_direct():
    assert_state_dict_matches(model(), baseline(), values=True)
""",
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=2)
    nudge(monkeypatch, head_bias=0.5)  # the hook accepts it
    pytester.runpytest().assert_outcomes(passed=2)
    nudge(monkeypatch, head_bias=0.5, enc_weight=1e-6)  # the hook has no opinion: exact
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    match_lines(
        result,
        [
            "*~ enc.weight: values xxh3 *",
            "*note: a custom comparison accepted head.bias, which the built-in comparison "
            "finds changed",
        ],
    )
    pytester.makepyfile(
        test_seam=MODEL
        + """
def test_own_difference():
    import torch
    changed = model()
    with torch.no_grad():
        changed.enc.bias.add_(0.5)
    assert_state_dict_matches(changed, baseline(), values=True)
"""
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(result, ["*~ enc.bias: mean moved by 0.5 (pytest_statedict_compare_entry)"])


def test_compare_argument_comes_before_the_hooks(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
def pytest_statedict_compare_entry(key, expected, actual):
    return True  # everything is equal, says the project
"""
    )
    project(
        pytester,
        """
def strict_head(key, expected, actual):
    return ["the head must not change"] if key == "head.bias" else None

def test_argument_wins():
    assert_state_dict_matches(model(), baseline(), compare=strict_head)

def test_none_leaves_it_to_the_hooks():
    import torch
    bigger = torch.nn.Linear(4, 8)  # enc.* differ in shape: the hook accepts it
    net = model()
    net.enc = bigger
    assert_state_dict_matches(net, baseline(), compare=lambda key, e, a: None)
""",
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    match_lines(
        result, ["*~ head.bias: the head must not change (compare=)", "FAILED *test_argument_wins*"]
    )


def test_normalize_key_hooks_compose(pytester: pytest.Pytester) -> None:
    # the plugin is registered before the conftest, so the conftest's hook runs first
    pytester.makepyfile(
        strip_compiled="""
def pytest_statedict_normalize_key(key):
    return key.removeprefix("_orig_mod.")
"""
    )
    pytester.syspathinsert()
    pytester.makeconftest(
        """
def pytest_statedict_normalize_key(key):
    return key.removeprefix("module.") if key.startswith("module.") else None
"""
    )
    project(
        pytester,
        """
class Compiled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner

class DataParallel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner

def test_snapshot():
    assert_state_dict_matches(DataParallel(Compiled(baseline())))

def test_direct():
    assert_state_dict_matches(DataParallel(Compiled(baseline())), baseline())
""",
    )
    pytester.runpytest("-p", "strip_compiled", "--statedict-update").assert_outcomes(passed=2)
    (text,) = snapshots(pytester).values()
    assert '"key": "enc.weight"' in text and "module" not in text and "_orig_mod" not in text
    pytester.runpytest("-p", "strip_compiled").assert_outcomes(passed=2)


def test_update_keeps_a_snapshot_that_tolerances_or_a_comparison_accept(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(
        """
def pytest_statedict_compare_entry(key, expected, actual):
    return True if key == "head.bias" else None
"""
    )
    project(
        pytester,
        """
def test_snapshot():
    assert_state_dict_matches(model(), values=True, tolerances={"enc.*": {"atol": 1e-3}})
""",
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    written = snapshots(pytester)
    nudge(monkeypatch, enc_weight=1e-4, head_bias=0.5)  # both accepted: the baseline stays
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    assert snapshots(pytester) == written
    nudge(monkeypatch, enc_weight=0.5)  # outside the tolerance: an update accepts it
    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=1)
    assert snapshots(pytester) != written
    match_lines(result, ["statedict: 1 updated in __statedict__/"])
