"""The running pytest session as the layers below the session see it.

Readers, extraction and the checks need four things from a pytest run: the session object
of the test that is running, the ``pytest_statedict_load_checkpoint`` hook, the
``pytest_statedict_normalize_key`` hooks and the ``pytest_statedict_compare_entry`` hooks.
They get them here, from a stack the plugin pushes onto at ``pytest_configure``, so that
none of them imports the session (no import circles): readers are handed the hook by their
caller; nothing here imports torch or pytest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import StateDictError

if TYPE_CHECKING:
    from .session_api import SnapshotStore


# a stack: pytester runs pytest inside pytest, and the inner run is the one that counts
SESSIONS: list[Any] = []

CheckpointLoader = Callable[[Path], Any]
CheckFunction = TypeVar("CheckFunction", bound=Callable[..., Any])

# recorded checks the summary line counts after snapshots and round-trips: (kind, label),
# and the outcomes a check's record can settle to besides written and updated
CHECK_KINDS = (("gate", "gates"), ("release", "releases"), ("comparison", "comparisons"))
OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped")

# the kinds of the checks running now: a check made inside another (the release gate runs
# the refactor gate) is part of it, not a check of its own in the run's records
_RUNNING_CHECKS: list[str] = []


def active_session() -> Any | None:
    """The plugin's session object of the innermost pytest run, or None outside pytest."""
    return SESSIONS[-1] if SESSIONS else None


def current_session() -> SnapshotStore:
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
    """The ``pytest_statedict_normalize_key`` hooks of the running session, composed.

    Each implementation gets the key the one before returned (None: unchanged), in pluggy's
    call order: last registered first (so a conftest's before an installed plugin's), with
    ``tryfirst``/``trylast`` honoured. pluggy calls every implementation with the same
    arguments and cannot thread one's result into the next, so the implementations are
    called here, one by one, as pluggy would call them (by the argument names they take).
    """
    session = active_session()
    if session is None:
        return None
    impls = [
        impl
        for impl in reversed(session.config.hook.pytest_statedict_normalize_key.get_hookimpls())
        if not (impl.hookwrapper or impl.wrapper)  # nothing to wrap: no single call is made
    ]
    if not impls:
        return None

    def normalised(key: str) -> str:
        for impl in impls:
            new = impl.function(*[{"key": key}[name] for name in impl.argnames])
            if new is None:
                continue
            if not isinstance(new, str):
                raise StateDictError(
                    f"the pytest_statedict_normalize_key hook of {impl.plugin_name} gave "
                    f"{new!r} for key {key!r}: it must return the key's new name, a str, or None"
                )
            key = new
        return key

    return normalised


def entry_comparison() -> Callable[[str, Any, Any], Any] | None:
    """The ``pytest_statedict_compare_entry`` hooks of the running session, if any.

    The spec is ``firstresult``: the first implementation (pluggy's order, last registered
    first) that returns anything but None decides the key, as with the load hook.
    """
    session = active_session()
    if session is None:
        return None
    hook = session.config.hook.pytest_statedict_compare_entry
    if not hook.get_hookimpls():
        return None
    return lambda key, expected, actual: hook(key=key, expected=expected, actual=actual)


def verbose() -> bool:
    """Whether the running session asked for full reports (``-vv``)."""
    session = active_session()
    return session is not None and session.verbose


def begin_check(kind: str) -> Any | None:
    """A check starts: the session to record its outcome in, or None when it is not one.

    Only a test's outermost check is recorded (see :func:`end_check`); outside a test there
    is nothing to record it under.
    """
    session = active_session()
    outermost = not _RUNNING_CHECKS
    _RUNNING_CHECKS.append(kind)
    if session is None or session.item is None or not outermost:
        return None
    return session


def end_check() -> None:
    _RUNNING_CHECKS.pop()


def recorded_check(kind: str, name: Callable[..., str]) -> Callable[[CheckFunction], CheckFunction]:
    """Record each call of a check function in the running test's records (the summary
    line's counts, ``--statedict-report``, JUnit properties): passed when it returns, failed
    with its message when it raises. ``name(*args, **kwargs)`` names the check (a path).
    """

    def decorate(check: CheckFunction) -> CheckFunction:
        @functools.wraps(check)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            session = begin_check(kind)
            try:
                result = check(*args, **kwargs)
            except Exception as exc:
                end_check()
                if session is not None:
                    session.check_finished(kind, _named(name, args, kwargs), "failed", exc)
                raise
            end_check()
            if session is not None:
                session.check_finished(kind, _named(name, args, kwargs), "passed")
            return result

        return recorded  # type: ignore[return-value]

    return decorate


def _named(name: Callable[..., str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    try:
        return name(*args, **kwargs)
    except Exception:  # a call that did not bind: the check itself raised about it
        return "?"
