"""Case 10: pairing likely renames when a refactor renames every key (``layers.N`` -> ``blocks.N``).

Ours: ``diff_schemas`` of a schema against the same layout with every key renamed (what
every failing report and ``statedict diff`` compute: the pairing is in it), at 2,000 and
10,000 keys (half 2-D weights, half 1-D biases, in modules of two). Baseline: the same
``diff_schemas`` of the schema against itself renamed by nothing (no key removed or added:
everything but the pairing). For information, the pairing the plugin had before issue 24
(difflib's ratio over every removed x added pair of one shape), at 500 and 1,000 keys:
it grows with the square of the keys.
"""

from __future__ import annotations

import difflib
from typing import Any

from harness import alternate, median, run_worker

SIZES = (2_000, 10_000)
OLD_SIZES = (500, 1_000)


def _schemas(keys: int) -> tuple[Any, Any]:
    from pytest_statedict.schema import Schema
    from pytest_statedict.schema_entries import TensorEntry

    shapes = {"weight": (64, 64), "bias": (64,)}
    old = tuple(
        TensorEntry(f"layers.{i}.{m}.{leaf}", "parameter", shape, "float32", True)
        for i in range(keys // 4)
        for m in ("attn", "mlp")
        for leaf, shape in shapes.items()
    )
    new = tuple(
        TensorEntry(e.key.replace("layers.", "blocks.", 1), "parameter", e.shape, e.dtype, True)
        for e in old
    )
    return Schema(old), Schema(new)


def _difflib_pairing(removed: list[Any], added: list[Any]) -> list[tuple[str, str]]:
    """The pairing before issue 24, for scale: most similar names first, over all pairs."""
    candidates = sorted(
        (-difflib.SequenceMatcher(None, r.key, a.key).ratio(), i, j)
        for i, r in enumerate(removed)
        for j, a in enumerate(added)
        if (r.shape, r.dtype) == (a.shape, a.dtype)
    )
    used_r: set[int] = set()
    used_a: set[int] = set()
    pairs = []
    for _, i, j in candidates:
        if i not in used_r and j not in used_a:
            used_r.add(i)
            used_a.add(j)
            pairs.append((removed[i].key, added[j].key))
    return pairs


def measure(repeats: int) -> dict[str, Any]:
    from pytest_statedict.compare import diff_schemas

    medians: dict[str, float] = {}
    for keys in SIZES:
        old, new = _schemas(keys)
        diff = diff_schemas(old, new)
        assert len(diff.renames) == keys and not diff.ambiguous_renames
        times = alternate(
            {"renamed": lambda o=old, n=new: diff_schemas(o, n),
             "same": lambda o=old: diff_schemas(o, o)},
            repeats,
            warmup=1,
        )  # fmt: skip
        medians[f"{keys} renamed"] = median(times["renamed"])
        medians[f"{keys} same"] = median(times["same"])
    for keys in OLD_SIZES:
        old, new = _schemas(keys)
        times = alternate(
            {"difflib": lambda o=old, n=new: _difflib_pairing(list(o), list(n))}, 1, warmup=0
        )
        medians[f"{keys} difflib"] = median(times["difflib"])
    return {"medians": medians}


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    res = run_worker("case_renames", "measure", {"repeats": 3 if ctx["quick"] else 7})["result"]
    m = res["medians"]
    rows = []
    for keys in SIZES:
        ours, base = m[f"{keys} renamed"], m[f"{keys} same"]
        rows.append(
            {
                "case": "10. rename pairing",
                "what": f"`diff_schemas` with all {keys:,} keys renamed (`layers.N` -> "
                "`blocks.N`), vs the same diff with nothing renamed",
                "ours": f"{ours * 1000:.0f} ms",
                "baseline": f"{base * 1000:.0f} ms",
                "ratio": ours / base,
                "target": "near-linear: 10,000 keys in ~1 s",
                "met": ours < 1.5,
                "note": "every key paired right, none ambiguous",
            }
        )
    for keys in OLD_SIZES:
        rows.append(
            {
                "case": "10. rename pairing",
                "what": f"for scale: the pairing before issue 24 (difflib over all pairs), "
                f"{keys:,} renamed keys",
                "ours": f"{m[f'{keys} difflib'] * 1000:.0f} ms",
                "baseline": "",
                "ratio": None,
                "target": "(info)",
                "met": None,
                "note": "quadratic in the keys of one shape",
            }
        )
    return {"rows": rows, "raw": res}
