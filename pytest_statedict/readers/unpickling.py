"""The one unpickling policy of the readers: what a checkpoint's pickles may create.

* ``torch.save`` files (zip archives and legacy pickles) go through :func:`torch_load`:
  ``torch.load(weights_only=True)``, torch's own allowlist unpickler (tensors, storages,
  containers and plain values), unless the caller passes ``weights_only=False`` by name
  because they trust the file. A refused pickle is explained (a pickled module, a bound
  method, the foreign classes it names) from its opcodes, never by running it.
* DCP ``.metadata`` pickles go through :func:`unpickle_dcp_metadata`: an unpickler that
  resolves exactly the ``(module, qualname)`` pairs of :data:`DCP_GLOBALS` and the torch
  dtypes by their exact names. It never imports or looks up a name itself, so a dotted
  qualname (``STACK_GLOBAL`` of ``torch.distributed.checkpoint.metadata`` +
  ``os.system``) or any other module's attribute is refused before it exists.

Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import enum
import io
import os
import pickle
import pickletools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, StateDictError, hide_from_bad_input
from .limits import MAX_PICKLE_OPS

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# Every global a torch 2.x ``dcp.save`` writes into .metadata (tensors, bytes and nested
# dicts; found with pickletools.genops on real checkpoints), and nothing else.
DCP_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
    }
)

# The checkpoint's path, pickled in its StorageMeta: ``pathlib.PosixPath`` and friends, from
# ``pathlib._local`` on Python 3.13. Read as the pure twin (a WindowsPath cannot be made on
# Linux; the layout never needs it).
_PATH_MODULES = frozenset({"pathlib", "pathlib._local"})
_PATH_CLASSES = frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"})

_resolved: dict[tuple[str, str], Any] = {}


class _AddedLater:
    """A class of :data:`DCP_GLOBALS` this torch lacks (``StorageMeta`` before torch 2.4):
    a folder a newer torch wrote still gives its layout, which never needs these."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _dcp_objects() -> dict[tuple[str, str], Any]:
    """The objects the DCP unpickler may return, resolved once from trusted names."""
    if not _resolved:
        import importlib
        import pathlib

        import torch

        for module, name in DCP_GLOBALS:
            found = getattr(importlib.import_module(module), name, None)
            _resolved[module, name] = _AddedLater if found is None else found
        for module in _PATH_MODULES:
            for name in _PATH_CLASSES:
                _resolved[module, name] = getattr(pathlib, "Pure" + name.removeprefix("Pure"))
        for name, value in vars(torch).items():
            if isinstance(value, torch.dtype):
                _resolved["torch", name] = value
    return _resolved


def _counted(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    """An opcode handler that first counts itself against :data:`~.limits.MAX_PICKLE_OPS`."""

    def handle(unpickler: Any) -> None:
        unpickler.ops += 1
        if unpickler.ops > MAX_PICKLE_OPS:
            raise pickle.UnpicklingError(
                f"more than {MAX_PICKLE_OPS:,} pickle operations, far more than DCP metadata has"
            )
        handler(unpickler)

    return handle


def _build(unpickler: Any) -> None:
    """BUILD only on an instance of an allowed class, never on a class or a function.

    BUILD sets attributes on whatever is on the stack: on a class that :meth:`find_class`
    handed out (``pathlib.PurePosixPath.is_relative_to = ...``), it would change that
    class for the whole process.
    """
    target = unpickler.stack[-2]  # BUILD pops the state; the target is below it
    if type(target) not in _instance_types():
        raise pickle.UnpicklingError(
            f"the pickle sets the state of a {type(target).__name__}, not of DCP metadata"
        )
    pickle._Unpickler.load_build(unpickler)  # type: ignore[attr-defined]


class _AllowlistUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """The pure-Python unpickler: its memo is a dict (the C one allocates an array as long
    as the largest memo index a pickle names: 9 bytes could ask for gigabytes), and each of
    its opcodes can be counted and vetted."""

    dispatch = {
        code: _counted(_build if code == pickle.BUILD[0] else handler)
        for code, handler in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
    }

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.ops = 0

    def find_class(self, module: str, name: str) -> Any:
        found = _dcp_objects().get((module, name)) if "." not in name else None
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in DCP metadata")


def _instance_types() -> frozenset[type]:
    """The classes whose instances BUILD may set the state of: the allowed classes, but no
    enum (its members are shared singletons, as are dtypes and layouts, which are no class
    of the allowlist)."""
    return frozenset(
        found
        for found in _dcp_objects().values()
        if isinstance(found, type) and not issubclass(found, enum.Enum)
    )


def unpickle_dcp_metadata(data: bytes, path: Path) -> Any:
    """A DCP ``.metadata`` pickle, unpickled with the allowlist (a bounded byte string)."""
    try:
        return _AllowlistUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # a hostile stream may fail in any way the unpickler can
        raise CheckpointError(
            path, f"its .metadata cannot be read safely ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def torch_load(
    path: Path,
    *,
    map_location: Any,
    weights_only: bool,
    mmap: bool,
    data_pickle: Callable[[], bytes] | None = None,
) -> tuple[Any, set[str]]:
    """``torch.load`` under the policy; the object and the storage locations it was saved on.

    Tensors saved on a device this machine lacks (``cuda:0`` on a CPU-only runner) are
    mapped to ``map_location`` (default: left on the CPU) instead of failing.
    ``data_pickle`` reads the pickle (an archive's data.pkl) that explains a refusal.
    """
    import torch

    locations: set[str] = set()
    target = None if map_location is None else torch.device(map_location)

    def record_location(storage: Any, location: str) -> Any:
        locations.add(location)
        # the storage arrives on the CPU (memory-mapped): moving it to the CPU would copy it
        if target is None or target.type == "cpu":
            return storage
        return storage.to(device=target)

    try:
        with warnings.catch_warnings():
            # noise on a file that is refused anyway, or that the error explains
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(  # a str: torch 2.1/2.2 memory-map only a str path
                os.fspath(path), map_location=record_location, weights_only=weights_only, mmap=mmap
            )
    except StateDictError:
        raise
    except pickle.UnpicklingError as exc:
        pickled = data_pickle() if data_pickle is not None else None
        raise CheckpointError(path, explain_refusal(pickled, exc)) from None
    except Exception as exc:  # torch.load on damaged bytes fails in many ways: all are ours
        raise CheckpointError(
            path,
            f"torch.load could not read it, the file is truncated or corrupt "
            f"({type(exc).__name__}: {_first_line(exc)})",
        ) from None
    return obj, locations


def pickle_globals(data: bytes) -> list[str]:
    """The globals a pickle refers to, read from its opcodes without unpickling it."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a damaged stream: what was read so far explains enough
        pass
    if any(g.endswith("getattr") for g in found) and "state_dict" in strings:
        found.append("<bound method state_dict>")
    return found


def explain_refusal(data_pickle: bytes | None, exc: Exception) -> str:
    """Why ``weights_only=True`` refused a pickle, and what to do about it."""
    found = pickle_globals(data_pickle) if data_pickle is not None else []
    if "<bound method state_dict>" in found:
        return (
            "it holds the bound method `model.state_dict`, not the dict `model.state_dict()`: "
            "it was saved with `torch.save(model.state_dict, ...)`; save "
            "`model.state_dict()` instead. It was not unpickled (that would run code)"
        )
    safe_prefixes = ("torch.", "collections.OrderedDict", "builtins.", "__builtin__.")
    unsafe = sorted({g for g in found if not g.startswith(safe_prefixes) or ".nn." in g})
    what = f" ({', '.join(unsafe[:5])})" if unsafe else ""
    module = next((g for g in unsafe if ".nn.modules." in g), None)
    hint = " It holds a whole pickled module: save `model.state_dict()` instead." if module else ""
    return (
        f"it needs arbitrary code to unpickle{what}, so it was not loaded.{hint} If you trust "
        "the file, pass weights_only=False by name; the error from torch.load was: "
        f"{_last_line(exc)}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _last_line(exc: BaseException) -> str:
    for line in reversed(str(exc).strip().splitlines()):
        if "error:" in line.lower() or "unsupported" in line.lower():
            return line.strip()[:300]
    return _first_line(exc)
