"""The snapshot workflow as a user meets it: pytest runs on a project, exit codes, output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import match_lines

USES_NET = """
    from netmodel import Net, make_optimizer
    from pytest_statedict import assert_state_dict_matches
"""


def write_test(pytester: pytest.Pytester, body: str, name: str = "test_model") -> None:
    pytester.makepyfile(**{name: USES_NET + body})


def snapshot(pytester: pytest.Pytester, test: str = "test_net", leaf: str = "0") -> Path:
    return pytester.path / "__statedict__" / "test_model" / test / f"{leaf}.json"


def test_create_fail_update_pass(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    def test_net():
        model = Net()
        assert_state_dict_matches(model, optimizer=make_optimizer(model))
    """,
    )
    # 1. no snapshot yet: the test fails, names the file and the command, writes nothing
    result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    match_lines(
        result,
        [
            "*no statedict snapshot __statedict__/test_model/test_net/0.json yet: nothing was "
            "written*",
            "*pytest --statedict-update 'test_model.py::test_net'*",
            "statedict: 1 failed",
        ],
    )
    assert not snapshot(net_project).exists()

    # 2. --statedict-update writes it; the test passes and is counted as written
    result = net_project.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 1 written in __statedict__/"])
    text = snapshot(net_project).read_text()
    assert text.startswith('{\n"format": "pytest-statedict", "version": 1,')
    assert '"key": "conv1.weight", "kind": "parameter", "shape": [6, 3, 5, 5]' in text

    # 3. unchanged model: passes, file byte for byte the same
    result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 1 passed"])
    assert snapshot(net_project).read_text() == text

    # 4. a refactor (wider conv, another weight decay): fails with the diff, file untouched
    write_test(
        net_project,
        """
    def test_net():
        model = Net(width=8)
        assert_state_dict_matches(model, optimizer=make_optimizer(model, decay=0.1))
    """,
    )
    result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    match_lines(
        result,
        [
            "*state_dict does not match snapshot __statedict__/test_model/test_net/0.json",
            "*changed (7):",
            "*~ conv1.weight: shape [6, 3, 5, 5] -> [8, 3, 5, 5]",
            "*optimizer (1):",
            "*param_groups*weight_decay* changed from 0.01 to 0.1",
            "*an old checkpoint still loads with load_state_dict(strict=True): NO, through Net's "
            "own load_state_dict (7 shape mismatches)",
            "*to accept this change: pytest --statedict-update 'test_model.py::test_net'",
        ],
    )
    assert snapshot(net_project).read_text() == text

    # 5. accept it, then it passes
    result = net_project.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 1 updated in __statedict__/"])
    assert "[8, 3, 5, 5]" in snapshot(net_project).read_text()
    net_project.runpytest().assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("change", "expected_lines"),
    [
        pytest.param(
            "model.fc1 = torch.nn.Linear(400, 120, dtype=torch.float64)",
            [
                "*~ fc1.weight: dtype float32 -> float64",
                "*~ fc1.bias: dtype float32 -> float64",
                "*still loads with load_state_dict(strict=True): yes (dtypes changed*",
            ],
            id="dtype",
        ),
        pytest.param(
            "model.conv1.requires_grad_(False)",
            ["*~ conv1.weight: requires_grad True -> False", "*~ conv1.bias: requires_grad*"],
            id="frozen",
        ),
        pytest.param(
            "model.head = model.fc3; del model.fc3",
            [
                "*likely renamed (same shape and dtype) (2):",
                "*fc3.weight -> head.weight*",
                "*suggested: rename=[(r'^head\\.', 'fc3.')] (rename= here maps today's keys*",
                "*NO, through Net's own load_state_dict (2 unexpected keys, 2 missing keys)",
            ],
            id="rename",
        ),
        pytest.param(
            "model.register_buffer('scale', torch.ones(3))",
            [
                "*added (1):",
                "*+ scale  buffer float32[3]",
                "*NO, through Net's own load_state_dict (1 missing key)",
            ],
            id="added-buffer",
        ),
        pytest.param(
            "model.bn1.track_running_stats = False; del model.bn1.num_batches_tracked",
            ["*removed (1):", "*- bn1.num_batches_tracked  buffer int64[]"],
            id="removed-buffer",
        ),
        pytest.param(
            "model.tail = model.fc3",
            ["*added (2):", "*+ tail.weight  parameter float32[10, 84] tied to fc3.weight"],
            id="tied",
        ),
        pytest.param(
            "model.register_buffer('mask', torch.ones(2), persistent=False)",
            ["*non-persistent buffers (not in the state_dict) (1):", "*+ mask"],
            id="non-persistent",
        ),
        pytest.param(
            "model = torch.nn.DataParallel(model)",
            ["*every key has the prefix 'module.' added*rename=[(r'^module\\.', '')]*"],
            id="wrapper-prefix",
        ),
    ],
)
def test_each_kind_of_change_is_reported(
    net_project: pytest.Pytester, change: str, expected_lines: list[str]
) -> None:
    write_test(
        net_project,
        f"""
    import torch, os

    def test_net():
        model = Net()
        if os.environ.get("REFACTOR"):
            {change}
        assert_state_dict_matches(model)
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFACTOR", "1")
        result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    match_lines(result, expected_lines)


def test_module_version_change_is_reported(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    import os
    from torch import nn

    class Versioned(nn.Linear):
        _version = 3 if os.environ.get("REFACTOR") else 2

    def test_net():
        assert_state_dict_matches(nn.Sequential(Versioned(2, 2)))
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFACTOR", "1")
        result = net_project.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        [
            "*module versions (_metadata*(1):",
            "*0: version 2 -> 3",
            "*yes (module versions changed: their _load_from_state_dict decides)",
        ],
    )


def test_fixture_named_snapshots_and_parametrize_ids(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    import pytest

    @pytest.mark.parametrize("width", [4, 6], ids=["narrow", "wide/../x"])
    def test_net(statedict_snapshot, width):
        model = Net(width=width)
        statedict_snapshot.assert_match(model.conv1, name="conv1")
        statedict_snapshot.assert_match(model)
        statedict_snapshot.assert_match(model.state_dict())
    """,
    )
    result = net_project.runpytest("--statedict-update")
    result.assert_outcomes(passed=2)
    match_lines(result, ["statedict: 6 written in __statedict__/"])
    folder = net_project.path / "__statedict__" / "test_model"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json"))
    assert len(files) == 6
    assert "test_net[narrow]/conv1.json" in files
    assert "test_net[narrow]/0.json" in files and "test_net[narrow]/1.json" in files
    # the id with a path in it stays inside the folder, sanitised and hashed
    wide = [f for f in files if f.startswith("test_net[wide_.._x]-")]
    assert len(wide) == 3, files
    assert all(p.resolve().is_relative_to(folder.resolve()) for p in folder.rglob("*.json"))
    net_project.runpytest().assert_outcomes(passed=2)


def test_accept_command_survives_a_shell(net_project: pytest.Pytester) -> None:
    """The printed command, pasted into a POSIX shell, names exactly the failing test."""
    import shlex

    write_test(
        net_project,
        """
    import pytest

    @pytest.mark.parametrize("width", [4], ids=["it's [odd]"])
    def test_net(width):
        assert_state_dict_matches(Net(width=width))
    """,
    )
    result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    commands = [line.strip().removeprefix("E").strip() for line in result.outlines]
    command = next(c for c in commands if c.startswith("pytest --statedict-update "))
    assert shlex.split(command) == [
        "pytest",
        "--statedict-update",
        "test_model.py::test_net[it's [odd]]",
    ]
    result = net_project.runpytest(*shlex.split(command)[1:])
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 1 written in __statedict__/"])


def test_same_snapshot_asked_twice_in_one_test(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    def test_net(statedict_snapshot):
        statedict_snapshot.assert_match(Net(), name="a")
        statedict_snapshot.assert_match(Net(), name="a")
    """,
    )
    result = net_project.runpytest("--statedict-update")
    result.assert_outcomes(failed=1)
    match_lines(result, ["*checks snapshot*a.json twice*give each check*name=*"])


def test_unused_snapshots_fail_the_session_and_update_deletes_them(
    net_project: pytest.Pytester,
) -> None:
    write_test(
        net_project,
        """
    def test_net():
        assert_state_dict_matches(Net())

    def test_old():
        assert_state_dict_matches(Net(width=4))
        assert_state_dict_matches(Net(width=5))
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=2)
    write_test(
        net_project,
        """
    def test_net():
        assert_state_dict_matches(Net())

    def test_old():
        assert_state_dict_matches(Net(width=4))
    """,
    )
    (net_project.path / "__statedict__" / "test_model" / "test_removed").mkdir()
    removed = net_project.path / "__statedict__" / "test_model" / "test_removed" / "0.json"
    removed.write_text(snapshot(net_project).read_text())

    result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2)
    match_lines(
        result,
        [
            "*statedict: unused snapshots*",
            "*__statedict__/test_model/test_old/1.json",
            "*__statedict__/test_model/test_removed/0.json",
            "*No test that ran asked for these files*",
            "statedict: 2 passed, 2 unused",
        ],
    )
    assert removed.exists()
    red, yellow = "\x1b[31m", "\x1b[33m"
    colored = net_project.runpytest("--color=yes").stdout.str()
    assert f"{red}statedict: 2 passed, 2 unused" in colored  # the run failed: say so in red

    result = net_project.runpytest("--statedict-warn-unused")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 2 passed, 2 unused"])
    colored = net_project.runpytest("--color=yes", "--statedict-warn-unused").stdout.str()
    assert f"{yellow}statedict: 2 passed, 2 unused" in colored  # listed, not failing

    result = net_project.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["*deleted unused snapshots*", "statedict: 2 passed, 2 deleted"])
    assert not removed.exists() and not removed.parent.exists()
    assert not snapshot(net_project, "test_old", "1").exists()
    assert snapshot(net_project, "test_old", "0").exists()
    assert net_project.runpytest().ret == pytest.ExitCode.OK


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-k", "test_net"], id="-k"),
        pytest.param(["-m", "not slow"], id="-m"),
        pytest.param(["test_model.py::test_net"], id="node-id"),
        pytest.param(["-x"], id="stopped-early"),
    ],
)
def test_deselected_tests_never_make_files_unused(
    net_project: pytest.Pytester, args: list[str]
) -> None:
    write_test(
        net_project,
        """
    import os, pytest

    def test_net():
        assert os.environ.get("BREAK") is None
        assert_state_dict_matches(Net())

    @pytest.mark.slow
    def test_other():
        assert_state_dict_matches(Net(width=4))
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=2)
    with pytest.MonkeyPatch.context() as mp:
        if args == ["-x"]:
            mp.setenv("BREAK", "1")
        result = net_project.runpytest("--statedict-update", *args)
    assert not [line for line in result.outlines if "unused snapshots =" in line]
    assert " deleted" not in result.stdout.str()
    assert snapshot(net_project, "test_other").exists()


def test_skipped_and_failed_tests_never_make_files_unused(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    import os, pytest

    def test_net():
        if os.environ.get("SKIP"):
            pytest.skip("not today")
        assert_state_dict_matches(Net())
        assert_state_dict_matches(Net(width=3))

    def test_fails():
        assert_state_dict_matches(Net())
        assert not os.environ.get("SKIP")
        assert_state_dict_matches(Net(width=4))
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKIP", "1")
        result = net_project.runpytest("--statedict-update")
    result.assert_outcomes(skipped=1, failed=1)
    assert " deleted" not in result.stdout.str()
    assert snapshot(net_project, "test_net", "1").exists()
    assert snapshot(net_project, "test_fails", "1").exists()


def test_ini_snapshot_dir(net_project: pytest.Pytester) -> None:
    net_project.makeini("[pytest]\nstatedict_snapshot_dir = snapshots/models\n")
    write_test(net_project, "\n    def test_net():\n        assert_state_dict_matches(Net())\n")
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    assert (net_project.path / "snapshots/models/test_model/test_net/0.json").exists()
    assert not (net_project.path / "__statedict__").exists()
    net_project.runpytest().assert_outcomes(passed=1)


def test_verbose_report_shows_everything(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    import os
    import torch

    def test_net():
        n = 40 if os.environ.get("REFACTOR") else 20
        assert_state_dict_matches({f"w{i}": torch.zeros(2) for i in range(n)})
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFACTOR", "1")
        short = net_project.runpytest()
        full = net_project.runpytest("-vv")
    match_lines(short, ["*added (20):", "*... and 8 more (-vv shows all)"])
    assert "+ w39" not in short.stdout.str()
    match_lines(full, ["*added (20):", "*+ w39  tensor float32[2]"])


def test_values_exact_and_tolerant(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    import os
    import torch

    def weights():
        torch.manual_seed(0)
        model = Net()
        if os.environ.get("NUDGE"):
            with torch.no_grad():
                model.fc3.bias.add_(float(os.environ["NUDGE"]))
        return model

    def test_exact():
        assert_state_dict_matches(weights(), values=True)

    def test_tolerant():
        assert_state_dict_matches(weights(), values=True, atol=1e-3)
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NUDGE", "1e-6")
        result = net_project.runpytest()
        result.assert_outcomes(passed=1, failed=1)
        match_lines(result, ["*~ fc3.bias: values xxh3 * mean * -> xxh3 * mean *"])
        mp.setenv("NUDGE", "0.5")
        result = net_project.runpytest()
        result.assert_outcomes(failed=2)
        match_lines(
            result, ["*~ fc3.bias: values rtol=0.0, atol=0.001 -> 500x the tolerance: min *"]
        )


def test_corrupt_and_stale_snapshots(net_project: pytest.Pytester) -> None:
    write_test(net_project, "\n    def test_net():\n        assert_state_dict_matches(Net())\n")
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    path = snapshot(net_project)
    good = path.read_text()

    path.write_text(good.replace('"dtype": "float32"', '"dtype": "float33"', 1))
    result = net_project.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(result,
        ["*SnapshotError: statedict snapshot __statedict__/test_model/test_net/0.json:5: "
         "'conv1.weight': unknown dtype 'float33'. The file was left untouched*"]
    )  # fmt: skip
    assert "float33" in path.read_text()
    # the error points at the user's line, not at the plugin's internals
    assert "pytest_statedict/" not in result.stdout.str()
    match_lines(result, [">       assert_state_dict_matches(Net())"])
    # ... which --full-trace still shows, for debugging the plugin itself
    assert "pytest_statedict/schema.py" in net_project.runpytest("--full-trace").stdout.str()

    path.write_text(good[: len(good) // 2])
    result = net_project.runpytest()
    match_lines(result, ["*0.json:*: invalid JSON*"])

    path.write_text(good.replace('"version": 1', '"version": 0', 1))
    result = net_project.runpytest()
    match_lines(
        result,
        ["*written in snapshot format version 0*regenerate it with `pytest --statedict-update`*"],
    )

    result = net_project.runpytest("--statedict-update")
    result.assert_outcomes(passed=1)
    match_lines(result, ["statedict: 1 updated in __statedict__/"])
    assert path.read_text() == good


def test_outside_a_test_and_bad_objects(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    import pytest
    from pytest_statedict import StateDictError

    def test_bound_method():
        assert_state_dict_matches(Net().state_dict)

    def test_unsupported():
        assert_state_dict_matches(42)
    """,
    )
    result = net_project.runpytest()
    result.assert_outcomes(failed=2)
    match_lines(
        result,
        [
            "*got the bound method Net.state_dict, not a state_dict: call it, `net.state_dict()`*",
            "*cannot take the schema of a builtins.int*",
        ],
    )


def test_schema_equality_assertion_uses_the_diff(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    from pytest_statedict import schema_of

    def test_eq():
        assert schema_of(Net()) == schema_of(Net(hidden=100))
    """,
    )
    result = net_project.runpytest()
    match_lines(
        result,
        [
            "*schemas differ (left: expected, right: actual)",
            "*~ fc1.weight: shape [120, 400] -> [100, 400]",
        ],
    )


def test_no_statedict_line_when_unused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a():\n    pass\n")
    result = pytester.runpytest()
    assert "statedict:" not in result.stdout.str()
    assert result.ret == pytest.ExitCode.OK


def test_snapshot_file_is_valid_json_and_stable(net_project: pytest.Pytester) -> None:
    write_test(
        net_project,
        """
    def test_net():
        model = Net()
        assert_state_dict_matches(model, optimizer=make_optimizer(model))
    """,
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    first = snapshot(net_project).read_text()
    data = json.loads(first)
    assert data["totals"]["parameters"] == sum(
        (t["shape"] and __import__("math").prod(t["shape"])) or 1
        for t in data["tensors"]
        if t["kind"] == "parameter"
    )
    assert [g["params"][:1] for g in data["optimizer"]["param_groups"]] == [
        ["conv1.weight"],
        ["conv1.bias"],
    ]
    snapshot(net_project).unlink()
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    assert snapshot(net_project).read_text() == first


def test_update_refreshes_a_snapshot_whose_text_is_outdated(net_project: pytest.Pytester) -> None:
    write_test(net_project, "\n    def test_net():\n        assert_state_dict_matches(Net())\n")
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    path = snapshot(net_project)
    current = path.read_text()
    older = current.replace('"elements": 62031, ', "")  # as an older writer left it
    path.write_text(older)
    result = net_project.runpytest()
    match_lines(result, ["statedict: 1 passed"])
    assert path.read_text() == older, "nothing is written without --statedict-update"
    result = net_project.runpytest("--statedict-update")
    match_lines(result, ["statedict: 1 updated in __statedict__/"])
    assert path.read_text() == current


def test_ignored_keys_stay_out_of_the_snapshot_optimizer_included(
    net_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fc3 head is ignored: its shape, and where its optimizer places it, may change."""
    write_test(
        net_project,
        """
    import os

    def test_net():
        model = Net()
        if os.environ.get("HEAD_DECAY"):  # move fc3.weight to the other param group
            optimizer = torch.optim.AdamW([
                {"params": [p for n, p in model.named_parameters() if n.endswith("weight")
                            and not n.startswith("fc3")], "weight_decay": 0.01},
                {"params": [p for n, p in model.named_parameters() if not n.endswith("weight")
                            or n.startswith("fc3")], "weight_decay": 0.0},
            ], lr=1e-3)
        else:
            optimizer = make_optimizer(model)
        assert_state_dict_matches(model, optimizer=optimizer, ignore=["fc3.*"])
    """.replace("import os", "import os\n    import torch"),
    )
    net_project.runpytest("--statedict-update").assert_outcomes(passed=1)
    text = snapshot(net_project).read_text()
    assert "fc3" not in text, "neither the tensors nor the optimizer groups name an ignored key"
    monkeypatch.setenv("HEAD_DECAY", "1")
    result = net_project.runpytest()
    result.assert_outcomes(passed=1)
    match_lines(result, ["statedict: 1 passed"])
    assert snapshot(net_project).read_text() == text


def test_snapshots_of_a_deleted_test_file_are_unused_when_its_folder_ran_whole(
    net_project: pytest.Pytester,
) -> None:
    body = "\n    def test_net():\n        assert_state_dict_matches(Net())\n"
    write_test(net_project, body, name="test_model")
    write_test(net_project, body, name="test_gone")
    net_project.runpytest("--statedict-update").assert_outcomes(passed=2)
    orphan = net_project.path / "__statedict__" / "test_gone" / "test_net" / "0.json"
    assert orphan.exists()
    (net_project.path / "test_gone.py").unlink()

    result = net_project.runpytest("test_model.py")  # one file named: its folder did not run
    assert result.ret == pytest.ExitCode.OK
    result = net_project.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    match_lines(
        result,
        [
            "*unused snapshots*",
            "*__statedict__/test_gone/test_net/0.json",
            "statedict: 1 passed, 1 unused",
        ],
    )
    result = net_project.runpytest("--statedict-update")
    assert result.ret == pytest.ExitCode.OK
    match_lines(result, ["statedict: 1 passed, 1 deleted"])
    assert not orphan.parent.parent.exists()
    assert snapshot(net_project).exists(), "the live module's snapshot stays"
