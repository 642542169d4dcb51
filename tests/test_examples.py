"""The example project and the demo, run as a user would: pytest in a subprocess.

The demo works on a copy in a temporary folder, so the committed example is never touched.
Its steps check the example too: the snapshots it writes are byte for byte the committed
ones, and a plain run on them passes and writes nothing. Its subprocesses load this plugin
only (no other installed pytest plugins: they cost seconds per run and are not what the
example is about).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_statedict import Schema
from pytest_statedict.layout import IMPLEMENTATION_FLAGS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "cnn"
SNAPSHOTS = Path("tests") / "__statedict__"

pytestmark = pytest.mark.skipif(
    not (EXAMPLE / "pytest.ini").exists(), reason="the examples are not in this checkout"
)


def isolated_env() -> dict[str, str]:
    """The environment for a user's pytest run: this plugin, and none of ours leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["PYTEST_PLUGINS"] = "pytest_statedict.plugin"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def snapshot_texts(project: Path) -> dict[str, str]:
    return {
        p.relative_to(project).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted((project / SNAPSHOTS).rglob("*.json"))
    }


def test_the_release_snapshot_is_in_the_current_format() -> None:
    """As `statedict record --model` writes it today: the optimizer's implementation flags
    apart from its hyperparameters (an older file holds them among the hyperparameters, and
    `statedict history` listed their every difference), its state named by parameter."""
    releases = sorted((EXAMPLE / "releases").glob("*.json"))
    assert releases
    for path in releases:
        text = path.read_text(encoding="utf-8")
        schema = Schema.from_json(text, path)
        assert schema.to_json() == text, path
        assert schema.optimizer is not None, path
        for group in schema.optimizer.param_groups:
            assert not IMPLEMENTATION_FLAGS & set(group.hyperparams), (path, group)
            assert group.flags, (path, group)
            assert all(isinstance(name, str) for name in group.params), (path, group)


def test_demo_runs_end_to_end() -> None:
    committed = snapshot_texts(EXAMPLE)
    assert len(committed) == 6, sorted(committed)
    model = (EXAMPLE / "cnn_model.py").read_text(encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")],
        env=isolated_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=False,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    headings = re.findall(r"^── (\d+)\. (.+?) ─", output, re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 11)), output
    for expected in (
        "pytest with no snapshots yet",
        "pytest --statedict-update: write the snapshots",
        "statedict show",
        "the model matches its snapshots",
        "A refactor",
        "pytest --statedict-update: accept the new layout",
        "Keep v1 checkpoints loading",
        "The gate checks the optimizer too",
        "Cut release cnn-v2",
        "A deliberate break",
    ):
        assert any(expected in title for _, title in headings), (expected, headings)
    assert output.count("✔ as expected") == 10, output
    assert "fc3.weight -> head.weight" in output
    assert re.search(r"^  statedict: 6 written in tests/__statedict__/;", output, re.M), output
    assert output.rstrip().endswith("demo complete: every step behaved as expected"), output
    # the demo worked on its own copy
    assert snapshot_texts(EXAMPLE) == committed
    assert (EXAMPLE / "cnn_model.py").read_text(encoding="utf-8") == model
