"""The round-trip's resume check on every kind of optimizer the conformance sweep met.

LBFGS's step needs a closure, SparseAdam sparse gradients, a second-order optimizer
gradients of gradients; optimizers that draw random numbers must resume exactly when
their state_dict holds all they keep, and say why not when it does not. A model whose
state a weights-only load refuses is named, not a crash about a temporary file.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from pytest_statedict import UnsupportedFormatError, roundtrip
from pytest_statedict.bitwise import tensor_difference


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def stepped(model: nn.Module, optimizer: torch.optim.Optimizer, **backward: Any) -> None:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(torch.randn(5, 4)).pow(2).sum()
        loss.backward(**backward)
        return loss

    optimizer.step(closure)


@pytest.mark.parametrize("name", sorted(
    n for n in ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam",
                "RAdam", "RMSprop", "Rprop", "LBFGS", "Adafactor", "Muon")
    if hasattr(torch.optim, n)
))  # fmt: skip
def test_every_torch_optimizer_resumes_exactly_and_the_cost_is_stated(name: str) -> None:
    model = mlp()
    params = model.parameters()
    if name == "Muon":  # Muon orthogonalises matrices only: the biases go elsewhere
        params = [p for p in model.parameters() if p.dim() == 2]
    optimizer = getattr(torch.optim, name)(params, lr=0.01)
    stepped(model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = roundtrip(model, optimizer)
    assert result.ok, str(result)
    assert result.resume.startswith("one more optimizer step on a copy and on the reloaded model")
    assert "check_resume=False skips it" in str(result)
    assert all(tensor_difference(v, model.state_dict()[k]) is None for k, v in before.items())


def test_sparse_adam_gets_sparse_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Embedding(10, 4, sparse=True)
    optimizer = torch.optim.SparseAdam(model.parameters(), lr=0.01)
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    result = roundtrip(model, optimizer)
    assert result.ok, str(result)
    assert result.resume.startswith("one more optimizer step")


def test_a_changed_step_is_still_caught_with_a_closure() -> None:
    class ForgetfulLBFGS(torch.optim.LBFGS):
        def load_state_dict(self, state_dict: Any) -> None:
            super().load_state_dict(state_dict)
            for step in self.state[self._params[0]]["old_stps"]:
                step.mul_(2)  # the curvature history, which the next step builds on

    model = mlp()
    optimizer = ForgetfulLBFGS(model.parameters(), lr=0.1)
    stepped(model, optimizer)
    result = roundtrip(model, optimizer)
    assert any(m.startswith("after one more step: 0.weight") for m in result.mismatches)
    assert "resuming from the checkpoint does not continue training exactly" in result.mismatches


class NoisySGD(torch.optim.SGD):
    """Adds noise from torch's global generator, as optimizers with stochastic rounding or
    random preconditioner updates do: a resume is exact with the same random numbers."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.rand(p.shape), alpha=1e-3)
        return loss


def test_random_numbers_drawn_in_a_step_are_the_same_on_both_sides() -> None:
    model = mlp()
    optimizer = NoisySGD(model.parameters(), lr=0.01)
    stepped(model, optimizer)
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    result = roundtrip(model, optimizer)
    assert result.ok, str(result)
    # the user's generator is left as it was
    assert torch.equal(torch.rand(3), expected_next)


class PrivateRandomSGD(torch.optim.SGD):
    """Keeps a random generator on the object, outside state_dict (and copies it)."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.rng = random.Random(7)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "rng": self.rng}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        scale = self.rng.random()
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(1 - 1e-3 * scale)
        return loss


def test_state_kept_outside_state_dict_is_named_when_resume_is_not_exact() -> None:
    model = mlp()
    optimizer = PrivateRandomSGD(model.parameters(), lr=0.01)
    stepped(model, optimizer)
    result = roundtrip(model, optimizer)
    assert not result.ok
    assert "resuming from the checkpoint does not continue training exactly" in result.mismatches
    assert (
        "PrivateRandomSGD keeps state outside its state_dict, which a checkpoint does not "
        "carry: rng (random.Random)" in result.mismatches
    )


class SecondOrderSGD(torch.optim.SGD):
    is_second_order = True  # timm's convention (AdaHessian): needs create_graph gradients


def test_a_second_order_optimizer_skips_the_resume_step_with_the_reason() -> None:
    model = mlp()
    optimizer = SecondOrderSGD(model.parameters(), lr=0.01, momentum=0.9)
    stepped(model, optimizer)
    result = roundtrip(model, optimizer)
    assert result.ok, str(result)
    assert result.resume.startswith("skipped: SecondOrderSGD is a second-order optimizer")
    assert "resume check: skipped" in str(result)


def test_without_an_optimizer_there_is_no_resume_line() -> None:
    result = roundtrip(mlp())
    assert result.ok and result.resume == "" and "resume check" not in str(result)


@pytest.mark.skipif(
    torch.backends.quantized.engine == "none", reason="this torch has no quantized engine"
)
def test_state_a_weights_only_load_refuses_is_named_by_key() -> None:
    model = torch.ao.quantization.quantize_dynamic(
        nn.Sequential(nn.LSTM(4, 4)), {nn.LSTM}, dtype=torch.qint8
    )
    with pytest.raises(UnsupportedFormatError) as info:
        roundtrip(model)
    message = str(info.value)
    assert "torch.load(weights_only=True) refuses to unpickle" in message
    assert "0._all_weight_values.0.param (a TorchScript object" in message
    assert "statedict-roundtrip" not in message  # not about the temporary file
