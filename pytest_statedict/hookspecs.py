"""Hooks other plugins and conftest files can implement to extend pytest-statedict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.hookspec(firstresult=True)
def pytest_statedict_load_checkpoint(path: Path) -> Any:
    """Load a checkpoint file in a format the plugin does not know.

    Return a state_dict (or a general checkpoint dict) for ``path``, or None to let the
    plugin read it (``torch.save`` archives, ``.safetensors``, snapshots). Called first for
    every file the plugin reads while a pytest session runs. To read a file type everywhere
    (``statedict show``, ``schema_of`` outside pytest, from its header without loading it),
    register a checkpoint format instead: the entry-point group ``pytest_statedict.formats``
    (``docs/extending.md``).
    """


@pytest.hookspec(firstresult=True)
def pytest_statedict_normalize_key(key: str) -> str | None:
    """Map a state_dict key to the form it is compared in, or None to keep it.

    Applied to both sides of every comparison and before a snapshot is written, after the
    ``rename=`` of the call; e.g. strip a wrapper prefix that a project's models carry.
    """
