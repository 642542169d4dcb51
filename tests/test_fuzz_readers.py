"""Fuzzing every reader: whatever the bytes, the only error is the plugin's own.

Seed-stable (``derandomize=True``), so CI runs the same examples every time. Inputs are
random bytes and mutations of real files of each format: ``torch.save`` archives (the
archive, and its ``data.pkl`` alone), legacy files, DCP ``.metadata`` (through the
allowlist unpickler directly and through the folder reader), ``.safetensors`` headers,
sharded indexes and snapshots. Each test also checks that the process's peak memory grew
by less than :data:`MAX_GROWTH` over its examples (no claimed size is ever allocated).
"""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import re
import resource
import struct
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st
from torch import nn

from pytest_statedict import StateDictError, schema_of
from pytest_statedict.readers import dcp_folder, hf_index, safetensors_file, snapshot_file
from pytest_statedict.readers.records import NeedsTorch
from pytest_statedict.readers.unpickling import (
    Budget,
    unpickle_dcp_metadata,
    unpickle_torch_records,
)

MAX_GROWTH = 300 << 20  # bytes of peak RSS a fuzz test may add


def fuzz(examples: int) -> Callable[[Any], Any]:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.fixture(autouse=True)
def bounded_memory() -> Iterator[None]:
    before = peak_rss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about odd pickles it then refuses
        yield
    assert peak_rss() - before < MAX_GROWTH


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


@functools.cache
def folder() -> Path:
    """Scratch space for the fuzzed files, made when the first fuzz test runs."""
    return Path(tempfile.mkdtemp(prefix="statedict-fuzz-"))


@functools.cache
def real(name: str) -> bytes:
    """A real file of each format, the seed its mutations start from."""
    path = folder() / f"real-{name}"
    net = model()
    if name == "zip.pt":
        torch.save(net.state_dict(), path)
    elif name == "legacy.pt":
        torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    elif name == "snapshot.json":
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        path.write_text(schema_of(net, optimizer=optimizer).to_json())
    elif name == "model.safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    elif name == "data.pkl":
        real("zip.pt")  # the archive it comes from
        with zipfile.ZipFile(folder() / "real-zip.pt") as z:
            return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        import torch.distributed.checkpoint as dcp

        state = {"w": torch.zeros(3, 4), "n": {"b": torch.ones(2), "raw": b"x", "i": 3}}
        dcp.save(state, checkpoint_id=folder() / "dcp")
        path = folder() / "dcp" / ".metadata"
    return path.read_bytes()


SEEDS = ("zip.pt", "legacy.pt", "snapshot.json", "model.safetensors", "data.pkl", ".metadata")


def seed(name: str) -> st.SearchStrategy[bytes]:
    return st.deferred(lambda: st.just(real(name)))


# ---- mutations -----------------------------------------------------------------------------

EDITS = st.lists(
    st.tuples(
        st.sampled_from(["overwrite", "insert", "delete", "truncate"]),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=8)
        | st.sampled_from(
            [b"\xff" * 4, b"\x00" * 8, b"\x7f\xff\xff\xff", struct.pack("<Q", 1 << 62)]
        ),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for op, where, chunk in edits:
        at = int(where * len(out))
        if op == "overwrite":
            out[at : at + len(chunk)] = chunk
        elif op == "insert":
            out[at:at] = chunk
        elif op == "delete":
            del out[at : at + len(chunk)]
        else:
            del out[max(at, 1) :]
    return bytes(out)


def read_only_ours(read: Callable[[], object]) -> None:
    with contextlib.suppress(StateDictError):  # anything else fails the test
        read()


def write(name: str, data: bytes) -> Path:
    path = folder() / name
    path.write_bytes(data)
    return path


def zip_with_data_pkl(data_pkl: bytes) -> bytes:
    real("zip.pt")  # the archive whose data.pkl is replaced
    path = folder() / "rebuilt.pt"
    with zipfile.ZipFile(folder() / "real-zip.pt") as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            is_pickle = info.filename.endswith("data.pkl")
            out.writestr(info.filename, data_pkl if is_pickle else src.read(info))
    return path.read_bytes()


# ---- torch.save archives -------------------------------------------------------------------


@fuzz(500)
@given(EDITS)
def test_mutated_torch_archives(edits: list[tuple[str, float, bytes]]) -> None:
    path = write("mutated.pt", mutate(real("zip.pt"), edits))
    read_only_ours(lambda: schema_of(path))


@fuzz(150)
@given(st.binary(max_size=600))
def test_random_zip_like_bytes(tail: bytes) -> None:
    path = write("random.pt", b"PK\x03\x04" + tail)
    read_only_ours(lambda: schema_of(path))


PICKLE_OPCODES = st.lists(
    st.sampled_from(
        [bytes([op.code.encode("latin-1")[0]]) for op in __import__("pickletools").opcodes]
    )
    | st.binary(min_size=1, max_size=6),
    max_size=40,
).map(lambda ops: b"\x80\x02" + b"".join(ops))


@fuzz(300)
@given(PICKLE_OPCODES | st.builds(mutate, seed("data.pkl"), EDITS))
def test_data_pkl_streams(data_pkl: bytes) -> None:
    path = write("pickled.pt", zip_with_data_pkl(data_pkl))
    read_only_ours(lambda: schema_of(path))


@fuzz(300)
@given(EDITS)
def test_mutated_legacy_files(edits: list[tuple[str, float, bytes]]) -> None:
    path = write("legacy.pt", mutate(real("legacy.pt"), edits))
    read_only_ours(lambda: schema_of(path))


# ---- DCP -----------------------------------------------------------------------------------


@fuzz(600)
@given(PICKLE_OPCODES | st.builds(mutate, seed(".metadata"), EDITS) | st.binary())
def test_dcp_metadata_unpickler(data: bytes) -> None:
    read_only_ours(lambda: unpickle_dcp_metadata(data, folder() / "dcp"))


@fuzz(200)
@given(st.builds(mutate, seed(".metadata"), EDITS))
def test_dcp_folders(metadata: bytes) -> None:
    checkpoint = folder() / "dcp-fuzz"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / ".metadata").write_bytes(metadata)
    read_only_ours(lambda: dcp_folder.read_checkpoint(checkpoint))


# ---- JSON formats --------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "shape", "dtype", "data_offsets", "__metadata__"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


TENSOR_INFO = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "I8", "BOOL", "Q4"]) | JSON,
        "shape": st.lists(st.integers(-2, 2**64), max_size=5) | JSON,
        "data_offsets": st.lists(st.integers(-2, 2**64), max_size=3) | JSON,
    }
)


@fuzz(400)
@given(
    st.dictionaries(st.text(max_size=5), TENSOR_INFO | JSON, max_size=4).map(
        lambda h: json.dumps(h).encode()
    )
    | JSON.map(lambda h: json.dumps(h).encode())
    | st.binary(max_size=64),
    st.binary(max_size=64),
)
def test_safetensors_headers(header: bytes, data: bytes) -> None:
    path = write("fuzz.safetensors", safetensors_bytes(header, data))
    read_only_ours(lambda: safetensors_file.read_schema(path))


@fuzz(200)
@given(EDITS)
def test_mutated_safetensors_files(edits: list[tuple[str, float, bytes]]) -> None:
    path = write("mutated.safetensors", mutate(real("model.safetensors"), edits))
    read_only_ours(lambda: schema_of(path))


SHARD_NAMES = st.sampled_from(
    [
        "real-model.safetensors",
        "real-zip.pt",
        "real-legacy.pt",
        "fuzz.index.json",
        "real-snapshot.json",
        "../real-model.safetensors",
        "/etc/passwd",
        "dcp",
        "missing.safetensors",
        "",
    ]
)


@fuzz(300)
@given(
    st.dictionaries(st.text(max_size=4), SHARD_NAMES | JSON, max_size=4).map(
        lambda m: {"weight_map": m}
    )
    | JSON
)
def test_sharded_indexes(index: Any) -> None:
    for name in SEEDS:  # the shards it may name
        real(name)
    path = write("fuzz.index.json", json.dumps(index).encode())
    read_only_ours(lambda: schema_of(path))
    read_only_ours(lambda: hf_index.read_index(path))


def json_mutations(data: Any, draw: Any) -> Any:
    """A copy of ``data`` with one node, picked at random, replaced by random JSON."""
    nodes: list[tuple[Any, Any]] = []
    stack = [data]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            nodes.append((node, key))
            if isinstance(child, (dict, list)):
                stack.append(child)
    container, key = draw(st.sampled_from(nodes))
    container[key] = draw(JSON | st.sampled_from([True, 1.0, -1, 2**64, [[1]], {"a": []}]))
    return data


@fuzz(400)
@given(st.data())
def test_snapshot_json_mutations(data: st.DataObject) -> None:
    mutated = json_mutations(json.loads(real("snapshot.json")), data.draw)
    path = write("fuzz.json", json.dumps(mutated).encode())
    read_only_ours(lambda: snapshot_file.read_snapshot(path))


@fuzz(200)
@given(EDITS)
def test_snapshot_text_mutations(edits: list[tuple[str, float, bytes]]) -> None:
    path = write("fuzz-text.json", mutate(real("snapshot.json"), edits))
    read_only_ours(lambda: schema_of(path))


# ---- what a pickle costs -------------------------------------------------------------------

# The budget each example gets (a quarter of a real pickle's base, so examples stay fast),
# and what one may add to the peak resident set and take of CPU time: the budget's worth of
# objects and Python's own; ~0.1 s of work, with the margin of a shared runner whose CPU
# time stretches 10x (unbounded, 300 Counters of 1 MiB took 20 s).
EXAMPLE_BUDGET = 16 << 20
EXAMPLE_MAX_MIB = 64
EXAMPLE_MAX_SECONDS = 5.0

# Allowed callables that allocate or iterate by their argument, and arguments that ask much
# of them for few bytes.
AMPLIFYING = [
    b"builtins\nbytearray", b"collections\nCounter", b"builtins\nset", b"torch\nSize",
    b"collections\nOrderedDict", b"_codecs\nencode", b"builtins\ncomplex",
    b"torch.distributed.checkpoint.metadata\nChunkStorageMetadata",
]  # fmt: skip
# ... those of them DCP metadata may hold
DCP_AMPLIFYING = [b"torch\nSize", b"collections\nOrderedDict"]
ARGUMENTS = st.one_of(
    st.integers(0, 2**31 - 1).map(lambda n: b"J" + struct.pack("<i", n)),  # BININT
    st.integers(0, 1 << 20).map(lambda n: b"X" + struct.pack("<I", n) + b"a" * n),  # str
    st.integers(0, 1 << 20).map(lambda n: b"B" + struct.pack("<I", n) + b"\x01" * n),  # bytes
    st.integers(0, 1 << 16).map(lambda n: b"(" + b"K\x01" * n + b"l"),  # a list of ints
)


@st.composite
def amplifying_pickles(draw: st.DrawFn, callables: list[bytes] = AMPLIFYING) -> bytes:
    """A list of calls of amplifying callables, each argument memo'd once and passed again
    (``h`` BINGET) up to hundreds of times, between runs of empty containers."""
    out = b"\x80\x03]q\x00("
    for i in range(draw(st.integers(1, 3))):
        memo = bytes([2 * i + 1]), bytes([2 * i + 2])
        out += b"c" + draw(st.sampled_from(callables)) + b"\nq" + memo[0]
        out += draw(ARGUMENTS) + b"\x85q" + memo[1] + b"R"
        out += (b"h" + memo[0] + b"h" + memo[1] + b"R") * draw(st.integers(0, 300))
        out += draw(st.sampled_from([b"]", b"}", b"\x8f", b"(t"])) * draw(st.integers(0, 1 << 16))
    return out + b"e."


@contextlib.contextmanager
def peak_and_time(spent: Callable[[], int]) -> Iterator[None]:
    """Assert what the body added to the peak resident set (reset first, through
    /proc/self/clear_refs) and its CPU time, and steer hypothesis towards the costliest."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, start = resident_mib("VmRSS"), time.process_time()
    yield
    grown, seconds = resident_mib("VmHWM") - before, time.process_time() - start
    target(float(spent()), label="budget spent")
    target(grown, label="peak MiB added")
    target(seconds, label="CPU seconds")
    assert grown < EXAMPLE_MAX_MIB, f"{grown:.0f} MiB"
    assert seconds < EXAMPLE_MAX_SECONDS, f"{seconds:.2f} s"


def resident_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) / 1024  # type: ignore[union-attr]


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through /proc"
)


@needs_proc
@fuzz(40)
@given(amplifying_pickles() | PICKLE_OPCODES)
def test_a_pickle_costs_at_most_its_budget(data: bytes) -> None:
    """The records reader (``statedict show``, and the check before torch.load): the file
    refused, or handed to torch (NeedsTorch), within the budget."""
    budget = Budget(EXAMPLE_BUDGET)
    with peak_and_time(lambda: budget.allowed - budget.left), contextlib.suppress(NeedsTorch):
        read_only_ours(lambda: unpickle_torch_records(data, folder() / "x.pt", no_storage, budget))


@needs_proc
@fuzz(40)
@given(amplifying_pickles(DCP_AMPLIFYING) | PICKLE_OPCODES)
def test_dcp_metadata_costs_at_most_its_budget(data: bytes) -> None:
    budget = Budget(EXAMPLE_BUDGET)
    with peak_and_time(lambda: budget.allowed - budget.left):
        read_only_ours(lambda: unpickle_dcp_metadata(data, folder() / "dcp", budget))


def no_storage(pid: object) -> object:
    raise StateDictError("no storages here")


def test_the_fuzz_corpus_is_real() -> None:
    """The seeds are valid files of their formats (mutations start from the real thing)."""
    for name in SEEDS:
        real(name)
    assert len(schema_of(folder() / "real-zip.pt")) == 7
    assert len(schema_of(folder() / "real-legacy.pt")) == 7
    assert len(schema_of(folder() / "real-model.safetensors")) == 7
    assert len(schema_of(folder() / "real-snapshot.json")) == 7
    assert type(pickle.loads(real(".metadata"))).__name__ == "Metadata"
