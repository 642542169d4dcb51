"""The files beside the model in a training framework's checkpoint folder that are read
without being loaded: a transformers ``trainer_state.json``, and the class a pickle
(``training_args.bin``) would build, told from its opcodes.

Nothing here unpickles: ``training_args.bin`` is ``torch.save(TrainingArguments)``, whose
unpickling imports transformers and may run any code the file names, so only its
``data.pkl``'s opcodes are read (``pickletools``, which executes nothing), within the same
bounds as any ``torch.save`` archive.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from .files import open_regular, parse_json, read_bounded, require_regular_file
from .limits import MAX_INDEX_BYTES
from .torch_zip import ZIP_MAGIC, check_archive
from .unpickling import pickle_globals

__all__ = ["pickled_class", "trainer_state"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


def trainer_state(path: Path) -> Mapping[str, Any]:
    """A Trainer's ``trainer_state.json``: a JSON object (its ``log_history`` grows with
    every logged step, so it is bounded as a sharded index is, far above a real one)."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(path, problem)

    data = parse_json(read_bounded(path, MAX_INDEX_BYTES, "Trainer state"), fail,
                      "the Trainer state")  # fmt: skip
    if not isinstance(data, dict):
        raise fail(f"the Trainer state is a JSON {type(data).__name__}, not an object")
    return data


def pickled_class(path: Path) -> str | None:
    """The class (or callable) a ``torch.save`` archive's pickle builds first, its top
    object's, read from the opcodes; None where the file is no such archive."""
    size = require_regular_file(path).st_size
    with open_regular(path) as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return None
    data_pkl = check_archive(path, size)
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(data_pkl)  # bounded by check_archive, stored uncompressed
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(path, f"its pickle cannot be read ({exc})") from None
    found = pickle_globals(data)
    return found[0] if found else None
