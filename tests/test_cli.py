"""The ``statedict`` command: show and diff, exit codes, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import schema_of
from pytest_statedict.cli import main


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def test_show_prints_an_aligned_table_with_totals(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(checkpoint)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "shape", "dtype", "kind", "elements"]
    assert set(out[1]) <= {"-", " "}
    row = next(line for line in out if line.startswith("0.weight"))
    assert row.split() == ["0.weight", "4x3", "float32", "tensor", "12"]
    header_kind = out[0].index("kind")
    assert all(line[header_kind - 2 : header_kind] == "  " for line in out[2:11])
    assert out[-3] == "9 keys, 9 tensors, 43 elements, 176 B"
    assert out[-2] == "read as: torch zip, without torch (no tensor data)"
    assert "saved on: cpu" in out[-1]


def test_show_json_is_a_snapshot(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--json", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert json.loads(text)["format"] == "pytest-statedict"
    assert text == schema_of(checkpoint).to_json()


def test_show_a_snapshot_with_optimizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Linear(2, 2)
    snap = tmp_path / "0.json"
    snap.write_text(schema_of(model, optimizer=torch.optim.SGD(model.parameters(), 0.1)).to_json())
    assert main(["show", str(snap)]) == 0
    out = capsys.readouterr().out
    assert "parameter" in out
    assert "optimizer: torch.optim.sgd.SGD, 1 param_group(s)" in out


def test_diff_exit_codes(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = tmp_path / "same.pt"
    same.write_bytes(checkpoint.read_bytes())
    assert main(["diff", str(checkpoint), str(same)]) == 0
    assert "no difference" in capsys.readouterr().out

    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(4, 3), "head.weight": torch.zeros(2, 4)}, other)
    assert main(["diff", str(checkpoint), str(other)]) == 1
    out = capsys.readouterr().out
    assert f"{other} differs from {checkpoint}:" in out
    assert "removed (" in out and "likely renamed" in out

    assert main(["diff", str(checkpoint), str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("statedict: checkpoint ") and "no such file" in err


def test_bad_input_exit_2_without_traceback(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    result = subprocess.run(
        [sys.executable, "-m", "pytest_statedict", "show", str(junk)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"checkpoint {junk}: not a checkpoint" in result.stderr


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("statedict")), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "show" in result.stdout and "diff" in result.stdout


def test_show_a_part_and_storage_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "two.tar"
    torch.save(
        {"a_state_dict": {"w": torch.zeros(1_000_000)[:4]}, "b_state_dict": {"v": torch.ones(2)}},
        path,
    )
    assert main(["show", str(path)]) == 2
    assert "choose one with part=" in capsys.readouterr().err
    assert main(["show", str(path), "--part", "a_state_dict"]) == 0
    out = capsys.readouterr().out
    assert "warning: w: a view of a 4,000,000-byte storage" in out


def test_diff_parts_of_a_checkpoint_holding_several_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The PyTorch tutorial's modelA/modelB file: each side may name its part."""
    a, b = nn.Linear(2, 3), nn.Linear(3, 1)
    multi = tmp_path / "multi.tar"
    torch.save({"modelA_state_dict": a.state_dict(), "modelB_state_dict": b.state_dict()}, multi)
    plain = tmp_path / "a.pt"
    torch.save(a.state_dict(), plain)
    assert main(["diff", str(multi), str(plain)]) == 2
    assert "statedict diff --expected-part/--actual-part modelA_state_dict" in (
        capsys.readouterr().err
    )
    assert main(["diff", str(multi), str(plain), "--expected-part", "modelA_state_dict"]) == 0
    assert main(["diff", str(plain), str(multi), "--actual-part", "modelB_state_dict"]) == 1


def test_show_tree_groups_keys_by_module_with_sums(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Module rows sum what they hold (tied storage once); a file says no roles."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4)))
    path = tmp_path / "model.pt"
    state = model.state_dict()
    state["1.1.bias"] = state["0.bias"]  # the same tensor twice: counted once
    torch.save(state, path)
    assert main(["show", "--tree", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["module", "/", "key", "shape", "dtype", "kind", "elements", "size"]
    rows = {line.strip().split()[0] + f"@{len(line) - len(line.lstrip())}": line.split()
            for line in out[2:] if line.strip()}  # fmt: skip
    assert rows["0@0"] == ["0", "module", "16", "64", "B"]
    assert rows["weight@2"][:5] == ["weight", "4x3", "float32", "tensor", "12"]
    # 1 = BatchNorm (4+4+4+4+1) + Linear weight 16, its bias tied to 0.bias
    assert rows["1@0"] == ["1", "module", "33", "136", "B"]
    assert rows["0@2"] == ["0", "module", "17", "72", "B"]
    assert rows["1@2"] == ["1", "module", "16", "64", "B"]
    assert rows["bias@4"][3:6] == ["tensor", "=", "0.bias"]
    total = next(line for line in out if line.startswith("total:"))
    assert total == "total: 49 elements in 9 tensors (9 keys), 200 B"
    assert "trainable / frozen / buffers: not recorded" in "\n".join(out)


def test_show_tree_of_a_snapshot_counts_trainable_frozen_and_buffers(tmp_path: Path) -> None:
    """Through the installed command, on a snapshot of a live model (which knows roles)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    snap = tmp_path / "model.json"
    snap.write_text(schema_of(model).to_json())
    done = subprocess.run([sys.executable, "-m", "pytest_statedict", "show", "--tree", str(snap)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "trainable: 18, frozen: 16, buffers: 9 elements" in lines
    assert any(line.split()[:5] == ["weight", "4x3", "float32", "parameter", "(frozen)"]
               for line in lines)  # fmt: skip
    assert any(line.split()[:4] == ["running_mean", "4", "float32", "buffer"] for line in lines)


def test_show_tree_in_a_users_test_run(pytester: pytest.Pytester) -> None:
    """A user's test calls the CLI on a checkpoint it saved: pytest passes, output checked."""
    pytester.makepyfile(
        """
        import torch
        from torch import nn
        from pytest_statedict.cli import main

        def test_tree(tmp_path, capsys):
            torch.save(nn.Linear(2, 3).state_dict(), tmp_path / "m.pt")
            assert main(["show", "--tree", str(tmp_path / "m.pt")]) == 0
            out = capsys.readouterr().out
            assert "total: 9 elements in 2 tensors (2 keys), 36 B" in out
            assert "not recorded" in out
        """
    )
    result = pytester.runpytest("-q")
    result.assert_outcomes(passed=1)
