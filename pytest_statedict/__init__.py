"""pytest-statedict: checkpoint regression testing for PyTorch models.

The public names resolve lazily, so that the pytest plugin (loaded into every pytest run)
imports no torch until a statedict feature is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .assertions import assert_state_dict_matches
    from .errors import (
        CheckpointError,
        SnapshotError,
        StateDictError,
        StateDictMismatch,
        StateDictWarning,
        UnsupportedFormatError,
        UnsupportedObjectError,
    )
    from .extract import schema_of
    from .gate import assert_checkpoint_loads
    from .releases import record_release, statedict_releases
    from .round_trip import RoundTripResult, roundtrip
    from .schema import Schema

__all__ = [
    "CheckpointError",
    "RoundTripResult",
    "Schema",
    "SnapshotError",
    "StateDictError",
    "StateDictMismatch",
    "StateDictWarning",
    "UnsupportedFormatError",
    "UnsupportedObjectError",
    "assert_checkpoint_loads",
    "assert_state_dict_matches",
    "record_release",
    "roundtrip",
    "schema_of",
    "statedict_releases",
]

_HOME = {
    "assert_state_dict_matches": "assertions",
    "assert_checkpoint_loads": "gate",
    "schema_of": "extract",
    "roundtrip": "round_trip",
    "record_release": "releases",
    "statedict_releases": "releases",
    "RoundTripResult": "round_trip",
    "Schema": "schema",
    "CheckpointError": "errors",
    "SnapshotError": "errors",
    "StateDictError": "errors",
    "StateDictMismatch": "errors",
    "StateDictWarning": "errors",
    "UnsupportedFormatError": "errors",
    "UnsupportedObjectError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
