"""PEFT adapter folders as a checkpoint format, without peft: the folders are written here as
``PeftModel.save_pretrained`` writes them (``adapter_config.json`` beside
``adapter_model.safetensors`` or ``adapter_model.bin``, the adapter's keys without the
adapter name). Real peft, and its loading rules in the gate, are the conformance env's
(``conformance/test_peft_gate.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_torch_free import run_cli
from torch import nn

from pytest_statedict import CheckpointError, StateDictMismatch, assert_checkpoint_loads, schema_of
from pytest_statedict.cli import main
from pytest_statedict.formats import registry
from pytest_statedict.formats.peft_adapter import PEFT_ADAPTER
from pytest_statedict.peft_rules import is_peft_model

# What PEFT 0.21.2 writes for LoRA r=4 on the layers q and v of a small MLP, with its head
# in modules_to_save (fields that do not matter here left out).
CONFIG: dict[str, Any] = {
    "auto_mapping": {"base_model_class": "MLP", "parent_library": "__main__"},
    "base_model_name_or_path": None,
    "bias": "none",
    "lora_alpha": 8,
    "modules_to_save": ["head"],
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "r": 4,
    "target_modules": ["q", "v"],
    "task_type": None,
}
FRAMEWORK = (
    "PEFT adapter (LORA, r=4, targets q, v, modules_to_save head, base model MLP, peft 0.21.2)"
)


def adapter_state(r: int = 4) -> dict[str, torch.Tensor]:
    prefix = "base_model.model"
    state = {}
    for layer in ("q", "v"):
        state[f"{prefix}.{layer}.lora_A.weight"] = torch.randn(r, 8)
        state[f"{prefix}.{layer}.lora_B.weight"] = torch.randn(8, r)
    state[f"{prefix}.head.weight"] = torch.randn(3, 8)
    state[f"{prefix}.head.bias"] = torch.randn(3)
    return state


def adapter_folder(
    folder: Path, *, config: Any = None, weights: str = "safetensors", raw_config: str | None = None
) -> Path:
    """``folder`` as ``save_pretrained`` leaves it (``weights="bin"``: safe_serialization=False)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = raw_config if raw_config is not None else json.dumps(config or CONFIG, indent=2)
    (folder / "adapter_config.json").write_text(text)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n")
    if weights == "safetensors":
        save_file(adapter_state(), folder / "adapter_model.safetensors", {"format": "pt"})
    elif weights == "bin":
        torch.save(adapter_state(), folder / "adapter_model.bin")
    return folder


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_an_adapter_folder_is_recognised_with_its_config(tmp_path: Path, weights: str) -> None:
    folder = adapter_folder(tmp_path / "adapter", weights=weights)
    for path in (folder, folder / "adapter_config.json"):
        fmt, _ = registry.detect(path)
        assert fmt.name == PEFT_ADAPTER
        schema = schema_of(path)
        assert sorted(t.key for t in schema) == sorted(adapter_state())
        assert schema.framework == FRAMEWORK
        assert schema.source == str(folder)
        assert schema.read_as is not None
        assert schema.read_as.startswith(f"{PEFT_ADAPTER}: adapter_config.json, and adapter_model")


def test_show_names_the_framework_without_torch(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "adapter")
    shown = run_cli("show", str(folder))
    assert shown.returncode == 0, shown.stderr
    assert "torch imported: False" in shown.stderr
    lines = shown.stdout.splitlines()
    assert f"framework: {FRAMEWORK}" in lines
    assert any(line.split()[:3] == ["base_model.model.q.lora_A.weight", "4x8", "float32"]
               for line in lines)  # fmt: skip
    assert "6 keys, 6 tensors, 155 elements, 620 B" in lines


def test_diff_of_two_adapters_shows_the_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = adapter_folder(tmp_path / "old")
    new = tmp_path / "new"
    adapter_folder(new, config={**CONFIG, "r": 8}, weights="none")
    save_file(adapter_state(r=8), new / "adapter_model.safetensors")
    assert main(["diff", str(old), str(old)]) == 0
    capsys.readouterr()
    assert main(["diff", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "base_model.model.q.lora_A.weight" in out and "[4, 8]" in out and "[8, 8]" in out


def test_what_the_config_says_is_described(tmp_path: Path) -> None:
    config = {
        "peft_type": "IA3",
        "target_modules": ".*(k_proj|v_proj)$",
        "base_model_name_or_path": "org/tiny-model",
    }
    folder = adapter_folder(tmp_path / "ia3", config=config)
    assert schema_of(folder).framework == (
        "PEFT adapter (IA3, targets matching .*(k_proj|v_proj)$, base model org/tiny-model)"
    )
    # PEFT writes target_modules in the order of a set: shown sorted, so that show is stable
    names = [f"{kind}_proj{i}" for i in range(4) for kind in "qkv"]
    many = {**CONFIG, "target_modules": names, "modules_to_save": None}
    folder = adapter_folder(tmp_path / "many", config=many)
    assert schema_of(folder).framework == (
        "PEFT adapter (LORA, r=4, targets k_proj0, k_proj1, k_proj2, k_proj3, q_proj0, "
        "q_proj1, q_proj2, q_proj3 and 4 more, base model MLP, peft 0.21.2)"
    )


def test_a_config_cannot_write_to_the_terminal(tmp_path: Path) -> None:
    hostile = {**CONFIG, "base_model_name_or_path": "\x1b[2J\x1b[31mowned" + "x" * 500}
    framework = schema_of(adapter_folder(tmp_path / "a", config=hostile)).framework
    assert framework is not None
    assert "\x1b" not in framework and "\\x1b[2J" in framework
    assert len(framework) < 250


BAD_CONFIGS = {
    "not JSON": ("{'peft_type': 'LORA'}", "the adapter config is not valid JSON"),
    "an array": ("[]", "a PEFT adapter config is a JSON object; this one is a JSON array"),
    "a string": ('"LORA"', "a PEFT adapter config is a JSON object; this one is a string"),
    "no peft_type": (
        json.dumps({"r": 4}),
        'it has no "peft_type" (PEFT writes one, e.g. "LORA"): not the config of an adapter '
        "PEFT saved",
    ),
    "a numeric peft_type": (
        json.dumps({"peft_type": 3}),
        '"peft_type" is a number, not the name of a PEFT method, e.g. "LORA"',
    ),
    "a text rank": (
        json.dumps({**CONFIG, "r": "8"}),
        '"r" is a string, not a positive integer (the adapter\'s rank)',
    ),
    "a target that is no name": (
        json.dumps({**CONFIG, "target_modules": [1, 2]}),
        '"target_modules" is a JSON array, not a list of module names',
    ),
    "empty": ("", "the file is empty"),
    "nested too deep": ('{"a": ' * 100 + "1" + "}" * 100, "nests deeper than 64 levels"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_an_error_naming_it(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text, problem = BAD_CONFIGS[case]
    folder = adapter_folder(tmp_path / "adapter", raw_config=text)
    config = folder / "adapter_config.json"
    with pytest.raises(CheckpointError) as info:
        schema_of(folder)
    assert info.value.path == str(config)
    assert problem in info.value.problem
    assert main(["show", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {config}: " in err and problem in err
    assert "Traceback" not in err


def test_an_adapter_without_its_weights_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "adapter", weights="none")
    with pytest.raises(CheckpointError) as info:
        schema_of(folder)
    assert info.value.path == str(folder)
    assert info.value.problem == (
        "is a PEFT adapter folder (adapter_config.json) without its weights: it holds neither "
        "adapter_model.safetensors nor adapter_model.bin"
    )
    with pytest.raises(CheckpointError, match="without its weights"):
        assert_checkpoint_loads(nn.Linear(2, 2), folder)


def test_a_truncated_weights_file_is_named(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError) as info:
        schema_of(folder)
    assert info.value.path == str(weights)


def test_an_adapter_has_no_parts_and_is_never_loaded_whole(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="a PEFT adapter has no parts to choose from"):
        schema_of(folder, part="model")
    fmt, where = registry.detect(folder)
    with pytest.raises(CheckpointError, match="name its weights file"):
        fmt.load(where, map_location=None, weights_only=True, mmap=True)


def test_a_folder_without_an_adapter_config_is_not_an_adapter(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "weights-only")
    (folder / "adapter_config.json").unlink()
    fmt, where = registry.detect(folder)
    assert fmt.name == "safetensors" and where.name == "adapter_model.safetensors"
    assert schema_of(folder).framework is None


def test_a_trainer_checkpoint_of_a_peft_model_is_left_to_the_trainer_folder(
    tmp_path: Path,
) -> None:
    """Trainer saves the adapter beside its own state: the folder is a Trainer checkpoint,
    whose model part is the adapter (not an adapter that hides an optimizer)."""
    folder = adapter_folder(tmp_path / "checkpoint-2")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    fmt, _ = registry.detect(folder)
    assert fmt.name != PEFT_ADAPTER
    assert sorted(t.key for t in schema_of(folder)) == sorted(adapter_state())


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)


def test_a_model_that_is_no_peft_model_keeps_torchs_rules(tmp_path: Path) -> None:
    folder = adapter_folder(tmp_path / "adapter")
    assert not is_peft_model(MLP())
    with pytest.raises(StateDictMismatch, match=r"with load_state_dict\(strict=True\):"):
        assert_checkpoint_loads(MLP(), folder)
    with pytest.raises(ValueError, match=r"rules='peft'\): MLP is not a peft PeftModel"):
        assert_checkpoint_loads(MLP(), folder, rules="peft")
    with pytest.raises(ValueError, match="'auto', 'torch', 'transformers', 'peft'"):
        assert_checkpoint_loads(MLP(), folder, rules="lora")
    with pytest.raises(ValueError, match=r"adapter_name='default'\): MLP is not a peft"):
        assert_checkpoint_loads(MLP(), folder, adapter_name="default")


def test_peft_is_imported_only_for_a_class_from_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    imported = []
    real_import = __import__

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", spy)
    assert not is_peft_model(MLP())
    assert "peft" not in imported
    lookalike = type("PeftModel", (nn.Module,), {"__module__": "peft.peft_model"})
    assert not is_peft_model(lookalike())  # peft asked, and it is no PeftModel (or absent)
    assert "peft" in imported


def test_a_trainer_checkpoint_of_a_named_adapter_reads_its_subfolder(tmp_path: Path) -> None:
    """A PeftModel whose adapter has a name: Trainer writes ``checkpoint-N/<name>/`` with
    the adapter, beside the optimizer, as ``trainer.train(resume_from_checkpoint=...)``
    reads it back."""
    folder = tmp_path / "checkpoint-1"
    adapter_folder(folder / "lora1")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    weights = [torch.nn.Parameter(t) for t in adapter_state().values()]
    torch.save(torch.optim.AdamW(weights).state_dict(), folder / "optimizer.pt")
    schema = schema_of(folder)
    assert sorted(t.key for t in schema) == sorted(adapter_state())
    assert schema.optimizer is not None
    assert schema.framework is not None and "; PEFT adapter (LORA, r=4" in schema.framework


def test_a_stray_adapter_file_without_its_config_is_not_the_model(tmp_path: Path) -> None:
    """Without adapter_config.json, a Trainer folder's model is model.safetensors, as
    Trainer loads it, whatever other weights file lies beside it."""
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    save_file(adapter_state(), folder / "adapter_model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert [t.key for t in schema_of(folder)] == ["w"]
