"""The format seam: the registry, its order, and a third-party format through an entry point.

The third-party format is the example of ``docs/extending.md`` (``examples/toy_format``),
installed as a user's pip would leave it: its module and a ``*.dist-info`` folder whose
``entry_points.txt`` declares it, in a folder on ``PYTHONPATH``. Everything that reads it
runs in a subprocess (the command line, ``schema_of`` outside pytest, a user's pytest run),
as the registry reads entry points once per process; the file itself is written here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from conftest import match_lines
from torch import nn

from pytest_statedict import CheckpointError, schema_of
from pytest_statedict.formats import ENTRY_POINT_GROUP, Loaded
from pytest_statedict.formats.registry import (
    BUILTIN_FORMATS,
    FormatPluginError,
    detect,
    format_named,
    registered_formats,
)

CHECKOUT = Path(__file__).resolve().parent.parent
TOY = CHECKOUT / "examples" / "toy_format"
TOY_ENTRY_POINT = "toyckpt = toyckpt:ToyFormat"


def install(site: Path, distribution: str, entry_points: str) -> None:
    """A distribution's metadata as an installer writes it, declaring ``entry_points``."""
    info = site / f"{distribution}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n", encoding="utf-8"
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder where the toyckpt distribution is installed."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(TOY / "toyckpt.py", site)
    install(site, "toyckpt", TOY_ENTRY_POINT)
    return site


def environment(site: Path) -> dict[str, str]:
    paths = [str(site), str(CHECKOUT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def python(site: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=environment(site),
        capture_output=True,
        text=True,
        timeout=180,
    )


# What the toyckpt file of these tests holds, and a model of another layout.
MODEL = "nn.Sequential(nn.Linear(3, 2))"
RENAMED = """
class Renamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
"""


@pytest.fixture
def toy_file(site: Path, tmp_path: Path) -> Path:
    """A toyckpt file of MODEL, written by the format's own ``save`` found by its name.

    Written here: the registry is read afresh with ``site`` on ``sys.path``, then forgotten
    with it, so what reads the file later finds the format as a fresh process does.
    """
    path = tmp_path / "model.toyckpt"
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    registered_formats.cache_clear()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            format_named("toyckpt").save(eval(MODEL).state_dict(), path)
    finally:
        sys.path.remove(str(site))
        registered_formats.cache_clear()
        sys.modules.pop("toyckpt", None)
    return path


def test_the_example_is_the_documented_one() -> None:
    """docs/extending.md shows the example's module and entry-point table as they are."""
    docs = (CHECKOUT / "docs" / "extending.md").read_text(encoding="utf-8")
    assert (TOY / "toyckpt.py").read_text(encoding="utf-8") in docs
    table = f'[project.entry-points."{ENTRY_POINT_GROUP}"]\ntoyckpt = "toyckpt:ToyFormat"\n'
    assert table in (TOY / "pyproject.toml").read_text(encoding="utf-8")
    assert table in docs


def test_a_third_party_format_outside_pytest(site: Path, toy_file: Path) -> None:
    """``schema_of(path)`` reads its header; ``values=True`` loads it with its ``load``."""
    result = python(
        site,
        f"""
        import sys
        import torch
        from torch import nn
        from pytest_statedict import schema_of
        from pytest_statedict.formats.registry import registered_formats
        torch.manual_seed(0)
        state = dict({MODEL}.state_dict())
        path = sys.argv[1]
        print([f.name for f in registered_formats()])
        assert schema_of(path).tensors == schema_of(state).tensors
        assert schema_of(path).source == path
        assert schema_of(path, values=True).tensors == schema_of(state, values=True).tensors
        """,
        str(toy_file),
    )
    assert result.returncode == 0, result.stderr
    names = ["toyckpt", *(f.name for f in BUILTIN_FORMATS)]
    assert result.stdout.strip() == repr(names)


def test_statedict_show_lists_a_third_party_format_without_torch(
    site: Path, toy_file: Path
) -> None:
    result = python(
        site,
        """
        import sys
        from pytest_statedict.cli import main
        code = main(["show", sys.argv[1]])
        assert "torch" not in sys.modules, "a torch-free format needs no torch"
        sys.exit(code)
        """,
        str(toy_file),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "kind", "elements"]
    assert lines[2].split() == ["0.weight", "2x3", "float32", "tensor", "6"]
    assert lines[3].split() == ["0.bias", "2", "float32", "tensor", "2"]
    assert "2 keys, 2 tensors, 8 elements" in result.stdout


def test_the_gate_reads_a_third_party_format(
    pytester: pytest.Pytester, site: Path, toy_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's test: today's model loads it; a renamed one fails with the diff."""
    monkeypatch.setenv("PYTHONPATH", environment(site)["PYTHONPATH"])
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTEST_PLUGINS", "pytest_statedict.plugin")
    test = f"""
from torch import nn
from pytest_statedict import assert_checkpoint_loads

CHECKPOINT = {str(toy_file)!r}
{RENAMED}

def test_today():
    assert_checkpoint_loads({MODEL}, CHECKPOINT)

def test_renamed():
    assert_checkpoint_loads(Renamed(), CHECKPOINT)
"""
    (pytester.path / "test_gate.py").write_text(test, encoding="utf-8")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    match_lines(
        result,
        [
            "*checkpoint * does not load into Renamed with *",
            "*missing (in the model, not in the checkpoint) (2):",
            "*fc.weight",
            "*likely renamed (same shape and dtype):",
            "*0.weight -> fc.weight",
            "*statedict: gates: 1 passed, 1 failed*",
        ],
    )


def test_a_broken_entry_point_is_one_clear_error(tmp_path: Path) -> None:
    """An import error in a format's entry point names it, and no checkpoint is read."""
    site = tmp_path / "site"
    install(site, "brokenfmt", "broken = brokenfmt_gone:Format")
    checkpoint = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, checkpoint)
    result = subprocess.run(
        [sys.executable, "-m", "pytest_statedict", "show", str(checkpoint)],
        env=environment(site),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        "statedict: checkpoint format entry point broken = brokenfmt_gone:Format (group "
        "pytest_statedict.formats) of the distribution brokenfmt 0.1.0: cannot be loaded "
        "(ModuleNotFoundError: No module named 'brokenfmt_gone')."
    )
    assert "fix or uninstall that distribution" in result.stderr


# ---- the registry in this process: entry points stood in for ----------------------------


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EntryPoint]]:
    """The entry points the registry finds: append to the list before its first read."""
    found: list[EntryPoint] = []
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: list(found))
    registered_formats.cache_clear()
    yield found
    registered_formats.cache_clear()


def entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


class ClaimsPt:
    """A format that claims every ``.pt`` file, as a project's own format might."""

    name = "claims-pt"
    schema_first = False
    torch_free = False
    save = None

    def detect(self, path: Path, head: bytes | None) -> bool:
        return head is not None and path.suffix == ".pt"

    def read_schema(self, path: Path, **options: object) -> None:
        raise AssertionError("not schema_first, not torch_free: never asked")

    def load(self, path: Path, **options: object) -> Loaded:
        return Loaded({"claimed": torch.ones(1)})


class Unmakeable:
    """A format class that cannot be made."""

    def __init__(self) -> None:
        raise RuntimeError("needs a licence key")


def test_third_party_formats_come_first(
    entry_points: list[EntryPoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In entry-point name order, before the built-ins: they may claim a built-in's files."""
    monkeypatch.syspath_prepend(str(TOY))
    entry_points.append(entry_point("z", f"{__name__}:ClaimsPt"))
    entry_points.append(entry_point("a", "toyckpt:ToyFormat"))
    assert [f.name for f in registered_formats()] == [
        "toyckpt",
        "claims-pt",
        *(f.name for f in BUILTIN_FORMATS),
    ]
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert detect(path)[0].name == "claims-pt"
    assert [t.key for t in schema_of(path)] == ["claimed"]
    assert detect(tmp_path)[0].name == "claims-pt"  # a folder's one checkpoint file


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("brokenfmt_gone:Format", "cannot be loaded (ModuleNotFoundError: No module named"),
        ("json:JSONDecoder", "names a JSONDecoder, which is no checkpoint format: it lacks name"),
        (f"{__name__}:Unmakeable", "cannot be loaded (RuntimeError: needs a licence key)"),
    ],
)
def test_a_broken_entry_point_names_itself(
    entry_points: list[EntryPoint], tmp_path: Path, value: str, problem: str
) -> None:
    entry_points.append(entry_point("broken", value))
    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(FormatPluginError) as info:
        schema_of(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint format entry point broken = {value} (group ")
    assert problem in message and "\n" not in message
    with pytest.raises(FormatPluginError):  # on every read, not only the first
        registered_formats()


def test_no_entry_points_leaves_the_builtins(entry_points: list[EntryPoint]) -> None:
    assert registered_formats() == BUILTIN_FORMATS
    assert [f.name for f in BUILTIN_FORMATS] == [
        "dcp",
        "training folder",
        "peft adapter",
        "index",
        "snapshot",
        "torch zip",
        "safetensors",
        "torch legacy",
    ]


# ---- the built-ins ----------------------------------------------------------------------


def test_each_builtin_detects_its_files(tmp_path: Path) -> None:
    """Every format is recognised as before the registry, by name and by content."""
    state = {"w": torch.zeros(2, 3), "b": torch.ones(2)}
    files = {
        "zip.pt": "torch zip",
        "legacy.pt": "torch legacy",
        "model.safetensors": "safetensors",
        "safetensors.bin": "safetensors",  # by content, whatever its name
        "snapshot.json": "snapshot",
        "sharded.index.json": "index",
        "unnamed_index.json": "index",  # by its "weight_map"
    }
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_safetensors = format_named("safetensors").save
    assert save_safetensors is not None
    save_safetensors(state, tmp_path / "model.safetensors")
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "safetensors.bin")
    (tmp_path / "snapshot.json").write_text(schema_of(state).to_json(), encoding="utf-8")
    index = '{"metadata": {}, "weight_map": {"w": "model.safetensors", "b": "model.safetensors"}}'
    (tmp_path / "sharded.index.json").write_text(index, encoding="utf-8")
    (tmp_path / "unnamed_index.json").write_text(index, encoding="utf-8")
    for name, expected in files.items():
        fmt, where = detect(tmp_path / name)
        assert (fmt.name, where) == (expected, tmp_path / name), name
        assert schema_of(tmp_path / name).by_key()["w"].shape == (2, 3), name

    dcp = tmp_path / "dcp"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps({}))
    assert detect(dcp)[0].name == detect(dcp / ".metadata")[0].name == "dcp"
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(tmp_path / "model.safetensors", hub)
    assert detect(hub) == (format_named("safetensors"), hub / "model.safetensors")


def test_what_no_format_claims_is_refused_as_before(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(b"hello, world")
    with pytest.raises(CheckpointError) as info:
        detect(path)
    assert str(info.value) == (
        f"checkpoint {path}: not a checkpoint: it starts with the bytes 68 65 6c 6c, neither "
        "a torch.save file, .safetensors, a sharded *.index.json, a torch.distributed."
        "checkpoint folder or a statedict snapshot .json"
    )


@pytest.mark.parametrize(("name", "suffix"), [("torch zip", ".pt"), ("torch legacy", ".pt")])
def test_builtin_saves_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    path = tmp_path / f"model{suffix}"
    saver = format_named(name).save
    assert saver is not None
    saver(model.state_dict(), path)
    assert detect(path)[0].name == name
    assert schema_of(path, values=True) == schema_of(model.state_dict(), values=True)


def test_formats_that_hold_no_state_dict_cannot_save() -> None:
    assert [f.name for f in BUILTIN_FORMATS if f.save is None] == [
        "dcp",
        "training folder",
        "peft adapter",
        "index",
        "snapshot",
    ]


# ---- start-up ---------------------------------------------------------------------------


def test_the_plugin_reads_no_format_until_a_checkpoint_is_read() -> None:
    """Importing the plugin (every pytest run) imports no format and scans no entry point."""
    code = textwrap.dedent(
        """
        import sys
        import pytest_statedict.plugin
        import pytest_statedict
        loaded = sorted(m for m in sys.modules if m.startswith("pytest_statedict.formats"))
        print(",".join(loaded) or "none")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "none"


def test_the_command_line_imports_no_importlib_metadata_without_a_format(tmp_path: Path) -> None:
    """Finding no format installed costs a look at the distributions' entry_points.txt,
    not the import of importlib.metadata (and the email package it brings: a third of a
    ``statedict show``); a declared one is found (see the subprocess tests above)."""
    path = tmp_path / "small.pt"
    torch.save({"w": torch.zeros(2)}, path)
    code = (
        "import sys\n"
        "from pytest_statedict.cli import main\n"
        f"assert main(['show', {str(path)!r}]) == 0\n"
        "assert 'importlib.metadata' not in sys.modules, 'importlib.metadata imported'\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
