"""The framework rows: the checkpoints users really have, through every surface of the plugin.

One row per (framework, operation), parametrized as ``framework_row`` so that conftest.py
prints the table (``--frameworks-table=PATH`` writes it as Markdown, with what each
framework's own resume did). Each framework (``frameworks.py``) trains a tiny model for a
few steps on the CPU and writes its real artifact, once per worker; its rows then go
through ``statedict show`` (the command, in a fresh process), ``statedict record``,
``assert_checkpoint_loads`` and the release gate (``statedict_releases``' ReleaseGate, fed
the release that ``statedict record`` wrote):

- ``show``: exit 0, the framework named, every part mentioned, the model's keys and no
  other (the optimizer's state is no model key), the optimizer recognised;
- ``record``: a release with the model's keys, and the optimizer where the artifact has one;
- ``gate``: today's unchanged model passes the gate and the release gate (the framework
  resumes it: checked first, else the row is wrong);
- ``optimizer``: the same with today's optimizer (``optimizer=``): the optimizer verdict;
- ``rename``, ``regroup``: a submodule renamed; the optimizer's 2 param groups split in 3.
  The framework's own resume is the oracle: where it raises, or resumes with fresh weights
  in silence, the gate and the release gate must fail with a verdict (a
  ``StateDictMismatch``), never pass; where it resumes, they must pass.

The plugin never says "loads" where the framework raises: that is every row's assertion.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from frameworks import FRAMEWORKS, OPERATIONS, Artifact, Framework, Outcome

from pytest_statedict import CheckpointError, StateDictMismatch, assert_checkpoint_loads, schema_of
from pytest_statedict.cli import main as statedict_main
from pytest_statedict.readers.snapshot_file import read_snapshot
from pytest_statedict.releases import Release, ReleaseGate
from pytest_statedict.schema import Schema

RELEASE = "v1"
HERE = Path(__file__).parent


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "framework_row" in metafunc.fixturenames:
        metafunc.parametrize(
            "framework_row",
            [pytest.param((f, op), id=f"{f}-{op}") for f in FRAMEWORKS for op in OPERATIONS],
        )


# ---------------------------------------------------------------------- the subject


@dataclass
class Subject:
    """One framework's artifact, written once per worker, its release and its oracle."""

    framework: Framework
    artifact: Artifact
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    _release: Path | None = None

    def outcome(self, variant: str) -> Outcome:
        """What the framework's own resume does with today's ``variant`` (once)."""
        if variant not in self.outcomes:
            self.outcomes[variant] = self.framework.outcome(self.artifact, variant)
        return self.outcomes[variant]

    @property
    def path(self) -> Path:
        return self.artifact.path

    @property
    def release(self) -> Path:
        """The release that ``statedict record`` writes of the artifact (once). Run in this
        process, through the command's own ``main``: a subprocess would import torch again
        (``show`` runs as one: it reads without torch)."""
        if self._release is None:
            folder = self.artifact.work / "releases"
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                args = ["record", str(self.path), "--release", RELEASE, "--dir", str(folder)]
                code = statedict_main([*args, *self.framework.cli_flags])
            if code != 0:
                pytest.fail(f"statedict record exits {code}: {out.getvalue().strip()}")
            self._release = folder / f"{RELEASE}.json"
        return self._release


SUBJECTS: dict[str, Subject] = {}


@pytest.fixture
def subject(framework_row: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Subject:
    return subject_of(framework_row[0], tmp_path_factory)


def subject_of(name: str, tmp_path_factory: pytest.TempPathFactory) -> Subject:
    """The framework's subject, its artifact written on first use."""
    framework = FRAMEWORKS[name]
    pytest.importorskip(
        framework.library,
        reason=f"{framework.library} is not installed (the conformance env `models` has it)",
    )
    if name not in SUBJECTS:
        folder = tmp_path_factory.mktemp(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(folder)  # what a framework writes beside its artifact (logs) goes there
            SUBJECTS[name] = Subject(framework, framework.write(folder))
    return SUBJECTS[name]


# Runs each command line through the command's ``main`` in turn, each with its own output
# and exit code: one process, one interpreter start and one import of what the file needs
# (torchao's import alone is 6 s of CPU), however many commands a row runs.
COMMANDS = """
import contextlib, io, json, sys
from pytest_statedict.cli import main
runs = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit:
            code = exit.code
    runs.append([code, out.getvalue(), err.getvalue()])
sys.stdout.write(json.dumps(runs))
"""


def statedict(*commands: list[str], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """The ``statedict`` command lines as a user runs them, in one fresh process (this
    folder importable: the whole pickled model's class is ``frameworks.Net``)."""
    paths = [str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    done = subprocess.run(
        [sys.executable, "-c", COMMANDS, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [
        subprocess.CompletedProcess(["statedict", *args], code, out, err)
        for args, (code, out, err) in zip(commands, json.loads(done.stdout), strict=True)
    ]


def test_framework(
    framework_row: tuple[str, str], subject: Subject, record_property: Callable[[str, Any], None]
) -> None:
    try:
        OPS[framework_row[1]](subject)
    finally:
        for variant, outcome in subject.outcomes.items():
            record_property(f"framework_outcome:{variant}", str(outcome))


# ---------------------------------------------------------------------- the verdicts


GATE_UNPICKLES = "weights_only" in inspect.signature(assert_checkpoint_loads).parameters


def refused_by_gate(s: Subject) -> bool:
    """Whether the gate must refuse the artifact: only a full unpickling reads it (the
    command's opt-in), and the gate takes no ``weights_only=False``."""
    return bool(s.framework.cli_flags) and not GATE_UNPICKLES


def gate(s: Subject, variant: str, *, with_optimizer: bool) -> None:
    """``assert_checkpoint_loads`` on the artifact, with today's optimizer if asked."""
    optimizer = s.framework.optimizer(variant) if with_optimizer and s.framework.optimizer else None
    model = s.framework.model(variant)
    if not refused_by_gate(s):
        unpickle = {"weights_only": False} if s.framework.cli_flags else {}
        assert_checkpoint_loads(model, s.path, optimizer=optimizer, **unpickle)
        return
    with pytest.raises(CheckpointError, match="arbitrary code") as refused:
        assert_checkpoint_loads(model, s.path, optimizer=optimizer)
    message = str(refused.value)
    assert s.path.name in message, message
    # a hint names only what the gate takes
    if "weights_only=False" in message.split("the error from torch.load")[0]:
        pytest.fail(
            "the gate's refusal says to pass weights_only=False, which "
            f"assert_checkpoint_loads does not take: {message[:240]}"
        )


def release_gate(s: Subject, variant: str, *, with_optimizer: bool) -> None:
    """The release gate (what ``statedict_releases`` runs) on the recorded release."""
    optimizer = s.framework.optimizer(variant) if with_optimizer and s.framework.optimizer else None
    checker = ReleaseGate(
        lambda: s.framework.model(variant),
        optimizer=optimizer,
        directory=str(s.release.parent),
    )
    checker.check(Release(RELEASE, s.release))


def judged(s: Subject, variant: str, *, with_optimizer: bool, names: str = "") -> None:
    """Both gates against the framework's own resume of ``variant``: where it resumes they
    pass; where it raises, or resumes silently with fresh weights, both fail with a verdict
    that ``names`` what changed (a regex: an incidental failure is no verdict)."""
    outcome = s.outcome(variant)
    checks = {"assert_checkpoint_loads": gate, "the release gate": release_gate}
    for surface, check in checks.items():
        if outcome.loads:
            check(s, variant, with_optimizer=with_optimizer)
            continue
        if check is gate and refused_by_gate(s):
            check(s, variant, with_optimizer=with_optimizer)  # a refusal, by name
            continue
        try:
            check(s, variant, with_optimizer=with_optimizer)
        except StateDictMismatch as exc:
            assert re.search(names, str(exc)), f"{surface} fails, but not on {names!r}: {exc}"
            continue
        pytest.fail(f"{surface} passed, but {s.framework.name} {outcome} ({variant})")


def requires_optimizer(s: Subject) -> None:
    if s.framework.optimizer is None:
        pytest.skip(f"the {s.framework.name} artifact holds no optimizer")


# ---------------------------------------------------------------------- operations


def op_show(s: Subject) -> None:
    """``statedict show``: the framework named, its parts listed, the model's keys only."""
    flags = s.framework.cli_flags
    path = str(s.path)
    refusal = [["show", path]] if flags else []
    *refused, shown, as_json = statedict(
        *refusal, ["show", path, *flags], ["show", "--json", path, *flags], cwd=s.artifact.work
    )
    for run in refused:
        assert run.returncode == 2, f"show without {flags[0]}: exit {run.returncode}"
        assert flags[0] in run.stderr, f"the refusal names no {flags[0]}: {run.stderr}"
    assert shown.returncode == 0, shown.stderr
    if flags:
        assert "warning" in shown.stderr.lower(), f"{flags[0]} warns of nothing: {shown.stderr}"
    text = shown.stdout
    if s.framework.framework_words:
        lines = [x for x in text.splitlines() if x.startswith("framework: ")]
        words = s.framework.framework_words
        assert lines and words in lines[0], f"no 'framework: ...{words}...' line:\n{text}"
    missing = [
        part for part in s.framework.parts if not any(p in text.lower() for p in part.split("|"))
    ]
    assert not missing, f"statedict show does not mention {missing}:\n{text}"
    assert as_json.returncode == 0, as_json.stderr
    schema = Schema.from_json(as_json.stdout)
    expect_keys(s, schema, "statedict show")
    expect_optimizer(s, schema, "statedict show")


def expect_keys(s: Subject, schema: Schema, surface: str) -> None:
    """The model's keys, as the framework wrote them, and no other key."""
    keys = [t.key for t in schema.tensors]
    extra = sorted(set(keys) - set(s.artifact.keys))
    missing = sorted(set(s.artifact.keys) - set(keys))
    if extra or missing:
        pytest.fail(
            f"{surface}: {len(extra)} keys that are not the model's ({', '.join(extra[:4])}), "
            f"{len(missing)} of its keys missing ({', '.join(missing[:4])})"
        )


def expect_optimizer(s: Subject, schema: Schema, surface: str) -> None:
    """The artifact's optimizer recognised as one (2 groups, a state per parameter), or none."""
    if s.framework.optimizer is None:
        if schema.optimizer is not None:
            pytest.fail(f"{surface}: an optimizer in {s.path.name}, which holds none")
        return
    if schema.optimizer is None:
        pytest.fail(f"{surface}: the optimizer state in {s.path.name} is not recognised")
    groups, states = len(schema.optimizer.param_groups), len(schema.optimizer.state)
    parameters = sum(p.requires_grad for p in s.framework.model("unchanged").parameters())
    if (groups, states) != (2, parameters):
        pytest.fail(
            f"{surface}: {groups} param groups with state for {states} parameters, not 2 "
            f"groups and {parameters} parameters"
        )


def op_record(s: Subject) -> None:
    """``statedict record``: a release of the model's keys, with its optimizer."""
    schema = read_snapshot(s.release)
    expect_keys(s, schema, "statedict record")
    expect_optimizer(s, schema, "statedict record")


def op_gate(s: Subject) -> None:
    """Today's unchanged model: the framework resumes it, so both gates pass."""
    outcome = s.outcome("unchanged")
    assert outcome.loads, f"{s.framework.name} does not resume its own artifact: {outcome}"
    judged(s, "unchanged", with_optimizer=False)


def op_optimizer(s: Subject) -> None:
    """The optimizer verdict: the artifact's optimizer is read as one, and today's unchanged
    optimizer passes both gates with ``optimizer=``."""
    requires_optimizer(s)
    expect_optimizer(s, schema_of(s.path), "schema_of")
    assert s.outcome("unchanged").loads, s.outcome("unchanged")
    judged(s, "unchanged", with_optimizer=True)


def op_rename(s: Subject) -> None:
    """A submodule renamed: the verdict follows the framework's resume, naming the module."""
    judged(s, "renamed", with_optimizer=True, names=re.escape(s.framework.renamed))


def op_regroup(s: Subject) -> None:
    """2 param groups split in 3: the optimizer verdict follows the framework's resume."""
    requires_optimizer(s)
    judged(s, "regrouped", with_optimizer=True, names="param_groups")


OPS: dict[str, Callable[[Subject], None]] = {
    "show": op_show,
    "record": op_record,
    "gate": op_gate,
    "optimizer": op_optimizer,
    "rename": op_rename,
    "regroup": op_regroup,
}


def test_statedict_releases_as_a_user_runs_it(
    pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The release gate in a user's test module: the release ``statedict record`` wrote of
    the DCP checkpoint (model and optimizer), ``statedict_releases`` with today's optimizer:
    it passes as trained, and the regrouped optimizer fails that release by name."""
    s = subject_of("dcp", tmp_path_factory)
    pytester.makeini(f"[pytest]\nstatedict_releases_dir = {s.release.parent}\n")
    pytester.makepyfile(
        test_releases="""
        from frameworks import adamw, net
        from pytest_statedict import statedict_releases

        test_as_trained = statedict_releases(lambda: net("unchanged"), optimizer=adamw("unchanged"))
        test_regrouped = statedict_releases(lambda: net("unchanged"), optimizer=adamw("regrouped"))
        """
    )
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_regrouped?v1?*", "*param_groups*"])
