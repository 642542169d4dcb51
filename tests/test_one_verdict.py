"""One checkpoint, one verdict: every surface gives the same answer for the same pair.

Each row of ``verdict_pairs.ROWS`` is a refactor (rename, widen, freeze, regroup, reorder,
dtype, a load hook that converts or refuses, missing module versions, ...) with one old
artifact. The pair goes through the six places that judge it: the snapshot check (a
snapshot recorded from the old file), ``assert_state_dict_matches`` against the file, the
refactor gate with ``optimizer=``, the release gate (a release recorded from the file),
``statedict diff OLD NEW --model`` and the run report. Where a surface reports, its verdict
lines must be the same, say what torch does (the oracle: a strict load, the optimizer's
load and one more step), and a surface may only pass where the checkpoint loads and its
optimizer state resumes.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import verdict_pairs as pairs
from torch import nn

from pytest_statedict import (
    StateDictMismatch,
    StateDictWarning,
    assert_checkpoint_loads,
    assert_state_dict_matches,
)
from pytest_statedict.cli import main as statedict_main
from pytest_statedict.releases import record_into

safetensors_torch = pytest.importorskip("safetensors.torch")

MODEL_LINE = re.compile(r"an old checkpoint still loads with .*")
OPTIMIZER_LINE = re.compile(r"an old optimizer state still loads with .*")

# What each row's verdict must say: (the model state loads, the optimizer state's fate):
# "exact" every state on its own parameter, "raises" optimizer.load_state_dict raises,
# "inexact" it loads but would not resume exactly, "position" checked by position only,
# None no optimizer state in the artifact.
EXPECTED: dict[str, tuple[bool, str | None]] = {
    "unchanged": (True, "exact"),
    "rename": (False, "exact"),
    "widen": (False, "inexact"),
    "kernel": (False, "inexact"),
    "freeze": (True, "raises"),
    "regroup": (True, "raises"),
    "reorder_groups": (True, "raises"),
    "reorder_modules": (True, "inexact"),
    "dtype": (True, "exact"),
    "hyperparameters": (True, "exact"),
    "added_buffer": (False, "exact"),
    "removed_layer": (False, "raises"),
    "wrapper_prefix": (False, "exact"),
    "new_tie": (False, "raises"),
    "hook_conversion": (True, "exact"),
    "hook_refusal": (False, "exact"),
    "missing_versions": (False, None),
    "batchnorm_count": (True, "exact"),
    "positional_unchanged": (True, "position"),
    "positional_widen": (False, "inexact"),
    "positional_reorder": (True, "position"),
}


def test_the_table_covers_every_row() -> None:
    assert set(EXPECTED) == set(pairs.ROWS)
    assert len(EXPECTED) >= 20


def _save(row: str, version: str, folder: Path) -> Path:
    """The row's artifact of ``version``, as a user's training loop would have saved it."""
    spec = pairs.ROWS[row]
    model, optimizer = pairs.build(row, version)
    if spec.fmt == "safetensors":
        path = folder / f"{version}.safetensors"
        safetensors_torch.save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(path)
        )
        return path
    state = model.state_dict()
    if version == "v1" and spec.strip:
        # what an older torch saved: no such key, and the module at its older version
        metadata = state._metadata  # type: ignore[attr-defined]
        state = OrderedDict((k, v) for k, v in state.items() if k not in spec.strip)
        state._metadata = metadata  # type: ignore[attr-defined]
        for key in spec.strip:
            metadata[key.rpartition(".")[0]]["version"] = 1
    path = folder / f"{version}.pt"
    torch.save(
        {"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3},
        path,
    )
    return path


TABLE_TESTS = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import pytest
    import verdict_pairs as P

    from pytest_statedict import assert_state_dict_matches, statedict_releases

    ROWS = sorted(P.ROWS)


    @pytest.mark.parametrize("row", ROWS)
    def test_snapshot(row):
        spec = P.ROWS[row]
        if os.environ["TABLE_PHASE"] == "record":
            assert_state_dict_matches(str(Path("artifacts", row, f"v1.{spec.fmt}")))
            return
        model, optimizer = P.build(row, "v2")
        assert_state_dict_matches(model, optimizer=optimizer if spec.fmt == "pt" else None)


    for row in ROWS:
        globals()[f"test_release_{row}"] = statedict_releases(
            lambda row=row: P.build(row, "v2")[0],
            optimizer=P.today_optimizer(row) if P.ROWS[row].fmt == "pt" else None,
            directory=f"releases/{row}",
        )
    """
)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The old and new artifacts of every row, and what the pytest surfaces said of them:
    one run records the snapshots from the old files, one checks today's models (both in
    this process: ``verdict_pairs`` is importable here, and their output is not judged)."""
    project = tmp_path_factory.mktemp("table")
    (project / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (project / "test_table.py").write_text(TABLE_TESTS, encoding="utf-8")
    files: dict[str, tuple[Path, Path]] = {}
    for row in pairs.ROWS:
        folder = project / "artifacts" / row
        folder.mkdir(parents=True)
        files[row] = (_save(row, "v1", folder), _save(row, "v2", folder))
        releases = project / "releases" / row
        record_into(releases, "v1", files[row][0], base=project, part=None)
    with pytest.MonkeyPatch.context() as inner:
        inner.chdir(project)
        inner.setattr(sys, "path", list(sys.path))
        for phase, args, outcome in (
            ("record", ["--statedict-update", "-k", "test_snapshot"], pytest.ExitCode.OK),
            (
                "check",
                ["--statedict-report=report.json", "-W", "error::UserWarning"],
                pytest.ExitCode.TESTS_FAILED,  # the rows that do not load
            ),
        ):
            inner.setenv("TABLE_PHASE", phase)
            inner.delitem(sys.modules, "test_table", raising=False)  # imported afresh
            code = pytest.main(["-p", "no:randomly", "-p", "no:cacheprovider", "-q", *args])
            assert code == outcome, phase
    sys.modules.pop("test_table", None)
    report = json.loads((project / "report.json").read_text(encoding="utf-8"))
    return {"files": files, "checks": report["checks"]}


def _lines(text: str) -> tuple[str | None, str | None]:
    model = MODEL_LINE.search(text)
    optimizer = OPTIMIZER_LINE.search(text)
    return (model.group(0) if model else None, optimizer.group(0) if optimizer else None)


def _raised(check: Any) -> tuple[str | None, str | None] | None:
    """The verdict lines of a failed check, or None when it passed."""
    try:
        check()
    except StateDictMismatch as exc:
        return _lines(str(exc))
    return None


def _record(checks: list[dict[str, Any]], kind: str, row: str) -> dict[str, Any]:
    test = f"::test_snapshot[{row}]" if kind == "snapshot" else f"::test_release_{row}[v1]"
    found = [c for c in checks if c["kind"] == kind and c["test"].endswith(test)]
    assert len(found) == 1, (kind, row, [c["test"] for c in checks])
    return found[0]


_TIE_REASON = re.compile(
    r"it loads, but [\w.]+ overwrites the trained [\w.]+: one tied parameter now"
    r"|[\w.]+ would overwrite [\w.]+ \(separate tensors in the checkpoint, one tied parameter now\)"
    r", and their values could not be compared \(read without tensor data: a snapshot with "
    r"values=True can tell\)"
)


def _drops_a_tensor(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether two different checkpoint tensors were loaded into one tied parameter (torch
    loads both, and the last one wins: a trained tensor is lost)."""
    keys_of: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        keys_of.setdefault(id(value), []).append(key)
    for keys in keys_of.values():
        saved = [state[k] for k in keys if k in state]
        if any(not torch.equal(saved[0], other) for other in saved[1:]):
            return True
    return False


def _oracle(row: str, old: Path) -> tuple[bool, str | None]:
    """What torch does: a strict load of the old state, then the old optimizer state loaded
    and one more step taken (``raises``, ``fails`` on the step, or ``steps``)."""
    model, optimizer = pairs.build(row, "v2")
    if old.suffix == ".safetensors":
        state, saved_optimizer = safetensors_torch.load_file(str(old)), None
    else:
        checkpoint = torch.load(old, weights_only=True)
        state, saved_optimizer = checkpoint["model_state_dict"], checkpoint["optimizer_state_dict"]
    try:
        model.load_state_dict(state, strict=True)
        loads = not _drops_a_tensor(model, state)
    except (RuntimeError, ValueError):
        loads = False
    if saved_optimizer is None:
        return loads, None
    model, optimizer = pairs.build(row, "v2")
    try:
        optimizer.load_state_dict(saved_optimizer)
    except ValueError:
        return loads, "raises"
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    try:
        optimizer.step()
    except RuntimeError:
        return loads, "fails"
    return loads, "steps"


def _says(lines: tuple[str | None, str | None]) -> tuple[bool | None, str | None]:
    model, optimizer = lines
    loads = None if model is None else ": yes" in model
    fate = None
    if optimizer is not None:
        if ": NO, it raises" in optimizer:
            fate = "raises"
        elif "would not resume exactly" in optimizer:
            fate = "inexact"
        elif "by position" in optimizer:
            fate = "position"
        elif "every state on its own parameter" in optimizer:
            fate = "exact"
    return loads, fate


@pytest.mark.parametrize("row", sorted(pairs.ROWS))
def test_one_verdict_everywhere(
    row: str, table: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = table["files"][row]
    spec = pairs.ROWS[row]
    with_optimizer = spec.fmt == "pt"
    loads, fate = EXPECTED[row]

    # the torch oracle agrees with what the table expects of the row
    truth_loads, truth_optimizer = _oracle(row, old)
    assert truth_loads == loads
    if fate == "raises":
        assert truth_optimizer == "raises"
    elif truth_optimizer in ("raises", "fails"):
        assert fate == "inexact", truth_optimizer

    surfaces: dict[str, tuple[str | None, str | None] | None] = {}
    model, optimizer = pairs.build(row, "v2")
    today = optimizer if with_optimizer else None
    surfaces["comparison"] = _raised(
        lambda: assert_state_dict_matches(model, str(old), optimizer=today)
    )
    gate_optimizer = pairs.today_optimizer(row) if with_optimizer else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        surfaces["gate"] = _raised(
            lambda: assert_checkpoint_loads(model, old, optimizer=gate_optimizer)
        )
    warned = [str(w.message) for w in caught if issubclass(w.category, StateDictWarning)]
    code = statedict_main(["diff", str(old), str(new), "--model", f"verdict_pairs:v2_{row}"])
    out = capsys.readouterr().out
    surfaces["diff"] = _lines(out) if code == 1 else None
    assert code in (0, 1), out
    snapshot = _record(table["checks"], "snapshot", row)
    surfaces["snapshot"] = _lines(snapshot["message"]) if snapshot["outcome"] == "failed" else None
    release = _record(table["checks"], "release", row)
    surfaces["release"] = _lines(release["message"]) if release["outcome"] == "failed" else None
    if snapshot["outcome"] == "failed":
        diff = snapshot["diff"]
        verdict = diff["optimizer_verdict"]
        surfaces["run report"] = (diff["load_verdict"], verdict and verdict["text"])

    reported = {name: lines for name, lines in surfaces.items() if lines is not None}
    good = loads and fate in ("exact", "position", None)
    if not good:
        # every surface fails a checkpoint that does not load or resume
        assert set(surfaces) - set(reported) <= {"run report"}, surfaces
    # a tie's values decide where a surface has them (the file), and where it has not (a
    # snapshot without values) the NO says it could not compare them: the same verdict
    model_lines = {
        _TIE_REASON.sub("<two tensors on one tied parameter>", lines[0])
        for lines in reported.values()
        if lines[0] is not None
    }
    optimizer_lines = {lines[1] for lines in reported.values() if lines[1] is not None}
    assert len(model_lines) <= 1, reported
    assert len(optimizer_lines) <= 1, reported
    for name, lines in reported.items():
        said_loads, said_fate = _says(lines)
        if said_loads is not None:
            assert said_loads == loads, (name, lines)
        if lines[1] is not None:
            assert said_fate == fate, (name, lines)
    if fate == "position":
        # a gate that could check positions only passes, and says so
        assert surfaces["gate"] is None
        assert warned and "by position" in warned[0], caught
