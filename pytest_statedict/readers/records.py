"""What the torch-free unpickler makes of a ``torch.save`` pickle: records, not tensors.

``unpickling.unpickle_torch_records`` reads an archive's ``data.pkl`` with torch's
weights-only rules but, where torch would build a tensor, a storage, a ``torch.Size``, a
device or a dtype, it builds one of these plain records: a tensor's dtype, shape, strides,
offset and storage, checked as ``Tensor.set_`` checks them, without a byte of its data.
Each class is named as torch names the type it stands for (``torch.Tensor``,
``torch.nn.parameter.Parameter``, ``torch.Size``...), so a schema that names a value's
type (an ``extras`` entry, an optimizer state that is no tensor) names it as torch would.

What these records cannot stand for (quantized, sparse, nested or meta tensors, tensor
subclasses, a storage of a dtype this module does not know, arguments whose meaning depends
on the torch release or the machine: a device type outside the common ones, a tensor
rebuilt without strides) raises :class:`NeedsTorch`: ``torch.load`` reads that file.
Invalid arguments raise :class:`CorruptRecord` exactly where torch would fail on them: its
checks are re-done in its own arithmetic (``c10``'s unsigned 64-bit overflow checks of a
tensor's element count and storage size), so a file is refused or read as ``torch.load``
refuses or reads it (``tests/test_differential.py`` holds the two side by side).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..schema_entries import DTYPE_ITEMSIZE
from .limits import MAX_DIMS


class NeedsTorch(Exception):
    """What the torch-free reader does not model, but torch's weights-only loader may
    accept: the caller reads the file with ``torch.load`` instead."""


class CorruptRecord(ValueError):
    """Arguments torch's rebuild functions would fail on: the file is corrupt."""


class dtype:  # named as torch names it
    """A torch dtype by its name (``float32``), as the pickle names it (``torch.float32``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


dtype.__module__ = "torch"

# Dtypes a tensor may require gradients in (torch: floating point and complex); the
# narrow floating types are left to torch.
GRAD_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32"}
)
NO_GRAD_DTYPES = frozenset(
    name for name in DTYPE_ITEMSIZE if "int" in name or name in ("bool", "bits8", "bits16")
)
DTYPES = {name: dtype(name) for name in DTYPE_ITEMSIZE}

# The storage classes torch.save names (``torch.FloatStorage``) and their dtypes.
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}  # fmt: skip


class StorageType:
    """A storage class named by a pickle (``torch.FloatStorage``, ``torch.UntypedStorage``)."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype_name: str) -> None:
        self.name = name
        self.dtype = dtype_name

    def __repr__(self) -> str:
        return f"StorageType(dtype=torch.{self.dtype})"


class Storage:
    """One storage of an archive (its record ``data/KEY``): what ``torch.load`` would map.

    ``data_start`` is where its bytes begin in the file, for the few small tensors whose
    values a schema keeps (a tensor hyperparameter).
    """

    __slots__ = ("data_start", "dtype", "key", "location", "nbytes")

    def __init__(self, key: str, dtype_name: str, nbytes: int, location: str, data_start: int):
        self.key = key
        self.dtype = dtype_name
        self.nbytes = nbytes
        self.location = location
        self.data_start = data_start


Storage.__module__, Storage.__qualname__ = "torch.storage", "TypedStorage"


class Tensor:
    """A strided tensor: dtype, shape, strides and offset into its storage."""

    __slots__ = ("dtype", "offset", "requires_grad", "shape", "storage", "stride")

    def __init__(
        self,
        storage: Storage,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        dtype_name: str,
        requires_grad: bool,
    ) -> None:
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.dtype = dtype_name
        self.requires_grad = requires_grad

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


Tensor.__module__ = "torch"


class Parameter(Tensor):
    """An ``nn.Parameter``: a tensor with its ``requires_grad``."""

    __slots__ = ()


Parameter.__module__ = "torch.nn.parameter"


class Size(tuple):  # type: ignore[type-arg]
    """``torch.Size``: a tuple of ints (torch takes bools and negative ones here too)."""

    __slots__ = ()

    def __new__(cls, dims: Any = ()) -> Size:
        dims = tuple(dims)
        if not all(isinstance(d, int) for d in dims):
            raise CorruptRecord("torch.Size() takes an iterable of ints")
        return super().__new__(cls, dims)


Size.__module__ = "torch"


class device:  # named as torch names it
    """``torch.device``: a device type and index, parsed as torch parses them (never checked
    against this machine, as torch does not)."""

    __slots__ = ("index", "type")

    def __init__(self, type: Any, index: Any = None) -> None:
        if not isinstance(type, str) or len(type) > _LONGEST_DEVICE:
            # torch.device(0) is the machine's accelerator: a CPU-only torch refuses it; a
            # string longer than any known type and index is torch's to parse (not here
            # again for every tensor that names it)
            raise NeedsTorch("a torch.device of no known type")
        parsed = _DEVICE_STRING.fullmatch(type)
        if parsed is None:
            raise CorruptRecord(f"invalid device string: {type[:50]!r}")
        name, number = parsed.groups()
        if number is not None and int(number) > _STOI_MAX:
            raise CorruptRecord(f"could not parse the device index in {type[:50]!r}")
        if name not in DEVICE_TYPES:
            # torch's list grows with its releases, and a backend may rename privateuse1
            raise NeedsTorch(f"the device type {name[:50]!r}")
        if index is not None:
            if not _is_int(index) or not 0 <= index <= _INT64_MAX:
                raise CorruptRecord("a device index must be a non-negative int")
            if number is not None:
                raise CorruptRecord("a device string must not include an index passed explicitly")
        self.type = name
        self.index = int(number) if index is None and number is not None else index


device.__module__ = "torch"

# c10::Device's parser: a type of letters and underscores, then ``:N`` without leading zeros
# (an index std::stoi reads: at most 2**31 - 1); its types that torch 2.3 to 2.13 all know.
_DEVICE_STRING = re.compile(r"([A-Za-z_]+)(?::(0|[1-9][0-9]*))?")
_STOI_MAX = (1 << 31) - 1
DEVICE_TYPES = frozenset(
    {"cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga",
     "xla", "lazy", "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone"}
)  # fmt: skip

_LONGEST_DEVICE = max(map(len, DEVICE_TYPES)) + len(":2147483647")

_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)
_U64 = 1 << 64


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dims(value: Any, what: str) -> tuple[int, ...]:
    """A size or stride as torch's argument parser takes it: a tuple or list of int64s. torch
    sets no limit on their number; more than :data:`~.limits.MAX_DIMS` are torch's to read
    (a memo'd list of millions, named by every tensor, would cost millions each here)."""
    if not isinstance(value, (tuple, list)):
        raise CorruptRecord(f"the tensor's {what} is a {type(value).__name__}, not a tuple")
    if len(value) > MAX_DIMS:
        raise NeedsTorch(f"a tensor of {len(value):,} dimensions")
    if not all(_is_int(d) and _INT64_MIN <= d <= _INT64_MAX for d in value):
        raise CorruptRecord(f"the tensor's {what} holds a value that is no int64")
    return tuple(value)


def _numel_overflows(shape: tuple[int, ...]) -> bool:
    """c10's ``safe_compute_numel``: the product of the sizes, each read as an unsigned 64-bit
    int (a negative size is huge), overflows 64 bits or int64 (``numel: integer
    multiplication overflow``), whatever zero comes later."""
    product, overflowed = 1, False
    for n in shape:
        product *= n % _U64
        overflowed |= product >= _U64
        product %= _U64
    return overflowed or product > _INT64_MAX


def _storage_bytes(
    shape: tuple[int, ...], strides: tuple[int, ...], offset: int, itemsize: int
) -> int | None:
    """ATen's ``computeStorageNbytes``: the bytes a strided tensor reaches, offset included,
    in unsigned 64-bit arithmetic (a negative stride wraps); 0 as soon as a size is 0 (the
    overflows before it are forgotten); None where it overflows (``Storage size calculation
    overflowed``)."""
    total, overflowed = offset + 1, False
    for n, s in zip(shape, strides, strict=True):
        if n == 0:
            return 0
        strided = (s % _U64) * ((n - 1) % _U64)
        overflowed |= strided >= _U64
        total += strided % _U64
        overflowed |= total >= _U64
        total %= _U64
    total *= itemsize
    overflowed |= total >= _U64
    total %= _U64
    return None if overflowed or total > _INT64_MAX else total


def _tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    dtype_name: str,
    metadata: Any,
) -> Tensor:
    """A tensor over ``storage``, checked as ``Tensor.set_`` checks it."""
    if not isinstance(storage, Storage):
        raise CorruptRecord(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if stride is None or (stride in ((), []) and size not in ((), [])):
        raise NeedsTorch("a tensor rebuilt without strides")  # torch makes it contiguous
    shape, strides = _dims(size, "size"), _dims(stride, "stride")
    if len(shape) != len(strides):
        raise CorruptRecord("mismatch in length of strides and shape")
    if not _is_int(offset) or not 0 <= offset <= _INT64_MAX:
        raise CorruptRecord(f"invalid storage offset {offset!r}")
    if not isinstance(requires_grad, bool):
        raise CorruptRecord("requires_grad is not a bool")
    _check_metadata(metadata)
    if requires_grad and dtype_name not in GRAD_DTYPES:
        if dtype_name in NO_GRAD_DTYPES:
            raise CorruptRecord("only Tensors of floating point and complex dtype can require "
                                "gradients")  # fmt: skip
        raise NeedsTorch(f"requires_grad on a {dtype_name} tensor")
    if _numel_overflows(shape):
        raise CorruptRecord(f"numel: integer multiplication overflow (sizes {_shown(shape)})")
    needed = _storage_bytes(shape, strides, offset, DTYPE_ITEMSIZE[dtype_name])
    if needed is None:
        raise CorruptRecord(
            f"storage size calculation overflowed with sizes {_shown(shape)} and strides "
            f"{_shown(strides)}"
        )
    if needed > storage.nbytes:
        raise CorruptRecord(
            f"sizes {_shown(shape)}, strides {_shown(strides)} and storage offset {offset} "
            f"need {needed:,} bytes, out of bounds for a storage of {storage.nbytes:,}"
        )
    return Tensor(storage, offset, shape, strides, dtype_name, requires_grad)


def _shown(dims: tuple[int, ...]) -> str:
    """Dimensions in an error, the first few of them (a pickle may hold thousands)."""
    return str(list(dims[:8]))[:-1] + (", ...]" if len(dims) > 8 else "]")


# torch's tensor metadata: a few flags (conj, neg...); more are torch's to read (a memo'd
# dict named by every tensor would be walked again for each here).
_METADATA_FLAGS = 16


def _check_metadata(metadata: Any) -> None:
    """torch sets a tensor's metadata only where it is truthy, and then only a dict of names
    to values pybind reads as bools."""
    if not metadata:
        return
    if not isinstance(metadata, dict):
        raise CorruptRecord("the tensor's metadata is not a dict")
    if len(metadata) > _METADATA_FLAGS:
        raise NeedsTorch(f"tensor metadata of {len(metadata):,} entries")
    if not all(isinstance(k, str) for k in metadata):
        raise CorruptRecord("the tensor's metadata is not a dict of names")
    if not all(v is None or type(v) in (bool, int, float) for v in metadata.values()):
        raise NeedsTorch("tensor metadata that is not a dict of names to flags")


def rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> Tensor:
    """``torch._utils._rebuild_tensor_v2``: a tensor of its storage's dtype."""
    dtype_name = storage.dtype if isinstance(storage, Storage) else ""
    return _tensor(storage, storage_offset, size, stride, requires_grad, dtype_name, metadata)


def rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype_value: Any,
    metadata: Any = None,
) -> Tensor:
    """``torch._utils._rebuild_tensor_v3``: a tensor of any dtype over an untyped storage."""
    if not isinstance(dtype_value, dtype):
        raise CorruptRecord("_rebuild_tensor_v3 takes a dtype")
    return _tensor(storage, storage_offset, size, stride, requires_grad, dtype_value.name, metadata)


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Parameter:
    """``torch._utils._rebuild_parameter``: ``nn.Parameter(data, requires_grad)``."""
    if data is None:
        raise NeedsTorch("a parameter of no tensor")  # nn.Parameter(None): an empty one
    if not isinstance(data, Tensor) or not isinstance(requires_grad, bool):
        raise CorruptRecord("_rebuild_parameter takes a tensor and a bool")
    if requires_grad and data.dtype not in GRAD_DTYPES:
        if data.dtype in NO_GRAD_DTYPES:
            raise CorruptRecord("only Tensors of floating point and complex dtype can require "
                                "gradients")  # fmt: skip
        raise NeedsTorch(f"requires_grad on a {data.dtype} parameter")
    return Parameter(data.storage, data.offset, data.shape, data.stride, data.dtype,
                     requires_grad)  # fmt: skip


# ---- DCP metadata ----------------------------------------------------------------------------


class DCPRecord:
    """An object of ``torch.distributed.checkpoint``'s metadata: its fields, as the pickle
    sets them (a dict, or a dict and slots), never its class's code."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise CorruptRecord(f"the state of a {type(self).__name__} is not a dict")
        self.__dict__.update(state)


class Metadata(DCPRecord):
    """``Metadata``: ``state_dict_metadata`` maps each key to its storage metadata."""


class TensorStorageMetadata(DCPRecord):
    """A tensor: ``properties`` (its dtype...), ``size`` and ``chunks``."""


class BytesStorageMetadata(DCPRecord):
    """A non-tensor entry, saved as pickled bytes."""


class TensorProperties(DCPRecord):
    """A tensor's dtype, layout, requires_grad, memory format and pinning: pickled as a
    5-tuple by its ``__getstate__``."""

    FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == len(self.FIELDS):
            self.__dict__.update(zip(self.FIELDS, state, strict=True))
        else:
            super().__setstate__(state)


class ChunkStorageMetadata(DCPRecord):
    """Where a chunk of a tensor lies (offsets and sizes)."""


class MetadataIndex(DCPRecord):
    """The index of a chunk in ``storage_data``."""


class StorageMeta(DCPRecord):
    """Where and by whom the checkpoint was written."""


class StorageInfo(DCPRecord):
    """Where a chunk's bytes are (file, offset, length)."""


def layout(name: Any) -> str:
    """``torch.serialization._get_layout``: a layout by its name (``torch.strided``)."""
    if not isinstance(name, str):
        raise CorruptRecord("a layout is named by a string")
    return name


def memory_format_encoding(value: Any) -> int:
    """``_MEM_FORMAT_ENCODING(value)``: DCP's enum of memory formats, by its value."""
    if not _is_int(value):
        raise CorruptRecord("a memory format encoding is an int")
    return int(value)
