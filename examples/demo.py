"""pytest-statedict in a few minutes: the snapshot workflow on a small CNN project.

Run it from anywhere, in an environment where pytest-statedict is installed:

    python examples/demo.py          # add --keep to keep the working copy afterwards

It copies examples/cnn to a temporary folder (the committed example is never touched),
deletes the copy's snapshots, and runs pytest there step by step: the missing snapshots,
writing them (byte for byte the committed ones), a refactor caught with its diff,
accepting it, the release gate that ``--statedict-update`` does not waive, the gate
judging the optimizer state too, cutting a release with ``statedict record`` and
``statedict history``, and a deliberate break recorded as expected to fail. Each step
checks its exit code and output, and the demo exits non-zero if one doesn't behave as
expected, so it doubles as an end-to-end test of the example.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent / "cnn"
PYTEST_FLAGS = ["-q", "--tb=short", "-p", "no:cacheprovider"]
WIDTH = 88

MAIN_SNAPSHOT = "tests/__statedict__/test_cnn/test_model_and_optimizer_layout/0.json"
GATE_TEST = "tests/test_cnn.py::test_releases[cnn-v1]"
GATE_NAME = GATE_TEST.split("::")[1]
RETIRED = "cnn-v1: fc3 renamed to head in cnn-v2, v1 checkpoints retired"

# Step 9 saves the release checkpoint as a training script would, after a training step
# (so the optimizer holds its state), and records it with the model and optimizer that name
# that state's parameters.
SAVE_V2 = (
    "import torch; from cnn_model import model_and_optimizer, train_step; "
    "model, optimizer = model_and_optimizer(); train_step(model, optimizer); "
    "torch.save({'model_state_dict': model.state_dict(), "
    "'optimizer_state_dict': optimizer.state_dict(), 'epoch': 1}, 'cnn-v2.pt')"
)
RECORD_V2 = (
    "record",
    "cnn-v2.pt",
    "--release",
    "cnn-v2",
    "--model",
    "cnn_model:model_and_optimizer",
)

# The refactor of step 5: the classifier `fc3` becomes `head`, conv1 gets 8 channels.
REFACTOR = [
    ("self.fc3 = nn.Linear(84, num_classes)", "self.head = nn.Linear(84, num_classes)"),
    ("return self.fc3(x)", "return self.head(x)"),
    ("width: int = 6,", "width: int = 8,"),
]

# The change of step 8: the norm weights get weight decay too (then reverted).
DECAY_NORMS = [
    (
        '        is_norm = isinstance(model.get_submodule(name.rpartition(".")[0]), '
        "nn.BatchNorm2d)\n",
        "",
    ),
    ('name.endswith("bias") or is_norm else', 'name.endswith("bias") else'),
]

# The fix of step 7: checkpoints saved before the rename still load, into `head`.
COMPAT_HOOK = """
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # v1 checkpoints call the classifier `fc3`: load those weights into `head`
        for key in [k for k in state_dict if k.startswith(prefix + "fc3.")]:
            state_dict[prefix + "head." + key[len(prefix) + 4 :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
"""


class DemoFailure(Exception):
    """A step did not behave as the demo expects."""


@dataclass
class Run:
    returncode: int
    output: str


class Demo:
    def __init__(self, project: Path) -> None:
        self.project = project
        self.step = 0

    # ---- showing things ------------------------------------------------------------------

    def heading(self, title: str) -> None:
        self.step += 1
        text = f"── {self.step}. {title} "
        print(f"\n{text}{'─' * max(3, WIDTH - len(text))}", flush=True)

    def say(self, text: str) -> None:
        print(textwrap.fill(textwrap.dedent(text).strip(), WIDTH), flush=True)

    def show(self, lines: list[str] | str, indent: str = "  ") -> None:
        if isinstance(lines, str):
            lines = lines.splitlines()
        for line in lines:
            print(f"{indent}{line}".rstrip())
        sys.stdout.flush()

    def ok(self, what: str) -> None:
        print(f"✔ as expected: {what}", flush=True)

    # ---- running things -----------------------------------------------------------------

    def pytest(self, *args: str) -> Run:
        print(f"\n$ pytest {' '.join(args)}".rstrip(), flush=True)
        return self._run([sys.executable, "-m", "pytest", *PYTEST_FLAGS, *args])

    def python(self, code: str) -> Run:
        print(f"\n$ python -c {code!r}", flush=True)
        return self._run([sys.executable, "-c", code])

    def statedict(self, *args: str) -> Run:
        print(f"\n$ statedict {' '.join(args)}", flush=True)
        return self._run([sys.executable, "-m", "pytest_statedict", *args])

    def _run(self, command: list[str]) -> Run:
        started = time.perf_counter()
        done = subprocess.run(
            command,
            cwd=self.project,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            check=False,
        )
        run = Run(done.returncode, done.stdout.replace("\r\n", "\n"))
        print(f"  (exit code {run.returncode}, {time.perf_counter() - started:.1f}s)")
        return run

    # ---- checking things ----------------------------------------------------------------

    def expect(self, run: Run, returncode: int, *needles: str, pattern: str | None = None) -> None:
        """Fail the demo unless ``run`` exited with ``returncode`` and printed every needle."""
        problems = []
        if run.returncode != returncode:
            problems.append(f"exit code {run.returncode}, expected {returncode}")
        text = _portable(run.output)
        problems += [f"no {needle!r} in the output" for needle in needles if needle not in text]
        if pattern is not None and not re.search(pattern, text, re.M):
            problems.append(f"nothing matches {pattern!r} in the output")
        if problems:
            raise DemoFailure(
                f"step {self.step}: " + "; ".join(problems) + "\n\nfull output:\n" + run.output
            )

    def snapshot_files(self) -> list[Path]:
        return sorted((self.project / "tests" / "__statedict__").rglob("*.json"))

    def snapshot_texts(self) -> dict[str, str]:
        return {self.rel(p): p.read_text(encoding="utf-8") for p in self.snapshot_files()}

    def rel(self, path: Path) -> str:
        return path.relative_to(self.project).as_posix()


def _portable(text: str) -> str:
    """Output with Windows path separators turned to '/', so that one needle fits both."""
    return re.sub(r"(?<=\w)\\(?=[\w_\[])", "/", text) if os.sep == "\\" else text


def digest(output: str, max_lines: int = 18, names: list[str] | None = None) -> list[str]:
    """The interesting part of pytest's output: the failure messages (the ``E`` lines, at
    most ``max_lines`` each) of the tests in ``names`` (default: all), a line naming the
    other failures, then the plugin's summary line and pytest's last line."""
    lines = output.splitlines()
    failures: list[tuple[str, list[str]]] = []
    for line in lines:
        header = re.fullmatch(r"_{3,} (.+?) _{3,}", line)
        if header:
            failures.append((header.group(1), []))
        elif failures and line.startswith("E "):
            message = line[2:].removeprefix("  ")
            failures[-1][1].append(
                re.sub(r"^[\w.]+\.(StateDictMismatch|SnapshotError): ", "", message)
            )
    shown: list[str] = []
    others = []
    for name, message in failures:
        if names is not None and name not in names:
            others.append(name)
            continue
        shown.append(f"{name}:")
        shown.extend(f"  {m}" for m in message[:max_lines])
        if len(message) > max_lines:
            shown.append(f"  ... ({len(message) - max_lines} more lines)")
    if others:
        shown.append(f"(and {len(others)} more failing alike: {', '.join(others)})")
    tail = [line for line in lines if line.startswith("statedict:")]
    if lines:
        tail.append(lines[-1])
    if shown and tail:
        shown.append("")
    return shown + tail


def edit(path: Path, replacements: list[tuple[str, str]]) -> list[str]:
    """Apply text replacements to ``path``; return the unified diff."""
    before = path.read_text(encoding="utf-8")
    after = before
    for old, new in replacements:
        if after.count(old) != 1:
            raise DemoFailure(f"cannot apply the demo's edit to {path}: {old!r} not found once")
        after = after.replace(old, new)
    path.write_text(after, encoding="utf-8")
    return unified(before, after, path.name)


def unified(before: str, after: str, name: str, context: int = 0) -> list[str]:
    return [
        line.rstrip("\n")
        for line in difflib.unified_diff(
            before.splitlines(True),
            after.splitlines(True),
            f"a/{name}",
            f"b/{name}",
            n=context,
        )
    ]


def run_demo(project: Path) -> None:
    demo = Demo(project)
    committed = demo.snapshot_texts()  # examples/cnn's, to hold what the demo writes against
    shutil.rmtree(project / "tests" / "__statedict__")
    print("pytest-statedict demo".center(WIDTH))
    print("=" * WIDTH)
    demo.say(
        f"""
        A copy of examples/cnn is in {project}: a small CNN (cnn_model.py), its optimizer
        and its tests (tests/test_cnn.py). Its snapshots were deleted, as in a project that
        has just started to use the plugin. Every `pytest` below runs `python -m pytest
        {" ".join(PYTEST_FLAGS)}` in that folder; the output is trimmed to the failure
        messages and the summary.
        """
    )

    # 1 --------------------------------------------------------------------------------------
    demo.heading("pytest with no snapshots yet: the snapshot tests fail")
    run = demo.pytest()
    demo.show(digest(run.output, names=["test_model_and_optimizer_layout"]))
    demo.expect(
        run,
        1,
        f"no statedict snapshot {MAIN_SNAPSHOT} yet: nothing was written",
        "pytest --statedict-update 'tests/test_cnn.py::test_model_and_optimizer_layout'",
    )
    if demo.snapshot_files():
        raise DemoFailure("step 1: a plain pytest run wrote snapshot files")
    demo.ok("each failure names the missing file and the command that creates it; no file written")

    # 2 --------------------------------------------------------------------------------------
    demo.heading("pytest --statedict-update: write the snapshots")
    run = demo.pytest("--statedict-update")
    demo.show(digest(run.output))
    demo.expect(run, 0, pattern=r"^statedict: .*\b6 written in tests/__statedict__/")
    files = demo.snapshot_files()
    if len(files) != 6:
        raise DemoFailure(f"step 2: expected 6 snapshot files, found {len(files)}")
    written = demo.snapshot_texts()
    if written != committed:
        differ = sorted(k for k in {*written, *committed} if written.get(k) != committed.get(k))
        raise DemoFailure(
            f"step 2: the snapshots written differ from those committed in examples/cnn "
            f"({', '.join(differ)}): regenerate them with `pytest --statedict-update` in "
            "examples/cnn after deleting its tests/__statedict__"
        )
    print("\nwritten (commit these with the code; byte for byte those committed in examples/cnn):")
    demo.show([demo.rel(f) for f in files])
    main = project / MAIN_SNAPSHOT
    print(f"\nthe first lines of {MAIN_SNAPSHOT} (one line per tensor):")
    demo.show([*main.read_text(encoding="utf-8").splitlines()[:9], "..."])
    demo.ok("6 snapshots written, the tests pass")

    # 3 --------------------------------------------------------------------------------------
    demo.heading("statedict show: a snapshot (or any checkpoint) as a layer table")
    run = demo.statedict("show", MAIN_SNAPSHOT)
    demo.show(run.output)
    demo.expect(run, 0, "conv1.weight", "6x3x5x5", "optimizer: torch.optim.sgd.SGD")
    demo.ok("the table of keys, shapes, dtypes, kinds and totals")

    # 4 --------------------------------------------------------------------------------------
    demo.heading("pytest: the model matches its snapshots")
    run = demo.pytest()
    demo.show(digest(run.output))
    demo.expect(run, 0, pattern=r"^statedict: 6 passed\b")
    if demo.snapshot_texts() != committed:
        raise DemoFailure("step 4: a plain pytest run changed a snapshot")
    demo.ok("every snapshot matches; nothing written")

    # 5 --------------------------------------------------------------------------------------
    demo.heading("A refactor: rename fc3 to head, widen conv1 from 6 to 8 channels")
    demo.show(edit(project / "cnn_model.py", REFACTOR))
    before = main.read_text(encoding="utf-8")
    run = demo.pytest()
    demo.show(
        digest(
            run.output,
            max_lines=24,
            names=["test_model_and_optimizer_layout", GATE_NAME],
        )
    )
    demo.expect(
        run,
        1,
        f"state_dict does not match snapshot {MAIN_SNAPSHOT}",
        "fc3.weight -> head.weight",
        "conv1.weight: shape [6, 3, 5, 5] -> [8, 3, 5, 5]",
        "load_state_dict(strict=True): NO",
        "to accept this change: pytest --statedict-update",
        "does not load into Net with load_state_dict(strict=True)",
        "to load it as it is: rename=[(r'^fc3\\.', 'head.')]",
        f"FAILED {GATE_TEST}",
    )
    if main.read_text(encoding="utf-8") != before:
        raise DemoFailure("step 5: a plain pytest run changed a snapshot")
    demo.ok(
        "the diff shows the renames, the new shapes and that old checkpoints would no "
        "longer load; the v1 gate fails too"
    )

    # 6 --------------------------------------------------------------------------------------
    demo.heading("pytest --statedict-update: accept the new layout")
    run = demo.pytest("--statedict-update")
    demo.show(digest(run.output, max_lines=14))
    demo.expect(run, 1, f"FAILED {GATE_TEST}", pattern=r"^statedict: .*\b4 updated\b")
    if re.search(r"^FAILED (?!" + re.escape(GATE_TEST) + ")", _portable(run.output), re.M):
        raise DemoFailure("step 6: a test other than the v1 gate failed\n\n" + run.output)
    print(f"\nwhat a reviewer sees in the pull request ({MAIN_SNAPSHOT}):")
    demo.show(unified(before, main.read_text(encoding="utf-8"), "0.json")[2:])
    demo.say(
        """
        The snapshots now hold the new layout. The v1 gate still fails: --statedict-update
        accepts snapshot changes, never a broken promise to load old checkpoints
        (releases/cnn-v1.json is a release snapshot, not a test's: it is left alone).
        """
    )
    demo.ok("4 snapshots updated; only the v1 gate still fails")

    # 7 --------------------------------------------------------------------------------------
    demo.heading("Keep v1 checkpoints loading: map fc3.* to head.* in _load_from_state_dict")
    demo.show(
        edit(project / "cnn_model.py", [("\n    def forward(", COMPAT_HOOK + "\n    def forward(")])
    )
    run = demo.pytest()
    demo.show(digest(run.output))
    demo.expect(run, 0, pattern=r"^statedict: .*\b6 passed\b")
    demo.ok("the snapshots match and v1 checkpoints load into the refactored model")

    # 8 --------------------------------------------------------------------------------------
    demo.heading("The gate checks the optimizer too: weight decay on the norm weights")
    model_file = project / "cnn_model.py"
    kept = model_file.read_text(encoding="utf-8")
    demo.show(edit(model_file, DECAY_NORMS))
    run = demo.pytest()
    demo.show(digest(run.output, names=["test_model_and_optimizer_layout", GATE_NAME]))
    demo.expect(
        run,
        1,
        "'bn1.weight': param_group 1 -> 0 (weight_decay 0.0 -> 0.0005)",
        "release cnn-v1's optimizer state: an old optimizer state still loads with "
        "optimizer.load_state_dict: NO, it raises ValueError",
        f"FAILED {GATE_TEST}",
    )
    model_file.write_text(kept, encoding="utf-8")
    demo.say(
        """
        A v1 checkpoint's weights would still load, its optimizer state would not: resuming
        a v1 training run would raise. The gate builds the optimizer as training does
        (statedict_releases(..., optimizer=make_optimizer) in tests/test_cnn.py; the same
        optimizer= for assert_checkpoint_loads) and judges each release's saved state
        against it. The change is reverted.
        """
    )
    demo.ok("the moved parameter is in the snapshot diff; the gate says v1's optimizer breaks")

    # 9 --------------------------------------------------------------------------------------
    demo.heading("Cut release cnn-v2: record its layout, read the changelog")
    run = demo.python(SAVE_V2)
    demo.expect(run, 0)
    run = demo.statedict(*RECORD_V2)
    demo.show(run.output)
    demo.expect(run, 0, "recorded release cnn-v2 in releases/cnn-v2.json")
    run = demo.statedict("history")
    demo.show(run.output)
    demo.expect(
        run,
        0,
        "cnn-v2 (since cnn-v1):",
        "fc3.weight -> head.weight",
        "conv1.weight: [6, 3, 5, 5] -> [8, 3, 5, 5]",
        "cnn-v1: the first release",
    )
    flags = [flag for flag in ("differentiable", "foreach", "fused") if flag in run.output]
    if flags:
        raise DemoFailure(f"step 9: the history names implementation flags ({flags})")
    run = demo.pytest("-vv", "-k", "test_releases")
    demo.show([line for line in run.output.splitlines() if "test_releases[" in line])
    demo.show(digest(run.output))
    demo.expect(
        run,
        0,
        pattern=r"test_releases\[cnn-v2\] PASSED.*\n.*test_releases\[cnn-v1\] PASSED",
    )
    run = demo.statedict(*RECORD_V2)
    demo.show(run.output)
    demo.expect(run, 2, "release cnn-v2 is already recorded in releases/cnn-v2.json")
    demo.ok(
        "a few kB per release, one test per release (newest first), a release never "
        "overwritten, and the changelog to write release notes from"
    )

    # 10 -------------------------------------------------------------------------------------
    demo.heading("A deliberate break: retire v1 checkpoints, and say so")
    demo.show(edit(project / "cnn_model.py", [(COMPAT_HOOK, "")]))
    run = demo.pytest("--statedict-report=statedict.md")
    demo.show(digest(run.output, max_lines=6, names=[GATE_NAME]))
    demo.expect(run, 1, f"FAILED {GATE_TEST}", "release cnn-v1 no longer loads")
    report = (project / "statedict.md").read_text(encoding="utf-8").splitlines()
    print("\nstatedict.md, for the pull request or $GITHUB_STEP_SUMMARY (its first lines):")
    demo.show([*report[:12], "..."])
    ini = project / "pytest.ini"
    print(f"\nrecord the break in pytest.ini: statedict_releases_expected_to_fail = {RETIRED}")
    ini.write_text(
        ini.read_text(encoding="utf-8") + f"statedict_releases_expected_to_fail =\n    {RETIRED}\n",
        encoding="utf-8",
    )
    run = demo.pytest()
    demo.show(
        [line for line in run.output.splitlines() if "expected to fail" in line or "cnn-v1" in line]
    )
    demo.show(digest(run.output))
    demo.expect(
        run,
        0,
        "statedict: releases expected to fail",
        f"{RETIRED} (fails, as expected)",
        pattern=r"^statedict: .*releases: 1 passed, 1 xfailed",
    )
    demo.ok("the break is recorded with its reason and shown in every run, never dropped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the working copy afterwards")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    workdir = Path(tempfile.mkdtemp(prefix="statedict-demo-"))
    project = workdir / "cnn"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    try:
        run_demo(project)
    except DemoFailure as exc:
        print(f"\n✘ DEMO FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"\nthe working copy is kept in {project}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + "=" * WIDTH)
    print("demo complete: every step behaved as expected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
