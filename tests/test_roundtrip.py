"""Bitwise comparison and the save/load round-trip."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import match_lines
from test_checkpoint_files import saved_as
from torch import nn

from pytest_statedict import StateDictMismatch, roundtrip
from pytest_statedict.bitwise import difference, tensor_difference
from pytest_statedict.model_copy import meta_copy

ALL_DTYPES = [
    getattr(torch, name)
    for name in (
        *("float64", "float32", "float16", "bfloat16", "complex128", "complex64"),
        *("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool"),
        *("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"),
    )
    if hasattr(torch, name)
]


def random_bits(dtype: torch.dtype, n: int = 64) -> torch.Tensor:
    if dtype == torch.bool:  # only 0 and 1 are valid bools (copies normalise other bytes)
        return torch.randint(0, 2, (n,), dtype=torch.uint8).view(torch.bool)
    size = torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8).view(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_equal_to_itself_and_a_flipped_bit_is_not(dtype: torch.dtype) -> None:
    t = random_bits(dtype)
    assert tensor_difference(t, t.clone()) is None
    flipped = t.clone()
    raw = flipped.view(torch.uint8)
    raw[3] ^= 0x01 if dtype == torch.bool else 0x10
    problem = tensor_difference(t, flipped)
    assert problem is not None and "1 of 64 elements differ in their bits" in problem


def test_nan_negative_zero_and_infinities() -> None:
    special = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")])
    assert tensor_difference(special, special.clone()) is None
    assert not torch.equal(special, special.clone())  # what torch.equal would have said
    assert tensor_difference(torch.tensor([0.0]), torch.tensor([-0.0])) is not None
    other_nan = special.clone()
    other_nan.view(torch.int32)[0] ^= 1  # another NaN payload
    assert tensor_difference(special, other_nan) is not None


def test_dtype_shape_layout_are_checked_before_bits() -> None:
    a = torch.zeros(4)
    assert tensor_difference(a, a.half()) == "dtype float32 -> float16"
    assert tensor_difference(a, a.reshape(2, 2)) == "shape [4] -> [2, 2]"
    assert "layout" in (tensor_difference(a, a.to_sparse()) or "")
    assert tensor_difference(a, torch.empty(4, device="meta")) is not None


def test_non_contiguous_sparse_quantized_and_objects() -> None:
    base = torch.randn(4, 5)
    assert tensor_difference(base.t(), base.t().contiguous()) is None
    sparse = torch.eye(3).to_sparse()
    assert tensor_difference(sparse, torch.eye(3).to_sparse()) is None
    assert tensor_difference(sparse, (torch.eye(3) * 2).to_sparse()) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = torch.eye(3).to_sparse_csr()
        assert tensor_difference(csr, torch.eye(3).to_sparse_csr()) is None
        q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8)
        q2 = torch.quantize_per_tensor(torch.ones(4), 0.2, 0, torch.quint8)
        assert tensor_difference(q, q) is None
        assert "scale" in (tensor_difference(q, q2) or "")
        qc = torch.quantize_per_channel(
            torch.ones(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0, torch.qint8
        )
        assert tensor_difference(qc, qc) is None
    assert difference({"a": 1, "b": [1.0, -0.0]}, {"a": 1, "b": [1.0, -0.0]}) is None
    assert difference({"b": [1.0, -0.0]}, {"b": [1.0, 0.0]}) == "['b'] [1] -0.0 -> 0.0"
    assert difference(float("nan"), float("nan")) is None
    assert difference(torch.zeros(1), 0.0) == "type Tensor -> float"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("special", torch.tensor([float("nan"), -0.0, float("inf")]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def trained(optimizer_cls: Any = torch.optim.AdamW, **kwargs: Any) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = Net()
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    model(torch.randint(0, 16, (4,))).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.parametrize(
    ("optimizer_cls", "kwargs"),
    [
        (torch.optim.AdamW, {"lr": 1e-2}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.Adam, {"lr": 1e-3, "amsgrad": True}),
        (torch.optim.RMSprop, {"lr": 1e-3}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_roundtrip_is_exact_with_optimizer_and_resume(optimizer_cls: Any, kwargs: Any) -> None:
    model, optimizer = trained(optimizer_cls, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = roundtrip(model, optimizer)
    assert result.ok, str(result)
    assert result.tensors_compared >= len(before)
    assert result.saved_on == ("cpu",)
    # the user's model was not stepped by the resume check
    assert all(tensor_difference(v, model.state_dict()[k]) is None for k, v in before.items())


def test_safetensors_format_keeps_ties() -> None:
    model, _ = trained()
    result = roundtrip(model, format="safetensors")
    assert result.ok, str(result)
    assert "(safetensors)" in result.label


class LossyLoad(nn.Linear):
    """A custom load that resets a buffer: the classic silent checkpoint bug."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.register_buffer("calibration", torch.full((4,), 3.0))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.calibration = torch.zeros(4)


def test_lossy_custom_load_is_caught_by_key() -> None:
    model = nn.Sequential(nn.Linear(4, 4), LossyLoad())
    result = roundtrip(model)
    assert not result.ok
    assert result.mismatches == [
        "1.calibration: 4 of 4 elements differ in their bits, first at [0]: 3.0 -> 0.0"
    ]
    with pytest.raises(StateDictMismatch, match="1.calibration"):
        result.assert_ok()


class Untying(Net):
    """Loading breaks the tie: the head gets its own copy of the weight."""

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.head.weight = nn.Parameter(self.head.weight.detach().clone())
        return result


def test_broken_tie_is_reported() -> None:
    torch.manual_seed(0)
    result = roundtrip(Untying())
    assert "head.weight and embed.weight: tied in the original, no longer tied" in str(result) or (
        "embed.weight and head.weight: tied in the original, no longer tied" in str(result)
    )


def test_missing_key_on_load_is_reported() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    result = roundtrip(nn.Sequential(nn.Linear(4, 4)), factory=factory)
    assert not result.ok
    assert "load_state_dict(strict=True) failed" in result.mismatches[0]
    assert "1.weight" in result.mismatches[0]


def test_factory_is_used_and_reinitialised_model_is_not_mistaken() -> None:
    model, _ = trained()
    made = []

    def factory() -> nn.Module:
        made.append(Net())
        return made[-1]

    assert roundtrip(model, factory=factory).ok
    assert made and made[0].embed.weight.data_ptr() != model.embed.weight.data_ptr()


def test_resume_difference_is_reported() -> None:
    class ForgetfulAdam(torch.optim.Adam):
        def load_state_dict(self, state_dict: Any) -> None:
            super().load_state_dict(state_dict)
            for state in self.state.values():
                state["exp_avg"].zero_()

    model, optimizer = trained(ForgetfulAdam, lr=1e-2)
    result = roundtrip(model, optimizer)
    assert not result.ok
    assert any("optimizer after load_state_dict" in m for m in result.mismatches)
    assert "resuming from the checkpoint does not continue training exactly" in result.mismatches


def test_scheduler_state_comes_back() -> None:
    model, optimizer = trained()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    optimizer.step()
    scheduler.step()
    assert roundtrip(model, optimizer, scheduler=scheduler).ok


def test_meta_copy_costs_nothing_and_keeps_ties() -> None:
    model = Net()
    copy = meta_copy(model)
    assert all(t.is_meta for t in copy.state_dict().values())
    assert copy.head.weight is copy.embed.weight
    assert not model.embed.weight.is_meta


def test_cuda_tagged_file_loads_on_the_cpu(tmp_path: Path) -> None:
    """The load side of a cuda->cpu round-trip, on a machine without a GPU."""
    from pytest_statedict.round_trip import RoundTripResult, _load_and_compare

    model, _ = trained()
    path = tmp_path / "checkpoint.pt"
    with saved_as("cuda:0"):
        torch.save({"model": model.state_dict()}, path)
    result = RoundTripResult("cuda", "cpu", "torch")
    fresh, _ = _load_and_compare(model, path, "torch", "cpu", None, result)
    assert result.ok, str(result)
    assert result.saved_on == ("cuda:0",)
    assert "the file was saved on cuda:0" in str(result)
    assert fresh is not None and fresh.embed.weight.device.type == "cpu"


def test_meta_model_is_refused() -> None:
    from pytest_statedict import StateDictError

    with torch.device("meta"):
        model = nn.Linear(2, 2)
    with pytest.raises(StateDictError, match="meta device"):
        roundtrip(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("save", "load"), [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")])
def test_real_gpu_roundtrip(save: str, load: str) -> None:
    model, optimizer = trained()
    if save == "cuda":
        model = model.cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    result = roundtrip(model, optimizer, save_device=save, load_device=load)
    assert result.ok, str(result)


# ---- the marker and fixture, through pytest ----------------------------------------------


def test_marker_generates_device_pairs_and_skips_absent_devices(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest, torch

        @pytest.mark.statedict_roundtrip
        def test_default(statedict_roundtrip):
            model = torch.nn.Linear(3, 3).to(statedict_roundtrip.save_device)
            result = statedict_roundtrip(model, torch.optim.SGD(model.parameters(), lr=0.1))
            assert result.ok

        @pytest.mark.statedict_roundtrip(devices=["cpu"], formats=["torch", "safetensors"])
        def test_formats(statedict_roundtrip):
            statedict_roundtrip(torch.nn.Linear(3, 3))

        def test_fixture_without_marker(statedict_roundtrip):
            assert (statedict_roundtrip.save_device, statedict_roundtrip.load_device) == (
                "cpu", "cpu")
            statedict_roundtrip(torch.nn.Linear(3, 3))
        """
    )
    result = pytester.runpytest("-v", "-rs")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=7)
        return
    result.assert_outcomes(passed=4, skipped=3)
    match_lines(
        result,
        [
            "*test_default[cpu->cpu] PASSED*",
            "*test_default[cpu->cuda] SKIPPED*",
            "*test_default[cuda->cpu] SKIPPED*",
            "*test_default[cuda->cuda] SKIPPED*",
            "*test_formats[cpu->cpu] PASSED*",
            "*test_formats[cpu->cpu-safetensors] PASSED*",
            "statedict: round-trips: 4 passed, 3 skipped",
            "*SKIPPED*statedict round-trip cpu->cuda: device 'cuda' is not available on this "
            "machine*",
        ],
    )


def test_devices_option_and_failures_are_counted(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest, torch

        class Lossy(torch.nn.Linear):
            def _load_from_state_dict(self, *args):
                super()._load_from_state_dict(*args)
                with torch.no_grad():
                    self.bias.zero_()

        @pytest.mark.statedict_roundtrip
        def test_lossy(statedict_roundtrip):
            statedict_roundtrip(Lossy(2, 2))

        @pytest.mark.statedict_roundtrip(devices=["cpu"])  # named devices win over the option
        def test_pinned(statedict_roundtrip):
            statedict_roundtrip(torch.nn.Linear(2, 2))
        """
    )
    result = pytester.runpytest("--statedict-devices=cuda", "-v")
    match_lines(result, ["*test_lossy?cuda->cuda? *", "*test_pinned?cpu->cpu? PASSED*"])
    assert "test_lossy[cpu" not in result.stdout.str()
    assert "test_pinned[cuda" not in result.stdout.str()
    result = pytester.runpytest("--statedict-devices=cpu", "-k", "lossy")
    match_lines(
        result,
        [
            "*round-trip cpu->cpu: 2 tensors, 24 bytes compared bit for bit: 1 mismatch(es)",
            "*bias: 2 of 2 elements differ in their bits*",
            "statedict: round-trips: 1 failed",
        ],
    )


def test_marker_misuse_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.statedict_roundtrip
        def test_no_fixture():
            pass

        @pytest.mark.statedict_roundtrip(devices=["gpu0"])
        def test_bad_device(statedict_roundtrip):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret != pytest.ExitCode.OK
    match_lines(result, ["*test_no_fixture: the statedict_roundtrip marker parametrizes*"])
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.statedict_roundtrip
        def test_default(statedict_roundtrip):
            pass
        """
    )
    result = pytester.runpytest("--statedict-devices=cpu,bogus")
    assert result.ret != pytest.ExitCode.OK
    match_lines(result, ["*--statedict-devices: unknown device 'bogus'*"])


class SilentlySkipped(nn.Linear):
    """Drops its bias on load and hides it from missing_keys: strict=True cannot see it."""

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, metadata: Any, strict: bool, missing: Any, *args: Any
    ) -> None:
        state_dict.pop(prefix + "bias", None)
        before = len(missing)
        super()._load_from_state_dict(state_dict, prefix, metadata, strict, missing, *args)
        del missing[before:]


def test_a_silently_skipped_key_with_an_optimizer_is_reported_not_a_crash() -> None:
    model = nn.Sequential(nn.Linear(3, 4), SilentlySkipped(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    result = roundtrip(model, optimizer)
    assert not result.ok
    assert any(m.startswith("1.bias: ") for m in result.mismatches), result.mismatches
    assert (
        "optimizer: not reloaded or resumed, the load left parameters without values (1.bias)"
        in (result.mismatches)
    )


def test_default_devices_where_torch_accelerator_raises_without_one(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch 2.6's ``current_accelerator()`` raises on a CPU-only machine (later ones return
    None): a module using the marker with default devices must still collect and run."""
    if torch.cuda.is_available() or not hasattr(torch, "accelerator"):
        pytest.skip("needs a CPU-only machine with torch.accelerator")

    def raising() -> None:
        raise RuntimeError("Cannot access accelerator device when none is available.")

    monkeypatch.setattr(torch.accelerator, "current_accelerator", raising)
    pytester.makepyfile(
        """
        import pytest, torch

        @pytest.mark.statedict_roundtrip
        def test_default(statedict_roundtrip):
            statedict_roundtrip(torch.nn.Linear(3, 3))
        """
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=1, skipped=3)
    match_lines(result, ["*test_default[cpu->cuda] SKIPPED*"])
