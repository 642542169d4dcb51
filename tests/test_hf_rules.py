"""The gate's ``rules=`` without transformers: torch's rules for a plain module.

Whether the gate agrees with transformers' ``from_pretrained`` is proven against the real
library in ``conformance/test_hf_rules.py`` (the ``models`` env); here, what every user
sees: a bad ``rules`` value and ``rules="transformers"`` on a model transformers does not
load are named errors, and ``rules="torch"`` is the strict load it always was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import StateDictMismatch, assert_checkpoint_loads


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "net.pt"
    torch.save(nn.Linear(2, 3).state_dict(), path)
    return path


def test_an_unknown_rules_value_is_named(saved: Path) -> None:
    with pytest.raises(ValueError, match=r"rules='hf'\): rules must be one of 'auto', 'torch', "):
        assert_checkpoint_loads(nn.Linear(2, 3), saved, rules="hf")


def test_transformers_rules_need_a_transformers_model(saved: Path) -> None:
    with pytest.raises(ValueError, match="Linear is not a transformers PreTrainedModel"):
        assert_checkpoint_loads(nn.Linear(2, 3), saved, rules="transformers")


@pytest.mark.parametrize("rules", ["auto", "torch"])
def test_a_plain_module_is_judged_by_load_state_dict(saved: Path, rules: str) -> None:
    assert_checkpoint_loads(nn.Linear(2, 3), saved, rules=rules)
    with pytest.raises(StateDictMismatch, match=r"with load_state_dict\(strict=True\):"):
        assert_checkpoint_loads(nn.Linear(2, 4), saved, rules=rules)
