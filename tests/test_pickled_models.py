"""A whole pickled model (``torch.save(model)``): refused unless unpickling is asked for.

The API asks with ``weights_only=False`` by name; the command line with
``--unsafe-unpickle``, which warns, and which the refusal names. A file is never unpickled
beyond weights-only without it, so a hostile pickle's payload never runs.

Everything runs in this process (the command line through its ``main``): the pickled
models' class comes from a ``mymodels`` module of the test's own folder, importable while
the test runs and dropped from ``sys.modules`` after it.
"""

from __future__ import annotations

import pathlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_statedict import (
    Schema,
    StateDictError,
    StateDictMismatch,
    assert_checkpoint_loads,
    schema_of,
)
from pytest_statedict.cli import main
from pytest_statedict.errors import CheckpointError

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.fc = nn.Linear(3, width)
            self.bn = nn.BatchNorm1d(width)
    """
)
WARNING = (
    "statedict: warning: --unsafe-unpickle unpickles the files fully, which runs any code "
    "they hold: use it only for files you trust"
)


class Run:
    """What one ``statedict`` command line did: its exit code and its two streams."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The current folder, with the models module the pickled models' class comes from."""
    (tmp_path / "mymodels.py").write_text(MODELS, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    yield tmp_path
    sys.modules.pop("mymodels", None)  # the next test's mymodels is another file


@pytest.fixture
def statedict(project: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*args: str) -> Run:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def mymodels() -> Any:
    import mymodels  # type: ignore[import-not-found]

    return mymodels


def save_model(project: Path, name: str, width: int = 4) -> Path:
    torch.save(mymodels().Net(width), project / name)
    return project / name


def test_the_refusal_names_the_flag(project: Path, statedict: Any) -> None:
    save_model(project, "whole.pt")
    for args in (["show", "whole.pt"], ["diff", "whole.pt", "whole.pt"]):
        done = statedict(*args)
        assert done.returncode == 2
        assert "It holds a whole pickled module: save `model.state_dict()` instead" in done.stderr
        assert "If you trust the file, pass --unsafe-unpickle (it runs code from the file)" in (
            done.stderr
        )
        assert "weights_only=False" not in done.stderr.split("the error from torch.load")[0]


def test_with_the_flag_the_module_is_shown_with_its_kinds(project: Path, statedict: Any) -> None:
    save_model(project, "whole.pt")
    done = statedict("show", "--unsafe-unpickle", "whole.pt")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == WARNING
    rows = {line.split()[0]: line.split()[3] for line in done.stdout.splitlines()[2:9]}
    assert rows == {
        "fc.weight": "parameter",
        "fc.bias": "parameter",
        "bn.weight": "parameter",
        "bn.bias": "parameter",
        "bn.running_mean": "buffer",
        "bn.running_var": "buffer",
        "bn.num_batches_tracked": "buffer",
    }
    assert "read as: torch zip, loaded (weights_only=False, by request, memory-mapped)" in (
        done.stdout
    )


def test_diff_and_record_take_the_flag(project: Path, statedict: Any) -> None:
    save_model(project, "v1.pt")
    save_model(project, "v2.pt", width=5)
    diffed = statedict("diff", "--unsafe-unpickle", "v1.pt", "v2.pt")
    assert diffed.returncode == 1, diffed.stderr
    assert diffed.stderr.strip() == WARNING
    assert "fc.weight" in diffed.stdout
    refused = statedict("record", "v1.pt", "--release", "v1", "--dir", "releases")
    assert refused.returncode == 2 and "--unsafe-unpickle" in refused.stderr
    recorded = statedict(
        "record", "--unsafe-unpickle", "v1.pt", "--release", "v1", "--dir", "releases"
    )
    assert recorded.returncode == 0, recorded.stderr
    (snapshot,) = (project / "releases").glob("v1*")
    kinds = {t.key: t.kind for t in Schema.from_json(snapshot.read_text(encoding="utf-8"))}
    assert kinds["bn.running_mean"] == "buffer" and kinds["fc.weight"] == "parameter"


class Payload:
    """Touches a file when unpickled: the pickle holds ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (pathlib.Path.touch, (str(self.marker),))


def test_a_hostile_pickle_never_runs_without_the_flag(project: Path, statedict: Any) -> None:
    marker = project / "ran"
    torch.save({"weight": torch.zeros(2), "hook": Payload(marker)}, "hostile.pt")
    assert not marker.exists()
    for args in (
        ["show", "hostile.pt"],
        ["show", "--json", "hostile.pt"],
        ["diff", "hostile.pt", "hostile.pt"],
        ["record", "hostile.pt", "--release", "v1", "--dir", "releases"],
    ):
        done = statedict(*args)
        assert done.returncode == 2, args
        assert "--unsafe-unpickle" in done.stderr, args
    assert not marker.exists()


def test_a_class_that_cannot_be_found_is_named(
    project: Path, statedict: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pickled from a script's ``__main__``, or from a module this machine lacks: named,
    not called truncated or corrupt."""
    script: dict[str, Any] = {"__name__": "__main__"}
    exec(MODELS, script)  # the class as a script run as __main__ defines it
    with monkeypatch.context() as running_script:
        running_script.setattr(sys.modules["__main__"], "Net", script["Net"], raising=False)
        torch.save(script["Net"](), "from_script.pt")
    assert not hasattr(sys.modules["__main__"], "Net")
    done = statedict("show", "--unsafe-unpickle", "from_script.pt")
    assert done.returncode == 2
    assert "it holds a __main__.Net: a class of the script that saved it" in done.stderr
    save_model(project, "whole.pt")
    (project / "mymodels.py").unlink()
    del sys.modules["mymodels"]  # as on a machine that never had it
    done = statedict("show", "--unsafe-unpickle", "whole.pt")
    assert "it holds a mymodels.Net, but mymodels is not installed here" in done.stderr


def test_the_api_keeps_weights_only_false_by_name(project: Path) -> None:
    path = save_model(project, "whole.pt")
    with pytest.raises(CheckpointError, match="pass weights_only=False by name"):
        schema_of(path)
    schema = schema_of(path, weights_only=False)
    assert schema.knows_modules
    assert schema.by_key()["bn.num_batches_tracked"].kind == "buffer"
    assert schema.read_as == "torch zip, loaded (weights_only=False, by request, memory-mapped)"


def test_the_gate_takes_weights_only_false_by_name(project: Path) -> None:
    """The gate's refusal names the parameter it has; with it, the module's state is
    judged like any checkpoint's (a rename since is a NO)."""
    save_model(project, "whole.pt")
    with pytest.raises(StateDictError, match="pass weights_only=False by name"):
        assert_checkpoint_loads(mymodels().Net(), "whole.pt")
    assert_checkpoint_loads(mymodels().Net(), "whole.pt", weights_only=False)
    with pytest.raises(StateDictMismatch, match="shape mismatches"):
        assert_checkpoint_loads(mymodels().Net(width=5), "whole.pt", weights_only=False)
