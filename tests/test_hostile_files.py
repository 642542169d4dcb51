"""Hostile files: no payload runs, no foreign file is read or echoed, every failure is ours.

Each pickle payload tries to create a marker file; it goes through every entry point that
reads a file (``schema_of`` of the folder and of the file, ``assert_state_dict_matches``,
``assert_checkpoint_loads``, ``statedict show`` and ``statedict diff``), inside a DCP
``.metadata``, a ``torch.save`` archive's ``data.pkl`` and a legacy torch file. Every
payload is first shown to be live: plain ``pickle.loads`` does create its marker.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import (
    CheckpointError,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.cli import main

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
    paths = []
    for container, make in CONTAINERS.items():
        folder = tmp_path / container
        folder.mkdir()
        paths.append(make(folder, PAYLOADS["DCP module + dotted os.system"](marker)))
    for path in paths:
        for args in (["show", str(path)], ["diff", str(good), str(path)]):
            result = subprocess.run(
                [sys.executable, "-m", "pytest_statedict", *args],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 2, (args, result.stderr)
            assert "Traceback" not in result.stderr
            assert result.stderr.startswith(f"statedict: checkpoint {path}")
            assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
