"""Case 5: the save/load round-trip of a ~1 GiB and a ~4 GiB model.

The model is Llama-shaped (16 layers, 163 tensors, float32), built in the worker before the
measured phase and fully resident. Each arm runs in its own fresh process:

* ours: ``roundtrip(model)`` (cpu -> cpu, torch format); the result must be exact;
* baseline, the hand-written loop: ``torch.save(model.state_dict(), f)``, a full
  ``torch.load(f, weights_only=True)``, a fresh model built the normal way
  (``LlamaLike(cfg)``, default init), ``load_state_dict(strict=True)``, and ``torch.equal``
  on every tensor. Its parts are timed too.

Before the timed phase, each worker touches and frees 3 model sizes of memory (see
``harness.prewarm``): this VM returns freed pages to its host, and without it whichever arm
ran second inherited warm pages (the 4 GiB loop measured 62 s cold, with a 4 GiB
``torch.save`` alone taking 15 s).

Peak RSS during the phase minus the RSS before it (the model itself), in model sizes: total
RSS from VmHWM (exact), anonymous memory from the parent's 2 ms sampling.

If ``roundtrip()`` fails on a tiny model, the case reports that failure instead of a figure.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import GIB, median, mem_available, phase, prewarm, run_worker

SIZES = (1.0, 4.0)


def probe() -> dict[str, Any]:
    """Does the shipped roundtrip() work at all? (a tiny model)"""
    import torch
    from torch import nn

    from pytest_statedict import roundtrip

    torch.manual_seed(0)
    try:
        result = roundtrip(nn.Linear(8, 8))
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": result.ok, "error": None if result.ok else str(result)}


def measure(size_gib: float, arm: str) -> dict[str, Any]:
    import torch
    from models import build_filled, build_normal, config_for_bytes, state_bytes

    cfg = config_for_bytes(int(size_gib * GIB))
    model = build_filled(cfg)
    nbytes = state_bytes(model)
    out: dict[str, Any] = {"nbytes": nbytes, "keys": cfg.keys, "config": cfg.as_dict()}
    # What the hand-written loop needs on top of the model (a loaded copy, a fresh model, the
    # file's page cache), touched and freed before either arm is timed.
    out["prewarm_s"] = prewarm(3 * nbytes)
    if arm == "ours":
        from pytest_statedict import roundtrip

        with phase("roundtrip"):
            result = roundtrip(model)
        out.update(
            ok=result.ok,
            mismatches=result.mismatches[:5],
            tensors=result.tensors_compared,
            bytes=result.bytes_compared,
        )
        return out
    folder = Path(tempfile.mkdtemp(prefix="statedict-bench-loop-"))
    parts: dict[str, float] = {}
    try:
        with phase("roundtrip"):
            t = time.perf_counter()
            path = folder / "checkpoint.pt"
            torch.save(model.state_dict(), path)
            parts["save"] = time.perf_counter() - t
            t = time.perf_counter()
            loaded = torch.load(path, weights_only=True)
            parts["load"] = time.perf_counter() - t
            t = time.perf_counter()
            fresh = build_normal(cfg)
            parts["build"] = time.perf_counter() - t
            t = time.perf_counter()
            fresh.load_state_dict(loaded, strict=True)
            parts["load_state_dict"] = time.perf_counter() - t
            t = time.perf_counter()
            fresh_state = fresh.state_dict()
            ok = all(torch.equal(v, fresh_state[k]) for k, v in model.state_dict().items())
            parts["compare"] = time.perf_counter() - t
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    del loaded, fresh
    out.update(ok=ok, parts=parts)
    return out


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    quick = ctx["quick"]
    sizes = SIZES[:1] if quick else SIZES
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"skipped": []}
    shipped = run_worker("case_roundtrip", "probe")["result"]
    raw["probe"] = shipped
    for size in sizes:
        need = int(3.3 * size * GIB) + GIB  # the loop: model + loaded dict + fresh model
        free_disk = shutil.disk_usage(tempfile.gettempdir()).free
        if mem_available() < need or free_disk < int(1.2 * size * GIB):
            raw["skipped"].append(
                f"{size:g} GiB: needs {need / GIB:.1f} GiB memory "
                f"({mem_available() / GIB:.1f} available), {1.2 * size:.1f} GiB disk "
                f"({free_disk / GIB:.1f} free)"
            )
            continue
        repeats = 1 if (quick or size >= 4) else 2
        arms = ["baseline", "ours"] if shipped["ok"] else ["baseline"]
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "ours": []}
        for i in range(repeats):
            for name in arms if i % 2 == 0 else arms[::-1]:
                try:
                    w = run_worker("case_roundtrip", "measure", {"size_gib": size, "arm": name})
                except Exception as exc:
                    runs[name].append({"error": str(exc).strip().splitlines()[-1]})
                    continue
                runs[name].append({**w["result"], **w["phases"]["roundtrip"]})
        raw[f"{size:g}GiB"] = runs
        base_runs = [r for r in runs["baseline"] if "error" not in r]
        if not base_runs:
            raise RuntimeError(f"baseline loop failed at {size:g} GiB: {runs['baseline']}")
        nbytes = base_runs[0]["nbytes"]
        base_t = median([r["seconds"] for r in base_runs])
        base_rss = median([r["extra_rss"] for r in base_runs]) / nbytes
        base_anon = median([r["extra_anon"] for r in base_runs]) / nbytes
        parts = {k: median([r["parts"][k] for r in base_runs]) for k in base_runs[0]["parts"]}
        base_no_build = base_t - parts["build"]
        ok_runs = [r for r in runs["ours"] if "error" not in r]
        label = "`roundtrip(model)`"
        if not ok_runs:
            rows.append(
                {
                    "case": "5. round-trip",
                    "what": f"{nbytes / GIB:.2f} GiB model: {label} vs the hand-written loop",
                    "ours": "FAILS",
                    "baseline": f"{base_t:.2f} s, +{base_rss:.2f} model",
                    "ratio": None,
                    "target": "<= 0.35x time, <= +1.1 model RSS",
                    "met": False,
                    "note": runs["ours"][0]["error"][:300] if runs["ours"] else shipped["error"],
                }
            )
            continue
        t = median([r["seconds"] for r in ok_runs])
        rss = median([r["extra_rss"] for r in ok_runs]) / nbytes
        anon = median([r["extra_anon"] for r in ok_runs]) / nbytes
        exact = all(r["ok"] for r in ok_runs)
        ratio = t / base_t
        rows.append(
            {
                "case": "5. round-trip",
                "what": f"{nbytes / GIB:.2f} GiB model ({base_runs[0]['keys']} tensors): "
                f"{label} "
                "vs the hand-written loop (save, full load, fresh model, load_state_dict, "
                "torch.equal)",
                "ours": f"{t:.2f} s, RSS +{rss:.2f} model (anon +{anon:.2f})",
                "baseline": f"{base_t:.2f} s, RSS +{base_rss:.2f} model (anon +{base_anon:.2f})",
                "ratio": ratio,
                "target": "<= 0.35x time, <= +1.1 model RSS",
                "met": ratio <= 0.35 and rss <= 1.1 and exact,
                "note": f"result exact: {exact}; vs the loop without building the fresh model "
                f"({base_no_build:.2f} s): {t / base_no_build:.2f}x; loop parts: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()),
            }
        )
    return {"rows": rows, "raw": raw}
