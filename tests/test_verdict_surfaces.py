"""What the one verdict added to the surfaces, as a user meets it.

A release recorded from a file can only be checked by position, and says so; recorded
with ``--model`` it is checked by name. The gate judges an optimizer (``optimizer=``),
takes a project's conversion (``convert=``) and ignored keys (``ignore=``). ``statedict diff
--model`` loads through today's model. Equal layouts still fail where the model's own load
refuses the file.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import match_lines
from torch import nn

from pytest_statedict import (
    StateDictError,
    StateDictMismatch,
    StateDictWarning,
    assert_checkpoint_loads,
    assert_state_dict_matches,
)
from pytest_statedict.cli import main

# Two blocks of one shape: registered the other way round, each one's optimizer state lands
# on the other (torch loads it by position) while keys and shapes all match.
MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, swapped=False):
            super().__init__()
            first, second = ("b", "a") if swapped else ("a", "b")
            setattr(self, first, nn.Linear(4, 4))
            setattr(self, second, nn.Linear(4, 4))


    def build():
        return Net(SWAPPED)


    def build_v1():
        return Net()


    def make_optimizer(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        return optimizer
    """
)

GATE = """
from model import build, make_optimizer
from pytest_statedict import statedict_releases

test_releases = statedict_releases(build, optimizer=make_optimizer)
"""


def _project(pytester: pytest.Pytester, *, swapped: bool) -> Path:
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(model=MODEL.replace("SWAPPED", str(swapped)))
    pytester.makepyfile(test_user_releases=GATE)
    pytester.syspathinsert()
    from model import build_v1, make_optimizer  # type: ignore[import-not-found]

    v1 = build_v1()
    del sys.modules["model"]  # the runs below import today's model.py afresh
    checkpoint = pytester.path / "v1.pt"
    torch.save(
        {
            "model_state_dict": v1.state_dict(),
            "optimizer_state_dict": make_optimizer(v1).state_dict(),
        },
        checkpoint,
    )
    return checkpoint


def test_a_release_recorded_from_a_file_says_it_checked_positions_only(
    pytester: pytest.Pytester,
) -> None:
    checkpoint = _project(pytester, swapped=True)
    assert main(["record", str(checkpoint), "--release", "v1"]) == 0
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, warnings=1)
    match_lines(
        result,
        [
            "*StateDictWarning: checkpoint release v1: an old optimizer state still loads with "
            "optimizer.load_state_dict: yes, by position: the state saved at 4 positions fits "
            "the shape of today's parameter there; which parameter each state was saved for "
            "cannot be checked: the saved state names no parameters",
        ],
    )


def test_a_release_recorded_with_its_model_is_checked_by_name(pytester: pytest.Pytester) -> None:
    checkpoint = _project(pytester, swapped=True)
    assert main(["record", str(checkpoint), "--release", "v1", "--model", "model:build_v1"]) == 0
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        [
            "*release v1's optimizer state: an old optimizer state still loads with "
            "optimizer.load_state_dict: yes, but it would not resume exactly: 4 parameters "
            "would get another one's state ('b.weight' <- state of 'a.weight', *",
        ],
    )
    # the same release against an unswapped model: by name, nothing to say
    (pytester.path / "model.py").write_text(MODEL.replace("SWAPPED", "False"))
    sys.modules.pop("model", None)  # imported by `statedict record --model`, in this process
    pytester.runpytest().assert_outcomes(passed=1)


def test_record_refuses_a_model_that_does_not_name_the_positions(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = _project(pytester, swapped=False)
    pytester.makepyfile(other="from torch import nn\ndef build():\n    return nn.Linear(4, 4)\n")
    assert main(["record", str(checkpoint), "--release", "v1", "--model", "other:build"]) == 2
    err = capsys.readouterr().err
    assert "has 4 parameters, and Linear has 2: its positions cannot be named" in err
    assert main(["record", str(checkpoint), "--release", "v1", "--model", "nowhere:build"]) == 2
    assert "--model 'nowhere:build': cannot be imported" in capsys.readouterr().err
    assert main(["diff", str(checkpoint), str(checkpoint), "--model", "model"]) == 2
    assert "expected MODULE:FUNCTION" in capsys.readouterr().err


class Versioned(nn.Module):
    """Refuses a checkpoint without module versions, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        if local_metadata.get("version") is None:
            raise ValueError("Versioned: a checkpoint without module versions is not supported")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )


def test_equal_layouts_fail_where_the_models_own_load_refuses(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = Versioned()
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    with pytest.raises(StateDictMismatch) as match:
        assert_state_dict_matches(model, str(path))
    with pytest.raises(StateDictMismatch) as gate:
        assert_checkpoint_loads(model, path)
    line = (
        "an old checkpoint still loads with load_state_dict(strict=True): NO, through "
        "Versioned's own load_state_dict (it raises: ValueError: Versioned: a checkpoint "
        "without module versions is not supported)"
    )
    assert line in str(match.value)
    assert line in str(gate.value)
    # a torch.save file keeps the versions: the same layout loads, and both pass
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert_state_dict_matches(model, str(tmp_path / "model.pt"))
    assert_checkpoint_loads(model, tmp_path / "model.pt")


def _general(tmp_path: Path, model: nn.Module, optimizer: object = None) -> Path:
    path = tmp_path / "checkpoint.pt"
    state: dict[str, object] = {"model_state_dict": model.state_dict()}
    if optimizer is not None:
        state["optimizer_state_dict"] = optimizer.state_dict()  # type: ignore[attr-defined]
    torch.save(state, path)
    return path


def test_the_gate_judges_the_optimizer_it_is_given(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    path = _general(tmp_path, model, optimizer)
    assert_checkpoint_loads(model, path, optimizer=optimizer)
    # a model whose first layer froze: its optimizer holds fewer parameters, torch raises
    model[0].requires_grad_(False)
    today = torch.optim.SGD(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    with pytest.raises(StateDictMismatch) as failed:
        assert_checkpoint_loads(model, path, optimizer=lambda m: today)
    text = str(failed.value)
    assert text.startswith(f"checkpoint {path} loads into Sequential, but its optimizer state")
    assert "an old checkpoint still loads with load_state_dict(strict=True): yes" in text
    assert (
        "an old optimizer state still loads with optimizer.load_state_dict: NO, it raises "
        "ValueError (param_group 0 has 4 parameters saved and 2 now)"
    ) in text
    # a checkpoint without optimizer state cannot be judged as having one
    bare = _general(tmp_path, model)
    with pytest.raises(StateDictMismatch, match="optimizer= was given, but .* holds no optimizer"):
        assert_checkpoint_loads(model, bare, optimizer=today)


def test_a_gate_by_position_passes_with_a_warning(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    path = _general(tmp_path, model, optimizer)
    with pytest.warns(StateDictWarning, match="yes, by position: the state saved at 4 positions"):
        assert_checkpoint_loads(model, path, optimizer=optimizer)


def test_the_gate_takes_a_projects_conversion_and_ignored_keys(tmp_path: Path) -> None:
    old = nn.Sequential(nn.Linear(3, 3))
    path = _general(tmp_path, old)
    today = nn.Sequential()
    today.add_module("proj", nn.Linear(3, 3))
    with pytest.raises(StateDictMismatch, match="2 unexpected keys, 2 missing keys"):
        assert_checkpoint_loads(today, path)

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace("0.", "proj.", 1): v for k, v in state.items()}

    assert_checkpoint_loads(today, path, convert=convert)
    seen = []

    def with_model(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        seen.append(type(model).__name__)
        return convert(state)

    assert_checkpoint_loads(today, path, convert=with_model)
    assert seen == ["Sequential"]
    today.register_buffer("scale", torch.ones(3))  # a new buffer the old file lacks
    with pytest.raises(StateDictMismatch, match="1 missing key"):
        assert_checkpoint_loads(today, path, convert=convert)
    assert_checkpoint_loads(today, path, convert=convert, ignore=["scale"])
    with pytest.raises(StateDictError, match="returned a list, not the state_dict"):
        assert_checkpoint_loads(today, path, convert=lambda state: list(state))


def test_statedict_diff_loads_through_todays_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "today.py").write_text(
        "from torch import nn\n"
        "from pytest_statedict_test_versioned import Versioned\n"
        "def build():\n    return Versioned()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        sys.modules,
        "pytest_statedict_test_versioned",
        type("M", (), {"Versioned": Versioned}),
    )
    monkeypatch.chdir(tmp_path)
    old = nn.Module()
    old.fc = nn.Linear(3, 2)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    torch.save(Versioned().state_dict(), tmp_path / "new.pt")
    assert main(["diff", "old.pt", "new.pt"]) == 1
    out = capsys.readouterr().out
    assert "NO (2 shape mismatches, decided from the layouts: no model to load into" in out
    assert main(["diff", "old.pt", "new.pt", "--model", "today:build"]) == 1
    out = capsys.readouterr().out
    assert (
        "an old checkpoint still loads with load_state_dict(strict=True): NO, through "
        "Versioned's own load_state_dict (2 shape mismatches)"
    ) in out


def test_what_an_adversarial_review_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An optimizer state keyed by strings restores nothing in torch; a conversion whose
    second parameter has a default is not handed the model; a --model that is no function,
    or raises, is the user's error; a model alone cannot name a multi-group optimizer."""
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"] = {str(k): v for k, v in saved["state"].items()}  # a trip through JSON
    path = tmp_path / "strings.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": saved}, path)
    with pytest.raises(StateDictMismatch, match="keyed by 2 str.* restores none of that state"):
        assert_checkpoint_loads(model, path, optimizer=optimizer)

    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)

    def drop(state: dict[str, torch.Tensor], drop_bias: bool = False) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not (drop_bias and k == "bias")}

    assert_checkpoint_loads(model, plain, convert=drop)

    (tmp_path / "mods.py").write_text(
        "import torch\nfrom torch import nn\nNOT_A_FUNCTION = 3\n"
        "def raises():\n    raise RuntimeError('boom')\n"
        "def model_only():\n    return nn.Linear(3, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["diff", str(plain), str(plain), "--model", "mods:NOT_A_FUNCTION"]) == 2
    assert "--model 'mods:NOT_A_FUNCTION': a int, not a function" in capsys.readouterr().err
    assert main(["diff", str(plain), str(plain), "--model", "mods:raises"]) == 2
    assert "calling it raised RuntimeError: boom" in capsys.readouterr().err
    groups = torch.optim.SGD([{"params": [model.bias]}, {"params": [model.weight]}], lr=0.1)
    two = tmp_path / "two_groups.pt"
    torch.save(
        {"model_state_dict": model.state_dict(), "optimizer_state_dict": groups.state_dict()}, two
    )
    code = main(
        ["record", str(two), "--release", "v1", "--dir", "rel", "--model", "mods:model_only"]
    )
    assert code == 2
    assert "has 2 param_groups, so it was not built as Optimizer(model.parameters())" in (
        capsys.readouterr().err
    )


def test_a_tied_parameter_is_named_by_its_first_name() -> None:
    from pytest_statedict import schema_of
    from pytest_statedict.param_names import positions_named

    model = nn.Module()
    model.enc = nn.Linear(3, 3, bias=False)
    model.dec = nn.Linear(3, 3, bias=False)
    model.dec.weight = model.enc.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    named = positions_named(
        schema_of({"optimizer": optimizer.state_dict(), "model": model.state_dict()}),
        model,
        optimizer,
    )
    assert named.optimizer is not None
    assert named.optimizer.param_groups[0].params == ("enc.weight",)
