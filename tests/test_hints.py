"""The way out a failing check suggests: in the direction its ``rename=`` applies, said;
never for what the model's own load already converts; never ``persistent=False`` for keys
missing only under a wrapper's prefix; and a release gate's optimizer failure led by its
cause, not buried under one line per parameter of a fresh optimizer's empty state."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

from pytest_statedict import StateDictMismatch, assert_checkpoint_loads, schema_of

MODEL = """
import torch
from torch import nn


class Old(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)


class New(nn.Module):
    def __init__(self, inputs=4):
        super().__init__()
        self.body = nn.Linear(inputs, 4)
        self.norm = nn.BatchNorm1d(4)
        self.classifier = nn.Linear(4, 2)


class Converting(New):
    '''Converts the old name on load, as a project's own load hook does.'''

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix + "head.")]:
            state_dict[prefix + "classifier." + key[len(prefix + "head."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Wrapped(nn.Module):
    '''DataParallel's layout: the model under "module.".'''

    def __init__(self):
        super().__init__()
        self.module = Old()
"""


def project(pytester: pytest.Pytester, tests: str) -> None:
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(model=MODEL)
    pytester.makepyfile(test_user=textwrap.dedent(tests))


def suggested(output: str, lead: str) -> str:
    """The ``rename=...`` a report suggests after ``lead``."""
    found = re.search(re.escape(lead) + r"(rename=\[.*?\]) \(", output)
    assert found, output
    return found.group(1)


def test_each_surface_suggests_the_rename_its_own_rename_applies(
    pytester: pytest.Pytester,
) -> None:
    """The snapshot check and the gate suggest opposite mappings for one change, each saying
    which way its rename= maps: and each suggestion, passed back, makes its check pass."""
    project(
        pytester,
        """
        import os
        import torch
        from pytest_statedict import assert_checkpoint_loads
        from model import New, Old

        SNAPSHOT_RENAME = GATE_RENAME = None  # filled in from the reports below

        def test_snapshot(statedict_snapshot):
            model = New() if os.environ.get("REFACTORED") else Old()
            statedict_snapshot.assert_match(model, rename=SNAPSHOT_RENAME)

        def test_gate(tmp_path):
            torch.save(Old().state_dict(), tmp_path / "old.pt")
            assert_checkpoint_loads(New(), tmp_path / "old.pt", rename=GATE_RENAME)
        """,
    )
    assert pytester.runpytest("-k", "snapshot", "--statedict-update").ret == 0
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REFACTORED", "1")
        failed = pytester.runpytest("-p", "no:randomly")
        failed.assert_outcomes(failed=2)
        output = failed.stdout.str()
        snapshot = suggested(output, "suggested: ")
        gate = suggested(output, "to load it as it is: ")
        assert snapshot == "rename=[(r'^classifier\\.', 'head.')]"
        assert gate == "rename=[(r'^head\\.', 'classifier.')]"
        failed.stdout.fnmatch_lines(
            [
                "*suggested: rename=* (rename= here maps today's keys to the old names; "
                "assert_checkpoint_loads' rename= maps the other way)",
                "*to load it as it is: rename=* (rename= maps the checkpoint's keys to today's)",
            ]
        )
        test = pytester.path / "test_user.py"
        text = test.read_text().replace(
            "SNAPSHOT_RENAME = GATE_RENAME = None",
            f"SNAPSHOT_RENAME = {snapshot.removeprefix('rename=')}\n"
            f"GATE_RENAME = {gate.removeprefix('rename=')}",
        )
        test.write_text(text)
        pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_no_rename_hint_for_a_rename_the_models_load_hook_converts(
    pytester: pytest.Pytester,
) -> None:
    """The hook converts head. -> classifier.; only the input width changed: the report says
    the shape, not "pass the checkpoint's keys through rename=" (the hook already does)."""
    project(
        pytester,
        """
        import torch
        from pytest_statedict import assert_checkpoint_loads
        from model import Converting, Old

        def test_gate(tmp_path):
            torch.save(Old().state_dict(), tmp_path / "old.pt")
            assert_checkpoint_loads(Converting(), tmp_path / "old.pt")  # converted: loads

        def test_gate_wider(tmp_path):
            torch.save(Old().state_dict(), tmp_path / "old.pt")
            assert_checkpoint_loads(Converting(inputs=5), tmp_path / "old.pt")
        """,
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*: NO, through Converting's own load_state_dict (1 shape mismatch)",
        "*shape mismatches (1):", "*body.weight: checkpoint ?4, 4?, model ?4, 5?"])  # fmt: skip
    output = result.stdout.str()
    assert "rename=" not in output
    assert "likely renamed" not in output


def test_no_persistent_false_advice_for_buffers_missing_under_a_prefix() -> None:
    """A DataParallel-style wrapper: every key is missing under 'module.', the BatchNorm's
    buffers too; they are not new buffers, so no persistent=False advice, only the prefix."""
    from torch import nn

    class Old(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.norm = nn.BatchNorm1d(4)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = Old()

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "old.pt"
        torch.save(Old().state_dict(), path)
        with pytest.raises(StateDictMismatch) as caught:
            assert_checkpoint_loads(Wrapped(), path)
    text = str(caught.value)
    assert "module.norm.running_mean" in text
    assert "persistent=False" not in text
    assert (
        "the model's keys have the prefix 'module.' added relative to the checkpoint (a wrapper "
        "such as DataParallel or torch.compile): rename=[(r'^', 'module.')] (rename= maps the "
        "checkpoint's keys to today's)"
    ) in text


def test_a_new_buffer_still_gets_the_persistent_false_advice(tmp_path: object) -> None:
    """The advice stays where it belongs: a buffer the model added since the checkpoint."""
    from pathlib import Path

    from torch import nn

    old = nn.Sequential(nn.Linear(4, 4))
    new = nn.Sequential(nn.Linear(4, 4))
    new.register_buffer("mask", torch.ones(4))
    path = Path(str(tmp_path)) / "old.pt"
    torch.save(old.state_dict(), path)
    with pytest.raises(StateDictMismatch, match=r"missing buffer\(s\) mask: .*persistent=False"):
        assert_checkpoint_loads(new, path)


def test_release_gate_optimizer_failure_leads_with_its_cause(pytester: pytest.Pytester) -> None:
    """A release recorded after a step, today's model with a new layer and a fresh optimizer:
    the cause first, the membership change, then one line for the state a fresh optimizer
    has not made yet (it was ~10 lines of ``state of N: removed``)."""
    from torch import nn

    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(
        model="""
        from torch import nn

        class Net(nn.Module):
            def __init__(self, extra=False):
                super().__init__()
                self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))
                if extra:
                    self.e = nn.Linear(4, 4)
        """,
        test_user="""
        import torch
        from pytest_statedict import statedict_releases
        from model import Net

        test_releases = statedict_releases(
            lambda: Net(extra=True), optimizer=lambda m: torch.optim.Adam(m.parameters()),
            strict=False,
        )
        """,
    )
    model = nn.Sequential()
    for name in "abcd":
        model.add_module(name, nn.Linear(4, 4))
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    releases = pytester.path / "tests" / "__statedict__" / "releases"
    releases.mkdir(parents=True)
    (releases / "v1.json").write_text(schema_of(model, optimizer=optimizer).to_json())
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   *release v1's optimizer state: an old optimizer state still loads with "
            "optimizer.load_state_dict: NO, it raises ValueError (param_group 0 has 8 "
            "parameters saved and 10 now)",
            "*optimizer (3):",
            "*'e.weight': param_group none -> 0",
            "*'e.bias': param_group none -> 0",
            "*state saved for 8 parameters (exp_avg, exp_avg_sq, step), today for none "
            "(an optimizer before its first step, or one that keeps none, has none)",
            "*release v1 no longer loads*",
        ]
    )
    assert "state of " not in result.stdout.str()
