"""Case 7: the release gate over 20 releases of a Llama-7B-shaped model on meta (323 keys).

Ours: one ``statedict_releases`` gate checking 20 release snapshots (each read from its
file and decided as the gate decides: keys and shapes where no code of the model runs on
load, else a real load through the model's ``load_state_dict``), the model built once as
the gate builds it. Baseline: 20 ``schema_of(model)`` calls. Both arms in one fresh
process, interleaved, medians. For information, the same gate on a model with a
``_load_from_state_dict`` of its own (every release then goes through a real load into a
meta copy, as ``assert_checkpoint_loads`` does).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from harness import alternate, median, run_worker

RELEASES = 20


def measure(repeats: int) -> dict[str, Any]:
    import torch
    from models import LLAMA_7B, RMSNorm, build_meta

    from pytest_statedict import schema_of
    from pytest_statedict.releases import ReleaseGate, list_releases

    model = build_meta(LLAMA_7B)

    class ConvertingNorm(RMSNorm):
        """An RMSNorm whose load converts an old key: load code of the model's own."""

        def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
            if prefix + "scale" in state_dict:
                state_dict[prefix + "weight"] = state_dict.pop(prefix + "scale")
            super()._load_from_state_dict(state_dict, prefix, *args)

    hooked = build_meta(LLAMA_7B)
    with torch.device("meta"):
        hooked.model.norm = ConvertingNorm(LLAMA_7B.d)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = schema_of(model).to_json()
        for i in range(RELEASES):
            (folder / f"v0.{i}.json").write_text(text)
        releases = list_releases(folder)
        assert len(releases) == RELEASES

        gate = ReleaseGate(lambda: model, optimizer=None)
        hooked_gate = ReleaseGate(lambda: hooked, optimizer=None)

        def run_gate(g: ReleaseGate = gate) -> None:
            for release in releases:
                g.check(release)

        def schemas() -> None:
            for _ in range(RELEASES):
                schema_of(model)

        fns = {
            f"release gate, {RELEASES} releases": run_gate,
            f"{RELEASES} x schema_of(model)": schemas,
        }
        times = alternate(fns, repeats, warmup=2)
        hooked_times = alternate({"hooked": lambda: run_gate(hooked_gate)}, max(3, repeats // 4))
    return {
        "keys": len(model.state_dict()),
        "medians": {k: median(v) for k, v in times.items()},
        "hooked_median": median(hooked_times["hooked"]),
        "times": times,
    }


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    res = run_worker("case_releases", "measure", {"repeats": 8 if ctx["quick"] else 20})["result"]
    m = res["medians"]
    ours, base = m[f"release gate, {RELEASES} releases"], m[f"{RELEASES} x schema_of(model)"]
    ratio = ours / base
    rows = [
        {
            "case": "7. release gate, Llama-7B meta",
            "what": f"{RELEASES} release snapshots ({res['keys']} keys) through "
            f"`statedict_releases`, vs {RELEASES} `schema_of(model)`",
            "ours": f"{ours * 1000:.1f} ms",
            "baseline": f"{base * 1000:.1f} ms",
            "ratio": ratio,
            "target": "< 2x",
            "met": ratio < 2.0,
            "note": f"median of {len(res['times'][f'{RELEASES} x schema_of(model)'])} "
            "interleaved rounds; no code of the model's runs on load, so each release is "
            "decided from its keys and shapes",
        },
        {
            "case": "7. release gate, Llama-7B meta",
            "what": "the same with a module that has a `_load_from_state_dict` of its own "
            "(a real load per release)",
            "ours": f"{res['hooked_median'] * 1000:.1f} ms",
            "baseline": f"{base * 1000:.1f} ms",
            "ratio": res["hooked_median"] / base,
            "target": "(info)",
            "met": None,
            "note": "each release: a meta copy of the model and load_state_dict(assign=True), "
            "as assert_checkpoint_loads",
        },
    ]
    return {"rows": rows, "raw": res}
