"""Weight norm, parametrizations, quantized modules, extra state, version-keyed load hooks.

Each test is a gap the conformance sweep found on real models (issue "Real models"),
rebuilt here from small torch modules (tests/special_models.py) so that it runs on the
CPU without timm, torchvision or transformers.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import special_models as sm
import torch
from conftest import match_lines
from torch import nn

from pytest_statedict import (
    StateDictError,
    StateDictMismatch,
    UnsupportedFormatError,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    roundtrip,
    schema_of,
)
from pytest_statedict.meta_state import state_from_snapshot
from pytest_statedict.model_copy import meta_copy
from pytest_statedict.schema import Schema
from pytest_statedict.verdict import model_verdict

quantized = pytest.mark.skipif(
    importlib.util.find_spec("torch.ao.quantization") is None
    or torch.backends.quantized.engine == "none",
    reason="this torch has no eager-mode quantization (torch.ao.quantization, an engine)",
)
# torch < 2.4 cannot load a quantized tensor with weights_only=True (no _rebuild_qtensor)
QUANTIZED_FILES = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
quantized_files = pytest.mark.skipif(
    not QUANTIZED_FILES, reason="torch < 2.4 cannot load quantized tensors with weights_only=True"
)
# torch deprecates weight_norm and torch.ao.quantization: the users' models still use them
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)

PACKED = "fc._packed_params._packed_params"


def _snapshot(tmp_path: Path, model: nn.Module, *, values: bool = False) -> Path:
    path = tmp_path / "snapshot.json"
    path.write_text(schema_of(model, values=values).to_json())
    return path


def _checkpoint(tmp_path: Path, model: nn.Module) -> Path:
    path = tmp_path / "checkpoint.pt"
    torch.save(model.state_dict(), path)
    return path


# ---- 1. weight norm and parametrizations: the loading copy without deepcopy ------------


@pytest.mark.parametrize("build", [sm.legacy_weight_norm, sm.new_weight_norm, sm.parametrized])
def test_weight_norm_and_parametrizations_round_trip_and_pass_the_gate(
    build: object, tmp_path: Path
) -> None:
    model = build()  # type: ignore[operator]
    optimizer = sm.with_optimizer(model)
    for fmt in ("torch", "safetensors"):
        result = roundtrip(model, optimizer, format=fmt)
        assert result.ok, str(result)
        # the model, then again after one more step (the resume check ran)
        assert result.tensors_compared >= 2 * len(model.state_dict())
    assert_checkpoint_loads(model, _checkpoint(tmp_path, model))
    assert_checkpoint_loads(model, _snapshot(tmp_path, model))
    check = model_verdict(model, schema_of(model))
    assert check.loads is True, check.reason


def test_legacy_weight_norm_meta_copy_keeps_the_recomputed_weight_off_memory() -> None:
    model = sm.legacy_weight_norm()
    assert not model[0].weight.is_leaf  # what deepcopy refuses
    copied = meta_copy(model)
    assert all(t.is_meta for t in copied.state_dict().values())
    assert copied[0].weight.is_meta
    assert list(copied.state_dict()) == list(model.state_dict())


class Uncopyable(nn.Linear):
    def __deepcopy__(self, memo: object) -> None:
        raise TypeError("cannot pickle 'SwigPyObject' object")


def test_a_model_that_cannot_be_copied_is_refused_naming_factory(tmp_path: Path) -> None:
    model = Uncopyable(3, 2)
    checkpoint = _checkpoint(tmp_path, model)
    with pytest.raises(StateDictError, match=r"Uncopyable cannot be copied .*factory=") as info:
        assert_checkpoint_loads(model, checkpoint)
    assert "SwigPyObject" in str(info.value)
    with pytest.raises(StateDictError, match=r"roundtrip\(\): Uncopyable cannot be copied"):
        roundtrip(model)
    # factory= rescues both, the round-trip with an optimizer (its resume check) too
    assert_checkpoint_loads(model, checkpoint, factory=lambda: nn.Linear(3, 2))
    with pytest.raises(StateDictMismatch, match=r"unexpected .*\n    bias"):
        assert_checkpoint_loads(model, checkpoint, factory=lambda: nn.Linear(3, 2, bias=False))
    optimizer = sm.with_optimizer(model)
    with pytest.raises(StateDictError, match="cannot be copied .*factory="):
        roundtrip(model, optimizer)
    result = roundtrip(model, optimizer, factory=lambda: nn.Linear(3, 2))
    assert result.ok, str(result)


def test_factory_rescues_the_gate_and_round_trip_in_a_users_tests(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        special_models=Path(sm.__file__).read_text(),
        test_vocoder="""
        import torch
        from pytest_statedict import assert_checkpoint_loads

        from special_models import legacy_weight_norm, with_optimizer

        def test_roundtrip_with_optimizer(statedict_roundtrip):
            model = legacy_weight_norm()
            statedict_roundtrip(model, with_optimizer(model), factory=legacy_weight_norm)

        def test_roundtrip_plain(statedict_roundtrip):
            model = legacy_weight_norm()
            statedict_roundtrip(model, with_optimizer(model))

        def test_gate(tmp_path):
            model = legacy_weight_norm()
            torch.save(model.state_dict(), tmp_path / "v1.pt")
            assert_checkpoint_loads(model, tmp_path / "v1.pt")
            assert_checkpoint_loads(model, tmp_path / "v1.pt", factory=legacy_weight_norm)

        def test_snapshot(statedict_snapshot):
            statedict_snapshot.assert_match(legacy_weight_norm())
        """,
    )
    result = pytester.runpytest("--statedict-update", "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=4)
    match_lines(result, ["statedict: 1 passed; round-trips: 2 passed; gates: 2 passed"])


# ---- 2. quantized modules ----------------------------------------------------------------


@quantized
def test_a_changed_packed_bias_is_seen_by_value_checks() -> None:
    """A dynamic-quantized Linear keeps (weight, bias) as one object entry: hash its tensors."""
    model = sm.dynamic_quantized_tied()
    key = "dense._packed_params._packed_params"
    before = schema_of(model, values=True)
    entry = next(t for t in before.tensors if t.key == key)
    assert entry.kind == "object" and entry.fingerprint is not None
    assert Schema.from_json(before.to_json()) == before  # written and read back
    assert_state_dict_matches(schema_of(model, values=True), before)
    with torch.no_grad():
        model.state_dict()[key][1].view(torch.int32)[0] ^= 1  # one bit of the packed bias
    with pytest.raises(StateDictMismatch, match=rf"~ {key}: values xxh3"):
        assert_state_dict_matches(schema_of(model, values=True), before)


@quantized
def test_a_changed_quantization_scale_is_seen_by_value_checks() -> None:
    """Same integers, another scale: another weight. The hash covers the qparams."""
    model = sm.quantized_conv_net()
    before = schema_of(model, values=True)
    weight, bias = model.conv._weight_bias()
    rescaled = torch._make_per_channel_quantized_tensor(
        weight.int_repr(),
        weight.q_per_channel_scales() * 2,
        weight.q_per_channel_zero_points(),
        weight.q_per_channel_axis(),
    )
    model.conv.set_weight_bias(rescaled, bias)
    assert torch.equal(model.state_dict()["conv.weight"].int_repr(), weight.int_repr())
    with pytest.raises(StateDictMismatch, match=r"~ conv.weight: values xxh3"):
        assert_state_dict_matches(schema_of(model, values=True), before)


@quantized
@quantized_files
@pytest.mark.parametrize("build", [sm.quantized_conv_net, sm.dynamic_quantized_tied])
@pytest.mark.parametrize("values", [False, True])
def test_quantized_models_pass_the_file_and_snapshot_gate(
    build: object, values: bool, tmp_path: Path
) -> None:
    """The snapshot gate rebuilds what quantized load hooks read (KeyError, .item() on meta)."""
    model = build()  # type: ignore[operator]
    assert_checkpoint_loads(model, _checkpoint(tmp_path, model))
    assert_checkpoint_loads(model, _snapshot(tmp_path, model, values=values))
    check = model_verdict(model, schema_of(model))
    assert check.loads is True, check.reason


@quantized
@quantized_files
def test_the_quantized_gate_still_refuses_a_real_refactor(tmp_path: Path) -> None:
    """A renamed quantized conv: its load hook raises KeyError (as a plain strict load does).

    That is a mismatch with the hook's message and the rename that fixes it, from a file
    and from a snapshot alike, never a raw KeyError from inside torch.
    """
    old = sm.quantized_conv_net()
    renamed = sm.quantized_conv_net()
    renamed.body = renamed.conv
    del renamed.conv
    for path in (_checkpoint(tmp_path, old), _snapshot(tmp_path, old)):
        with pytest.raises(StateDictMismatch) as info:
            assert_checkpoint_loads(renamed, path)
        message = str(info.value)
        assert "its load_state_dict raised: KeyError: 'body.weight'" in message
        assert "conv.weight -> body.weight" in message
        assert "rename=[(r'^conv\\.', 'body.')]" in message
        assert_checkpoint_loads(renamed, path, rename=[(r"^conv\.", "body.")])


@quantized
def test_scalars_come_from_the_snapshot_values() -> None:
    model = sm.quantized_conv_net()
    state = state_from_snapshot(schema_of(model, values=True))
    assert state["quant.scale"].device.type == "cpu"
    assert torch.equal(state["quant.scale"], model.state_dict()["quant.scale"])
    assert state["conv.weight"].is_quantized  # packed by the conv's hook: real memory


@quantized
@quantized_files
def test_resume_twin_keeps_the_packed_bias_tied_as_the_model_does() -> None:
    """The packed decoder bias shares the tied head bias; one more step moves both.

    A plain deepcopy twin re-packs from the original's tensors and loses that sharing
    (a false "does not continue training exactly"); the reloaded model keeps it, and so
    does the original: stepped itself, its packed bias moves with the parameter.
    """
    model = sm.dynamic_quantized_tied()
    optimizer = sm.with_optimizer(model)
    key = "decoder._packed_params._packed_params"
    assert model.state_dict()[key][1].data_ptr() == model.bias.data_ptr()
    result = roundtrip(model, optimizer)
    assert result.ok, str(result)
    # the twin built by a plain deepcopy is what reported the mismatch
    twin = copy.deepcopy(model)
    assert twin.state_dict()[key][1].data_ptr() != twin.bias.data_ptr()
    # the truth: the original itself after one more step
    before = model.bias.detach().clone()
    model.bias.grad = torch.ones_like(model.bias)
    optimizer.step()
    assert not torch.equal(model.bias, before)
    assert torch.equal(model.state_dict()[key][1], model.bias.detach())
    # and the round-trip leaves the user's model alone: nothing of it is shared with a copy
    stepped = model.state_dict()[key][1].clone()
    roundtrip(model, optimizer).assert_ok()
    assert torch.equal(model.state_dict()[key][1], stepped)


@quantized
@quantized_files
def test_a_real_resume_mismatch_of_a_quantized_model_is_still_reported() -> None:
    class Forgetful(torch.optim.Adam):
        """Drops its state on load: the resume check must see it."""

        def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
            super().load_state_dict(state_dict)
            self.state.clear()

    model = sm.dynamic_quantized_tied()
    optimizer = Forgetful([model.bias, model.embed.weight], lr=0.1)
    for p in (model.bias, model.embed.weight):
        p.grad = torch.ones_like(p)
    optimizer.step()
    result = roundtrip(model, optimizer)
    assert "resuming from the checkpoint does not continue training exactly" in str(result)


# ---- 3. safetensors cannot hold everything -------------------------------------------------


@pytest.mark.parametrize(
    ("build", "refused"),
    [
        pytest.param(
            sm.quantized_conv_net,
            ["conv.weight (a quantized qint8 tensor)", f"{PACKED} (a tuple, not a tensor)"],
            marks=[quantized, quantized_files],
        ),
        (sm.with_extra_state, ["0._extra_state (a dict, not a tensor)"]),
    ],
)
def test_safetensors_round_trip_names_what_safetensors_cannot_hold(
    build: object, refused: list[str]
) -> None:
    model = build()  # type: ignore[operator]
    with pytest.raises(UnsupportedFormatError) as info:
        roundtrip(model, format="safetensors")
    message = str(info.value)
    assert "safetensors stores only dense tensors" in message
    for item in refused:
        assert item in message
    assert "format='torch'" in message
    assert roundtrip(model).ok  # the torch format holds it


@quantized
@quantized_files
def test_the_fixture_skips_a_format_the_model_cannot_be_stored_in(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        special_models=Path(sm.__file__).read_text(),
        test_deploy="""
        import pytest
        from special_models import quantized_conv_net

        @pytest.mark.statedict_roundtrip(devices=["cpu"], formats=["torch", "safetensors"])
        def test_quantized(statedict_roundtrip):
            statedict_roundtrip(quantized_conv_net())
        """,
    )
    result = pytester.runpytest("-v", "-rs", "-p", "no:randomly")
    result.assert_outcomes(passed=1, skipped=1)
    match_lines(
        result,
        [
            "*test_quantized[cpu->cpu] PASSED*",
            "*test_quantized[cpu->cpu-safetensors] SKIPPED*",
            "statedict: round-trips: 1 passed, 1 skipped",
            "*SKIPPED*statedict round-trip cpu->cpu: roundtrip(format='safetensors'): "
            "safetensors stores only dense tensors*conv.weight (a quantized qint8 tensor)*",
        ],
    )


# ---- 4. extra state in the snapshot gate ---------------------------------------------------


def test_snapshot_gate_counts_extra_state_as_present(tmp_path: Path) -> None:
    model = sm.with_extra_state()
    model.load_state_dict(model.state_dict(), strict=True)  # a plain strict load works
    snapshot = _snapshot(tmp_path, model)
    assert_checkpoint_loads(model, snapshot)
    # an extra state the model no longer has is still unexpected
    plain = nn.Sequential(nn.Module(), nn.Linear(2, 2))
    plain[0].fc = nn.Linear(4, 2)
    with pytest.raises(StateDictMismatch, match=r"unexpected.*\n.*0._extra_state"):
        assert_checkpoint_loads(plain, snapshot)


# ---- 5. module versions through safetensors -----------------------------------------------


def test_safetensors_round_trip_gives_module_versions_back() -> None:
    """safetensors has no _metadata: a hook keyed on the version got None (MNASNet)."""
    model = sm.versioned()
    for factory in (None, sm.versioned):
        result = roundtrip(model, sm.with_optimizer(model), format="safetensors", factory=factory)
        assert result.ok, str(result)


# ---- 6. a load hook's own exception is a mismatch -------------------------------------------


class Strict(nn.Linear):
    """Refuses checkpoints of version 1 with a ValueError, as real hooks do."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):  # type: ignore[no-untyped-def]
        if local_metadata.get("version") != 2:
            raise ValueError(f"{prefix or 'root'}: version 1 checkpoints are not supported")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class Grumpy(nn.Linear):
    def _load_from_state_dict(self, *args):  # type: ignore[no-untyped-def]
        raise KeyError("running_stats")


def test_a_hook_error_is_a_gate_mismatch_with_its_message(tmp_path: Path) -> None:
    old = nn.Linear(3, 2)
    checkpoint = _checkpoint(tmp_path, old)
    snapshot = _snapshot(tmp_path, old)
    for path in (checkpoint, snapshot):
        with pytest.raises(StateDictMismatch) as info:
            assert_checkpoint_loads(Strict(3, 2), path)
        assert (
            "its load_state_dict raised: ValueError: root: version 1 checkpoints are not "
            "supported" in str(info.value)
        )


def test_a_hook_error_is_a_round_trip_mismatch_and_a_report_verdict() -> None:
    result = roundtrip(Grumpy(3, 2))
    assert not result.ok
    assert "load_state_dict(strict=True) failed: KeyError: 'running_stats'" in str(result)
    with pytest.raises(StateDictMismatch, match=r"NO, through Strict's own load_state_dict "
                       r"\(it raises: ValueError: root: version 1"):  # fmt: skip
        assert_state_dict_matches(Strict(3, 2), schema_of(nn.Linear(3, 2)))


def test_a_hook_error_fails_a_users_test_without_a_torch_traceback(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import torch
        from torch import nn
        from pytest_statedict import assert_checkpoint_loads

        class Model(nn.Linear):
            _version = 2

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
                if local_metadata.get("version") != 2:
                    raise ValueError("version should be set to 1 or 2 instead of None")
                super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

        def test_gate(tmp_path):
            torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "v1.pt")
            assert_checkpoint_loads(Model(3, 2), tmp_path / "v1.pt")

        def test_roundtrip(statedict_roundtrip):
            class Broken(nn.Linear):
                def _load_from_state_dict(self, *args):
                    raise KeyError("scale")
            statedict_roundtrip(Broken(3, 2))
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=2)
    match_lines(
        result,
        [
            "*checkpoint*v1.pt does not load into Model with load_state_dict(strict=True):",
            "*its load_state_dict raised: ValueError: version should be set to 1 or 2 instead "
            "of None",
            "*load_state_dict(strict=True) failed: KeyError: 'scale'",
        ],
    )
    assert "torch/nn/modules/module.py" not in result.stdout.str()
