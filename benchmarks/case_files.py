"""Case 4: the schema of checkpoint files of 0.1, 1 and 4 GiB, without reading their data.

Each size is a Llama-shaped state_dict of 16 layers (163 keys at every size: only the tensor
bytes grow), saved with ``torch.save`` (zip) and with ``safetensors``. Per file, in fresh
processes (the file is in the page cache: it was just written):

* ours: ``schema_of(path)`` timed in-process (imports excluded), peak RSS during the call;
* baseline: ``torch.load(path, weights_only=True)`` (``safetensors.torch.load_file`` for
  .safetensors) and a loop over the shapes, likewise;
* ``statedict show PATH`` end to end (interpreter start and imports included), with its
  peak RSS, next to ``python -c "import torch"`` as the floor.

Disk space and memory are checked first; a size that does not fit is skipped.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from harness import GIB, MIB, PYTHON, median, mem_available, phase, run_cmd, run_worker

SIZES = (0.1, 1.0, 4.0)
FORMATS = ("pt", "safetensors")


# ---- worker functions -----------------------------------------------------------------------


def write(folder: str, size_gib: float) -> dict[str, Any]:
    import time

    import torch
    from models import build_meta, config_for_bytes
    from safetensors.torch import save_file

    cfg = config_for_bytes(int(size_gib * GIB))
    # Uninitialised memory: the bytes do not matter for a schema, and untouched pages of a
    # fresh mapping read as zeros without being allocated.
    state = build_meta(cfg).to_empty(device="cpu").state_dict()
    out = {}
    stem = Path(folder) / f"llama_{size_gib:g}gib"
    t0 = time.perf_counter()
    torch.save(state, f"{stem}.pt")
    out["pt_write_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_file(state, f"{stem}.safetensors")
    out["safetensors_write_s"] = time.perf_counter() - t0
    out.update(
        keys=len(state),
        nbytes=sum(t.numel() * t.element_size() for t in state.values()),
        pt=f"{stem}.pt",
        safetensors=f"{stem}.safetensors",
        config=cfg.as_dict(),
    )
    return out


def read(path: str, arm: str) -> dict[str, Any]:
    import torch

    from pytest_statedict import schema_of

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
    keys = 0
    with phase("read"):
        if arm == "ours":
            schema = schema_of(path)
            keys = len(schema.tensors)
        else:
            if path.endswith(".safetensors"):
                state = load_file(path)
            else:
                state = torch.load(path, weights_only=True)
            shapes = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
            keys = len(shapes)
    return {"keys": keys}


# ---- the case -------------------------------------------------------------------------------


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    quick = ctx["quick"]
    folder = Path(ctx["tmp"]) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = SIZES[:2] if quick else SIZES
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"skipped": []}
    statedict = str(Path(sys.executable).with_name("statedict"))
    floor = [run_cmd([PYTHON, "-c", "import torch"]) for _ in range(3)]
    floor_wall = median([f["wall"] for f in floor])
    floor_rss = median([f["maxrss"] for f in floor])
    ours_by_size: dict[str, list[tuple[float, dict[str, float]]]] = {f: [] for f in FORMATS}
    for size in sizes:
        need_disk = int(2.2 * size * GIB) + GIB
        free_disk = shutil.disk_usage(folder).free
        need_mem = int(2.5 * size * GIB) + GIB  # safetensors' writer copies; a full load
        if free_disk < need_disk or mem_available() < need_mem:
            raw["skipped"].append(
                f"{size:g} GiB: needs {need_disk / GIB:.1f} GiB disk ({free_disk / GIB:.1f} free) "
                f"and {need_mem / GIB:.1f} GiB memory ({mem_available() / GIB:.1f} available)"
            )
            continue
        written = run_worker("case_files", "write", {"folder": str(folder), "size_gib": size})
        info = written["result"]
        raw[f"{size:g}GiB"] = {"write": info}
        # Ours is fast and is the figure that matters; the full load only gives the scale.
        repeats = {"ours": 2 if quick else 3, "baseline": 1 if (quick or size >= 4) else 2}
        try:
            for fmt in FORMATS:
                path = info[fmt]
                file_bytes = Path(path).stat().st_size
                got: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
                for i in range(max(repeats.values())):
                    for arm in ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours"):
                        if i >= repeats[arm]:
                            continue
                        w = run_worker("case_files", "read", {"path": path, "arm": arm})
                        got[arm].append({**w["result"], **w["phases"]["read"]})
                cli = [run_cmd([statedict, "show", path])]
                for c in cli:
                    if c["rc"] != 0:
                        raise RuntimeError(f"statedict show {path} failed:\n{c['out'][-2000:]}")
                summary = {
                    arm: {
                        "seconds": median([g["seconds"] for g in runs]),
                        "extra_rss": median([g["extra_rss"] for g in runs]),
                        "extra_anon": median([g["extra_anon"] for g in runs]),
                        "keys": runs[0]["keys"],
                    }
                    for arm, runs in got.items()
                }
                summary["cli"] = {
                    "wall": median([c["wall"] for c in cli]),
                    "maxrss": median([c["maxrss"] for c in cli]),
                }
                raw[f"{size:g}GiB"][fmt] = {"file_bytes": file_bytes, **summary, "runs": got}
                ours, base = summary["ours"], summary["baseline"]
                ours_by_size[fmt].append((size, ours))
                label = "torch.load" if fmt == "pt" else "safetensors load_file"
                rows.append(
                    {
                        "case": "4. schema from file",
                        "what": f"{size:g} GiB .{fmt} ({ours['keys']} keys): `schema_of(path)` vs "
                        f"full `{label}` + shape loop",
                        "ours": f"{ours['seconds'] * 1000:.1f} ms, "
                        f"+{ours['extra_rss'] / MIB:.1f} MiB",
                        "baseline": f"{base['seconds'] * 1000:.0f} ms, "
                        f"+{base['extra_rss'] / MIB:.0f} MiB",
                        "ratio": ours["seconds"] / base["seconds"],
                        "target": "flat",
                        "met": None,
                        "note": f"`statedict show` end to end {summary['cli']['wall']:.2f} s, "
                        f"max RSS {summary['cli']['maxrss'] / MIB:.0f} MiB (`python -c 'import "
                        f"torch'`: {floor_wall:.2f} s, {floor_rss / MIB:.0f} MiB)",
                    }
                )
        finally:
            for fmt in FORMATS:
                Path(info[fmt]).unlink(missing_ok=True)
    # Flatness: the largest size against the smallest, per format.
    for fmt, series in ours_by_size.items():
        if len(series) < 2:
            continue
        (s0, small), (s1, big) = series[0], series[-1]
        t_ratio = big["seconds"] / small["seconds"]
        growth = big["extra_rss"] - small["extra_rss"]
        flat = t_ratio <= 1.5 and growth <= 16 * MIB
        rows.append(
            {
                "case": "4. schema from file",
                "what": f".{fmt}: `schema_of(path)` at {s1:g} GiB vs at {s0:g} GiB "
                f"({s1 / s0:.0f}x the bytes, same keys)",
                "ours": f"{big['seconds'] * 1000:.1f} ms, +{big['extra_rss'] / MIB:.1f} MiB",
                "baseline": f"{small['seconds'] * 1000:.1f} ms, "
                f"+{small['extra_rss'] / MIB:.1f} MiB",
                "ratio": t_ratio,
                "target": "flat (time and memory do not grow with bytes)",
                "met": flat,
                "note": f"peak-RSS growth {growth / MIB:+.1f} MiB",
            }
        )
    shutil.rmtree(folder, ignore_errors=True)
    return {"rows": rows, "raw": raw}
