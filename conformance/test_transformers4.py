"""transformers 4.x's checkpoint conversion mappings: the gate loads as ``from_pretrained`` does.

In transformers 4.x (up to 4.57) a vision-language model (Llava, Qwen2-VL, ...) moved its
modules under ``model.`` but kept its checkpoints in the old layout: ``save_pretrained``
writes the old keys back and ``from_pretrained`` renames them with the class's
``_checkpoint_conversion_mapping``. So the model's own fresh folder is "old layout" to its
``state_dict``, and a gate that renames without the mapping fails it. For tiny random
Llava and Qwen2-VL: the fresh ``save_pretrained`` folder passes, a checkpoint in today's
layout (the model's ``state_dict``, as transformers 5 writes it) passes, and a real break
fails; each time with the key sets ``from_pretrained(output_loading_info=True)`` reports.

Needs transformers 4.50 to 4.x (the `models` env has 5.x, where this is the conversion
mapping of ``test_hf_rules.py``): ``python3.11 -m venv venv-tf4 && venv-tf4/bin/pip install
torch==2.13.0 transformers==4.57.6 safetensors pytest``, then
``venv-tf4/bin/python -m pytest conformance/test_transformers4.py -p no:randomly``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pytest_statedict import StateDictMismatch, assert_checkpoint_loads  # noqa: E402
from pytest_statedict.hf_rules import _has_v4_loader, transformers_version  # noqa: E402

if transformers_version() >= (5, 0) or not _has_v4_loader():
    pytest.skip(
        f"transformers {transformers.__version__}: the 4.x conversion mappings need "
        "transformers 4.50 to 4.x",
        allow_module_level=True,
    )

TEXT = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 48,
        "max_position_embeddings": 64}  # fmt: skip
MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}


def llava() -> Any:
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            image_size=32, patch_size=8, projection_dim=32,
        ),
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=90,
    )  # fmt: skip
    return transformers.LlavaForConditionalGeneration(config)


def qwen2_vl() -> Any:
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    config = transformers.Qwen2VLConfig(
        vision_config=vision, text_config={**TEXT, "rope_scaling": MROPE}, **TEXT,
        rope_scaling=MROPE,
    )  # fmt: skip
    return transformers.Qwen2VLForConditionalGeneration(config)


MODELS: dict[str, Callable[[], Any]] = {"Llava": llava, "Qwen2-VL": qwen2_vl}


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> Any:
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def loading_info(model: Any, folder: Path) -> dict[str, set[str]]:
    """``from_pretrained``'s own key sets for the folder (a refused width asked again)."""
    try:
        _, info = type(model).from_pretrained(folder, output_loading_info=True)
    except RuntimeError:  # mismatched sizes: from_pretrained raises after its report
        _, info = type(model).from_pretrained(
            folder, output_loading_info=True, ignore_mismatched_sizes=True
        )
    return {
        "missing": set(info["missing_keys"]),
        "unexpected": set(info["unexpected_keys"]),
        "mismatched": {k if isinstance(k, str) else k[0] for k in info["mismatched_keys"]},
    }


def gate(model: Any, folder: Path) -> str | None:
    """None when the gate passes, else its report."""
    try:
        assert_checkpoint_loads(model, folder)
    except StateDictMismatch as exc:
        return str(exc)
    return None


def written(folder: Path, fresh: Path, tensors: dict[str, Any]) -> Path:
    """A copy of the fresh folder's config with ``tensors`` as its weights."""
    folder.mkdir()
    (folder / "config.json").write_bytes((fresh / "config.json").read_bytes())
    safetensors_torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_fresh_save_pretrained_folder_passes(model: Any, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path)
    saved = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert set(saved) != set(model.state_dict()), "save_pretrained wrote today's layout"
    assert loading_info(model, tmp_path) == {"missing": set(), "unexpected": set(),
                                             "mismatched": set()}  # fmt: skip
    assert gate(model, tmp_path) is None


def test_checkpoint_in_todays_layout_passes(model: Any, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "fresh")
    # the model's own keys (transformers 5's save_pretrained, a torch.save of the
    # state_dict): the mapping's patterns leave them as they are
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(tensors) != set(safetensors_torch.load_file(tmp_path / "fresh/model.safetensors"))
    folder = written(tmp_path / "today", tmp_path / "fresh", tensors)
    assert loading_info(model, folder) == {"missing": set(), "unexpected": set(),
                                           "mismatched": set()}  # fmt: skip
    assert gate(model, folder) is None


def test_real_break_fails_with_from_pretrained_keys(model: Any, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "fresh")
    tensors = safetensors_torch.load_file(tmp_path / "fresh" / "model.safetensors")
    dropped = sorted(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))[0]
    widened = sorted(k for k in tensors if k.endswith("layers.0.mlp.up_proj.weight"))[0]
    del tensors[dropped]
    tensors[widened] = torch.zeros(tensors[widened].shape[0] + 8, tensors[widened].shape[1])
    folder = written(tmp_path / "broken", tmp_path / "fresh", tensors)
    info = loading_info(model, folder)
    assert len(info["missing"]) == 1 and len(info["mismatched"]) == 1 and not info["unexpected"]
    report = gate(model, folder)
    assert report is not None
    assert "NO (1 missing key, 1 shape mismatch)" in report
    (missing,) = info["missing"]
    (mismatched,) = info["mismatched"]
    assert f"    {missing}\n" in report
    assert f"    {mismatched}: checkpoint" in report


def test_report_names_the_mapping_that_renamed(model: Any, tmp_path: Path) -> None:
    """The gate's verdict of a passing load, and why the old keys were accepted."""
    from pytest_statedict.hf_rules import transformers4_load
    from pytest_statedict.model_copy import meta_copy

    model.save_pretrained(tmp_path)
    saved = safetensors_torch.load_file(tmp_path / "model.safetensors")
    verdict = transformers4_load(meta_copy(model), saved, strict=True)
    assert not (verdict.missing or verdict.unexpected or verdict.shapes)
    assert any("_checkpoint_conversion_mapping" in line for line in verdict.accepted)
