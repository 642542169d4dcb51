"""Replayed refactors, converted as the projects convert them, beside the real loader.

Each case builds an old-layout checkpoint as the older release saved it, then sets the
gate's verdict with the project's own conversion (``convert=`` or ``rename=``) beside the
real loader's outcome: timm's ``checkpoint_filter_fn`` for DeiT3 (``gamma_1`` ->
``ls1.gamma``, a linear patch embedding reshaped, position embeddings resampled, a
``pre_logits`` layer dropped), ConvNeXt (FB layout: renames, GRN reshaped) and RegNet
(torchvision's layout); torchvision's DenseNet regex (``norm.1`` -> ``norm1``, run outside
``load_state_dict``); torchvision's MNASNet (versioned ``_load_from_state_dict``) saved
through ``DataParallel`` and ``torch.compile``, loaded after
``consume_prefix_in_state_dict_if_present``. Each case must agree, and the gate without
the conversion must say NO (else the case proves nothing).

Run with the frameworks environment: ``python -m pytest conformance/test_conversions.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from pytest_statedict import StateDictMismatch, assert_checkpoint_loads
from pytest_statedict.releases import record_release

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


@dataclass
class Case:
    """One replayed refactor: today's model, the old checkpoint, and the project's way in."""

    model: nn.Module
    old: dict[str, Any]  # as the older release saved it (with its _metadata, if any)
    real_load: Callable[[nn.Module, dict[str, Any]], None]  # the project's real loader
    gate: dict[str, Any]  # what the project passes the gate: convert= or rename=


def _torch_load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


# ---- timm --------------------------------------------------------------------------------


def deit3() -> Case:
    from timm.models.vision_transformer import checkpoint_filter_fn

    convert = partial(checkpoint_filter_fn, adapt_layer_scale=True)  # as timm's deit.py does
    config = dict(depth=2, embed_dim=48, num_heads=2, patch_size=8, num_classes=5)
    model = timm.create_model("deit3_small_patch16_224", img_size=32, **config)
    trained_at = timm.create_model("deit3_small_patch16_224", img_size=24, **config)
    old: dict[str, Any] = {}
    for key, value in trained_at.state_dict().items():
        key = re.sub(r"ls([12])\.gamma", r"gamma_\1", key)  # DeiT3's own layout
        if key == "patch_embed.proj.weight":  # the linear patchify before conv
            value = value.reshape(value.shape[0], -1)
        old[key] = value
    old["pre_logits.fc.weight"] = torch.randn(48, 48)
    old["pre_logits.fc.bias"] = torch.randn(48)

    def real_load(model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(convert(state, model))

    return Case(model, old, real_load, {"convert": convert})


def convnext() -> Case:
    from timm.models.convnext import checkpoint_filter_fn

    model = timm.create_model("convnextv2_atto", depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
    old: dict[str, Any] = {}
    for key, value in model.state_dict().items():  # FB's layout, as ConvNeXt-V2 saved it
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if "mlp.grn" in key:
            key = key.replace("mlp.grn.bias", "grn.beta").replace("mlp.grn.weight", "grn.gamma")
            value = value.reshape(1, 1, 1, -1)
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        old[key] = value

    def real_load(model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(checkpoint_filter_fn(state, model))

    return Case(model, old, real_load, {"convert": checkpoint_filter_fn})


def regnet() -> Case:
    from timm.models.regnet import _filter_fn

    model = timm.create_model("regnetx_004_tv")
    old = dict(torchvision.models.regnet_x_400mf().state_dict())  # torchvision's layout

    def real_load(model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(_filter_fn(state))

    return Case(model, old, real_load, {"convert": _filter_fn})


# ---- torchvision -------------------------------------------------------------------------

# torchvision's own pattern (densenet._load_state_dict), which it runs before load_state_dict
DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def densenet_regex(state: dict[str, Any]) -> dict[str, Any]:
    """The project's conversion: torchvision's loop, as a function the gate can run."""
    for key in list(state):
        match = DENSENET_OLD_KEY.match(key)
        if match:
            state[match.group(1) + match.group(2)] = state.pop(key)
    return state


def densenet() -> Case:
    from torchvision.models import densenet as tv_densenet

    def build() -> nn.Module:
        return tv_densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8)

    old = {  # as saved before torch 0.4: no num_batches_tracked, no module versions
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
        for key, value in build().state_dict().items()
        if not key.endswith("num_batches_tracked")
    }

    class Weights:  # what torchvision's loader reads the checkpoint from
        @staticmethod
        def get_state_dict(progress: bool, check_hash: bool) -> dict[str, Any]:
            return dict(old)

    def real_load(model: nn.Module, state: dict[str, Any]) -> None:
        tv_densenet._load_state_dict(model, Weights, progress=False)  # type: ignore[arg-type]

    return Case(build(), old, real_load, {"convert": densenet_regex})


class Wrapper(nn.Module):
    """Saves its model under ``name``: DataParallel/DDP's ``module``, torch.compile's
    ``_orig_mod`` (an OptimizedModule is a module of version 1 holding it so)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.add_module(name, model)


def mnasnet(wrapper: str) -> Case:
    def build() -> nn.Module:
        return torchvision.models.mnasnet0_5()  # alpha != 1: the v1 hook reshapes the stem

    saved_through = nn.DataParallel(build()) if wrapper == "module" else Wrapper(build(), wrapper)
    old = saved_through.state_dict()
    prefix = f"{wrapper}."
    return Case(build(), old, partial(load_unwrapped, prefix), {"rename": unwrapping(prefix)})


def load_unwrapped(prefix: str, model: nn.Module, state: dict[str, Any]) -> None:
    """The real load of a wrapper's checkpoint, as torch documents it."""
    consume_prefix_in_state_dict_if_present(state, prefix)
    model.load_state_dict(state)


def unwrapping(prefix: str) -> list[tuple[str, str]]:
    """The ``rename=`` the gate itself suggests for a wrapper's prefix."""
    return [(rf"^{re.escape(prefix)}", "")]


CASES: dict[str, Callable[[], Case]] = {
    "timm DeiT3": deit3,
    "timm ConvNeXt": convnext,
    "timm RegNet": regnet,
    "torchvision DenseNet": densenet,
    "MNASNet via DataParallel": partial(mnasnet, "module"),
    "MNASNet via torch.compile": partial(mnasnet, "_orig_mod"),
}


def verdicts(case: Case, path: Path) -> tuple[str, str, str]:
    """The real loader's outcome, the gate's with the project's conversion, and without."""
    torch.save(case.old, path)
    try:
        case.real_load(case.model, _torch_load(path))
        real = "loads"
    except RuntimeError as exc:
        real = f"fails: {str(exc).splitlines()[0][:80]}"

    def gate(**kwargs: Any) -> str:
        try:
            assert_checkpoint_loads(case.model, path, **kwargs)
        except StateDictMismatch as exc:
            return "NO: " + str(exc).splitlines()[1].strip()[:120]
        return "yes"

    return real, gate(**case.gate), gate()


@pytest.mark.parametrize("name", list(CASES))
def test_the_projects_conversion_agrees_with_the_real_loader(
    name: str, tmp_path: Path, record_property: Any
) -> None:
    real, with_conversion, without = verdicts(CASES[name](), tmp_path / "old.pt")
    record_property("conversion_row", (name, real, with_conversion, without))

    assert real == "loads"
    assert with_conversion == "yes"
    assert without.startswith("NO")  # the conversion is what makes it load


def test_wrong_module_versions_would_say_yes_where_torch_fails(tmp_path: Path) -> None:
    """MNASNet's BatchNorms at version 2 without ``num_batches_tracked``: torch fills that
    in for version 1 or none only, so the renamed versions decide the verdict (alpha 1.0:
    the root's own version changes nothing, the BatchNorm's decides)."""
    old = nn.DataParallel(torchvision.models.mnasnet1_0()).state_dict()
    del old["module.layers.1.num_batches_tracked"]
    case = Case(
        torchvision.models.mnasnet1_0(),
        old,
        partial(load_unwrapped, "module."),
        {"rename": unwrapping("module.")},
    )
    real, with_rename, _ = verdicts(case, tmp_path / "old.pt")

    assert real.startswith("fails: Error(s) in loading state_dict")
    assert with_rename.startswith("NO")


@pytest.mark.parametrize("form", [".safetensors", "release snapshot"])
@pytest.mark.parametrize("name", list(CASES))
def test_read_without_data_the_conversion_runs_on_meta_tensors(
    name: str, form: str, tmp_path: Path
) -> None:
    """The same verdict from the checkpoint's schema alone: timm's conversions reshape and
    resample meta tensors; a snapshot keeps the module versions MNASNet's hook reads."""
    case = CASES[name]()
    if form == ".safetensors":
        if "MNASNet" in name:
            pytest.skip("a .safetensors file keeps no module versions: MNASNet refuses it")
        path = tmp_path / "old.safetensors"
        save_file({k: v.contiguous() for k, v in case.old.items()}, str(path))
    else:
        torch.save(case.old, tmp_path / "old.pt")
        path = record_release(tmp_path / "old.pt", "v1", directory=tmp_path / "releases")

    assert_checkpoint_loads(case.model, path, **case.gate)
    with pytest.raises(StateDictMismatch):
        assert_checkpoint_loads(case.model, path)
