"""DCP checkpoints holding a model and its optimizer, as the DCP tutorial writes them.

``dcp.save({"model": model_sd, "optim": optim_sd})`` with ``get_state_dict(model,
optimizer)`` (the optimizer's state keyed by parameter name), or with a plain
``optimizer.state_dict()`` (keyed by index): the model part is found by itself, the
optimizer is an optimizer (named where it was saved by name), other entries are extras.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pytest_statedict import assert_checkpoint_loads, schema_of
from pytest_statedict.errors import CheckpointError, StateDictMismatch, StateDictWarning


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def trained() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    model = make_model()
    optimizer = make_optimizer(model)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def dcp_save(state: dict[str, Any], folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=folder)
    return folder


@pytest.fixture
def tutorial(tmp_path: Path) -> Path:
    """The DCP tutorial's checkpoint: get_state_dict's model and FQN-keyed optimizer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(*trained())
    return dcp_save({"model": model_sd, "optim": optim_sd, "epoch": 3}, tmp_path / "tutorial")


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A model and ``optimizer.state_dict()`` (state keyed by index) saved with DCP."""
    model, optimizer = trained()
    state = {"model_state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    return dcp_save(state, tmp_path / "plain")


def model_keys() -> list[tuple[str, tuple[int, ...], str | None]]:
    return [(t.key, t.shape, t.dtype) for t in schema_of(make_model().state_dict())]


def test_show_lists_the_model_and_the_optimizer_apart(tutorial: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_statedict", "show", str(tutorial)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split()[0] for line in done.stdout.splitlines()[2:6]]
    assert rows == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "optim" not in done.stdout.split("framework:")[0]  # no optimizer key as a model key
    assert "4 keys, 4 tensors, 58 elements" in done.stdout
    assert "framework: torch.distributed.checkpoint" in done.stdout
    assert "optimizer: class unknown (a bare state_dict), 1 param_group(s), state for 4 " in (
        done.stdout
    )
    assert '  group 0: 4 params {"amsgrad": false, "betas": [0.9, 0.999]' in done.stdout
    assert "other entries:\n  epoch: int" in done.stdout


def test_schema_of_the_tutorial_checkpoint(tutorial: Path) -> None:
    schema = schema_of(tutorial)
    assert [(t.key, t.shape, t.dtype) for t in schema] == model_keys()
    assert schema.extras == {"epoch": "int"}
    assert schema.optimizer is not None
    (group,) = schema.optimizer.param_groups
    assert group.params == ("0.weight", "0.bias", "2.weight", "2.bias")  # by name
    assert group.hyperparams["lr"] == 1e-3
    assert group.hyperparams["betas"] == [0.9, 0.999]
    state = {s.param: s.entries for s in schema.optimizer.state}
    assert state["2.weight"]["exp_avg"].shape == (2, 8)
    assert state["2.weight"]["step"].shape == ()
    assert schema_of(tutorial, part="model").tensors == schema.tensors
    only = schema_of(tutorial, part="optim")
    assert len(only) == 0 and only.optimizer == schema.optimizer
    # the same as a torch.save of the same dict, read through torch
    model, optimizer = trained()
    live = schema_of(model, optimizer=optimizer).optimizer
    assert live is not None
    assert [s.entries for s in schema.optimizer.state] == [s.entries for s in live.state]


def test_schema_of_a_plain_optimizer_state_dict(plain: Path) -> None:
    schema = schema_of(plain)
    assert [(t.key, t.shape, t.dtype) for t in schema] == model_keys()
    assert schema.optimizer is not None
    assert schema.optimizer.param_groups[0].params == (0, 1, 2, 3)  # by position
    assert [s.param for s in schema.optimizer.state] == [0, 1, 2, 3]
    assert not schema.optimizer.problems  # DCP's string keys are read as the indices they were


def test_an_optimizer_that_took_no_step_is_still_an_optimizer(tmp_path: Path) -> None:
    """It has no state, so DCP writes no ``optimizer.state`` key at all (get_state_dict
    would make a state: it initialises the optimizer's)."""
    model = make_model()
    state = {"model": model.state_dict(), "optimizer": make_optimizer(model).state_dict()}
    schema = schema_of(dcp_save(state, tmp_path / "fresh"))
    assert schema.optimizer is not None and schema.optimizer.state == ()
    assert len(schema.optimizer.param_groups[0].params) == 4


def test_the_gate_passes_unchanged_with_its_optimizer(tutorial: Path, plain: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", StateDictWarning)  # judged by name: nothing to warn
        assert_checkpoint_loads(make_model(), tutorial, optimizer=make_optimizer)
    with pytest.warns(StateDictWarning, match="by position"):
        assert_checkpoint_loads(make_model(), plain, optimizer=make_optimizer)


class Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)


def test_the_gate_names_a_rename(tutorial: Path) -> None:
    with pytest.raises(StateDictMismatch) as failed:
        assert_checkpoint_loads(Renamed(), tutorial)
    text = str(failed.value)
    assert "(4 unexpected keys, 4 missing keys)" in text
    assert "2.weight -> head.weight" in text
    assert_checkpoint_loads(Renamed(), tutorial, rename=[(r"^0\.", "body.0."), (r"^2\.", "head.")])


def test_the_gate_judges_a_regrouped_optimizer(tutorial: Path) -> None:
    def regrouped(model: nn.Module) -> torch.optim.Optimizer:
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return torch.optim.Adam([{"params": weights}, {"params": biases, "lr": 0.0}], lr=1e-3)

    with pytest.raises(StateDictMismatch, match=r"raises ValueError \(1 param_groups saved, 2 now"):
        assert_checkpoint_loads(make_model(), tutorial, optimizer=regrouped)


def test_the_gate_judges_a_dcp_optimizer_by_name(tmp_path: Path) -> None:
    """Two groups of two parameters each, regrouped with the same sizes: torch loads it,
    and hands the saved state over by position, to other parameters; only the names say."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def grouped(model: nn.Module, first: tuple[str, ...]) -> torch.optim.Optimizer:
        named = dict(model.named_parameters())
        rest = [p for n, p in named.items() if n not in first]
        return torch.optim.SGD([{"params": [named[n] for n in first]}, {"params": rest}], lr=0.1)

    model = make_model()
    saved = grouped(model, ("0.weight", "0.bias"))
    model_sd, optim_sd = get_state_dict(model, saved)
    folder = dcp_save({"model": model_sd, "optim": optim_sd}, tmp_path / "grouped")
    assert_checkpoint_loads(
        make_model(), folder, optimizer=lambda m: grouped(m, ("0.weight", "0.bias"))
    )
    with pytest.raises(StateDictMismatch, match="would get another one's state"):
        assert_checkpoint_loads(
            make_model(), folder, optimizer=lambda m: grouped(m, ("0.weight", "2.bias"))
        )


def test_several_model_parts_name_part(tmp_path: Path) -> None:
    folder = dcp_save(
        {"generator": make_model().state_dict(), "critic": make_model().state_dict()},
        tmp_path / "gan",
    )
    with pytest.raises(CheckpointError, match=r"several state_dicts .*part='generator'"):
        assert_checkpoint_loads(make_model(), folder)
    assert_checkpoint_loads(make_model(), folder, part="critic")
    with pytest.raises(CheckpointError, match=r"no part 'actor' \('actor' not found: its keys"):
        schema_of(folder, part="actor")


def test_a_pickled_entry_is_described_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (Path.touch, (str(marker),))

    folder = dcp_save({"model": make_model().state_dict(), "hook": Payload()}, tmp_path / "h")
    schema = schema_of(folder)
    assert schema.extras == {"hook": "bytes"}  # not unpickled: its raw bytes
    done = subprocess.run(
        [sys.executable, "-m", "pytest_statedict", "show", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "other entries:\n  hook: bytes" in done.stdout
    assert not marker.exists()


def test_the_gate_through_pytest(pytester: pytest.Pytester, tutorial: Path) -> None:
    pytester.makepyfile(
        f"""
        import torch
        from torch import nn
        from pytest_statedict import assert_checkpoint_loads

        CHECKPOINT = {str(tutorial)!r}

        def make():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def adam(model):
            return torch.optim.Adam(model.parameters(), lr=1e-3)

        def test_unchanged():
            assert_checkpoint_loads(make(), CHECKPOINT, optimizer=adam)

        def test_renamed_head():
            model = nn.Sequential()
            model.add_module("0", nn.Linear(4, 8))
            model.add_module("1", nn.ReLU())
            model.add_module("head", nn.Linear(8, 2))
            assert_checkpoint_loads(model, CHECKPOINT, optimizer=adam)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*does not load into Sequential with load_state_dict(strict=True):",
            "*2.weight -> head.weight",
            "*to load it as it is: rename=*'head.'*",
        ]
    )


def test_the_gate_reads_a_torch_save_checkpoint_as_schema_of_does(tmp_path: Path) -> None:
    """Its one state_dict, whatever its name, is the model's; several are named, with
    ``part=`` (the gate used to say it held no model state_dict at all)."""
    one = tmp_path / "one.pt"
    torch.save({"generator": make_model().state_dict(), "epoch": 3}, one)
    assert [t.key for t in schema_of(one)] == [k for k, _, _ in model_keys()]
    assert_checkpoint_loads(make_model(), one)
    several = tmp_path / "gan.pt"
    torch.save({"generator": make_model().state_dict(), "critic": nn.Linear(2, 1).state_dict()},
               several)  # fmt: skip
    with pytest.raises(
        CheckpointError,
        match=r"several state_dicts \(generator, critic\): name the model's with part='generator'",
    ):
        assert_checkpoint_loads(make_model(), several)
    assert_checkpoint_loads(make_model(), several, part="generator")


def test_a_layout_of_no_usual_part_lists_every_entry_as_stored(tmp_path: Path) -> None:
    """Neither a state_dict nor parts of usual names: each stored entry by its dotted key,
    a list-valued entry as one object (DCP stored it whole), as ``part=`` picks them."""
    state = {"w": torch.zeros(2), "run": {"cfg": [1, 2], "t": torch.ones(3), "deep": {"i": 3}}}
    folder = dcp_save(state, tmp_path / "odd")
    schema = schema_of(folder)
    assert [(t.key, t.kind, t.type) for t in schema] == [
        ("w", "tensor", None),
        ("run.cfg", "object", "list"),
        ("run.t", "tensor", None),
        ("run.deep.i", "object", "int"),
    ]
    assert [t.key for t in schema_of(folder, part="run")] == ["cfg", "t", "deep.i"]


def test_a_model_flattened_to_the_top_beside_its_optimizer(tmp_path: Path) -> None:
    """torchtitan's layout: the model's keys at the top, beside ``optimizer`` and the
    training state. The top's tensors are the model; the optimizer is one where it is
    saved as get_state_dict saves it, and said not to be checked where it is flattened."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model, optimizer = trained()
    top = {**get_model_state_dict(model), "train_state": {"step": 3}}
    named = dcp_save({**top, "optimizer": get_optimizer_state_dict(model, optimizer)},
                     tmp_path / "named")  # fmt: skip
    flat = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )
    flattened = dcp_save({**top, "optimizer": flat}, tmp_path / "flattened")
    for folder in (named, flattened):
        schema = schema_of(folder)
        assert [(t.key, t.shape, t.dtype) for t in schema] == model_keys()
        assert_checkpoint_loads(make_model(), folder)
    named_schema = schema_of(named)
    assert named_schema.extras == {"train_state": "dict"} and not named_schema.notes
    assert named_schema.optimizer is not None
    assert named_schema.optimizer.param_groups[0].params == (
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    )
    assert_checkpoint_loads(make_model(), named, optimizer=make_optimizer)
    flat_schema = schema_of(flattened)
    assert flat_schema.optimizer is None
    assert flat_schema.extras == {"train_state": "dict", "optimizer": "dict"}
    assert flat_schema.notes == (
        "'optimizer' holds an optimizer's state in get_optimizer_state_dict's flattened form "
        "(flatten_optimizer_state_dict=True): it is listed as an extra, not checked as an "
        "optimizer",
    )


def test_a_release_recorded_from_the_folder_guards_its_optimizer(
    pytester: pytest.Pytester, tutorial: Path
) -> None:
    """``statedict record`` on the DCP folder records the optimizer by name; the release
    gate passes today's optimizer and fails a regrouped one."""
    from pytest_statedict.cli import main

    pytester.makeini("[pytest]\nstatedict_releases_dir = releases\n")
    assert main(["record", str(tutorial), "--release", "v1", "--dir", "releases"]) == 0
    pytester.makepyfile(
        test_user_dcp_releases="""
        import torch
        from torch import nn
        from pytest_statedict import statedict_releases

        def build():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def adam(model):
            return torch.optim.Adam(model.parameters(), lr=1e-3)

        def regrouped(model):
            weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
            biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
            return torch.optim.Adam([{"params": weights}, {"params": biases}], lr=1e-3)

        test_today = statedict_releases(build, optimizer=adam)
        test_regrouped = statedict_releases(build, optimizer=regrouped)
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*1 param_groups saved, 2 now*"])


def test_an_optimizer_stored_through_a_storage_extension_is_said_unchecked(
    tutorial: Path,
) -> None:
    """Its param_groups stored compressed (a DCP storage extension): the model is read,
    the optimizer listed as an extra and said not to be checked, rather than guessed."""
    import dataclasses
    import pickle

    metadata = pickle.loads((tutorial / ".metadata").read_bytes())  # this test's own file
    metadata.storage_data = {
        index: dataclasses.replace(info, transform_descriptors=["zstd"])
        if index.fqn.startswith("optim.param_groups")
        else info
        for index, info in metadata.storage_data.items()
    }
    (tutorial / ".metadata").write_bytes(pickle.dumps(metadata))
    schema = schema_of(tutorial)
    assert [(t.key, t.shape, t.dtype) for t in schema] == model_keys()
    assert schema.optimizer is None
    assert schema.extras == {
        "optim": "pytest_statedict.formats.dcp_folder.UnreadOptimizer",
        "epoch": "int",
    }
    assert schema.notes == (
        "'optim' holds an optimizer whose param_groups are stored through a DCP storage "
        "extension (compressed), not read here: it is listed as an extra, not checked as an "
        "optimizer",
    )
