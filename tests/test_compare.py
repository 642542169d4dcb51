"""Diffs of schemas, and their words."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import (
    StateDictError,
    StateDictMismatch,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.compare import diff_schemas
from pytest_statedict.rename import compile_rename, normalise
from pytest_statedict.report import render_diff, suggest_rename


def net(width: int = 4, **extra: nn.Module) -> nn.Module:
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(3, width))
    model.add_module("norm", nn.LayerNorm(width))
    model.add_module("decoder", nn.Linear(width, 2))
    for name, module in extra.items():
        model.add_module(name, module)
    return model


def test_identical_schemas_have_no_diff() -> None:
    diff = diff_schemas(schema_of(net()), schema_of(net()))
    assert not diff
    assert diff.loads_strict


def test_everything_is_reported_at_once() -> None:
    old = net()
    new = net(width=5)
    new.decoder.weight.requires_grad_(False)
    new.add_module("extra", nn.Linear(1, 1))
    diff = diff_schemas(schema_of(old), schema_of(new))
    changed = {(c.key, c.attribute) for c in diff.changed}
    assert ("encoder.weight", "shape") in changed
    assert ("norm.weight", "shape") in changed
    assert ("decoder.weight", "shape") in changed
    assert ("decoder.weight", "requires_grad") in changed
    assert [t.key for t in diff.added] == ["extra.weight", "extra.bias"]
    assert not diff.loads_strict
    text = render_diff(diff, title="t")
    assert "NO (2 missing keys, 5 shape mismatches)" in text


def test_renames_are_paired_by_shape_and_suggested_as_one_rule() -> None:
    old = net()
    new = nn.Sequential()
    new.add_module("backbone", nn.Linear(3, 4))
    new.add_module("norm", nn.LayerNorm(4))
    new.add_module("decoder", nn.Linear(4, 2))
    diff = diff_schemas(schema_of(old), schema_of(new))
    assert diff.renames == [
        ("encoder.weight", "backbone.weight"),
        ("encoder.bias", "backbone.bias"),
    ]
    assert suggest_rename(diff.renames, "actual->expected") == (
        "rename=[(r'^backbone\\.', 'encoder.')]"
    )
    # applying the suggestion makes them match
    assert_state_dict_matches(new, old, rename=[(r"^backbone\.", "encoder.")])


def test_rename_forms_and_ignore() -> None:
    schema = schema_of(net())
    as_dict = normalise(schema, rename=compile_rename({"encoder.bias": "enc.b"}))
    assert "enc.b" in as_dict.by_key()
    as_call = normalise(schema, rename=compile_rename(str.upper))
    assert "ENCODER.WEIGHT" in as_call.by_key()
    as_rules = normalise(schema, rename=compile_rename([(r"^(\w+)\.", r"\1/")]))
    assert "norm/bias" in as_rules.by_key()
    ignored = normalise(schema, ignore=["norm.*", "*.bias"])
    assert [t.key for t in ignored] == ["encoder.weight", "decoder.weight"]


def test_wrapper_prefix_is_detected_not_listed_key_by_key() -> None:
    old = schema_of(net())
    wrapped = schema_of(nn.DataParallel(net()))
    diff = diff_schemas(old, wrapped)
    assert diff.prefix == ("added", "module.")
    assert not diff.added and not diff.removed
    text = render_diff(diff, title="t")
    assert "strip it with rename=[(r'^module\\.', '')]" in text
    assert not diff_schemas(wrapped, old).added
    assert diff_schemas(wrapped, old).prefix == ("dropped", "module.")
    assert_state_dict_matches(nn.DataParallel(net()), net(), rename=[(r"^module\.", "")])


def test_order_change_is_reported() -> None:
    a = {"x": torch.zeros(1), "y": torch.zeros(2), "z": torch.zeros(3)}
    b = {"y": torch.zeros(2), "x": torch.zeros(1), "z": torch.zeros(3)}
    diff = diff_schemas(schema_of(a), schema_of(b))
    assert len(diff.moved) == 1 and diff.moved[0][0] in ("x", "y")
    assert diff.loads_strict


def test_dtype_change_loads_but_is_reported() -> None:
    diff = diff_schemas(schema_of(net()), schema_of(net().to(torch.bfloat16)))
    assert {c.attribute for c in diff.changed} == {"dtype"}
    assert diff.loads_strict
    assert "yes (dtypes changed: values are converted on load)" in render_diff(diff, title="t")


def test_tying_change_is_reported() -> None:
    tied = nn.ModuleDict({"a": nn.Linear(2, 2, bias=False), "b": nn.Linear(2, 2, bias=False)})
    untied = nn.ModuleDict({"a": nn.Linear(2, 2, bias=False), "b": nn.Linear(2, 2, bias=False)})
    tied.b.weight = tied.a.weight
    diff = diff_schemas(schema_of(tied), schema_of(untied))
    assert [(c.key, c.attribute) for c in diff.changed] == [("b.weight", "tied_to")]
    assert "~ b.weight: tying tied to a.weight -> untied" in render_diff(diff, title="t")


def test_optimizer_differences() -> None:
    model = net()
    old = torch.optim.AdamW(
        [
            {"params": [model.encoder.weight, model.decoder.weight]},
            {"params": [model.encoder.bias, model.decoder.bias], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    new = torch.optim.AdamW(
        [
            {"params": [model.encoder.weight]},
            {"params": [model.decoder.weight, model.encoder.bias, model.decoder.bias],
             "weight_decay": 0.0},
        ],
        lr=3e-4,
    )  # fmt: skip
    diff = diff_schemas(schema_of(model, optimizer=old), schema_of(model, optimizer=new))
    text = "\n".join(diff.optimizer)
    assert (
        "'decoder.weight': param_group 0 -> 1 (lr 0.001 -> 0.0003, weight_decay 0.01 -> 0.0)"
        in text
    )
    assert "lr'] changed from 0.001 to 0.0003" in text
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    diff = diff_schemas(schema_of(model, optimizer=old), schema_of(model, optimizer=sgd))
    assert diff.optimizer[0] == "class: torch.optim.adamw.AdamW -> torch.optim.sgd.SGD"
    assert diff_schemas(schema_of(model, optimizer=old), schema_of(model)).optimizer == [
        "an optimizer (torch.optim.adamw.AdamW) on the expected side only"
    ]


def test_optimizer_by_index_compares_with_optimizer_by_name() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    named = schema_of(model, optimizer=optimizer)
    indexed = schema_of(model.state_dict(), optimizer=optimizer.state_dict())
    diff = diff_schemas(named, indexed)
    assert diff.optimizer == []


def test_assert_state_dict_matches_direct_and_bounded_message() -> None:
    big_old = {f"w{i}": torch.zeros(2) for i in range(30)}
    big_new = {f"v{i}": torch.zeros(3) for i in range(30)}
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(big_new, big_old)
    message = str(info.value)
    assert message.startswith("state_dict differs from the expected dict")
    assert "removed (30):" in message and "... and 18 more (-vv shows all)" in message
    assert info.value.diff is not None and len(info.value.diff.removed) == 30


def test_values_exact_and_tolerant_direct() -> None:
    a = {"w": torch.linspace(0, 1, 100)}
    b = {"w": torch.linspace(0, 1, 100) + 1e-7}
    assert_state_dict_matches(a, a, values=True)
    with pytest.raises(StateDictMismatch, match="w: values xxh3"):
        assert_state_dict_matches(b, a, values=True)
    assert_state_dict_matches(b, a, values=True, atol=1e-5)
    with pytest.raises(StateDictMismatch, match="rtol=0.001"):
        assert_state_dict_matches({"w": a["w"] * 2}, a, values=True, rtol=1e-3)


def test_values_recorded_on_one_side_only() -> None:
    a = {"w": torch.zeros(2)}
    diff = diff_schemas(schema_of(a, values=True), schema_of(a))
    assert "values recorded on the expected side only" in render_diff(diff, title="t")


def test_optimizer_diff_follows_renames_and_names_state() -> None:
    old_model = net()
    new_model = nn.Sequential()
    new_model.add_module("backbone", nn.Linear(3, 4))
    new_model.add_module("norm", nn.LayerNorm(4))
    new_model.add_module("decoder", nn.Linear(4, 2))
    schemas = []
    for model, momentum in ((old_model, 0.9), (new_model, 0.0)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
        schemas.append(schema_of(model, optimizer=optimizer))
    diff = diff_schemas(*schemas)
    assert diff.renames == [
        ("encoder.weight", "backbone.weight"),
        ("encoder.bias", "backbone.bias"),
    ]
    text = "\n".join(diff.optimizer)
    assert "param_group" not in text.replace("param_groups[0]", ""), "renames are not moves"
    assert "state saved for 6 parameters (momentum_buffer), today for none" in text
    assert "changed from 0.9 to 0.0" in text


def test_implementation_flags_are_not_recorded() -> None:
    model = nn.Linear(2, 2)
    hyper = schema_of(model, optimizer=torch.optim.AdamW(model.parameters(), foreach=False))
    assert hyper.optimizer is not None
    recorded = set(hyper.optimizer.param_groups[0].hyperparams)
    assert not recorded & {"foreach", "fused", "capturable", "differentiable"}
    assert {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"} <= recorded


class Wrapped(nn.Module):
    """What DataParallel / DDP do to keys: the model under ``module.``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def bn_net(head: str = "fc") -> nn.Module:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))  # module version 2
    model.add_module(head, nn.Linear(4, 2))
    return model


def two_groups(model: nn.Module) -> torch.optim.Optimizer:
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.01},
            {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0},
        ]
    )


def test_a_wrapper_prefix_is_reported_once_not_as_changed_module_versions() -> None:
    model = bn_net()
    diff = diff_schemas(schema_of(model), schema_of(Wrapped(model)))
    assert diff.prefix == ("added", "module.")
    assert diff.versions == []
    assert diff_schemas(schema_of(Wrapped(model)), schema_of(model)).versions == []


@pytest.mark.parametrize(
    "rename",
    [[(r"^module\.", "")], lambda k: k.removeprefix("module.")],
    ids=["regex", "callable"],
)
def test_rename_carries_module_versions_and_optimizer_members(rename: object) -> None:
    model = bn_net()
    wrapped = Wrapped(model)
    expected = schema_of(model, optimizer=two_groups(model))
    assert_state_dict_matches(wrapped, expected, optimizer=two_groups(wrapped), rename=rename)


def test_rename_of_a_submodule_carries_its_optimizer_members() -> None:
    old, new = bn_net("fc"), bn_net("head")
    expected = schema_of(old, optimizer=two_groups(old))
    assert_state_dict_matches(
        new, expected, optimizer=two_groups(new), rename=[(r"^head\.", "fc.")]
    )
    with pytest.raises(StateDictMismatch, match="likely renamed") as info:
        assert_state_dict_matches(new, expected, optimizer=two_groups(new))
    assert info.value.diff.optimizer == []  # the renames explain the optimizer too


def test_ignore_leaves_out_optimizer_members_and_versions_of_ignored_keys() -> None:
    old, new = bn_net("fc"), bn_net("head")
    expected = schema_of(old, optimizer=two_groups(old))
    assert_state_dict_matches(new, expected, optimizer=two_groups(new), ignore=["fc.*", "head.*"])
    dropped = normalise(schema_of(old), ignore=["bn.*"])
    assert dropped.versions == {}
    assert normalise(schema_of(old), ignore=["fc.*"]).versions == {"bn": 2}


def test_renamed_versions_follow_their_keys_or_stay_put() -> None:
    schema = schema_of(Wrapped(bn_net()))
    assert schema.versions == {"module.bn": 2}
    assert normalise(schema, rename=lambda k: k.removeprefix("module.")).versions == {"bn": 2}
    assert normalise(schema, rename=lambda k: k.replace("bn.", "norm.")).versions == {
        "module.norm": 2
    }
    # keys of one module sent different ways: the module keeps its name
    split = normalise(schema, rename=lambda k: k.replace("bn.running", "stats.running"))
    assert split.versions == {"module.bn": 2}


def test_moved_keys_never_list_a_key_at_its_old_position() -> None:
    old = net()
    new = nn.Sequential()
    new.add_module("decoder", nn.Linear(4, 2))
    new.add_module("norm", nn.LayerNorm(4))
    new.add_module("encoder", nn.Linear(3, 4))
    diff = diff_schemas(schema_of(old), schema_of(new))
    assert diff.moved
    assert all(before != after for _, before, after in diff.moved)


class Unregistered(nn.Module):
    """The classic mistake: layers in a plain list are not part of the state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(2, 2), nn.Linear(2, 2)]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({}, "nothing to check: an empty state_dict"),
        (nn.ReLU(), r"torch.nn.modules.activation.ReLU has nothing in its state_dict"),
        (Unregistered(), r"layers hold\(s\) modules in a plain list.*nn.ModuleList"),
    ],
    ids=["empty-dict", "stateless-module", "plain-list"],
)
def test_an_empty_state_dict_is_not_silently_matched(obj: object, expected: str) -> None:
    from pytest_statedict import UnsupportedObjectError

    with pytest.raises(UnsupportedObjectError, match=expected):
        assert_state_dict_matches(obj, {})


def test_registered_layers_are_not_reported_as_unregistered() -> None:
    from pytest_statedict.extract import nothing_to_check

    model = nn.Sequential(nn.ReLU(), nn.Identity())
    assert "plain list" not in str(nothing_to_check(model))


def test_ignore_against_a_checkpoint_whose_optimizer_counts_by_position() -> None:
    """A bare optimizer state_dict names members by index: nothing to drop by name there."""
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    optimizer = two_groups(model)
    checkpoint = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
    }
    for pattern in ("2.*", "0.*"):
        assert_state_dict_matches(model, checkpoint, optimizer=optimizer, ignore=[pattern])


def test_ignoring_a_tie_target_still_reports_an_untied_weight() -> None:
    def lm(tied: bool) -> nn.Module:
        model = nn.Module()
        model.embed = nn.Embedding(5, 4)
        model.lm_head = nn.Linear(4, 5, bias=False)
        if tied:
            model.lm_head.weight = model.embed.weight
        return model

    diff = diff_schemas(
        normalise(schema_of(lm(True)), ignore=["embed.*"]),
        normalise(schema_of(lm(False)), ignore=["embed.*"]),
    )
    assert [(c.key, c.attribute, c.expected, c.actual) for c in diff.changed] == [
        ("lm_head.weight", "tied_to", "embed.weight", None)
    ]


def test_a_wrapper_prefix_carries_non_persistent_buffers() -> None:
    model = bn_net()
    model[0].register_buffer("inv_freq", torch.ones(2), persistent=False)
    diff = diff_schemas(schema_of(model), schema_of(Wrapped(model)))
    assert diff.prefix == ("added", "module.")
    assert diff.non_persistent == ([], [])
    assert not diff.removed and not diff.added and not diff.changed


def test_a_rename_that_merges_two_keys_is_refused() -> None:
    from pytest_statedict import StateDictError

    two = nn.Sequential(nn.Linear(5, 5), nn.Linear(2, 3))
    with pytest.raises(StateDictError, match="maps both '0.weight' and '1.weight' to 'weight'"):
        assert_state_dict_matches(two, nn.Linear(2, 3), rename=lambda k: k.split(".")[-1])


class Versioned(nn.Module):
    """A module with a version and no tensors of its own."""

    _version = 3


def test_a_versioned_module_without_keys_follows_a_rename() -> None:
    inner = nn.Sequential()
    inner.add_module("act", Versioned())
    inner.add_module("fc", nn.Linear(2, 2))
    assert schema_of(Wrapped(inner)).versions == {"module.act": 3}
    assert_state_dict_matches(Wrapped(inner), schema_of(inner), rename=[(r"^module\.", "")])
    # a mapping of exact keys says nothing about modules: the version stays where it was
    mapping = compile_rename({"module.fc.weight": "fc.weight"})
    mapped = normalise(schema_of(Wrapped(inner)), rename=mapping)
    assert mapped.versions == {"module.act": 3}


def test_nothing_to_check_says_what_was_empty(tmp_path: Path) -> None:
    from pytest_statedict import Schema
    from pytest_statedict.extract import nothing_to_check

    only_non_persistent = nn.Module()
    only_non_persistent.register_buffer("cache", torch.zeros(2), persistent=False)
    assert "its buffers cache are non-persistent" in str(nothing_to_check(only_non_persistent))
    assert f"{tmp_path / 'empty.pt'} holds no tensors" in str(
        nothing_to_check(tmp_path / "empty.pt")
    )
    assert "the schema snap.json has no keys" in str(
        nothing_to_check(Schema(tensors=(), source="snap.json"))
    )


def test_a_rename_must_return_a_name() -> None:
    from pytest_statedict import StateDictError

    table = {"0.weight": "a.weight"}
    with pytest.raises(StateDictError, match="gave None for key '0.bias'"):
        assert_state_dict_matches(nn.Sequential(nn.Linear(2, 2)), {}, rename=table.get)


def test_a_rename_is_only_asked_about_real_keys_and_keyless_modules_follow_their_parent() -> None:
    inner = nn.Sequential()
    inner.add_module("act", Versioned())
    inner.add_module("fc", nn.Linear(2, 2))
    table = {"module.fc.weight": "fc.weight", "module.fc.bias": "fc.bias"}
    schema = normalise(schema_of(Wrapped(inner)), rename=table.__getitem__)  # KeyError on others
    assert schema.versions == {"act": 3}
    assert normalise(schema_of(Wrapped(inner)), ignore=["module.*"]).versions == {}
    # the other way round: wrapping adds the prefix to a top-level keyless module too
    wrap = normalise(schema_of(inner), rename=compile_rename([(r"^", "module.")]))
    assert wrap.versions == {"module.act": 3}


def test_the_wrappers_own_module_versions_are_not_compared() -> None:
    class VersionedWrapper(Wrapped):
        _version = 2

    inner = nn.Sequential(nn.Linear(2, 2))
    diff = diff_schemas(schema_of(inner), schema_of(VersionedWrapper(inner)))
    assert diff.prefix == ("added", "module.")
    assert diff.versions == []


def test_keys_merged_by_a_rename_may_all_be_ignored() -> None:
    class Rope(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rope", torch.ones(2))

    two = nn.Sequential()
    two.add_module("l0", Rope())
    two.add_module("l1", Rope())
    merged = normalise(
        schema_of(two), rename=compile_rename([(r"^l\d\.rope$", "rope")]), ignore=["*rope"]
    )
    assert merged.tensors == ()


def test_values_against_a_stored_schema_or_snapshot_with_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net()
    stored = schema_of(model, values=True)
    snapshot = tmp_path / "model.json"
    snapshot.write_text(stored.to_json())
    for expected in (stored, snapshot):
        assert_state_dict_matches(model, expected, values=True)
    with torch.no_grad():
        model.encoder.bias[0] += 1.0
    for expected in (stored, snapshot):
        with pytest.raises(StateDictMismatch, match="encoder.bias"):
            assert_state_dict_matches(model, expected, values=True)
    bare = tmp_path / "bare.json"
    bare.write_text(schema_of(model).to_json())
    with pytest.raises(StateDictError, match="taken with values=True"):
        assert_state_dict_matches(model, bare, values=True)
    with pytest.raises(StateDictError, match="taken with values=True"):
        assert_state_dict_matches(model, schema_of(model), values=True)
