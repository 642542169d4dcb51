"""Case 3: the schema of a Llama-7B-shaped model on the meta device (323 keys).

Baseline: ``model.state_dict()`` plus a hand-written walk over key, shape, dtype and
requires_grad. Ours: ``schema_of(model)`` and ``schema_of(model).to_json()`` (what a snapshot
check computes before it compares). All in one fresh process, interleaved, medians.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from typing import Any

from harness import alternate, median, run_worker


def measure(repeats: int, profile: bool = False) -> dict[str, Any]:
    import torch
    from models import LLAMA_7B, build_meta

    from pytest_statedict import schema_of

    model = build_meta(LLAMA_7B)

    def baseline() -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
        state = model.state_dict(keep_vars=True)
        return [(k, tuple(v.shape), v.dtype, v.requires_grad) for k, v in state.items()]

    fns = {
        "state_dict()": lambda: model.state_dict(),
        "state_dict() + walk": baseline,
        "schema_of(model)": lambda: schema_of(model),
        "schema_of(model).to_json()": lambda: schema_of(model).to_json(),
    }
    keys = len(model.state_dict())
    schema = schema_of(model)
    if len(schema.tensors) != keys:
        raise AssertionError(f"schema has {len(schema.tensors)} entries, state_dict {keys}")
    times = alternate(fns, repeats, warmup=3)
    out: dict[str, Any] = {
        "keys": keys,
        "medians": {k: median(v) for k, v in times.items()},
        "times": times,
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            schema_of(model).to_json()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        out["profile"] = text.getvalue()
    return out


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    got = run_worker(
        "case_schema",
        "measure",
        {"repeats": 20 if ctx["quick"] else 60, "profile": ctx.get("profile", False)},
    )
    res = got["result"]
    m = res["medians"]
    base = m["state_dict() + walk"]
    mins = {k: min(v) for k, v in res["times"].items()}
    rows = []
    for name, target in (("schema_of(model)", 3.0), ("schema_of(model).to_json()", 3.0)):
        ratio = m[name] / base
        rows.append(
            {
                "case": "3. schema, Llama-7B meta",
                "what": f"`{name}`, {res['keys']} keys, vs `state_dict()` + hand-written walk",
                "ours": f"{m[name] * 1000:.2f} ms",
                "baseline": f"{base * 1000:.2f} ms",
                "ratio": ratio,
                "target": "<= 3x" if name == "schema_of(model)" else "(3x, info)",
                "met": ratio <= target if name == "schema_of(model)" else None,
                "note": f"median of {len(res['times'][name])} interleaved calls; by the fastest "
                f"call {mins[name] * 1000:.2f} vs {mins['state_dict() + walk'] * 1000:.2f} ms = "
                f"{mins[name] / mins['state_dict() + walk']:.2f}x; `state_dict()` alone "
                f"{m['state_dict()'] * 1000:.2f} ms",
            }
        )
    return {"rows": rows, "raw": res}
