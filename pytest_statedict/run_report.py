"""The run report (``--statedict-report=PATH``): every check of the run, for CI.

Each check a test makes (a snapshot check, a refactor gate, a release gate, a comparison
against a given ``expected``, a round-trip) leaves a record on its test's reports (see
:mod:`.session`): kind, name, outcome, and for a failure its message and structured diff.
Under pytest-xdist the records reach the controller with the reports, and the controller
writes the report, once, after the run: ``.json`` in the schema of docs/report-schema.md,
or ``.md``, a summary table and one collapsible section per failure for a pull-request
comment or ``$GITHUB_STEP_SUMMARY``. Its counts are the summary line's, from the same
settled records.

The same records give a JUnit XML report (``--junitxml``) each failure's full text as a
test property (:func:`junit_properties`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from . import storage
from .distribution import installed_version
from .runtime import CHECK_KINDS, OUTCOMES

REPORT_FORMAT = "pytest-statedict-report"
REPORT_VERSION = 1
JUNIT_PROPERTY = "statedict_failure"

# (kind of record, key in "counts", label in the Markdown table), in the summary line's order
KINDS = (
    ("snapshot", "snapshots", "snapshots"),
    ("roundtrip", "roundtrips", "round-trips"),
    *((kind, label, label) for kind, label in CHECK_KINDS),
)
SNAPSHOT_OUTCOMES = ("passed", "failed", "written", "updated")
ALL_OUTCOMES = (*SNAPSHOT_OUTCOMES, *(o for o in OUTCOMES if o not in SNAPSHOT_OUTCOMES))


class RunState(Protocol):
    """What the report reads of the run: its settled records and its end (the session)."""

    results: list[dict[str, Any]]
    unused: list[Path]
    deleted: list[Path]
    incomplete: str | None
    problems: list[str]
    report_paths: list[Path]
    reports_written: list[Path]

    def summary_line(self) -> str | None: ...
    def from_root(self, path: Path) -> str: ...
    def relative(self, path: Path) -> str: ...


_TRUNCATED = re.compile(r"^\s+\.\.\. and \d+ more", re.M)


def full_text(record: dict[str, Any]) -> str:
    """A failed check's message, and where it listed only the first lines of a section,
    the complete lists from its diff."""
    message = record.get("message") or ""
    diff = record.get("diff")
    if not diff or not _TRUNCATED.search(message):
        return message
    lines = [message, "", "complete lists (the message shows the first of each):"]
    lines += [f"  - {e['key']}  {e['description']}" for e in diff["removed"]]
    lines += [f"  + {e['key']}  {e['description']}" for e in diff["added"]]
    lines += [f"  renamed: {r['from']} -> {r['to']}" for r in diff["renamed"]]
    lines += [
        f"  ~ {c['key']}: {c['attribute']} {c['expected']} -> {c['actual']}"
        for c in diff["changed"]
    ]
    lines += [f"  moved: {m['key']}: {m['from']} -> {m['to']}" for m in diff["moved"]]
    lines += [f"  optimizer: {line}" for line in diff["optimizer"]]
    return "\n".join(lines)


def junit_properties(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One ``statedict_failure`` property per failed check: what failed, then its text."""
    return [
        (JUNIT_PROPERTY, f"{r['kind']} {r['name']}: {full_text(r)}")
        for r in results
        if r["outcome"] == "failed"
    ]


# ---- the report --------------------------------------------------------------------------


def build_report(state: RunState, exit_status: int) -> dict[str, Any]:
    """The run's report as a JSON-able dict (schema: docs/report-schema.md)."""
    checks = [_check(r) for r in state.results]
    counts: dict[str, dict[str, int]] = {}
    for kind, key, _ in KINDS:
        counted = Counter(c["outcome"] for c in checks if c["kind"] == kind)
        counts[key] = {o: counted[o] for o in ALL_OUTCOMES if counted[o]}
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "plugin_version": installed_version() or "unknown",
        "summary": state.summary_line() or "",
        "exit_status": exit_status,
        "counts": counts,
        "unused_snapshots": [state.from_root(p) for p in state.unused],
        "deleted_snapshots": [state.from_root(p) for p in state.deleted],
        "unused_not_checked": state.incomplete,
        "problems": list(state.problems),
        "checks": checks,
    }


def _check(record: dict[str, Any]) -> dict[str, Any]:
    check = {
        "kind": record["kind"],
        "name": record["name"],
        "test": record["test"],
        "outcome": record["outcome"],
        "message": record.get("message"),
        "diff": record.get("diff"),
    }
    for optional in ("reason",):
        if record.get(optional) is not None:
            check[optional] = record[optional]
    return check


def render_markdown(report: dict[str, Any]) -> str:
    """The report for a pull-request comment or ``$GITHUB_STEP_SUMMARY``."""
    import html  # not at import: the plugin loads this module into every run

    out = ["## pytest-statedict", ""]
    summary = report["summary"] or "statedict: no checks ran"
    out += [f"<code>{html.escape(summary)}</code>", ""]
    out += _counts_table(report["counts"])
    failures = [c for c in report["checks"] if c["outcome"] == "failed"]
    if failures:
        out += _failure_details(failures)
    expected = [c for c in report["checks"] if c["outcome"] in ("xfailed", "xpassed")]
    if expected:
        out += _expected_to_fail(expected)
    for heading, items in (
        ("Unused snapshots", report["unused_snapshots"]),
        ("Deleted unused snapshots", report["deleted_snapshots"]),
        ("Errors", report["problems"]),
    ):
        if items:
            out += [f"### {heading}", ""] + [f"- <code>{html.escape(i)}</code>" for i in items]
            out.append("")
    if report["unused_not_checked"]:
        out += [f"Unused snapshots not checked: {_escape(report['unused_not_checked'])}", ""]
    return "\n".join(out)


def _counts_table(counts: dict[str, Any]) -> list[str]:
    """A row per kind of check that ran, a column per outcome that any of them had."""
    rows = [(label, counts[key]) for _, key, label in KINDS if counts[key]]
    if not rows:
        return []
    columns = [o for o in ALL_OUTCOMES if any(o in c for _, c in rows)]
    out = ["| check | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    out += [
        f"| {label} | " + " | ".join(str(c.get(o, 0)) for o in columns) + " |" for label, c in rows
    ]
    out.append("")
    return out


def _failure_details(failures: list[dict[str, Any]]) -> list[str]:
    """Each failed check's full text, folded, in a fence longer than any backtick run in it."""
    import html

    out = [f"### Failures ({len(failures)})", ""]
    for check in failures:
        text = full_text(check)
        fence = "`" * max(3, _longest_backtick_run(text) + 1)
        out += [
            "<details>",
            f"<summary><b>{html.escape(check['kind'])}</b> "
            f"<code>{html.escape(check['name'])}</code> in "
            f"<code>{html.escape(check['test'])}</code></summary>",
            "",
            f"{fence}text",
            text,
            fence,
            "",
            "</details>",
            "",
        ]
    return out


def _expected_to_fail(expected: list[dict[str, Any]]) -> list[str]:
    kinds = " and ".join(sorted({f"{check['kind']}s" for check in expected}))
    out = [f"### {kinds.capitalize()} expected to fail", ""]
    for check in expected:
        how = (
            "fails, as expected"
            if check["outcome"] == "xfailed"
            else "**loads again**: remove it from expected_to_fail"
        )
        out.append(f"- `{check['name']}`: {_escape(check.get('reason', ''))} ({how})")
    out.append("")
    return out


def _escape(text: str) -> str:
    """Markdown text with no HTML and no table or emphasis breaking characters."""
    return re.sub(r"([\\`*_|<>\[\]])", r"\\\1", text)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def write_reports(state: RunState, exit_status: int) -> bool:
    """Write every ``--statedict-report`` file; False (and a problem in the summary) when
    one cannot be written.

    A report that cannot be written fails the run, so the reports that were written are
    written again with that failure in them: no report says a run passed that did not.
    """
    failed = _write_each(state, state.report_paths, build_report(state, exit_status))
    if failed:
        rewritten = list(state.reports_written)
        state.reports_written.clear()
        _write_each(state, rewritten, build_report(state, exit_status or 1))
    return not failed


def _write_each(state: RunState, paths: list[Path], report: dict[str, Any]) -> bool:
    """Write ``report`` to each path by its suffix; True when any could not be written."""
    failed = False
    for path in paths:
        text = (
            json.dumps(report, indent=2, ensure_ascii=False) + "\n"
            if path.suffix == ".json"
            else render_markdown(report) + "\n"
        )
        try:
            storage.atomic_write(path, text)
        except OSError as exc:
            state.problems.append(
                f"statedict report {state.relative(path)} cannot be written ({exc})"
            )
            failed = True
        else:
            state.reports_written.append(Path(path))
    return failed
