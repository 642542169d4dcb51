"""Optimizer hyperparameters a schedule moves (``lr``, ``initial_lr``), left out of a check
and of its snapshot: per check (``ignore_hyperparams=``) and for every test (the ini option
``statedict_ignore_hyperparams``). Snapshots written before still pass."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import StateDictMismatch, assert_state_dict_matches

# A model, its optimizer and its schedule; LR and DECAY change between runs as a resumed
# run's would (the schedule writes initial_lr into every param_group).
TESTS = """
import os
import torch
from torch import nn


def trained():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(os.environ.get("LR", "0.1")),
        weight_decay=float(os.environ.get("DECAY", "0.01")),
    )
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    return model, optimizer


def test_checkpoint(statedict_snapshot):
    model, optimizer = trained()
    statedict_snapshot.assert_match(model, optimizer=optimizer{options})
"""


def project(pytester: pytest.Pytester, *, options: str = "", ini: str = "") -> Path:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_user=textwrap.dedent(TESTS).format(options=options))
    return pytester.path / "__statedict__" / "test_user" / "test_checkpoint" / "0.json"


def hyperparams(snapshot: Path) -> set[str]:
    """The hyperparameter names the snapshot holds, over its param_groups."""
    data = json.loads(snapshot.read_text())
    return {name for group in data["optimizer"]["param_groups"] for name in group} - {"params"}


def run(pytester: pytest.Pytester, *args: str, lr: str, decay: str = "0.01") -> pytest.RunResult:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LR", lr)
        env.setenv("DECAY", decay)
        return pytester.runpytest("-p", "no:randomly", *args)


@pytest.mark.parametrize(
    ("options", "ini"),
    [
        pytest.param(', ignore_hyperparams=("lr", "initial_lr")', "", id="per-check"),
        pytest.param("", "statedict_ignore_hyperparams = lr initial_lr", id="ini"),
    ],
)
def test_left_out_of_the_snapshot_and_the_check(
    pytester: pytest.Pytester, options: str, ini: str
) -> None:
    snapshot = project(pytester, options=options, ini=ini)
    run(pytester, "--statedict-update", lr="0.1").assert_outcomes(passed=1)
    names = hyperparams(snapshot)
    assert "weight_decay" in names
    assert not names & {"lr", "initial_lr"}, names
    written = snapshot.read_text()
    run(pytester, lr="0.003").assert_outcomes(passed=1)  # the schedule moved it: not a change
    assert snapshot.read_text() == written
    failed = run(pytester, lr="0.003", decay="0.1")  # any other hyperparameter still counts
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*param_groups*weight_decay* changed from 0.01 to 0.1"])
    failed.stdout.no_fnmatch_line("*'lr'*")


def test_without_it_a_moved_lr_fails(pytester: pytest.Pytester) -> None:
    """What the option is for: the same run fails on lr alone without it."""
    project(pytester)
    run(pytester, "--statedict-update", lr="0.1").assert_outcomes(passed=1)
    failed = run(pytester, lr="0.003")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines(["*param_groups*'lr'* changed from 0.1 to 0.003"])


def test_a_snapshot_written_with_them_still_passes(pytester: pytest.Pytester) -> None:
    """An older snapshot holds lr and initial_lr: with the option they are left out of the
    comparison, the file stays as it is, and --statedict-update rewrites it without them."""
    snapshot = project(pytester)
    run(pytester, "--statedict-update", lr="0.1").assert_outcomes(passed=1)
    assert {"lr", "initial_lr"} <= hyperparams(snapshot)
    written = snapshot.read_text()
    project(pytester, ini="statedict_ignore_hyperparams = lr initial_lr")
    run(pytester, lr="0.003").assert_outcomes(passed=1)
    assert snapshot.read_text() == written
    run(pytester, "--statedict-update", lr="0.003").assert_outcomes(passed=1)
    assert not hyperparams(snapshot) & {"lr", "initial_lr"}


def _optimizer(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def test_against_an_expected_file(tmp_path: Path) -> None:
    model, optimizer = _optimizer(0.1)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    today, today_optimizer = _optimizer(0.02)
    with pytest.raises(StateDictMismatch, match=r"'lr'\] changed from 0.1 to 0.02"):
        assert_state_dict_matches(today, str(path), optimizer=today_optimizer)
    assert_state_dict_matches(
        today, str(path), optimizer=today_optimizer, ignore_hyperparams=("lr",)
    )


def test_a_bare_string_is_refused() -> None:
    model, optimizer = _optimizer(0.1)
    with pytest.raises(TypeError, match=r"ignore_hyperparams=\('lr',\)"):
        assert_state_dict_matches(model, model, optimizer=optimizer, ignore_hyperparams="lr")
