"""Checkpoint files: every format read without its data, every bad file a named error."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.serialization
from torch import nn

from pytest_statedict import CheckpointError, schema_of
from pytest_statedict.checkpoint import load_checkpoint


@contextmanager
def saved_as(location: str) -> Iterator[None]:
    """Make torch.save tag every storage with ``location`` (a cuda:0 file on a CPU machine)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_torch_save_file_matches_the_module(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    m = model()
    torch.save(m.state_dict(), path)
    from_file = schema_of(path)
    from_module = schema_of(m.state_dict())
    assert from_file == from_module
    assert from_file.saved_on == ("cpu",)
    assert from_file.source == str(path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_file_is_memory_mapped_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(64, 1024, 1024, dtype=torch.uint8)}, path)  # 64 MiB
    obj, _ = load_checkpoint(path)
    # the tensor's bytes are the file's pages, mapped, not copied into anonymous memory
    assert str(path) in Path("/proc/self/maps").read_text()
    assert obj["w"].shape == (64, 1024, 1024)


def test_legacy_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save(model().state_dict(), path, _use_new_zipfile_serialization=False)
    assert schema_of(path) == schema_of(model().state_dict())


def test_cuda_tagged_checkpoint_reads_on_a_cpu_machine(tmp_path: Path) -> None:
    path = tmp_path / "cuda.pt"
    with saved_as("cuda:0"):
        torch.save(model().state_dict(), path)
    schema = schema_of(path)
    assert schema.saved_on == ("cuda:0",)
    assert schema == schema_of(model().state_dict())


def test_general_checkpoint_file(tmp_path: Path) -> None:
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    path = tmp_path / "ckpt.tar"
    torch.save({"epoch": 5, "model_state_dict": m.state_dict(),
                "optimizer_state_dict": opt.state_dict()}, path)  # fmt: skip
    schema = schema_of(path)
    assert schema.optimizer is not None and schema.optimizer.param_groups[0].params == (
        0, 1, 2, 3, 4, 5,
    )  # fmt: skip
    assert schema.extras == {"epoch": "int"}


def test_safetensors_header_only(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {"b": torch.zeros(2, 3, dtype=torch.bfloat16), "a": torch.ones(4, dtype=torch.int64)}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    schema = schema_of(path)
    assert {t.key: (t.shape, t.dtype) for t in schema} == {
        "a": ((4,), "int64"),
        "b": ((2, 3), "bfloat16"),
    }
    with_values = schema_of(path, values=True)
    assert with_values.tensors[0].fingerprint is not None


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def truncated_zip(tmp_path: Path) -> Path:
    good = tmp_path / "good.pt"
    torch.save(model().state_dict(), good)
    return write_bytes(tmp_path, "truncated.pt", good.read_bytes()[:700])


def foreign_zip(tmp_path: Path) -> Path:
    path = tmp_path / "foreign.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    return path


def safetensors_with(tmp_path: Path, header: dict[str, object], data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    return write_bytes(tmp_path, "bad.safetensors", struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.pt", "no such file"),
        (lambda p: p, "is a directory"),
        (lambda p: write_bytes(p, "empty.pt", b""), "the file is empty"),
        (lambda p: write_bytes(p, "text.pt", b"hello world, not a checkpoint"),
         "not a checkpoint: it starts with b'hello wo'"),
        (truncated_zip, "the file is truncated"),
        (foreign_zip, "a zip archive but not a torch.save checkpoint"),
        (lambda p: write_bytes(p, "short.safetensors", b"\x01"), "too short"),
        (lambda p: write_bytes(p, "huge.safetensors", struct.pack("<Q", 10**9) + b"{}"),
         "claims 1000000000 bytes"),
        (lambda p: safetensors_with(p, {"w": {"dtype": "F32", "shape": [4],
                                              "data_offsets": [0, 16]}}, b"\0" * 8),
         "past the end of the data"),
        (lambda p: safetensors_with(p, {"w": {"dtype": "F32", "shape": [4],
                                              "data_offsets": [0, 8]}}, b"\0" * 8),
         "its shape needs 16"),
        (lambda p: safetensors_with(p, {"w": {"dtype": "Q9", "shape": [],
                                              "data_offsets": [0, 0]}}),
         "unknown dtype 'Q9'"),
    ],
)  # fmt: skip
def test_bad_files_are_named_errors(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=message) as info:
        schema_of(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads all")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "locked.pt"
    torch.save({"w": torch.zeros(1)}, path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        schema_of(path)


class Payload:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.target, "w"))


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="needs arbitrary code to unpickle") as info:
        schema_of(path)
    assert "weights_only=False" in str(info.value)
    assert not marker.exists()


def test_whole_pickled_module_and_bound_method(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), whole)
    with pytest.raises(CheckpointError, match="whole pickled module: save `model.state_dict"):
        schema_of(whole)
    bound = tmp_path / "bound.pt"
    torch.save(nn.Linear(2, 2).state_dict, bound)
    with pytest.raises(CheckpointError, match="bound method `model.state_dict`"):
        schema_of(bound)
    # asked for by name, a trusted file with a whole module is read
    assert [t.key for t in schema_of(whole, weights_only=False)] == ["weight", "bias"]


def test_a_file_holding_something_else(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a builtins.list"):
        schema_of(path)
    legacy_pickle = write_bytes(tmp_path, "p.pkl", pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match=str(legacy_pickle)):
        schema_of(legacy_pickle)
