"""Training frameworks' checkpoint folders: a transformers ``Trainer``'s ``checkpoint-N/``
and an accelerate ``Accelerator.save_state`` folder, read as one checkpoint.

A Trainer folder holds the model (``model.safetensors``, ``pytorch_model.bin`` or a sharded
index), ``optimizer.pt`` (``optimizer.state_dict()``), ``scheduler.pt`` (the LR scheduler's
``state_dict()``), ``rng_state.pth`` (one per process: ``rng_state_N.pth``),
``trainer_state.json`` and ``training_args.bin`` (a pickled ``TrainingArguments``).
accelerate writes ``model.safetensors``, ``optimizer.bin``, ``scheduler.bin`` and
``random_states_N.pkl``, with ``_1``, ``_2``... for each further model, optimizer and
scheduler it prepared (``model_1.safetensors``, ``optimizer_1.bin``).

Read as a whole, because a resume reads it as a whole: the gate's ``optimizer=`` and a
release recorded from the folder must see the optimizer that ``trainer.train(
resume_from_checkpoint=...)`` or ``accelerator.load_state`` loads (read alone, the folder's
weights file hid it). The model and the optimizer are read through the caller's ``nested``
reader, as a sharded index reads its shards; a scheduler's state (plain numbers) is read
with torch's weights-only rules re-implemented (``readers.torch_zip``), the same way
whether or not torch is imported, and described by ``layout.describe_entry`` as a general
checkpoint's scheduler is; the RNG states (they pickle numpy arrays, which weights-only
refuses) and ``training_args.bin`` are described by name, never unpickled.

Parts are named by file stem: ``model``, ``model_1``; ``part=`` picks a model where there
are several. :meth:`TrainingFolder.load` gives a general checkpoint of the loadable parts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from ..layout import ENTRY_DETAIL, describe_entry
from ..readers import peft_adapter as adapter_reader
from ..readers import records, training_files
from ..readers import torch_zip as zip_reader
from ..readers.files import magic_hex, open_regular, require_regular_file
from ..readers.hf_index import INDEX_SUFFIX
from ..schema import Schema
from . import peft_adapter, safetensors_file, torch_legacy, torch_zip
from .base import CheckpointFormat, Loaded, NestedSchema

__all__ = ["ACCELERATE", "FORMAT", "TRAINER", "TRAINING_FOLDER", "FolderParts", "TrainingFolder"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

TRAINING_FOLDER = "training folder"
TRAINER = "transformers Trainer checkpoint"
ACCELERATE = "accelerate save_state"

# A model's weights (transformers' and accelerate's names; accelerate numbers each further
# model), an optimizer's and a scheduler's state (``.pt``: Trainer, ``.bin``: accelerate).
_WEIGHTS = re.compile(
    r"^(?:pytorch_|adapter_)?model(_\d+)?\.(?:safetensors|bin)(?:\.index\.json)?$"
)
_OPTIMIZER = re.compile(r"^optimizer(_\d+)?\.(?:pt|bin)$")
_SCHEDULER = re.compile(r"^scheduler(_\d+)?\.(?:pt|bin)$")
# RNG states, one per process: Trainer's rng_state[_N].pth, accelerate's random_states_N.pkl
_RNG = re.compile(r"^(?:rng_state(?:_\d+)?\.pth|random_states_\d+\.pkl)$")
_TRAINER_STATE = "trainer_state.json"
_TRAINING_ARGS = "training_args.bin"
# Other state the frameworks pickle beside the model, described by what it is, never read.
_OTHER_STATE = {
    re.compile(r"^scaler\.pt$"): "gradient scaler state",
    re.compile(r"^sampler(_\d+)?\.bin$"): "sampler state",
    re.compile(r"^dl_state_dict(_\d+)?\.bin$"): "dataloader state",
    re.compile(r"^custom_checkpoint_\d+\.pkl$"): "state of an object registered for checkpointing",
}
# A Trainer checkpoint of a PeftModel holds a PEFT adapter as its model: the adapter is read
# by PEFT's format (its config described as its framework), the rest as for any model.
_ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class FolderParts:
    """What a training folder holds, by role: parts by name (their file stem), the files
    that are described (file name -> description), and the framework that wrote it."""

    framework: str
    models: dict[str, Path] = field(default_factory=dict)
    optimizers: dict[str, Path] = field(default_factory=dict)
    schedulers: dict[str, Path] = field(default_factory=dict)
    described: dict[str, Path] = field(default_factory=dict)
    trainer_state: Path | None = None

    @classmethod
    def of(cls, folder: Path) -> FolderParts | None:
        """The parts of a training folder; None for any other folder (a plain model folder
        stays with the registry's ``folder_checkpoint``). Only the listing is read."""
        try:  # not only regular files: a FIFO or a link to a device is named when read
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            return None
        names = sorted(entry.name for entry in entries if not entry.is_dir())
        adapter = _ADAPTER_CONFIG in names
        accelerate = any(
            (_RNG.match(n) and n.endswith(".pkl"))
            or ((_OPTIMIZER.match(n) or _SCHEDULER.match(n)) and n.endswith(".bin"))
            for n in names
        )
        parts = cls(ACCELERATE if accelerate else TRAINER)
        weights: dict[str, list[str]] = {}
        for name in names:
            if found := _WEIGHTS.match(name):
                weights.setdefault(f"model{found[1] or ''}", []).append(name)
            elif found := _OPTIMIZER.match(name):
                parts.optimizers[f"optimizer{found[1] or ''}"] = folder / name
            elif _SCHEDULER.match(name):
                parts.schedulers[name] = folder / name
            elif name == _TRAINER_STATE:
                parts.trainer_state = folder / name
            elif _RNG.match(name) or name == _TRAINING_ARGS or _other_state(name):
                parts.described[name] = folder / name
        # one file per model: a sharded index or a single file, .safetensors before .bin,
        # a PEFT adapter's weights only beside its adapter_config.json
        parts.models = {
            part: folder / min(files, key=lambda n: (n.startswith("adapter_") != adapter,
                                                     ".bin" in n, INDEX_SUFFIX not in n))
            for part, files in sorted(weights.items(), key=lambda kv: _numbered(kv[0]))
        }  # fmt: skip
        if not parts.models:  # a PeftModel's adapters saved by name: checkpoint-N/<adapter>/
            parts.models = {
                entry.name: Path(entry.path)
                for entry in sorted(entries, key=lambda e: e.name)
                if entry.is_dir() and (Path(entry.path) / _ADAPTER_CONFIG).is_file()
            }
        # training state beside the weights (``trainer.save_model``'s folder, the weights
        # with training_args.bin, stays a model folder), or the framework's own files
        own_files = parts.trainer_state or any(map(_RNG.match, names))
        if not (own_files or (parts.models and (parts.optimizers or parts.schedulers))):
            return None
        return parts

    def pick_model(self, folder: Path, part: str | None) -> str:
        """The model part read: ``part``, or the only one."""
        if not self.models:
            raise CheckpointError(
                folder,
                f"is a checkpoint folder ({self.framework}) with no model weights "
                "(model.safetensors, pytorch_model.bin or their sharded index): nothing to "
                "compare a model with",
            )
        names = list(self.models)
        if part is None and len(names) == 1:
            return names[0]
        if part in self.models:
            return part
        listed = ", ".join(names)
        if part is None:
            raise CheckpointError(
                folder,
                f"is a checkpoint folder ({self.framework}) holding {len(names)} models "
                f"({listed}): choose one with part={names[0]!r} (on the command line: "
                f"statedict show --part {names[0]})",
            )
        raise CheckpointError(
            folder, f"has no part {part!r}: its models are {listed} (choose one with part=)"
        )

    def optimizer_of(self, model: str) -> str | None:
        """The optimizer state a model resumes with: the only one, or, where accelerate
        saved several, the one of the model's number (``optimizer_1`` for ``model_1``:
        accelerate numbers both in the order they were prepared)."""
        if len(self.optimizers) == 1:
            return next(iter(self.optimizers))
        paired = model.replace("model", "optimizer", 1)
        return paired if paired in self.optimizers else None


def _numbered(part: str) -> int:
    """``model`` first, then ``model_1``, ``model_2``... in number order."""
    return int(part.rpartition("_")[2]) + 1 if "_" in part else 0


def _other_state(name: str) -> str | None:
    return next((what for pattern, what in _OTHER_STATE.items() if pattern.match(name)), None)


class TrainingFolder:
    """A Trainer or accelerate checkpoint folder: the model, its optimizer, and the rest
    described."""

    name = TRAINING_FOLDER
    schema_first = True
    torch_free = True
    save = None

    def detect(self, path: Path, head: bytes | None) -> bool:
        return head is None and FolderParts.of(path) is not None

    def read_schema(
        self, path: Path, *, part: str | None, values: bool, nested: NestedSchema
    ) -> Schema:
        parts = _parts(path)
        model = parts.pick_model(path, part)
        weights = parts.models[model]
        adapter = weights.is_dir() or (path / _ADAPTER_CONFIG).is_file()
        folder = weights if weights.is_dir() else path  # an adapter saved by name: its folder
        schema = peft_adapter.read_adapter(folder, nested) if adapter else nested(weights)
        read = [f"{model} from {weights.name}"]
        optimizer = None
        opt_part = parts.optimizer_of(model)
        if opt_part is not None:
            opt_file = parts.optimizers[opt_part]
            optimizer = nested(opt_file).optimizer
            if optimizer is None:
                raise CheckpointError(
                    opt_file, "holds no optimizer state_dict (with state and param_groups)"
                )
            read.append(f"{opt_part} from {opt_file.name}")
        extras = dict(schema.extras)
        for name, scheduler in parts.schedulers.items():
            extras[name] = _scheduler_entry(scheduler)
        state = None
        if parts.trainer_state is not None:
            state = training_files.trainer_state(parts.trainer_state)
            extras[_TRAINER_STATE] = _trainer_state_entry(state)
        described = []
        for name, file in parts.described.items():
            extras[name] = _pickle_entry(name, file)
            described.append(name)
        others = [p for p in (*parts.models, *parts.optimizers) if p not in (model, opt_part)]
        how = f"{parts.framework} folder: {', '.join(read)}"
        if parts.schedulers:
            how += f"; {', '.join(parts.schedulers)} read with weights-only rules, without torch"
        if described:
            how += f"; described, not unpickled: {', '.join(described)}"
        if others:
            how += f"; other parts (part=): {', '.join(others)}"
        return replace(
            schema,
            optimizer=optimizer,
            extras=extras,
            source=str(path),
            read_as=how,
            framework=_framework(parts, state) + (f"; {schema.framework}" if adapter else ""),
        )

    def load(self, path: Path, *, map_location: Any, weights_only: bool, mmap: bool) -> Loaded:
        """The models, optimizers and schedulers by part name (``{"model": ...,
        "optimizer": ..., "scheduler": ...}``), each loaded by its file's format; the RNG
        states, ``training_args.bin`` and ``trainer_state.json`` are no state_dict and are
        left out."""
        parts = _parts(path)
        files = {
            **parts.models,
            **parts.optimizers,
            **{name.partition(".")[0]: file for name, file in parts.schedulers.items()},
        }
        obj: dict[str, Any] = {}
        saved_on: set[str] = set()
        for name, file in files.items():
            if file.is_dir():  # an adapter saved by name: its weights file
                file = adapter_reader.weights_file(file)
            loaded = _file_format(file).load(
                file, map_location=map_location, weights_only=weights_only, mmap=mmap
            )
            obj[name] = loaded.obj
            saved_on |= loaded.saved_on
        return Loaded(obj, frozenset(saved_on))


def _parts(path: Path) -> FolderParts:
    parts = FolderParts.of(path)
    if parts is None:  # the folder changed since it was detected
        raise CheckpointError(path, "is no longer a training framework's checkpoint folder")
    return parts


def _file_format(path: Path) -> CheckpointFormat:
    """The format of a file the folder holds (the three a model or state is saved in)."""
    if path.name.endswith(INDEX_SUFFIX):
        raise CheckpointError(
            path, "is a sharded checkpoint's index: it is read shard by shard, never loaded whole"
        )
    require_regular_file(path)
    with open_regular(path) as f:
        head = f.read(len(zip_reader.ZIP_MAGIC))
    for fmt in (torch_zip.FORMAT, safetensors_file.FORMAT, torch_legacy.FORMAT):
        if fmt.detect(path, head):
            return fmt
    raise CheckpointError(path, f"not a checkpoint: it starts with the bytes {magic_hex(head)}")


def _scheduler_entry(path: Path) -> str:
    """An LR scheduler's state, read torch-free (its plain numbers need no torch), as a
    general checkpoint's scheduler entry is described."""
    size = require_regular_file(path).st_size
    with open_regular(path) as f:
        is_zip = f.read(len(zip_reader.ZIP_MAGIC)) == zip_reader.ZIP_MAGIC
    if not is_zip:
        raise CheckpointError(path, "is not a torch.save zip archive (a scheduler's state_dict)")
    try:
        state, _ = zip_reader.read_records(path, size)
    except records.NeedsTorch as exc:
        return f"pickle{ENTRY_DETAIL}scheduler state (not read without torch: {exc})"
    return describe_entry(path.name, state)


def _trainer_state_entry(state: Mapping[str, Any]) -> str:
    """``trainer_state.json`` by its stateful callbacks (their names: a value such as the
    global step changes with every save, so it is the framework's provenance instead)."""
    callbacks = state.get("stateful_callbacks")
    names = ", ".join(map(str, callbacks)) if isinstance(callbacks, Mapping) else ""
    detail = f"Trainer state, stateful callbacks {names}" if names else "Trainer state"
    return f"dict{ENTRY_DETAIL}{detail}"


def _pickle_entry(name: str, path: Path) -> str:
    """A pickled file described by what it is, never unpickled."""
    if _RNG.match(name):
        return f"pickle{ENTRY_DETAIL}RNG state (not unpickled)"
    if name == _TRAINING_ARGS:
        cls = training_files.pickled_class(path)
        return f"pickle{ENTRY_DETAIL}{cls or 'training arguments'} (not unpickled)"
    return f"pickle{ENTRY_DETAIL}{_other_state(name)} (not unpickled)"


def _counted(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _framework(parts: FolderParts, state: Mapping[str, Any] | None) -> str:
    """The framework, and where it was in training (Trainer) or what it saved (accelerate)."""
    if parts.framework == ACCELERATE:
        counts = (
            (len(parts.models), "model"),
            (len(parts.optimizers), "optimizer"),
            (len(parts.schedulers), "scheduler"),
        )
        return f"{ACCELERATE} ({', '.join(_counted(n, what) for n, what in counts)})"
    progress = []
    if state is not None:
        for key, label in (("global_step", "global step"), ("epoch", "epoch")):
            value = state.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                progress.append(f"{label} {value}")
    return f"{TRAINER} ({', '.join(progress)})" if progress else TRAINER


FORMAT = TrainingFolder()
