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
from pytest_statedict.formats.reading import load_file


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
    obj, _ = load_file(path)
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


@pytest.mark.parametrize("values", [False, True])
def test_safetensors_order_is_not_a_difference(tmp_path: Path, values: bool) -> None:
    """safetensors sorts its header: the same model as .pt and .safetensors is no diff."""
    from safetensors.torch import save_file

    from pytest_statedict.compare import diff_schemas

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net.add_module("aa", nn.Linear(2, 2))  # sorts first, saved last
    torch.save(net.state_dict(), tmp_path / "model.pt")
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    from_st = schema_of(tmp_path / "model.safetensors", values=values)
    assert not from_st.ordered
    assert [t.key for t in from_st] != list(net.state_dict())
    assert not diff_schemas(schema_of(tmp_path / "model.pt", values=values), from_st)
    assert not diff_schemas(from_st, schema_of(net, values=values))
    reordered = nn.Sequential()
    for name in ("aa", "0", "1", "2"):
        reordered.add_module(name, getattr(net, name))
    assert diff_schemas(schema_of(net), schema_of(reordered)).moved  # between ordered sides


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


def test_safetensors_header_starting_like_a_pickle(tmp_path: Path) -> None:
    """A header 0x..80 bytes long starts the file with pickle's magic byte: still safetensors.

    One safetensors file in 32 does (headers are padded to 8 bytes); transformers'
    save_pretrained of a tiny OLMoE wrote one, which the gate handed to torch.load.
    """
    from safetensors.torch import save_file

    from pytest_statedict import assert_checkpoint_loads

    net = nn.Linear(3, 2)
    path = tmp_path / "model.safetensors"
    for pad in range(300):
        save_file(net.state_dict(), path, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 0x..80")
    assert [t.key for t in schema_of(path)] == ["bias", "weight"]
    assert_checkpoint_loads(net, path)
    renamed = tmp_path / "renamed.st"  # by content too, whatever its name
    renamed.write_bytes(path.read_bytes())
    assert [t.key for t in schema_of(renamed)] == ["bias", "weight"]


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
         "not a checkpoint: it starts with the bytes 68 65 6c 6c"),
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


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.pt"
    torch.save({"w": torch.zeros(1)}, path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads everything: make the check see what a user would
        monkeypatch.setattr(os, "access", lambda p, mode: False)
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


def test_several_models_in_one_file_are_addressed_by_part(tmp_path: Path) -> None:
    """The layout of the PyTorch "saving and loading" tutorial: modelA, modelB, optimizers."""
    a, b = nn.Linear(2, 3), nn.Linear(3, 4)
    path = tmp_path / "gan.tar"
    torch.save(
        {
            "modelA_state_dict": a.state_dict(),
            "modelB_state_dict": b.state_dict(),
            "optimizerA_state_dict": torch.optim.SGD(a.parameters(), lr=0.1).state_dict(),
        },
        path,
    )
    with pytest.raises(CheckpointError, match="several state_dicts .*part='modelA_state_dict'"):
        schema_of(path)
    assert schema_of(path, part="modelB_state_dict") == schema_of(b.state_dict())
    opt = schema_of(path, part="optimizerA_state_dict").optimizer
    assert opt is not None and opt.param_groups[0].hyperparams["lr"] == 0.1
    with pytest.raises(CheckpointError, match="no part 'modelC'.*'modelA_state_dict'"):
        schema_of(path, part="modelC")
    from pytest_statedict import assert_checkpoint_loads

    assert_checkpoint_loads(nn.Linear(3, 4), path, part="modelB_state_dict")


def test_lightning_style_checkpoint(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "epoch=3.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [],
        },
        path,
    )
    schema = schema_of(path)
    assert [t.key for t in schema] == ["model.weight", "model.bias"]
    assert schema.optimizer is not None
    assert schema.extras == {"epoch": "int", "global_step": "int", "lr_schedulers": "list"}
    assert schema_of(path, part="optimizer_states/0").optimizer == schema.optimizer


def test_sharded_huggingface_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"embed.weight": torch.zeros(8, 4)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file(
        {"head.weight": torch.zeros(8, 4), "head.bias": torch.zeros(8)},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {
        "embed.weight": "model-00001-of-00002.safetensors",
        "head.bias": "model-00002-of-00002.safetensors",
        "head.weight": "model-00002-of-00002.safetensors",
    }
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    schema = schema_of(index)
    assert {t.key: t.shape for t in schema} == {
        "embed.weight": (8, 4),
        "head.weight": (8, 4),
        "head.bias": (8,),
    }
    assert schema_of(tmp_path) == schema  # the folder holding the index
    weight_map["tail.weight"] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="its shard model-00003-of-00003.safetensors is"):
        schema_of(index)


def test_distributed_checkpoint_folder(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "step": 7}, checkpoint_id=tmp_path)
    schema = schema_of(tmp_path)  # the model part, found by itself; the rest are extras
    assert [t.key for t in schema] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert schema.extras == {"step": "int"}
    from_dcp = schema_of(tmp_path, part="model")
    assert [(t.key, t.shape, t.dtype) for t in from_dcp] == [
        (t.key, t.shape, t.dtype) for t in schema_of(model.state_dict())
    ]
    assert schema_of(tmp_path / ".metadata") == schema  # its index file names the folder too


def test_malicious_dcp_metadata_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(
        CheckpointError, match="cannot be read safely .*open is not allowed in DCP metadata"
    ):
        schema_of(tmp_path)
    assert not marker.exists()


def test_small_view_of_a_big_storage_is_warned(tmp_path: Path) -> None:
    big = torch.zeros(1_000_000)
    state = {"w": big[:10]}
    note = "w: a view of a 4,000,000-byte storage; torch.save writes all of it (3,999,960 bytes"
    assert schema_of(state).notes[0].startswith(note)
    path = tmp_path / "wasteful.pt"
    torch.save(state, path)
    assert path.stat().st_size > 4_000_000
    assert schema_of(path).notes[0].startswith(note)
    assert not schema_of({"w": big[:10].clone()}).notes


def test_safetensors_roundtrip_reads_its_optimizer_file_through_the_readers() -> None:
    """The optimizer goes to an extra torch.save file beside the .safetensors one."""
    from pytest_statedict import roundtrip

    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    result = roundtrip(net, optimizer, format="safetensors")
    assert result.ok, result.mismatches
