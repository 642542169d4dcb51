"""Hostile files: no payload runs, no foreign file is read or echoed, every failure is ours.

Each pickle payload tries to create a marker file; it goes through every entry point that
reads a file (``schema_of`` of the folder and of the file, ``assert_state_dict_matches``,
``assert_checkpoint_loads``, ``statedict show`` and ``statedict diff``), inside a DCP
``.metadata``, a ``torch.save`` archive's ``data.pkl`` and a legacy torch file. Every
payload is first shown to be live: plain ``pickle.loads`` does create its marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import (
    CheckpointError,
    SnapshotError,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.cli import main
from pytest_statedict.readers import limits

# ---- payloads ------------------------------------------------------------------------------


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _arg(a: str | bytes) -> bytes:
    return _text(a) if isinstance(a, str) else b"B" + struct.pack("<I", len(a)) + a  # BINBYTES


def _global(module: str, name: str, proto: int) -> bytes:
    if proto >= 4:
        return _text(module) + _text(name) + b"\x93"  # STACK_GLOBAL: may resolve dotted names
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def call(module: str, name: str, *args: str | bytes, proto: int = 4, stop: bool = True) -> bytes:
    """A pickle that calls ``module.name(*args)`` (REDUCE)."""
    head = b"\x80" + bytes([proto]) if proto >= 2 else b""
    body = _global(module, name, proto) + b"(" + b"".join(map(_arg, args)) + b"tR"
    return head + body + (b"." if stop else b"")


def touch(marker: Path) -> str:
    return f"touch {marker}"


PAYLOADS: dict[str, Callable[[Path], bytes]] = {
    "os.system via GLOBAL (protocol 0)": lambda m: call("os", "system", touch(m), proto=0),
    "os.system via GLOBAL (protocol 2)": lambda m: call("os", "system", touch(m), proto=2),
    "os.system via STACK_GLOBAL (protocol 4)": lambda m: call("os", "system", touch(m)),
    "posix.system (what pickle writes)": lambda m: pickle.dumps(_System(touch(m))),
    "DCP module + dotted os.system": lambda m: call(
        "torch.distributed.checkpoint.metadata", "os.system", touch(m)
    ),
    "DCP filesystem module + dotted os.system": lambda m: call(
        "torch.distributed.checkpoint.filesystem", "os.system", touch(m)
    ),
    "torch + dotted torch.os.system": lambda m: call("torch", "os.system", touch(m)),
    "builtins.eval": lambda m: call("builtins", "eval", f"open({str(m)!r}, 'w').close()"),
    "builtins.exec": lambda m: call("builtins", "exec", f"open({str(m)!r}, 'w').close()"),
    "builtins.getattr(__import__('os'), 'system')": lambda m: (
        b"\x80\x02"
        + _global("builtins", "getattr", 2)
        + b"("
        + call("builtins", "__import__", "os", proto=2, stop=False)[2:]
        + _arg("system")
        + b"tR("
        + _arg(touch(m))
        + b"tR."
    ),
    "pickle.loads of a payload": lambda m: call(
        "pickle", "loads", call("os", "system", touch(m)), proto=3
    ),
    "torch.load of a payload file": lambda m: _torch_load_payload(m),
    "builtins.open (a class pickled by reference)": lambda m: pickle.dumps(_Open(str(m))),
}


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (self.command,))


class _Open:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.target, "w"))


def _torch_load_payload(marker: Path) -> bytes:
    """``torch.load(inner, None, pickle)``: an explicit pickle module means weights_only=False."""
    inner = marker.with_name(marker.name + ".inner.pkl")
    inner.write_bytes(call("os", "system", touch(marker), proto=2))
    pickle_module = call("builtins", "__import__", "pickle", proto=2, stop=False)[2:]
    return (
        b"\x80\x02" + _global("torch", "load", 2) + b"(" + _arg(str(inner)) + b"N"
        + pickle_module + b"tR."
    )  # fmt: skip


def test_every_payload_is_live(tmp_path: Path) -> None:
    """Plain pickle would run each of them (so refusing them proves something)."""
    for i, (name, make) in enumerate(PAYLOADS.items()):
        marker = tmp_path / f"live{i}"
        data = make(marker)
        with contextlib.suppress(Exception):  # some fail after they ran (an int is no dict)
            pickle.loads(data)
        assert marker.exists(), name


def real_dcp_folder(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    state = {
        "w": torch.zeros(3, 4),
        "nested": {"b": torch.ones(2, dtype=torch.bfloat16), "raw": b"bytes", "deep": {"i": 3}},
    }
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=folder)
    return folder


def prepended(payload: bytes, real: bytes) -> bytes:
    """A payload run first, its result popped, then a real pickle: the stream still loads."""
    return payload[:-1] + b"0" + real


def hostile_dcp(tmp_path: Path, payload: bytes) -> Path:
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(payload)
    return folder


def hostile_zip(tmp_path: Path, payload: bytes) -> Path:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    path = tmp_path / "hostile.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = payload if info.filename.endswith("data.pkl") else src.read(info)
            out.writestr(info.filename, data)
    return path


def hostile_legacy(tmp_path: Path, payload: bytes) -> Path:
    path = tmp_path / "hostile_legacy.pt"
    path.write_bytes(payload)
    return path


CONTAINERS = {"dcp": hostile_dcp, "zip": hostile_zip, "legacy": hostile_legacy}


def model() -> nn.Module:
    return nn.Linear(2, 2)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


ENTRY_POINTS: dict[str, Callable[[Path, Path, pytest.CaptureFixture[str]], None]] = {
    "schema_of(path)": lambda p, good, cap: schema_of(p),
    "schema_of(folder/.metadata or file)": lambda p, good, cap: schema_of(
        p / ".metadata" if p.is_dir() else p
    ),
    "assert_state_dict_matches(expected=path)": lambda p, good, cap: assert_state_dict_matches(
        model(), expected=p
    ),
    "assert_checkpoint_loads(model, path)": lambda p, good, cap: assert_checkpoint_loads(
        model(), p
    ),
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_payload_runs_through_any_entry_point(
    tmp_path: Path, container: str, payload: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    path = CONTAINERS[container](tmp_path, PAYLOADS[payload](marker))
    good = tmp_path / "good_ref.pt"
    torch.save(model().state_dict(), good)
    for entry, read in ENTRY_POINTS.items():
        with pytest.raises(CheckpointError) as info:
            read(path, good, capsys)
        assert str(path) in str(info.value), entry
        assert not marker.exists(), entry
    cli_runs = (["show", str(path)], ["diff", str(good), str(path)], ["diff", str(path), str(good)])
    for args in cli_runs:
        code, err = _run_cli(args, capsys)
        assert code == 2, args
        assert f"checkpoint {path}" in err and "Traceback" not in err, args
        assert not marker.exists(), args


@pytest.mark.parametrize("payload", ["DCP module + dotted os.system", "builtins.eval"])
def test_payload_prepended_to_real_dcp_metadata(tmp_path: Path, payload: str) -> None:
    real = real_dcp_folder(tmp_path / "real")
    marker = tmp_path / "pwned"
    data = prepended(PAYLOADS[payload](marker), (real / ".metadata").read_bytes())
    assert type(pickle.loads(data)).__name__ == "Metadata"  # a valid stream: pickle ran it
    assert marker.exists()
    marker.unlink()
    (real / ".metadata").write_bytes(data)
    for path in (real, real / ".metadata"):
        with pytest.raises(CheckpointError, match="is not allowed in DCP metadata"):
            schema_of(path)
    with pytest.raises(CheckpointError):
        assert_state_dict_matches(model(), expected=real)
    assert not marker.exists()


def test_real_dcp_metadata_uses_only_allowed_globals(tmp_path: Path) -> None:
    """The allowlist is exact pairs, and a real dcp.save needs nothing outside it."""
    import pickletools

    from pytest_statedict.readers.unpickling import DCP_GLOBALS

    folder = real_dcp_folder(tmp_path / "real")
    data = (folder / ".metadata").read_bytes()
    memo: list[str] = []
    used = set()
    for op, arg, _ in pickletools.genops(data):
        if op.name == "STACK_GLOBAL":
            used.add((memo[-2], memo[-1]))
        if isinstance(arg, str):
            memo.append(arg)
    assert all("." not in name for _, name in DCP_GLOBALS)
    schema = schema_of(folder)
    assert {t.key: t.shape for t in schema if t.kind == "tensor"} == {
        "w": (3, 4),
        "nested.b": (2,),
    }
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in DCP_GLOBALS


@pytest.mark.parametrize(
    "payload",
    [
        # REDUCE on allowed callables with hostile arguments
        call("torch.serialization", "_get_layout", "os.system"),
        call("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "x" * 1000),
        call("torch.distributed.checkpoint.metadata", "Metadata", "not a dict"),
        call("collections", "OrderedDict", "abc"),
        call("torch", "Size", "abc"),
        call("pathlib", "PosixPath", "/etc/shadow"),
        b"\x80\x04N.",  # None
        b"\x80\x04(\x8c\x01a\x8c\x01bt.",  # a tuple
        b"\x80\x04\x8c\x03abc\x94h\x05.",  # a memo key that is not there
        b"\x80\x04K\x01Q.",  # a persistent id
        b"\x80\x04",  # truncated
        b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7f",  # a frame claiming 8 EiB
    ],
)
def test_hostile_dcp_metadata_is_a_named_error(tmp_path: Path, payload: bytes) -> None:
    folder = hostile_dcp(tmp_path, payload)
    with pytest.raises(CheckpointError) as info:
        schema_of(folder)
    assert str(folder) in str(info.value)


def test_cli_in_a_subprocess_exits_2_on_every_payload(tmp_path: Path) -> None:
    """The console script as users run it: exit 2, one paragraph, no traceback, no marker."""
    marker = tmp_path / "pwned"
    good = tmp_path / "good_ref.pt"
    torch.save(model().state_dict(), good)
    paths = {}
    for container, make in CONTAINERS.items():
        folder = tmp_path / container
        folder.mkdir()
        paths[container] = make(folder, PAYLOADS["DCP module + dotted os.system"](marker))
    runs = [
        (paths["dcp"], ["show", str(paths["dcp"])]),
        (paths["zip"], ["diff", str(good), str(paths["zip"])]),
        (paths["legacy"], ["diff", str(paths["legacy"]), str(good)]),
    ]
    for path, args in runs:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("statedict")), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(f"statedict: checkpoint {path}")
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_torch_free_reader_runs_no_payload(tmp_path: Path, payload: str) -> None:
    """The CLI's own reader of torch.save archives (torch's weights-only rules without
    torch) refuses each payload itself, or hands it to torch.load: a name torch's allowlist
    is made of (``torch.load``), which torch then refuses. It never runs one."""
    from pytest_statedict.readers.records import NeedsTorch
    from pytest_statedict.torch_free import read_without_torch

    marker = tmp_path / "pwned"
    path = hostile_zip(tmp_path, PAYLOADS[payload](marker))
    if payload == "torch.load of a payload file":
        with pytest.raises(NeedsTorch):
            read_without_torch(path, None)
    else:
        with pytest.raises(CheckpointError) as info:
            read_without_torch(path, None)
        assert str(path) in str(info.value)
    assert not marker.exists()


def test_the_cli_refuses_a_payload_without_importing_torch(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = hostile_zip(tmp_path, PAYLOADS["os.system via GLOBAL (protocol 2)"](marker))
    code = (
        "import sys\nfrom pytest_statedict.cli import main\n"
        f"code = main(['show', {str(path)!r}])\n"
        "assert 'torch' not in sys.modules\nraise SystemExit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"statedict: checkpoint {path}: it needs arbitrary code")
    assert "os.system" in result.stderr and "is blocked" in result.stderr
    assert not marker.exists()


# ---- foreign files named by a sharded index ------------------------------------------------


def write_index(folder: Path, weight_map: dict[str, object], name: str = "model") -> Path:
    index = folder / f"{name}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


SECRET = b"SECRET-CONTENT-never-echoed"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked folder"])
def test_a_shard_outside_its_folder_is_refused_and_never_echoed(tmp_path: Path, how: str) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_bytes(SECRET)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if how == "dotdot":
        shard = "../elsewhere/shadow"
    elif how == "absolute":
        shard = str(secret)
    elif how == "symlink":
        (folder / "model-1.safetensors").symlink_to(secret)
        shard = "model-1.safetensors"
    else:
        (folder / "sub").symlink_to(outside)
        shard = "sub/shadow"
    index = write_index(folder, {"w": shard})
    for path in (index, folder):
        with pytest.raises(CheckpointError, match="lies outside the index's folder") as info:
            schema_of(path)
        assert str(index) in str(info.value)
        assert SECRET.decode() not in str(info.value) and SECRET[:8].hex() not in str(info.value)


def test_a_shard_inside_its_folder_may_be_a_symlink(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "real.safetensors")
    (tmp_path / "model-1.safetensors").symlink_to(tmp_path / "real.safetensors")
    assert [t.key for t in schema_of(write_index(tmp_path, {"w": "model-1.safetensors"}))] == ["w"]


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"w": "model.safetensors.index.json"}, "not a checkpoint file"),  # itself
        ({"w": "other.safetensors.index.json"}, "not a checkpoint file"),  # another index
        ({"w": "snapshot.json"}, "not a checkpoint file"),
        ({"w": 3}, "maps 'w' to a int, not a file name"),
        ({"w": ["a", "b"]}, "maps 'w' to a list"),
        ({"w": None}, "maps 'w' to a NoneType"),
        ({"w": ""}, "not a file name"),
        ([1, 2], 'no "weight_map" object'),
        ({}, "its weight_map is empty"),
    ],
)
def test_bad_index_entries_are_named_errors(
    tmp_path: Path, weight_map: object, message: str
) -> None:
    write_index(tmp_path, {"w": "x.safetensors"}, name="other")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message) as info:
        schema_of(index)
    assert str(index) in str(info.value)


def test_a_foreign_file_in_a_shard_is_not_echoed(tmp_path: Path) -> None:
    (tmp_path / "model-1.bin").write_bytes(SECRET)
    with pytest.raises(CheckpointError, match="starts with the bytes 53 45 43 52") as info:
        schema_of(write_index(tmp_path, {"w": "model-1.bin"}))
    assert "SECRET" not in str(info.value)


# ---- bad input: the plugin's own error, every time ------------------------------------------


def snapshot_text(**changes: object) -> str:
    data = json.loads(schema_of(nn.Linear(2, 3)).to_json())
    data.update(changes)
    return json.dumps(data)


def with_optimizer(**group: object) -> str:
    opt = {"class": "torch.optim.SGD", "param_groups": [{"lr": 0.1, **group}], "state": []}
    return snapshot_text(optimizer=opt)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (with_optimizer(params=[[1, 2]]), '"params" must hold names or indices'),
        (with_optimizer(params=[True]), '"params" must hold names or indices'),
        (snapshot_text()[:-1] + ', "x": ' + "9" * 5000 + "}", "invalid JSON"),
        ('{"format": "pytest-statedict", "version": 1, "tensors": ' + "[" * 100_000, "nests"),
        (snapshot_text(extras={"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
         '"extras" must be an object'),
        (snapshot_text(version=True), "format version True"),
        (snapshot_text(version=1.0), "format version 1.0"),
        (snapshot_text(tensors=[{"key": "w", "kind": "tensor", "shape": [True], "dtype": "int8"}]),
         "non-negative integers"),
        (snapshot_text(tensors=[{"key": "w", "kind": "tensor", "shape": [2**64], "dtype": "int8"}]),
         "non-negative integers"),
        (snapshot_text(tensors=[{"key": "w", "kind": "tensor", "shape": [1] * 65, "dtype": "u8"}]),
         "at most 64"),
        (snapshot_text(tensors=[{"key": "w", "kind": ["tensor"], "shape": [], "dtype": "int8"}]),
         "kind"),
        (snapshot_text(tensors=[{"key": "w", "kind": "tensor", "shape": [], "dtype": ["int8"]}]),
         "unknown dtype"),
        (snapshot_text(optimizer={"class": "SGD", "param_groups": [], "state": [
            {"param": True, "m": {"type": "int"}}]}), 'has no "param"'),
        (snapshot_text(optimizer={"class": "SGD", "param_groups": [], "state": [
            {"param": 0, "m": {"shape": [[1]], "dtype": "float32"}}]}), "needs"),
    ],
)  # fmt: skip
def test_a_bad_snapshot_is_a_snapshot_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    for read in (schema_of, lambda p: assert_checkpoint_loads(nn.Linear(2, 3), p)):
        with pytest.raises(SnapshotError, match=message) as info:
            read(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "missing", "folder"])
def test_only_regular_files_are_read(tmp_path: Path, target: str) -> None:
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    elif target == "folder":
        (tmp_path / "folder").mkdir()
    link = tmp_path / "snapshot.json"
    link.symlink_to(target if target.startswith("/") else tmp_path / target)
    reads = {
        "schema_of": schema_of,
        "assert_checkpoint_loads": lambda p: assert_checkpoint_loads(nn.Linear(2, 3), p),
        "show": lambda p: main(["show", str(p)]) == 2 or pytest.fail("exit code"),
    }
    for path in (link, link.with_name("model.pt"), link.with_name("m.safetensors")):
        if path != link:
            path.symlink_to(link.resolve() if target != "missing" else tmp_path / target)
        for name, read in reads.items():
            if name == "show":
                assert read(path)
                continue
            with pytest.raises(CheckpointError) as info:
                read(path)
            assert str(path) in str(info.value), name


def test_a_missing_or_folder_release_snapshot_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "v1.json").mkdir()
    for path in (tmp_path / "v0.json", tmp_path / "v1.json"):
        with pytest.raises(CheckpointError, match="no such file|is a directory") as info:
            assert_checkpoint_loads(nn.Linear(2, 3), path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("dtype", "shape", "message"),
    [
        ("qint8", [3, 2], "quantized dtype without a qscheme"),
        ("quint4x2", [3, 2], "quantized dtype without a qscheme"),
        ("float32", [2**62, 2**62], "RuntimeError"),
    ],
)
def test_a_snapshot_the_gate_cannot_build_is_a_named_error(
    tmp_path: Path, dtype: str, shape: list[int], message: str
) -> None:
    data = json.loads(schema_of(nn.Linear(2, 3)).to_json())
    data["tensors"][0].update(dtype=dtype, shape=shape)
    path = tmp_path / "release.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match=message) as info:
        assert_checkpoint_loads(nn.Linear(2, 3), path)
    assert str(path) in str(info.value) and "'weight'" in str(info.value)


def safetensors_bytes(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "nests deeper"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]],
                                  "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [2**64, 0],
                                  "data_offsets": [0, 0]}}), "shape is not"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}},
                           b"\0" * 4), "65 dimensions"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [2**40, 2**40],
                                  "data_offsets": [0, 4]}}, b"\0" * 4), "its shape needs"),
        (safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}"),
         "not valid JSON"),
        (safetensors_bytes({"w": {"dtype": ["F32"], "shape": [], "data_offsets": [0, 4]}}),
         "unknown dtype"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [True, 4]}},
                           b"\0" * 4), "data_offsets"),
    ],
)  # fmt: skip
def test_hostile_safetensors_headers(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        schema_of(path)
    assert str(path) in str(info.value)


def test_a_sparse_file_claiming_a_36_gb_header(tmp_path: Path) -> None:
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 36 << 30) + b"{")
        f.truncate((36 << 30) + 16)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="claims 38654705664 bytes, more than") as info:
        schema_of(path)
    assert str(path) in str(info.value)


def test_truncated_legacy_files(tmp_path: Path) -> None:
    good = tmp_path / "legacy.pt"
    torch.save(nn.Linear(2, 3).state_dict(), good, _use_new_zipfile_serialization=False)
    raw = good.read_bytes()
    path = tmp_path / "cut.pt"
    for length in range(1, len(raw), 7):
        path.write_bytes(raw[:length])
        with pytest.raises(CheckpointError) as info:
            schema_of(path)
        assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_torchscript_archive_is_named(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 3)), path)
    with pytest.raises(CheckpointError, match="a TorchScript archive .*torch.jit.load"):
        schema_of(path)
    code, err, _ = _run_cli_subprocess(["show", str(path)])
    assert code == 2 and "TorchScript" in err


def _run_cli_subprocess(args: list[str]) -> tuple[int, str, int]:
    """Exit code, stderr, and how much ``main`` raised the peak RSS above the imports'."""
    script = textwrap.dedent(
        """
        import resource, sys
        import pytest_statedict.extract  # torch and the readers: the floor
        from pytest_statedict.cli import main
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        code = main(sys.argv[1:])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(after - before, file=sys.stderr)
        sys.exit(code)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    *message, growth = result.stderr.strip().splitlines()
    return result.returncode, "\n".join(message), int(growth) * 1024


def zip_bomb(tmp_path: Path, expanded: int) -> Path:
    """A torch.save archive whose data.pkl is deflated: ~1000x smaller than what it holds."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            if info.filename.endswith("data.pkl"):
                data = b"\x80\x02" + b"B" + struct.pack("<I", expanded) + bytes(expanded) + b"."
                out.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info.filename, src.read(info))
    return path


def test_a_zip_bomb_is_refused_before_torch_reads_it(tmp_path: Path) -> None:
    path = zip_bomb(tmp_path, 256 << 20)
    assert path.stat().st_size < 1 << 20
    code, err, growth = _run_cli_subprocess(["show", str(path)])
    assert code == 2
    assert "is compressed (torch.save stores records uncompressed)" in err
    assert growth < 32 << 20  # the 256 MiB were never inflated


@pytest.mark.parametrize(
    ("problem", "record"),
    [
        ("declared size", "data.pkl"),
        ("past the end", "data.pkl"),
        ("huge data.pkl", "data.pkl"),
        ("data past the end", "data/0"),  # its local header fits, its last bytes do not
    ],
)
def test_zip_records_that_lie_about_their_size(tmp_path: Path, problem: str, record: str) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record))
    name = info.filename.encode()
    directory = raw.find(b"PK\x01\x02")  # the record's central directory entry
    while raw[directory + 46 : directory + 46 + len(name)] != name:
        directory = raw.find(b"PK\x01\x02", directory + 4)
    if problem == "declared size":  # uncompressed size field of the central directory entry
        sizes = (info.compress_size, 3 << 30)
    elif problem == "past the end":
        sizes = (1 << 30, 1 << 30)
    elif problem == "huge data.pkl":
        sizes = (limits.MAX_PICKLE_BYTES + 1,) * 2
    else:  # up to the end of the file from the record's local header: the data overruns
        sizes = (len(raw) - info.header_offset,) * 2
    struct.pack_into("<2L", raw, directory + 20, *sizes)
    path = tmp_path / "lying.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=record) as error:
        schema_of(path, values=True)  # values: the tensor bytes would be read
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "error",
    [RecursionError("deep"), MemoryError(), ValueError("odd"), KeyError("k")],
)
def test_the_cli_exits_2_on_any_error_without_a_traceback(
    tmp_path: Path,
    error: Exception,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A crash is never "different" (exit 1): bad input or a bug, it exits 2."""
    import pytest_statedict.torch_free

    def crash(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(pytest_statedict.torch_free, "schema_of_file", crash)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    for args in (["diff", str(good), str(good)], ["show", str(good)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("statedict: ") and "Traceback" not in err
        assert type(error).__name__ in err


def test_a_fifo_swapped_in_after_the_check_does_not_hang(tmp_path: Path) -> None:
    """The readers open without blocking and check the type of what they opened."""
    from pytest_statedict.readers.files import open_regular

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_regular(fifo)


def test_a_fifo_shard_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model-1.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file") as info:
        schema_of(write_index(tmp_path, {"w": "model-1.safetensors"}))
    assert "model-1.safetensors" in str(info.value)


# ---- DCP metadata that attacks the unpickler itself ---------------------------------------


def dcp_folder(tmp_path: Path, name: str, metadata: bytes) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / ".metadata").write_bytes(metadata)
    return folder


@pytest.mark.parametrize(
    ("payload", "victim"),
    [
        # BUILD with slot state on a class the allowlist hands out: it would replace
        # PurePosixPath.is_relative_to process-wide (the symlink guard's own check)
        (
            b"\x80\x02cpathlib\nPurePosixPath\nN}X\x0e\x00\x00\x00is_relative_to"
            b"ctorch.distributed.checkpoint.metadata\nMetadata\ns\x86b.",
            lambda: pathlib.PurePosixPath.is_relative_to,
        ),
        # BUILD on a function: _get_layout.__dict__ / attributes
        (
            b"\x80\x02ctorch.serialization\n_get_layout\n}X\x05\x00\x00\x00cache}"
            b"X\x0d\x00\x00\x00torch.stridedctorch\nfloat32\nssb.",
            lambda: torch.serialization._get_layout("torch.strided"),
        ),
    ],
    ids=["class", "function"],
)
def test_metadata_cannot_change_the_classes_it_may_create(
    tmp_path: Path, payload: bytes, victim: Callable[[], object]
) -> None:
    before = victim()
    with pytest.raises(CheckpointError, match="sets the state of a"):
        schema_of(dcp_folder(tmp_path, "poison", payload))
    assert victim() == before


def test_a_huge_memo_index_costs_nothing(tmp_path: Path) -> None:
    """The C unpickler sizes its memo to the largest index named: 9 bytes asked for 2 GB."""
    script = textwrap.dedent(
        f"""
        import resource, struct, sys
        from pytest_statedict import schema_of
        from pytest_statedict.errors import CheckpointError
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            schema_of({str(dcp_folder(tmp_path, "memo", b""))!r})
        except CheckpointError:
            pass
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024)
        """
    )
    (tmp_path / "memo" / ".metadata").write_bytes(b"\x80\x04Nr" + struct.pack("<I", 1 << 27) + b".")
    grown = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert int(grown.stdout.strip()) < 64, grown.stdout  # MiB


def test_a_metadata_pickle_has_an_operation_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_statedict.readers import unpickling

    monkeypatch.setattr(unpickling, "DCP_METADATA_COST", 100_000)
    folder = dcp_folder(tmp_path, "lists", b"\x80\x02(" + b"]" * 2000 + b".")
    with pytest.raises(CheckpointError, match="more than its budget of 100,000 bytes"):
        schema_of(folder)


def _self_referencing() -> object:
    lr: dict[str, object] = {}
    lr["again"] = lr
    return lr


def _nested(levels: int) -> object:
    value: object = 0.1
    for _ in range(levels):
        value = [value]
    return value


def _doubling(levels: int) -> object:
    value: object = [0.1]
    for _ in range(levels):
        value = [value, value]  # pickled once each (memo): 2^levels values when expanded
    return value


@pytest.mark.parametrize(
    "lr",
    [_self_referencing(), _nested(40), _doubling(22)],
    ids=["self-referencing", "nested", "shared-doubling"],
)
def test_a_hyperparameter_that_never_ends_is_a_named_error(tmp_path: Path, lr: object) -> None:
    path = tmp_path / "opt.pt"
    torch.save(
        {
            "model_state_dict": {"w": torch.zeros(2)},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": lr, "params": [0]}]},
        },
        path,
    )
    with pytest.raises(CheckpointError, match="nests deeper than 32 levels or holds more than"):
        schema_of(path)


def test_json_that_would_build_millions_of_containers_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_JSON_CONTAINERS", 1000)
    from pytest_statedict import snapshot_format as schema_module
    from pytest_statedict.readers import files

    monkeypatch.setattr(files, "MAX_JSON_CONTAINERS", 1000)
    monkeypatch.setattr(schema_module, "MAX_JSON_CONTAINERS", 1000)
    lists = ",".join(["[]"] * 2000)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(f'{{"weight_map": {{}}, "x": [{lists}]}}')
    with pytest.raises(CheckpointError, match="2,00[0-9] JSON arrays and objects, more than 1,000"):
        schema_of(index)
    snapshot = tmp_path / "snap.json"
    snapshot.write_text(f'{{"format": "pytest-statedict", "x": [{lists}]}}')
    with pytest.raises(SnapshotError, match="2,00[0-9] JSON arrays and objects"):
        schema_of(snapshot)


def test_a_data_pkl_far_larger_than_its_records_need_is_refused(tmp_path: Path) -> None:
    """Nested empty lists cost torch's weights-only unpickler ~140 bytes of memory a byte."""
    path = tmp_path / "lists.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as z:
        records = {info.filename: z.read(info) for info in z.infolist()}
    data_pkl = next(name for name in records if name.endswith("data.pkl"))
    allowed = limits.PICKLE_BYTES_BASE + limits.PICKLE_BYTES_PER_RECORD * len(records)
    records[data_pkl] = b"\x80\x02](" + b"]" * allowed + b"e."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    with pytest.raises(CheckpointError, match="more than the pickle of a checkpoint with"):
        schema_of(path)
