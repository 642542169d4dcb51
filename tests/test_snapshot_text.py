"""The snapshot text is the identity of a snapshot: its fast writer must give the same bytes.

``Schema.to_json`` writes a tensor's line and a parameter's optimizer-state line from pieces
(a ``json.dumps`` per line was most of a snapshot check's time); each line must stay byte
for byte what ``json.dumps`` writes for the same record, or every snapshot on disk would
read as changed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pytest_statedict import schema_of
from pytest_statedict import snapshot_format as schema_module
from pytest_statedict.schema_entries import Fingerprint, ParamState, StateSpec, TensorEntry

# keys as odd as users make them: quotes, backslashes, control and non-ASCII characters
TEXT = st.text(max_size=12)
SHAPES = st.lists(st.integers(0, 2**40), max_size=5).map(tuple)
DTYPES = st.sampled_from(["float32", "bfloat16", "int64", "bool", "float8_e4m3fn"]) | TEXT
OPTIONAL_TEXT = st.none() | TEXT
FINGERPRINTS = st.none() | st.builds(
    Fingerprint,
    xxh3=st.text("0123456789abcdef", min_size=32, max_size=32),
    min=st.floats(),
    max=st.floats(),
    mean=st.floats(),
    std=st.floats(),
)
TENSOR_ENTRIES = st.builds(
    TensorEntry,
    key=TEXT,
    kind=st.sampled_from(["parameter", "buffer", "tensor"]),
    shape=st.none() | SHAPES,
    dtype=st.none() | DTYPES,
    requires_grad=st.none() | st.booleans(),
    tied_to=OPTIONAL_TEXT,
    layout=OPTIONAL_TEXT,
    qscheme=OPTIONAL_TEXT,
    fingerprint=FINGERPRINTS,
)
OBJECT_ENTRIES = st.builds(TensorEntry, key=TEXT, kind=st.just("object"), type=TEXT)
SPECS = st.builds(StateSpec, shape=st.none() | SHAPES, dtype=st.none() | DTYPES) | st.builds(
    StateSpec, type=TEXT
)
PARAM_STATES = st.builds(
    ParamState,
    param=TEXT | st.integers(0, 10**6),
    entries=st.dictionaries(TEXT, SPECS, max_size=4),
)


def generic_entry_line(t: TensorEntry) -> str:
    return schema_module._dump(schema_module._entry_to_json(t))


def generic_state_line(s: ParamState) -> str:
    return schema_module._dump(schema_module._state_to_json(s))


@given(TENSOR_ENTRIES | OBJECT_ENTRIES)
def test_a_tensor_line_is_what_json_dumps_writes(entry: TensorEntry) -> None:
    assert schema_module._entry_line(entry) == generic_entry_line(entry)


@given(PARAM_STATES)
def test_an_optimizer_state_line_is_what_json_dumps_writes(state: ParamState) -> None:
    assert schema_module._state_line(state) == generic_state_line(state)


def test_shapes_and_specs_met_again_are_written_the_same() -> None:
    """The per-process caches of shape and state-spec text give what a first write gives."""
    entry = TensorEntry("w", "parameter", (3, 4), "float32", True)
    state = ParamState("w", {"exp_avg": StateSpec((3, 4), "float32")})
    first = schema_module._entry_line(entry), schema_module._state_line(state)
    assert first == (generic_entry_line(entry), generic_state_line(state))
    assert (schema_module._entry_line(entry), schema_module._state_line(state)) == first


class Odd(nn.Module):
    """Ties, a frozen parameter, a buffer, a non-persistent one, extra state, odd names."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)
        self.norm.requires_grad_(False)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("cache", torch.zeros(3), persistent=False)
        self.add_module('odd "näme"\\', nn.Linear(4, 2))

    def get_extra_state(self) -> dict[str, int]:
        return {"step": 3}

    def set_extra_state(self, state: dict[str, int]) -> None:
        pass


def _trained(optimizer_class: type, **kwargs: object) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Odd()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class(params, **kwargs)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model.head(model.embed(torch.tensor([1, 2]))).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model, optimizer


@pytest.mark.parametrize(
    ("optimizer_class", "kwargs"),
    [
        (torch.optim.AdamW, {"lr": 1e-3, "amsgrad": True}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.LBFGS, {"lr": 0.1}),  # state of ints, lists and tensors
        (torch.optim.Rprop, {"lr": 0.1}),
    ],
)
@pytest.mark.parametrize("values", [False, True])
def test_snapshot_text_is_the_generic_writers_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, optimizer_class: type, kwargs: dict, values: bool
) -> None:
    model, optimizer = _trained(optimizer_class, **kwargs)
    schema = schema_of(model, optimizer=optimizer, values=values)
    fast = schema.to_json()
    monkeypatch.setattr(schema_module, "_entry_line", generic_entry_line)
    monkeypatch.setattr(schema_module, "_state_line", generic_state_line)
    assert fast == schema.to_json()
    assert '"odd \\"n\\u00e4me\\"\\\\.weight"' in fast
