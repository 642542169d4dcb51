"""Conversions as projects write them: ``rename=`` carrying module versions as torch does,
``convert=`` (the project's own function, on meta tensors or values), ``ignore=`` and one
deliberate break accepted with ``expected_to_fail=``. Each verdict is set beside torch's
real load of the same checkpoint."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import match_lines
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from pytest_statedict import StateDictError, StateDictMismatch, assert_checkpoint_loads, schema_of
from pytest_statedict.releases import record_release
from pytest_statedict.rename import compile_rename, normalise


class Versioned(nn.Module):
    """Version 1 stored ``fc.weight`` transposed; a checkpoint without a version is one.

    As torchvision's MNASNet, the conversion is keyed on the root's version: a version-2
    checkpoint read as version 1 is converted once too often, to the wrong shape.
    """

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.bn = nn.BatchNorm1d(5)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any
    ) -> None:
        version = local_metadata.get("version")
        key = f"{prefix}fc.weight"
        if (version is None or version < 2) and key in state_dict:
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class Wrapper(nn.Module):
    """A wrapper that saves its model under ``name``: DataParallel/DDP (``module``) or
    ``torch.compile`` (``_orig_mod``), each of them a module of version 1 at the root."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.add_module(name, model)


def torch_loads(model: nn.Module, path: Path, prefix: str) -> bool:
    """The real load, as a user writes it after a wrapper: strip its prefix, load strictly."""
    state = torch.load(path, weights_only=True)
    consume_prefix_in_state_dict_if_present(state, prefix)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        return False
    return True


def gate_loads(model: nn.Module, path: Path, **kwargs: Any) -> bool:
    try:
        assert_checkpoint_loads(model, path, **kwargs)
    except StateDictMismatch:
        return False
    return True


@pytest.mark.parametrize("wrapper", ["module", "_orig_mod"])
def test_a_prefix_stripped_by_rename_keeps_each_module_its_version(
    tmp_path: Path, wrapper: str
) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save(Wrapper(Versioned(), wrapper).state_dict(), path)
    rename = [(rf"^{wrapper}\.", "")]

    assert torch_loads(Versioned(), path, f"{wrapper}.")
    assert gate_loads(Versioned(), path, rename=rename)
    # the gate suggests that very rename
    with pytest.raises(StateDictMismatch, match=re.escape(f"rename=[(r'^{wrapper}\\.', '')]")):
        assert_checkpoint_loads(Versioned(), path)


def test_a_version_1_checkpoint_through_a_wrapper_is_converted_once(tmp_path: Path) -> None:
    state = Wrapper(Versioned(), "module").state_dict()
    state["module.fc.weight"] = state["module.fc.weight"].t().contiguous()
    state._metadata["module"]["version"] = 1  # type: ignore[attr-defined]
    path = tmp_path / "v1.pt"
    torch.save(state, path)

    assert torch_loads(Versioned(), path, "module.")
    assert gate_loads(Versioned(), path, rename=[(r"^module\.", "")])


def test_wrong_versions_would_say_yes_where_torch_fails(tmp_path: Path) -> None:
    """A version-2 BatchNorm without ``num_batches_tracked``: torch fills it in for version
    1 (or no version) only, so the renamed version decides, and the real load fails."""
    state = Wrapper(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)), "module").state_dict()
    del state["module.1.num_batches_tracked"]
    path = tmp_path / "bn.pt"
    torch.save(state, path)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))

    assert not torch_loads(model, path, "module.")
    with pytest.raises(StateDictMismatch, match=r"missing .*\n    1\.num_batches_tracked"):
        assert_checkpoint_loads(model, path, rename=[(r"^module\.", "")])


def test_the_match_renames_versions_as_torch_does(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save(Wrapper(Versioned(), "module").state_dict(), path)
    state = torch.load(path, weights_only=True)
    consume_prefix_in_state_dict_if_present(state, "module.")
    by_torch = {module: meta.get("version") for module, meta in state._metadata.items()}

    renamed = normalise(schema_of(path), rename=compile_rename([(r"^module\.", "")]))

    assert renamed.versions == {m: v for m, v in by_torch.items() if v != 1}  # 1: unrecorded
    assert renamed.versions[""] == 2  # the model's, not the wrapper's


def test_a_snapshot_of_a_wrapped_checkpoint_gates_with_its_versions(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save(Wrapper(Versioned(), "module").state_dict(), path)
    snapshot = record_release(path, "v1", directory=tmp_path / "releases")

    assert gate_loads(Versioned(), snapshot, rename=[(r"^module\.", "")])


# ---- convert= ----------------------------------------------------------------------------


class Today(nn.Module):
    """The layout a refactor left: a 2-D patch projection, q/k/v apart, no pre_logits."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(3, 8, bias=False)
        self.q = nn.Linear(4, 4, bias=False)
        self.k = nn.Linear(4, 4, bias=False)
        self.v = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 2)


def old_state() -> dict[str, torch.Tensor]:
    """As the older release saved it: a flat patch embedding, one qkv, a pre_logits layer."""
    return {
        "patch_embed": torch.randn(24),
        "qkv.weight": torch.randn(12, 4),
        "pre_logits.weight": torch.randn(4, 4),
        "head.weight": torch.randn(2, 4),
        "head.bias": torch.randn(2),
    }


def convert_old(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The project's conversion, written as timm writes its ``checkpoint_filter_fn``s."""
    out = {}
    for key, value in state.items():
        if key.startswith("pre_logits."):
            continue  # dropped
        if key == "patch_embed":  # renamed and reshaped to the model's shape
            out["patch.weight"] = value.reshape(model.patch.weight.shape)
        elif key == "qkv.weight":  # sliced
            out["q.weight"], out["k.weight"], out["v.weight"] = value.chunk(3)
        else:
            out[key] = value
    return out


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_old_checkpoint_plus_the_projects_conversion_loads(tmp_path: Path, suffix: str) -> None:
    path = save(old_state(), tmp_path / f"old{suffix}")
    Today().load_state_dict(convert_old(old_state(), Today()))  # the real loader agrees

    assert_checkpoint_loads(Today(), path, convert=convert_old)
    with pytest.raises(StateDictMismatch):
        assert_checkpoint_loads(Today(), path)


def test_a_failure_after_the_conversion_says_what_it_changed(tmp_path: Path) -> None:
    path = save(old_state(), tmp_path / "old.safetensors")

    def forgets_the_drop(state: dict[str, torch.Tensor], model: nn.Module) -> Any:
        return {**convert_old(state, model), "pre_logits.weight": state["pre_logits.weight"]}

    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(Today(), path, convert=forgets_the_drop)

    message = str(failure.value)
    assert "unexpected (in the checkpoint, not in the model) (1):\n    pre_logits.weight" in message
    assert (
        "  convert= changed 3 key(s), before rename= and the load:\n"
        "    renamed patch_embed -> patch.weight\n"
        "    split qkv.weight -> q.weight, k.weight, v.weight\n"
        "    reshaped patch.weight: [24] -> [8, 3]\n"
    ) in message + "\n"


def test_a_conversion_that_needs_values_gets_them_memory_mapped(tmp_path: Path) -> None:
    """``.item()`` raises on a meta tensor: the conversion runs again on the file's values."""
    state = {**old_state(), "scale": torch.tensor(2.0)}
    path = save(state, tmp_path / "old.safetensors")
    seen: list[bool] = []

    def folds_the_scale(state: dict[str, torch.Tensor], model: nn.Module) -> Any:
        scale = state.pop("scale").item()
        seen.append(True)
        out = convert_old(state, model)
        out["head.weight"] = out["head.weight"] * scale
        return out

    assert_checkpoint_loads(Today(), path, convert=folds_the_scale)
    assert seen == [True]

    def also_keeps_pre_logits(state: dict[str, torch.Tensor], model: nn.Module) -> Any:
        return {**folds_the_scale(state, model), "pre_logits.weight": state["pre_logits.weight"]}

    with pytest.raises(StateDictMismatch, match=r"convert= needed the tensors' values \(on meta"):
        assert_checkpoint_loads(Today(), path, convert=also_keeps_pre_logits)


def test_a_conversion_that_needs_values_cannot_run_on_a_snapshot(tmp_path: Path) -> None:
    path = save({**old_state(), "scale": torch.tensor(2.0)}, tmp_path / "old.pt")
    snapshot = record_release(path, "v1", directory=tmp_path / "releases")

    def needs_values(state: dict[str, torch.Tensor], model: nn.Module) -> Any:
        scale = state.pop("scale").item()
        return {**convert_old(state, model), "head.bias": state["head.bias"] * scale}

    with pytest.raises(StateDictError, match=r"needs the tensors' values .*statedict snapshot"):
        assert_checkpoint_loads(Today(), snapshot, convert=needs_values)


def test_a_conversion_that_edits_in_place_as_torchvision_densenet_does(tmp_path: Path) -> None:
    old = {"features.norm.1.weight": torch.randn(4), "features.norm.1.bias": torch.randn(4)}
    path = save(old, tmp_path / "old.pt")
    model = nn.Sequential(OrderedDict(features=nn.Sequential(OrderedDict(norm1=nn.LayerNorm(4)))))

    def densenet_regex(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key in list(state):
            new = key.replace("norm.1", "norm1")
            if new != key:
                state[new] = state[key]
                del state[key]
        return state

    assert_checkpoint_loads(model, path, convert=densenet_regex)


def test_a_conversion_returning_a_new_dict_drops_module_versions_as_torch_does(
    tmp_path: Path,
) -> None:
    """``load_state_dict(fn(sd))`` with a new dict: no ``_metadata``, so every module sees
    no version and Versioned converts a version-2 checkpoint once too often."""
    path = tmp_path / "v2.pt"
    torch.save(Versioned().state_dict(), path)

    def new_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(state)

    def in_place(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    with pytest.raises(RuntimeError, match="size mismatch for fc.weight"):
        Versioned().load_state_dict(new_dict(torch.load(path, weights_only=True)))
    Versioned().load_state_dict(in_place(torch.load(path, weights_only=True)))

    with pytest.raises(StateDictMismatch, match=r"fc\.weight: checkpoint \[3, 5\], model \[5, 3\]"):
        assert_checkpoint_loads(Versioned(), path, convert=new_dict)
    assert_checkpoint_loads(Versioned(), path, convert=in_place)


def test_a_conversion_that_returns_no_mapping_is_named(tmp_path: Path) -> None:
    path = save(old_state(), tmp_path / "old.pt")
    with pytest.raises(StateDictError, match="returned a list, not the state_dict"):
        assert_checkpoint_loads(Today(), path, convert=lambda sd: list(sd))


# ---- ignore= -----------------------------------------------------------------------------


def test_ignored_keys_count_on_neither_side_and_a_failure_lists_them(tmp_path: Path) -> None:
    model = Today()
    state = convert_old(old_state(), model)
    state["aux.weight"] = torch.randn(4, 4)  # v.weight's shape: no rename is paired from it
    state["head.weight"] = torch.randn(7, 4)  # the head was resized: a fine-tuning's
    del state["v.weight"]
    path = save(state, tmp_path / "ckpt.pt")

    assert_checkpoint_loads(model, path, ignore=["aux.*", "head.*", "v.*"])
    with pytest.raises(StateDictMismatch) as failure:
        assert_checkpoint_loads(model, path, ignore=["aux.*", "head.*"])

    message = str(failure.value)
    assert "missing (in the model, not in the checkpoint) (1):\n    v.weight" in message
    assert "renamed" not in message
    assert (
        "  ignored by ignore=['aux.*', 'head.*'] (2):\n"
        "    aux.weight (unexpected)\n"
        "    head.weight: checkpoint [7, 4], model [2, 4]"
    ) in message


# ---- expected_to_fail= -------------------------------------------------------------------

BREAK = """
import torch
from torch import nn
from pytest_statedict import assert_checkpoint_loads


def test_renamed_head(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)).state_dict(), path)
    assert_checkpoint_loads(nn.Linear(2, 2), path, expected_to_fail="{reason}")
    assert_checkpoint_loads(nn.Linear(2, 2), path, rename=[(r"^0\\.", "")])


def test_fixed(tmp_path):
    path = tmp_path / "new.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    assert_checkpoint_loads(nn.Linear(2, 2), path, expected_to_fail="{reason}")
"""


def test_a_deliberate_break_is_an_expected_failure_until_it_loads_again(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(BREAK.format(reason="the 0. prefix went in 2.0"))

    result = pytester.runpytest("-p", "no:randomly", "--statedict-report=report.json")

    result.assert_outcomes(passed=1, failed=1)
    match_lines(
        result,
        [
            "*fixed: remove expected_to_fail*",
            "*statedict: gates expected to fail*",
            "*old.pt: the 0. prefix went in 2.0 (fails, as expected)",
            "*new.pt: loads again, though expected to fail (the 0. prefix went in 2.0): remove*",
            "statedict: gates: 1 passed, 1 xfailed, 1 xpassed",
        ],
    )
    checks = json.loads(Path(pytester.path, "report.json").read_text())["checks"]
    outcomes = {(c["test"].split("::")[1], c["outcome"]) for c in checks}
    assert outcomes == {
        ("test_renamed_head", "xfailed"),
        ("test_renamed_head", "passed"),
        ("test_fixed", "xpassed"),
    }


def test_expected_to_fail_needs_a_reason(tmp_path: Path) -> None:
    path = save(old_state(), tmp_path / "old.pt")
    with pytest.raises(StateDictError, match="takes the reason"):
        assert_checkpoint_loads(Today(), path, expected_to_fail=" ")


# ---- the release gate --------------------------------------------------------------------

MODEL = """
import torch
from torch import nn


class Today(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(3, 8, bias=False)
        self.q = nn.Linear(4, 4, bias=False)
        self.k = nn.Linear(4, 4, bias=False)
        self.v = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 2)
        self.aux = nn.Linear(4, 4)


def build():
    with torch.device("meta"):
        return Today()


def convert_old(state, model):
    out = {}
    for key, value in state.items():
        if key.startswith("pre_logits."):
            continue
        if key == "patch_embed":
            out["patch.weight"] = value.reshape(model.patch.weight.shape)
        elif key == "qkv.weight":
            out["q.weight"], out["k.weight"], out["v.weight"] = value.chunk(3)
        else:
            out[key] = value
    return out
"""

RELEASE_GATE = """
from model import build, convert_old
from pytest_statedict import statedict_releases

test_releases = statedict_releases(build{extra})
"""


@pytest.mark.parametrize(
    ("extra", "outcome"),
    [
        ("", {"failed": 1}),
        (", convert=convert_old", {"failed": 1}),  # aux is new: missing
        (", convert=convert_old, ignore=['aux.*']", {"passed": 1}),
        (", ignore=['aux.*']", {"failed": 1}),
    ],
)
def test_the_release_gate_takes_convert_and_ignore(
    pytester: pytest.Pytester, extra: str, outcome: dict[str, int]
) -> None:
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(model=MODEL)
    pytester.makepyfile(test_release_conversions=RELEASE_GATE.format(extra=extra))
    record_release(
        save(old_state(), pytester.path / "old.pt"),
        "v1.0",
        directory=pytester.path / "tests/__statedict__/releases",
    )

    result = pytester.runpytest("-p", "no:randomly")

    result.assert_outcomes(**outcome)
    if extra == ", convert=convert_old":
        match_lines(result, ["*missing*", "*aux.bias", "*convert= changed 4 key(s)*"])


def test_ignore_leaves_out_an_ignored_keys_shape_on_a_snapshot_too(tmp_path: Path) -> None:
    """Documented: ignored keys count on neither side, shape included (a resized head)."""
    state = Today().state_dict()
    state["head.weight"] = torch.randn(7, 4)
    path = save(state, tmp_path / "ckpt.pt")
    snapshot = record_release(path, "v1", directory=tmp_path / "releases")

    assert gate_loads(Today(), snapshot, ignore=["head.*"])
    assert not gate_loads(Today(), snapshot)
