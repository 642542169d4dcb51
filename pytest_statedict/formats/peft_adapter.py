"""PEFT adapter folders (``readers.peft_adapter``): ``adapter_config.json`` and the adapter's
weights, as ``PeftModel.save_pretrained`` writes them.

A folder holding ``adapter_config.json``, or that file itself (it names its folder); a
folder without that config is left to the other formats, and so is a Trainer's
``checkpoint-N/`` of a PEFT model (the same two files beside ``trainer_state.json``, the
optimizer's and the scheduler's state: the training-folder format reads all of it, this
adapter as its model). The schema is the weights file's, read through the caller's
``nested`` reader (without torch for ``statedict show``), with the config described as its
``framework``; the config itself adds nothing to the layout (its rank, targets and
``modules_to_save`` show in the adapter's keys and shapes already), so it is no extra.
Whether the adapter loads into a model is PEFT's question, not torch's: see
``pytest_statedict.peft_rules``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..readers import peft_adapter as reader
from ..schema import Schema
from .base import Loaded, NestedSchema

__all__ = ["FORMAT", "PEFT_ADAPTER", "TRAINER_STATE", "PeftAdapter", "read_adapter"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

PEFT_ADAPTER = "peft adapter"
# what makes a folder a transformers Trainer's checkpoint, whatever its model
TRAINER_STATE = "trainer_state.json"


class PeftAdapter:
    """A PEFT adapter folder."""

    name = PEFT_ADAPTER
    schema_first = True
    torch_free = True  # as far as its weights file's reader is: ``nested`` says
    save = None

    def detect(self, path: Path, head: bytes | None) -> bool:
        if head is None:
            return (path / reader.CONFIG).is_file() and not (path / TRAINER_STATE).exists()
        return path.name == reader.CONFIG

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        folder = _folder(path)
        if part is not None:
            raise CheckpointError(folder, "a PEFT adapter has no parts to choose from")
        return read_adapter(folder, nested)

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        folder = _folder(path)
        raise CheckpointError(
            folder,
            "is a PEFT adapter folder: it is read from its config and weights file, never "
            f"loaded whole (to load the adapter's tensors, name its weights file, e.g. "
            f"{folder / reader.WEIGHTS[0]})",
        )


def read_adapter(folder: Path, nested: NestedSchema) -> Schema:
    """The schema of the adapter a folder holds, its config described as the framework.

    Also what a format reading a folder that holds an adapter among other things (a
    Trainer's ``checkpoint-N/`` of a PeftModel) reads the adapter with.
    """
    config = reader.read_config(folder)
    weights = reader.weights_file(folder)
    schema = nested(weights)
    return replace(
        schema,
        source=str(folder),
        framework=config.describe(),
        read_as=f"{PEFT_ADAPTER}: {reader.CONFIG}, and {weights.name} as {schema.read_as}",
    )


def _folder(path: Path) -> Path:
    """The folder of an adapter named by itself or by its ``adapter_config.json``."""
    return path.parent if path.name == reader.CONFIG and not path.is_dir() else path


FORMAT = PeftAdapter()
