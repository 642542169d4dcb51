"""torchao's quantized checkpoints through show, record, the snapshot check and the gate.

A small model is quantized by torchao itself (``quantize_`` with ``Int8WeightOnlyConfig``:
each Linear's weight becomes an ``Int8Tensor``, a tensor subclass) and its state_dict
saved with ``torch.save``, as torchao's docs do. torchao's own reload is the oracle: a
fresh quantized model's ``load_state_dict(torch.load(path, weights_only=True),
assign=True)``. The plugin must say "loads" exactly where that load succeeds, without
``factory=``, and name torchao when it is not installed.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

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


def statedict(*commands: list[str], blocked: bool = False) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each command line, run through the command's ``main``
    in one fresh process (torchao not imported by anything but the reader: its import is
    6 s of CPU, paid once), or with torchao blocked from importing, as on a machine
    without it."""
    block = "sys.modules['torchao'] = None\n" if blocked else ""
    code = (
        "import ast, contextlib, io, sys\n" + block + "from pytest_statedict.cli import main\n"
        "for args in ast.literal_eval(sys.argv[1]):\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        code = main(args)\n"
        "    print(repr((code, out.getvalue(), err.getvalue())))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, repr(commands)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return [ast.literal_eval(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def shown_and_recorded(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[tuple[int, str, str], tuple[int, str, str], Path]:
    """``statedict show`` and ``statedict record`` of the checkpoint, in one process; and
    the release folder."""
    releases = tmp_path_factory.mktemp("releases")
    show, record = statedict(
        ["show", str(checkpoint)],
        ["record", str(checkpoint), "--release", "v1", "--dir", str(releases)],
    )
    return show, record, releases


@row("show")
def test_show(
    row: tuple[str, str], shown_and_recorded: tuple[tuple[int, str, str], Any, Path]
) -> None:
    code, out, err = shown_and_recorded[0]
    assert code == 0, err
    rows = [line.split()[:3] for line in out.splitlines()[2:6]]
    assert rows == [
        ["embed.weight", "64x32", "float32"],
        ["embed.bias", "64", "float32"],
        ["head.weight", "8x64", "float32"],
        ["head.bias", "8", "float32"],
    ]


@row("needs torchao")
def test_missing_library(row: tuple[str, str], checkpoint: Path) -> None:
    ((code, _, err),) = statedict(["show", str(checkpoint)], blocked=True)
    assert code == 2
    assert "it holds tensors of torchao (torchao.quantization" in err
    assert "it needs torchao to be read (`pip install torchao`)" in err


@row("schema_of / snapshot check")
def test_schema(row: tuple[str, str], checkpoint: Path) -> None:
    schema = schema_of(checkpoint)
    assert [(t.key, t.shape) for t in schema] == [
        (k, tuple(v.shape)) for k, v in quantized().state_dict().items()
    ]
    assert_state_dict_matches(quantized(), schema)


@row("record + gate from the release")
def test_record(
    row: tuple[str, str], shown_and_recorded: tuple[Any, tuple[int, str, str], Path]
) -> None:
    code, _, err = shown_and_recorded[1]
    assert code == 0, err
    (snapshot,) = shown_and_recorded[2].glob("v1*")
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
