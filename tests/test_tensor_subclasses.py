"""Tensor subclasses in checkpoints, as torchao's quantized weights are.

:class:`ScaledInt8` is a tiny stand-in for torchao's ``Int8Tensor``: a wrapper subclass
(``__tensor_flatten__``/``__tensor_unflatten__``) that implements almost no operator, so
``torch.empty_like`` fails on it and ``torch.load`` rebuilds it only through
``_rebuild_wrapper_subclass`` (which refuses a callable ``map_location``). The library
case writes it as a package named ``torchao``: importing it puts its class on torch's
allowlist, as torchao does.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pytest_statedict import assert_checkpoint_loads, schema_of
from pytest_statedict.cli import main
from pytest_statedict.errors import CheckpointError, StateDictMismatch

SUBCLASS = textwrap.dedent(
    '''
    import torch


    class ScaledInt8(torch.Tensor):
        """int8 data and a per-row scale, seen as a float32 tensor."""

        @staticmethod
        def __new__(cls, qdata, scale):
            return torch.Tensor._make_wrapper_subclass(
                cls, qdata.shape, dtype=torch.float32, device=qdata.device
            )

        def __init__(self, qdata, scale):
            self.qdata = qdata
            self.scale = scale

        def __tensor_flatten__(self):
            return ["qdata", "scale"], None

        @staticmethod
        def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
            return ScaledInt8(inner["qdata"], inner["scale"])

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.detach.default:
                (self,) = args
                return ScaledInt8(self.qdata.detach(), self.scale.detach())
            raise NotImplementedError(f"ScaledInt8 does not implement {func}")


    def quantize(linear):
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        qdata = (weight / scale).round().to(torch.int8)
        linear.weight = torch.nn.Parameter(ScaledInt8(qdata, scale), requires_grad=False)
        return linear
    '''
)

namespace: dict[str, Any] = {"__name__": __name__}
exec(SUBCLASS, namespace)  # the class, importable from this module by its qualified name
ScaledInt8 = namespace["ScaledInt8"]
ScaledInt8.__module__ = __name__
quantize = namespace["quantize"]


def quantized(head: str = "head") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", quantize(nn.Linear(6, 4)))
    model.add_module(head, nn.Linear(4, 2))
    return model


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "quantized.pt"
    torch.save(quantized().state_dict(), path)
    return path


@pytest.fixture
def allowlisted() -> Any:
    with torch.serialization.safe_globals([ScaledInt8]):
        yield


def test_a_subclass_checkpoint_reads_once_its_class_is_allowed(
    checkpoint: Path, allowlisted: None
) -> None:
    schema = schema_of(checkpoint)
    assert [(t.key, t.shape, t.dtype) for t in schema] == [
        ("body.weight", (4, 6), "float32"),
        ("body.bias", (4,), "float32"),
        ("head.weight", (2, 4), "float32"),
        ("head.bias", (2,), "float32"),
    ]
    assert schema.saved_on == ("cpu",)  # recorded through a map_location torch accepts


def test_the_gate_copies_a_model_with_subclass_parameters(
    checkpoint: Path, allowlisted: None
) -> None:
    """No ``factory=``: the model's meta copy stands a plain meta tensor for the subclass
    that cannot make one of itself."""
    with pytest.raises(NotImplementedError):
        torch.empty_like(quantized().body.weight, device="meta")
    assert_checkpoint_loads(quantized(), checkpoint)
    with pytest.raises(StateDictMismatch) as failed:
        assert_checkpoint_loads(quantized(head="classifier"), checkpoint)
    assert "rename=[(r'^head\\.', 'classifier.')]" in str(failed.value)
    assert "factory=" not in str(failed.value)


def test_an_unknown_subclass_is_refused_by_name(checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"arbitrary code to unpickle \(.*ScaledInt8"):
        schema_of(checkpoint)


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package named ``torchao`` holding the subclass, which allowlists it on import.

    Each step below runs as in a fresh process (see :func:`as_if_fresh`): the package is
    importable only inside :func:`installed`, and what importing it did is undone after.
    """
    package = tmp_path / "site" / "torchao"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        SUBCLASS + "\ntorch.serialization.add_safe_globals([ScaledInt8])\n", encoding="utf-8"
    )
    monkeypatch.delitem(sys.modules, "torchao", raising=False)
    allowed = torch.serialization.get_safe_globals()
    yield package.parent
    as_if_fresh(allowed)


def as_if_fresh(allowed: list[Any]) -> None:
    """Undo what importing the package did: its module, and its class on the allowlist."""
    sys.modules.pop("torchao", None)
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)


@contextmanager
def installed(site: Path) -> Iterator[None]:
    """The package importable, as where the library is installed; then a fresh process."""
    allowed = torch.serialization.get_safe_globals()
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        as_if_fresh(allowed)


def save_quantized(path: Path, site: Path) -> None:
    with installed(site):
        from torchao import quantize as library_quantize  # type: ignore[import-not-found]

        model = nn.Sequential(library_quantize(nn.Linear(6, 4)), nn.Linear(4, 2))
        torch.save(model.state_dict(), path)


def show(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["show", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_library_subclass_is_read_when_the_library_is_importable(
    tmp_path: Path, library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ao.pt"
    save_quantized(path, library)
    with installed(library):
        assert "torchao" not in sys.modules  # nothing imports torchao but the reader
        code, out, err = show(path, capsys)
        assert "torchao" in sys.modules
    assert code == 0, err
    assert out.splitlines()[2].split() == ["0.weight", "4x6", "float32", "tensor", "24"]
    with installed(library):
        from torchao import quantize as library_quantize

        model = nn.Sequential(library_quantize(nn.Linear(6, 4)), nn.Linear(4, 2))
        assert_checkpoint_loads(model, path)

    assert importlib.util.find_spec("torchao") is None  # the library is not installed here
    code, _, err = show(path, capsys)
    assert code == 2
    assert (
        "it holds tensors of torchao (torchao.ScaledInt8), which is not installed here: it "
        "needs torchao to be read (`pip install torchao`)"
    ) in err


class Payload:
    """Touches a file when unpickled: the pickle holds ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (pathlib.Path.touch, (str(self.marker),))


def test_a_library_is_named_without_running_the_pickle(
    tmp_path: Path, library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file is never unpickled to find its library: a payload beside it stays unrun."""
    path = tmp_path / "ao.pt"
    save_quantized(path, library)
    marker = tmp_path / "ran"
    with installed(library):
        state = torch.load(path, weights_only=False)
        state["payload"] = Payload(marker)
        torch.save(state, path)
    code, _, err = show(path, capsys)
    assert code == 2 and "needs torchao" in err
    with installed(library):
        code, _, err = show(path, capsys)
    assert code == 2 and "arbitrary code to unpickle" in err
    assert not marker.exists()
