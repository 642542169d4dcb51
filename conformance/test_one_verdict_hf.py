"""One verdict for a transformers model: every surface prints from_pretrained's counts.

The one-verdict table (tests/test_one_verdict.py) runs where transformers is not
installed; these are its transformers rows. A GPT-2 saved with ``save_pretrained`` (tied
``lm_head`` left out, as transformers writes it) is judged against today's model by the
comparison, the gate, the release gate and ``statedict diff --model``: a real refactor
(one more layer; a renamed attention projection) must get the same verdict line from
each, with the counts of ``from_pretrained`` (the loader that decides), never the strict
``load_state_dict`` counts of the layouts; and from_pretrained itself is the oracle.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the conformance env `models` has it)"
)

from pytest_statedict import (  # noqa: E402
    StateDictMismatch,
    assert_checkpoint_loads,
    assert_state_dict_matches,
)
from pytest_statedict.cli import main as statedict_main  # noqa: E402
from pytest_statedict.releases import Release, ReleaseGate, record_into  # noqa: E402

MODEL_LINE = re.compile(r"an old checkpoint still loads with .*")


def gpt2(layers: int = 2) -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=64, n_inner=48
    )
    return transformers.GPT2LMHeadModel(config)


def build_deeper() -> Any:
    return gpt2(layers=3)


def _line(check: Any) -> str | None:
    try:
        check()
    except StateDictMismatch as exc:
        found = MODEL_LINE.search(str(exc))
        assert found is not None, str(exc)
        return found.group(0)
    return None


def test_one_verdict_with_from_pretrained_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "v1"
    gpt2().save_pretrained(folder)
    weights = folder / "model.safetensors"
    today = build_deeper()

    # the oracle: from_pretrained loads it, with the new layer's keys missing
    _, info = transformers.GPT2LMHeadModel.from_pretrained(
        folder, config=today.config, output_loading_info=True
    )
    missing = [k for k in info["missing_keys"] if ".h.2." in k]
    assert missing and not info["unexpected_keys"]

    lines = {
        "comparison": _line(lambda: assert_state_dict_matches(today, str(weights))),
        "gate": _line(lambda: assert_checkpoint_loads(today, folder)),
    }
    record_into(tmp_path / "releases", "v1", weights, base=tmp_path, part=None)
    gate = ReleaseGate(lambda: today, optimizer=None, directory=str(tmp_path / "releases"))
    lines["release"] = _line(lambda: gate.check(Release("v1", tmp_path / "releases" / "v1.json")))
    monkeypatch.setitem(sys.modules, "statedict_hf_today", sys.modules[__name__])
    code = statedict_main(
        ["diff", str(weights), str(weights), "--model", "statedict_hf_today:build_deeper"]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    found = MODEL_LINE.search(out)
    lines["diff"] = found.group(0) if found else None

    assert len(set(lines.values())) == 1, "\n".join(f"{k}: {v}" for k, v in lines.items())
    line = lines["gate"]
    assert line is not None and "from_pretrained" in line, lines
    # from_pretrained's own count of missing keys, not the layouts' strict-load counts
    assert f"NO ({len(info['missing_keys'])} missing key" in line, (line, info)
