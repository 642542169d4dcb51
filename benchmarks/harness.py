"""Measurement plumbing shared by the benchmark cases.

* ``run_worker(module, func, args)`` runs ``func(**args)`` from ``benchmarks/<module>.py`` in
  a fresh Python process, so that every measurement starts from a clean heap. The parent
  samples the child's ``/proc/<pid>/status`` every couple of milliseconds.
* Inside the worker, ``with phase("name") as rec:`` marks the measured region: it resets
  the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5), records the RSS before,
  times the block with ``perf_counter`` and, at its end, reports ``VmHWM`` (the exact peak
  RSS during the block) plus the parent's sampled peaks of anonymous and file-backed RSS.
* ``run_cmd`` times a whole command and reads its own peak RSS from ``wait4``'s rusage.

Running this file as a script is the worker side: ``python harness.py MODULE FUNC JSON``.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * 1024 * 1024


# ---- /proc ---------------------------------------------------------------------------------

_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """RSS figures of a process, in bytes (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in _FIELDS:
                    out[key] = int(value.split()[0]) * KIB
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KIB
    return 0


# ---- worker side ---------------------------------------------------------------------------


def _emit(tag: str, payload: Any) -> None:
    sys.stdout.write(f"@{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


@contextlib.contextmanager
def phase(name: str) -> Iterator[dict[str, Any]]:
    """Time a block and measure its peak memory; the parent adds the sampled peaks.

    Keep the objects the block creates alive until it ends (they are, if they are bound to
    local names): the end-of-phase figures are taken before anything is freed.
    """
    gc.collect()
    before = proc_status()
    reset_ok = reset_peak_rss()
    _emit("phase", {"name": name, "before": before})
    time.sleep(0.02)  # let the sampler see the marker before the work starts
    rec: dict[str, Any] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        yield rec
    finally:
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started  # all threads of the process
        after = proc_status()
        rec.update(
            seconds=seconds,
            cpu_seconds=cpu_seconds,
            rss_before=before.get("VmRSS", 0),
            anon_before=before.get("RssAnon", 0),
            file_before=before.get("RssFile", 0),
            peak_rss=after.get("VmHWM", 0) if reset_ok else None,
            rss_after=after.get("VmRSS", 0),
            anon_after=after.get("RssAnon", 0),
            file_after=after.get("RssFile", 0),
        )
        _emit("end", {"name": name, "rec": rec})
        time.sleep(0.02)


def worker_main(argv: Sequence[str]) -> None:
    module_name, func_name, raw = argv
    sys.path.insert(0, str(HERE))
    module = importlib.import_module(module_name)
    result = getattr(module, func_name)(**json.loads(raw))
    _emit("result", result)


# ---- parent side ---------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


def run_worker(
    module: str, func: str, args: dict[str, Any] | None = None, *, timeout: float = 900
) -> dict[str, Any]:
    """Run ``func(**args)`` of ``benchmarks/<module>.py`` in a fresh process.

    Returns ``{"result": <what func returned>, "phases": {name: record}, "wall": s,
    "maxrss": bytes}``; each phase record has ``seconds``, ``rss_before``, ``peak_rss``
    (exact, from VmHWM), ``peak_anon`` / ``peak_file`` (sampled, plus the end values) and
    the derived ``extra_rss`` / ``extra_anon`` / ``extra_file`` (peak minus before).
    """
    cmd = [PYTHON, str(HERE / "harness.py"), module, func, json.dumps(args or {})]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(HERE)
    )
    state: dict[str, Any] = {"current": None, "phases": {}, "result": None, "other": []}
    lock = threading.Lock()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("@phase "):
                info = json.loads(line[7:])
                with lock:
                    state["current"] = {"name": info["name"], "peak_anon": 0, "peak_file": 0}
            elif line.startswith("@end "):
                info = json.loads(line[5:])
                with lock:
                    cur = state["current"] or {"peak_anon": 0, "peak_file": 0}
                    state["current"] = None
                rec = info["rec"]
                rec["peak_anon"] = max(cur["peak_anon"], rec["anon_after"])
                rec["peak_file"] = max(cur["peak_file"], rec["file_after"])
                if rec.get("peak_rss") is None:  # no clear_refs: fall back to sampling
                    rec["peak_rss"] = max(cur.get("peak_rss", 0), rec["rss_after"])
                rec["extra_rss"] = rec["peak_rss"] - rec["rss_before"]
                rec["extra_anon"] = rec["peak_anon"] - rec["anon_before"]
                rec["extra_file"] = rec["peak_file"] - rec["file_before"]
                state["phases"][info["name"]] = rec
            elif line.startswith("@result "):
                state["result"] = json.loads(line[8:])
            else:
                state["other"].append(line)

    errors: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        errors.extend(proc.stderr)

    threads = [threading.Thread(target=read_stdout), threading.Thread(target=read_stderr)]
    for t in threads:
        t.daemon = True
        t.start()
    rusage = None
    status = 0
    deadline = started + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rusage = ru
            break
        if time.perf_counter() > deadline:
            proc.kill()
            _, status, rusage = os.wait4(proc.pid, 0)
            break
        s = proc_status(proc.pid)
        with lock:
            cur = state["current"]
            if cur is not None and s:
                cur["peak_anon"] = max(cur["peak_anon"], s.get("RssAnon", 0))
                cur["peak_file"] = max(cur["peak_file"], s.get("RssFile", 0))
                cur["peak_rss"] = max(cur.get("peak_rss", 0), s.get("VmRSS", 0))
        time.sleep(0.002)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(timeout=10)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or state["result"] is None:
        tail = "".join(errors[-30:]) or "".join(state["other"][-30:])
        raise WorkerError(f"worker {module}.{func}({args}) exited with {proc.returncode}:\n{tail}")
    return {
        "result": state["result"],
        "phases": state["phases"],
        "wall": wall,
        "maxrss": (rusage.ru_maxrss * KIB) if rusage else 0,
        "stderr": "".join(errors[-5:]),
    }


def run_cmd(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Wall time, exit code, output and peak RSS (from ``wait4``) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out_chunks: list[str] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.daemon = True
    reader.start()
    deadline = started + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            _, status, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.001)
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall": wall,
        "cpu": ru.ru_utime + ru.ru_stime,
        "rc": proc.returncode,
        "out": "".join(out_chunks),
        "maxrss": ru.ru_maxrss * KIB,
    }


# ---- in-process timing ---------------------------------------------------------------------


def alternate(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, round-robin with a rotating first arm."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def prewarm(nbytes: int) -> float:
    """Touch ``nbytes`` of fresh memory at once, then free it; returns the seconds taken.

    This VM hands freed pages back to its host, and taking them back makes the first touch
    of memory run at anywhere from 0.3 to 3 GiB/s depending on what ran before. Both arms of
    a memory-heavy case call this first, so neither inherits the other's warm pages.
    """
    import torch

    started = time.perf_counter()
    chunk = 256 * MIB
    held = [torch.ones(chunk // 4) for _ in range(max(1, nbytes // chunk))]
    del held
    return time.perf_counter() - started


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def self_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


if __name__ == "__main__":
    worker_main(sys.argv[1:])
