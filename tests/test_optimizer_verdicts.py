"""The optimizer's verdicts: what ``optimizer.load_state_dict(yesterday's state)`` would do.

torch checks only the number of param_groups and their sizes, then hands the saved state
to today's parameters by position: these tests pin each way that goes wrong (against
torch itself where it can raise) and the report line that says so.
"""

from __future__ import annotations

import pytest
import torch
from conftest import match_lines
from torch import nn

from pytest_statedict import StateDictMismatch, assert_state_dict_matches, schema_of
from pytest_statedict.compare import diff_schemas

USES_NET = """
    import torch
    from netmodel import Net, make_optimizer
    from pytest_statedict import assert_state_dict_matches
"""


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def stepped(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    optimizer.step()
    return optimizer


def mismatch(model: nn.Module, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> str:
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(model, schema_of(model, optimizer=old), optimizer=new)
    return str(info.value)


def test_parameter_order_inside_a_group_is_reported_with_the_states_that_move() -> None:
    model = net()
    params = dict(model.named_parameters())
    old = stepped(torch.optim.Adam(params.values(), lr=1e-3), model)
    reordered = [params["1.bias"], *[p for n, p in params.items() if n != "1.bias"]]
    new = torch.optim.Adam(reordered, lr=1e-3)
    # torch itself loads it without a word, with Adam state on the wrong parameters
    new.load_state_dict(old.state_dict())
    assert new.state[params["1.bias"]]["exp_avg"].shape == params["0.weight"].shape

    text = mismatch(model, old, new)
    assert "param_group 0: the order of its parameters changed" in text
    assert "'1.bias' <- state of '0.weight'" in text
    assert (
        "an old optimizer state still loads with optimizer.load_state_dict: yes, but it would "
        "not resume exactly: 4 parameters would get another one's state" in text
    )


def test_a_frozen_layer_makes_the_optimizer_verdict_no_as_torch_raises() -> None:
    model = net()
    old = stepped(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    model[0].requires_grad_(False)
    new = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="doesn't match the size"):
        new.load_state_dict(old.state_dict())
    text = mismatch(model, old, new)
    assert (
        "an old optimizer state still loads with optimizer.load_state_dict: NO, it raises "
        "ValueError (param_group 0 has 6 parameters saved and 4 now)" in text
    )
    assert "an old checkpoint still loads with load_state_dict(strict=True): yes" in text


def test_a_parameter_moved_between_groups_is_no() -> None:
    model = net()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    def grouped(first: list[str]) -> torch.optim.Optimizer:
        rest = [n for n in names if n not in first]
        return torch.optim.AdamW(
            [
                {"params": [params[n] for n in first], "weight_decay": 0.1},
                {"params": [params[n] for n in rest], "weight_decay": 0.0},
            ]
        )

    old, new = grouped(names[:2]), grouped(names[:3])
    with pytest.raises(ValueError, match="doesn't match the size"):
        new.load_state_dict(old.state_dict())
    text = mismatch(model, old, new)
    assert "'1.weight': param_group 1 -> 0 (weight_decay 0.0 -> 0.1)" in text
    assert "NO, it raises ValueError (param_group 0 has 2 parameters saved and 3 now;" in text


def test_swapped_groups_are_one_line() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    old = torch.optim.AdamW([{"params": weights, "weight_decay": 0.1}, {"params": biases}])
    new = torch.optim.AdamW([{"params": biases}, {"params": weights, "weight_decay": 0.1}])
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(model, schema_of(model, optimizer=old), optimizer=new)
    assert info.value.diff.optimizer == [
        "param_groups reordered (0 -> 1, 1 -> 0): each group kept its parameters and "
        "hyperparameters, but a checkpoint's groups load by position"
    ]
    text = str(info.value)
    # equal sizes: torch loads it, every state and hyperparameter on the other group
    assert "yes, but it would not resume exactly: 16 parameters would get another" in text


def test_unchanged_optimizer_says_every_state_lands_on_its_own_parameter() -> None:
    model = net()
    old = stepped(torch.optim.Adam(model.parameters()), model)
    model2 = net()
    model2.add_module("extra", nn.Linear(2, 2))  # a model change, the optimizer unchanged
    new = torch.optim.Adam(p for n, p in model2.named_parameters() if not n.startswith("extra"))
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(model2, schema_of(model, optimizer=old), optimizer=new)
    assert "optimizer.load_state_dict: yes, every state on its own parameter" in str(info.value)


def test_a_state_whose_parameter_was_reshaped_is_not_exact() -> None:
    model = net()
    old = stepped(torch.optim.Adam(model.parameters()), model)
    wider = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
    diff = diff_schemas(
        schema_of(model, optimizer=old),
        schema_of(wider, optimizer=torch.optim.Adam(wider.parameters())),
    )
    assert diff.optimizer_verdict is not None
    assert not diff.optimizer_verdict.exact
    assert diff.optimizer_verdict.reasons == (
        "the state saved for 3.weight, 3.bias would keep the old shape (the next step fails)",
    )


def test_a_reordered_optimizer_fails_its_snapshot_check(
    net_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    net_project.makepyfile(
        test_model=USES_NET
        + """
    import os

    def test_net():
        model = Net()
        params = list(model.parameters())
        if os.environ.get("REORDER"):
            params = [params[1], params[0], *params[2:]]
        assert_state_dict_matches(model, optimizer=torch.optim.Adam(params, lr=1e-3))
    """
    )
    assert net_project.runpytest("--statedict-update").ret == pytest.ExitCode.OK
    monkeypatch.setenv("REORDER", "1")
    result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    match_lines(
        result,
        [
            "*param_group 0: the order of its parameters changed (state loads by position: "
            "'conv1.bias' <- state of 'conv1.weight', 'conv1.weight' <- state of 'conv1.bias')",
            "*an old optimizer state still loads with optimizer.load_state_dict: yes, but it "
            "would not resume exactly: 2 parameters would get another one's state*",
            "*to accept this change: pytest --statedict-update*",
            "statedict: 1 failed",
        ],
    )
