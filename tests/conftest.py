"""Shared pieces for the plugin's own tests."""

from __future__ import annotations

import sys
import tempfile
import textwrap

import pytest
from _pytest import pytester as _pytester

# pytester's in-process runs restore sys.modules afterwards, dropping whatever a run
# imported, but torch (and the libraries it loads lazily) cannot be imported twice in one
# process, and re-importing them costs seconds per run. Drop only the modules a run
# imported from its own temporary project; keep every library loaded.
_TEMP = tempfile.gettempdir()
_snapshot_init = _pytester.SysModulesSnapshot.__init__


def _keeping_libraries(self, preserve=None):  # type: ignore[no-untyped-def]
    def keep(name: str) -> bool:
        module = sys.modules.get(name)
        location = getattr(module, "__file__", None) or ""
        return not location.startswith(_TEMP) or (preserve is not None and preserve(name))

    _snapshot_init(self, keep)


_pytester.SysModulesSnapshot.__init__ = _keeping_libraries  # type: ignore[method-assign]

# A user's model module, written into pytester projects: the classic CNN of the PyTorch
# "What is a state_dict" recipe plus a BatchNorm, and an optimizer with two param groups.
NET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F


    class Net(nn.Module):
        def __init__(self, width=6, hidden=120, dtype=torch.float32):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 5, dtype=dtype)
            self.bn1 = nn.BatchNorm2d(width, dtype=dtype)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Conv2d(width, 16, 5, dtype=dtype)
            self.fc1 = nn.Linear(16 * 5 * 5, hidden, dtype=dtype)
            self.fc2 = nn.Linear(hidden, 84, dtype=dtype)
            self.fc3 = nn.Linear(84, 10, dtype=dtype)

        def forward(self, x):
            x = self.pool(F.relu(self.bn1(self.conv1(x))))
            x = self.pool(F.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


    def make_optimizer(model, decay=0.01):
        decayed = [p for n, p in model.named_parameters() if n.endswith("weight")]
        others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        return torch.optim.AdamW(
            [{"params": decayed, "weight_decay": decay}, {"params": others, "weight_decay": 0.0}],
            lr=1e-3,
        )
    """
)


# What every inner pytest run of these tests leaves out (see _inner_runs_keep_file_order).
INNER_RUN_OPTIONS = "-p no:randomly -p no:hypothesispytest"


@pytest.fixture(autouse=True)
def _inner_runs_keep_file_order(request: pytest.FixtureRequest) -> None:
    """pytest-randomly shuffles every run it is loaded into, pytester's inner runs too.

    Tests here check output order, so inner runs (in-process and subprocess alike: both
    read ``PYTEST_ADDOPTS``) leave it out; a test about random order passes ``-p randomly``,
    which comes later on the command line and so enables it again. Set once pytester has
    cleared ``PYTEST_ADDOPTS`` (it does so when it is created).

    Inner runs leave out hypothesis's plugin too: no inner project uses it, and importing
    hypothesis costs each subprocess (an xdist run's controller and every worker) about a
    second of CPU.
    """
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("PYTEST_ADDOPTS", INNER_RUN_OPTIONS)


@pytest.fixture
def net_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester project with ``netmodel.py`` importable by its tests."""
    pytester.makepyfile(netmodel=NET_SOURCE)
    pytester.syspathinsert()
    return pytester


def literal_brackets(pattern: str) -> str:
    """An fnmatch pattern whose ``[`` and ``]`` match themselves (``*`` stays a wildcard)."""
    return "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in pattern)


def match_lines(result: pytest.RunResult, patterns: list[str]) -> None:
    """``result.stdout.fnmatch_lines`` with literal brackets, for shapes like ``[6, 3]``."""
    __tracebackhide__ = True
    result.stdout.fnmatch_lines([literal_brackets(p) for p in patterns])
