"""Snapshots and checkpoint files written under one torch release, checked under another.

A snapshot committed under one torch must compare equal under every other supported one for
the same model and optimizer, and a file saved by one must read the same in another: that
is what a team upgrading torch relies on. Each torch that CI runs (``CI_RELEASES``: the
``oldest``, ``py`` and ``newest`` tox envs) has its artifacts committed in
``tests/cross_version/torch-<release>/``; every env reads all of them, and writes and reads
its own torch's afresh, so that no env waits for another to write (the envs run in
parallel) and a release whose artifacts are missing fails the run instead of shrinking it.
To add a release's artifacts, run this file under that torch: ``python
tests/test_cross_version.py`` writes ``tests/cross_version/torch-<its release>/``.

The rest pins the tables in :mod:`pytest_statedict.compare` that make this hold: against
the torch running (a default in the table is that torch's default), and against a
snapshot as an older torch wrote it (equal), or with a real change (still reported).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import (
    StateDictMismatch,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.cli import main as statedict_main
from pytest_statedict.compare import diff_schemas
from pytest_statedict.optimizer_diff import (
    ADDED_HYPERPARAMS,
    EMPTY_STATE_ENTRIES,
    RETYPED_STATE_ENTRIES,
)
from pytest_statedict.report import render_diff
from pytest_statedict.schema import Schema
from pytest_statedict.schema_entries import StateSpec

RELEASE = torch.__version__.split("+")[0]
COMMITTED = Path(__file__).parent / "cross_version"
# the torch of each tox env that runs this module: oldest, py, newest (tox.ini)
CI_RELEASES = ("2.3.1", "2.13.0", "2.14.1")


class Net(nn.Module):
    """The layers whose state_dict layout a torch release could change: norms, embedding,
    recurrent and attention weights, a non-default BatchNorm version."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.lstm = nn.LSTM(8, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 3)


def model() -> Net:
    torch.manual_seed(0)
    return Net()


def two_groups(params: list[nn.Parameter]) -> list[dict[str, object]]:
    """Weight decay on matrices only, as most training scripts set it up."""
    return [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "AdamW": lambda ps: torch.optim.AdamW(two_groups(ps), lr=1e-3),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "RAdam": lambda ps: torch.optim.RAdam(ps),
    "NAdam": lambda ps: torch.optim.NAdam(ps),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, momentum=0.5),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps),
    "Adamax": lambda ps: torch.optim.Adamax(ps),
    "Adadelta": lambda ps: torch.optim.Adadelta(ps),
    "ASGD": lambda ps: torch.optim.ASGD(ps),
    "Rprop": lambda ps: torch.optim.Rprop(ps),
    "LBFGS": lambda ps: torch.optim.LBFGS(ps, history_size=3, max_iter=2),
}


def trained(name: str) -> tuple[Net, torch.optim.Optimizer]:
    """The model and optimizer after one step, so that every state entry exists."""
    net = model()
    optimizer = OPTIMIZERS[name](list(net.parameters()))

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        # every parameter gets a gradient, without a forward pass whose kernels may differ
        value = sum((p * p).sum() for p in net.parameters())
        assert isinstance(value, torch.Tensor)
        value.backward()
        return value

    optimizer.step(loss)
    return net, optimizer


FILES = ("model.pt", "legacy.pt", "model.safetensors", "general.pt", "dcp")


def write(folder: Path) -> None:
    """This torch's snapshots (one per optimizer) and its files of the same model."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in OPTIMIZERS:
        net, optimizer = trained(name)
        text = schema_of(net, optimizer=optimizer).to_json()
        (folder / f"{name}.json").write_text(text, encoding="utf-8")
    net, optimizer = trained("AdamW")
    state = net.state_dict()
    (folder / "values.json").write_text(schema_of(net, values=True).to_json(), encoding="utf-8")
    torch.save(state, folder / "model.pt")
    torch.save(state, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(
        {"model": state, "optimizer": optimizer.state_dict(), "epoch": 3, "loss": 0.25},
        folder / "general.pt",
    )
    from safetensors.torch import save_file

    save_file(dict(state), str(folder / "model.safetensors"))
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(folder / "dcp"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Every CI release's committed artifacts, and this torch's written now."""
    fresh = tmp_path_factory.mktemp("cross-version") / f"torch-{RELEASE}"
    write(fresh)
    return [*sorted(COMMITTED.glob("torch-*")), fresh]


def test_every_release_ci_runs_has_committed_artifacts() -> None:
    committed = {p.name.removeprefix("torch-") for p in COMMITTED.glob("torch-*")}
    assert set(CI_RELEASES) <= committed, f"no artifacts of torch {set(CI_RELEASES) - committed}"
    for release in CI_RELEASES:
        folder = COMMITTED / f"torch-{release}"
        expected = {f"{name}.json" for name in OPTIMIZERS} | {"values.json", *FILES}
        assert expected <= {p.name for p in folder.iterdir()}, folder


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_snapshots_of_every_release_compare_equal(folders: list[Path], name: str) -> None:
    net, optimizer = trained(name)
    for folder in folders:
        assert_state_dict_matches(net, folder / f"{name}.json", optimizer=optimizer)


@pytest.mark.parametrize("file", FILES)
def test_files_of_every_release_read_the_same(
    folders: list[Path], file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    net = model()
    for folder in folders:
        path = folder / file
        part = {"general.pt": "model", "dcp": "model"}.get(file)
        assert_state_dict_matches(net, schema_of(path, part=part))
        if file != "dcp":  # a DCP folder gives its layout (metadata), not values; no gate
            # the exact bytes the writer's torch hashed, read back by this one
            written = Schema.from_json((folder / "values.json").read_text(encoding="utf-8"))
            diff = diff_schemas(written, schema_of(path, part=part, values=True))
            assert not diff, render_diff(diff, title=f"{path} read under torch {RELEASE}")
            assert_checkpoint_loads(net, path, part=part)
        assert statedict_main(["show", str(path), *(["--part", part] if part else [])]) == 0
        assert "lstm.weight_ih_l0" in capsys.readouterr().out


def test_general_checkpoint_reads_whole_under_either_weights_only_default(
    folders: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """torch 2.6 turned ``weights_only`` on by default; the plugin asks for it either way,
    and a general checkpoint's plain values (an int, a float) pass its allowlist."""
    for folder in folders:
        assert statedict_main(["show", "--json", str(folder / "general.pt")]) == 0
        extras = json.loads(capsys.readouterr().out)["extras"]
        assert extras == {"epoch": "int", "loss": "float"}


def json_schema(text: str) -> Schema:
    return Schema.from_json(text)


def optimizer_defaults(name: str) -> dict[str, object]:
    group = dict(trained(name)[1].state_dict()["param_groups"][0])
    del group["params"]
    return group


@pytest.mark.parametrize("name", sorted(ADDED_HYPERPARAMS))
def test_added_hyperparams_are_this_torchs_defaults(name: str) -> None:
    defaults = optimizer_defaults(name)
    for key, default in ADDED_HYPERPARAMS[name].items():
        if key in defaults:  # an older torch lacks it
            assert defaults[key] == default and type(defaults[key]) is type(default)


def with_hyperparam(text: str, key: str, value: object) -> str:
    """The snapshot with ``key`` set to ``value`` in every param_group, or left out (None)."""
    data = json.loads(text)
    for group in data["optimizer"]["param_groups"]:
        group.pop(key, None)
        if value is not None:
            group[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("cls", "key"), [(name, key) for name, keys in ADDED_HYPERPARAMS.items() for key in keys]
)
def test_a_hyperparameter_added_with_its_default_compares_equal(cls: str, key: str) -> None:
    net, optimizer = trained(cls)
    text = schema_of(net, optimizer=optimizer).to_json()
    default = ADDED_HYPERPARAMS[cls][key]
    older, newer = with_hyperparam(text, key, None), with_hyperparam(text, key, default)
    assert_state_dict_matches(net, json_schema(older), optimizer=optimizer)
    assert_state_dict_matches(json_schema(newer), json_schema(older))
    assert_state_dict_matches(json_schema(older), json_schema(newer))


@pytest.mark.parametrize(
    ("cls", "key"), [(name, key) for name, keys in ADDED_HYPERPARAMS.items() for key in keys]
)
def test_an_added_hyperparameter_off_its_default_is_still_reported(cls: str, key: str) -> None:
    net, optimizer = trained(cls)
    text = schema_of(net, optimizer=optimizer).to_json()
    off = not ADDED_HYPERPARAMS[cls][key]
    older, changed = with_hyperparam(text, key, None), with_hyperparam(text, key, off)
    for expected, actual in ((older, changed), (changed, older)):
        with pytest.raises(StateDictMismatch, match=key):
            assert_state_dict_matches(json_schema(actual), json_schema(expected))


def with_state_entry(text: str, entry: str, spec: dict[str, object]) -> str:
    """The snapshot with ``entry`` of every parameter's state recorded as ``spec``."""
    data = json.loads(text)
    params = [p for g in data["optimizer"]["param_groups"] for p in g["params"]]
    data["optimizer"]["state"] = [{"param": p, entry: spec} for p in params]
    return json.dumps(data)


def test_a_none_state_entry_of_an_older_torch_compares_equal() -> None:
    net, optimizer = trained("SGD")
    text = schema_of(net, optimizer=optimizer).to_json()
    for entry in EMPTY_STATE_ENTRIES["SGD"]:
        older = with_state_entry(text, entry, {"type": "NoneType"})
        assert_state_dict_matches(net, json_schema(older), optimizer=optimizer)


def test_a_none_state_entry_against_a_real_buffer_is_still_reported() -> None:
    net, optimizer = trained("SGD")
    text = schema_of(net, optimizer=optimizer).to_json()
    older = with_state_entry(text, "momentum_buffer", {"type": "NoneType"})
    net, momentum = trained("SGD-momentum")
    # the older torch's None entries are no state: one line says what today has
    with pytest.raises(StateDictMismatch, match=r"state saved for none, today for \d+ parameters "
                       r"\(momentum_buffer\)"):  # fmt: skip
        assert_state_dict_matches(net, json_schema(older), optimizer=momentum)


@pytest.mark.parametrize("name", sorted(RETYPED_STATE_ENTRIES))
def test_a_state_entry_an_older_torch_typed_otherwise_compares_equal(name: str) -> None:
    net, optimizer = trained(name)
    text = schema_of(net, optimizer=optimizer).to_json()
    for entry, (old_type, new) in RETYPED_STATE_ENTRIES[name].items():
        older = with_state_entry(text, entry, {"type": old_type})
        newer = with_state_entry(text, entry, {"shape": list(new.shape or ()), "dtype": new.dtype})
        assert_state_dict_matches(json_schema(newer), json_schema(older))
        assert_state_dict_matches(json_schema(older), json_schema(newer))
        changed = with_state_entry(text, entry, {"shape": [], "dtype": "float64"})
        with pytest.raises(StateDictMismatch, match=f"{entry} {new.dtype}\\[\\] -> float64"):
            assert_state_dict_matches(json_schema(changed), json_schema(older))


def test_retyped_state_entries_are_this_torchs_old_or_new_form() -> None:
    for name, entries in RETYPED_STATE_ENTRIES.items():
        net, optimizer = trained(name)
        state = schema_of(net, optimizer=optimizer).optimizer
        assert state is not None
        for entry, (old_type, new) in entries.items():
            assert {s.entries[entry] for s in state.state} <= {StateSpec(type=old_type), new}


if __name__ == "__main__":
    write(COMMITTED / f"torch-{RELEASE}")
