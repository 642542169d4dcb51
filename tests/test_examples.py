"""The example project and the demo, run as a user would: pytest in a subprocess.

Each test works on a copy in tmp_path, so the committed example is never touched. The
subprocesses load this plugin only (no other installed pytest plugins: they cost seconds
per run and are not what the example is about), which keeps the file to a few pytest runs
of a small CNN.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def copy_example(folder: Path) -> Path:
    project = folder / "cnn"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", ".*_cache"))
    return project


def snapshot_texts(project: Path) -> dict[str, str]:
    return {
        p.relative_to(project).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted((project / SNAPSHOTS).rglob("*.json"))
    }


def start_pytest(project: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args],
        cwd=project,
        env=isolated_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def test_example_passes_with_its_committed_snapshots(tmp_path: Path) -> None:
    project = copy_example(tmp_path / "committed")
    committed = snapshot_texts(project)
    assert len(committed) == 6, sorted(committed)
    # alongside, from scratch: what `pytest --statedict-update` writes today
    fresh = copy_example(tmp_path / "fresh")
    shutil.rmtree(fresh / SNAPSHOTS)
    runs = [start_pytest(project), start_pytest(fresh, "--statedict-update")]
    (code, output), (fresh_code, fresh_output) = (finish(p) for p in runs)

    assert code == 0, output
    assert re.search(r"^statedict: 6 passed; round-trips: [1-9]\d* passed", output, re.M), output
    # the round-trip pairs with an absent accelerator are skipped, naming the device
    for line in re.findall(r"^SKIPPED .*$", output, re.M):
        assert "is not available on this machine" in line, output
    # nothing written, updated or deleted
    assert snapshot_texts(project) == committed
    # the committed files are byte for byte what the plugin writes now (regenerate them
    # with `pytest --statedict-update` in examples/cnn after deleting tests/__statedict__)
    assert fresh_code == 0, fresh_output
    assert snapshot_texts(fresh) == committed


def test_demo_runs_end_to_end() -> None:
    committed = snapshot_texts(EXAMPLE)
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
    assert [int(n) for n, _ in headings] == list(range(1, 10)), output
    for expected in (
        "pytest with no snapshots yet",
        "pytest --statedict-update: write the snapshots",
        "statedict show",
        "the model matches its snapshots",
        "A refactor",
        "pytest --statedict-update: accept the new layout",
        "Keep v1 checkpoints loading",
        "Cut release cnn-v2",
        "A deliberate break",
    ):
        assert any(expected in title for _, title in headings), (expected, headings)
    assert output.count("✔ as expected") == 9, output
    assert "fc3.weight -> head.weight" in output
    assert output.rstrip().endswith("demo complete: every step behaved as expected"), output
    # the demo worked on its own copy
    assert snapshot_texts(EXAMPLE) == committed
    assert (EXAMPLE / "cnn_model.py").read_text(encoding="utf-8") == model
