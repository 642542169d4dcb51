"""pytest-xdist support: workers report what they saw, the controller decides what is unused.

Each snapshot belongs to one test, so it is written by the one worker that runs the test;
no file is shared. But only the controller sees the whole run, so unused detection (and
its deletion under --statedict-update) and the summary counts happen there, from what each
worker sends back in ``workeroutput`` when it finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from . import storage
from .session import ModuleRecord, StateDictSession

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
                "counts": dict(state.counts),
                "roundtrips": dict(state.roundtrips),
                "used": sorted(state.used),
                "directories": sorted(state.directories),
                # Only modules with snapshot files can have unused ones (files written in
                # this run are in "used").
                "modules": [
                    {
                        "path": str(m.path),
                        "snapshot_dir": str(m.snapshot_dir),
                        "tests": m.tests(),
                        "partial": not state.ran_whole(m),
                    }
                    for m in state.modules.values()
                    if storage.snapshot_files(m.snapshot_dir)
                ],
            }

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", {}).get(OUTPUT_KEY)
        if output is None:
            return
        state = self.session
        state.counts.update(output["counts"])
        state.roundtrips.update(output["roundtrips"])
        state.used.update(output["used"])
        state.directories.update(output["directories"])
        for module in output["modules"]:
            record = state.modules.setdefault(
                module["path"], ModuleRecord(Path(module["path"]), Path(module["snapshot_dir"]))
            )
            record.merged_tests.update(module["tests"])
            record.partial = record.partial or module["partial"]
