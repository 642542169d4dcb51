"""Case 7: ``statedict show`` end to end, against ``python -c pass``.

The CLI reads checkpoints without importing torch (``pytest_statedict.torch_free``), so a
run costs the interpreter's start, the package's imports and the header reads. Measured on
real files written by ``torch.save`` and ``safetensors`` (a 16-layer Llama-shaped
state_dict, 163 keys at every size, as case 4):

* a 0.1 GiB and a 4 GiB ``.pt`` (a ``torch.save`` zip archive);
* a sharded Hugging Face folder of the 4 GiB model: 4 ``.safetensors`` shards and their
  ``model.safetensors.index.json``; and the same as 4 ``.bin`` shards (``torch.save``
  archives, as ``save_pretrained(safe_serialization=False)`` writes them).

Each file: ``statedict show PATH`` (the console script) and ``python -c pass`` run in turn,
interleaved, 15 rounds (5 with ``--quick``), medians compared; peak RSS of each from
``wait4``. Targets: at most 3x ``python -c pass`` in wall time, and peak RSS flat in the
file's size (4 GiB vs 0.1 GiB). ``python -c "import torch"`` is shown for scale: what every
run cost before. Files are deleted after their measurement (disk is checked first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from harness import GIB, MIB, PYTHON, median, run_cmd, run_worker

TARGET = 3.0
SHARDS = 4


# ---- worker functions -----------------------------------------------------------------------


def write(folder: str, size_gib: float, layout: str) -> dict[str, Any]:
    """Write the Llama-shaped state_dict as one .pt, or as a sharded folder."""
    import torch
    from models import build_meta, config_for_bytes

    cfg = config_for_bytes(int(size_gib * GIB))
    # Uninitialised memory, as in case 4: the bytes do not matter to a schema.
    state = build_meta(cfg).to_empty(device="cpu").state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if layout == "pt":
        path = Path(folder) / f"llama_{size_gib:g}gib.pt"
        torch.save(state, path)
        return {"path": str(path), "keys": len(state), "nbytes": nbytes}
    suffix = "safetensors" if layout == "sharded_safetensors" else "bin"
    out = Path(folder) / f"llama_{size_gib:g}gib_{suffix}"
    out.mkdir()
    keys = list(state)
    weight_map = {}
    for i in range(SHARDS):
        chunk = keys[i * len(keys) // SHARDS : (i + 1) * len(keys) // SHARDS]
        name = f"model-{i + 1:05d}-of-{SHARDS:05d}.{suffix}"
        part = {k: state[k] for k in chunk}
        if suffix == "safetensors":
            from safetensors.torch import save_file

            save_file(part, out / name)
        else:
            torch.save(part, out / name)
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": nbytes}, "weight_map": weight_map}
    (out / f"model.{suffix}.index.json").write_text(json.dumps(index))
    return {"path": str(out), "keys": len(state), "nbytes": nbytes}


# ---- the case -------------------------------------------------------------------------------


def count_instructions(cmd: list[str]) -> int | None:
    """Instructions one run of ``cmd`` executes, by valgrind's callgrind (None without it):
    the same in every run, where wall time on a loaded 2-core VM spreads by 2x."""
    if shutil.which("valgrind") is None:
        return None
    r = run_cmd(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
                env=dict(os.environ, PYTHONHASHSEED="0"))  # fmt: skip
    found = re.search(r"Collected\s*:\s*(\d+)", r["out"])
    if r["rc"] != 0 or found is None:
        raise RuntimeError(f"callgrind run failed:\n{r['out'][-2000:]}")
    return int(found.group(1))


def _interleaved(cmds: dict[str, list[str]], rounds: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cmds}
    names = list(cmds)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            got = run_cmd(cmds[name])
            if got["rc"] != 0:
                raise RuntimeError(f"{' '.join(cmds[name])} failed:\n{got['out'][-2000:]}")
            runs[name].append(got)
    return runs


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    quick = ctx["quick"]
    rounds = 5 if quick else 15
    folder = Path(ctx["tmp"]) / "cli"
    folder.mkdir(parents=True, exist_ok=True)
    statedict = str(Path(sys.executable).with_name("statedict"))
    big = 1.0 if quick else 4.0
    cases = [(0.1, "pt"), (big, "pt"), (big, "sharded_safetensors"), (big, "sharded_bin")]
    floor = [run_cmd([PYTHON, "-c", "import torch"]) for _ in range(3)]
    torch_wall = median([f["wall"] for f in floor])
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"import_torch_wall": torch_wall, "skipped": []}
    pass_instructions = count_instructions([PYTHON, "-c", "pass"])
    rss: dict[tuple[float, str], float] = {}
    for size, layout in cases:
        need = int(1.2 * size * GIB) + GIB
        if shutil.disk_usage(folder).free < need:
            raw["skipped"].append(f"{size:g} GiB {layout}: needs {need / GIB:.1f} GiB of disk")
            continue
        info = run_worker("case_cli", "write", {"folder": str(folder), "size_gib": size,
                                                "layout": layout})["result"]  # fmt: skip
        path = info["path"]
        try:
            runs = _interleaved(
                {"show": [statedict, "show", path], "pass": [PYTHON, "-c", "pass"]}, rounds
            )
            instructions = count_instructions([statedict, "show", path])
        finally:
            target = Path(path)
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        show = median([r["wall"] for r in runs["show"]])
        base = median([r["wall"] for r in runs["pass"]])
        show_rss = median([r["maxrss"] for r in runs["show"]])
        base_rss = median([r["maxrss"] for r in runs["pass"]])
        rss[size, layout] = show_rss
        fastest = min(r["wall"] for r in runs["show"]) / min(r["wall"] for r in runs["pass"])
        raw[f"{size:g}GiB {layout}"] = {**info, "show": runs["show"], "pass": runs["pass"]}
        what = {
            "pt": ".pt (torch.save zip)",
            "sharded_safetensors": f"sharded HF folder, {SHARDS} .safetensors shards + index",
            "sharded_bin": f"sharded HF folder, {SHARDS} .bin (torch.save) shards + index",
        }[layout]
        rows.append(
            {
                "case": "7. CLI",
                "what": f"`statedict show` on a {size:g} GiB {what} ({info['keys']} keys) vs "
                "`python -c pass`",
                "ours": f"{show * 1000:.0f} ms, max RSS {show_rss / MIB:.0f} MiB",
                "baseline": f"{base * 1000:.0f} ms, max RSS {base_rss / MIB:.0f} MiB",
                "ratio": show / base,
                "target": f"<= {TARGET:g}x",
                "met": show / base <= TARGET,
                "note": f"median of {rounds} interleaved runs; by the fastest run {fastest:.2f}x;"
                f" `python -c 'import torch'` alone: {torch_wall:.2f} s "
                f"({torch_wall / base:.0f}x)",
            }
        )
        if instructions and pass_instructions:
            rows.append(
                {
                    "case": "7. CLI",
                    "what": f"the same, {size:g} GiB {layout}: instructions executed (valgrind "
                    "callgrind, deterministic)",
                    "ours": f"{instructions / 1e6:.1f} M",
                    "baseline": f"{pass_instructions / 1e6:.1f} M",
                    "ratio": instructions / pass_instructions,
                    "target": f"<= {TARGET:g}x",
                    "met": instructions / pass_instructions <= TARGET,
                    "note": "one run per arm, PYTHONHASHSEED=0",
                }
            )
    small, large = rss.get((0.1, "pt")), rss.get((big, "pt"))
    if small and large:
        growth = large - small
        rows.append(
            {
                "case": "7. CLI",
                "what": f"`statedict show` peak RSS, {big:g} GiB .pt vs 0.1 GiB .pt "
                f"({big / 0.1:.0f}x the bytes, same keys)",
                "ours": f"{large / MIB:.1f} MiB",
                "baseline": f"{small / MIB:.1f} MiB",
                "ratio": large / small,
                "target": "flat",
                "met": growth <= 4 * MIB,
                "note": f"growth {growth / MIB:+.1f} MiB",
            }
        )
    shutil.rmtree(folder, ignore_errors=True)
    return {"rows": rows, "raw": raw}
