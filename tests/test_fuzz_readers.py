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
import json
import pickle
import resource
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_statedict import StateDictError, schema_of
from pytest_statedict.readers import dcp_folder, hf_index, safetensors_file, snapshot_file
from pytest_statedict.readers.unpickling import unpickle_dcp_metadata

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


FOLDER = Path(tempfile.mkdtemp(prefix="statedict-fuzz-"))


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def real(name: str, write: Callable[[Path], object]) -> bytes:
    path = FOLDER / f"real-{name}"
    write(path)
    return path.read_bytes()


REAL_ZIP = real("zip.pt", lambda p: torch.save(model().state_dict(), p))
REAL_LEGACY = real(
    "legacy.pt",
    lambda p: torch.save(model().state_dict(), p, _use_new_zipfile_serialization=False),
)
REAL_SNAPSHOT = real(
    "snapshot.json",
    lambda p: p.write_text(
        schema_of(model(), optimizer=torch.optim.AdamW(model().parameters(), lr=1e-3)).to_json()
    ),
)


def _real_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model().state_dict().items()}, path)


REAL_SAFETENSORS = real("model.safetensors", _real_safetensors)
with zipfile.ZipFile(FOLDER / "real-zip.pt") as _z:
    REAL_DATA_PKL = _z.read(next(n for n in _z.namelist() if n.endswith("data.pkl")))


def _real_dcp() -> bytes:
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.zeros(3, 4), "n": {"b": torch.ones(2), "raw": b"x", "i": 3}}
    dcp.save(state, checkpoint_id=FOLDER / "dcp")
    return (FOLDER / "dcp" / ".metadata").read_bytes()


REAL_METADATA = _real_dcp()

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
    path = FOLDER / name
    path.write_bytes(data)
    return path


def zip_with_data_pkl(data_pkl: bytes) -> bytes:
    path = FOLDER / "rebuilt.pt"
    with zipfile.ZipFile(FOLDER / "real-zip.pt") as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            is_pickle = info.filename.endswith("data.pkl")
            out.writestr(info.filename, data_pkl if is_pickle else src.read(info))
    return path.read_bytes()


# ---- torch.save archives -------------------------------------------------------------------


@fuzz(500)
@given(EDITS)
def test_mutated_torch_archives(edits: list[tuple[str, float, bytes]]) -> None:
    path = write("mutated.pt", mutate(REAL_ZIP, edits))
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
@given(PICKLE_OPCODES | st.builds(mutate, st.just(REAL_DATA_PKL), EDITS))
def test_data_pkl_streams(data_pkl: bytes) -> None:
    path = write("pickled.pt", zip_with_data_pkl(data_pkl))
    read_only_ours(lambda: schema_of(path))


@fuzz(300)
@given(EDITS)
def test_mutated_legacy_files(edits: list[tuple[str, float, bytes]]) -> None:
    path = write("legacy.pt", mutate(REAL_LEGACY, edits))
    read_only_ours(lambda: schema_of(path))


# ---- DCP -----------------------------------------------------------------------------------


@fuzz(600)
@given(PICKLE_OPCODES | st.builds(mutate, st.just(REAL_METADATA), EDITS) | st.binary())
def test_dcp_metadata_unpickler(data: bytes) -> None:
    read_only_ours(lambda: unpickle_dcp_metadata(data, FOLDER / "dcp"))


@fuzz(200)
@given(st.builds(mutate, st.just(REAL_METADATA), EDITS))
def test_dcp_folders(metadata: bytes) -> None:
    folder = FOLDER / "dcp-fuzz"
    folder.mkdir(exist_ok=True)
    (folder / ".metadata").write_bytes(metadata)
    read_only_ours(lambda: dcp_folder.read_schema(folder, part=None))


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
    path = write("mutated.safetensors", mutate(REAL_SAFETENSORS, edits))
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
    mutated = json_mutations(json.loads(REAL_SNAPSHOT), data.draw)
    path = write("fuzz.json", json.dumps(mutated).encode())
    read_only_ours(lambda: snapshot_file.read_snapshot(path))


@fuzz(200)
@given(EDITS)
def test_snapshot_text_mutations(edits: list[tuple[str, float, bytes]]) -> None:
    path = write("fuzz-text.json", mutate(REAL_SNAPSHOT, edits))
    read_only_ours(lambda: schema_of(path))


def test_the_fuzz_corpus_is_real() -> None:
    """The seeds are valid files of their formats (mutations start from the real thing)."""
    assert len(schema_of(FOLDER / "real-zip.pt")) == 7
    assert len(schema_of(FOLDER / "real-legacy.pt")) == 7
    assert len(schema_of(FOLDER / "real-model.safetensors")) == 7
    assert len(schema_of(FOLDER / "real-snapshot.json")) == 7
    assert type(pickle.loads(REAL_METADATA)).__name__ == "Metadata"
