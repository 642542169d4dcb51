"""Hardening: every dtype, odd tensors, odd test ids, interrupted writes, random inputs."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import match_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_statedict import Schema, SnapshotError, roundtrip, schema_of
from pytest_statedict.bitwise import tensor_difference
from pytest_statedict.compare import diff_schemas
from pytest_statedict.fingerprint import fingerprint
from pytest_statedict.schema_entries import DTYPE_ITEMSIZE, TensorEntry
from pytest_statedict.storage import atomic_write, sanitise

TORCH_DTYPES = sorted(
    {v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str
)  # fmt: skip


def creatable(dtype: torch.dtype) -> torch.Tensor | None:
    """A small tensor of ``dtype`` with arbitrary bits, or None if torch cannot make one."""
    try:
        raw = (
            torch.arange(8, dtype=torch.uint8) % 2
            if dtype == torch.bool
            else (torch.randint(0, 256, (8 * dtype.itemsize,), dtype=torch.uint8))
        )
        tensor = raw.view(dtype)
        tensor.clone()  # torch has no copy kernel for some dtypes (int1..int7)
        return tensor
    except (RuntimeError, TypeError, NotImplementedError):
        return None


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_dtype_is_handled_or_refused_clearly(dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    assert name in DTYPE_ITEMSIZE, "the snapshot format must know every dtype torch has"
    entry = TensorEntry("w", "buffer", (2, 3), name)
    assert Schema.from_json(Schema(tensors=(entry,)).to_json()).tensors == (entry,)
    tensor = creatable(dtype)
    if tensor is None:
        pytest.skip(f"torch {torch.__version__} cannot create and copy a {name} tensor")
    assert schema_of({"w": tensor}).tensors[0].dtype == name
    values = schema_of({"w": tensor}, values=True).tensors[0].fingerprint
    assert values is not None and values == fingerprint(tensor.clone())
    flipped = tensor.clone()
    flipped.view(torch.uint8).reshape(-1)[0] ^= 1
    assert fingerprint(flipped) != values, "a flipped bit changes the fingerprint"
    assert tensor_difference(tensor, tensor.clone()) is None
    module = nn.Module()
    module.register_buffer("w", tensor)
    result = roundtrip(module)
    assert result.ok, str(result)


def test_odd_tensors() -> None:
    class Frozen(nn.Parameter):
        """A Parameter subclass, as quantization and PEFT libraries define."""

    module = nn.Module()
    module.scalar = nn.Parameter(torch.tensor(1.5))
    module.empty = nn.Parameter(torch.zeros(0, 4))
    module.sub = Frozen(torch.ones(2))
    module.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())
    if hasattr(nn, "Buffer"):
        module.buf = nn.Buffer(torch.ones(3))
    schema = schema_of(module)
    entries = schema.by_key()
    assert entries["scalar"].shape == () and entries["empty"].shape == (0, 4)
    assert entries["sub"].kind == "parameter"
    assert entries["strided"].shape == (4, 3)
    assert Schema.from_json(schema.to_json()) == schema
    assert roundtrip(module).ok


def test_dtensor_on_a_single_process_mesh() -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import DTensor, Replicate

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1,))
        d = DTensor.from_local(torch.ones(4, 2), mesh, [Replicate()])
        entry = schema_of({"w": d}).tensors[0]
        assert (entry.shape, entry.dtype) == ((4, 2), "float32")
    finally:
        dist.destroy_process_group()


# ---- test ids that must not collide or escape --------------------------------------------

ODD_IDS = [
    "a/b", "a_b", "..", "../../etc/passwd", "a\\b", "c:d", "tab\there", "bell\x07",
    "x" * 400, "ünïcødé", "名前", "a b", ".hidden", "",
]  # fmt: skip


def test_sanitised_names_are_distinct_and_safe() -> None:
    names = [sanitise(i) for i in ODD_IDS]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert 0 < len(name.encode()) <= 255
        assert name.isascii() and name.isprintable()


def test_odd_parametrize_ids_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        f"""
        import pytest, torch
        from pytest_statedict import assert_state_dict_matches

        IDS = {ODD_IDS[:-1]!r}

        @pytest.mark.parametrize("n", range(len(IDS)), ids=IDS)
        def test_ids(n):
            assert_state_dict_matches({{"w": torch.zeros(n + 1)}}, name=IDS[n])
        """
    )
    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=len(ODD_IDS) - 1)
    folder = pytester.path / "__statedict__"
    files = list(folder.rglob("*.json"))
    assert len(files) == len(ODD_IDS) - 1
    assert all(f.resolve().is_relative_to(folder.resolve()) for f in files)
    result = pytester.runpytest()
    result.assert_outcomes(passed=len(ODD_IDS) - 1)
    match_lines(result, [f"statedict: {len(ODD_IDS) - 1} passed"])


# ---- interrupted writes ------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pytest_statedict.storage import atomic_write

    path, old, new = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), Path(sys.argv[3]).read_text()
    print("ready", flush=True)
    while True:
        atomic_write(path, new)
        atomic_write(path, old)
    """
)


def test_a_killed_update_leaves_each_snapshot_old_or_new(tmp_path: Path) -> None:
    old = "".join(f'  {{"key": "w{i}", "kind": "tensor"}},\n' for i in range(20000))
    new = old.replace("tensor", "buffer")
    (tmp_path / "old").write_text(old)
    (tmp_path / "new").write_text(new)
    target = tmp_path / "snap" / "0.json"
    atomic_write(target, old)
    rng = random.Random(0)
    kills = 25
    for _ in range(kills):
        sources = [str(tmp_path / "old"), str(tmp_path / "new")]
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), *sources], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert target.read_text() in (old, new)
    # temp files of killed writes are dot-files, never mistaken for snapshots
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".")] == ["0.json"]


# ---- properties --------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8]
keys = st.text(alphabet="abcxyz._0123", min_size=1, max_size=12)
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(keys, min_size=0, max_size=8, unique=True))
    return {name: torch.zeros(draw(shapes), dtype=draw(st.sampled_from(DTYPES))) for name in names}


PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(state_dicts(), st.booleans())
def test_schema_json_schema_is_the_identity(state: dict[str, torch.Tensor], values: bool) -> None:
    schema = schema_of(state, values=values)
    assert Schema.from_json(schema.to_json()) == schema
    assert not diff_schemas(schema, schema)


@PROPERTY_SETTINGS
@given(state_dicts(), state_dicts())
def test_a_diff_is_symmetric(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    forward, backward = (
        diff_schemas(schema_of(a), schema_of(b)),
        diff_schemas(schema_of(b), schema_of(a)),
    )
    assert bool(forward) == bool(backward)
    if forward.prefix is None:
        assert {t.key for t in forward.added} == {t.key for t in backward.removed}
        assert {t.key for t in forward.removed} == {t.key for t in backward.added}
    assert {(c.key, c.attribute) for c in forward.changed} == {
        (c.key, c.attribute) for c in backward.changed
    }


@PROPERTY_SETTINGS
@given(state_dicts().filter(bool), st.data())
def test_any_single_mutation_is_reported_and_named(
    state: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from(sorted(state)))
    mutation = data.draw(st.sampled_from(["shape", "dtype", "key", "value"]))
    mutated = dict(state)
    tensor = state[key]
    if mutation == "shape":
        mutated[key] = torch.zeros((*tensor.shape, 2), dtype=tensor.dtype)
    elif mutation == "dtype":
        other = next(d for d in DTYPES if d != tensor.dtype)
        mutated[key] = tensor.to(other)
    elif mutation == "key":
        mutated = {(k + "_renamed" if k == key else k): v for k, v in state.items()}
    else:
        if tensor.numel() == 0:
            return
        flipped = tensor.clone()
        flipped.reshape(-1).view(torch.uint8)[0] ^= 1
        mutated[key] = flipped
    diff = diff_schemas(schema_of(state, values=True), schema_of(mutated, values=True))
    assert diff
    named = {c.key for c in diff.changed} | {t.key for t in diff.removed}
    assert key in named or (diff.prefix is not None)


@PROPERTY_SETTINGS
@given(state_dicts().filter(lambda s: any(t.is_floating_point() for t in s.values())), st.data())
def test_a_frozen_parameter_is_reported_and_named(
    state: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    """The one mutation a bare state_dict cannot carry: requires_grad, on a module."""

    def module(frozen: str | None) -> nn.Module:
        m = nn.Module()
        for i, (name, tensor) in enumerate(state.items()):
            attr = f"t{i}"  # keys hold dots; the attribute names need not
            if tensor.is_floating_point():
                m.register_parameter(attr, nn.Parameter(tensor, requires_grad=name != frozen))
            else:
                m.register_buffer(attr, tensor)
        return m

    floats = sorted(i for i, t in enumerate(state.values()) if t.is_floating_point())
    index = data.draw(st.sampled_from(floats))
    frozen = list(state)[index]
    diff = diff_schemas(schema_of(module(None)), schema_of(module(frozen)))
    assert [(c.key, c.attribute, c.expected, c.actual) for c in diff.changed] == [
        (f"t{index}", "requires_grad", True, False)
    ]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_the_snapshot_parser_never_crashes(raw: bytes) -> None:
    with contextlib.suppress(SnapshotError):
        Schema.from_json(raw.decode("utf-8", "replace"), "fuzz.json")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_the_parser_survives_edits_of_a_real_snapshot(data: st.DataObject) -> None:
    text = schema_of(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))).to_json()
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 20)))
    junk = data.draw(st.text(alphabet='{}[]",:0123456789truefalsnul- ', max_size=10))
    with contextlib.suppress(SnapshotError):
        Schema.from_json(text[:start] + junk + text[end:], "edited.json")


def test_snapshot_files_get_the_mode_of_any_project_file(tmp_path: Path) -> None:
    """Not mkstemp's 0600: new files follow the umask, rewritten ones keep their mode."""
    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "snap" / "0.json"
        atomic_write(fresh, "{}\n")
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "snap" / "1.json"
        kept.write_text("old\n")
        kept.chmod(0o640)
        atomic_write(kept, "new\n")
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new\n"
    finally:
        os.umask(umask)
