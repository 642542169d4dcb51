"""The gate speaks PEFT's loading rules: it agrees with ``set_peft_model_state_dict``.

A small MLP gets a LoRA adapter (r=4 on its layers ``q`` and ``v``, its ``head`` in
``modules_to_save``), is trained for two steps and saved with ``save_pretrained``; then
``assert_checkpoint_loads(peft_model, adapter_folder)`` is compared with what PEFT itself
does with the folder (``PeftModel.from_pretrained``, ``set_peft_model_state_dict``): the
unchanged adapter passes, and three refactors of today's model fail by name, each beside
PEFT's own outcome (silently untrained, or raising). On a tiny GPT-2, four PEFT methods
(LoRA, DoRA, IA3, prompt tuning) each pass unchanged and fail after a change of their
config, beside what PEFT's own load does with it. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip(
    "peft", reason="peft is not installed (the conformance env `models` has it)"
)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import load_peft_weights, set_peft_model_state_dict  # noqa: E402
from torch import nn  # noqa: E402

from pytest_statedict import StateDictMismatch, assert_checkpoint_loads, schema_of  # noqa: E402
from pytest_statedict.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class MLP(nn.Module):
    """The base model; ``q``, ``head`` and the rank are what the refactors change."""

    def __init__(self, q: str = "q", head: str = "head") -> None:
        super().__init__()
        self.q_name, self.head_name = q, head
        setattr(self, q, nn.Linear(8, 8))
        self.v = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        setattr(self, head, nn.Linear(8, 3))

    def forward(self, x: Any) -> Any:
        hidden = getattr(self, self.q_name)(x) + self.v(x)
        return getattr(self, self.head_name)(torch.relu(self.mid(hidden)))


def lora(base: MLP, *, r: int = 4, adapter_name: str = "default") -> Any:
    config = LoraConfig(r=r, target_modules=[base.q_name, "v"], modules_to_save=[base.head_name])
    return get_peft_model(base, config, adapter_name=adapter_name)


def trained(model: Any) -> Any:
    """Two optimizer steps, so that lora_B is no longer zero and the head has moved."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Any, Path]:
    """A trained PeftModel and the folder its save_pretrained wrote."""
    torch.manual_seed(0)
    model = trained(lora(MLP()))
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def gate_failure(model: Any, path: Path, **options: Any) -> str:
    with pytest.raises(StateDictMismatch) as info:
        assert_checkpoint_loads(model, path, **options)
    return str(info.value)


def test_the_folder_is_read_as_peft_wrote_it(adapter: tuple[Any, Path]) -> None:
    model, folder = adapter
    schema = schema_of(folder)
    saved = peft.utils.get_peft_model_state_dict(model)
    assert {t.key: list(t.shape or ()) for t in schema} == {
        k: list(v.shape) for k, v in saved.items()
    }
    assert schema.framework == (
        f"PEFT adapter (LORA, r=4, targets q, v, modules_to_save head, base model MLP, "
        f"peft {peft.__version__})"
    )


def test_the_unchanged_adapter_loads_as_peft_loads_it(adapter: tuple[Any, Path]) -> None:
    model, folder = adapter
    assert_checkpoint_loads(lora(MLP()), folder)  # was: 6 unexpected, 14 missing keys
    assert_checkpoint_loads(lora(MLP()), folder / "adapter_model.safetensors")
    assert_checkpoint_loads(lora(MLP()), folder, rules="peft")
    # the oracle: PEFT loads it, and the trained weights are the ones in the model
    loaded = peft.utils.get_peft_model_state_dict(PeftModel.from_pretrained(MLP(), folder))
    saved = peft.utils.get_peft_model_state_dict(model)
    assert list(loaded) == list(saved)
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())
    # today's model may be built with another adapter name: PEFT inserts whichever it is
    assert_checkpoint_loads(lora(MLP(), adapter_name="mine"), folder)


def test_a_renamed_targeted_layer_fails_by_name_where_peft_loads_silently(
    adapter: tuple[Any, Path],
) -> None:
    _, folder = adapter
    today = lora(MLP(q="query"))
    message = gate_failure(today, folder)
    assert message.startswith(
        f"checkpoint {folder} does not load into PeftModel with PEFT's set_peft_model_state_dict "
        f"(peft {peft.__version__}, adapter 'default', strict=True):"
    )
    assert "NO (2 unexpected keys, 2 missing keys)" in message
    missing = message.split("missing (in the model, not in the checkpoint) (2):\n")[1]
    assert missing.splitlines()[:2] == [
        "    base_model.model.query.lora_A.weight",
        "    base_model.model.query.lora_B.weight",
    ]
    assert "    base_model.model.q.lora_A.weight -> base_model.model.query.lora_A.weight" in message
    assert "base_layer" not in message and "mid.weight" not in message  # no base weights
    assert "PEFT itself loads this adapter without an error" in message
    # the hinted rename makes it load
    assert_checkpoint_loads(
        today, folder, rename=[(r"^base_model\.model\.q\.", "base_model.model.query.")]
    )

    # the oracle: PEFT raises nothing, and the renamed layer's adapter stays untrained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = set_peft_model_state_dict(today, load_peft_weights(str(folder), device="cpu"))
    assert sorted(result.unexpected_keys) == [
        "base_model.model.q.lora_A.weight",
        "base_model.model.q.lora_B.weight",
    ]
    assert not [w for w in caught if "missing" in str(w.message)]
    assert torch.count_nonzero(today.base_model.model.query.lora_B["default"].weight) == 0
    # and from_pretrained, with the saved config's target "q", leaves "query" unadapted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = PeftModel.from_pretrained(MLP(q="query"), folder)
    assert type(restored.base_model.model.query) is nn.Linear
    assert not [w for w in caught if "missing" in str(w.message)]


def test_strict_false_accepts_what_peft_accepts(adapter: tuple[Any, Path]) -> None:
    """strict=False means what PEFT's own load means: missing adapter keys are accepted."""
    _, folder = adapter
    assert_checkpoint_loads(lora(MLP(q="query")), folder, strict=False)


def test_a_changed_rank_fails_with_shape_mismatches_where_peft_raises(
    adapter: tuple[Any, Path],
) -> None:
    _, folder = adapter
    today = lora(MLP(), r=8)
    message = gate_failure(today, folder)
    assert "NO (4 shape mismatches)" in message
    assert "    base_model.model.q.lora_A.weight: checkpoint [4, 8], model [8, 8]" in message
    assert "    base_model.model.v.lora_B.weight: checkpoint [8, 4], model [8, 8]" in message
    # the oracle
    with pytest.raises(
        RuntimeError, match=r"size mismatch for base_model\.model\.q\.lora_A\.default"
    ):
        set_peft_model_state_dict(today, load_peft_weights(str(folder), device="cpu"))


def test_a_renamed_head_is_hinted_at_its_trainable_copy(adapter: tuple[Any, Path]) -> None:
    model, folder = adapter
    today = lora(MLP(head="classifier"))
    message = gate_failure(today, folder)
    assert "original_module" not in message  # was: rename= pointing at head.original_module
    assert (
        "keys are named as the adapter file names them: PEFT loads "
        "base_model.model.classifier.weight into "
        "base_model.model.classifier.modules_to_save.default.weight"
    ) in message
    assert "    base_model.model.head.weight -> base_model.model.classifier.weight" in message
    hint = re.search(r"to load it as it is: rename=(.+) \(rename= maps", message)
    assert hint is not None
    rename = eval(hint.group(1))  # the message's own Python literal
    assert_checkpoint_loads(today, folder, rename=rename)

    # the oracle: PEFT raises on the renamed head ...
    weights = load_peft_weights(str(folder), device="cpu")
    assert "it raises: KeyError: 'base_model.model.classifier.weight'" in message
    with pytest.raises(KeyError, match=r"base_model\.model\.classifier\.weight"):
        set_peft_model_state_dict(today, weights)
    # ... and with the hinted rename it loads the trained head into the trainable copy
    pattern, replacement = rename[0]
    renamed = {re.sub(pattern, replacement, k): v for k, v in weights.items()}
    result = set_peft_model_state_dict(today, renamed)
    assert result.unexpected_keys == []
    copy = today.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(copy, model.base_model.model.head.modules_to_save["default"].weight)


def test_a_named_adapter_is_loaded_under_its_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = trained(lora(MLP(), adapter_name="fancy"))
    model.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "saved" / "fancy"  # PEFT saves a non-default adapter in a subfolder
    assert_checkpoint_loads(model, folder)
    two = lora(MLP())
    two.add_adapter("fancy", LoraConfig(r=2, target_modules=["q"]))
    assert_checkpoint_loads(two, folder)  # "default" by default, as PEFT's own default
    message = gate_failure(two, folder, adapter_name="fancy")
    assert "adapter 'fancy'" in message and "shape mismatches" in message
    with pytest.raises(ValueError, match="has no adapter of that name; its adapters are"):
        assert_checkpoint_loads(two, folder, adapter_name="other")


def test_a_whole_state_dict_keeps_torchs_rules(adapter: tuple[Any, Path], tmp_path: Path) -> None:
    model, _ = adapter
    torch.save(model.state_dict(), tmp_path / "whole.pt")
    assert_checkpoint_loads(lora(MLP()), tmp_path / "whole.pt")
    message = gate_failure(lora(MLP(q="query")), tmp_path / "whole.pt")
    assert "with load_state_dict(strict=True):" in message
    assert (
        "base_model.model.q.base_layer.weight -> base_model.model.query.base_layer.weight"
        in message
    )


def test_a_trainer_checkpoint_of_a_peft_model(adapter: tuple[Any, Path], tmp_path: Path) -> None:
    """Trainer writes the adapter beside its own state (``checkpoint-N/``): one training
    folder, its model the adapter (judged by PEFT's rules), its optimizer judged too."""
    model, folder = adapter
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(folder, checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    assert_checkpoint_loads(lora(MLP()), checkpoint)
    message = gate_failure(lora(MLP(q="query")), checkpoint)
    assert "with PEFT's set_peft_model_state_dict" in message
    assert "    base_model.model.query.lora_A.weight" in message
    schema = schema_of(checkpoint)
    assert schema.framework is not None
    assert schema.framework.startswith("transformers Trainer checkpoint")
    assert "; PEFT adapter (LORA, r=4" in schema.framework
    assert schema.optimizer is not None and len(schema.optimizer.param_groups) == 1

    def regrouped(peft_model: Any) -> torch.optim.Optimizer:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": trainable[:1]}, {"params": trainable[1:]}])

    message = gate_failure(lora(MLP()), checkpoint, optimizer=regrouped)
    assert "1 param_groups saved, 2 now" in message


def test_show_names_the_adapter(
    adapter: tuple[Any, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, folder = adapter
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "framework: PEFT adapter (LORA, r=4, targets q, v, modules_to_save head" in out
    assert "base_model.model.q.lora_A.weight" in out


# PEFT methods on a tiny GPT-2: the adapter's config, today's changed config, the gate's
# verdict on the change, and whether PEFT's own load raises on it (else it loads silently)
TUNERS: dict[str, tuple[Any, Any, str, bool]] = {
    "lora": (
        lambda: LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"),
        lambda: LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"),
        "NO (4 shape mismatches)",
        True,
    ),
    "dora": (
        lambda: LoraConfig(r=4, target_modules=["c_attn"], use_dora=True),
        lambda: LoraConfig(r=4, target_modules=["c_attn"]),
        "NO (2 unexpected keys)",
        False,
    ),
    "ia3": (
        lambda: peft.IA3Config(
            target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]
        ),
        lambda: peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[]),
        "NO (2 unexpected keys)",
        False,
    ),
    "prompt tuning": (
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "NO (1 shape mismatch)",
        True,
    ),
}


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_peft_methods_on_a_transformers_model(tmp_path: Path, tuner: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=32
    )
    saved_config, changed_config, verdict, peft_raises = TUNERS[tuner]
    torch.manual_seed(0)
    model = get_peft_model(transformers.GPT2LMHeadModel(config), saved_config())
    with torch.no_grad():  # as training leaves it (keys and shapes do not depend on it)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_()
    model.save_pretrained(tmp_path / "adapter")
    today = get_peft_model(transformers.GPT2LMHeadModel(config), saved_config())
    assert_checkpoint_loads(today, tmp_path / "adapter")
    PeftModel.from_pretrained(transformers.GPT2LMHeadModel(config), tmp_path / "adapter")

    changed = get_peft_model(transformers.GPT2LMHeadModel(config), changed_config())
    assert verdict in gate_failure(changed, tmp_path / "adapter")
    weights = load_peft_weights(str(tmp_path / "adapter"), device="cpu")
    try:  # the oracle
        set_peft_model_state_dict(changed, weights)
    except RuntimeError:
        raised = True
    else:
        raised = False
    assert raised == peft_raises


def test_a_users_test_of_a_peft_model(pytester: pytest.Pytester) -> None:
    """The workflow: a project's test keeps last release's adapter loading into today's model."""
    pytester.makepyfile(
        test_adapter="""
        import pytest
        import torch
        from torch import nn
        from peft import LoraConfig, get_peft_model
        from pytest_statedict import assert_checkpoint_loads

        class Model(nn.Module):
            def __init__(self, attention="q"):
                super().__init__()
                setattr(self, attention, nn.Linear(8, 8))
                self.head = nn.Linear(8, 2)

        def peft_model(attention="q"):
            config = LoraConfig(r=4, target_modules=[attention], modules_to_save=["head"])
            return get_peft_model(Model(attention), config)

        @pytest.fixture
        def release(tmp_path):
            peft_model().save_pretrained(tmp_path / "release")
            return tmp_path / "release"

        def test_release_adapter_loads(release):
            assert_checkpoint_loads(peft_model(), release)

        def test_refactor_breaks_release_adapter(release):
            assert_checkpoint_loads(peft_model("query"), release)
        """
    )
    result = pytester.runpytest(
        "-p", "no:randomly", "-p", "no:cacheprovider", "-W", "ignore::UserWarning"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*does not load into PeftModel with PEFT's set_peft_model_state_dict*",
            "*missing (in the model, not in the checkpoint) (2):",
            "*base_model.model.query.lora_A.weight",
            "*to load it as it is: rename=*'base_model.model.query.'*",
            "*statedict: gates: 1 passed, 1 failed*",
        ]
    )


RELEASE_MODEL = """
import torch
from torch import nn
from peft import LoraConfig, get_peft_model

ATTENTION = "q"


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        setattr(self, ATTENTION, nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)


def peft_model():
    config = LoraConfig(r=4, target_modules=[ATTENTION], modules_to_save=["head"])
    return get_peft_model(Model(), config)
"""


def test_a_release_recorded_from_an_adapter(pytester: pytest.Pytester) -> None:
    """``statedict record`` on the adapter folder, then the release gate: PEFT's rules decide
    from the recorded layout alone (a snapshot keeps no adapter config)."""
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(model=RELEASE_MODEL)
    pytester.makepyfile(
        test_adapter_releases="""
        from model import peft_model
        from pytest_statedict import statedict_releases

        test_releases = statedict_releases(peft_model)
        """
    )
    namespace: dict[str, Any] = {}
    exec(RELEASE_MODEL, namespace)
    namespace["peft_model"]().save_pretrained(pytester.path / "adapter")
    assert main(["record", str(pytester.path / "adapter"), "--release", "v1"]) == 0
    args = ("-p", "no:randomly", "-p", "no:cacheprovider", "-W", "ignore::UserWarning")
    pytester.runpytest(*args).assert_outcomes(passed=1)

    model = pytester.path / "model.py"
    model.write_text(model.read_text().replace('ATTENTION = "q"', 'ATTENTION = "query"'))
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*does not load into PeftModel with PEFT's set_peft_model_state_dict*",
            "*missing (in the model, not in the checkpoint) (2):",
            "*base_model.model.query.lora_A.weight",
            "*release v1 no longer loads*",
        ]
    )
