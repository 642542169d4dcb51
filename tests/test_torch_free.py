"""``statedict show`` and ``diff`` without torch: the torch-free reader agrees with the torch
path on every file of the corpus, imports no torch where it reads a file itself, and hands
what it cannot stand for to torch.load."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_statedict import CheckpointError
from pytest_statedict.extract import schema_of as torch_schema_of_file
from pytest_statedict.readers import records
from pytest_statedict.schema import Schema
from pytest_statedict.torch_free import read_without_torch, schema_of_file

# ---- the corpus --------------------------------------------------------------------------

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
    torch.complex128, torch.complex32, torch.bool, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
]  # fmt: skip


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)  # _metadata version 2
        self.head = nn.Linear(4, 2)
        self.tied = nn.Linear(4, 2, bias=False)
        self.tied.weight = self.head.weight  # shared storage
        self.head.weight.requires_grad_(False)


def trained(opt_class: type[torch.optim.Optimizer], **kwargs: object) -> tuple[Net, dict]:
    model = Net()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = opt_class(trainable, **kwargs)
    model.head(model.bn(model.conv(torch.ones(2, 3, 5, 5))).mean((2, 3))).sum().backward()
    opt.step()
    return model, opt.state_dict()


def _state_of_every_dtype() -> dict[str, torch.Tensor]:
    return {str(d).removeprefix("torch."): torch.zeros(2, 3).to(d) for d in DTYPES}


def _views() -> dict[str, torch.Tensor]:
    base = torch.arange(24.0).reshape(4, 6)
    big = torch.zeros(100_000)
    return {
        "base": base,
        "row": base[1],  # offset 6 into base's storage
        "column": base[:, 2],  # strided view
        "transposed": base.t(),  # non-contiguous
        "expanded": torch.ones(3, 1).expand(3, 5),  # stride 0
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "slice_of_big": big[10:20],  # a view of a big storage: a note
        "same_again": base,  # the same tensor under two keys
    }


def _general(model: Net, opt_state: dict) -> dict[str, object]:
    return {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt_state,
        "epoch": 3,
        "loss": 0.25,
        "name": "run-7",
        "history": [1, 2.5, "x", None, (1, 2)],
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "raw": b"\x00bytes",
        "mutable": bytearray(b"ab"),
        "labels": {1, 2},
        "z": 1 + 2j,
        "counts": Counter("aab"),
        "flag": True,
        "params": {"w": nn.Parameter(torch.ones(2))},
    }


def build_corpus(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """Every checkpoint of the corpus: name -> (path, part)."""
    torch.manual_seed(0)
    corpus: dict[str, tuple[Path, str | None]] = {}

    def save(name: str, obj: object, part: str | None = None, **kwargs: object) -> Path:
        path = folder / f"{name}.pt"
        torch.save(obj, path, **kwargs)
        corpus[name] = (path, part)
        return path

    adam_model, adam = trained(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    sgd_model, sgd = trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    _, tensor_lr = trained(torch.optim.Adam, lr=torch.tensor(0.01),
                           betas=(torch.tensor(0.9), torch.tensor(0.99)))  # fmt: skip
    save("dtypes", _state_of_every_dtype())
    save("views", _views())
    save("module", adam_model.state_dict())
    save("parameters", dict(adam_model.named_parameters()))
    save("adamw_state", adam)
    save("tensor_hyperparams", tensor_lr)
    save("general", _general(adam_model, adam))
    save("general_sgd_list", {"state_dict": sgd_model.state_dict(), "optimizer_states": [sgd]})
    two = {"modelA_state_dict": Net().state_dict(), "modelB_state_dict": sgd_model.state_dict()}
    save("part_b", two, part="modelB_state_dict")
    save("part_nested", {"optimizer_states": [adam, sgd]}, part="optimizer_states/1")
    save("part_of_general", _general(sgd_model, sgd), part="params")
    save("requires_grad", {"w": torch.ones(2, requires_grad=True), "b": torch.zeros(1)})
    # torch hands these to torch.load: quantized, sparse, legacy, a tensor subclass
    save("quantized", {"q": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)})
    save("sparse", {"s": torch.eye(3).to_sparse()})
    save("legacy", adam_model.state_dict(), _use_new_zipfile_serialization=False)
    save("parameter_with_state", {"p": _parameter_with_attribute()})
    corpus["saved_on_cuda"] = (_saved_on_cuda(folder, sgd_model.state_dict()), None)
    corpus.update(_other_formats(folder, adam_model))
    return corpus


def _parameter_with_attribute() -> nn.Parameter:
    p = nn.Parameter(torch.ones(2))
    p.note = "tagged"  # type: ignore[attr-defined]
    return p


def _saved_on_cuda(folder: Path, state: dict) -> Path:
    """A checkpoint as a GPU run writes it: its storages' location says cuda:0."""
    plain = folder / "cpu_for_cuda.pt"
    torch.save(state, plain)
    path = folder / "saved_on_cuda.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(info.filename, data)
    return path


def _other_formats(folder: Path, model: Net) -> dict[str, tuple[Path, str | None]]:
    from safetensors.torch import save_file

    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    single = folder / "model.safetensors"
    save_file(state, single)
    keys = list(state)
    shards: dict[str, tuple[Path, str | None]] = {"safetensors": (single, None)}
    for suffix, write in (("safetensors", save_file), ("bin", torch.save)):
        sharded = folder / f"sharded_{suffix}"
        sharded.mkdir()
        weight_map = {}
        for i, chunk in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
            name = f"model-0000{i + 1}-of-00002.{suffix}"
            write({k: state[k] for k in chunk}, sharded / name)
            weight_map.update(dict.fromkeys(chunk, name))
        (sharded / f"model.{suffix}.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        shards[f"sharded_{suffix}"] = (sharded, None)
    shards["dcp"] = (_dcp_folder(folder / "dcp"), None)
    shards["dcp_part"] = (folder / "dcp", "nested")
    snapshot = folder / "snapshot.json"
    snapshot.write_text(torch_schema_of_file(single).to_json())
    shards["snapshot"] = (snapshot, None)
    return shards


def _dcp_folder(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    state = {
        "w": torch.zeros(3, 4),
        "nested": {"b": torch.ones(2, dtype=torch.bfloat16), "raw": b"bytes", "i": 3},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "single process": no process group, as intended
        dcp.save(state, checkpoint_id=folder)
    return folder


# What torch.load must read: the records cannot stand for it (or no torch-free reader).
NEEDS_TORCH = {"quantized", "sparse", "legacy", "parameter_with_state"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str | None]]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def everything(schema: Schema) -> tuple[object, ...]:
    """All a schema says, the fields equality leaves out included."""
    return (schema, schema.to_json(), schema.saved_on, schema.notes, schema.ordered,
            schema.source, tuple(t.__dict__ for t in schema.tensors))  # fmt: skip


CORPUS_NAMES = [
    "dtypes", "views", "module", "parameters", "adamw_state", "tensor_hyperparams", "general",
    "general_sgd_list", "part_b", "part_nested", "part_of_general", "requires_grad",
    "quantized", "sparse", "legacy", "parameter_with_state", "saved_on_cuda", "safetensors",
    "sharded_safetensors", "sharded_bin", "snapshot", "dcp", "dcp_part",
]  # fmt: skip


def test_the_corpus_is_the_one_listed(corpus: dict[str, tuple[Path, str | None]]) -> None:
    assert sorted(corpus) == sorted(CORPUS_NAMES)


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_torch_free_schema_equals_the_torch_one(
    corpus: dict[str, tuple[Path, str | None]], name: str
) -> None:
    path, part = corpus[name]
    expected = torch_schema_of_file(path, part=part)
    if name in NEEDS_TORCH:
        with pytest.raises(records.NeedsTorch):
            read_without_torch(path, part)
    else:
        assert everything(read_without_torch(path, part)) == everything(expected)
    assert everything(schema_of_file(path, part=part)) == everything(expected)


def test_the_corpus_covers_what_it_claims(corpus: dict[str, tuple[Path, str | None]]) -> None:
    """The cases the agreement test relies on are really in the files."""
    views = read_without_torch(corpus["views"][0], None).by_key()
    assert views["row"].tied_to == "base" and views["same_again"].tied_to == "base"
    assert views["empty"].tied_to is None
    notes = read_without_torch(corpus["views"][0], None).notes
    assert len(notes) == 1 and "slice_of_big" in notes[0]
    module = read_without_torch(corpus["module"][0], None)
    assert module.versions == {"bn": 2}
    general = read_without_torch(corpus["general"][0], None)
    assert general.extras["size"] == "torch.Size" and general.extras["device"] == "torch.device"
    assert general.extras["dtype"] == "torch.dtype" and general.extras["counts"] == (
        "collections.Counter"
    )
    assert general.optimizer is not None and len(general.optimizer.state) == 5
    hyper = read_without_torch(corpus["tensor_hyperparams"][0], None).optimizer
    assert hyper is not None
    assert hyper.param_groups[0].hyperparams["betas"][1]["tensor"] == pytest.approx(0.99)
    assert read_without_torch(corpus["saved_on_cuda"][0], None).saved_on == ("cuda:0",)
    dtypes = {t.key: t.dtype for t in read_without_torch(corpus["dtypes"][0], None)}
    assert dtypes == {str(d).removeprefix("torch."): str(d).removeprefix("torch.") for d in DTYPES}


# ---- no torch ----------------------------------------------------------------------------

# Runs the CLI and says whether torch was imported: `statedict` itself, in a fresh process.
WRAPPER = textwrap.dedent(
    """
    import sys
    from pytest_statedict.cli import main
    code = main(sys.argv[1:])
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
    raise SystemExit(code)
    """
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


TORCH_FREE_FILES = ["module", "general", "dtypes", "safetensors", "sharded_safetensors",
                    "sharded_bin", "snapshot", "saved_on_cuda", "dcp"]  # fmt: skip


@pytest.mark.parametrize("name", TORCH_FREE_FILES)
def test_show_and_diff_import_no_torch(
    corpus: dict[str, tuple[Path, str | None]], name: str
) -> None:
    path, _ = corpus[name]
    shown = run_cli("show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "torch imported: False" in shown.stderr
    reference, _ = corpus["module"]
    diffed = run_cli("diff", str(reference), str(path))
    assert diffed.returncode in (0, 1), diffed.stderr
    assert "torch imported: False" in diffed.stderr
    tree = run_cli("show", "--tree", str(path))
    assert tree.returncode == 0 and "torch imported: False" in tree.stderr


def test_show_with_part_imports_no_torch(corpus: dict[str, tuple[Path, str | None]]) -> None:
    path, part = corpus["part_b"]
    assert part is not None
    shown = run_cli("show", str(path), "--part", part)
    assert shown.returncode == 0 and "torch imported: False" in shown.stderr
    assert "head.weight" in shown.stdout


@pytest.mark.parametrize("name", ["legacy", "quantized"])
def test_files_that_need_torch_are_read_with_it(
    corpus: dict[str, tuple[Path, str | None]], name: str
) -> None:
    """The check above can fail: these files import torch, and still show the same table."""
    from pytest_statedict.cli import render_table

    path, _ = corpus[name]
    shown = run_cli("show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "torch imported: True" in shown.stderr
    assert shown.stdout.strip() == render_table(torch_schema_of_file(path)).strip()


def test_a_refused_pickle_imports_no_torch_and_is_explained(tmp_path: Path) -> None:
    """What torch's weights-only loader refuses, the records reader refuses in its words."""
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)  # a whole pickled module
    shown = run_cli("show", str(path))
    assert shown.returncode == 2
    assert "torch imported: False" in shown.stderr
    with pytest.raises(CheckpointError) as by_torch:
        torch_schema_of_file(path)
    with pytest.raises(CheckpointError) as by_records:
        read_without_torch(path, None)
    assert str(by_records.value) == str(by_torch.value)
    assert "torch.nn.modules.linear.Linear" in str(by_records.value)
    assert "whole pickled module" in shown.stderr


REFUSALS: dict[str, Callable[[Path], None]] = {
    "a protocol-4 pickle": lambda p: torch.save({"w": torch.ones(1)}, p, pickle_protocol=4),
    "a foreign class": lambda p: torch.save({"w": torch.ones(1), "when": _When()}, p),
    "BUILD on a dict": lambda p: _rewritten(p, b"}q\x00X", b"}q\x00}bX"),
}


class _When:
    pass


def _rewritten(path: Path, old: bytes, new: bytes) -> None:
    """A real archive whose data.pkl has ``old`` replaced by ``new``."""
    plain = path.with_name("plain.pt")
    torch.save({"w": torch.ones(1)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new, 1)
            out.writestr(info.filename, data)


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_torchs(tmp_path: Path, case: str) -> None:
    path = tmp_path / "refused.pt"
    REFUSALS[case](path)
    with pytest.raises(CheckpointError) as by_torch:
        torch_schema_of_file(path)
    with pytest.raises(CheckpointError) as by_records:
        read_without_torch(path, None)
    assert str(by_records.value) == str(by_torch.value)


@pytest.mark.parametrize(
    ("problem", "old", "new"),
    [
        ("a size past its storage", b"K\x00K\x01\x85q\x08", b"K\x00K\x09\x85q\x08"),
        ("a memo entry never stored", b"ccollections\nOrderedDict\nq\n", b"h\x7fq\n"),
    ],
)
def test_corrupt_archives_are_refused_like_torch(
    tmp_path: Path, problem: str, old: bytes, new: bytes
) -> None:
    path = tmp_path / "corrupt.pt"
    _rewritten(path, old, new)
    with pytest.raises(CheckpointError, match="could not read it"):
        torch_schema_of_file(path)
    with pytest.raises(CheckpointError, match="could not read it, the file is truncated"):
        read_without_torch(path, None)


def test_user_allowlisted_globals_go_to_torch(tmp_path: Path) -> None:
    """A global a user allowlisted for torch.load (only once torch is imported) is torch's
    to read: the records reader hands it over rather than refuse it."""
    path = tmp_path / "allowlisted.pt"
    torch.save({"w": torch.ones(1), "when": _When()}, path)
    with torch.serialization.safe_globals([_When]):
        with pytest.raises(records.NeedsTorch):
            read_without_torch(path, None)
        schema = schema_of_file(path)
    assert schema.extras == {} and schema.by_key()["when"].type == f"{__name__}._When"


def test_the_opcodes_and_globals_are_torchs() -> None:
    """The records reader runs the opcodes torch's weights-only unpickler runs, and knows
    its allowlist (every name it maps is one torch allows)."""
    from torch import _weights_only_unpickler as wo

    from pytest_statedict.readers import unpickling

    torch_ops = {  # the opcode constants torch's unpickler imports from pickle
        value[0]
        for name, value in vars(wo).items()
        if isinstance(value, bytes) and len(value) == 1 and getattr(pickle, name, None) == value
    }
    assert set(unpickling._TORCH_OPCODES) == torch_ops
    allowed = set(wo._get_allowed_globals())
    assert set(unpickling._RECORD_GLOBALS) <= allowed
    outside = {g for g in allowed if not g.startswith("torch.")}
    assert outside == set(unpickling._NON_TORCH_ALLOWED)


def test_stand_ins_are_named_as_torch_names_its_types() -> None:
    from pytest_statedict.layout import type_name

    pairs = [
        (records.Size((1,)), torch.Size([1])),
        (records.DTYPES["float32"], torch.float32),
        (records.device("cpu"), torch.device("cpu")),
        (records.Tensor.__new__(records.Tensor), torch.zeros(1)),
        (records.Parameter.__new__(records.Parameter), nn.Parameter(torch.zeros(1))),
    ]
    for ours, theirs in pairs:
        assert type_name(ours) == type_name(theirs)


def test_the_dcp_allowlist_is_the_one_resolved() -> None:
    """Every DCP global resolves to a torch-free record, and nothing else does (bar dtypes
    and the pure paths of a StorageMeta)."""
    from pytest_statedict.readers import unpickling

    resolved = set(unpickling._DCP_OBJECTS)
    dtypes = {("torch", name) for name in records.DTYPES}
    paths = {(m, n) for m in unpickling._PATH_MODULES for n in unpickling._PATH_CLASSES}
    assert resolved - dtypes - paths == set(unpickling.DCP_GLOBALS)
    assert not any(
        getattr(value, "__module__", "").startswith("torch")
        for key, value in unpickling._DCP_OBJECTS.items()
        if key not in dtypes and key != ("torch", "Size")
    )


def test_a_safetensors_header_whose_length_starts_like_a_pickle(tmp_path: Path) -> None:
    """A header of 128 + 256k bytes starts with 0x80, the pickle protocol byte: still
    safetensors (found on a sharded Llama folder), by torch's path and the torch-free one."""
    import struct

    from safetensors.torch import load_file

    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (0x180 - len(header))
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert path.read_bytes()[0] == 0x80 and load_file(path)["w"].shape == (2,)
    renamed = tmp_path / "odd.bin"  # found by content, not by name
    renamed.write_bytes(path.read_bytes())
    for p in (path, renamed):
        assert [t.shape for t in read_without_torch(p, None)] == [(2,)]
        assert [t.shape for t in torch_schema_of_file(p)] == [(2,)]


def test_names_an_older_torch_refuses_are_handed_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch 2.3 refused a dtype object (``torch.bfloat16``): under it, such a file is
    torch's to read, so the command line says what ``schema_of`` says."""
    from pytest_statedict.readers import unpickling

    path = tmp_path / "dtype.pt"
    torch.save({"w": torch.ones(1), "dtype": torch.bfloat16}, path)
    assert read_without_torch(path, None).extras == {}  # a state_dict with one object entry
    monkeypatch.setattr(unpickling, "_installed", [(2, 3)])
    with pytest.raises(records.NeedsTorch, match="since"):
        read_without_torch(path, None)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1, dtype=torch.bfloat16)}, plain)  # BFloat16Storage: 2.3 too
    assert [t.dtype for t in read_without_torch(plain, None)] == ["bfloat16"]
