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


@pytest.hookspec
def pytest_statedict_normalize_key(key: str) -> str | None:
    """Map a state_dict key to the form it is compared in, or None to keep it.

    Applied to both sides of every comparison and before a snapshot is written, after the
    ``rename=`` of the call; e.g. strip a wrapper prefix that a project's models carry.

    Every implementation applies, in turn, each to the key the one before returned: pluggy's
    call order, last registered first (a conftest's before an installed plugin's, a deeper
    conftest's before its parent's; ``tryfirst``/``trylast`` move one). So one plugin that
    strips ``module.`` and another that strips ``_orig_mod.`` compose. The plugin calls the
    implementations itself, to thread the key through them: calling the hook directly gives
    each one's answer to the same key, not the composition.
    """


@pytest.hookspec(firstresult=True)
def pytest_statedict_compare_entry(key: str, expected: Any, actual: Any) -> Any:
    """Compare one key's two entries your own way, or return None to leave it to the plugin.

    ``expected`` and ``actual`` are the key's entries
    (:class:`~pytest_statedict.schema_entries.TensorEntry`: shape, dtype, kind, ... and
    ``fingerprint``, the value statistics, when recorded). It is asked for every key both
    sides hold, under its compared name, whenever the two sides are compared (a snapshot
    whose file is already what would be written is not). Return True or ``[]`` to accept
    the key as equal, whatever the built-in comparison would say (shape and dtype
    included); a list of strings to report those differences (``changed`` lines of that
    key, and the check fails); None for no opinion (the built-in comparison runs, with
    ``rtol``/``atol``/``tolerances=``). The first implementation that answers other than
    None decides (``firstresult``: pluggy's order, last registered first, as for
    ``pytest_statedict_load_checkpoint``); a ``compare=`` given to the call is asked
    before any hook.
    """
