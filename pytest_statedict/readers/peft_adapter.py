"""PEFT adapter folders, as ``save_pretrained`` writes them: ``adapter_config.json`` beside
the adapter's weights, ``adapter_model.safetensors`` (or ``adapter_model.bin``).

The weights file is read by its own reader; here only the config is read: JSON of at most
:data:`~.limits.MAX_ADAPTER_CONFIG_BYTES`, an object with a ``peft_type``. It is not trusted:
each field described is checked for the type PEFT gives it, and the strings it holds are
shown cut short and escaped (a config may hold anything, terminal escapes included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, hide_from_bad_input
from .files import parse_json, read_bounded
from .limits import MAX_ADAPTER_CONFIG_BYTES

__all__ = ["CONFIG", "WEIGHTS", "AdapterConfig", "read_config", "weights_file"]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

CONFIG = "adapter_config.json"
# in the order PEFT's own load_peft_weights looks for them
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# names of a list shown before "and N more", and the characters shown of one string
SHOWN_NAMES = 8
SHOWN_CHARS = 100


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter's config says about its layout and where it came from."""

    peft_type: str  # "LORA", "IA3", ...
    r: int | None  # the rank, for the tuners that have one
    targets: str | None  # target_modules as described: "q, v", "matching '.*attn.*'"
    modules_to_save: tuple[str, ...]
    base_model: str | None  # base_model_name_or_path, or the base model's class
    peft_version: str | None  # the PEFT that wrote it

    def describe(self) -> str:
        """As ``statedict show`` names the framework, e.g. ``PEFT adapter (LORA, r=8, ...)``."""
        parts = [self.peft_type]
        if self.r is not None:
            parts.append(f"r={self.r}")
        if self.targets:
            parts.append(f"targets {self.targets}")
        if self.modules_to_save:
            parts.append(f"modules_to_save {_listed(self.modules_to_save)}")
        if self.base_model:
            parts.append(f"base model {self.base_model}")
        if self.peft_version:
            parts.append(f"peft {self.peft_version}")
        return f"PEFT adapter ({', '.join(parts)})"


def read_config(folder: Path) -> AdapterConfig:
    """The adapter's config, or a :class:`CheckpointError` naming the config file."""
    path = folder / CONFIG

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(path, problem)

    data = parse_json(read_bounded(path, MAX_ADAPTER_CONFIG_BYTES, "PEFT adapter config"), fail,
                      "the adapter config")  # fmt: skip
    if not isinstance(data, dict):
        raise fail(f"a PEFT adapter config is a JSON object; this one is a {_json_type(data)}")
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise fail(
            'it has no "peft_type" (PEFT writes one, e.g. "LORA"): not the config of an '
            "adapter PEFT saved"
        )
    field = _Fields(data, fail)
    if not isinstance(peft_type, str) or not peft_type:
        raise field.wrong("peft_type", peft_type, 'the name of a PEFT method, e.g. "LORA"')
    base_model = field.text("base_model_name_or_path")
    if base_model is None:
        mapping = data.get("auto_mapping")
        if isinstance(mapping, dict):
            base_model = _Fields(mapping, fail).text("base_model_class")
    return AdapterConfig(
        peft_type=_shown(peft_type),
        r=field.rank("r"),
        targets=field.targets("target_modules"),
        modules_to_save=field.names("modules_to_save"),
        base_model=base_model,
        peft_version=field.text("peft_version"),
    )


def weights_file(folder: Path) -> Path:
    """The adapter's weights file: the first of :data:`WEIGHTS` the folder holds."""
    for name in WEIGHTS:
        if (folder / name).exists() or (folder / name).is_symlink():
            return folder / name  # its reader says what is wrong with it, if anything
    raise CheckpointError(
        folder,
        f"is a PEFT adapter folder ({CONFIG}) without its weights: it holds neither "
        f"{' nor '.join(WEIGHTS)}",
    )


class _Fields:
    """The fields of a config object, each checked for the type PEFT writes."""

    def __init__(self, data: dict[str, Any], fail: Callable[[str], CheckpointError]) -> None:
        self.data = data
        self.fail = fail

    def wrong(self, name: str, value: Any, expected: str) -> CheckpointError:
        return self.fail(f'"{name}" is a {_json_type(value)}, not {expected}')

    def text(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self.wrong(name, value, "a string")
        return _shown(value)

    def rank(self, name: str) -> int | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.wrong(name, value, "a positive integer (the adapter's rank)")
        return value

    def names(self, name: str) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.wrong(name, value, "a list of module names")
        return tuple(_shown(v) for v in value)

    def targets(self, name: str) -> str | None:
        """target_modules: a list of names (sorted: PEFT keeps a set, and writes it in the
        set's order), or one string (a regex, or "all-linear")."""
        value = self.data.get(name)
        if isinstance(value, str):
            return value if value == "all-linear" else f"matching {_shown(value)}"
        names = self.names(name)
        return _listed(tuple(sorted(names))) if names else None


def _listed(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    more = len(names) - SHOWN_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _shown(text: str) -> str:
    """A string of the config as a message may print it: cut short, escaped if unprintable."""
    cut = text[:SHOWN_CHARS] + ("..." if len(text) > SHOWN_CHARS else "")
    return cut if cut.isprintable() else ascii(cut)


def _json_type(value: Any) -> str:
    names = {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean",
             int: "number", float: "number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)
