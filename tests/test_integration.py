"""The plugin inside pytest at large: start-up cost, extension hooks, pytest-xdist."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import match_lines


def test_plugin_import_loads_neither_torch_nor_deepdiff() -> None:
    code = textwrap.dedent(
        """
        import sys
        import pytest_statedict.plugin
        heavy = sorted(m for m in ("torch", "deepdiff", "xxhash") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "none"


def test_a_suite_that_never_uses_the_plugin_imports_no_torch(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys

        def test_no_torch():
            assert "torch" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


def test_a_suite_that_never_uses_the_plugin_gets_plain_reports(pytester: pytest.Pytester) -> None:
    """Wider-scoped fixtures and every phase's report pass through untouched."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="module")
        def resource():
            return 1

        def pytest_runtest_logreport(report):
            assert not hasattr(report, "statedict"), report.nodeid
        """
    )
    pytester.makepyfile(
        """
        import pytest

        class TestA:
            @pytest.fixture(scope="class")
            def other(self, resource):
                return resource

            def test_a(self, other):
                pass

        def test_b(resource):
            pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)
    assert "statedict:" not in result.stdout.str()


def test_load_checkpoint_hook_reads_a_foreign_format(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import json
        import torch

        def pytest_statedict_load_checkpoint(path):
            if path.suffix == ".jsonw":
                spec = json.loads(path.read_text())
                return {k: torch.zeros(v) for k, v in spec.items()}
            return None
        """
    )
    pytester.makepyfile(
        """
        import json
        import torch
        from pytest_statedict import assert_checkpoint_loads, assert_state_dict_matches

        def test_foreign(tmp_path):
            path = tmp_path / "weights.jsonw"
            path.write_text(json.dumps({"weight": [3, 2], "bias": [3]}))
            assert_state_dict_matches(torch.nn.Linear(2, 3), path)
            assert_checkpoint_loads(torch.nn.Linear(2, 3), path)
            assert_state_dict_matches(torch.nn.Linear(2, 4), path)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(result, ["*~ weight: shape [3, 2] -> [4, 2]"])


def test_normalize_key_hook_applies_to_both_sides(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_statedict_normalize_key(key):
            return key.removeprefix("_orig_mod.")
        """
    )
    pytester.makepyfile(
        """
        import torch
        from torch import nn
        from pytest_statedict import assert_state_dict_matches

        class Compiled(nn.Module):
            def __init__(self):
                super().__init__()
                self._orig_mod = nn.Linear(2, 2)

        def test_snapshot():
            assert_state_dict_matches(Compiled())

        def test_direct():
            assert_state_dict_matches(Compiled(), nn.Linear(2, 2))
        """
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=2)
    text = (pytester.path / "__statedict__/test_normalize_key_hook_applies_to_both_sides"
            / "test_snapshot/0.json").read_text()  # fmt: skip
    assert '"key": "weight"' in text and "_orig_mod" not in text
    pytester.runpytest().assert_outcomes(passed=2)


XDIST_SUITE = """
    import pytest
    import torch
    from pytest_statedict import assert_state_dict_matches

    @pytest.mark.parametrize("width", range(6))
    def test_widths(width):
        assert_state_dict_matches(torch.nn.Linear(2, width + 1))
"""


def test_xdist_update_then_check_then_unused(pytester: pytest.Pytester) -> None:
    """Under xdist the controller sums what the workers did: written, passed, unused
    (deselected tests' files are not; a deleted test file's are), deleted."""
    pytest.importorskip("xdist")
    pytester.makepyfile(test_wide=XDIST_SUITE)
    pytester.makepyfile(test_gone=XDIST_SUITE.replace("range(6)", "range(1)"))
    result = pytester.runpytest_subprocess("-n", "2", "--statedict-update")
    result.assert_outcomes(passed=7)
    match_lines(result, ["statedict: 7 written in __statedict__/"])
    files = sorted((pytester.path / "__statedict__" / "test_wide").rglob("*.json"))
    assert len(files) == 6

    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=7)
    match_lines(result, ["statedict: 7 passed"])

    pytester.makepyfile(test_wide=XDIST_SUITE.replace("range(6)", "range(4)"))
    result = pytester.runpytest_subprocess("-n", "2", "-k", "0 or 1")
    assert result.ret == pytest.ExitCode.OK, "deselected tests never make files unused"

    (pytester.path / "test_gone.py").unlink()
    result = pytester.runpytest_subprocess("-n", "2")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    match_lines(
        result,
        [
            "*unused snapshots*",
            "*__statedict__/test_gone/test_widths?0?/0.json",
            "statedict: 4 passed, 3 unused",
        ],
    )

    result = pytester.runpytest_subprocess("-n", "2", "--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 4 passed, 3 deleted"])
    assert len(list((pytester.path / "__statedict__" / "test_wide").rglob("*.json"))) == 4
    assert not (pytester.path / "__statedict__" / "test_gone").exists()


def test_public_names_resolve_after_any_submodule_import() -> None:
    import importlib

    import pytest_statedict

    for module in ("assertions", "gate", "round_trip", "extract", "schema", "cli", "plugin"):
        importlib.import_module(f"pytest_statedict.{module}")
    for name in pytest_statedict.__all__:
        value = getattr(pytest_statedict, name)
        assert callable(value), f"pytest_statedict.{name} is {value!r}"


def test_numpy_is_a_dependency_so_torch_imports_quietly() -> None:
    """torch without numpy warns "Failed to initialize NumPy" on every import, the user's own
    test modules' included (no filter of the plugin's could reach those): the plugin brings
    numpy, and a plain install's run prints nothing of it."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    plain = [Requirement(r) for r in requires("pytest-statedict") or []]
    assert any(r.name == "numpy" and r.marker is None for r in plain)


def test_a_run_with_the_plugin_prints_no_numpy_warning(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_model="""
        import torch
        from torch import nn

        def test_model(statedict_snapshot):
            statedict_snapshot.assert_match(nn.Linear(2, 3))
        """
    )
    result = pytester.runpytest_subprocess("--statedict-update", "-W", "always")
    result.assert_outcomes(passed=1)
    assert "NumPy" not in result.stdout.str() + result.stderr.str()
