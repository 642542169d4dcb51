"""assert_checkpoint_loads: the refactor gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import match_lines
from test_checkpoint_files import saved_as
from torch import nn

from pytest_statedict import (
    StateDictMismatch,
    UnsupportedObjectError,
    assert_checkpoint_loads,
    roundtrip,
    schema_of,
)


class V1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 2)


class V2Renamed(nn.Module):
    """fc became head: old checkpoints no longer load."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)


class V2WithLoadHook(V2Renamed):
    """The same rename made compatible: version 2 converts version-1 checkpoints on load."""

    _version = 2

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any
    ) -> None:
        if local_metadata.get("version", 1) < 2:
            for name in ("weight", "bias"):
                old = f"{prefix}fc.{name}"
                if old in state_dict:
                    state_dict[f"{prefix}head.{name}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@pytest.fixture
def v1_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "v1.pt"
    torch.save(V1().state_dict(), path)
    return path


@pytest.fixture
def v1_snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "v1.json"
    path.write_text(schema_of(V1()).to_json())
    return path


def test_unchanged_model_loads(v1_checkpoint: Path, v1_snapshot: Path) -> None:
    assert_checkpoint_loads(V1(), v1_checkpoint)
    assert_checkpoint_loads(V1(), v1_snapshot)


def test_rename_fails_with_keys_and_a_ready_rename(v1_checkpoint: Path) -> None:
    with pytest.raises(StateDictMismatch) as info:
        assert_checkpoint_loads(V2Renamed(), v1_checkpoint)
    message = str(info.value)
    assert f"checkpoint {v1_checkpoint} does not load into V2Renamed" in message
    assert "missing (in the model, not in the checkpoint) (2):" in message
    assert "unexpected (in the checkpoint, not in the model) (2):" in message
    assert "fc.weight -> head.weight" in message
    assert (
        "to load it as it is: rename=[(r'^fc\\.', 'head.')] (rename= maps the checkpoint's keys "
        "to today's)"
    ) in message
    assert "with strict=False it would load, silently dropping 2 checkpoint key(s)" in message
    # the suggestion works
    assert_checkpoint_loads(V2Renamed(), v1_checkpoint, rename=[(r"^fc\.", "head.")])
    assert_checkpoint_loads(
        V2Renamed(), v1_checkpoint, rename={"fc.weight": "head.weight", "fc.bias": "head.bias"}
    )
    assert_checkpoint_loads(V2Renamed(), v1_checkpoint, rename=lambda k: k.replace("fc", "head"))


def test_load_hook_counts_as_compatible(v1_checkpoint: Path, v1_snapshot: Path) -> None:
    assert_checkpoint_loads(V2WithLoadHook(), v1_checkpoint)
    assert_checkpoint_loads(V2WithLoadHook(), v1_snapshot)


def test_snapshot_carries_module_versions(tmp_path: Path) -> None:
    """A v2 snapshot must not be converted again: the recorded version says it is new."""
    v2_snapshot = tmp_path / "v2.json"
    v2_snapshot.write_text(schema_of(V2WithLoadHook()).to_json())
    assert '"versions": {"": 2, "norm": 2}' in v2_snapshot.read_text()
    assert_checkpoint_loads(V2WithLoadHook(), v2_snapshot)


def test_shape_mismatch_and_strict_false(tmp_path: Path) -> None:
    wide = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2))
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)
    narrow = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 2))
    for strict in (True, False):
        with pytest.raises(StateDictMismatch) as info:
            assert_checkpoint_loads(narrow, path, strict=strict)
        message = str(info.value)
        assert "shape mismatches (3):" in message
        assert "0.weight: checkpoint [16, 4], model [8, 4]" in message
    extra = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2), nn.Linear(2, 2))
    assert_checkpoint_loads(extra, path, strict=False)
    with pytest.raises(StateDictMismatch, match=r"missing .* \(2\)"):
        assert_checkpoint_loads(extra, path)


def test_wrapper_prefix_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ddp.pt"
    torch.save(nn.DataParallel(V1()).state_dict(), path)
    with pytest.raises(
        StateDictMismatch, match=r"prefix 'module\.' dropped .*rename=\[\(r'\^module"
    ):
        assert_checkpoint_loads(V1(), path)
    assert_checkpoint_loads(V1(), path, rename=[(r"^module\.", "")])


def test_wrapper_prefix_is_named_for_a_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "ddp.safetensors"
    save_file(nn.DataParallel(V1()).state_dict(), path)  # header sorted: not model order
    with pytest.raises(StateDictMismatch, match=r"prefix 'module\.' dropped"):
        assert_checkpoint_loads(V1(), path)
    assert_checkpoint_loads(V1(), path, rename=[(r"^module\.", "")])


def test_model_is_not_touched(v1_checkpoint: Path) -> None:
    model = V1()
    before = model.encoder.weight.clone()
    assert_checkpoint_loads(model, v1_checkpoint)
    assert torch.equal(model.encoder.weight, before)


def test_general_checkpoint_and_cuda_tagged_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    with saved_as("cuda:0"):
        torch.save({"epoch": 1, "model_state_dict": V1().state_dict()}, path)
    assert_checkpoint_loads(V1(), path)
    with pytest.raises(StateDictMismatch, match="the checkpoint was saved on cuda:0"):
        assert_checkpoint_loads(V2Renamed(), path)


def test_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch
        from torch import nn
        from pytest_statedict import assert_checkpoint_loads

        def test_gate(tmp_path):
            path = tmp_path / "old.pt"
            torch.save(nn.Linear(2, 3).state_dict(), path)
            assert_checkpoint_loads(nn.Linear(2, 4), path)
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        [
            "*does not load into Linear with load_state_dict(strict=True):",
            "*shape mismatches (2):",
            "*weight: checkpoint [3, 2], model [4, 2]",
        ],
    )


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda path: assert_checkpoint_loads(5, path), r"not a int$"),
        (
            lambda path: assert_checkpoint_loads(V1().state_dict(), path),
            "looks like a state_dict; pass the model",
        ),
        (lambda path: roundtrip(5), r"roundtrip\(\) needs the model .*not a int"),
        (lambda path: roundtrip(V1().state_dict()), "looks like a state_dict"),
        (lambda path: roundtrip(V1().state_dict), "the bound method model.state_dict"),
    ],
    ids=["gate-int", "gate-state_dict", "roundtrip-int", "roundtrip-state_dict", "bound-method"],
)
def test_a_model_is_asked_for_by_name(v1_checkpoint: Path, call: Any, expected: str) -> None:
    with pytest.raises(UnsupportedObjectError, match=expected):
        call(v1_checkpoint)


def test_a_shape_change_on_a_key_a_load_hook_renames_is_a_shape_mismatch(tmp_path: Path) -> None:
    """The hook renames ``classifier.*`` to ``head.*``, whose width also changed: the
    verdict counts the shape mismatches (the retry without them finds the old names, which
    the hook renames and which mismatch again), not "it raises: size mismatch"."""

    class Converting(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.head = nn.Linear(4, width)

        def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
            for name in ("weight", "bias"):
                if f"{prefix}classifier.{name}" in state_dict:
                    state_dict[f"{prefix}head.{name}"] = state_dict.pop(
                        f"{prefix}classifier.{name}"
                    )
            super()._load_from_state_dict(state_dict, prefix, *args)

    old = nn.Module()
    old.classifier = nn.Linear(4, 3)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(Converting(5), tmp_path / "old.pt")
    message = str(failure.value)
    assert "NO, through Converting's own load_state_dict (2 shape mismatches)" in message
    assert "head.weight: checkpoint [3, 4], model [5, 4]" in message
    assert "it raises" not in message


def test_a_suggestion_after_a_rename_the_caller_passed_says_to_add_to_it(tmp_path: Path) -> None:
    old = nn.Module()
    old.a, old.b = nn.Linear(2, 2), nn.Linear(3, 3)
    new = nn.Module()
    new.x, new.y = nn.Linear(2, 2), nn.Linear(3, 3)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(new, tmp_path / "old.pt", rename=[(r"^a\.", "x.")])
    assert (
        "to load it as it is: rename=[(r'^b\\.', 'y.')] (rename= maps the checkpoint's keys to "
        "today's; these come after the rename= you passed: add them to it)"
    ) in str(failure.value)
