"""Release history: recording release snapshots, the release gate, and `statedict history`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import match_lines
from torch import nn

from pytest_statedict import StateDictError, record_release, schema_of
from pytest_statedict.cli import main
from pytest_statedict.releases import newest_first, project_dir

RELEASES = Path("tests/__statedict__/releases")

# The user's model module: v1 has `fc`; the later edits rename it, widen it, add a hook.
MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, hidden=8):
            super().__init__()
            self.encoder = nn.Linear(4, hidden)
            self.fc = nn.Linear(hidden, 2)


    def build():
        with torch.device("meta"):
            return Net()


    def build_for(release):
        with torch.device("meta"):
            return Net(hidden=16 if release == "v2.0" else 8)


    def make_optimizer(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    """
)

GATE = """
from model import build, make_optimizer
from pytest_statedict import statedict_releases

test_releases = statedict_releases(build, optimizer=make_optimizer{extra})
"""


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, hidden)
        self.fc = nn.Linear(hidden, 2)


def project(pytester: pytest.Pytester, *, extra: str = "", ini: str = "") -> None:
    pytester.makeini(f"[pytest]\npythonpath = .\n{ini}")
    pytester.makepyfile(model=MODEL)
    pytester.makepyfile(test_user_releases=GATE.format(extra=extra))


def record(pytester: pytest.Pytester, name: str, model: nn.Module, optimizer: bool = False) -> Path:
    """A release recorded as a user would, with `statedict record` on a saved checkpoint."""
    checkpoint = pytester.path / f"{name}.pt"
    state: dict[str, object] = {"model_state_dict": model.state_dict()}
    if optimizer:
        state["optimizer_state_dict"] = torch.optim.AdamW(model.parameters()).state_dict()
    torch.save(state, checkpoint)
    assert main(["record", str(checkpoint), "--release", name]) == 0
    return pytester.path / RELEASES / f"{name}.json"


def edit_model(pytester: pytest.Pytester, old: str, new: str) -> None:
    path = pytester.path / "model.py"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# ---- recording ---------------------------------------------------------------------------


def test_record_from_the_command_line_writes_a_snapshot(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    project(pytester)
    path = record(pytester, "v1.0", Net(), optimizer=True)
    out = capsys.readouterr().out
    assert f"recorded release v1.0 in {RELEASES / 'v1.0.json'}" in out
    recorded = json.loads(path.read_text())
    assert recorded["format"] == "pytest-statedict"
    assert [t["key"] for t in recorded["tensors"]] == [
        "encoder.weight",
        "encoder.bias",
        "fc.weight",
        "fc.bias",
    ]
    assert recorded["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert not list(path.parent.glob(".*")), "no temp file left behind"


def test_record_refuses_to_overwrite_a_release(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    project(pytester)
    path = record(pytester, "v1.0", Net())
    before = path.read_text()
    torch.save(Net(hidden=16).state_dict(), pytester.path / "other.pt")
    assert main(["record", "other.pt", "--release", "v1.0"]) == 2
    err = capsys.readouterr().err
    assert f"release v1.0 is already recorded in {RELEASES / 'v1.0.json'}" in err
    assert "never overwritten" in err
    assert path.read_text() == before
    # refused before the model is built or the checkpoint read (a release's can be large)
    assert main(["record", "absent.pt", "--release", "v1.0", "--model", "absent:build"]) == 2
    assert "release v1.0 is already recorded" in capsys.readouterr().err


def test_a_release_recorded_by_another_process_meanwhile_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes recording one release at once both pass the "already recorded?"
    check; publishing is an exclusive create, so the second one is told, and the first
    one's file stays as it was written. The race is made certain here: the other process's
    file appears between the check and the write."""
    from pytest_statedict import releases

    folder = tmp_path / "releases"
    folder.mkdir()
    theirs = schema_of(Net()).to_json()
    (folder / "v1.json").write_text(theirs)
    monkeypatch.setattr(releases, "list_releases", lambda _folder: [])
    monkeypatch.setattr(releases.os.path, "lexists", lambda _path: False)
    with pytest.raises(StateDictError, match="release v1 is already recorded"):
        releases.write_release(folder, "v1", schema_of(Net(hidden=16)).to_json(), base=tmp_path)
    assert (folder / "v1.json").read_text() == theirs
    assert [p.name for p in folder.iterdir()] == ["v1.json"], "no temp file left behind"


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "", "with space"])
def test_record_refuses_a_name_that_is_no_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(StateDictError, match="cannot name a file|non-empty string"):
        record_release(Net(), name, directory=tmp_path)
    assert not list(tmp_path.iterdir())


def test_record_a_live_model_in_a_test(pytester: pytest.Pytester) -> None:
    """record_release() in a test writes to the ini's folder; the second run refuses."""
    project(pytester, ini="statedict_releases_dir = history")
    pytester.makepyfile(
        test_record="""
        from model import build, make_optimizer
        from pytest_statedict import record_release

        def test_record():
            model = build()
            path = record_release(model, "v3", make_optimizer(model))
            assert path.name == "v3.json" and path.parent.name == "history"
        """
    )
    result = pytester.runpytest("test_record.py")
    result.assert_outcomes(passed=1)
    recorded = json.loads((pytester.path / "history" / "v3.json").read_text())
    assert recorded["tensors"][0] == {
        "key": "encoder.weight",
        "kind": "parameter",
        "shape": [8, 4],
        "dtype": "float32",
        "requires_grad": True,
    }
    assert recorded["optimizer"]["class"] == "torch.optim.adamw.AdamW"
    assert recorded["optimizer"]["param_groups"][0]["params"][0] == "encoder.weight"
    result = pytester.runpytest("test_record.py")
    result.assert_outcomes(failed=1)
    match_lines(result, ["*release v3 is already recorded in *history/v3.json*"])


def test_the_command_line_finds_the_ini_folder(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nstatedict_releases_dir = "ckpt/releases"\n'
    )
    (tmp_path / "sub").mkdir()
    assert project_dir(tmp_path / "sub") == (
        tmp_path.resolve(),
        tmp_path.resolve() / "ckpt/releases",
    )
    (tmp_path / "sub" / "tox.ini").write_text("[pytest]\n")
    assert project_dir(tmp_path / "sub")[1] == (tmp_path / "sub" / RELEASES).resolve()


def test_newest_first_by_version_else_naturally() -> None:
    assert newest_first(["v0.9", "v0.10", "v1.0rc1", "v1.0", "v0.2"]) == [
        "v1.0",
        "v1.0rc1",
        "v0.10",
        "v0.9",
        "v0.2",
    ]
    assert newest_first(["cnn-v2", "cnn-v10", "cnn-v1"]) == ["cnn-v10", "cnn-v2", "cnn-v1"]


# ---- the release gate --------------------------------------------------------------------


def test_one_test_per_release_newest_first(pytester: pytest.Pytester) -> None:
    project(pytester)
    for name in ("v0.9", "v0.10", "v0.2"):
        record(pytester, name, Net(), optimizer=True)
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=3)
    match_lines(
        result,
        [
            "test_user_releases.py::test_releases[v0.10] PASSED*",
            "test_user_releases.py::test_releases[v0.9] PASSED*",
            "test_user_releases.py::test_releases[v0.2] PASSED*",
            "statedict: releases: 3 passed",
        ],
    )


def test_no_release_yet_is_a_skip_that_says_how_to_record(pytester: pytest.Pytester) -> None:
    project(pytester)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    match_lines(
        result, ["*no release snapshots in *releases yet: record one with `statedict record*"]
    )


def test_a_release_that_no_longer_loads_fails_with_the_gate_report(
    pytester: pytest.Pytester,
) -> None:
    project(pytester)
    record(pytester, "v1.0", Net())
    edit_model(pytester, "self.fc = ", "self.head = ")
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        [
            "*checkpoint *v1.0.json does not load into Net with load_state_dict(strict=True):",
            "*likely renamed*",
            "*fc.weight -> head.weight",
            "*rename=[(r'^fc\\.', 'head.')] (rename= maps the checkpoint's keys to today's)",
            "*release v1.0 no longer loads. If the break is deliberate, record it: "
            "statedict_releases(..., expected_to_fail={'v1.0': 'why'})*",
            "statedict: releases: 1 failed",
        ],
    )


def test_a_load_hook_makes_an_old_release_load(pytester: pytest.Pytester) -> None:
    """Hooks count: the rename with a _load_from_state_dict converting v1 keys passes."""
    project(pytester)
    record(pytester, "v1.0", Net())
    edit_model(pytester, "self.fc = ", "self.head = ")
    edit_model(
        pytester,
        "\n\ndef build():",
        """
    def _load_from_state_dict(self, state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix + "fc.")]:
            state_dict[prefix + "head." + key[len(prefix) + 3:]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


def build():""",
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def test_a_reshape_fails_and_a_per_release_model_passes(pytester: pytest.Pytester) -> None:
    project(pytester)
    record(pytester, "v1.0", Net())
    record(pytester, "v2.0", Net(hidden=16))
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    match_lines(
        result, ["*shape mismatches (3):", "*encoder.weight: checkpoint [16, 4], model [8, 4]"]
    )
    (pytester.path / "test_user_releases.py").write_text(
        GATE.format(extra="")
        .replace("(build,", "(build_for,")
        .replace("import build,", "import build_for,")
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_the_optimizer_state_is_checked_when_recorded(pytester: pytest.Pytester) -> None:
    project(pytester, extra="")
    record(pytester, "v1.0", Net(), optimizer=True)
    edit_model(
        pytester,
        "return torch.optim.AdamW(model.parameters(), lr=1e-3)",
        "return torch.optim.AdamW([{'params': [model.encoder.weight]}, "
        "{'params': [model.encoder.bias, model.fc.weight, model.fc.bias]}], lr=1e-3)",
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        [
            "*release v1.0's optimizer state: an old optimizer state still loads with "
            "optimizer.load_state_dict: NO, it raises ValueError (1 param_groups saved, 2 now)",
        ],
    )
    # no optimizer given for a release that recorded one: a failure that says what to pass
    (pytester.path / "test_user_releases.py").write_text(
        "from model import build\nfrom pytest_statedict import statedict_releases\n"
        "test_releases = statedict_releases(build)\n"
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(result, ["*release v1.0 recorded an optimizer (unknown): pass *optimizer=*"])
    (pytester.path / "test_user_releases.py").write_text(
        "from model import build\nfrom pytest_statedict import statedict_releases\n"
        "test_releases = statedict_releases(build, optimizer=None)\n"
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_expected_failures_are_shown_and_a_fixed_one_says_so(pytester: pytest.Pytester) -> None:
    project(pytester, extra=", expected_to_fail={'v1.0': 'fc renamed to head in 2.0'}")
    record(pytester, "v1.0", Net())
    with torch.device("meta"):
        renamed = Net()
    renamed.head = renamed.fc
    del renamed.fc
    record(pytester, "v2.0", renamed)
    result = pytester.runpytest("-rxX")
    result.assert_outcomes(failed=1, xpassed=1)  # the model still has fc: v2.0 fails
    edit_model(pytester, "self.fc = ", "self.head = ")
    result = pytester.runpytest("-rxX")
    result.assert_outcomes(passed=1, xfailed=1)
    match_lines(
        result,
        [
            "*statedict: releases expected to fail*",
            "  v1.0: fc renamed to head in 2.0 (fails, as expected)",
            "statedict: releases: 1 passed, 1 xfailed",
        ],
    )
    # a load hook brings v1.0 back: an expected failure that passes is shown as such
    edit_model(
        pytester,
        "\n\ndef build():",
        """
    def _load_from_state_dict(self, state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix + "fc.")]:
            state_dict[prefix + "head." + key[len(prefix) + 3:]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


def build():""",
    )
    result = pytester.runpytest("-rxX")
    result.assert_outcomes(passed=1, xpassed=1)
    match_lines(
        result,
        [
            "  v1.0: loads again, though expected to fail (fc renamed to head in 2.0): "
            "remove it from expected_to_fail",
            "statedict: releases: 1 passed, 1 xpassed",
        ],
    )


def test_expected_failures_from_the_ini_and_typos(pytester: pytest.Pytester) -> None:
    project(pytester, ini="statedict_releases_expected_to_fail =\n    v1.0: a deliberate break")
    record(pytester, "v1.0", Net())
    edit_model(pytester, "self.fc = ", "self.head = ")
    result = pytester.runpytest()
    result.assert_outcomes(xfailed=1)
    match_lines(result, ["  v1.0: a deliberate break (fails, as expected)"])
    # a name that is no release is an error, not an expectation that never applies
    project(pytester, ini="statedict_releases_expected_to_fail =\n    v1.1: typo")
    result = pytester.runpytest()
    assert result.ret != 0
    match_lines(
        result,
        ["*the ini option statedict_releases_expected_to_fail names 'v1.1', which is not a "
         "release in *releases (releases: v1.0)*"],
    )  # fmt: skip
    project(pytester, ini="statedict_releases_expected_to_fail =\n    v1.0")
    result = pytester.runpytest()
    assert result.ret != 0
    match_lines(result, ["*statedict_releases_expected_to_fail: 'v1.0' is not 'NAME: reason'*"])


def test_a_bad_snapshot_fails_even_when_expected_to_fail(pytester: pytest.Pytester) -> None:
    """Only a real load failure is the expected one: a corrupt file is an error."""
    project(pytester, extra=", expected_to_fail={'v1.0': 'known break'}")
    path = record(pytester, "v1.0", Net())
    path.write_text(path.read_text().replace('"shape": [8, 4]', '"shape": "8x4"'))
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(result, ["*statedict snapshot *v1.0.json:*shape*"])


def test_release_files_are_never_unused_snapshots(pytester: pytest.Pytester) -> None:
    project(pytester)
    record(pytester, "v1.0", Net())
    pytester.makepyfile(
        test_snap="""
        from model import build
        def test_layout(statedict_snapshot):
            statedict_snapshot.assert_match(build())
        """
    )
    result = pytester.runpytest("--statedict-update")
    result.assert_outcomes(passed=2)
    match_lines(result, ["statedict: 1 written in __statedict__/; releases: 1 passed"])
    assert (pytester.path / RELEASES / "v1.0.json").exists()


def test_the_layout_path_and_the_gate_agree(tmp_path: Path) -> None:
    """The release gate decides a hook-free model from keys and shapes, without a load: it
    must never pass what the gate (a real load through load_state_dict) refuses, and it
    hands anything it is unsure of to the gate."""
    from pytest_statedict import assert_checkpoint_loads
    from pytest_statedict.releases import Release, ReleaseGate

    class Wide(Net):
        def __init__(self) -> None:
            super().__init__(hidden=16)

    class Extra(Net):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.ones(2))

    class Scale(nn.Module):
        def __init__(self, shape: tuple[int, ...] = ()) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(shape))

    class Vector(Scale):  # load_state_dict loads a 1-element vector into a scalar
        def __init__(self) -> None:
            super().__init__((1,))

    class Normed(Net):  # BatchNorm's own load code fills in a missing num_batches_tracked
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(8)

    cases = [(Net, Net), (Net, Wide), (Net, Extra), (Extra, Net), (Vector, Scale)]
    cases += [(Normed, Normed), (Net, Normed), (Normed, Net)]
    for old, new in cases:
        path = tmp_path / f"{old.__name__}.json"
        path.write_text(schema_of(old()).to_json())
        for strict in (True, False):
            gate = ReleaseGate(new, optimizer=None, strict=strict)
            try:
                assert_checkpoint_loads(new(), path, strict=strict)
                loads = True
            except AssertionError:
                loads = False
            by_layout = gate._loads_by_layout(new(), schema_of(path))
            assert by_layout <= loads, (old, new, strict)
            if old is not Vector:
                assert by_layout == loads, (old, new, strict)
            try:
                gate.check(Release("r", path))
            except AssertionError:
                assert not loads, (old, new, strict)
            else:
                assert loads, (old, new, strict)


# ---- history -----------------------------------------------------------------------------


def test_history_lists_what_changed_per_release(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str]
) -> None:
    project(pytester)
    record(pytester, "v1.0", Net())
    record(pytester, "v2.0", Net(hidden=16))
    record(pytester, "v2.1", Net(hidden=16))
    renamed = Net(hidden=16)
    renamed.head = renamed.fc
    del renamed.fc
    record(pytester, "v3.0", renamed)
    capsys.readouterr()
    assert main(["history"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"release history of {RELEASES} (newest first)",
        "",
        "v3.0 (since v2.1):",
        "  renamed (2):",
        "    fc.weight -> head.weight",
        "    fc.bias -> head.bias",
        "  v2.1 checkpoints load with strict=True: NO by their layout (2 unexpected keys, "
        "2 missing keys; the model's load hooks may convert them)",
        "",
        "v2.1 (since v2.0):",
        "  no layout change",
        "",
        "v2.0 (since v1.0):",
        "  reshaped (3):",
        "    encoder.weight: [8, 4] -> [16, 4]",
        "    encoder.bias: [8] -> [16]",
        "    fc.weight: [2, 8] -> [2, 16]",
        "  v1.0 checkpoints load with strict=True: NO by their layout (3 shape mismatches; "
        "the model's load hooks may convert them)",
        "",
        "v1.0: the first release, 4 keys, 58 elements",
    ]


def test_history_of_no_releases_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "--dir", str(tmp_path)]) == 2
    assert "no release snapshots in" in capsys.readouterr().err


def test_history_of_the_optimizer_is_its_groups_not_its_steps(tmp_path: Path) -> None:
    """Whether the recorded optimizer had stepped is no change of the release's layout."""
    from pytest_statedict.releases import history

    model = Net()
    trained = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    trained.step()
    record_release(model, "v1", trained, directory=tmp_path)
    split = torch.optim.AdamW(
        [
            {"params": [model.encoder.weight]},
            {"params": [model.encoder.bias, *model.fc.parameters()]},
        ]
    )
    record_release(model, "v2", split, directory=tmp_path)
    record_release(model, "v3", directory=tmp_path)
    text = history(tmp_path)
    for line in (
        "param_groups: 1 -> 2",
        "'fc.weight': param_group 0 -> 1",
        "state recorded for 4 parameters, now 0",
    ):
        assert f"\n    {line}\n" in text, text
    assert "state of" not in text
    assert "v3 (since v2):\n  optimizer (1):\n    not recorded in this release" in text
