"""The running pytest session as the layers below the session see it.

Readers, extraction and the checks need three things from a pytest run: the session object
of the test that is running, the ``pytest_statedict_load_checkpoint`` hook and the
``pytest_statedict_normalize_key`` hook. They get them here, from a stack the plugin pushes
onto at ``pytest_configure``, so that none of them imports the session (no import circles):
readers are handed the hook by their caller; nothing here imports torch or pytest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import StateDictError

# a stack: pytester runs pytest inside pytest, and the inner run is the one that counts
SESSIONS: list[Any] = []

CheckpointLoader = Callable[[Path], Any]


def active_session() -> Any | None:
    """The plugin's session object of the innermost pytest run, or None outside pytest."""
    return SESSIONS[-1] if SESSIONS else None


def current_session() -> Any:
    """The active session, which must be running a test (for checks against snapshots)."""
    session = active_session()
    if session is None or session.item is None:
        raise StateDictError(
            "assert_state_dict_matches(obj) without expected= checks the current test's "
            "snapshot, so it must be called while a pytest test runs (with the plugin "
            "enabled); outside a test, pass expected= (a module, state_dict, path or Schema)"
        )
    return session


def checkpoint_loader() -> CheckpointLoader | None:
    """The ``pytest_statedict_load_checkpoint`` hooks of the running session, if any.

    The returned callable gives what a hook made of a path, or None where no hook claimed it.
    """
    session = active_session()
    if session is None:
        return None
    hook = session.config.hook.pytest_statedict_load_checkpoint
    if not hook.get_hookimpls():
        return None
    return lambda path: hook(path=path)


def key_normaliser() -> Callable[[str], str] | None:
    """The ``pytest_statedict_normalize_key`` hooks of the running session, if any."""
    session = active_session()
    if session is None:
        return None
    hook = session.config.hook.pytest_statedict_normalize_key
    if not hook.get_hookimpls():
        return None
    return lambda key: hook(key=key) or key


def verbose() -> bool:
    """Whether the running session asked for full reports (``-vv``)."""
    session = active_session()
    return session is not None and session.verbose
