"""The model state_dict in a checkpoint file: what the refactor gate loads.

Above ``extract`` (it tells a state_dict by torch's tensors) and the formats (which load
the file); the schema of a file is ``extract.schema_of(path)``, which reads it through
``formats.reading`` with extract's walk of torch objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedObjectError, hide_from_bad_input
from .extract import is_state_dict
from .formats.reading import CheckpointLoader, load_file
from .layout import MODEL_KEYS, select_part

__all__ = ["load_state_dict_file", "model_state"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


def load_state_dict_file(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
    part: str | None = None,
    loader: CheckpointLoader | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """The model state_dict inside one checkpoint file: ``part``, or the usual model entry."""
    path = Path(path)
    obj, locations = load_file(
        path, loader=loader, map_location=map_location, weights_only=weights_only
    )
    return model_state(path, obj, part=part), locations


def model_state(path: Path, obj: Any, *, part: str | None = None) -> dict[str, Any]:
    """The model state_dict in what a checkpoint file held: ``part``, or the usual model entry."""
    if part is not None:
        try:
            obj = select_part(obj, part)
        except UnsupportedObjectError as exc:
            raise CheckpointError(path, str(exc).removeprefix("schema_of(): ")) from None
    if is_state_dict(obj):
        return obj
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):  # a whole module
        state: dict[str, Any] = obj.state_dict()  # (loaded with weights_only=False, by name)
        return state
    if isinstance(obj, dict):
        for key in MODEL_KEYS:
            if is_state_dict(obj.get(key)):
                return obj[key]
        # as schema_of reads a general checkpoint: its one state_dict, whatever its name
        parts = [str(key) for key, value in obj.items() if is_state_dict(value)]
        if len(parts) == 1:
            return obj[parts[0]]
        if parts:
            raise CheckpointError(
                path,
                f"it holds several state_dicts ({', '.join(parts)}): name the model's with "
                f"part={parts[0]!r}",
            )
    raise CheckpointError(
        path,
        f"no model state_dict in it (looked for a mapping of names to tensors, at the top "
        f"or under {', '.join(MODEL_KEYS)})",
    )
