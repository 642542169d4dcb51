"""Case 7: the round-trip's cost on small real models (issue 15's target).

For each model of a family of small real architectures (timm, torchvision, transformers;
random weights, never downloaded), with an AdamW optimizer stepped once, one fresh worker
process times these arms, interleaved, ``REPEATS`` times each, and takes medians:

* ``roundtrip``: ``roundtrip(model, optimizer)``, the default (torch format, resume check);
* ``roundtrip, no resume``: the same with ``check_resume=False``;
* ``roundtrip, safetensors``: ``format="safetensors"`` (resume check included);
* the plain loop: ``torch.save({"model": state_dict, "optimizer": ...})``,
  ``torch.load(weights_only=True)``, a fresh model built the normal way and a fresh
  optimizer, ``load_state_dict`` for both, and an exact compare (dtype, shape,
  ``torch.equal``) of every tensor of the model's and the optimizer's state dicts;
* the loop plus one optimizer step (of the reloaded model, from the same gradients): what
  a hand-written resume check costs at the least;
* the safetensors loop: ``safetensors.torch.save_model`` / ``load_model`` (which handle
  tied weights) for the model, ``torch.save`` for the optimizer, the same compare.

Ratios are per model, then the median (and max) per family. Needs timm, torchvision and
transformers (the ``models`` extra: torch 2.14.1), like the conformance sweep.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import median, run_worker

# (family, name): small real models, from ~1.5M to ~12M parameters.
MODELS = (
    ("timm", "resnet18"),
    ("timm", "efficientnet_b0"),
    ("timm", "vit_tiny_patch16_224"),
    ("torchvision", "resnet18"),
    ("torchvision", "mobilenet_v3_small"),
    ("torchvision", "shufflenet_v2_x1_0"),
    ("transformers", "GPT2LMHeadModel"),
    ("transformers", "BertForMaskedLM"),
    ("transformers", "LlamaForCausalLM"),
)
REPEATS = 3
# transformers configs: small, but not the sweep's toy size (32 wide), so that tensors,
# not per-key overheads, are what is measured: ~4-10M parameters
HF_SIZES = {
    "vocab_size": 8000,
    "hidden_size": 256,
    "n_embd": 256,
    "d_model": 256,
    "num_hidden_layers": 4,
    "n_layer": 4,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 1024,
    "d_ff": 1024,
    "d_kv": 64,
    "head_dim": 64,
    "max_position_embeddings": 512,
    "n_positions": 512,
}


def build(family: str, name: str) -> Any:
    if family == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    if family == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    import transformers

    config_cls = getattr(transformers, name).config_class
    default = config_cls()
    kwargs = {
        k: v
        for k, v in HF_SIZES.items()
        if hasattr(default, k) and not isinstance(getattr(config_cls, k, None), property)
    }
    kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0)
    return getattr(transformers, name)(config_cls(**kwargs))


def make_optimizer(model: Any) -> Any:
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def set_gradients(model: Any, seed: int = 1) -> None:
    """Fixed gradients, from a seed: the same for the original and a reloaded model."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def _equal(a: Any, b: Any) -> bool:
    """Exact compare of two (nested) state dicts: dtype, shape and torch.equal per tensor."""
    import torch

    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def plain_loop(
    family: str, name: str, model: Any, optimizer: Any, folder: Path, fmt: str, step: bool
) -> bool:
    """What a user writes by hand: save, load, rebuild, load_state_dict, compare (+ a step)."""
    import torch

    path = folder / ("checkpoint.pt" if fmt == "torch" else "model.safetensors")
    if fmt == "torch":
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        loaded = torch.load(path, weights_only=True)
    else:
        import safetensors.torch

        safetensors.torch.save_model(model, str(path))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    fresh = build(family, name)
    fresh_optimizer = make_optimizer(fresh)
    if fmt == "torch":
        fresh.load_state_dict(loaded["model"], strict=True)
        fresh_optimizer.load_state_dict(loaded["optimizer"])
    else:
        safetensors.torch.load_model(fresh, str(path), strict=True)
        fresh_optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    ok = _equal(model.state_dict(), fresh.state_dict()) and _equal(
        optimizer.state_dict(), fresh_optimizer.state_dict()
    )
    if step:
        set_gradients(fresh, seed=2)
        fresh_optimizer.step()
    return ok


def measure(family: str, name: str, repeats: int, warmup: bool = True) -> dict[str, Any]:
    import torch

    from pytest_statedict import roundtrip

    torch.manual_seed(0)
    model = build(family, name).eval()
    optimizer = make_optimizer(model)
    set_gradients(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    folder = Path(tempfile.mkdtemp(prefix="statedict-bench-models-"))

    def ours(**opts: Any) -> Any:
        def run() -> bool:
            result = roundtrip(model, optimizer, directory=folder, **opts)
            if not result.ok:
                raise RuntimeError(str(result)[:500])
            return True

        return run

    def loop(fmt: str, step: bool) -> Any:
        return lambda: plain_loop(family, name, model, optimizer, folder, fmt, step)

    arms = {
        "roundtrip": ours(),
        "roundtrip_no_resume": ours(check_resume=False),
        "roundtrip_safetensors": ours(format="safetensors"),
        "loop": loop("torch", False),
        "loop_step": loop("torch", True),
        "loop_safetensors": loop("safetensors", False),
        "loop_safetensors_step": loop("safetensors", True),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    errors: dict[str, str] = {}
    try:
        first = 0 if warmup else 1  # round 0 warms up and is not counted
        for i in range(first, repeats + 1):
            order = list(arms) if i % 2 == 0 else list(arms)[::-1]
            for arm in order:
                if arm in errors:
                    continue
                t = time.perf_counter()
                try:
                    exact = arms[arm]()
                except Exception as exc:
                    errors[arm] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    continue
                if not exact:
                    errors[arm] = "the loop's compare found a difference"
                if i:
                    times[arm].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "params": params,
        "keys": len(model.state_dict()),
        "times": times,
        "medians": {k: median(v) for k, v in times.items() if v},
        "errors": errors,
    }


def run(ctx: dict[str, Any]) -> dict[str, Any]:
    import importlib.util

    missing = [
        m for m in ("timm", "torchvision", "transformers") if not importlib.util.find_spec(m)
    ]
    if missing:
        return {
            "rows": [
                {
                    "case": "7. round-trip, real models",
                    "what": "skipped: needs the `models` extra (torch 2.14.1)",
                    "ours": "",
                    "baseline": "",
                    "ratio": None,
                    "target": "",
                    "met": None,
                    "note": f"not importable here: {', '.join(missing)}",
                }
            ],
            "raw": {"skipped": missing},
        }
    repeats = 1 if ctx["quick"] else REPEATS
    per_model: dict[str, Any] = {}
    for family, name in MODELS:
        try:
            w = run_worker(
                "case_roundtrip_models",
                "measure",
                {"family": family, "name": name, "repeats": repeats, "warmup": not ctx["quick"]},
                timeout=900,
            )
            per_model[f"{family}/{name}"] = {"family": family, **w["result"]}
        except Exception as exc:
            per_model[f"{family}/{name}"] = {"family": family, "error": str(exc)[-300:]}
        got = per_model[f"{family}/{name}"]
        m = got.get("medians", {})
        if "roundtrip" in m and "loop" in m:
            print(
                f"    {family}/{name}: {got['params'] / 1e6:.1f}M params, roundtrip "
                f"{m['roundtrip'] * 1e3:.0f} ms, loop {m['loop'] * 1e3:.0f} ms, "
                f"loop+step {m['loop_step'] * 1e3:.0f} ms",
                flush=True,
            )
        else:
            print(f"    {family}/{name}: {got.get('errors') or got.get('error')}", flush=True)
    rows = []
    comparisons = (
        ("roundtrip", "loop", "default `roundtrip` vs the plain loop", None),
        (
            "roundtrip",
            "loop_step",
            "default `roundtrip` vs the plain loop + one optimizer step",
            "<= 1.3x median, never > 3x",
        ),
        ("roundtrip_no_resume", "loop", "`roundtrip(check_resume=False)` vs the plain loop", None),
        (
            "roundtrip_safetensors",
            "loop_safetensors_step",
            "`roundtrip(format='safetensors')` vs the safetensors loop + one step",
            None,
        ),
        (
            "roundtrip_safetensors",
            "loop_safetensors",
            "`roundtrip(format='safetensors')` vs the safetensors loop",
            None,
        ),
    )
    families = list(dict.fromkeys(f for f, _ in MODELS))
    for ours, base, what, target in comparisons:
        for family in [*families, "all"]:
            ratios = {
                key: r["medians"][ours] / r["medians"][base]
                for key, r in per_model.items()
                if (family == "all" or r["family"] == family)
                and ours in r.get("medians", {})
                and base in r.get("medians", {})
            }
            failed = [
                k
                for k, r in per_model.items()
                if (family == "all" or r["family"] == family) and (ours in r.get("errors", {}))
            ]
            if not ratios:
                continue
            med, worst = median(list(ratios.values())), max(ratios.values())
            ours_t = median([per_model[k]["medians"][ours] for k in ratios])
            base_t = median([per_model[k]["medians"][base] for k in ratios])
            rows.append(
                {
                    "case": "7. round-trip, real models",
                    "what": f"{family}: {what}",
                    "ours": f"{ours_t * 1e3:.0f} ms",
                    "baseline": f"{base_t * 1e3:.0f} ms",
                    "ratio": med,
                    "target": target or "",
                    "met": (med <= 1.3 and worst <= 3) if target else None,
                    "note": f"median of {len(ratios)} models' ratios, max {worst:.2f}x ("
                    f"{max(ratios, key=ratios.__getitem__)})"
                    + (f"; FAILED on {', '.join(failed)}" if failed else ""),
                }
            )
    return {"rows": rows, "raw": {"models": per_model, "repeats": repeats}}
