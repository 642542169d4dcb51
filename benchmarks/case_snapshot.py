"""Case 2: per-test cost of checking a 300-tensor schema against its snapshot.

A generated project with modules of N parametrized tests each, sharing one header
(150 ``nn.Linear(64, 64)``: 300 tensors):

* ``test_empty.py``: the test body does nothing (the baseline for both tools);
* ``test_statedict.py``: ``statedict_snapshot.assert_match(MODEL)``, the model on the meta
  device;
* ``test_syrupy.py``: ``assert snapshot == SCHEMA`` (syrupy's default amber serializer), the
  same schema as a prebuilt dict of key -> shape, dtype, kind, requires_grad;
* ``test_statedict_real.py`` / ``test_syrupy_real.py``, the realistic workload: the model
  on the CPU with real tensors and an AdamW (two param groups) after one step;
  ``assert_match(REAL, optimizer=OPT)`` against what a syrupy user writes by hand: a dict
  of the state_dict's shapes and dtypes, the param_groups (hyperparameters and member
  names) and the optimizer state's shapes, built from the live objects in the test.

Snapshots are written first (``--statedict-update`` / ``--snapshot-update``); then each
module runs on its own, in interleaved order, several times. The per-test overhead of a tool
is (median wall time of its run - median wall time of the empty run) / N; the time of the
assertion statement itself, measured inside each test, is reported as well.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

from harness import PYTHON, median, run_cmd

HEADER = textwrap.dedent(
    """
    import json
    import os
    import time

    import pytest
    import torch
    from torch import nn

    N = int(os.environ.get("BENCH_N", "100"))
    with torch.device("meta"):
        MODEL = nn.Sequential(*[nn.Linear(64, 64) for _ in range(150)])  # 300 tensors
    SCHEMA = {
        key: {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "kind": "parameter",
            "requires_grad": t.requires_grad,
        }
        for key, t in MODEL.state_dict(keep_vars=True).items()
    }
    torch.manual_seed(0)
    REAL = nn.Sequential(*[nn.Linear(64, 64) for _ in range(150)])
    OPT = torch.optim.AdamW(
        [
            {"params": [p for n, p in REAL.named_parameters() if n.endswith("weight")]},
            {
                "params": [p for n, p in REAL.named_parameters() if n.endswith("bias")],
                "weight_decay": 0.0,
            },
        ],
        lr=1e-3,
    )
    REAL(torch.randn(4, 64)).sum().backward()
    OPT.step()


    def layout(model, optimizer):
        # what a syrupy user snapshots by hand for the same checks
        names = {id(p): n for n, p in model.named_parameters()}
        saved = optimizer.state_dict()["param_groups"]
        return {
            "tensors": {k: [list(t.shape), str(t.dtype)] for k, t in model.state_dict().items()},
            "param_groups": [
                {**{k: v for k, v in s.items() if k != "params"},
                 "params": [names[id(p)] for p in g["params"]]}
                for s, g in zip(saved, optimizer.param_groups)
            ],
            "state": {
                names[id(p)]: {k: [list(v.shape), str(v.dtype)] for k, v in st.items()}
                for p, st in optimizer.state.items()
            },
        }


    TIMES = []
    CPU = []  # the statement's CPU time: what a loaded machine's waits leave out


    def teardown_module():
        out = os.environ.get("BENCH_TIMES")
        if out:
            with open(out, "w") as f:
                json.dump({"wall": TIMES, "cpu": CPU}, f)
    """
)

BODIES = {
    "empty": """
        @pytest.mark.parametrize("i", range(N))
        def test_check(i):
            t0, c0 = time.perf_counter(), time.process_time()
            TIMES.append(time.perf_counter() - t0)
            CPU.append(time.process_time() - c0)
        """,
    "statedict": """
        @pytest.mark.parametrize("i", range(N))
        def test_check(i, statedict_snapshot):
            t0, c0 = time.perf_counter(), time.process_time()
            statedict_snapshot.assert_match(MODEL)
            TIMES.append(time.perf_counter() - t0)
            CPU.append(time.process_time() - c0)
        """,
    "syrupy": """
        @pytest.mark.parametrize("i", range(N))
        def test_check(i, snapshot):
            t0, c0 = time.perf_counter(), time.process_time()
            assert snapshot == SCHEMA
            TIMES.append(time.perf_counter() - t0)
            CPU.append(time.process_time() - c0)
        """,
    "statedict_real": """
        @pytest.mark.parametrize("i", range(N))
        def test_check(i, statedict_snapshot):
            t0, c0 = time.perf_counter(), time.process_time()
            statedict_snapshot.assert_match(REAL, optimizer=OPT)
            TIMES.append(time.perf_counter() - t0)
            CPU.append(time.process_time() - c0)
        """,
    "syrupy_real": """
        @pytest.mark.parametrize("i", range(N))
        def test_check(i, snapshot):
            t0, c0 = time.perf_counter(), time.process_time()
            assert snapshot == layout(REAL, OPT)
            TIMES.append(time.perf_counter() - t0)
            CPU.append(time.process_time() - c0)
        """,
}

# Times the run loop and the session's end (where both plugins finish their bookkeeping,
# and syrupy writes its report) from inside pytest: interpreter start-up, imports and
# collection (seconds here, and noisy) stay out of the figure.
CONFTEST = textwrap.dedent(
    """
    import json
    import os
    import time

    import pytest

    _T = {}


    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtestloop(session):
        _T["start"] = time.perf_counter()
        return (yield)


    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(session, exitstatus):
        try:
            return (yield)
        finally:
            out = os.environ.get("BENCH_LOOP")
            if out and "start" in _T:
                with open(out, "w") as f:
                    json.dump({"loop": time.perf_counter() - _T["start"]}, f)
    """
)

UPDATE = {
    "statedict": "--statedict-update",
    "syrupy": "--snapshot-update",
    "statedict_real": "--statedict-update",
    "syrupy_real": "--snapshot-update",
}


def make_project(root: Path) -> Path:
    project = root / "snapshot_project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text(CONFTEST)
    for name, body in BODIES.items():
        (project / f"test_{name}.py").write_text(HEADER + textwrap.dedent(body))
    return project


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    quick = ctx["quick"]
    n = 50 if quick else 100
    rounds = 4 if quick else 5
    project = make_project(Path(ctx["tmp"]))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["BENCH_N"] = str(n)

    def pytest_run(name: str, *extra: str, times_to: Path | None = None) -> dict[str, Any]:
        run_env = dict(env)
        if times_to is not None:
            run_env["BENCH_TIMES"] = str(times_to)
            run_env["BENCH_LOOP"] = str(times_to) + ".loop"
        cmd = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"test_{name}.py", *extra]
        r = run_cmd(cmd, cwd=project, env=run_env)
        if r["rc"] != 0 or f"{n} passed" not in r["out"]:
            raise RuntimeError(f"pytest {name} {extra} failed:\n{r['out'][-3000:]}")
        return r

    for name, flag in UPDATE.items():
        pytest_run(name, flag)
    files = list((project / "__statedict__" / "test_statedict").rglob("*.json"))
    if len(files) != n:
        raise RuntimeError(f"expected {n} statedict snapshot files, found {len(files)}")
    snapshot_bytes = sum(f.stat().st_size for f in files) // len(files)
    ambr = project / "__snapshots__" / "test_syrupy.ambr"
    for name in BODIES:  # warm-up: byte-compile, page cache
        pytest_run(name)

    names = list(BODIES)
    wall: dict[str, list[float]] = {k: [] for k in names}
    loop: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    inner: dict[str, list[float]] = {k: [] for k in names}
    first: dict[str, list[float]] = {k: [] for k in names}
    inner_cpu: dict[str, list[float]] = {k: [] for k in names}
    times_file = Path(ctx["tmp"]) / "snapshot_times.json"
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            r = pytest_run(name, times_to=times_file)
            wall[name].append(r["wall"])
            loop[name].append(json.loads(Path(str(times_file) + ".loop").read_text())["loop"])
            cpu[name].append(r["cpu"])
            got = json.loads(times_file.read_text())
            first[name].append(got["wall"][0])
            inner[name].extend(got["wall"])
            inner_cpu[name].extend(got["cpu"])

    def overhead(name: str, series: dict[str, list[float]]) -> float:
        return (median(series[name]) - median(series["empty"])) / n

    ours, theirs = overhead("statedict", loop), overhead("syrupy", loop)
    ours_cpu, theirs_cpu = overhead("statedict", cpu), overhead("syrupy", cpu)
    ratio = ours / theirs
    real, real_syrupy = overhead("statedict_real", loop), overhead("syrupy_real", loop)
    rows = [
        {
            "case": "2. snapshot check",
            "what": f"per-test overhead, {n} parametrized tests each checking a 300-tensor schema "
            "(run loop + session finish, minus the empty module's, / N): "
            "statedict_snapshot.assert_match vs syrupy `snapshot == dict`",
            "ours": f"{ours * 1000:.2f} ms",
            "baseline": f"{theirs * 1000:.2f} ms",
            "ratio": ratio,
            "target": "<= 0.5x",
            "met": ratio <= 0.5,
            "note": f"median of {rounds} runs per module; empty module's loop "
            f"{median(loop['empty']) * 1000:.0f} ms; whole-process CPU time says "
            f"{ours_cpu * 1000:.2f} vs {theirs_cpu * 1000:.2f} ms",
        },
        {
            "case": "2. snapshot check",
            "what": "the assertion statement alone, timed inside each test (median of all checks)",
            "ours": f"{median(inner['statedict']) * 1000:.2f} ms",
            "baseline": f"{median(inner['syrupy']) * 1000:.2f} ms",
            "ratio": median(inner["statedict"]) / median(inner["syrupy"]),
            "target": "",
            "met": None,
            "note": "CPU time of the statement (process_time, median): "
            f"{median(inner_cpu['statedict']) * 1000:.2f} vs "
            f"{median(inner_cpu['syrupy']) * 1000:.2f} ms = "
            f"{median(inner_cpu['statedict']) / median(inner_cpu['syrupy']):.3f}x; "
            f"first check of a run: {median(first['statedict']) * 1000:.1f} vs "
            f"{median(first['syrupy']) * 1000:.1f} ms (syrupy parses its .ambr once, "
            f"{ambr.stat().st_size // 1024} KiB); one statedict snapshot file is "
            f"{snapshot_bytes // 1024} KiB",
        },
        {
            "case": "2. snapshot check",
            "what": f"realistic: {n} tests each checking a 300-tensor CPU model with AdamW state "
            "after one step (two param groups), per-test overhead as above: "
            "assert_match(model, optimizer=opt) vs syrupy on the hand-built layout dict",
            "ours": f"{real * 1000:.2f} ms",
            "baseline": f"{real_syrupy * 1000:.2f} ms",
            "ratio": real / real_syrupy,
            "target": "<= 0.3x",
            "met": real / real_syrupy <= 0.3,
            "note": "the statement alone, median: "
            f"{median(inner['statedict_real']) * 1000:.2f} vs "
            f"{median(inner['syrupy_real']) * 1000:.2f} ms; its CPU time (process_time, "
            f"median) {median(inner_cpu['statedict_real']) * 1000:.2f} vs "
            f"{median(inner_cpu['syrupy_real']) * 1000:.2f} ms = "
            f"{median(inner_cpu['statedict_real']) / median(inner_cpu['syrupy_real']):.3f}x",
        },
    ]
    return {
        "rows": rows,
        "raw": {
            "n": n,
            "loop": loop,
            "wall": wall,
            "cpu": cpu,
            "first": first,
            "inner_median": {k: median(v) for k, v in inner.items()},
            "inner_cpu_median": {k: median(v) for k, v in inner_cpu.items()},
        },
    }
