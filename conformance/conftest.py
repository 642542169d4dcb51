"""The sweep's table: architectures x operations, printed after the run.

``--sweep-table=PATH`` also writes it as Markdown, with the first line of every failure.
The framework rows (test_frameworks.py) get a table of their own, artifacts x operations
and what each framework's own resume did; ``--frameworks-table=PATH`` writes it as Markdown.

Also how the sweep runs under xdist: the rows of one architecture go to one worker, one
after the other (``ArchitectureScheduling``), and each worker computes on one thread.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # architectures.py, beside this file

MARK = {"passed": "ok", "skipped": "skip", "failed": "FAIL"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--sweep-table", metavar="PATH", help="write the sweep's table as Markdown")
    parser.addoption("--sweep-live", metavar="PATH", help="append each row's outcome as it comes")
    parser.addoption(
        "--frameworks-table", metavar="PATH", help="write the framework rows' table as Markdown"
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = _live_path
    row = dict(report.user_properties).get("sweep_row")
    if path is None or row is None or (report.passed and report.when != "call"):
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{row[0]} | {row[1]} | {report.outcome} | {_detail(report)}\n")


_live_path: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _live_path
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        _live_path = config.getoption("--sweep-live")
    else:
        # One intra-op thread per xdist worker (tox sets OMP_NUM_THREADS=1 as well; this is
        # for a plain `pytest conformance -n 2`). torch's default is a thread per core, so
        # two workers on two cores run four OpenMP threads, and OpenMP's spinning threads
        # then wait on each other: the sweep took 3x the CPU time (1,194 s against 410 s).
        # The models here are too small for a second thread to pay anyway.
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: the rows of one architecture as one unit of work.

    The rows carry ``xdist_group(<architecture>)`` marks, but pytest-xdist 3.8 groups by a
    suffix it writes into ``item._nodeid``, which pytest 9 no longer reads (a node's id is
    ``item._id``): the marks were ignored and the rows of one architecture were dealt to
    both workers, so each built the model (and counted its parameters) once per worker and
    again whenever another architecture's row came between two of its own. Here the unit is
    the architecture read from the row's id, ``test_conformance[<architecture>-<operation>]``
    (operations have no ``-``), and any other test keeps loadgroup's own scope. The framework
    rows, ``test_framework[<framework>-<operation>]``, go by framework the same way: each
    worker that gets one trains the framework and writes its artifact.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ArchitectureScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            row = re.search(r"::test_conformance\[(.+)-[a-z_]+\]$", nodeid)
            if row:
                return f"architecture:{row.group(1)}"
            row = re.search(r"::test_framework\[(.+)-[a-z_]+\]$", nodeid)
            return f"framework:{row.group(1)}" if row else super()._split_scope(nodeid)

    return ArchitectureScheduling(config, log)


def _detail(report: pytest.TestReport) -> str:
    """The first line of a failure, or a skip's reason."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr)
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return " / ".join(lines[:3])[:300]  # a mismatch's headline, its first section
    return ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "row" in callspec.params:
            item.user_properties.append(("sweep_row", tuple(callspec.params["row"])))
        if callspec is not None and "framework_row" in callspec.params:
            item.user_properties.append(("framework_row", tuple(callspec.params["framework_row"])))


def _outcomes(
    terminalreporter: pytest.TerminalReporter, kind: str = "sweep_row"
) -> dict[tuple[str, str], tuple[str, str]]:
    """(architecture, operation) -> (outcome, first line of the failure or skip reason), of
    the rows whose user property ``kind`` names them."""
    cells: dict[tuple[str, str], tuple[str, str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            row = dict(getattr(report, "user_properties", ())).get(kind)
            if row is None or not hasattr(report, "when"):
                continue
            if report.when != "call" and report.passed:
                continue
            outcome = report.outcome if report.when == "call" or not report.passed else "passed"
            if outcome == "passed" and tuple(row) in cells:
                continue
            cells[tuple(row)] = (outcome, _detail(report))
    return cells


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _sweep_table(terminalreporter)
    _frameworks_table(terminalreporter)


def _sweep_table(terminalreporter: pytest.TerminalReporter) -> None:
    cells = _outcomes(terminalreporter)
    if not cells:
        return
    archs = list(dict.fromkeys(a for a, _ in cells))
    ops = list(dict.fromkeys(o for _, o in cells))
    tr = terminalreporter
    tr.section("conformance sweep: architectures x operations")
    width = max(len(a) for a in archs)
    tr.write_line(" " * width + " " + " ".join(f"{i:>4}" for i in range(len(ops))))
    for i, op in enumerate(ops):
        tr.write_line(f"{'':>{width}}  {i}: {op}")
    for a in archs:
        marks = [MARK.get(cells.get((a, o), ("-", ""))[0], "-") for o in ops]
        tr.write_line(f"{a:<{width}} " + " ".join(f"{m:>4}" for m in marks))
    tr.write_line("")
    for op in ops:
        counts = {k: sum(1 for (a, o), (r, _) in cells.items() if o == op and r == k) for k in MARK}
        tr.write_line(f"{op:<22} " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    path = tr.config.getoption("--sweep-table")
    if path:
        lines = ["| architecture | " + " | ".join(ops) + " |", "|---" * (len(ops) + 1) + "|"]
        for a in archs:
            marks = [MARK.get(cells.get((a, o), ("-", ""))[0], "-") for o in ops]
            lines.append(f"| {a} | " + " | ".join(marks) + " |")
        lines += ["", "| architecture | operation | outcome | detail |", "|---|---|---|---|"]
        for (a, o), (r, d) in cells.items():
            if r != "passed":
                lines.append(f"| {a} | {o} | {r} | {d.replace('|', '/')} |")
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _framework_outcomes(terminalreporter: pytest.TerminalReporter) -> dict[str, dict[str, str]]:
    """framework -> variant -> what the framework's own resume did (the rows' properties
    ``framework_outcome:<variant>``)."""
    found: dict[str, dict[str, str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            properties = dict(getattr(report, "user_properties", ()))
            row = properties.get("framework_row")
            if row is None:
                continue
            for name, value in properties.items():
                if name.startswith("framework_outcome:"):
                    found.setdefault(row[0], {})[name.split(":", 1)[1]] = value
    return found


def _frameworks_table(terminalreporter: pytest.TerminalReporter) -> None:
    """Artifacts x operations, and beside them what the framework itself did on resume."""
    cells = _outcomes(terminalreporter, "framework_row")
    if not cells:
        return
    from frameworks import FRAMEWORKS, OPERATIONS  # the rows ran: torch is imported already

    oracle = _framework_outcomes(terminalreporter)
    artifacts = [a for a in FRAMEWORKS if any(a == row for row, _ in cells)]
    ops = [o for o in OPERATIONS if any(o == op for _, op in cells)]

    def resumed(artifact: str) -> str:
        found = oracle.get(artifact, {})
        return "; ".join(
            f"{v}: {found[v]}" for v in ("unchanged", "renamed", "regrouped") if v in found
        )

    tr = terminalreporter
    tr.section("conformance: framework checkpoints x operations")
    width = max(len(a) for a in artifacts)
    tr.write_line(f"{'':<{width}} " + " ".join(f"{o:>9}" for o in ops))
    for a in artifacts:
        marks = [MARK.get(cells.get((a, o), ("-", ""))[0], "-") for o in ops]
        tr.write_line(f"{a:<{width}} " + " ".join(f"{m:>9}" for m in marks))
    tr.write_line("")
    for a in artifacts:
        tr.write_line(f"{a:<{width}} framework's own resume: {resumed(a) or '-'}")
    path = tr.config.getoption("--frameworks-table")
    if path:
        lines = ["| artifact | " + " | ".join(ops) + " | framework's own resume |"]
        lines.append("|---" * (len(ops) + 2) + "|")
        for a in artifacts:
            marks = [MARK.get(cells.get((a, o), ("-", ""))[0], "-") for o in ops]
            lines.append(f"| {a} | " + " | ".join(marks) + f" | {resumed(a).replace('|', '/')} |")
        lines += ["", "| artifact | operation | outcome | detail |", "|---|---|---|---|"]
        for (a, o), (r, d) in cells.items():
            if r != "passed":
                lines.append(f"| {a} | {o} | {r} | {d.replace('|', '/')} |")
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
