"""Case 1: what the plugin costs a suite that never uses it.

``pytest --collect-only -q`` on a generated suite of 200 trivial tests, with the plugin
(loaded through its entry point, as in every pytest run of the environment) and with
``-p no:statedict``, in alternating order, timed and (under valgrind's callgrind, once per
arm) counted in instructions executed; plus two probes in fresh processes: importing
``pytest_statedict.plugin`` imports no torch, and neither does a whole in-process
collection with the plugin active.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from harness import PYTHON, median, run_cmd, run_worker

FILES, PER_FILE = 10, 20
HEAVY = ("torch", "deepdiff", "xxhash", "safetensors", "numpy")


def make_suite(root: Path) -> Path:
    suite = root / "startup_suite"
    suite.mkdir(parents=True, exist_ok=True)
    (suite / "pytest.ini").write_text("[pytest]\n")
    for i in range(FILES):
        body = "".join(f"\n\ndef test_{j}():\n    assert {j} == {j}\n" for j in range(PER_FILE))
        (suite / f"test_mod_{i}.py").write_text(f'"""Trivial module {i}."""{body}')
    return suite


# ---- worker functions (fresh processes) ------------------------------------------------------


def import_probe() -> dict[str, Any]:
    t0 = time.perf_counter()
    import pytest  # noqa: F401

    t1 = time.perf_counter()
    before = set(sys.modules)
    import pytest_statedict.plugin  # noqa: F401

    t2 = time.perf_counter()
    added = sorted(m for m in set(sys.modules) - before if not m.startswith("pytest_statedict"))
    return {
        "pytest_import_s": t1 - t0,
        "plugin_import_s": t2 - t1,
        "heavy_loaded": [m for m in HEAVY if m in sys.modules],
        "stdlib_modules_added": added,
    }


def collect_probe(suite: str, disable: bool) -> dict[str, Any]:
    import pytest

    seen: dict[str, Any] = {}

    class Probe:
        def pytest_collection_finish(self, session: pytest.Session) -> None:
            seen["plugin_active"] = session.config.pluginmanager.has_plugin("statedict")
            seen["items"] = len(session.items)

    args = ["--collect-only", "-q", "-p", "no:cacheprovider", suite]
    if disable:
        args[:0] = ["-p", "no:statedict"]
    rc = pytest.main(args, plugins=[Probe()])
    seen["rc"] = int(rc)
    seen["heavy_loaded"] = [m for m in HEAVY if m in sys.modules]
    return seen


def count_instructions(cmd: list[str], env: dict[str, str], *, cwd: Path) -> int | None:
    """Instructions one run of ``cmd`` executes, by valgrind's callgrind (None without it).

    Wall time on a shared 2-core VM spreads by +-10 % from run to run; an instruction count
    does not, so it can tell a 1 % difference apart.
    """
    if shutil.which("valgrind") is None:
        return None
    r = run_cmd(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
        cwd=cwd,
        env=dict(env, PYTHONHASHSEED="0"),
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", r["out"])
    if r["rc"] != 0 or found is None or f"{FILES * PER_FILE} tests collected" not in r["out"]:
        raise RuntimeError(f"callgrind run failed:\n{r['out'][-2000:]}")
    return int(found.group(1).replace(",", ""))


# ---- the case --------------------------------------------------------------------------------


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    quick = ctx["quick"]
    suite = make_suite(Path(ctx["tmp"]))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    # An empty plugin module, to tell pytest's own cost of loading any `-p` plugin (import
    # hooks, assertion-rewrite marking) from what this plugin adds on top of it.
    empty = Path(ctx["tmp"], "empty-plugin")
    empty.mkdir(exist_ok=True)
    (empty / "statedict_bench_empty_plugin.py").write_text('"""Does nothing."""\n')
    bare = dict(env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=str(empty))
    base = [PYTHON, "-m", "pytest", "--collect-only", "-q"]
    # (environment label, arm) -> (command, env)
    arms = {
        ("venv", "on"): (base, env),
        ("venv", "off"): ([*base, "-p", "no:statedict"], env),
        ("bare", "on"): ([*base, "-p", "pytest_statedict.plugin"], bare),
        ("bare", "off"): (base, bare),
        ("bare", "empty"): ([*base, "-p", "statedict_bench_empty_plugin"], bare),
    }

    def once(arm: tuple[str, str]) -> tuple[float, float]:
        cmd, arm_env = arms[arm]
        r = run_cmd(cmd, cwd=suite, env=arm_env)
        if r["rc"] != 0 or f"{FILES * PER_FILE} tests collected" not in r["out"]:
            raise RuntimeError(f"collect-only {arm} failed:\n{r['out'][-2000:]}")
        return r["wall"], r["cpu"]

    for arm in arms:  # warm-up: byte-compile everything, warm the page cache
        once(arm)
        once(arm)
    rounds = 10 if quick else 20
    wall: dict[tuple[str, str], list[float]] = {a: [] for a in arms}
    cpu: dict[tuple[str, str], list[float]] = {a: [] for a in arms}
    names = list(arms)
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        if i % 2:
            order = order[::-1]
        for arm in order:
            w, c = once(arm)
            wall[arm].append(w)
            cpu[arm].append(c)

    instructions = {arm: count_instructions(*arms[arm], cwd=suite) for arm in arms}

    imports = [
        run_worker("case_startup", "import_probe")["result"] for _ in range(3 if quick else 5)
    ]
    on = run_worker("case_startup", "collect_probe", {"suite": str(suite), "disable": False})
    off = run_worker("case_startup", "collect_probe", {"suite": str(suite), "disable": True})
    plugin_import = median([p["plugin_import_s"] for p in imports])
    heavy = sorted(
        {m for p in imports for m in p["heavy_loaded"]} | set(on["result"]["heavy_loaded"])
    )

    labels = {
        "venv": "this venv's plugins autoloaded (hypothesis, syrupy, xdist); "
        "with plugin vs `-p no:statedict`",
        "bare": "bare pytest (`PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`); `-p pytest_statedict.plugin` "
        "vs nothing",
    }
    rows = []
    for envname, label in labels.items():
        t_on, t_off = median(wall[(envname, "on")]), median(wall[(envname, "off")])
        c_on, c_off = median(cpu[(envname, "on")]), median(cpu[(envname, "off")])
        ratio = t_on / t_off
        vs_empty = ""
        if (envname, "empty") in wall:
            t_empty = median(wall[(envname, "empty")])
            vs_empty = (
                f"; an empty `-p` plugin costs {t_empty * 1000:.0f} ms "
                f"({t_empty / t_off:.3f}x), this plugin {t_on / t_empty:.3f}x of that"
            )
        on_ir, off_ir = instructions[(envname, "on")], instructions[(envname, "off")]
        if on_ir and off_ir:
            empty_ir = instructions.get((envname, "empty"))
            rows.append(
                {
                    "case": "1. start-up",
                    "what": f"the same, {envname}: instructions executed (valgrind callgrind, "
                    "deterministic)",
                    "ours": f"{on_ir / 1e6:.1f} M",
                    "baseline": f"{off_ir / 1e6:.1f} M",
                    "ratio": on_ir / off_ir,
                    "target": "<= 1.03x",
                    "met": on_ir / off_ir <= 1.03,
                    "note": "one run per arm, PYTHONHASHSEED=0"
                    + (
                        f"; an empty `-p` plugin: {empty_ir / off_ir:.4f}x, this plugin "
                        f"{on_ir / empty_ir:.4f}x of that"
                        if empty_ir
                        else ""
                    ),
                }
            )
        rows.append(
            {
                "case": "1. start-up",
                "what": f"`pytest --collect-only -q`, {FILES * PER_FILE} tests that never use the "
                f"plugin, {label}",
                "ours": f"{t_on * 1000:.0f} ms",
                "baseline": f"{t_off * 1000:.0f} ms",
                "ratio": ratio,
                "target": "<= 1.03x",
                "met": ratio <= 1.03,
                "note": f"wall, median of {rounds} interleaved runs each; CPU time (user+sys) "
                f"{c_on * 1000:.0f} vs {c_off * 1000:.0f} ms = {c_on / c_off:.3f}x{vs_empty}",
            }
        )
    rows.append(
        {
            "case": "1. start-up",
            "what": "heavy modules (torch, deepdiff, xxhash, safetensors, numpy) imported by "
            "`import pytest_statedict.plugin` and by a whole collection with the plugin active",
            "ours": ", ".join(heavy) or "none",
            "baseline": "",
            "ratio": None,
            "target": "no torch",
            "met": "torch" not in heavy and on["result"]["plugin_active"],
            "note": f"plugin import {plugin_import * 1000:.1f} ms after pytest; plugin active "
            f"{on['result']['plugin_active']}, with -p no:statedict "
            f"{off['result']['plugin_active']}",
        }
    )
    return {
        "rows": rows,
        "raw": {
            "wall": {"/".join(a): v for a, v in wall.items()},
            "instructions": {"/".join(a): v for a, v in instructions.items()},
            "cpu": {"/".join(a): v for a, v in cpu.items()},
            "import_probe": imports,
            "collect_probe": {"with": on["result"], "without": off["result"]},
        },
    }
