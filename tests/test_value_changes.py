"""Where and how values changed: block digests and means, signed zeros and NaN payloads."""

from __future__ import annotations

import json
import math
import re
from dataclasses import astuple

import pytest
import torch
import xxhash
from conftest import match_lines
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest_statedict.fingerprint as fingerprints
from pytest_statedict import (
    Schema,
    StateDictMismatch,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.compare import diff_schemas
from pytest_statedict.errors import SnapshotError
from pytest_statedict.fingerprint import STAT_SAMPLE, fingerprint
from pytest_statedict.schema_entries import Fingerprint


def values_line(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> str:
    """The report's one line for the values of the single key of two state_dicts."""
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(actual, expected, values=True)
    (line,) = [x.strip() for x in str(info.value).splitlines() if ": values " in x]
    return line


def with_bits(t: torch.Tensor, index: int, bits: int) -> torch.Tensor:
    """A copy of float32 ``t`` whose element ``index`` holds the raw ``bits``."""
    out = t.clone()
    out.view(torch.int32).reshape(-1)[index] = bits - (1 << 32) if bits >> 31 else bits
    return out


def sampled_positions(n: int) -> list[int]:
    """The flat indices the statistics read, as documented: all, or 64 spaced runs of 256."""
    if n <= STAT_SAMPLE:
        return list(range(n))
    stride = (n - 256) // 63
    return [i * stride + j for i in range(63) for j in range(256)] + list(range(n - 256, n))


def statistics_as_before(t: torch.Tensor) -> tuple[float, float, float, float]:
    """min, max, mean and std as snapshots before block digests computed them."""
    real = torch.view_as_real(t) if t.is_complex() else t
    x = real.reshape(-1)[sampled_positions(real.numel())].to(torch.float64)
    n = x.numel()
    mean = x.sum().item() / n
    centred = x - mean
    std = math.sqrt((centred * centred).sum().item() / n)
    return x.min().item(), x.max().item(), float(f"{mean:.12g}"), float(f"{std:.12g}")


# ---- block geometry, digests and means ----------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "first", "count"),
    [
        ((64, 64), (0, 512), 8),  # whole rows: 8 of 64 a block
        ((100, 7), (0, 91), 8),  # 13 rows a block, the last one short
        ((4, 1000), (0, 500), 8),  # fewer rows than blocks: runs of elements
        ((5,), (0, 1), 5),  # an element a block
        ((), (0, 1), 1),
    ],
)
def test_blocks_cover_the_tensor_in_at_most_eight_runs(
    shape: tuple[int, ...], first: tuple[int, int], count: int
) -> None:
    ranges = Fingerprint.block_ranges(shape)
    assert ranges[0] == first and len(ranges) == count <= Fingerprint.BLOCKS
    assert [s for s, _ in ranges[1:]] == [e for _, e in ranges[:-1]], "contiguous"
    assert ranges[-1][1] == math.prod(shape)
    assert Fingerprint.block_ranges((0, 5)) == []


def test_block_digests_run_over_the_bytes_and_end_in_the_hash() -> None:
    t = torch.randn(64, 64)
    f = fingerprint(t)
    data = t.numpy().tobytes()
    assert f.xxh3 == xxhash.xxh3_128(data).hexdigest(), "the hash snapshots always had"
    assert len(f.blocks) == 8 and all(re.fullmatch("[0-9a-f]{8}", b) for b in f.blocks)
    assert f.blocks[-1] == f.xxh3[:8]
    assert f.blocks[2] == xxhash.xxh3_128(data[: 3 * 512 * 4]).hexdigest()[:8]
    changed = t.clone()
    changed[20, 5] += 1  # element 1285, in block 2
    g = fingerprint(changed)
    assert g.blocks[:2] == f.blocks[:2]
    assert not set(g.blocks[2:]) & set(f.blocks[2:]), "every digest after it differs"


@pytest.mark.parametrize("n", [0, 1, 15, 17, 129, 240, 241, 1023, 1025, 70_001])
def test_the_streamed_hash_is_the_one_shot_hash(n: int) -> None:
    """xxh3 streamed block by block equals xxh3 of all the bytes: old snapshots match."""
    t = torch.randint(0, 256, (n,), dtype=torch.uint8)
    assert fingerprint(t).xxh3 == xxhash.xxh3_128(bytes(t.tolist())).hexdigest()


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(64, 64),
        lambda: torch.randn(100, 7),
        lambda: torch.randn(17, 1000),  # sampled; runs cross blocks' ends
        lambda: torch.randn(100_003),  # sampled; the last block is short
        lambda: torch.randn(30, 700, dtype=torch.complex64),  # sampled, two numbers each
        lambda: torch.randn(300_000)[7:200_007],  # a view that starts inside its storage
        lambda: torch.arange(50, dtype=torch.int64).reshape(10, 5),
    ],
)
def test_block_means_are_the_means_of_each_blocks_sampled_numbers(make: object) -> None:
    t = make()  # type: ignore[operator]
    f = fingerprint(t)
    assert (f.min, f.max, f.mean, f.std) == statistics_as_before(t), "old snapshots' statistics"
    real = torch.view_as_real(t) if t.is_complex() else t
    flat = real.reshape(-1).to(torch.float64)
    per = 2 if t.is_complex() else 1
    positions = sampled_positions(flat.numel())
    assert len(f.block_means) == len(f.blocks)
    for (start, end), mean in zip(Fingerprint.block_ranges(t.shape), f.block_means, strict=True):
        inside = [p for p in positions if start * per <= p < end * per]
        assert mean == pytest.approx(flat[inside].mean().item(), rel=1e-9, abs=1e-12)


def test_a_run_of_the_sample_split_between_blocks_is_planned() -> None:
    plan = fingerprints.block_plan(17 * 1000, fingerprints.byte_ranges((17, 1000), 4), 4)
    assert plan.moves, "the shape above exercises a run across a block's end"
    assert sum(plan.counts) == STAT_SAMPLE


def test_sample_hashes_tell_bits_from_numbers() -> None:
    zeros = fingerprint(torch.zeros(8))
    signed = fingerprint(torch.tensor([0.0] * 7 + [-0.0]))
    assert signed.sample_numbers == zeros.sample_numbers and signed.xxh3 != zeros.xxh3
    assert signed.sample_bits is None, "the whole hash is the bits of an unsampled tensor"
    assert signed.sample_signs is None, "no NaN: equal numbers in other bits are signed zeros"
    nan = torch.tensor([math.nan, 0.0, 1.0])
    payload = fingerprint(with_bits(nan, 0, 0x7FC00001))
    assert payload.sample_numbers == fingerprint(nan).sample_numbers
    assert payload.sample_signs == fingerprint(nan).sample_signs is not None
    zero_too = fingerprint(with_bits(nan, 1, 0x80000000))
    assert zero_too.sample_signs != fingerprint(nan).sample_signs
    assert fingerprint(torch.ones(3)).sample_numbers != fingerprint(torch.zeros(3)).sample_numbers
    big = torch.zeros(3 * STAT_SAMPLE)
    assert fingerprint(big).sample_bits != fingerprint(with_bits(big, 1, 0x80000000)).sample_bits
    assert fingerprint(big).sample_bits == fingerprint(with_bits(big, 300, 0x80000000)).sample_bits
    ints = fingerprint(torch.arange(5))  # one encoding a number: no sample hashes
    assert (ints.sample_numbers, ints.sample_bits, ints.sample_signs) == (None, None, None)
    assert len(ints.blocks) == len(ints.block_means) == 5


def test_fingerprinting_leaves_the_tensor_as_it_was() -> None:
    """The sample is canonicalised in place: never in the tensor's own memory."""
    t = torch.tensor([-0.0, math.nan, 2.0], dtype=torch.float64)
    t.view(torch.int64)[1] = 0x7FF8_0000_0000_BEEF
    before = t.view(torch.int64).clone()
    fingerprint(t)
    schema_of({"t": t}, values=True)
    assert torch.equal(t.view(torch.int64), before)


def test_tensors_fingerprinted_together_equal_one_by_one() -> None:
    """Like tensors share torch calls over 16 MiB of state: the same fingerprints."""
    state = {f"norm{i}": torch.randn(64) for i in range(40)}
    state |= {f"tiny{i}": torch.tensor([float(i), -0.0]) for i in range(3)}
    state["nan"] = torch.tensor([1.0, math.nan])
    state["big"] = torch.randn(fingerprints.OVERLAP_MIN_BYTES // 4)
    together = {e.key: repr(astuple(e.fingerprint)) for e in schema_of(state, values=True)}
    assert list(together) == list(state)
    assert together == {key: repr(astuple(fingerprint(t))) for key, t in state.items()}


# ---- the snapshot text ---------------------------------------------------------------------


def added_bytes(text: str, key: str) -> int:
    (line,) = [x for x in text.splitlines() if f'"key": "{key}"' in x]
    values = json.loads(line.rstrip(","))["values"]
    old = ("xxh3", "min", "max", "mean", "std")
    return len(json.dumps({k: v for k, v in values.items() if k not in old}))


def test_the_new_fields_round_trip_and_stay_small() -> None:
    state = {
        "w": torch.randn(64, 64),
        "big": torch.randn(300, 1000),
        "holes": torch.tensor([1.0, math.nan, -math.inf]),
        "i": torch.arange(3),
        "e": torch.zeros(0),
    }
    schema = schema_of(state, values=True)
    text = schema.to_json()
    again = Schema.from_json(text)
    for old, new in zip(schema.tensors, again.tensors, strict=True):
        f, g = old.fingerprint, new.fingerprint
        assert f is not None and g is not None
        assert (g.blocks, g.sample_numbers, g.sample_bits, g.sample_signs) == (
            f.blocks,
            f.sample_numbers,
            f.sample_bits,
            f.sample_signs,
        )
        assert [f"{m:.6g}" for m in g.block_means] == [f"{m:.6g}" for m in f.block_means]
    assert added_bytes(text, "w") < 260 and added_bytes(text, "big") < 290, "a few hundred"
    assert Schema.from_json(again.to_json()).to_json() == text


def old_snapshot(schema: Schema) -> str:
    """A snapshot as written before block digests: values without the new fields."""
    data = json.loads(schema.to_json())
    for entry in data["tensors"]:
        for name in ("blocks", "block_means", "sample_numbers", "sample_bits", "sample_signs"):
            entry["values"].pop(name, None)
    return json.dumps(data)


def test_a_snapshot_without_blocks_still_compares_by_hash() -> None:
    t = torch.randn(64, 64)
    old = Schema.from_json(old_snapshot(schema_of({"w": t}, values=True)))
    f = old.tensors[0].fingerprint
    assert f is not None and f.blocks == () and f.sample_numbers is None
    assert not diff_schemas(old, schema_of({"w": t.clone()}, values=True))
    changed = t.clone()
    changed[5, 5] = -changed[5, 5]
    for expected, actual in (
        (old, schema_of({"w": changed}, values=True)),
        (schema_of({"w": changed}, values=True), old),  # blocks on one side only
    ):
        (change,) = diff_schemas(expected, actual).changed
        assert change.attribute == "values" and "change" not in change.actual
        assert change.actual.endswith("std unchanged") or " -> " in change.actual


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("blocks", "abc", "values.blocks"),
        ("blocks", [1], "values.blocks"),
        ("blocks", ["a"] * 9, "values.blocks"),
        ("block_means", [1.0], "values.block_means"),
        ("block_means", ["x", 1.0], "values.block_means"),
        ("block_means", [True, 1.0], "values.block_means"),
        ("sample_numbers", 3, "values.sample_numbers"),
        ("sample_signs", [], "values.sample_signs"),
    ],
)
def test_malformed_new_fields_are_refused(name: str, value: object, problem: str) -> None:
    data = json.loads(schema_of({"w": torch.ones(2)}, values=True).to_json())
    data["tensors"][0]["values"][name] = value
    with pytest.raises(SnapshotError, match=re.escape(problem)):
        Schema.from_json(json.dumps(data))


# ---- the report ----------------------------------------------------------------------------


def test_a_few_changed_elements_are_located_with_their_block_means() -> None:
    w = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    changed = w.clone()
    changed[13, 5:9] = -1.0
    line = values_line({"w": w}, {"w": changed})
    assert "first change in elements 512-1023 (rows 8-15 of [64, 64]), none in elements 0-511" in (
        line
    )
    assert "block mean 767.5 -> 760.941" in line
    assert "block means differ too" not in line
    assert re.search(r"min 0 -> -1, std \S+ -> \S+$", line)
    also = changed.clone()
    also[50, 0] = 0.5
    assert "block means differ too in elements 3072-3583 (rows 48-55 of [64, 64])" in (
        values_line({"w": w}, {"w": also})
    )
    last = w.clone()
    last[63, 0] = 7.0
    assert "changed only in elements 3584-4095 (rows 56-63 of [64, 64]), all before unchanged" in (
        values_line({"w": w}, {"w": last})
    )
    small = torch.arange(6.0)
    assert "first change in element 4, none in elements 0-3; block mean 4 -> 4" in values_line(
        {"w": small}, {"w": with_bits(small, 4, 0x40800001)}
    )


def test_signed_zero_and_nan_payload_are_named() -> None:
    zeros = torch.zeros(32, 8)
    line = values_line({"w": zeros}, {"w": with_bits(zeros, 100, 0x80000000)})
    assert "first change in elements 96-127 (rows 12-15 of [32, 8])" in line
    assert line.endswith(
        "block mean 0 -> 0; values equal as numbers but their bits differ: "
        "a signed zero (-0.0 vs 0.0)"
    )
    nan = torch.full((6,), math.nan)
    line = values_line({"w": nan}, {"w": with_bits(nan, 5, 0x7FC0BEEF)})
    assert "changed only in element 5, all before unchanged; block mean nan -> nan" in line
    assert line.endswith("values equal as numbers but their bits differ: a NaN payload")
    mixed = torch.tensor([math.nan, 0.0, 1.0])
    line = values_line({"w": mixed}, {"w": with_bits(mixed, 1, 0x80000000)})
    assert line.endswith("a signed zero (-0.0 vs 0.0)"), "a NaN elsewhere is not the change"
    swapped = torch.tensor([1.0, 2.0, 3.0])  # numbers moved, statistics as they were
    line = values_line({"w": swapped}, {"w": swapped.flip(0)})
    assert "block mean 1 -> 3; block means differ too in element 2" in line
    assert line.endswith("min, max and std unchanged")


def test_a_big_tensor_says_what_its_sample_can_and_cannot_show() -> None:
    big = torch.zeros(100_000)
    outside = big.clone()
    outside[300] = 5.0  # between the statistics' sampled runs
    line = values_line({"w": big}, {"w": outside})
    assert "first change in elements 0-12499; sampled block mean 0 -> 0" in line
    assert line.endswith(
        f"the change lies outside the {STAT_SAMPLE} sampled elements, so no statistic shows it"
    )
    line = values_line({"w": big}, {"w": with_bits(big, 1, 0x80000000)})
    assert line.endswith(
        "values equal as numbers but their bits differ in the sampled elements: "
        "a signed zero (-0.0 vs 0.0)"
    )
    inside = big.clone()
    inside[1] = 1.0
    assert "sampled block mean 0 -> 0.000488281" in values_line({"w": big}, {"w": inside})


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=3),
    st.integers(0, 10**6),
    st.integers(0, 31),
)
def test_any_single_bit_flip_is_located_in_its_block(
    shape: list[int], where: int, bit: int
) -> None:
    t = torch.randn(shape)
    index = where % t.numel()
    flipped = t.clone()
    flipped.view(torch.int32).reshape(-1)[index] ^= 1 << bit
    line = values_line({"w": t}, {"w": flipped})
    found = re.search(r"(?:first change|changed only) in elements? (\d+)(?:-(\d+))?", line)
    assert found, line
    start, end = int(found[1]), int(found[2] or found[1])
    assert start <= index <= end


# ---- as a user meets it --------------------------------------------------------------------


def test_a_snapshot_failure_names_the_range_the_block_and_the_kind(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_values="""
        import os
        import torch
        from torch import nn

        def model():
            m = nn.Module()
            m.register_buffer("table", torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64))
            m.register_buffer("zeros", torch.zeros(16, 4))
            m.register_buffer("holes", torch.full((8,), float("nan")))
            change = os.environ.get("CHANGE")
            if change == "few":
                m.table[13, 2:6] = -1.0
            elif change == "zero":
                m.zeros[9, 3] = -0.0
            elif change == "nan":
                m.holes.view(torch.int32)[6] = 0x7FC00042
            return m

        def test_values(statedict_snapshot):
            statedict_snapshot.assert_match(model(), values=True)
        """
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    pytester.runpytest().assert_outcomes(passed=1)
    expected = {
        "few": "*~ table: values xxh3 * -> xxh3 *; first change in elements 512-1023 "
        "(rows 8-15 of [64, 64]), none in elements 0-511; block mean 767.5 -> 760.965; "
        "min 0 -> -1, std *",
        "zero": "*~ zeros: values xxh3 * -> xxh3 *; first change in elements 32-39 "
        "(rows 8-9 of [16, 4]), none in elements 0-31; block mean 0 -> 0; values equal as "
        "numbers but their bits differ: a signed zero (-0.0 vs 0.0)",
        "nan": "*~ holes: values xxh3 * -> xxh3 *; first change in element 6, none in elements "
        "0-5; block mean nan -> nan; values equal as numbers but their bits differ: "
        "a NaN payload",
    }
    with pytest.MonkeyPatch.context() as mp:
        for change, pattern in expected.items():
            mp.setenv("CHANGE", change)
            result = pytester.runpytest()
            result.assert_outcomes(failed=1)
            match_lines(result, ["*changed (1):", pattern])
