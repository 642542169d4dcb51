"""pytest-xdist support: workers report what they saw, the controller decides what is unused.

Each snapshot belongs to one test, so it is written by the one worker that runs the test;
no file is shared. But only the controller sees the whole run, so unused detection (and
its deletion under --statedict-update) and the summary counts happen there. What each test
did comes with its reports, as it happens (see :mod:`.session`); which tests each test file
holds comes in ``workeroutput`` when a worker finishes. A worker that crashed, was
restarted or was interrupted leaves the controller without the whole picture: then nothing
is judged unused, and the summary says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .session import FINISHED_EXIT_CODES, StateDictSession
from .unused import ModuleRecord

OUTPUT_KEY = "statedict"


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


class XdistSupport:
    def __init__(self, session: StateDictSession) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if is_worker(session.config):
            state = self.session
            session.config.workeroutput[OUTPUT_KEY] = {  # type: ignore[attr-defined]
                "directories": sorted(state.directories),
                # Only modules with snapshot files can have unused ones (files written in
                # this run are in the reports' "used").
                "modules": [
                    {
                        "path": str(m.path),
                        "snapshot_dir": str(m.snapshot_dir),
                        "root": str(m.root),
                        "tests": m.tests(),
                        "partial": not state.ran_whole(m),
                    }
                    for m in state.modules.values()
                    if m.snapshot_dir.is_dir()
                ],
            }

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        state = self.session
        name = getattr(getattr(node, "gateway", None), "id", "?")
        workeroutput = getattr(node, "workeroutput", None) or {}
        output = workeroutput.get(OUTPUT_KEY)
        if error is not None or output is None:
            state.nodes_down(f"worker {name} crashed" if error else f"worker {name} was lost")
            return
        if workeroutput.get("exitstatus", 0) not in FINISHED_EXIT_CODES:
            state.nodes_down(f"worker {name} was interrupted")
        state.directories.update(output["directories"])
        for module in output["modules"]:
            record = state.modules.setdefault(
                module["path"],
                ModuleRecord(
                    Path(module["path"]), Path(module["snapshot_dir"]), Path(module["root"])
                ),
            )
            record.merged_tests.extend(map(tuple, module["tests"]))
            record.partial = record.partial or module["partial"]

    def pytest_handlecrashitem(self, crashitem: str, report: Any, sched: Any) -> None:
        worker = getattr(getattr(report, "node", None), "gateway", None)
        self.session.nodes_down(
            f"worker {getattr(worker, 'id', '?')} crashed while running {crashitem}"
        )
