"""Checkpoints torch loads whose structure is wrong: an own error naming the file, never a
raw ``KeyError``/``AttributeError``/``RecursionError`` ("this is a bug") from the layout walk.

Each file is a real ``torch.save`` of what a hand-edited or hostile checkpoint holds; each
goes through the command line (a subprocess, reading without torch) and ``schema_of``
(loading with torch): both must name the file and the problem.
"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_statedict import CheckpointError, schema_of

WEIGHTS = {"w": torch.zeros(2)}


def optimizer(state: Any = None, groups: Any = None) -> dict[str, Any]:
    return {
        "model": WEIGHTS,
        "optimizer": {
            "state": {} if state is None else state,
            "param_groups": [{"params": [0], "lr": 1.0}] if groups is None else groups,
        },
    }


def with_metadata_list() -> OrderedDict[str, torch.Tensor]:
    state = OrderedDict(WEIGHTS)
    state._metadata = [1, 2]  # type: ignore[attr-defined]
    return state


def nested(depth: int) -> dict[str, Any]:
    obj: dict[str, Any] = dict(WEIGHTS)
    for _ in range(depth):
        obj = {"model": obj}
    return obj


ODD = {
    "params as strings": (
        lambda: optimizer(groups=[{"params": ["a", "b"], "lr": 1}]),
        "param_groups[0]'s params are not parameter indices (ints)",
    ),
    "params missing": (
        lambda: optimizer(groups=[{"lr": 1}]),
        "param_groups[0] has no list of params",
    ),
    "a group that is an int": (lambda: optimizer(groups=[3]), "param_groups[0] is a int"),
    "param_groups a dict": (
        lambda: optimizer(groups={"a": 1}),
        "param_groups is a dict, not a list of groups",
    ),
    "state a list": (lambda: optimizer(state=[1, 2]), "state is a list, not a dict"),
    "a parameter's state a list": (
        lambda: optimizer(state={0: [1]}),
        "the state of 0 is a list, not a dict",
    ),
    "_metadata a list": (
        with_metadata_list,
        "its _metadata is a list, not the mapping of module versions",
    ),
    "model parts 3000 deep": (
        lambda: nested(3000),
        "its model parts nest deeper than 32 levels",
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("odd")
    made = {}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling 3000 nested dicts recurses
    try:
        for name, (build, _) in ODD.items():
            made[name] = folder / (name.replace(" ", "_").replace("'", "") + ".pt")
            torch.save(build(), made[name])
    finally:
        sys.setrecursionlimit(limit)
    return made


@pytest.mark.parametrize("name", list(ODD))
def test_the_command_line_names_the_file_and_the_problem(files: dict[str, Path], name: str) -> None:
    path = files[name]
    result = subprocess.run(
        [sys.executable, "-m", "pytest_statedict", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"checkpoint {path}: " in result.stderr
    assert ODD[name][1] in result.stderr
    assert "this is a bug" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", list(ODD))
def test_schema_of_names_the_file_and_the_problem(files: dict[str, Path], name: str) -> None:
    with pytest.raises(CheckpointError) as error:
        schema_of(files[name])
    assert str(files[name]) in str(error.value)
    assert ODD[name][1] in str(error.value)
