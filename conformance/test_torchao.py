"""torchao's quantized checkpoints through show, record, the snapshot check and the gate.

A small model is quantized by torchao itself (``quantize_`` with ``Int8WeightOnlyConfig``:
each Linear's weight becomes an ``Int8Tensor``, a tensor subclass) and its state_dict
saved with ``torch.save``, as torchao's docs do. torchao's own reload is the oracle: a
fresh quantized model's ``load_state_dict(torch.load(path, weights_only=True),
assign=True)``. The plugin must say "loads" exactly where that load succeeds, without
``factory=``, and name torchao when it is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torchao = pytest.importorskip("torchao", reason="torchao is not installed (the `models` env has)")
quantization = pytest.importorskip("torchao.quantization")

from torch import nn  # noqa: E402

from pytest_statedict import (  # noqa: E402
    Schema,
    StateDictMismatch,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)

ARCHITECTURE = f"torchao {torchao.__version__} int8 weight-only"


def row(operation: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("row", [pytest.param((ARCHITECTURE, operation), id=operation)])


def quantized(head: str = "head") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(32, 64))
    model.add_module("act", nn.ReLU())
    model.add_module(head, nn.Linear(64, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's notes on kernels this CPU lacks
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    return model


def torchao_loads(model: nn.Module, path: Path) -> bool:
    """torchao's own reload: the oracle."""
    try:
        model.load_state_dict(torch.load(path, weights_only=True), assign=True)
    except (RuntimeError, KeyError):
        return False
    return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchao") / "quantized.pt"
    model = quantized()
    assert type(model.embed.weight).__name__ == "Int8Tensor"
    torch.save(model.state_dict(), path)
    return path


def statedict(*args: str, blocked: bool = False) -> subprocess.CompletedProcess[str]:
    """The command line in a fresh process (torchao not imported by anything but the
    reader), or with torchao blocked from importing, as on a machine without it."""
    block = "import sys; sys.modules['torchao'] = None\n" if blocked else ""
    code = f"{block}from pytest_statedict.cli import main; raise SystemExit(main({list(args)!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )


@row("show")
def test_show(row: tuple[str, str], checkpoint: Path) -> None:
    done = statedict("show", str(checkpoint))
    assert done.returncode == 0, done.stderr
    rows = [line.split()[:3] for line in done.stdout.splitlines()[2:6]]
    assert rows == [
        ["embed.weight", "64x32", "float32"],
        ["embed.bias", "64", "float32"],
        ["head.weight", "8x64", "float32"],
        ["head.bias", "8", "float32"],
    ]


@row("needs torchao")
def test_missing_library(row: tuple[str, str], checkpoint: Path) -> None:
    done = statedict("show", str(checkpoint), blocked=True)
    assert done.returncode == 2
    assert "it holds tensors of torchao (torchao.quantization" in done.stderr
    assert "it needs torchao to be read (`pip install torchao`)" in done.stderr


@row("schema_of / snapshot check")
def test_schema(row: tuple[str, str], checkpoint: Path) -> None:
    schema = schema_of(checkpoint)
    assert [(t.key, t.shape) for t in schema] == [
        (k, tuple(v.shape)) for k, v in quantized().state_dict().items()
    ]
    assert_state_dict_matches(quantized(), schema)


@row("record + gate from the release")
def test_record(row: tuple[str, str], checkpoint: Path, tmp_path: Path) -> None:
    done = statedict(
        "record", str(checkpoint), "--release", "v1", "--dir", str(tmp_path / "releases")
    )
    assert done.returncode == 0, done.stderr
    (snapshot,) = (tmp_path / "releases").glob("v1*")
    assert len(Schema.from_json(snapshot.read_text(encoding="utf-8"))) == 4
    assert_checkpoint_loads(quantized(), snapshot)
    with pytest.raises(StateDictMismatch, match=r"head\.weight -> classifier\.weight"):
        assert_checkpoint_loads(quantized(head="classifier"), snapshot)


@row("gate unchanged")
def test_gate_unchanged(row: tuple[str, str], checkpoint: Path) -> None:
    assert torchao_loads(quantized(), checkpoint)
    assert_checkpoint_loads(quantized(), checkpoint)  # no factory=


@row("gate after rename")
def test_gate_after_rename(row: tuple[str, str], checkpoint: Path) -> None:
    assert not torchao_loads(quantized(head="classifier"), checkpoint)
    with pytest.raises(StateDictMismatch) as failed:
        assert_checkpoint_loads(quantized(head="classifier"), checkpoint)
    assert "rename=[(r'^head\\.', 'classifier.')]" in str(failed.value)
    assert "factory=" not in str(failed.value)
    assert_checkpoint_loads(
        quantized(head="classifier"), checkpoint, rename=[(r"^head\.", "classifier.")]
    )
