"""Training frameworks' checkpoints: a transformers Trainer ``checkpoint-N/``, an accelerate
``save_state`` folder and a Lightning ``.ckpt``, synthesized file by file as the frameworks
write them (transformers 5.24, accelerate 1.16 and Lightning 2.6 were run on CPU to see
what they write): the model, ``optimizer.state_dict()`` saved by ``torch.save``, a real LR
scheduler's state, the RNG states (pickled numpy arrays), ``trainer_state.json`` and a
pickled ``training_args.bin``. transformers is not needed here; the conformance sweep runs
the real frameworks.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pytest_statedict import (
    CheckpointError,
    StateDictMismatch,
    assert_checkpoint_loads,
    schema_of,
)
from pytest_statedict.cli import main
from pytest_statedict.compare import diff_schemas
from pytest_statedict.formats.reading import load_file
from pytest_statedict.schema import Schema
from pytest_statedict.torch_free import read_without_torch

safetensors_torch = pytest.importorskip("safetensors.torch")
np = pytest.importorskip("numpy")

RELEASES = Path("tests/__statedict__/releases")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.encoder(x)))


def two_groups(model: nn.Module) -> torch.optim.Optimizer:
    """Trainer's own grouping: weights decayed, biases and norms not."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in named if not (n.endswith("weight") and "norm" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-3
    )


def three_groups(model: nn.Module) -> torch.optim.Optimizer:
    """The same parameters regrouped: norms split from the biases."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith("weight") and "norm" not in n]
    norms = [p for n, p in named if "norm" in n]
    biases = [p for n, p in named if n.endswith("bias") and "norm" not in n]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.01},
            {"params": norms, "weight_decay": 0.0},
            {"params": biases, "weight_decay": 0.0},
        ],
        lr=1e-3,
    )


def train(
    model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], steps: int = 3
) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = make_optimizer(model)
    # Trainer's get_linear_schedule_with_warmup is a LambdaLR
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def rng_states() -> dict[str, Any]:
    """What Trainer's ``rng_state.pth`` and accelerate's ``random_states_0.pkl`` hold: numpy's
    state is an ndarray, which weights-only unpickling refuses."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }


class RunsCode:
    """Stands for ``TrainingArguments``: unpickling it runs code (creates ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.marker),))


def trainer_state(global_step: int, epoch: float) -> dict[str, Any]:
    """The shape of a real ``trainer_state.json`` (transformers 5.24)."""
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epoch,
        "eval_steps": 500,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [
            {"epoch": 0.5, "grad_norm": 0.12, "learning_rate": 5e-05, "loss": 0.69, "step": 1}
        ],
        "logging_steps": 1,
        "max_steps": global_step,
        "num_input_tokens_seen": 0,
        "num_train_epochs": 3,
        "save_steps": 2,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {"should_save": True, "should_training_stop": True},
                "attributes": {},
            }
        },
        "total_flos": 983808.0,
        "train_batch_size": 4,
        "trial_name": None,
        "trial_params": None,
    }


def trainer_folder(
    folder: Path,
    model: nn.Module | None = None,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = two_groups,
) -> Path:
    """A Trainer ``checkpoint-6/`` as transformers writes it."""
    folder.mkdir(parents=True)
    model = model or Net()
    optimizer, scheduler = train(model, make_optimizer)
    safetensors_torch.save_file(
        model.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    (folder / "config.json").write_text('{"model_type": "net"}')
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(rng_states(), folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state(6, 3.0), indent=2))
    torch.save(RunsCode(folder.parent / "unpickled"), folder / "training_args.bin")
    return folder


def accelerate_folder(folder: Path, models: int = 1) -> Path:
    """An ``Accelerator.save_state`` folder: each further model, optimizer and scheduler
    numbered ``_1``, ``_2``..."""
    folder.mkdir(parents=True)
    for i in range(models):
        suffix = f"_{i}" if i else ""
        model = Net()
        optimizer, scheduler = train(model, two_groups if i == 0 else three_groups)
        safetensors_torch.save_file(model.state_dict(), str(folder / f"model{suffix}.safetensors"))
        torch.save(optimizer.state_dict(), folder / f"optimizer{suffix}.bin")
        if i == 0:
            torch.save(scheduler.state_dict(), folder / "scheduler.bin")
    torch.save(rng_states(), folder / "random_states_0.pkl")
    return folder


# ---- what is read ------------------------------------------------------------------------


def test_a_trainer_folder_is_one_checkpoint_model_optimizer_and_the_rest(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    schema = schema_of(folder)
    assert [t.key for t in schema.tensors] == sorted(Net().state_dict())
    assert schema.optimizer is not None
    assert [len(g.params) for g in schema.optimizer.param_groups] == [2, 4]
    assert dict(schema.extras) == {
        "scheduler.pt": "dict: LR scheduler state, 2 param group(s) (base_lrs list, "
        "last_epoch int, lr_lambdas list)",
        "trainer_state.json": "dict: Trainer state, stateful callbacks TrainerControl",
        "rng_state.pth": "pickle: RNG state (not unpickled)",
        "training_args.bin": "pickle: os.makedirs (not unpickled)",
    }
    assert schema.framework == "transformers Trainer checkpoint (global step 6, epoch 3.0)"
    assert schema.read_as is not None
    assert "model from model.safetensors, optimizer from optimizer.pt" in schema.read_as
    assert not (tmp_path / "unpickled").exists()


def test_a_name_that_is_no_valid_unicode_is_shown_escaped(tmp_path: Path) -> None:
    """A lone surrogate in trainer_state.json (JSON allows the escape): shown, not a crash."""
    folder = trainer_folder(tmp_path / "checkpoint-6")
    (folder / "trainer_state.json").write_text(
        '{"global_step": 6, "stateful_callbacks": {"\\ud800": {}}}'
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest_statedict", "show", str(folder)],
        capture_output=True, text=True, errors="replace",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stateful callbacks \\ud800" in done.stdout


def test_an_optimizer_file_that_is_no_regular_file_is_named(tmp_path: Path) -> None:
    """A link to a device where optimizer.pt should be: an error naming it, never a folder
    read as if it had no optimizer."""
    folder = trainer_folder(tmp_path / "checkpoint-6")
    (folder / "optimizer.pt").unlink()
    (folder / "optimizer.pt").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        schema_of(folder)


def test_reduce_lr_on_plateau_is_a_scheduler_with_its_groups(tmp_path: Path) -> None:
    """ReduceLROnPlateau is no LRScheduler (no base_lrs): its floors count the groups."""
    model = Net()
    optimizer = two_groups(model)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    path = tmp_path / "plateau.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedulers": [plateau.state_dict()]}, path)  # fmt: skip
    described = schema_of(path).extras["lr_schedulers"]
    assert described.startswith("list: 1 LR scheduler state(s): 2 param group(s) (")
    assert described == read_without_torch(path, None).extras["lr_schedulers"]


def test_show_names_the_framework_and_every_part(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    shown = subprocess.run(
        [sys.executable, "-m", "pytest_statedict", "show", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "framework: transformers Trainer checkpoint (global step 6, epoch 3.0)" in shown
    assert "optimizer: class unknown (a bare state_dict), 2 param_group(s), state for 6" in shown
    for part in (
        "scheduler.pt: dict: LR scheduler state, 2 param group(s)",
        "trainer_state.json: dict: Trainer state",
        "rng_state.pth: pickle: RNG state (not unpickled)",
        "training_args.bin: pickle: os.makedirs (not unpickled)",
    ):
        assert part in shown
    assert "encoder.weight" in shown
    assert not (tmp_path / "unpickled").exists()


def test_show_reads_every_part_without_torch(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    code = (
        "import sys; from pathlib import Path; "
        "from pytest_statedict.torch_free import read_without_torch; "
        f"schema = read_without_torch(Path({str(folder)!r}), None); "
        "assert schema.optimizer is not None and len(schema.extras) == 4; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_torch_free_and_the_loaded_readings_agree(tmp_path: Path) -> None:
    for folder, part in (
        (trainer_folder(tmp_path / "checkpoint-6"), None),
        (accelerate_folder(tmp_path / "one"), None),
        (accelerate_folder(tmp_path / "two", models=2), "model_1"),
    ):
        loaded, torch_free = schema_of(folder, part=part), read_without_torch(folder, part)
        assert loaded == torch_free
        assert loaded.framework == torch_free.framework
        assert loaded.optimizer is not None


def test_training_args_would_run_code_if_unpickled(tmp_path: Path) -> None:
    """What the readings above never do: the file really is hostile."""
    folder = trainer_folder(tmp_path / "checkpoint-6")
    assert_checkpoint_loads(Net(), folder, optimizer=two_groups)
    assert main(["show", str(folder)]) == 0
    assert not (tmp_path / "unpickled").exists()
    torch.load(folder / "training_args.bin", weights_only=False)
    assert (tmp_path / "unpickled").exists()


def test_load_gives_a_general_checkpoint_of_the_loadable_parts(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    obj, _ = load_file(folder)
    assert list(obj) == ["model", "optimizer", "scheduler"]
    assert set(obj["model"]) == set(Net().state_dict())
    assert len(obj["optimizer"]["param_groups"]) == 2
    assert len(obj["scheduler"]["base_lrs"]) == 2


# ---- the gate ------------------------------------------------------------------------------


def test_the_gate_judges_the_folders_optimizer(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    assert_checkpoint_loads(Net(), folder, optimizer=two_groups)
    model = Net()
    assert_checkpoint_loads(model, folder, optimizer=two_groups(model))
    with pytest.raises(StateDictMismatch) as failed:
        assert_checkpoint_loads(Net(), folder, optimizer=three_groups)
    assert "NO, it raises ValueError (2 param_groups saved, 3 now)" in str(failed.value)


def test_the_gate_suggests_a_rename_for_a_renamed_module(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")

    class Renamed(Net):
        def __init__(self) -> None:
            super().__init__()
            self.head = self.fc
            del self.fc

    with pytest.raises(StateDictMismatch) as failed:
        assert_checkpoint_loads(Renamed(), folder)
    assert "fc.weight -> head.weight" in str(failed.value)
    assert "rename=" in str(failed.value)


def test_a_regroup_shows_in_the_scheduler_and_the_optimizer(tmp_path: Path) -> None:
    before = schema_of(trainer_folder(tmp_path / "before"))
    after = schema_of(trainer_folder(tmp_path / "after", make_optimizer=three_groups))
    diff = diff_schemas(before, after)
    assert any(line.startswith("scheduler.pt: dict: LR scheduler state, 2 param group(s)")
               and "-> dict: LR scheduler state, 3 param group(s)" in line
               for line in diff.extras)  # fmt: skip
    assert diff.optimizer
    assert not diff_schemas(before, schema_of(trainer_folder(tmp_path / "again"))).extras


def test_an_old_snapshots_bare_type_name_matches_a_described_entry() -> None:
    """Snapshots recorded before entries had details hold their type alone."""
    described = Schema(tensors=(), extras={"lr_schedulers": "list: 1 LR scheduler state(s): x"})
    assert not diff_schemas(Schema(tensors=(), extras={"lr_schedulers": "list"}), described)
    assert diff_schemas(Schema(tensors=(), extras={"lr_schedulers": "dict"}), described).extras
    other = Schema(tensors=(), extras={"lr_schedulers": "list: 1 LR scheduler state(s): y"})
    assert diff_schemas(other, described).extras


def test_a_sharded_model_in_a_trainer_folder(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[:3],
        "model-00002-of-00002.safetensors": keys[3:],
    }
    for shard, shard_keys in shards.items():
        safetensors_torch.save_file({k: state[k] for k in shard_keys}, str(folder / shard))
    weight_map = {key: shard for shard, shard_keys in shards.items() for key in shard_keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    schema = schema_of(folder)
    assert sorted(t.key for t in schema.tensors) == keys
    assert schema.optimizer is not None
    assert schema == read_without_torch(folder, None)
    assert_checkpoint_loads(Net(), folder, optimizer=two_groups)


# ---- accelerate ----------------------------------------------------------------------------


def test_an_accelerate_folder(tmp_path: Path) -> None:
    schema = schema_of(accelerate_folder(tmp_path / "state"))
    assert schema.framework == "accelerate save_state (1 model, 1 optimizer, 1 scheduler)"
    assert schema.optimizer is not None
    assert set(schema.extras) == {"scheduler.bin", "random_states_0.pkl"}


def test_several_accelerate_models_are_parts(tmp_path: Path) -> None:
    folder = accelerate_folder(tmp_path / "state", models=2)
    with pytest.raises(CheckpointError, match=r"holding 2 models \(model, model_1\): choose one "
                       r"with part='model'"):  # fmt: skip
        schema_of(folder)
    second = schema_of(folder, part="model_1")
    assert second.optimizer is not None
    assert len(second.optimizer.param_groups) == 3  # optimizer_1, paired by its number
    assert second.framework == "accelerate save_state (2 models, 2 optimizers, 1 scheduler)"
    with pytest.raises(CheckpointError, match="its models are model, model_1"):
        schema_of(folder, part="model_2")
    assert_checkpoint_loads(Net(), folder, part="model_1")
    # the optimizer that goes with the part: optimizer_1's three groups, not optimizer's two
    assert_checkpoint_loads(Net(), folder, part="model_1", optimizer=three_groups)
    with pytest.raises(StateDictMismatch, match=r"3 param_groups saved, 2 now"):
        assert_checkpoint_loads(Net(), folder, part="model_1", optimizer=two_groups)
    assert second.read_as is not None
    assert second.read_as.endswith("other parts (part=): model, optimizer")


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_optimizer_file_is_an_error_naming_it(tmp_path: Path, damage: str) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    optimizer = folder / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    for read in (lambda: schema_of(folder), lambda: read_without_torch(folder, None)):
        with pytest.raises(CheckpointError, match=str(optimizer)):
            read()


def test_a_folder_without_its_model_weights_says_so(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{folder}: is a checkpoint folder .transformers "
                       r"Trainer checkpoint. with no model weights"):  # fmt: skip
        schema_of(folder)


def test_a_trainer_state_that_is_not_json_is_named(tmp_path: Path) -> None:
    folder = trainer_folder(tmp_path / "checkpoint-6")
    (folder / "trainer_state.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: the Trainer state is not "
                       "valid JSON"):  # fmt: skip
        schema_of(folder)


def test_the_folder_of_trainer_save_model_stays_a_model_folder(tmp_path: Path) -> None:
    """``trainer.save_model(dir)`` writes the weights, config.json and training_args.bin:
    no training state, so the weights file is the checkpoint, as before."""
    folder = trainer_folder(tmp_path / "final")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (folder / name).unlink()
    schema = schema_of(folder)
    assert schema.source == str(folder / "model.safetensors")
    assert schema.framework is None


# ---- releases, through pytest ---------------------------------------------------------------

PROJECT_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 2)


def build():
    return Net()


def make_optimizer(model):
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in named if not (n.endswith("weight") and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay}, {"params": rest}], lr=1e-3)
"""

PROJECT_GATE = """
from model import build, make_optimizer
from pytest_statedict import statedict_releases

test_releases = statedict_releases(build, optimizer=make_optimizer)
"""


def test_a_release_recorded_from_a_trainer_folder_checks_its_optimizer(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(model=PROJECT_MODEL, test_user_releases=PROJECT_GATE)
    folder = trainer_folder(pytester.path / "checkpoint-6")
    assert main(["record", str(folder), "--release", "v1.0"]) == 0
    recorded = json.loads((pytester.path / RELEASES / "v1.0.json").read_text())
    assert len(recorded["optimizer"]["param_groups"]) == 2
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=1)
    model_py = pytester.path / "model.py"
    model_py.write_text(
        model_py.read_text().replace(
            '[{"params": decay}, {"params": rest}]',
            '[{"params": decay}, {"params": rest[:2]}, {"params": rest[2:]}]',
        )
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*release v1.0's optimizer state*NO, it raises ValueError (2 param_groups saved, 3 now)*"]
    )


# ---- Lightning -----------------------------------------------------------------------------


def lightning_ckpt(path: Path) -> Path:
    """A ``.ckpt`` as Lightning 2.6 saves it (``Trainer.save_checkpoint``)."""
    model = Net()
    optimizer, scheduler = train(model, two_groups)
    callback = (
        "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
        "'every_n_epochs': 1, 'train_time_interval': None}"
    )
    torch.save(
        {
            "epoch": 1,
            "global_step": 2,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": model.state_dict(),
            "loops": {"fit_loop": {"state_dict": {}}},
            "callbacks": {
                callback: {
                    "monitor": None,
                    "best_model_path": "",
                    "best_k_models": {},
                    "kth_value": torch.tensor(float("inf")),
                }
            },
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
        },
        path,
    )
    return path


def test_a_lightning_checkpoint_shows_its_schedulers_and_callbacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = lightning_ckpt(tmp_path / "epoch=1-step=2.ckpt")
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "framework: Lightning checkpoint (version 2.6.6, epoch 1, global step 2)" in shown
    assert (
        "lr_schedulers: list: 1 LR scheduler state(s): 2 param group(s) (base_lrs list, "
        "last_epoch int, lr_lambdas list)" in shown
    )
    assert (
        "callbacks: dict: 1 callback state(s): ModelCheckpoint{'monitor': None, 'mode': 'min', "
        "'every_n_train_steps': 0, 'every_n_epochs': 1, 'train_time_interval': None} "
        "(best_k_models, best_model_path, kth_value, monitor)" in shown
    )
    loaded = schema_of(path)
    assert loaded == read_without_torch(path, None)
    assert loaded.framework == "Lightning checkpoint (version 2.6.6, epoch 1, global step 2)"


def test_a_general_checkpoints_scheduler_is_part_of_its_layout(tmp_path: Path) -> None:
    """The PyTorch recipe's general checkpoint with a scheduler: described as Lightning's and
    Trainer's are, the same without torch."""
    model = Net()
    optimizer, scheduler = train(model, three_groups)
    path = tmp_path / "last.pt"
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "epoch": 3,
        },
        path,
    )
    schema = schema_of(path)
    assert dict(schema.extras) == {
        "scheduler_state_dict": "dict: LR scheduler state, 3 param group(s) (base_lrs list, "
        "last_epoch int, lr_lambdas list)",
        "epoch": "int",
    }
    assert schema == read_without_torch(path, None)
    assert schema.framework is None
