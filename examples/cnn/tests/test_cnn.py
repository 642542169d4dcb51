"""Checkpoint regression tests for the CNN, with pytest-statedict.

The snapshots these tests check live in ``tests/__statedict__/``, one JSON file per
snapshot, committed with the code. After a deliberate change to the model or the
optimizer, accept the new layout with ``pytest --statedict-update`` and commit the diff.
"""

from __future__ import annotations

import pytest
import torch
from cnn_model import Net, build, make_optimizer, train_step

from pytest_statedict import assert_state_dict_matches, statedict_releases

# How each release's checkpoints were configured (releases not listed: the defaults).
RELEASE_CONFIGS = {"cnn-v1": {"width": 6, "hidden": 120, "num_classes": 10}}


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


def build_as_released(release: str) -> Net:
    """Today's model, configured as ``release`` was, on the meta device (no memory)."""
    with torch.device("meta"):
        return build(**RELEASE_CONFIGS.get(release, {}))


# The release gate: one test per release snapshot in releases/ (pytest.ini's
# statedict_releases_dir), newest first: today's model must still load each release's
# layout through its own load_state_dict, and today's optimizer its optimizer state. A
# release snapshot is a few kB of JSON written at release time with `statedict record
# CKPT --release NAME --model cnn_model:model_and_optimizer`; `pytest --statedict-update`
# never changes it.
test_releases = statedict_releases(build_as_released, optimizer=make_optimizer)
