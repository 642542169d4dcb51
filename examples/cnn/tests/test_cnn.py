"""Checkpoint regression tests for the CNN, with pytest-statedict.

The snapshots these tests check live in ``tests/__statedict__/``, one JSON file per
snapshot, committed with the code. After a deliberate change to the model or the
optimizer, accept the new layout with ``pytest --statedict-update`` and commit the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cnn_model import build, make_optimizer, train_step

from pytest_statedict import assert_checkpoint_loads, assert_state_dict_matches

RELEASES = Path(__file__).resolve().parent.parent / "releases"

# The configuration the v1 checkpoints were trained with.
V1_CONFIG = {"width": 6, "hidden": 120, "num_classes": 10}


def test_model_and_optimizer_layout() -> None:
    """Every key, shape, dtype and param group, checked against this test's snapshot."""
    model = build()
    assert_state_dict_matches(model, optimizer=make_optimizer(model))


@pytest.mark.parametrize("width", [4, 16])
def test_width_variants(statedict_snapshot, width: int) -> None:
    """Named snapshots, one folder per parametrize id: ``test_width_variants[4]/model.json``."""
    model = build(width=width)
    statedict_snapshot.assert_match(model.conv1, name="conv1")
    statedict_snapshot.assert_match(model, name="model")


def test_optimizer_state_after_one_step(statedict_snapshot) -> None:
    """After a step, SGD holds a momentum buffer per parameter: their layout is snapshotted."""
    model = build()
    optimizer = make_optimizer(model)
    train_step(model, optimizer)
    statedict_snapshot.assert_match(model, optimizer=optimizer, name="after_one_step")


@pytest.mark.statedict_roundtrip
def test_checkpoint_roundtrip(statedict_roundtrip) -> None:
    """Save on one device, load on another: every tensor and the optimizer state come back
    bit for bit, and training resumes exactly. One test per (save, load) device pair."""
    model = build().to(statedict_roundtrip.save_device)
    optimizer = make_optimizer(model)
    train_step(model, optimizer)
    statedict_roundtrip(model, optimizer)


def test_v1_checkpoints_still_load() -> None:
    """The refactor gate: today's model, built as v1 was, loads v1's layout strictly.

    ``releases/cnn-v1.json`` is the schema of the released v1 checkpoint (a few kB of JSON
    instead of the weights), written with ``statedict show --json cnn-v1.pt``.
    ``pytest --statedict-update`` never changes it.
    """
    assert_checkpoint_loads(build(**V1_CONFIG), RELEASES / "cnn-v1.json")
