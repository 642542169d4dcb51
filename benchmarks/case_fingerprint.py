"""Case 6: fingerprint throughput, ``schema_of(state_dict, values=True)``.

~1 GiB of float32 tensors (the Llama-shaped 16-layer model of case 5, 163 tensors, every
byte written before timing), in one fresh process, arms interleaved:

* raw: ``xxhash.xxh3_128(t.reshape(-1).view(torch.uint8).numpy())`` over every tensor
  (zero-copy), the hardware's ceiling for an exact hash;
* ours: ``schema_of(state_dict, values=True)`` (xxh3-128 streamed with its running digest
  kept at the end of each of 8 blocks, plus min/max/mean/std, each block's mean and one to
  three short hashes of a sample per tensor, see ``docs/fingerprints.md``; the hashing runs
  on a worker thread while the statistics are taken, so its CPU time, all threads, is
  reported beside the wall time);
* with ``diagnostics``: ``torch.aminmax`` and ``torch.std_mean`` over every whole tensor,
  what statistics over all the values would cost (the package takes them over a sample).

Peak RSS above the model during each timed call (exact, VmHWM); in a full run also at a
quarter of the size, to show that it does not grow with the model, and the throughput at
~4 GiB (same keys, wider layers), where the fixed per-tensor cost of the statistics weighs
less against the bytes hashed.
"""

from __future__ import annotations

from typing import Any

from harness import GIB, MIB, median, mem_available, phase, run_worker


def measure(size_gib: float, repeats: int, diagnostics: bool) -> dict[str, Any]:
    import torch
    import xxhash
    from models import build_filled, config_for_bytes, state_bytes

    from pytest_statedict import schema_of

    model = build_filled(config_for_bytes(int(size_gib * GIB)))
    state = model.state_dict()
    nbytes = state_bytes(state)

    def raw() -> list[str]:
        return [
            xxhash.xxh3_128(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for t in state.values()
        ]

    def ours() -> Any:
        return schema_of(state, values=True)

    def aminmax() -> list[Any]:
        return [torch.aminmax(t) for t in state.values()]

    def std_mean() -> list[Any]:
        return [torch.std_mean(t, correction=0) for t in state.values()]

    arms = {"raw xxh3": raw, "values=True": ours}
    if diagnostics:
        arms.update({"aminmax loop": aminmax, "std_mean loop": std_mean})
    # Same hashes: the fingerprint is an xxh3-128 of the same bytes.
    schema = ours()
    digests = raw()
    same = [e.fingerprint.xxh3 for e in schema.tensors] == digests  # type: ignore[union-attr]
    out: dict[str, Any] = {
        "nbytes": nbytes,
        "tensors": len(state),
        "same_hashes": same,
        "runs": {name: [] for name in arms},
    }
    names = list(arms)
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            with phase(f"{name}#{i}"):
                result = arms[name]()
            del result
            out["runs"][name].append(f"{name}#{i}")
    return out


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    quick = ctx["quick"]
    sizes: tuple[float, ...] = (1.0,) if quick else (1.0, 0.25)
    if not quick and mem_available() > 10 * GIB:
        sizes += (4.0,)  # wider layers, same keys: the per-tensor cost amortised over 4x the bytes
    rows: list[dict[str, Any]] = []
    memory_row: int | None = None
    raw_out: dict[str, Any] = {}
    peaks: dict[float, float] = {}
    for size in sizes:
        w = run_worker(
            "case_fingerprint",
            "measure",
            {
                "size_gib": size,
                "repeats": 3 if quick else 5,
                "diagnostics": size == 1.0 and not quick,
            },
        )
        res, phases = w["result"], w["phases"]
        nbytes = res["nbytes"]
        summary = {}
        for name, labels in res["runs"].items():
            recs = [phases[label] for label in labels]
            t = median([r["seconds"] for r in recs])
            summary[name] = {
                "seconds": t,
                "cpu_seconds": median([r["cpu_seconds"] for r in recs]),
                "gib_s": nbytes / GIB / t,
                "extra_rss_max": max(r["extra_rss"] for r in recs),
            }
        raw_out[f"{size:g}GiB"] = {
            "nbytes": nbytes,
            "tensors": res["tensors"],
            "same_hashes": res["same_hashes"],
            "summary": summary,
        }
        peaks[size] = summary["values=True"]["extra_rss_max"]
        if size == 0.25:
            continue
        ours, base = summary["values=True"], summary["raw xxh3"]
        ratio = ours["gib_s"] / base["gib_s"]
        diag = ""
        if "aminmax loop" in summary:
            diag = (
                "; whole-tensor statistics would run at: aminmax "
                f"{summary['aminmax loop']['gib_s']:.2f} GiB/s, "
                f"std_mean {summary['std_mean loop']['gib_s']:.2f} GiB/s"
            )
        rows.append(
            {
                "case": "6. fingerprints",
                "what": f"`schema_of(state_dict, values=True)` on {nbytes / GIB:.2f} GiB float32 "
                f"({res['tensors']} tensors): throughput vs raw xxh3-128 over the same bytes",
                "ours": f"{ours['gib_s']:.2f} GiB/s ({ours['seconds']:.2f} s)",
                "baseline": f"{base['gib_s']:.2f} GiB/s ({base['seconds']:.3f} s)",
                "ratio": ratio,
                "target": ">= 0.8x throughput",
                "met": ratio >= 0.8,
                "note": f"same xxh3 digests as raw: {res['same_hashes']}; CPU time (all "
                f"threads) {ours['cpu_seconds']:.3f} vs {base['cpu_seconds']:.3f} s: the "
                "statistics run beside the hash, on a second core" + diag,
            }
        )
        if size != 1.0:
            continue
        memory_row = len(rows)
        rows.append(
            {
                "case": "6. fingerprints",
                "what": "peak RSS above the model during `values=True`",
                "ours": f"+{ours['extra_rss_max'] / MIB:.1f} MiB",
                "baseline": f"+{base['extra_rss_max'] / MIB:.1f} MiB (raw xxh3)",
                "ratio": None,
                "target": "independent of model size",
                "met": None,
                "note": "",
            }
        )
    if 0.25 in peaks and memory_row is not None:
        grow = peaks[1.0] - peaks[0.25]
        rows[memory_row]["met"] = grow <= 16 * MIB
        rows[memory_row]["note"] = (
            f"at 0.25 GiB: +{peaks[0.25] / MIB:.1f} MiB "
            f"(growth {grow / MIB:+.1f} MiB for 4x the bytes)"
        )
    return {"rows": rows, "raw": raw_out}
