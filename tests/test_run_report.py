"""--statedict-report: the run's checks as JSON (docs/report-schema.md) and Markdown, and
each failure's diff as a JUnit XML property."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from conftest import NET_SOURCE, match_lines

jsonschema = pytest.importorskip("jsonschema")

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "report-schema.md"

# A project with every kind of check, passing and failing: snapshots (one written first,
# then changed), a round-trip, gates, releases (one expected to fail) and a comparison.
TESTS = """
import pytest
import torch
from pathlib import Path
from model import Net, make_optimizer
from pytest_statedict import (
    StateDictMismatch, assert_checkpoint_loads, assert_state_dict_matches, statedict_releases,
)

WIDTH = 6


def build():
    with torch.device("meta"):
        return Net()


def test_layout(statedict_snapshot):
    statedict_snapshot.assert_match(Net().fc1, name="fc1")
    statedict_snapshot.assert_match(Net(width=WIDTH), name="model")


def test_expected_mismatch_counts_as_passed():
    with pytest.raises(StateDictMismatch):
        assert_state_dict_matches(Net(width=4), Net())


@pytest.mark.statedict_roundtrip(devices=["cpu"])
def test_roundtrip(statedict_roundtrip):
    statedict_roundtrip(Net())


def test_gates(tmp_path):
    path = tmp_path / "v1.pt"
    torch.save(Net().state_dict(), path)
    assert_checkpoint_loads(Net(), path)
    assert_checkpoint_loads(Net(width=WIDTH), path)


def test_comparison():
    assert_state_dict_matches(Net(hidden=100), Net())


test_releases = statedict_releases(build, expected_to_fail={"v0.1": "conv1 widened in 0.2"})
"""


def project(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(model=NET_SOURCE)
    pytester.makepyfile(test_all=TESTS)
    releases = pytester.path / "tests" / "__statedict__" / "releases"
    releases.mkdir(parents=True)
    from pytest_statedict import schema_of

    # v0.1 had 8 channels (a deliberate break since), v0.2 is today's layout
    pytester.syspathinsert()
    model = __import__("model")
    (releases / "v0.1.json").write_text(schema_of(model.Net(width=8)).to_json())
    (releases / "v0.2.json").write_text(schema_of(model.Net()).to_json())
    pytester.runpytest("--statedict-update", "-k", "test_layout").assert_outcomes(passed=1)
    test_file = pytester.path / "test_all.py"
    test_file.write_text(test_file.read_text().replace("WIDTH = 6", "WIDTH = 16"))


def schema() -> dict[str, Any]:
    text = SCHEMA_DOC.read_text(encoding="utf-8")
    block = re.search(r"## JSON Schema\n\n```json\n(.*?)\n```", text, re.S)
    assert block, "docs/report-schema.md has its JSON Schema in a ```json block"
    return json.loads(block.group(1))  # type: ignore[no-any-return]


def summary_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("statedict: ")]
    assert len(lines) == 1, lines
    return lines[0]


def parse_summary(line: str) -> dict[str, dict[str, int]]:
    """``statedict: 1 passed; gates: 1 failed`` -> {"snapshots": {...}, "gates": {...}}."""
    labels = {"round-trips": "roundtrips", "gates": "gates", "releases": "releases",
              "comparisons": "comparisons"}  # fmt: skip
    counts: dict[str, dict[str, int]] = {k: {} for k in ("snapshots", *labels.values())}
    for part in line.removeprefix("statedict: ").split("; "):
        label, _, rest = part.partition(": ")
        kind = labels.get(label)
        if kind is None:
            kind, rest = "snapshots", part
        for number, outcome in re.findall(r"(\d+) (\w+)", rest):
            if outcome not in ("unused", "deleted", "error", "errors"):
                counts[kind][outcome] = int(number)
    return counts


def test_json_and_markdown_reports_agree_with_the_summary(pytester: pytest.Pytester) -> None:
    project(pytester)
    result = pytester.runpytest(
        "--statedict-report=out/report.json",
        "--statedict-report=out/report.md",
        "--junitxml=out/junit.xml",
    )
    result.assert_outcomes(passed=3, failed=3, xfailed=1)
    line = summary_line(result.stdout.str())
    assert line == (
        "statedict: 1 passed, 1 failed; round-trips: 1 passed; gates: 1 passed, 1 failed; "
        "releases: 1 passed, 1 xfailed; comparisons: 1 passed, 1 failed"
    )
    match_lines(result, ["statedict report written: out/report.json"])
    report = json.loads((pytester.path / "out" / "report.json").read_text())
    jsonschema.validate(report, schema())
    assert report["summary"] == line
    assert report["exit_status"] == 1
    assert {k: v for k, v in report["counts"].items()} == parse_summary(line)
    by_outcome: dict[str, dict[str, int]] = {}
    for check in report["checks"]:
        kind = {"snapshot": "snapshots", "roundtrip": "roundtrips"}.get(
            check["kind"], check["kind"] + "s"
        )
        counted = by_outcome.setdefault(kind, {})
        counted[check["outcome"]] = counted.get(check["outcome"], 0) + 1
    assert by_outcome == {k: v for k, v in report["counts"].items() if v}

    failed = {c["name"]: c for c in report["checks"] if c["outcome"] == "failed"}
    snapshot = failed["__statedict__/test_all/test_layout/model.json"]
    assert snapshot["test"] == "test_all.py::test_layout"
    assert "state_dict does not match snapshot" in snapshot["message"]
    assert {"key": "conv1.weight", "attribute": "shape", "expected": [6, 3, 5, 5],
            "actual": [16, 3, 5, 5]} in snapshot["diff"]["changed"]  # fmt: skip
    assert snapshot["diff"]["loads_strict"] is False
    gate = next(c for n, c in failed.items() if n.endswith("v1.pt"))
    assert gate["kind"] == "gate" and "does not load into Net" in gate["message"]
    assert failed["Net"]["kind"] == "comparison"
    expected = next(c for c in report["checks"] if c["outcome"] == "xfailed")
    assert (expected["name"], expected["reason"]) == ("v0.1", "conv1 widened in 0.2")
    assert "shape mismatches" in expected["message"]

    markdown = (pytester.path / "out" / "report.md").read_text()
    assert f"<code>{line}</code>" in markdown
    assert "| check | passed | failed | xfailed |" in markdown
    assert "| releases | 1 | 0 | 1 |" in markdown
    assert markdown.count("<details>") == markdown.count("</details>") == 3
    assert (
        "<summary><b>snapshot</b> <code>__statedict__/test_all/test_layout/model.json"
        "</code> in <code>test_all.py::test_layout</code></summary>"
    ) in markdown
    assert "- `v0.1`: conv1 widened in 0.2 (fails, as expected)" in markdown

    junit = ET.parse(pytester.path / "out" / "junit.xml").getroot()
    properties = {
        case.get("name"): [
            p.get("value") for p in case.iter("property") if p.get("name") == "statedict_failure"
        ]
        for case in junit.iter("testcase")
    }
    assert len(properties["test_layout"]) == 1
    assert properties["test_layout"][0].startswith(
        "snapshot __statedict__/test_all/test_layout/model.json: state_dict does not match"
    )
    assert "conv1.weight: shape [6, 3, 5, 5] -> [16, 3, 5, 5]" in properties["test_layout"][0]
    assert properties["test_gates"][0].startswith("gate ")
    assert properties["test_comparison"][0].startswith("comparison Net: ")
    assert properties["test_expected_mismatch_counts_as_passed"] == []
    assert properties["test_releases[v0.1]"] == []  # an expected failure is no failure


def test_under_xdist_the_controller_writes_one_report(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    project(pytester)
    serial = pytester.runpytest("--statedict-report=serial.json")
    result = pytester.runpytest_subprocess(
        "-n", "2", "--statedict-report=xdist.json", "--junitxml=junit.xml"
    )
    result.assert_outcomes(passed=3, failed=3, xfailed=1)
    line = summary_line(result.stdout.str())
    assert line == summary_line(serial.stdout.str())
    report = json.loads((pytester.path / "xdist.json").read_text())
    jsonschema.validate(report, schema())
    assert report["summary"] == line
    assert report["counts"] == parse_summary(line)
    expected = json.loads((pytester.path / "serial.json").read_text())
    key = lambda c: (c["test"], c["kind"], Path(c["name"]).name, c["outcome"])  # noqa: E731
    assert sorted(map(key, report["checks"])) == sorted(map(key, expected["checks"]))
    assert not list(pytester.path.glob("xdist.json.*")), "one writer, no leftovers"
    junit = (pytester.path / "junit.xml").read_text()
    assert junit.count('name="statedict_failure"') == 3


def test_the_markdown_lists_every_key_of_a_long_diff(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_long="""
        from torch import nn
        from pytest_statedict import assert_state_dict_matches

        def test_many():
            old = nn.Sequential(*[nn.Linear(2, 2) for _ in range(20)])
            new = nn.Sequential(*[nn.Linear(3, 3) for _ in range(20)])
            assert_state_dict_matches(new, old)
        """
    )
    result = pytester.runpytest("--statedict-report=r.md", "--statedict-report=r.json")
    result.assert_outcomes(failed=1)
    assert "... and 28 more" in result.stdout.str()
    markdown = (pytester.path / "r.md").read_text()
    assert "complete lists (the message shows the first of each):" in markdown
    assert "~ 19.bias: shape [2] -> [3]" in markdown
    report = json.loads((pytester.path / "r.json").read_text())
    assert len(report["checks"][0]["diff"]["changed"]) == 40


def test_a_report_path_needs_a_known_suffix(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest("--statedict-report=report.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--statedict-report=report.txt: *.json or .md*"])


def test_a_report_that_cannot_be_written_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass")
    (pytester.path / "blocked").write_text("a file, not a folder")
    result = pytester.runpytest("--statedict-report=blocked/report.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    match_lines(result, ["*statedict report blocked/report.json cannot be written*"])


def test_a_written_report_never_says_a_run_passed_when_another_report_failed_it(
    pytester: pytest.Pytester,
) -> None:
    """The .json is written, the .md cannot be: the run fails, and the .json says so."""
    pytester.makepyfile(test_x="def test_x(): pass")
    (pytester.path / "blocked").write_text("a file, not a folder")
    result = pytester.runpytest("--statedict-report=ok.json", "--statedict-report=blocked/r.md")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    report = json.loads((pytester.path / "ok.json").read_text())
    assert report["exit_status"] == 1
    assert any("blocked/r.md cannot be written" in p for p in report["problems"])


def test_a_key_that_is_no_valid_unicode_is_reported(pytester: pytest.Pytester) -> None:
    """A lone surrogate in a failing key: the run ends with its summary and both reports."""
    pytester.makepyfile(
        test_odd="""
        import torch
        from pytest_statedict import assert_state_dict_matches

        def test_odd():
            assert_state_dict_matches({"w\\udcff": torch.zeros(2)}, {"w": torch.zeros(2)})
        """
    )
    result = pytester.runpytest("--statedict-report=r.json", "--statedict-report=r.md")
    result.assert_outcomes(failed=1)
    match_lines(result, ["statedict: comparisons: 1 failed"])
    assert "w\\udcff" in (pytester.path / "r.md").read_text(encoding="utf-8")
    assert json.loads((pytester.path / "r.json").read_text(encoding="utf-8"))["checks"]


def test_an_empty_run_writes_an_empty_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(): pass")
    pytester.runpytest("--statedict-report=r.json").assert_outcomes(passed=1)
    report = json.loads((pytester.path / "r.json").read_text())
    jsonschema.validate(report, schema())
    assert report["checks"] == [] and report["summary"] == ""
