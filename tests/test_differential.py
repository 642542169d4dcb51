"""The torch-free reader (``statedict show``) against torch (issue 22, "Agreeing with torch"):
real ``torch.save`` files and mutations of them, each read by ``torch.load(weights_only=True)``
(through ``schema_of``, as the plugin loads: memory-mapped, every saved location mapped to
the CPU) and by the records reader. Same verdict (both read it, or both refuse it, the
records reader with a ``CheckpointError`` naming the file), and where both read it, the same
schema. What the records cannot stand for is handed to torch (``NeedsTorch``): then
``schema_of_file``, the command line's path, gives torch's verdict; such files are listed in
``HANDED``. A sweep of byte flips and truncations covers the zip structure, where Python's
``zipfile`` (the records reader's) is laxer than torch's miniz.

Where plain ``torch.load`` disagrees with the plugin's load or with itself, the plugin's way of
loading decides (``RAW_TORCH_DIFFERS``, ``MMAP_DIFFERS``)."""

from __future__ import annotations

import struct
import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pytest_statedict import CheckpointError
from pytest_statedict.cli import main
from pytest_statedict.extract import schema_of
from pytest_statedict.readers import records
from pytest_statedict.schema import Schema
from pytest_statedict.torch_free import read_without_torch, schema_of_file

REBUILD = torch._utils._rebuild_tensor_v2


class Reduced:
    """Pickles as ``func(*args)``: a REDUCE with exactly these arguments, as a hostile writer
    would make it (torch.save pickles the storages in them as it pickles any storage)."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        return self.func, self.args


def _t() -> torch.Tensor:
    return torch.arange(6.0).reshape(2, 3)


def _rebuilt(*args: Any) -> dict[str, Any]:
    """A state_dict whose ``w`` is rebuilt from ``args`` over a 6-float storage."""
    storage = torch.arange(6.0)._typed_storage()
    return {"w": Reduced(REBUILD, storage, *args), "x": _t()}


def _with(value: Any) -> dict[str, Any]:
    """A general checkpoint holding ``value`` beside a model's state_dict (an extra)."""
    return {"model_state_dict": {"w": _t()}, "value": value}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)  # an OrderedDict with _metadata, versions 2
        self.head = nn.Linear(3, 2)


def _views() -> dict[str, torch.Tensor]:
    base = torch.arange(24.0).reshape(4, 6)
    return {
        "base": base, "row": base[1], "column": base[:, 2], "transposed": base.t(),
        "expanded": torch.ones(3, 1).expand(3, 5), "empty": torch.zeros(0, 4),
        "empty_2": torch.zeros(3, 0, 2), "scalar": torch.tensor(3.5), "same": base,
    }  # fmt: skip


def _general() -> dict[str, Any]:
    model = Net()
    params = list(model.parameters())
    # AdamW's state_dict after a step, written out (torch.optim's first use costs seconds)
    opt = {
        "state": {
            i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": p * p}
            for i, p in enumerate(params)
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                          "amsgrad": False, "params": list(range(len(params)))}],
    }  # fmt: skip
    return {
        "model_state_dict": model.state_dict(), "optimizer_state_dict": opt,
        "epoch": 3, "nested": {"a": {"b": [1, (2, 3.5), None]}}, "z": 1 + 2j,
        "size": torch.Size([2, 3]), "device": torch.device("cuda", 1), "dtype": torch.bfloat16,
        "counts": Counter("aab"), "raw": b"\x00", "labels": {1, 2},
    }  # fmt: skip


DTYPES = [
    torch.bfloat16, torch.float16, torch.complex64, torch.complex128, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
    torch.bool, torch.uint16,
]  # fmt: skip

# Objects torch.save writes, as they are: name -> object.
SAVED: dict[str, Callable[[], Any]] = {
    "module": lambda: Net().state_dict(),
    "general": _general,
    "views": _views,
    "dtypes": lambda: {str(d): torch.zeros(2, 3).to(d) for d in DTYPES},
    "parameters": lambda: {
        "p": nn.Parameter(torch.ones(2)),
        "f": nn.Parameter(torch.ones(1), False),
    },
    "shared_storage": lambda: (lambda b: {"a": b, "b": b[2:], "c": b.view(2, 4)})(torch.ones(8)),
    "lists_and_tuples": lambda: {"model": {"w": _t()}, "hist": [(1, 2), [3, [4]]], "t": (_t(),)},
    "devices": lambda: _with([torch.device("cpu"), torch.device("cuda:3"), torch.device("meta")]),
    "sizes": lambda: _with((torch.Size([]), torch.Size([0, 7]))),
    "slice": lambda: _with(slice(1, 2)),  # not on torch's allowlist: refused by both
    "quantized_per_tensor": lambda: {
        "q": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)
    },
    "quantized_per_channel": lambda: {
        "q": torch.quantize_per_channel(
            torch.ones(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.qint8
        )
    },
    "sparse_coo": lambda: {"s": torch.eye(3).to_sparse()},
    "sparse_csr": lambda: {"s": torch.eye(3).to_sparse_csr()},
    "nested_tensor": lambda: {"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
    # ---- arguments torch accepts that a strict reading would not
    "size_and_stride_lists": lambda: _rebuilt(0, [2, 3], [3, 1], False, OrderedDict()),
    "65_dims": lambda: _rebuilt(0, (1,) * 65, (0,) * 65, False, OrderedDict()),
    "300_dims": lambda: _rebuilt(0, (1,) * 300, (1,) * 300, False, OrderedDict()),
    "negative_size_after_a_zero": lambda: _rebuilt(0, (0, -3), (1, 1), False, OrderedDict()),
    "negative_stride_of_size_1": lambda: _rebuilt(0, (1, 3), (-3, 1), False, OrderedDict()),
    "overflow_after_a_zero": lambda: _rebuilt(
        0, (0, 2**62, 2**62), (1, 1, 1), False, OrderedDict()
    ),
    "stride_overflow_then_zero": lambda: _rebuilt(
        0, (2**62, 0), (2**62, 2**62), False, OrderedDict()
    ),
    "empty_past_the_storage": lambda: _rebuilt(100, (0,), (1,), False, OrderedDict()),
    "metadata_empty_list": lambda: _rebuilt(0, (2, 3), (3, 1), False, OrderedDict(), []),
    "metadata_flags": lambda: _rebuilt(0, (2, 3), (3, 1), False, OrderedDict(), {"x": 1}),
    "size_of_bools": lambda: _with(torch.Size([True, 2**63])),
    "device_index_explicit": lambda: _with(Reduced(torch.device, "cuda", 2**40)),
    # ---- arguments torch refuses
    "numel_overflow": lambda: _rebuilt(0, (2**62,) * 64, (0,) * 64, False, OrderedDict()),
    "numel_overflow_before_a_zero": lambda: _rebuilt(
        0, (2**62, 2**62, 0), (0, 0, 0), False, OrderedDict()
    ),
    "numel_2_63": lambda: _rebuilt(0, (2**32, 2**31), (0, 0), False, OrderedDict()),
    "negative_stride": lambda: _rebuilt(0, (2,), (-5,), False, OrderedDict()),
    "size_2_63": lambda: _rebuilt(0, (2**63,), (0,), False, OrderedDict()),
    "size_bool": lambda: _rebuilt(0, (True, 3), (3, 1), False, OrderedDict()),
    "size_int": lambda: _rebuilt(0, 6, (1,), False, OrderedDict()),
    "past_the_storage": lambda: _rebuilt(1, (2, 3), (3, 1), False, OrderedDict()),
    "requires_grad_int": lambda: _rebuilt(0, (2, 3), (3, 1), 1, OrderedDict()),
    "metadata_int_keys": lambda: _rebuilt(0, (2, 3), (3, 1), False, OrderedDict(), {1: True}),
    "metadata_list": lambda: _rebuilt(0, (2, 3), (3, 1), False, OrderedDict(), [1]),
    "five_arguments": lambda: _rebuilt(0, (2, 3), (3, 1), False),
    "size_of_floats": lambda: _with(Reduced(torch.Size, [2.0])),
    "device_bogus": lambda: _with(Reduced(torch.device, "bogus")),
    "device_negative_index": lambda: _with(Reduced(torch.device, "cuda", -1)),
    "device_leading_zero": lambda: _with(Reduced(torch.device, "cuda:01")),
    "device_two_indices": lambda: _with(Reduced(torch.device, "cuda:1", 1)),
    "device_empty": lambda: _with(Reduced(torch.device, "")),
    "device_index_past_stoi": lambda: _with(Reduced(torch.device, "cuda:2147483648")),
    "device_accelerator": lambda: _with(Reduced(torch.device, 0)),
    # ---- what the records cannot stand for: torch decides
    "stride_none": lambda: _rebuilt(0, (2, 3), None, False, OrderedDict()),
}
LEGACY = "legacy_format"  # pre-1.6 torch.save: no torch-free reader


def _patched(
    old: bytes, new: bytes, *more: bytes, record: str = "data.pkl"
) -> Callable[[Path, Path], None]:
    """A copy of an archive whose record ``record`` has ``old`` replaced by ``new`` (and each
    further pair of ``more`` likewise)."""
    pairs = [(old, new), *zip(more[::2], more[1::2], strict=True)]

    def write(source: Path, path: Path) -> None:
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as out:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith("/" + record):
                    for before, after in pairs:
                        assert before in data, (record, before)
                        data = data.replace(before, after, 1)
                out.writestr(info.filename, data)

    return write


def _dropped(keep: Callable[[str], bool]) -> Callable[[Path, Path], None]:
    def write(source: Path, path: Path) -> None:
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as out:
            for info in src.infolist():
                if keep(info.filename.partition("/")[2]):
                    out.writestr(info.filename, src.read(info))

    return write


def _saved(path: Path, obj: Any) -> Path:
    torch.save(obj, path)
    return path


def _central(field: int, value: int, fmt: str = "<H") -> Callable[[Path, Path], None]:
    """A copy whose first central directory entry has ``field`` (its offset) set to ``value``."""

    def write(source: Path, path: Path) -> None:
        raw = bytearray(source.read_bytes())
        with zipfile.ZipFile(source) as archive:
            start = archive.start_dir  # type: ignore[attr-defined]
        struct.pack_into(fmt, raw, start + field, value)
        path.write_bytes(raw)

    return write


def _bytes(change: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def write(source: Path, path: Path) -> None:
        path.write_bytes(change(source.read_bytes()))

    return write


_CPU = b"X\x03\x00\x00\x00cpu"
_NUMEL = b"K\x06tq"  # the base file's one storage of 6 floats
# Files made from the base file ({"w": 2x3 float32}, pickled as torch.save pickles it).
MUTATED: dict[str, Callable[[Path, Path], None]] = {
    # the tensor's REDUCE arguments: MARK ... TUPLE made EMPTY_LIST MARK ... APPENDS
    "reduce_arguments_a_list": _patched(b"q\x02((", b"q\x02]((", b"tq\x0cRq\r", b"eq\x0cRq\r"),
    "storage_location_bogus": _patched(_CPU, b"X\x05\x00\x00\x00bogus"),
    "storage_location_an_int": _patched(_CPU, b"K\x05"),
    "storage_key_an_int": _patched(b"X\x01\x00\x00\x000", b"K\x00"),
    "storage_claims_more_than_its_record": _patched(_NUMEL, b"K\x07tq"),
    "storage_claims_past_the_file": _patched(_NUMEL, b"J\x00\xe1\xf5\x05tq"),
    "storage_claims_less_than_the_tensor": _patched(_NUMEL, b"K\x05tq"),
    "storage_size_a_float": _patched(_NUMEL, b"G@\x18\x00\x00\x00\x00\x00\x00tq"),
    "only_data_pkl": _dropped(lambda name: name == "data.pkl"),
    "only_data_pkl_of_no_tensor": lambda _, path: _dropped(lambda name: name == "data.pkl")(
        _saved(path.with_suffix(".src"), {"model_state_dict": {}, "epoch": 3}), path
    ),
    "no_version": _dropped(lambda name: name != "version"),
    "version_0": _patched(b"3\n", b"0\n", record="version"),
    "version_10": _patched(b"3\n", b"10\n", record="version"),
    "version_11": _patched(b"3\n", b"11\n", record="version"),
    "version_padded": _patched(b"3\n", b" +3abc", record="version"),
    "version_not_a_number": _patched(b"3\n", b"abc", record="version"),
    "byteorder_big": _patched(b"little", b"big", record="byteorder"),
    "byteorder_middle": _patched(b"little", b"middle", record="byteorder"),
    "no_byteorder": _dropped(lambda name: name != "byteorder"),
    "alignment_not_a_number": _patched(b"64", b"x", record=".storage_alignment"),
    "serialization_id_not_utf8": _patched(b"0", b"\xff", record=".data/serialization_id"),
    "encrypted_record": _central(8, 0x0809),
    "patched_record": _central(8, 0x0828),
    "record_on_another_disk": _central(34, 2),
    "record_on_disk_1": _central(34, 1),  # miniz's reading of "this disk" allows 1 too
    "data_pkl_changed_in_place": _bytes(lambda raw: raw.replace(b"\0\0\0wq", b"\0\0\0vq")),
    "truncated_in_the_data": _bytes(lambda raw: raw[:400]),
    "truncated_in_the_directory": _bytes(lambda raw: raw[: len(raw) - 100]),
    "truncated_by_one": _bytes(lambda raw: raw[:-1]),
}  # fmt: skip

# What the records reader hands to torch.load, and why.
HANDED = {
    "quantized_per_tensor", "quantized_per_channel", "sparse_coo", "sparse_csr",
    "nested_tensor", LEGACY,  # tensors records do not stand for; a legacy file has no reader
    "device_bogus",  # a device type torch's list may hold (it grows; privateuse1 renames)
    "device_accelerator",  # torch.device(0): the machine's accelerator, if it has one
    "stride_none",  # torch makes the tensor contiguous
    "65_dims", "300_dims",  # over 64: a memo'd size named by every tensor would cost each
    "version_11",  # each torch release reads archive versions up to its own maximum
    "storage_location_an_int",  # the plugin's map_location records any location by str()
}  # fmt: skip

# The verdict each file must get (the records reader agreeing with torch is not enough: both
# could be wrong). Everything else loads.
REFUSED = {
    "slice", "numel_overflow", "numel_overflow_before_a_zero", "numel_2_63", "negative_stride",
    "size_2_63", "size_bool", "size_int", "past_the_storage", "requires_grad_int",
    "metadata_int_keys", "metadata_list", "five_arguments", "size_of_floats", "device_bogus",
    "device_negative_index", "device_leading_zero", "device_two_indices", "device_empty",
    "device_index_past_stoi", "storage_claims_less_than_the_tensor",
    "storage_size_a_float", "only_data_pkl", "only_data_pkl_of_no_tensor", "no_version",
    "version_0", "version_11", "version_not_a_number", "byteorder_middle", "alignment_not_a_number",
    "serialization_id_not_utf8", "encrypted_record", "patched_record", "record_on_another_disk",
    "truncated_in_the_data", "truncated_in_the_directory", "truncated_by_one",
}  # fmt: skip
try:
    torch.device(0)  # the machine's accelerator
except RuntimeError:  # none here: torch refuses the device
    REFUSED.add("device_accelerator")

# Where a plain torch.load(path, weights_only=True) differs from the plugin's: torch refuses a
# storage location it cannot restore by default, which the plugin's map_location sends to
# the CPU (a checkpoint saved on a GPU reads on any machine); with mmap=False, torch.load
# refuses a storage whose size differs from its record's, which a memory-mapped load (the
# plugin's, and so the records reader's) slices from the file.
RAW_TORCH_DIFFERS = {"storage_location_bogus", "storage_location_an_int"}
MMAP_DIFFERS = {"storage_claims_more_than_its_record", "storage_claims_past_the_file"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("differential")
    torch.manual_seed(0)
    made = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized, sparse CSR and nested tensors: "beta"
        for name, build in SAVED.items():
            made[name] = folder / f"{name}.pt"
            torch.save(build(), made[name])
    made[LEGACY] = folder / f"{LEGACY}.pt"
    torch.save(Net().state_dict(), made[LEGACY], _use_new_zipfile_serialization=False)
    base = folder / "base.pt"
    torch.save({"w": _t()}, base)
    for name, mutate in MUTATED.items():
        made[name] = folder / f"{name}.pt"
        mutate(base, made[name])
    return made


ALL = [*SAVED, LEGACY, *MUTATED]


def _verdict(read: Callable[[], Any]) -> tuple[str, Any]:
    """("loads", what it read), ("refused", the error) or ("handed", why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "loads", read()
    except records.NeedsTorch as exc:
        return "handed", exc
    except CheckpointError as exc:
        return "refused", exc


def _raw(path: Path, mmap: bool) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, weights_only=True, mmap=mmap)
    except Exception:  # torch.load fails in as many ways as a file can be damaged
        return "refused"
    return "loads"


def everything(schema: Schema) -> tuple[object, ...]:
    """All a schema says: its JSON, provenance, notes and each tensor's every field."""
    return (schema, schema.to_json(), schema.saved_on, schema.notes, schema.ordered,
            schema.source, tuple(t.__dict__ for t in schema.tensors))  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_the_records_reader_agrees_with_torch(files: dict[str, Path], name: str) -> None:
    path = files[name]
    by_torch, torch_read = _verdict(lambda: schema_of(path))
    assert by_torch == ("refused" if name in REFUSED else "loads"), torch_read
    free, free_read = _verdict(lambda: read_without_torch(path, None))
    if name in HANDED:
        assert free == "handed", free_read
        free, free_read = _verdict(lambda: schema_of_file(path))  # the command line's path
    assert free == by_torch, free_read
    if free == "loads":
        assert everything(free_read) == everything(torch_read)
    else:
        assert Path(free_read.path) == path and str(path) in str(free_read)
    # the plugin loads as torch.load does, but for the documented differences
    raw = _raw(path, mmap=name != LEGACY)  # torch memory-maps zip archives only
    assert raw == ("refused" if name in RAW_TORCH_DIFFERS else by_torch)
    assert _raw(path, mmap=False) == ("refused" if name in MMAP_DIFFERS else raw)


# Issue 22's rows: `statedict show` of each exits as torch.load reads the file (2: refused).
SHOWN = {
    "device_bogus": 2, "device_negative_index": 2, "numel_overflow": 2,
    "only_data_pkl_of_no_tensor": 2,
    "reduce_arguments_a_list": 0, "size_and_stride_lists": 0, "65_dims": 0,
    "storage_claims_more_than_its_record": 0,
}  # fmt: skip


@pytest.mark.parametrize("name", SHOWN)
def test_statedict_show_exits_as_torch_loads(
    files: dict[str, Path], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = files[name]
    assert main(["show", str(path)]) == SHOWN[name]
    out, err = capsys.readouterr()
    if SHOWN[name]:
        assert err.startswith(f"statedict: checkpoint {path}: ") and "bug" not in err
    else:
        assert out.startswith("name ") and "w " in out


def test_byte_flips_and_truncations(files: dict[str, Path], tmp_path: Path) -> None:
    """Every byte of a small archive's zip structure around its pickle (data.pkl's local
    header and pickle, the first and last central directory entries, the end records) flipped,
    and the archive cut at every 16th byte: the two readers agree on each (counted, so the
    sweep is seen to reach both verdicts). The zip structure is where Python's zipfile and
    torch's miniz differ: the records reader re-does miniz's checks."""
    source = tmp_path / "source.pt"
    torch.save({"w": _t(), "n": torch.tensor(3), "d": torch.device("cpu"), "s": {1}}, source)
    raw = source.read_bytes()
    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
        directory = archive.start_dir  # type: ignore[attr-defined]
    pickle_end = infos[0].header_offset + 30 + len(infos[0].filename) + infos[0].file_size
    last_entry = directory + sum(46 + len(i.filename) + len(i.extra) for i in infos[:-1])
    pickle = range(0, pickle_end + 80)  # data.pkl's local header and bytes, and past them
    structure = [
        *range(directory, directory + 46 + len(infos[0].filename)),
        *range(last_entry, len(raw)),  # the last directory entry, the zip64 and end records
    ]
    variants = [raw[:cut] for cut in range(0, len(raw), 16)]
    for i, bits in [*((i, 0xFF) for i in pickle), *((i, b) for i in structure for b in (1, 0xFF))]:
        flipped = bytearray(raw)
        flipped[i] ^= bits
        variants.append(bytes(flipped))
    path = tmp_path / "variant.pt"
    counts: Counter[str] = Counter()
    disagreements = []
    for i, data in enumerate(variants):
        path.write_bytes(data)
        by_torch, torch_read = _verdict(lambda: schema_of(path))
        free, free_read = _verdict(lambda: schema_of_file(path))
        same = free == by_torch and (
            free != "loads" or everything(free_read) == everything(torch_read)
        )
        counts[by_torch] += 1
        if not same:
            disagreements.append((i, by_torch, free, str(free_read)[:200]))
    assert disagreements == []
    assert counts["loads"] > 100 and counts["refused"] > 200, counts
