#!/usr/bin/env python
"""Run the pytest-statedict benchmark suite and print a table of ratios.

    .venv/bin/python benchmarks/run.py            # everything, ~10 minutes on a 2-core VM
    .venv/bin/python benchmarks/run.py --quick    # fewer repeats, no 4 GiB files/models
    .venv/bin/python benchmarks/run.py --cases schema,fingerprint --json out.json

Every figure is a ratio against a baseline measured in the same run (the machine is shared
and noisy); see README.md for what each case measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import GIB, PYTHON, REPO, mem_available, run_cmd  # noqa: E402

CASES = {
    "startup": "case_startup",
    "snapshot": "case_snapshot",
    "schema": "case_schema",
    "files": "case_files",
    "roundtrip": "case_roundtrip",
    "fingerprint": "case_fingerprint",
    "cli": "case_cli",
    "releases": "case_releases",
    "roundtrip_models": "case_roundtrip_models",
    "renames": "case_renames",
}

# Public names only: the package's module layout is not part of its contract.
WARM_IMPORTS = (
    "import torch, pytest, xxhash, deepdiff, safetensors.torch, syrupy, xdist; "
    "import pytest_statedict.plugin, pytest_statedict.cli; "
    "from pytest_statedict import schema_of, roundtrip, assert_state_dict_matches, "
    "assert_checkpoint_loads, Schema"
)


def prepare_environment() -> dict[str, Any]:
    """Byte-code caching on, in a private cache, for every process the suite starts.

    This VM exports PYTHONDONTWRITEBYTECODE=1, so the editable package (and any generated
    test module) would be compiled from source in every process: a cost an installed
    package does not have. PYTHONPYCACHEPREFIX keeps the .pyc files out of the repository.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.pop("PYTEST_ADDOPTS", None)
    cache = Path(tempfile.gettempdir()) / "pytest-statedict-bench-pycache"
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    r = run_cmd([PYTHON, "-c", WARM_IMPORTS])
    if r["rc"] != 0:
        raise SystemExit(f"cannot import what the benchmarks need:\n{r['out']}")
    return {"pycache_prefix": str(cache), "warm_imports_s": round(r["wall"], 2)}


def machine() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
            ).stdout.strip()
        except OSError:
            return ""

    import importlib.metadata as md

    cpu = ""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_total_gib": round(total / GIB, 1),
        "mem_available_gib": round(mem_available() / GIB, 1),
        "tmp_free_gib": round(shutil.disk_usage(tempfile.gettempdir()).free / GIB, 1),
        "python": platform.python_version(),
        "torch": md.version("torch"),
        "pytest": md.version("pytest"),
        "syrupy": md.version("syrupy"),
        "xxhash": md.version("xxhash"),
        "safetensors": md.version("safetensors"),
        "git_head": git("rev-parse", "--short", "HEAD"),
        "package_changes_uncommitted": git("status", "--porcelain", "pytest_statedict"),
        "loadavg": os.getloadavg(),
    }


def fmt_ratio(r: Any) -> str:
    if r is None:
        return ""
    return f"{r:.3f}x" if r < 10 else f"{r:.1f}x"


def fmt_met(m: Any) -> str:
    return {True: "yes", False: "**NO**", None: "-"}[m]


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| case | what is measured | ours | baseline | ratio | target | met | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["case"],
            r["what"],
            r["ours"],
            r["baseline"],
            fmt_ratio(r["ratio"]),
            r["target"],
            fmt_met(r["met"]),
            r.get("note", ""),
        ]
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats, no 4 GiB cases: a few minutes"
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every raw figure as JSON")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add a cProfile summary of schema_of(llama) to the JSON",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")

    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "cases": {}}
    report["environment"] = prepare_environment()
    tmp = Path(tempfile.mkdtemp(prefix="statedict-bench-"))
    m = report["machine"]
    print(f"# pytest-statedict benchmarks ({'quick' if args.quick else 'full'} run)")
    print(
        f"machine: {m['cpus']} CPUs ({m['cpu']}), {m['mem_total_gib']} GiB RAM "
        f"({m['mem_available_gib']} available), {m['tmp_free_gib']} GiB free in "
        f"{tempfile.gettempdir()}; load average {m['loadavg'][0]:.2f}"
    )
    print(
        f"python {m['python']}, torch {m['torch']}, pytest {m['pytest']}, syrupy "
        f"{m['syrupy']}; pytest_statedict at {m['git_head']}"
        + (" + uncommitted changes" if m["package_changes_uncommitted"] else "")
    )
    rows: list[dict[str, Any]] = []
    try:
        for name in chosen:
            t0 = time.perf_counter()
            print(f"\n[{name}] running...", flush=True)
            module = __import__(CASES[name])
            ctx = {"quick": args.quick, "tmp": str(tmp), "profile": args.profile}
            try:
                got = module.run(ctx)
            except Exception as exc:
                traceback.print_exc()
                got = {
                    "rows": [
                        {
                            "case": name,
                            "what": "the case itself failed",
                            "ours": "ERROR",
                            "baseline": "",
                            "ratio": None,
                            "target": "",
                            "met": False,
                            "note": f"{type(exc).__name__}: {str(exc)[:300]}",
                        }
                    ],
                    "raw": {"error": traceback.format_exc()},
                }
            got["seconds"] = round(time.perf_counter() - t0, 1)
            report["cases"][name] = got
            rows.extend(got["rows"])
            for r in got["rows"]:
                print(
                    f"  {r['what'][:90]}: ours {r['ours']}, baseline {r['baseline']}, "
                    f"{fmt_ratio(r['ratio'])} (target {r['target'] or '-'}: {fmt_met(r['met'])})"
                )
            print(f"[{name}] {got['seconds']:.0f} s", flush=True)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print("\n" + table(rows))
    print(f"\ntotal {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"raw figures: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
