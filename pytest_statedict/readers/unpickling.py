"""The one unpickling policy of the readers: what a checkpoint's pickles may create.

* ``torch.save`` files (zip archives and legacy pickles) go through :func:`torch_load`:
  ``torch.load(weights_only=True)``, torch's own allowlist unpickler (tensors, storages,
  containers and plain values), unless the caller passes ``weights_only=False`` by name
  because they trust the file. A refused pickle is explained (a pickled module, a bound
  method, the foreign classes it names) from its opcodes, never by running it.
* DCP ``.metadata`` pickles go through :func:`unpickle_dcp_metadata`: an unpickler that
  resolves exactly the ``(module, qualname)`` pairs of :data:`DCP_GLOBALS` and the torch
  dtypes by their exact names, to torch-free stand-ins (``records``): it imports no torch.
  It never imports or looks up a name itself, so a dotted qualname (``STACK_GLOBAL`` of
  ``torch.distributed.checkpoint.metadata`` + ``os.system``) or any other module's
  attribute is refused before it exists.
* The CLI reads a ``torch.save`` archive's ``data.pkl`` with :func:`unpickle_torch_records`
  and no torch: torch's weights-only rules re-implemented (its opcodes, its allowlist, its
  checks on BUILD, APPEND, SETITEM and persistent ids), building ``records`` where torch
  would build tensors. What torch would refuse is refused with torch's words; what torch
  may accept but a record cannot stand for raises ``records.NeedsTorch``, and the caller
  reads the file with :func:`torch_load` instead.

Both unpicklers spend one budget a pickle (:class:`Budget`, sized in ``limits``): every
opcode is charged what it makes (:data:`OPCODE_COST`), every call of an allowed callable
and every BUILD what it allocates and iterates, *before* it runs (:func:`call_cost`), so a
memo'd argument passed again is charged again; past the budget the pickle is refused.
torch's own unpickler charges nothing: :func:`check_cost` runs a pickle through the records
reader first, with a stand-in for whatever records cannot stand for, and refuses one that
would cost more than its budget before ``torch.load`` reads it.

Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import _codecs
import contextlib
import gc
import io
import os
import pathlib
import pickle
import sys
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, StateDictError, hide_from_bad_input
from . import records
from .limits import DCP_METADATA_COST, MAX_SCANNED_OPS, PICKLE_COST_BASE, PICKLE_COST_PER_STORAGE

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

_DCP = "torch.distributed.checkpoint.metadata"
# What each allowed global is to the DCP unpickler: torch-free records of DCP's classes
# (``records``), never the classes themselves, so reading .metadata imports no torch.
_DCP_OBJECTS: dict[tuple[str, str], Any] = {
    (_DCP, "Metadata"): records.Metadata,
    (_DCP, "TensorStorageMetadata"): records.TensorStorageMetadata,
    (_DCP, "BytesStorageMetadata"): records.BytesStorageMetadata,
    (_DCP, "ChunkStorageMetadata"): records.ChunkStorageMetadata,
    (_DCP, "TensorProperties"): records.TensorProperties,
    (_DCP, "MetadataIndex"): records.MetadataIndex,
    (_DCP, "StorageMeta"): records.StorageMeta,
    (_DCP, "_MEM_FORMAT_ENCODING"): records.memory_format_encoding,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): records.StorageInfo,
    ("torch.serialization", "_get_layout"): records.layout,
    ("torch", "Size"): records.Size,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): value for name, value in records.DTYPES.items()},
    **{
        (module, name): getattr(pathlib, "Pure" + name.removeprefix("Pure"))
        for module in _PATH_MODULES
        for name in _PATH_CLASSES
    },
}


def _dcp_objects() -> dict[tuple[str, str], Any]:
    """The objects the DCP unpickler may return, by their trusted names."""
    return _DCP_OBJECTS


# ---- the cost budget ----------------------------------------------------------------------


class OverBudget(Exception):
    """A pickle that spent its budget: refused, whoever reads it (see :class:`Budget`)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(budget.allowed)
        self.allowed = budget.allowed
        self.storages = budget.storages

    def problem(self) -> str:
        """The refusal, as the error naming the file says it."""
        storages = f" and {self.storages:,} storages" if self.storages else ""
        return (
            f"unpickling it would cost more than its budget of {self.allowed:,} bytes (the "
            f"allowance of a pickle{storages}): it holds far more than tensors, so it was not "
            "read further"
        )


class Budget:
    """What one pickle may still cost, in units of about a byte of memory (see ``limits``).

    ``storages``: the storages of at least one byte it referred to, each of which raised
    the allowance by :data:`~.limits.PICKLE_COST_PER_STORAGE`.
    """

    __slots__ = ("allowed", "left", "storages")

    def __init__(self, allowed: int) -> None:
        self.allowed = self.left = allowed
        self.storages = 0

    def charge(self, cost: int) -> None:
        self.left -= cost
        if self.left < 0:
            raise OverBudget(self)

    def add_storage(self) -> None:
        self.storages += 1
        self.allowed += PICKLE_COST_PER_STORAGE
        self.left += PICKLE_COST_PER_STORAGE


def _opcode_costs() -> list[int]:
    """:data:`OPCODE_COST`: the bytes of memory each opcode's result takes (its stack slot,
    a new object, a memo entry), and never less than its dispatch costs in time."""
    costs = [32] * 256
    for ops, cost in (
        # a new empty container (list 56, dict 64, set 216 bytes), MARK a new stack
        ((pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.MARK, pickle.TUPLE, pickle.TUPLE1,
          pickle.TUPLE2, pickle.TUPLE3, pickle.LIST, pickle.DICT, pickle.FROZENSET), 96),
        ((pickle.EMPTY_SET,), 256),
        # a memo entry, a new int or float, a string (its bytes are the pickle's own)
        ((pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE, pickle.BININT, pickle.BININT2,
          pickle.LONG1, pickle.LONG4, pickle.BINFLOAT, pickle.BINUNICODE, pickle.SHORT_BINSTRING,
          pickle.SHORT_BINUNICODE, pickle.BINUNICODE8, pickle.BINBYTES, pickle.SHORT_BINBYTES,
          pickle.BINBYTES8, pickle.BYTEARRAY8, pickle.BINSTRING), 64),
    ):  # fmt: skip
        for op in ops:
            costs[op[0]] = cost
    return costs


# What each opcode is charged (by its byte); calls and BUILD are charged on top by what they do.
OPCODE_COST = _opcode_costs()
# A call of an allowed callable: a new object and the call itself.
CALL_COST = 256
# Per element of an argument a callable iterates (a hash, a pointer, a small object: about
# what Counter(s) spends a character, ~50 ns); a callable that copies a str or bytes
# (:data:`_COPIES`) is charged 4 a byte (UTF-8), and bytearray(n) n.
ELEMENT_COST = 64
_SIZED = (str, bytes, bytearray, tuple, list, dict, set, frozenset)


def call_cost(func: Any, args: tuple[Any, ...]) -> int:
    """What ``func(*args)`` may allocate and iterate: charged before it runs."""
    if func is bytearray and args and type(args[0]) is int:
        return CALL_COST + max(args[0], 0)
    per_element = 4 if any(func is f for f in _COPIES) else ELEMENT_COST
    return CALL_COST + per_element * sum(len(a) for a in args if isinstance(a, _SIZED))


_COPIES = (bytearray, _codecs.encode)


_CALLS = frozenset((pickle.REDUCE[0], pickle.NEWOBJ[0], pickle.BUILD[0]))


def _charge_call(unpickler: Any, func: Any, args: Any) -> None:
    unpickler.budget.charge(call_cost(func, args if isinstance(args, tuple) else (args,)))


def _costed(code: int, handler: Callable[[Any], None]) -> Callable[[Any], None]:
    """An opcode handler of the DCP unpickler, charged first: its opcode, and what a call
    (REDUCE, NEWOBJ, NEWOBJ_EX) or a BUILD on the stack would allocate and iterate."""

    def handle(unpickler: Any) -> None:
        stack = unpickler.stack
        unpickler.budget.charge(OPCODE_COST[code])
        if code in _CALLS and len(stack) >= 2:  # the callable (or instance) and arguments
            _charge_call(unpickler, stack[-2], stack[-1])
        elif code == pickle.NEWOBJ_EX[0] and len(stack) >= 3:
            _charge_call(unpickler, stack[-3], (*stack[-2], *stack[-1]))
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
        code: _costed(code, _build if code == pickle.BUILD[0] else handler)
        for code, handler in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
    }

    def __init__(self, file: Any, budget: Budget | None = None) -> None:
        super().__init__(file)
        self.budget = Budget(DCP_METADATA_COST) if budget is None else budget

    def find_class(self, module: str, name: str) -> Any:
        found = _dcp_objects().get((module, name)) if "." not in name else None
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in DCP metadata")


def _instance_types() -> frozenset[type]:
    """The classes whose instances BUILD may set the state of: the allowed classes (dtypes
    are shared instances, the enum and layouts are functions: none of them)."""
    return frozenset(found for found in _dcp_objects().values() if isinstance(found, type))


def unpickle_dcp_metadata(data: bytes, path: Path, budget: Budget | None = None) -> Any:
    """A DCP ``.metadata`` pickle, unpickled with the allowlist (a bounded byte string),
    within ``budget`` (by default, one of :data:`~.limits.DCP_METADATA_COST`)."""
    try:
        return _AllowlistUnpickler(io.BytesIO(data), budget).load()
    except OverBudget as exc:
        raise CheckpointError(path, f"its .metadata: {exc.problem()}") from None
    except Exception as exc:  # a hostile stream may fail in any way the unpickler can
        raise CheckpointError(
            path, f"its .metadata cannot be read safely ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


# ---- torch.save pickles, without torch ----------------------------------------------------

# The opcodes torch's weights-only unpickler runs (protocol 2, what torch.save writes):
# any other is refused, as torch refuses it ("Unsupported operand").
_TORCH_OPCODES = frozenset(
    op[0]
    for op in (
        pickle.PROTO, pickle.STOP, pickle.GLOBAL, pickle.NEWOBJ, pickle.REDUCE, pickle.BUILD,
        pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS, pickle.MARK,
        pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.NONE,
        pickle.NEWFALSE, pickle.NEWTRUE, pickle.EMPTY_TUPLE, pickle.EMPTY_LIST,
        pickle.EMPTY_DICT, pickle.EMPTY_SET, pickle.BININT, pickle.BININT1, pickle.BININT2,
        pickle.BINFLOAT, pickle.BINUNICODE, pickle.SHORT_BINSTRING, pickle.BINPERSID,
        pickle.BINGET, pickle.LONG_BINGET, pickle.BINPUT, pickle.LONG_BINPUT, pickle.LONG1,
    )
)  # fmt: skip

# torch renames Python 2 globals before it looks them up (torch._utils' copy of them).
_IMPORT_MAPPING = {
    "__builtin__": "builtins", "copy_reg": "copyreg", "Queue": "queue", "repr": "reprlib",
    "_abcoll": "collections.abc", "UserDict": "collections", "UserList": "collections",
    "UserString": "collections", "whichdb": "dbm", "StringIO": "io", "cStringIO": "io",
}  # fmt: skip
_NAME_MAPPING = {
    ("__builtin__", "xrange"): ("builtins", "range"),
    ("__builtin__", "reduce"): ("functools", "reduce"),
    ("__builtin__", "intern"): ("sys", "intern"),
    ("__builtin__", "unichr"): ("builtins", "chr"),
    ("__builtin__", "unicode"): ("builtins", "str"),
    ("__builtin__", "long"): ("builtins", "int"),
    ("itertools", "izip"): ("builtins", "zip"),
    ("itertools", "imap"): ("builtins", "map"),
    ("itertools", "ifilter"): ("builtins", "filter"),
    ("itertools", "ifilterfalse"): ("itertools", "filterfalse"),
    ("itertools", "izip_longest"): ("itertools", "zip_longest"),
    ("UserDict", "IterableUserDict"): ("collections", "UserDict"),
    ("UserList", "UserList"): ("collections", "UserList"),
    ("UserString", "UserString"): ("collections", "UserString"),
    ("__builtin__", "basestring"): ("builtins", "str"),
    ("exceptions", "StandardError"): ("builtins", "Exception"),
    ("UserDict", "UserDict"): ("collections", "UserDict"),
}
# Modules torch refuses even when a user allowlists one of their names.
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})


# What each allowed global is to the records reader. Every other name of torch's default
# allowlist (quantized, sparse, nested and meta tensors, tensor subclasses, the legacy
# tensor classes...) and any torch name this list does not know raise NeedsTorch.
_RECORD_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "collections.Counter": Counter,
    "_codecs.encode": _codecs.encode,
    "builtins.bytearray": bytearray,  # charged its size before it is called (call_cost)
    "builtins.set": set,
    "builtins.complex": complex,
    "torch.Size": records.Size,
    "torch.device": records.device,
    "torch._utils._rebuild_tensor_v2": records.rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": records.rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": records.rebuild_parameter,
    "torch.storage.UntypedStorage": records.StorageType("UntypedStorage", "uint8"),
    **{f"torch.{name}": value for name, value in records.DTYPES.items()},
    **{
        f"{module}.{name}": records.StorageType(name, dtype_name)
        for name, dtype_name in records.STORAGE_DTYPES.items()
        for module in ("torch", "torch.cuda")
        if module == "torch" or not name.startswith("Q")  # no quantized CUDA storages
    },
}
# The torch release whose weights-only allowlist first held a name (torch 2.3, the oldest
# this package supports, holds the others). Where the installed torch is older, such a
# name is torch's to refuse: the records reader hands the file over.
_ALLOWED_SINCE: dict[str, tuple[int, int]] = {
    **dict.fromkeys(
        ["collections.Counter", "torch.device", "torch.bfloat16", "torch.bool", "torch.uint8"]
        + [f"torch.{n}" for n in ("qint8", "qint32", "quint8", "quint4x2", "quint2x4")]
        + [f"torch.bits{n}" for n in ("8", "16", "1x8", "2x4", "4x2")],
        (2, 4),
    ),
    **dict.fromkeys(
        ["_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set"]
        + [f"torch.uint{n}" for n in (16, 32, 64)],
        (2, 6),
    ),
    **dict.fromkeys(
        ["torch.float4_e2m1fn_x2", "torch.float8_e8m0fnu"]
        + [f"torch.{sign}int{n}" for sign in ("", "u") for n in range(1, 8)],
        (2, 13),
    ),
}
_installed: list[tuple[int, int]] = []


def _installed_torch() -> tuple[int, int]:
    """The installed torch's release, read from its metadata (no import); (99, 0) if none."""
    if not _installed:
        from importlib import metadata

        try:
            major, minor = metadata.version("torch").split(".")[:2]
            _installed.append((int(major), int(minor)))
        except (metadata.PackageNotFoundError, ValueError):
            _installed.append((99, 0))
    return _installed[0]


# What REDUCE may call, and NEWOBJ create (torch: cls.__new__(cls, *args)).
_CALLABLE = frozenset(
    id(v) for v in _RECORD_GLOBALS.values() if callable(v) and not isinstance(v, records.dtype)
)
_NEW_OBJECTS = frozenset({OrderedDict, Counter, set, complex})
# Outside torch, torch allows no more than these (and what a user allowlists).
_NON_TORCH_ALLOWED = frozenset(k for k in _RECORD_GLOBALS if not k.startswith("torch."))


def _user_allowed(full: str) -> bool:
    """Whether this process allowlisted ``full`` for torch.load (``add_safe_globals``):
    only possible once torch is imported, so never in a torch-free run."""
    torch = sys.modules.get("torch")
    get = getattr(getattr(torch, "serialization", None), "get_safe_globals", None)
    if get is None:
        return False
    for allowed in get():
        if isinstance(allowed, tuple):
            allowed, name = allowed[0], allowed[-1]
        else:
            name = f"{getattr(allowed, '__module__', '')}.{getattr(allowed, '__qualname__', '')}"
        if name == full:
            return True
    return False


# The modules of torch's default allowlist whose names a newer torch adds to (dtypes,
# storage and tensor classes), and the prefixes of its rebuild functions.
_TORCH_ALLOWLIST_MODULES = frozenset(
    {"torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse", "torch.storage"}
)
_TORCH_ALLOWLIST_NAMES = frozenset(
    {"torch.nn.parameter.Parameter", "torch.serialization._get_layout"}
)


def _torch_may_allow(full: str) -> bool:
    """A torch name of a kind torch's default allowlist holds (a dtype, a storage or tensor
    class, a rebuild function, nested and distributed tensors' names), so torch.load is to
    decide; any other (``torch.nn.modules.linear.Linear``, ``torch.os.system``) is refused."""
    module, _, name = full.rpartition(".")
    return (
        module in _TORCH_ALLOWLIST_MODULES
        or full in _TORCH_ALLOWLIST_NAMES
        or (module in ("torch._utils", "torch._tensor") and name.startswith("_rebuild"))
        or full.startswith(("torch.nested.", "torch.distributed."))
    )


def _refused(message: str) -> pickle.UnpicklingError:
    """torch's refusal, worded as ``torch.load`` words it (``explain_refusal`` quotes the
    last line that says ``error:`` or ``unsupported``, as it does torch's)."""
    if "was not an allowed global by default" in message:
        text = f"Weights only load failed.\n\tWeightsUnpickler error: {message}"
    elif "whose module" in message:
        text = f"Weights only load failed.\n\n{message}"
    else:
        text = (
            "Weights only load failed.\nPlease file an issue with the following so that we can "
            "make `weights_only=True` compatible with your use case: WeightsUnpickler error: "
            f"\n\n{message}"
        )
    return pickle.UnpicklingError(text)


def _torch_global(unpickler: Any) -> None:
    module = unpickler.readline()[:-1].decode("utf-8")
    name = unpickler.readline()[:-1].decode("utf-8")
    if (module, name) in _NAME_MAPPING:
        module, name = _NAME_MAPPING[module, name]
    elif module in _IMPORT_MAPPING:
        module = _IMPORT_MAPPING[module]
    full = f"{module}.{name}"
    if module in _BLOCKED_MODULES:
        raise _refused(
            f"Trying to load unsupported GLOBAL {full} whose module {module} is blocked."
        )
    found = _RECORD_GLOBALS.get(full)
    if found is not None:
        since = _ALLOWED_SINCE.get(full)
        if since is not None and _installed_torch() < since:
            raise records.NeedsTorch(f"the global {full}, which torch allows since {since}")
        unpickler.append(found)
        return
    if _torch_may_allow(full) or _user_allowed(full):
        raise records.NeedsTorch(f"the global {full}")
    shown = full.removeprefix("builtins.")
    raise _refused(
        f"Unsupported global: GLOBAL {shown} was not an allowed global by default. Please use "
        f"`torch.serialization.add_safe_globals([{shown}])` or the "
        f"`torch.serialization.safe_globals([{shown}])` context manager to allowlist this "
        "global if you trust this class/function."
    )


def _torch_newobj(unpickler: Any) -> None:
    args = unpickler.stack.pop()
    cls = unpickler.stack.pop()
    if cls in _NEW_OBJECTS:
        _charge_call(unpickler, cls, args)
        unpickler.append(cls.__new__(cls, *args))
    elif id(cls) in _CALLABLE or isinstance(cls, (records.dtype, records.StorageType)):
        raise records.NeedsTorch(f"NEWOBJ of {cls!r}")
    else:
        raise _refused(
            "Can only create new object for nn.Parameter or classes allowlisted via "
            f"`add_safe_globals` but got {cls}"
        )


def _torch_reduce(unpickler: Any) -> None:
    args = unpickler.stack.pop()
    func = unpickler.stack[-1]
    if id(func) not in _CALLABLE:
        if isinstance(func, (records.dtype, records.StorageType)):
            raise records.CorruptRecord(f"{func!r} is not callable")
        raise _refused(f"Trying to call reduce for unrecognized function {func}")
    if not isinstance(args, tuple):  # torch calls func(*args) with any iterable, but no
        if len(args) > 8:  # allowed callable takes more than 8 (nor copies a memo'd list)
            raise records.CorruptRecord(f"REDUCE of {len(args):,} arguments")
        args = tuple(args)
    _charge_call(unpickler, func, args)
    unpickler.stack[-1] = func(*args)


def _torch_build(unpickler: Any) -> None:
    state = unpickler.stack.pop()
    inst = unpickler.stack[-1]
    if type(inst) is OrderedDict:
        _charge_call(unpickler, inst, state)  # a memo'd state, BUILT again, copied again
        inst.__dict__.update(state)  # a state_dict's _metadata
    elif type(inst) in (records.Tensor, records.Parameter) or type(inst) in _NEW_OBJECTS:
        raise records.NeedsTorch(f"BUILD of a {type(inst).__name__}")
    else:
        raise _refused(
            "Can only build Tensor, Parameter, OrderedDict or types allowlisted via "
            f"`add_safe_globals`, but got {type(inst)}"
        )


def _torch_append(unpickler: Any) -> None:
    item = unpickler.stack.pop()
    if type(unpickler.stack[-1]) is not list:
        raise _refused(f"Can only append to lists, but got {type(unpickler.stack[-1])}")
    unpickler.stack[-1].append(item)


def _torch_appends(unpickler: Any) -> None:
    items = unpickler.pop_mark()
    if type(unpickler.stack[-1]) is not list:
        raise _refused(f"Can only extend lists, but got {type(unpickler.stack[-1])}")
    unpickler.stack[-1].extend(items)


def _set_item_target(unpickler: Any, opcode: str) -> Any:
    target = unpickler.stack[-1]
    if type(target) not in (dict, OrderedDict, Counter):
        raise _refused(
            f"Can only {opcode} for dict, collections.OrderedDict, collections.Counter, but got "
            f"{type(target)}"
        )
    return target


def _torch_setitem(unpickler: Any) -> None:
    value, key = unpickler.stack.pop(), unpickler.stack.pop()
    _set_item_target(unpickler, "SETITEM")[key] = value


def _torch_setitems(unpickler: Any) -> None:
    items = unpickler.pop_mark()
    target = _set_item_target(unpickler, "SETITEMS")
    for i in range(0, len(items), 2):
        target[items[i]] = items[i + 1]


def _torch_persid(unpickler: Any) -> None:
    pid = unpickler.stack.pop()
    if type(pid) is not tuple and type(pid) is not int:
        raise _refused(f"persistent_load id must be tuple or int, but got {type(pid)}")
    if type(pid) is tuple and pid and _ascii(pid[0]) != "storage":
        raise _refused(f"Only persistent_load of storage is allowed, but got {type(pid[0])}")
    storage = unpickler.persistent_load(pid)
    new = isinstance(storage, records.Storage) and storage.key not in unpickler.keys
    if new and storage.nbytes:
        unpickler.keys.add(storage.key)
        unpickler.budget.add_storage()
    unpickler.append(storage)


def _torch_get(unpickler: Any, index: int) -> None:
    if index not in unpickler.memo:
        raise records.CorruptRecord(f"no memo entry {index}")
    unpickler.append(unpickler.memo[index])


def _torch_proto(unpickler: Any) -> None:
    unpickler.proto = unpickler.read(1)[0]  # torch reads any protocol's opcodes it knows


def _ascii(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


class _Unsupported(dict):  # type: ignore[type-arg]
    """The dispatch table: an opcode torch does not run is refused as torch refuses it."""

    def __missing__(self, code: int) -> Any:
        def refuse(unpickler: Any) -> None:
            raise _refused(f"Unsupported operand {code}")

        return refuse


class _WeightsOnlyUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """torch's weights-only unpickler, in pure Python and without torch (see module doc)."""

    dispatch = _Unsupported(
        {
            code: handler
            for code, handler in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
            if code in _TORCH_OPCODES
        }
    )
    dispatch.update(
        {
            pickle.PROTO[0]: _torch_proto,
            pickle.GLOBAL[0]: _torch_global,
            pickle.NEWOBJ[0]: _torch_newobj,
            pickle.REDUCE[0]: _torch_reduce,
            pickle.BUILD[0]: _torch_build,
            pickle.APPEND[0]: _torch_append,
            pickle.APPENDS[0]: _torch_appends,
            pickle.SETITEM[0]: _torch_setitem,
            pickle.SETITEMS[0]: _torch_setitems,
            pickle.BINPERSID[0]: _torch_persid,
            pickle.BINGET[0]: lambda u: _torch_get(u, u.read(1)[0]),
            pickle.LONG_BINGET[0]: lambda u: _torch_get(u, int.from_bytes(u.read(4), "little")),
        }
    )

    # the file's own read and readline, which pickle's __init__ keeps (typeshed omits them)
    _file_read: Callable[[int], bytes]
    _file_readline: Callable[[], bytes]

    def __init__(
        self, file: Any, persistent_load: Callable[[Any], Any], budget: Budget | None = None
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage = persistent_load
        self.budget = Budget(PICKLE_COST_BASE) if budget is None else budget
        self.keys: set[str] = set()  # of the storages that raised the budget

    def load(self) -> Any:
        """pickle's loop, reading the stream directly (torch's opcodes have no frames, so
        pickle's frame reader would only cost a call per byte read), each opcode charged to
        the budget, with the cyclic garbage collector off: it would walk every object made
        so far again and again, and a pickle makes nothing it does not keep (the budget
        bounds them)."""
        self.metastack: list[Any] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read = self._file_read
        self.readline = self._file_readline
        dispatch = self.dispatch
        budget, cost = self.budget, OPCODE_COST
        collecting = gc.isenabled()
        gc.disable()
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                budget.left -= cost[key[0]]
                if budget.left < 0:
                    raise OverBudget(budget)
                dispatch[key[0]](self)
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value
        finally:
            if collecting:
                gc.enable()

    def persistent_load(self, pid: Any) -> Any:
        return self._storage(pid)


def unpickle_torch_records(
    data: bytes, path: Path, persistent_load: Callable[[Any], Any], budget: Budget | None = None
) -> Any:
    """A ``torch.save`` pickle (a bounded byte string), read as torch's weights-only
    loader would read it, with ``records`` for tensors, storages and torch values.

    ``persistent_load`` makes a :class:`records.Storage` of a storage's persistent id.
    ``budget``: what it may cost, where several pickles share one (a DCP folder's non-tensor
    entries); a budget of :data:`~.limits.PICKLE_COST_BASE` of its own by default.
    Raises :class:`records.NeedsTorch` where the records cannot stand for what torch makes.
    """
    try:
        return _WeightsOnlyUnpickler(io.BytesIO(data), persistent_load, budget).load()
    except (records.NeedsTorch, StateDictError):
        raise
    except OverBudget as exc:
        raise CheckpointError(path, exc.problem()) from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, explain_refusal(data, exc)) from None
    except Exception as exc:  # a damaged stream fails in many ways, as it does in torch.load
        raise CheckpointError(
            path,
            f"torch.load could not read it, the file is truncated or corrupt "
            f"({type(exc).__name__}: {_first_line(exc)})",
        ) from None


class _Opaque:
    """What :func:`check_cost` has no record for (a quantized tensor, a library's tensor
    subclass, what it is built of): torch makes something of it, charged as a call."""

    __slots__ = ()


_OPAQUE = _Opaque()


def _check_global(unpickler: Any) -> None:
    try:
        _torch_global(unpickler)
    except records.NeedsTorch:
        unpickler.append(_OPAQUE)


def _check_newobj(unpickler: Any) -> None:
    stack = unpickler.stack
    if stack[-2] is _OPAQUE:  # a class torch may allow: its instance stands where it stood
        _charge_call(unpickler, _OPAQUE, stack.pop())
        return
    try:
        _torch_newobj(unpickler)
    except records.NeedsTorch:  # NEWOBJ of a name torch may allow (or of a stand-in)
        unpickler.append(_OPAQUE)


def _check_reduce(unpickler: Any) -> None:
    stack = unpickler.stack
    if stack[-2] is _OPAQUE:
        _charge_call(unpickler, _OPAQUE, stack.pop())
        return  # its result stands where the callable stood
    try:
        _torch_reduce(unpickler)
    except (records.NeedsTorch, records.CorruptRecord):  # a record's check, or arguments
        stack[-1] = _OPAQUE  # that are stand-ins: torch decides on the real ones


def _check_build(unpickler: Any) -> None:
    stack = unpickler.stack
    if stack[-2] is _OPAQUE:
        _charge_call(unpickler, _OPAQUE, stack.pop())
        return
    with contextlib.suppress(records.NeedsTorch):  # BUILD of a tensor: its state is
        _torch_build(unpickler)  # charged by the opcodes that made it


class _CostCheck(_WeightsOnlyUnpickler):
    """The records reader, going on where records cannot stand for what torch makes (a
    stand-in takes its place): it sees every call torch's unpickler will make."""

    dispatch = _Unsupported(_WeightsOnlyUnpickler.dispatch)
    dispatch.update(
        {
            pickle.GLOBAL[0]: _check_global,
            pickle.NEWOBJ[0]: _check_newobj,
            pickle.REDUCE[0]: _check_reduce,
            pickle.BUILD[0]: _check_build,
        }
    )


def check_cost(data: bytes, path: Path, record_bytes: Callable[[str], int]) -> None:
    """Refuse a ``torch.save`` pickle that ``torch.load`` would spend more than its budget
    on, before it does: its opcodes and calls charged as the records reader charges them.

    ``record_bytes`` gives the size of a storage's record by its key (0: none), which
    raises the budget as it does when the records reader reads the file. What else stops
    the check (a refusal, a corrupt stream) is torch's to find and word.
    """
    storages: dict[str, records.Storage] = {}

    def storage(pid: Any) -> records.Storage:
        key = str(pid[2]) if type(pid) is tuple and len(pid) == 5 else ""
        if key not in storages:
            storages[key] = records.Storage(key, "uint8", record_bytes(key), "cpu", 0)
        return storages[key]

    try:
        _CostCheck(io.BytesIO(data), storage).load()
    except OverBudget as exc:
        raise CheckpointError(path, exc.problem()) from None
    except Exception:  # torch.load finds the same, and words it as torch does
        return


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

    target = "cpu" if map_location is None else str(torch.device(map_location))
    record_location = _RecordedLocations(target)
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
    return obj, record_location.seen


class _RecordedLocations(dict):  # type: ignore[type-arg]
    """``map_location`` that maps every saved location to ``target`` and records it.

    A dict, not a function: torch rebuilds a tensor subclass (torchao's quantized weights,
    any ``_rebuild_wrapper_subclass``) only under a dict, string or device map_location
    ("Callable map_location not supported"), and asks a dict for every storage too. To the
    CPU, a memory-mapped storage stays where it is (torch moves no CPU storage to the CPU).
    """

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.seen: set[str] = set()

    def get(self, location: Any, default: Any = None) -> str:
        self.seen.add(str(location))
        return self.target


def pickle_globals(data: bytes) -> list[str]:
    """The globals a pickle refers to, read from its opcodes without unpickling it: from its
    first :data:`~.limits.MAX_SCANNED_OPS` opcodes (a pickle refused at its third byte may
    have 96 MB more, ~20 s to walk; what torch refuses is near where it stopped)."""
    import pickletools  # here: only a refused pickle is explained

    found: list[str] = []
    strings: list[str] = []
    try:
        for _, (op, arg, _) in zip(range(MAX_SCANNED_OPS), pickletools.genops(data), strict=False):
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
