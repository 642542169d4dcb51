"""Schema extraction and the snapshot format, as units."""

from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from dataclasses import astuple, replace
from typing import Any

import pytest
import torch
from torch import nn

from pytest_statedict import Schema, SnapshotError, UnsupportedObjectError, schema_of
from pytest_statedict.errors import StaleSnapshotError
from pytest_statedict.fingerprint import fingerprint
from pytest_statedict.schema_entries import TensorEntry


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("cache", torch.zeros(3), persistent=False)
        self.register_buffer("scale", torch.ones(1))
        self.embed.requires_grad_(False)


def test_module_schema_records_kinds_ties_versions_and_totals() -> None:
    schema = schema_of(Tiny())
    entries = schema.by_key()
    assert list(entries) == [
        "scale",
        "embed.weight",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
        "head.weight",
    ]
    assert entries["embed.weight"].kind == "parameter"
    assert entries["embed.weight"].requires_grad is False
    assert entries["norm.running_mean"].kind == "buffer"
    assert entries["norm.running_mean"].requires_grad is None
    assert entries["norm.num_batches_tracked"].dtype == "int64"
    assert entries["norm.num_batches_tracked"].shape == ()
    assert entries["head.weight"].tied_to == "embed.weight"
    assert schema.non_persistent_buffers == ("cache",)
    assert schema.versions == {"norm": 2}
    # tied storage counted once; frozen embedding not trainable
    assert schema.totals == {
        "tensors": 8,
        "elements": 1 + 40 + 4 * 4 + 1,
        "parameters": 40 + 4 + 4,
        "trainable": 8,
        "bytes": (1 + 40 + 4 * 4) * 4 + 8,
    }


def test_meta_model_schema_equals_real_model_schema() -> None:
    with torch.device("meta"):
        meta = Tiny()
    assert schema_of(meta) == schema_of(Tiny())


def test_state_dict_and_checkpoint_dict() -> None:
    model = Tiny()
    bare = schema_of(model.state_dict())
    assert {t.kind for t in bare} == {"tensor"}
    assert bare.versions == {"norm": 2}
    assert bare.by_key()["head.weight"].tied_to == "embed.weight"
    plain = schema_of({"a": torch.zeros(2, dtype=torch.float16), "b": torch.ones(3)})
    assert plain.versions is None
    assert plain.by_key()["a"].dtype == "float16"

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": 0.5,
    }
    schema = schema_of(checkpoint)
    assert [t.key for t in schema] == [t.key for t in bare]
    assert schema.optimizer is not None
    assert schema.optimizer.param_groups[0].hyperparams["momentum"] == 0.9
    assert schema.extras == {"epoch": "int", "loss": "float"}


def test_non_tensor_sparse_and_quantized_entries() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated, sparse CSR is beta
        state = OrderedDict(
            dense=torch.zeros(2),
            sparse=torch.eye(3).to_sparse(),
            csr=torch.eye(3).to_sparse_csr(),
            q=torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8),
            layer_extra_state={"config": 1},
        )
    schema = schema_of(state)
    entries = schema.by_key()
    assert entries["sparse"].layout == "sparse_coo"
    assert entries["csr"].layout == "sparse_csr"
    assert entries["q"].qscheme == "per_tensor_affine" and entries["q"].dtype == "quint8"
    assert entries["layer_extra_state"].kind == "object"
    assert entries["layer_extra_state"].type == "dict"
    assert Schema.from_json(schema.to_json()) == schema


def test_extra_state_of_a_module() -> None:
    class WithExtra(nn.Linear):
        def get_extra_state(self) -> dict[str, int]:
            return {"format": 2}

        def set_extra_state(self, state: object) -> None:
            pass

    schema = schema_of(WithExtra(2, 2))
    assert schema.by_key()["_extra_state"].kind == "object"


def test_optimizer_schema_by_name_with_state_and_problems() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(
        [
            {"params": [model[0].weight, model[1].weight]},
            {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    opt = schema_of(model, optimizer=optimizer).optimizer
    assert opt is not None
    assert opt.cls == "torch.optim.adamw.AdamW"
    assert opt.param_groups[0].params == ("0.weight", "1.weight")
    assert opt.param_groups[1].hyperparams["weight_decay"] == 0.0
    assert opt.param_groups[0].hyperparams["betas"] == [0.9, 0.999]
    state = {s.param: s.entries for s in opt.state}
    assert state["0.weight"]["exp_avg"].shape == (4, 3)
    assert state["0.weight"]["step"].shape == ()
    assert opt.problems == ()

    # the reordered-model bug: Adam state that belongs to another parameter
    optimizer.state[model[0].weight]["exp_avg"] = torch.zeros(2, 4)
    opt = schema_of(model, optimizer=optimizer).optimizer
    assert opt is not None
    assert opt.problems and "'exp_avg' of '0.weight' has shape [2, 4]" in opt.problems[0]

    by_index = schema_of(optimizer.state_dict()).optimizer
    assert by_index is not None and by_index.param_groups[0].params == (0, 1)

    # a layer-wise (0-dim) moment under an elementwise name, as NovoGrad keeps: by design
    optimizer.state[model[0].weight]["exp_avg"] = torch.zeros(4, 3)
    optimizer.state[model[0].weight]["exp_avg_sq"] = torch.tensor(0.5)
    opt = schema_of(model, optimizer=optimizer).optimizer
    assert opt is not None and opt.problems == ()


def test_fingerprints_are_exact_and_summarise() -> None:
    t = torch.tensor([1.0, -2.0, float("nan")])
    f = fingerprint(t)
    assert math.isnan(f.mean)
    g = fingerprint(torch.tensor([1.0, -2.0, 3.0]))
    assert (g.min, g.max) == (-2.0, 3.0)
    assert g.mean == pytest.approx(2 / 3)
    # dtype matters to the bytes, and -0.0 differs from 0.0
    assert fingerprint(torch.zeros(3)).xxh3 != fingerprint(torch.zeros(3, dtype=torch.float64)).xxh3
    assert fingerprint(torch.tensor([0.0])).xxh3 != fingerprint(torch.tensor([-0.0])).xxh3
    # strided views hash their values, not their storage
    base = torch.arange(12.0).reshape(3, 4)
    assert fingerprint(base.t()).xxh3 == fingerprint(base.t().contiguous()).xxh3
    for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.complex64, torch.bool, torch.uint16):
        fingerprint(torch.ones(4).to(dtype))
    assert fingerprint(torch.zeros(0)).xxh3
    with pytest.raises(UnsupportedObjectError, match="meta device"):
        fingerprint(torch.empty(2, device="meta"), "w")


def test_values_round_trip_through_json() -> None:
    state = {"w": torch.tensor([1.0, float("inf"), float("nan")]), "e": torch.zeros(0)}
    schema = schema_of(state, values=True)
    again = Schema.from_json(schema.to_json())
    assert [t.fingerprint for t in again] == [t.fingerprint for t in schema]
    json.loads(schema.to_json())  # strict JSON: no NaN literals


def test_snapshot_json_is_stable_and_round_trips() -> None:
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters())
    schema = schema_of(model, optimizer=optimizer)
    text = schema.to_json()
    other = Tiny()
    assert text == schema_of(other, optimizer=torch.optim.Adam(other.parameters())).to_json()
    assert Schema.from_json(text) == schema
    assert all(len(line) < 400 for line in text.splitlines())
    assert sum('"key":' in line for line in text.splitlines()) == len(schema)


BASE = Schema(
    tensors=(
        TensorEntry("a", "parameter", (3,), "float32", requires_grad=True),
        TensorEntry("b", "buffer", (2,), "int64"),
    ),
    versions={},
)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: "", "the file is empty"),
        (lambda t: t[:-5], "invalid JSON"),
        (lambda t: "[]", "not a statedict snapshot"),
        (lambda t: t.replace('"kind": "buffer"', '"kind": "weights"'), "kind 'weights'"),
        (lambda t: t.replace('"shape": [3]', '"shape": [-3]'), "non-negative integers"),
        (lambda t: t.replace('"shape": [3]', '"shape": "3"'), "non-negative integers"),
        (lambda t: t.replace('"requires_grad": true', '"requires_grad": 1'), "true or false"),
        (lambda t: t.replace('"key": "b"', '"key": "a"'), "'a' appears more than once"),
        (lambda t: t.replace('"kind": "buffer"', '"kind": "buffer", "kind": "buffer"'),
         "duplicated field 'kind'"),
        (lambda t: t.replace('"dtype": "int64"', '"dtype": "int64", "colour": 1'),
         "unknown field 'colour'"),
        (lambda t: t.replace('"dtype": "int64"', '"dtype": "int65"'), "unknown dtype 'int65'"),
        (lambda t: t.replace('"tensors": [', '"tensorz": ['), '"tensors" is missing'),
        (lambda t: t.replace('"versions": {}', '"versions": {"x": [2]}'), '"versions" must be'),
        (lambda t: t.replace('"versions": {}', '"versionz": {}'), "unknown field 'versionz'"),
        (lambda t: t.replace('"shape": [2]', '"shap": [2]'), "'b': unknown field 'shap'"),
        (lambda t: t.replace(', "shape": [2]', ''), """'b': no "shape" field"""),
        (lambda t: t.replace('"tensors": [', '"ordered": 0, "tensors": ['), '"ordered" must be'),
    ],
)  # fmt: skip
def test_hand_edited_snapshots_are_named_errors(edit: Any, message: str) -> None:
    text = BASE.to_json()
    assert Schema.from_json(text) == BASE
    with pytest.raises(SnapshotError, match=message) as info:
        Schema.from_json(edit(text), "snap/0.json")
    assert "snap/0.json" in str(info.value)
    assert "regenerate it with `pytest --statedict-update`" in str(info.value)


def test_snapshot_from_a_newer_plugin_asks_for_an_upgrade_not_a_downgrade() -> None:
    text = BASE.to_json().replace('"version": 1', '"version": 99')
    with pytest.raises(StaleSnapshotError, match="format version 99") as info:
        Schema.from_json(text, "snap/0.json")
    assert "from a newer pytest-statedict: upgrade the plugin" in str(info.value)
    assert "pytest --statedict-update" not in str(info.value)


def test_unordered_schemas_round_trip_through_json() -> None:
    unordered = replace(BASE, ordered=False)
    text = unordered.to_json()
    assert '"ordered": false' in text and '"ordered"' not in BASE.to_json()
    assert Schema.from_json(text).ordered is False


def test_stale_format_is_its_own_error() -> None:
    text = schema_of({"a": torch.zeros(1)}).to_json().replace('"version": 1', '"version": 0')
    with pytest.raises(StaleSnapshotError):
        Schema.from_json(text, "x.json")


def test_error_points_at_the_line() -> None:
    text = schema_of({"a": torch.zeros(1), "b": torch.zeros(1)}).to_json()
    bad = text.replace('"key": "b", "kind": "tensor"', '"key": "b", "kind": "nope"')
    with pytest.raises(SnapshotError) as info:
        Schema.from_json(bad, "x.json")
    assert (
        info.value.line
        == bad.splitlines().index(next(line for line in bad.splitlines() if '"key": "b"' in line))
        + 1
    )


def test_unsupported_objects() -> None:
    with pytest.raises(UnsupportedObjectError, match="builtins.list"):
        schema_of([torch.zeros(1)])
    with pytest.raises(UnsupportedObjectError, match="bound method Linear.state_dict"):
        schema_of(nn.Linear(1, 1).state_dict)
    with pytest.raises(UnsupportedObjectError, match="neither a state_dict"):
        schema_of({"config": {"lr": 1}})
    with pytest.raises(UnsupportedObjectError, match="optimizer="):
        schema_of(nn.Linear(1, 1), optimizer=42)


def test_fingerprints_need_no_numpy() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import torch\n"
        "from pytest_statedict.fingerprint import fingerprint\n"
        "print(fingerprint(torch.arange(10.0)).xxh3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fingerprint(torch.arange(10.0)).xxh3


def test_big_tensor_fingerprint_hashes_everything_and_samples_statistics() -> None:
    from pytest_statedict.fingerprint import STAT_SAMPLE

    t = torch.linspace(-1, 1, 3 * STAT_SAMPLE)
    f = fingerprint(t)
    assert (f.min, f.max) == (-1.0, 1.0), "the sample includes both ends"
    assert abs(f.mean) < 1e-3
    nudged = t.clone()
    nudged[STAT_SAMPLE + 7] += 1e-3  # between two sampled blocks
    assert fingerprint(nudged).xxh3 != f.xxh3
    assert fingerprint(t + 1e-6).close_to(f, rtol=0, atol=1e-5) == []


def test_fingerprints_hashed_on_a_second_thread_equal_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over OVERLAP_MIN_BYTES the hashing runs on a worker thread: same results."""
    import threading

    import pytest_statedict.fingerprint as fingerprints

    big = torch.randn(fingerprints.OVERLAP_MIN_BYTES // 4 + 7)
    state = {
        "big": big,
        "param": nn.Parameter(torch.randn(300, 300)),
        "strided": torch.randn(64, 64).t(),  # copied, so fingerprinted on the caller's thread
        "ints": torch.arange(1000, dtype=torch.int64),
        "sparse": torch.eye(5).to_sparse(),
        "view": big[10:20],
        "conj": torch.randn(4, dtype=torch.complex64).conj(),  # a lazy view
    }

    def whole(f: Any) -> tuple[Any, ...]:  # Fingerprint equality looks at the hash alone
        return astuple(f)

    hashed_on: set[str] = set()
    digests = fingerprints.tensor_digests

    def recording(t: torch.Tensor, *tail: bytes) -> Any:
        hashed_on.add(threading.current_thread().name)
        return digests(t, *tail)

    monkeypatch.setattr(fingerprints, "tensor_digests", recording)
    schema = schema_of(state, values=True)
    assert hashed_on == {"statedict-xxh3", threading.main_thread().name}  # both paths ran
    assert {t.key: whole(t.fingerprint) for t in schema.tensors} == {
        key: whole(fingerprint(value, key)) for key, value in state.items()
    }


def test_a_failure_on_the_hashing_thread_reaches_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import pytest_statedict.fingerprint as fingerprints

    def broken(t: torch.Tensor) -> bytes:
        assert threading.current_thread().name == "statedict-xxh3"
        raise MemoryError("cannot map")

    monkeypatch.setattr(fingerprints, "tensor_digests", broken)
    with pytest.raises(MemoryError, match="cannot map"):
        schema_of({"big": torch.zeros(fingerprints.OVERLAP_MIN_BYTES // 4)}, values=True)


def test_a_meta_tensor_is_refused_before_any_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytest_statedict.fingerprint as fingerprints

    def never(t: torch.Tensor) -> bytes:
        raise AssertionError("hashed before the meta tensor was refused")

    monkeypatch.setattr(fingerprints, "tensor_digests", never)
    state = {"big": torch.zeros(1 << 23), "meta": torch.empty(3, device="meta")}
    with pytest.raises(UnsupportedObjectError, match="'meta' is on the meta device"):
        schema_of(state, values=True)


@pytest.mark.parametrize("seed", range(5))
def test_a_change_within_allclose_tolerance_always_passes_the_statistics(seed: int) -> None:
    """Mean near zero included: the bound scales with the values, not with the mean."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(50_000, generator=g) * 0.02  # a weight-like tensor, mean ~ 0
    rtol, atol = 1e-4, 1e-6
    tolerance = atol + rtol * old.abs()
    wiggle = (torch.rand(old.shape, generator=g) * 2 - 1) * 0.9  # inside, float32 rounding aside
    upward = torch.full_like(old, 0.9)  # every element up by 90 % of its tolerance
    for change in (wiggle, upward):
        new = old + change * tolerance
        assert torch.allclose(new, old, rtol=rtol, atol=atol)
        assert fingerprint(new).close_to(fingerprint(old), rtol, atol) == []
    shifted = old + 20 * (atol + rtol * old.abs().max())  # every element beyond tolerance
    assert fingerprint(shifted).close_to(fingerprint(old), rtol, atol) != []
