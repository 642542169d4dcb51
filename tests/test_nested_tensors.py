"""Nested tensors (``torch.nested``): a strided nested tensor has no sizes (asking raises
``NestedTensorImpl doesn't support sizes``), so its entry records its component count as
its shape and ``nested`` as its layout, in a file, a state_dict and a live module alike."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import Schema, StateDictMismatch, assert_state_dict_matches, schema_of
from pytest_statedict.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


def nested(*lengths: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.arange(n, dtype=torch.float32) for n in lengths])


def test_a_file_is_shown_with_its_nested_tensor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"nt": nested(2, 3), "w": torch.zeros(1)}, path)
    code = main(["show", str(path)])
    shown = capsys.readouterr()
    assert code == 0, shown.err
    assert shown.out.startswith("name") and "\nnt " in shown.out


def test_a_module_buffer_and_a_state_dict_read_alike() -> None:
    module = nn.Module()
    module.register_buffer("nt", nested(2, 3))
    (entry,) = schema_of(module).tensors
    assert (entry.key, entry.kind, entry.shape, entry.layout) == ("nt", "buffer", (2,), "nested")
    (entry,) = schema_of({"nt": nested(2, 3)}).tensors
    assert (entry.kind, entry.shape, entry.layout) == ("tensor", (2,), "nested")


def test_values_tell_components_apart_and_survive_a_snapshot() -> None:
    recorded = schema_of({"nt": nested(2, 3)}, values=True)
    again = Schema.from_json(recorded.to_json())
    assert again == recorded
    assert_state_dict_matches({"nt": nested(2, 3)}, again, values=True)
    with pytest.raises(StateDictMismatch, match="nt: values"):
        assert_state_dict_matches({"nt": nested(3, 2)}, again, values=True)
