"""What real models put in their state: non-persistent buffers, module versions that are
strings, and whole-model tolerant comparisons.

The models here copy the layouts of transformers models (BERT's non-persistent
``position_ids``, a rotary embedding's ``inv_freq``, Phi-3's ``_version = "0.0.5"``) in a few
lines of torch, so that the tests need no model library.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import match_lines
from torch import nn

from pytest_statedict import (
    Schema,
    StateDictMismatch,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    schema_of,
)
from pytest_statedict.cli import main

ENCODER_SOURCE = '''
import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class Encoder(nn.Module):
    """BERT's embeddings and a Llama-style rotary embedding: three non-persistent buffers."""

    def __init__(self, extra=False):
        super().__init__()
        self.word_embeddings = nn.Embedding(10, 4)
        self.register_buffer("position_ids", torch.arange(8).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, 8, dtype=torch.long),
                             persistent=False)
        self.rotary = Rotary()
        self.norm = nn.LayerNorm(4)
        if extra:
            self.head = nn.Linear(4, 2)
'''
namespace: dict[str, Any] = {}
exec(compile(ENCODER_SOURCE, "<encoder>", "exec"), namespace)
Encoder = namespace["Encoder"]
NON_PERSISTENT = ["position_ids", "token_type_ids", "rotary.inv_freq"]


# ---- non-persistent buffers ----------------------------------------------------------------


def test_a_model_matches_its_own_file_whatever_the_side(tmp_path: Path) -> None:
    model = Encoder()
    assert sorted(schema_of(model).non_persistent_buffers) == sorted(NON_PERSISTENT)
    path = tmp_path / "encoder.pt"
    torch.save(model.state_dict(), path)
    assert_state_dict_matches(model, path)
    assert_state_dict_matches(path, model)
    assert_state_dict_matches(model, model.state_dict())
    assert_state_dict_matches(model.state_dict(), model)
    assert_checkpoint_loads(model, path)


def test_snapshots_of_a_model_and_of_its_file_match_both(tmp_path: Path) -> None:
    model = Encoder()
    path = tmp_path / "encoder.pt"
    torch.save(model.state_dict(), path)
    of_model, of_file = tmp_path / "model.json", tmp_path / "file.json"
    of_model.write_text(schema_of(model).to_json())
    of_file.write_text(schema_of(path).to_json())
    for snapshot in (of_model, of_file):
        assert_state_dict_matches(model, snapshot)
        assert_state_dict_matches(path, snapshot)
        assert main(["diff", str(snapshot), str(path)]) == 0
    assert main(["diff", str(of_file), str(of_model)]) == 0


def test_non_persistent_buffers_still_differ_between_two_models() -> None:
    """Both sides know their non-persistent buffers: a change there is still reported."""
    changed = Encoder()
    changed.rotary.register_buffer("inv_freq", torch.ones(2))  # now persistent: saved
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(changed, Encoder())
    message = str(info.value)
    assert "+ rotary.inv_freq  buffer float32[2]" in message
    assert "non-persistent buffers (not in the state_dict) (1):\n    - rotary.inv_freq" in message


def test_a_real_difference_against_a_file_is_reported_without_the_buffers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "encoder.pt"
    torch.save(Encoder().state_dict(), path)
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(Encoder(extra=True), path)
    message = str(info.value)
    assert "+ head.weight  parameter float32[2, 4]" in message
    assert "non-persistent" not in message


def test_the_snapshot_workflow_with_non_persistent_buffers(pytester: pytest.Pytester) -> None:
    """A snapshot recorded from the model is checked against its saved file, and back."""
    pytester.makepyfile(encoder=ENCODER_SOURCE)
    pytester.makepyfile(
        test_encoder="""
        import os
        import torch
        from encoder import Encoder

        def test_model(statedict_snapshot, tmp_path):
            model = Encoder(extra="EXTRA" in os.environ)
            torch.save(model.state_dict(), tmp_path / "e.pt")
            source = tmp_path / "e.pt" if "FROM_FILE" in os.environ else model
            statedict_snapshot.assert_match(source)
        """
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    text = (pytester.path / "__statedict__/test_encoder/test_model/0.json").read_text()
    assert '"non_persistent_buffers": ["position_ids", "token_type_ids", "rotary.inv_freq"]' in text
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FROM_FILE", "1")
        pytester.runpytest().assert_outcomes(passed=1)  # the file against the model's snapshot
        pytester.runpytest("--statedict-update").assert_outcomes(passed=1)  # file's snapshot
        assert (
            '"non_persistent_buffers"'
            not in (pytester.path / "__statedict__/test_encoder/test_model/0.json").read_text()
        )
    pytester.runpytest().assert_outcomes(passed=1)  # the model against the file's snapshot
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EXTRA", "1")
        result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result, ["E         added (2):", "E           + head.weight  parameter float32[2, 4]"]
    )
    result.stdout.no_fnmatch_line("*non-persistent*")


# ---- module versions as torch keeps them -------------------------------------------------


PHI_SOURCE = """
import torch
from torch import nn


class Phi3Attention(nn.Module):
    _version = "0.0.5"  # as transformers' Phi-3 sets it
    versions_loaded = []

    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(4, 12)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        # a hook that reads the version, as a conversion hook does
        Phi3Attention.versions_loaded.append(local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class Phi3(nn.Module):
    def __init__(self, layers=1):
        super().__init__()
        self.layers = nn.ModuleList(Phi3Attention() for _ in range(layers))
        self.norm = nn.LayerNorm(4)
"""
exec(compile(PHI_SOURCE, "<phi>", "exec"), namespace)
Phi3 = namespace["Phi3"]


class Versioned(nn.Module):
    """Every JSON scalar torch may meet as a ``_version``, and one that is none."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Linear(2, 2)
        self.ratio = nn.Linear(2, 2)
        self.unset = nn.Linear(2, 2)
        self.flag = nn.Linear(2, 2)
        self.pair = nn.Linear(2, 2)
        self.words._version = "0.0.5"  # type: ignore[assignment]
        self.ratio._version = 2.5  # type: ignore[assignment]
        self.unset._version = None  # type: ignore[assignment]
        self.flag._version = True  # type: ignore[assignment]
        self.pair._version = (1, 2)  # type: ignore[assignment]


def test_versions_are_kept_as_torch_keeps_them() -> None:
    schema = schema_of(Versioned())
    assert schema.versions == {
        "words": "0.0.5", "ratio": 2.5, "unset": None, "flag": True, "pair": "(1, 2)",
    }  # fmt: skip
    text = schema.to_json()
    assert '"versions": {"words": "0.0.5", "ratio": 2.5, "unset": null, "flag": true, ' in text
    assert Schema.from_json(text) == schema  # the writer and the parser agree
    assert Schema.from_json(text).to_json() == text


def test_a_snapshot_with_a_string_version_reads_back_and_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = tmp_path / "phi3.json"
    snapshot.write_text(schema_of(Phi3()).to_json())
    assert schema_of(snapshot).versions == {"layers.0": "0.0.5"}
    assert main(["show", str(snapshot)]) == 0
    assert "layers.0.qkv_proj.weight" in capsys.readouterr().out
    loaded = namespace["Phi3Attention"].versions_loaded
    loaded.clear()
    assert_checkpoint_loads(Phi3(), snapshot)
    assert loaded == ["0.0.5"]  # the model's hook sees the version the snapshot recorded
    with pytest.raises(StateDictMismatch, match=r"\+ layers\.1\.qkv_proj\.weight"):
        assert_state_dict_matches(Phi3(layers=2), snapshot)


def test_a_changed_string_version_is_a_named_difference() -> None:
    newer = Phi3()
    newer.layers[0]._version = "0.0.6"  # type: ignore[assignment]
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(newer, Phi3())
    assert "layers.0: version 0.0.5 -> 0.0.6" in str(info.value)


def test_the_snapshot_workflow_with_a_string_version(pytester: pytest.Pytester) -> None:
    """Once anything changes, the diff, not "versions must be integers"."""
    pytester.makepyfile(phi=PHI_SOURCE)
    pytester.makepyfile(
        test_phi="""
        import os
        from phi import Phi3

        def test_model(statedict_snapshot):
            statedict_snapshot.assert_match(Phi3(layers=int(os.environ.get("LAYERS", 1))))
        """
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    snapshot = pytester.path / "__statedict__/test_phi/test_model/0.json"
    assert '"versions": {"layers.0": "0.0.5"}' in snapshot.read_text()
    pytester.runpytest().assert_outcomes(passed=1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LAYERS", "2")
        result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        [
            "E         added (2):",
            "E           + layers.1.qkv_proj.weight  parameter float32[12, 4]",
            "E         module versions (_metadata; *) (1):",
            "E           layers.1: version 1 -> 0.0.5",
        ],
    )
    result = pytester.run(sys.executable, "-m", "pytest_statedict", "show", str(snapshot))
    assert result.ret == 0
    result.stdout.fnmatch_lines(["layers.0.qkv_proj.weight *12x4*"])


def test_snapshots_with_integer_versions_still_read() -> None:
    """The format did not change: a snapshot from before reads back equal."""
    text = schema_of(nn.Sequential(nn.BatchNorm1d(3))).to_json()
    assert '"versions": {"0": 2}' in text
    assert Schema.from_json(text).versions == {"0": 2}


# ---- tolerant comparisons of a whole model ---------------------------------------------------


def drifted(layers: int = 16, changed: int = 9) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A model whose every tensor moved a little outside the tolerance, one of them a lot."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
        model[changed].weight[0, 0] += 5
    return model, before


def test_values_furthest_outside_the_tolerance_come_first() -> None:
    model, before = drifted()
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(model, before, values=True, rtol=1e-4, atol=1e-6)
    message = str(info.value)
    lines = message.splitlines()
    start = lines.index("  changed (32):")
    assert lines[start + 1].startswith("    ~ 9.weight: values rtol=0.0001, atol=1e-06 -> ")
    times = [
        float(re.search(r"-> (\S+)x the tolerance", line).group(1))  # type: ignore[union-attr]
        for line in lines[start + 1 : start + 13]
    ]
    assert times == sorted(times, reverse=True) and times[0] > 1000 * times[1]
    assert "... and 20 more (-vv shows all)" in message
    assert "note: values outside rtol/atol are listed furthest first" in message


def test_other_changes_come_before_values() -> None:
    model, before = drifted(layers=3, changed=2)
    before["0.weight"] = before["0.weight"].double()
    with pytest.raises(StateDictMismatch) as info:
        assert_state_dict_matches(model, before, values=True, rtol=1e-4, atol=1e-6)
    changed = [line for line in str(info.value).splitlines() if line.startswith("    ~ ")]
    assert changed[0] == "    ~ 0.weight: dtype float64 -> float32"
    assert changed[1].startswith("    ~ 2.weight: values")


def test_tolerant_snapshot_check_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_drift="""
        import os
        import torch
        from torch import nn

        def test_model(statedict_snapshot):
            torch.manual_seed(0)
            model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(16)])
            if "DRIFT" in os.environ:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1.001)
                    model[11].bias[1] -= 3
            statedict_snapshot.assert_match(model, values=True, rtol=1e-4, atol=1e-6)
        """
    )
    pytester.runpytest("--statedict-update").assert_outcomes(passed=1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DRIFT", "1")
        result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    match_lines(
        result,
        [
            "E         changed (32):",
            "E           ~ 11.bias: values rtol=0.0001, atol=1e-06 -> *x the tolerance: min *",
            "E           ... and 20 more (-vv shows all)",
            "E         note: values outside rtol/atol are listed furthest first*",
        ],
    )
