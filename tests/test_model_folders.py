"""Checkpoint folders: Hugging Face ``save_pretrained`` output, sharded indexes, DCP folders.

The folders are built by hand as the libraries write them (``config.json`` beside
``model.safetensors`` or ``pytorch_model.bin``, or beside shards and their
``*.index.json``), so these tests need neither transformers nor timm.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import match_lines
from safetensors.torch import save_file
from test_gate import V1, V2Renamed, V2WithLoadHook
from torch import nn

from pytest_statedict import (
    CheckpointError,
    StateDictMismatch,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.cli import main
from pytest_statedict.readers import safetensors_file


def _shards(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    keys = list(state)
    half = len(keys) // 2
    return [{k: state[k] for k in keys[:half]}, {k: state[k] for k in keys[half:]}]


def save_pretrained_like(model: nn.Module, folder: Path, fmt: str) -> Path:
    """``folder`` as ``save_pretrained`` leaves it, in one of four layouts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": type(model).__name__}))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, folder / "model.safetensors")
    elif fmt == "bin":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        stem, suffix = ("model", "safetensors") if fmt == "sharded-safetensors" else (
            "pytorch_model", "bin")  # fmt: skip
        weight_map = {}
        for i, shard in enumerate(_shards(state), 1):
            name = f"{stem}-{i:05d}-of-00002.{suffix}"
            if suffix == "safetensors":
                save_file(shard, folder / name)
            else:
                torch.save(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return folder


LAYOUTS = ("safetensors", "bin", "sharded-safetensors", "sharded-bin")


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_a_save_pretrained_folder_is_its_checkpoint(tmp_path: Path, fmt: str) -> None:
    folder = save_pretrained_like(V1(), tmp_path / "v1", fmt)
    schema = schema_of(folder)
    assert sorted(t.key for t in schema) == sorted(V1().state_dict())
    assert_state_dict_matches(V1(), folder)
    assert_checkpoint_loads(V1(), folder)
    assert_checkpoint_loads(V2Renamed(), folder, rename=[(r"^fc\.", "head.")])
    with pytest.raises(StateDictMismatch) as info:
        assert_checkpoint_loads(V2Renamed(), folder)
    message = str(info.value)
    checkpoint = next(p for p in folder.iterdir() if p.suffix != ".json" or "index" in p.name)
    assert f"checkpoint {checkpoint} does not load into V2Renamed" in message
    assert "fc.weight -> head.weight" in message


def test_a_folder_of_a_torch_file_keeps_its_module_versions(tmp_path: Path) -> None:
    """A version-1 ``pytorch_model.bin`` goes through the model's own conversion hook, and
    a version-2 one is not converted twice: ``_metadata`` reaches the load."""
    save_pretrained_like(V1(), tmp_path / "v1", "bin")
    assert_checkpoint_loads(V2WithLoadHook(), tmp_path / "v1")
    save_pretrained_like(V2WithLoadHook(), tmp_path / "v2", "bin")
    assert schema_of(tmp_path / "v2").versions == {"": 2, "norm": 2}
    assert_checkpoint_loads(V2WithLoadHook(), tmp_path / "v2")


@pytest.mark.parametrize("fmt", ["safetensors", "sharded-safetensors"])
def test_the_gate_reads_safetensors_headers_only(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No tensor data is read: the gate loads meta tensors built from the headers."""
    folder = save_pretrained_like(V1(), tmp_path / "v1", fmt)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the gate read tensor data")

    monkeypatch.setattr(safetensors_file, "load", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    assert_checkpoint_loads(V1(), folder)
    wider = V1()
    wider.fc = nn.Linear(8, 3)
    with pytest.raises(StateDictMismatch, match=r"fc.weight: checkpoint \[2, 8\], model \[3, 8\]"):
        assert_checkpoint_loads(wider, folder, strict=False)
    model = V1()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_checkpoint_loads(model, folder)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_dcp_folder_goes_through_the_gate(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(V1().state_dict(), checkpoint_id=tmp_path / "plain")
        dcp.save({"model": V1().state_dict(), "step": 7}, checkpoint_id=tmp_path / "general")
    assert_checkpoint_loads(V1(), tmp_path / "plain")
    assert_checkpoint_loads(V1(), tmp_path / "plain" / ".metadata")
    assert_checkpoint_loads(V1(), tmp_path / "general", part="model")
    assert_checkpoint_loads(V1(), tmp_path / "general")  # its model part, found by itself
    with pytest.raises(StateDictMismatch, match="fc.weight -> head.weight"):
        assert_checkpoint_loads(V2Renamed(), tmp_path / "plain")


def test_a_folder_holding_several_checkpoints_asks_which(tmp_path: Path) -> None:
    folder = save_pretrained_like(V1(), tmp_path / "hub", "safetensors")
    torch.save(V1().state_dict(), folder / "pytorch_model.bin")
    for call in (schema_of, lambda f: assert_checkpoint_loads(V1(), f)):
        with pytest.raises(CheckpointError) as info:
            call(folder)
        assert str(info.value) == (
            f"checkpoint {folder}: is a directory holding 2 checkpoints (model.safetensors, "
            f"pytorch_model.bin): name the one to read, e.g. {folder / 'model.safetensors'}"
        )
    assert_checkpoint_loads(V1(), folder / "pytorch_model.bin")
    assert_checkpoint_loads(V1(), folder / "model.safetensors")


def test_a_trainer_checkpoint_folder_is_read_whole(tmp_path: Path) -> None:
    """Beside the weights, a Trainer's checkpoint folder holds the optimizer state its resume
    loads: it is read with the model (tests/test_framework_folders.py), so a damaged one is
    an error naming it, never skipped."""
    folder = save_pretrained_like(V1(), tmp_path / "checkpoint-500", "safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (folder / name).write_bytes(b"not read")
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="optimizer.pt: not a checkpoint"):
        assert_checkpoint_loads(V1(), folder)


def test_a_plain_folder_of_one_torch_file(tmp_path: Path) -> None:
    torch.save({"model_state_dict": V1().state_dict(), "epoch": 3}, tmp_path / "last.ckpt")
    assert_checkpoint_loads(V1(), tmp_path)
    torch.save(V1().state_dict(), tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"holding 2 checkpoints \(best.pt, last.ckpt\)"):
        assert_checkpoint_loads(V1(), tmp_path)


@pytest.mark.parametrize(
    "fill",
    [
        lambda folder: None,
        lambda folder: (folder / "config.json").write_text("{}"),
        lambda folder: (folder / "model.safetensors").mkdir(),
    ],
    ids=["empty", "config-only", "a-folder-named-like-weights"],
)
def test_a_folder_without_a_checkpoint_is_a_named_error(
    tmp_path: Path, fill: Callable[[Path], object]
) -> None:
    fill(tmp_path)
    for call in (schema_of, lambda f: assert_checkpoint_loads(V1(), f)):
        with pytest.raises(CheckpointError) as info:
            call(tmp_path)
        assert str(info.value) == (
            f"checkpoint {tmp_path}: is a directory holding no checkpoint: no "
            "torch.distributed.checkpoint .metadata, no sharded index *.index.json and no "
            ".safetensors, .bin, .pt, .pth, .ckpt file"
        )


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "weights.json"])
def test_an_index_is_recognised_before_snapshots(tmp_path: Path, name: str) -> None:
    """By its name, or by its content (a ``weight_map``, no snapshot header) under any name."""
    save_pretrained_like(V1(), tmp_path, "sharded-safetensors")
    index = tmp_path / name
    if name != "model.safetensors.index.json":
        (tmp_path / "model.safetensors.index.json").rename(index)
    assert sorted(t.key for t in schema_of(index)) == sorted(V1().state_dict())
    assert_checkpoint_loads(V1(), index)
    assert main(["show", str(index)]) == 0
    snapshot = tmp_path / "v1.json"
    snapshot.write_text(schema_of(V1()).to_json())
    assert schema_of(snapshot) == schema_of(V1())


def test_show_and_diff_on_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = save_pretrained_like(V1(), tmp_path / "old", "safetensors")
    new = save_pretrained_like(V2Renamed(), tmp_path / "new", "sharded-bin")
    assert main(["show", str(old)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert next(line for line in table if line.startswith("encoder.weight")).split()[:3] == [
        "encoder.weight",
        "8x4",
        "float32",
    ]
    assert main(["diff", str(old), str(save_pretrained_like(V1(), tmp_path / "same", "bin"))]) == 0
    capsys.readouterr()
    assert main(["diff", str(old), str(new)]) == 1
    assert "fc.weight -> head.weight" in capsys.readouterr().out
    (old / "pytorch_model.bin").write_bytes(b"")
    assert main(["show", str(old)]) == 2
    assert "holding 2 checkpoints" in capsys.readouterr().err


def test_folders_through_pytest(pytester: pytest.Pytester) -> None:
    """What a user of save_pretrained writes: the folder itself goes to the gate."""
    pytester.makepyfile(
        test_release="""
        import json
        import torch
        from torch import nn
        from safetensors.torch import save_file
        from pytest_statedict import assert_checkpoint_loads, assert_state_dict_matches

        class Model(nn.Module):
            def __init__(self, head="fc"):
                super().__init__()
                self.encoder = nn.Linear(4, 8)
                setattr(self, head, nn.Linear(8, 2))

        def release(folder):
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
            save_file(Model().state_dict(), folder / "model.safetensors")
            return folder

        def test_release_loads(tmp_path):
            folder = release(tmp_path / "v1")
            assert_checkpoint_loads(Model(), folder)
            assert_state_dict_matches(Model(), folder)

        def test_refactor_breaks_release(tmp_path):
            assert_checkpoint_loads(Model(head="head"), release(tmp_path / "v1"))
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    match_lines(
        result,
        [
            "E   *StateDictMismatch: checkpoint */v1/model.safetensors does not load into Model "
            "with load_state_dict(strict=True):",
            "E  *fc.weight -> head.weight",
        ],
    )


def test_a_safetensors_header_length_that_starts_like_a_pickle(tmp_path: Path) -> None:
    """A header of 0x280 bytes starts the file with 0x80, a pickle's first byte (Qwen2's
    ``save_pretrained`` wrote one): it is read as safetensors, by name or by content."""
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    raw = header.encode().ljust(0x280)  # safetensors pads its header with spaces too
    for name in ("model.safetensors", "weights"):
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.0, 2.0))
        assert path.read_bytes()[:1] == b"\x80"
        assert [(t.key, t.shape) for t in schema_of(path)] == [("w", (2,))]
        assert schema_of(path, values=True).by_key()["w"].fingerprint is not None
    assert_checkpoint_loads(nn.ParameterDict({"w": nn.Parameter(torch.zeros(2))}), tmp_path)


def test_a_dcp_tensor_that_cannot_be_built_is_a_checkpoint_error(tmp_path: Path) -> None:
    """The gate builds meta tensors from the .metadata: one it cannot build names the folder
    as a checkpoint (not as a snapshot to regenerate)."""
    import pickle

    from torch.distributed.checkpoint import metadata as dcp

    huge = torch.Size([2**62, 2**62])
    entry = dcp.TensorStorageMetadata(dcp.TensorProperties(dtype=torch.float32), huge, [])
    (tmp_path / ".metadata").write_bytes(pickle.dumps(dcp.Metadata({"weight": entry})))
    with pytest.raises(CheckpointError) as info:
        assert_checkpoint_loads(nn.Linear(2, 2), tmp_path)
    assert str(info.value).startswith(
        f"checkpoint {tmp_path}: 'weight': no float32[{2**62}, {2**62}] tensor can be built"
    )
