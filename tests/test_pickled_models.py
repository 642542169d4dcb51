"""A whole pickled model (``torch.save(model)``): refused unless unpickling is asked for.

The API asks with ``weights_only=False`` by name; the command line with
``--unsafe-unpickle``, which warns, and which the refusal names. A file is never unpickled
beyond weights-only without it, so a hostile pickle's payload never runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_statedict import Schema, schema_of
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


def python(code: str, project: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(project), os.getcwd()])}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
        cwd=project,
    )  # fmt: skip


def statedict(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    code = f"from pytest_statedict.cli import main; raise SystemExit(main({list(args)!r}))"
    return python(code, project)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project whose models module the pickled models' class comes from."""
    (tmp_path / "mymodels.py").write_text(MODELS, encoding="utf-8")
    return tmp_path


def save_model(project: Path, name: str, width: int = 4) -> Path:
    code = f"import torch, mymodels; torch.save(mymodels.Net({width}), {name!r})"
    saved = python(code, project)
    assert saved.returncode == 0, saved.stderr
    return project / name


def test_the_refusal_names_the_flag(project: Path) -> None:
    save_model(project, "whole.pt")
    for args in (["show", "whole.pt"], ["diff", "whole.pt", "whole.pt"]):
        done = statedict(project, *args)
        assert done.returncode == 2
        assert "It holds a whole pickled module: save `model.state_dict()` instead" in done.stderr
        assert "If you trust the file, pass --unsafe-unpickle (it runs code from the file)" in (
            done.stderr
        )
        assert "weights_only=False" not in done.stderr.split("the error from torch.load")[0]


def test_with_the_flag_the_module_is_shown_with_its_kinds(project: Path) -> None:
    save_model(project, "whole.pt")
    done = statedict(project, "show", "--unsafe-unpickle", "whole.pt")
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


def test_diff_and_record_take_the_flag(project: Path) -> None:
    save_model(project, "v1.pt")
    save_model(project, "v2.pt", width=5)
    diffed = statedict(project, "diff", "--unsafe-unpickle", "v1.pt", "v2.pt")
    assert diffed.returncode == 1, diffed.stderr
    assert diffed.stderr.strip() == WARNING
    assert "fc.weight" in diffed.stdout
    refused = statedict(project, "record", "v1.pt", "--release", "v1", "--dir", "releases")
    assert refused.returncode == 2 and "--unsafe-unpickle" in refused.stderr
    recorded = statedict(
        project, "record", "--unsafe-unpickle", "v1.pt", "--release", "v1", "--dir", "releases"
    )
    assert recorded.returncode == 0, recorded.stderr
    (snapshot,) = (project / "releases").glob("v1*")
    kinds = {t.key: t.kind for t in Schema.from_json(snapshot.read_text(encoding="utf-8"))}
    assert kinds["bn.running_mean"] == "buffer" and kinds["fc.weight"] == "parameter"


def test_a_hostile_pickle_never_runs_without_the_flag(project: Path) -> None:
    marker = project / "ran"
    code = textwrap.dedent(
        f"""
        import pathlib, torch

        class Payload:
            def __reduce__(self):
                return (pathlib.Path.touch, ({str(marker)!r},))

        torch.save({{"weight": torch.zeros(2), "hook": Payload()}}, "hostile.pt")
        """
    )
    assert python(code, project).returncode == 0
    assert not marker.exists()
    for args in (
        ["show", "hostile.pt"],
        ["show", "--json", "hostile.pt"],
        ["diff", "hostile.pt", "hostile.pt"],
        ["record", "hostile.pt", "--release", "v1", "--dir", "releases"],
    ):
        done = statedict(project, *args)
        assert done.returncode == 2, args
        assert "--unsafe-unpickle" in done.stderr, args
    assert not marker.exists()


def test_a_class_that_cannot_be_found_is_named(project: Path) -> None:
    """Pickled from a script's ``__main__``, or from a module this machine lacks: named,
    not called truncated or corrupt."""
    script = f"{MODELS}\ntorch.save(Net(), 'from_script.pt')\n"
    assert python(script, project).returncode == 0
    done = statedict(project, "show", "--unsafe-unpickle", "from_script.pt")
    assert done.returncode == 2
    assert "it holds a __main__.Net: a class of the script that saved it" in done.stderr
    save_model(project, "whole.pt")
    (project / "mymodels.py").unlink()
    done = statedict(project, "show", "--unsafe-unpickle", "whole.pt")
    assert "it holds a mymodels.Net, but mymodels is not installed here" in done.stderr


def test_the_api_keeps_weights_only_false_by_name(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_model(project, "whole.pt")
    monkeypatch.syspath_prepend(str(project))
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
    code = textwrap.dedent(
        """
        import mymodels
        from pytest_statedict import assert_checkpoint_loads, StateDictError, StateDictMismatch
        try:
            assert_checkpoint_loads(mymodels.Net(), "whole.pt")
        except StateDictError as exc:
            print("refused:", "pass weights_only=False by name" in str(exc))
        assert_checkpoint_loads(mymodels.Net(), "whole.pt", weights_only=False)
        print("loads")
        wider = mymodels.Net(width=5)
        try:
            assert_checkpoint_loads(wider, "whole.pt", weights_only=False)
        except StateDictMismatch as exc:
            print("widened:", "shape mismatches" in str(exc))
        """
    )
    done = python(code, project)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["refused:", "True", "loads", "widened:", "True"]
