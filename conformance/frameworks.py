"""The framework rows' subjects: a real short training per framework, the artifact that the
framework itself writes, today's model (unchanged, renamed, regrouped) and the framework's
own resume, the oracle that the plugin's verdicts are held against.

Each framework trains a tiny model for 3 steps on the CPU and writes its checkpoint as its
users do (``trainer.save_checkpoint``; ``Trainer``'s ``checkpoint-3/``, of a plain model and
of a LoRA PeftModel; ``save_state``, ``save_pretrained``, ``dcp.save``, ``torch.save``).
Today's model comes in three variants: ``unchanged``; ``renamed``, a submodule renamed (the
head; for the PEFT adapter a targeted layer, as the adapter's keys live there);
``regrouped``, the optimizer's 2 param groups split into 3.

The oracle resumes the artifact into today's model the framework's own way and says what
happened: it ``resumes`` (every weight it restores comes from the checkpoint), it
``raises``, or it resumes *silently with fresh weights* (no error, yet some weight it should
restore still has its initial value: transformers' Trainer after a rename logs a warning;
PEFT's ``set_peft_model_state_dict`` drops the adapter of a renamed layer).

Libraries are imported where a framework is used: a row of a framework whose library is
missing is skipped (``pytest.importorskip``), and the module imports with torch alone.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

VARIANTS = ("unchanged", "renamed", "regrouped")
# the rows of each framework (test_frameworks.py), in the order of the table
OPERATIONS = ("show", "record", "gate", "optimizer", "rename", "regroup")
STEPS = 3  # training steps before the artifact is written
HEAD, RENAMED_HEAD = "head", "classifier"


# ----------------------------------------------------------------------- the tiny model


class Net(nn.Module):
    """Body and head, the head's attribute name given (``renamed``: ``classifier``).

    Module-level, so that ``torch.save(model)`` pickles it by a name that the ``statedict``
    command can import (``frameworks.Net``, with this folder on ``PYTHONPATH``).
    """

    def __init__(self, head: str = HEAD) -> None:
        super().__init__()
        self.head_name = head
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        setattr(self, head, nn.Linear(32, 8))

    @property
    def head_module(self) -> nn.Module:
        module: nn.Module = getattr(self, self.head_name)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head_module(self.body(x))
        return out


def net(variant: str) -> Net:
    torch.manual_seed(1)  # another seed than training's: a fresh weight differs from a saved one
    return Net(RENAMED_HEAD if variant == "renamed" else HEAD)


def param_groups(model: Any, variant: str) -> list[dict[str, Any]]:
    """Body and head (2 groups, as trained); ``regrouped``: the head's weight and bias apart.
    ``model``: a :class:`Net` or the LightningModule of the same layout."""
    body, head = list(model.body.parameters()), model.head_module
    if variant != "regrouped":
        return [{"params": body}, {"params": list(head.parameters()), "lr": 1e-2}]
    return [
        {"params": body},
        {"params": [head.weight], "lr": 1e-2},
        {"params": [head.bias], "lr": 1e-3},
    ]


def adamw(variant: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """Today's optimizer of ``variant``, as a function of the model (what the gate takes)."""

    def build(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, variant), lr=1e-3)

    return build


def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training data: ``STEPS`` batches, the same every time."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        yield torch.randn(4, 16, generator=generator), torch.randn(4, 8, generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A plain training loop (what DCP, torchao and ``torch.save`` users write themselves)."""
    for x, y in batches():
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


# ------------------------------------------------------------------------------ the oracle


@dataclass(frozen=True)
class Outcome:
    """What the framework's own resume did: ``resumes``, ``raises`` or ``fresh``."""

    how: str
    detail: str = ""

    @property
    def loads(self) -> bool:
        return self.how == "resumes"

    def __str__(self) -> str:
        if self.how == "fresh":
            return f"silent fresh weights ({self.detail})"
        return f"raises {self.detail}" if self.how == "raises" else "resumes"


def _raised() -> tuple[type[BaseException], ...]:
    """What a failed resume raises: DCP's ``CheckpointException`` is a BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def resumed(
    resume: Callable[[], Mapping[str, torch.Tensor]], saved: Mapping[str, torch.Tensor]
) -> Outcome:
    """Run ``resume`` (it returns the weights it should have restored, by today's name) and
    judge it: an exception is ``raises``; a weight equal to none of ``saved``'s values (the
    trained weights, by the artifact's names) is a fresh one, whatever its name."""
    try:
        restored = resume()
    except _raised() as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        # DCP's CheckpointException wraps the rank's traceback: its last line is the error
        return Outcome("raises", f"{type(exc).__name__}: {(lines[-1] if lines else '')[:160]}")
    known = [plain(t) for t in saved.values()]
    fresh = [
        name
        for name, value in restored.items()
        if not any(k.shape == plain(value).shape and torch.equal(k, plain(value)) for k in known)
    ]
    return Outcome("fresh", ", ".join(sorted(fresh))) if fresh else Outcome("resumes")


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor to compare by value: a quantized tensor subclass (torchao) dequantized."""
    value = tensor.detach()
    if type(value) is not torch.Tensor and hasattr(value, "dequantize"):
        value = value.dequantize()
    return value.to("cpu")


def parameters(model: nn.Module, *, trainable: bool = False) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad or not trainable
    }


# ------------------------------------------------------------------------------ frameworks


@dataclass
class Artifact:
    """A framework's real checkpoint on disk, and what it holds."""

    path: Path
    keys: list[str]  # the model keys that ``statedict show`` must list, no more
    saved: dict[str, torch.Tensor]  # the trained weights, for the oracle's fresh check
    work: Path  # a scratch folder of this framework (resumes write here)


@dataclass
class Framework:
    """One framework's row family: how it trains and writes, and how it resumes."""

    name: str
    library: str  # imported (importorskip) before anything else
    write: Callable[[Path], Artifact]
    model: Callable[[str], nn.Module]  # today's model of a variant
    resume: Callable[[Artifact, str], Mapping[str, torch.Tensor]]
    # today's optimizer of a variant, a function of the model; None: the artifact holds none
    optimizer: Callable[[str], Callable[[nn.Module], Any]] | None = None
    renamed: str = f"{RENAMED_HEAD}."  # the renamed module's key prefix (a verdict names it)
    framework_words: str | None = None  # what `statedict show`'s "framework:" line names
    # what else `statedict show` must mention (lower case; "a|b": either)
    parts: tuple[str, ...] = ()
    cli_flags: tuple[str, ...] = ()  # the opt-in `statedict show/record` need

    def outcome(self, artifact: Artifact, variant: str) -> Outcome:
        return resumed(lambda: self.resume(artifact, variant), artifact.saved)


# ---- Lightning


@functools.cache
def lightning_net() -> type[nn.Module]:
    """The LightningModule (its class needs lightning, imported here)."""
    import lightning as L

    class LitNet(Net, L.LightningModule):  # type: ignore[misc]
        """``Net`` (its layers and forward), trained by Lightning: Net's ``super().__init__()``
        is LightningModule's in this order."""

        def __init__(self, variant: str = "unchanged") -> None:
            super().__init__(RENAMED_HEAD if variant == "renamed" else HEAD)
            self.variant = variant

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> Any:
            optimizer = adamw(self.variant)(self)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    return LitNet


def lightning_model(variant: str) -> nn.Module:
    torch.manual_seed(1)
    return lightning_net()(variant)


def lightning_trainer() -> Any:
    import lightning as L

    return L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def lightning_data() -> Any:
    x, y = zip(*batches(), strict=True)
    dataset = torch.utils.data.TensorDataset(torch.cat(x), torch.cat(y))
    return torch.utils.data.DataLoader(dataset, batch_size=4)


def lightning_write(folder: Path) -> Artifact:
    torch.manual_seed(0)
    model = lightning_net()()
    trainer = lightning_trainer()
    trainer.fit(model, lightning_data())
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return Artifact(path, list(model.state_dict()), parameters(model), folder)


def lightning_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    """``trainer.fit(ckpt_path=...)`` with no step left: it restores, and trains nothing."""
    model = lightning_model(variant)
    lightning_trainer().fit(model, lightning_data(), ckpt_path=artifact.path)
    return parameters(model)


LIGHTNING = Framework(
    "lightning",
    "lightning",
    lightning_write,
    lightning_model,
    lightning_resume,
    optimizer=adamw,
    framework_words="Lightning",
    parts=("optimizer", "lr_schedulers", "callbacks"),
)


# ---- transformers Trainer


@functools.cache
def bert_classes() -> tuple[type[nn.Module], type[Any]]:
    """A tiny BERT classifier whose head is renamed, and a Trainer that regroups."""
    import transformers

    class RenamedHead(transformers.BertForSequenceClassification):  # type: ignore[misc]
        """``classifier`` renamed ``head``: the refactor Trainer resumes silently."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.head = self.classifier
            del self.classifier

        def forward(self, input_ids: Any = None, labels: Any = None, **kwargs: Any) -> Any:
            pooled = self.bert(input_ids).pooler_output
            logits = self.head(self.dropout(pooled))
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class RegroupedTrainer(transformers.Trainer):  # type: ignore[misc]
        """Trainer's 2 groups (decay, no decay) with the classifier in a third."""

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            decay = set(self.get_decay_parameter_names(self.model))
            groups: list[list[nn.Parameter]] = [[], [], []]
            for name, p in named:
                groups[2 if "classifier" in name else 0 if name in decay else 1].append(p)
            self.optimizer = torch.optim.AdamW(
                [
                    {"params": groups[0], "weight_decay": 0.0},
                    {"params": groups[1], "weight_decay": 0.0},
                    {"params": groups[2], "weight_decay": 0.0},
                ],
                lr=self.args.learning_rate,
            )
            return self.optimizer

    return RenamedHead, RegroupedTrainer


def bert_config() -> Any:
    import transformers

    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )


def trainer_model(variant: str) -> nn.Module:
    import transformers

    torch.manual_seed(1)
    if variant == "renamed":
        return bert_classes()[0](bert_config())
    return transformers.BertForSequenceClassification(bert_config())


class TokenDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 4 * STEPS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 64, (8,), generator=generator), "labels": i % 2}


def trainer_for(model: nn.Module, variant: str, output: Path) -> Any:
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(output),
        max_steps=STEPS,
        save_steps=STEPS,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        logging_strategy="no",
        disable_tqdm=True,
    )
    cls = bert_classes()[1] if variant == "regrouped" else transformers.Trainer
    return cls(model=model, args=args, train_dataset=TokenDataset())


def trainer_optimizer(variant: str) -> Callable[[nn.Module], Any]:
    """Today's optimizer as Trainer builds it (its own ``create_optimizer``)."""

    def build(model: nn.Module) -> Any:
        # Trainer is given the model (the gate may hand a copy) and never trains it
        with tempfile.TemporaryDirectory() as output:
            return trainer_for(model, variant, Path(output)).create_optimizer()

    return build


def safetensors_keys(path: Path) -> list[str]:
    """The keys a framework wrote to a ``.safetensors`` file, in the file's order."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def trained_by_trainer(model: nn.Module, folder: Path) -> Path:
    """Trainer's ``checkpoint-N/`` after training ``model`` for ``STEPS`` steps."""
    trainer_for(model, "unchanged", folder / "run").train()
    return folder / "run" / f"checkpoint-{STEPS}"


def trainer_write(folder: Path) -> Artifact:
    model = trainer_model("unchanged")
    path = trained_by_trainer(model, folder)
    keys = safetensors_keys(path / "model.safetensors")
    return Artifact(path, keys, parameters(model), folder)


def trainer_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    """``train(resume_from_checkpoint=...)`` at the checkpoint's own step: restore only."""
    model = trainer_model(variant)
    trainer_for(model, variant, artifact.work / "resumed").train(
        resume_from_checkpoint=str(artifact.path)
    )
    return parameters(model)


TRAINER = Framework(
    "trainer",
    "transformers",
    trainer_write,
    trainer_model,
    trainer_resume,
    optimizer=trainer_optimizer,
    renamed="head.",
    framework_words="Trainer",
    parts=("optimizer", "scheduler", "rng", "training_args"),
)


# ---- transformers Trainer fine-tuning a PeftModel (LoRA): its checkpoint holds the adapter


def trainer_peft_model(variant: str) -> nn.Module:
    """The tiny BERT with LoRA on its attention's query and value, its head trained whole
    (``modules_to_save``; ``renamed``: the head renamed, today's config naming it)."""
    from peft import LoraConfig, get_peft_model

    head = "head" if variant == "renamed" else "classifier"
    base = trainer_model(variant)
    config = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=[head])
    return get_peft_model(base, config)


def trainer_peft_write(folder: Path) -> Artifact:
    model = trainer_peft_model("unchanged")
    path = trained_by_trainer(model, folder)
    keys = safetensors_keys(path / "adapter_model.safetensors")
    return Artifact(path, keys, parameters(model, trainable=True), folder)


def trainer_peft_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    """Trainer's resume of a PeftModel: it loads the adapter (``load_adapter``), then the
    optimizer."""
    model = trainer_peft_model(variant)
    trainer_for(model, variant, artifact.work / "resumed").train(
        resume_from_checkpoint=str(artifact.path)
    )
    return parameters(model, trainable=True)


TRAINER_PEFT = Framework(
    "trainer-peft",
    "peft",
    trainer_peft_write,
    trainer_peft_model,
    trainer_peft_resume,
    optimizer=trainer_optimizer,
    renamed="head.",
    framework_words="Trainer",
    parts=("optimizer", "scheduler", "rng", "training_args", "peft|adapter"),
)


# ---- accelerate


def accelerated(variant: str) -> tuple[Any, nn.Module, Any, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = net(variant)
    optimizer = adamw(variant)(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def accelerate_write(folder: Path) -> Artifact:
    torch.manual_seed(0)
    accelerator, model, optimizer, scheduler = accelerated("unchanged")
    for x, y in batches():
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    path = folder / "state"
    accelerator.save_state(str(path))
    return Artifact(path, list(model.state_dict()), parameters(model), folder)


def accelerate_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    accelerator, model, _, _ = accelerated(variant)
    accelerator.load_state(str(artifact.path))
    return parameters(model)


ACCELERATE = Framework(
    "accelerate",
    "accelerate",
    accelerate_write,
    net,
    accelerate_resume,
    optimizer=adamw,
    framework_words="accelerate",
    parts=("optimizer", "scheduler", "rng|random_states"),
)


# ---- PEFT


class Adapted(nn.Module):
    """A base model with two layers LoRA targets (``renamed``: the second one renamed)."""

    def __init__(self, second: str = "proj2") -> None:
        super().__init__()
        self.second = second
        self.embed = nn.Linear(16, 32)
        self.proj1 = nn.Linear(32, 32)
        setattr(self, second, nn.Linear(32, 32))
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj1(self.embed(x)))
        out: torch.Tensor = self.head(torch.relu(getattr(self, self.second)(x)))
        return out


def peft_model(variant: str) -> nn.Module:
    """Today's PeftModel: the base model built with its seed, LoRA on its two layers (under
    today's names), the head trained whole (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    second = "mix" if variant == "renamed" else "proj2"
    torch.manual_seed(0)  # the base model's weights are the released ones
    base = Adapted(second)
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["proj1", second], modules_to_save=["head"])
    return get_peft_model(base, config)


def peft_write(folder: Path) -> Artifact:
    model = peft_model("unchanged")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for x, y in batches():
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = folder / "adapter"
    model.save_pretrained(str(path))
    keys = safetensors_keys(path / "adapter_model.safetensors")
    return Artifact(path, keys, parameters(model, trainable=True), folder)


def peft_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    """``set_peft_model_state_dict`` into today's PeftModel, as ``load_adapter`` does."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = peft_model(variant)
    set_peft_model_state_dict(model, load_file(artifact.path / "adapter_model.safetensors"))
    return parameters(model, trainable=True)


PEFT = Framework(
    "peft",
    "peft",
    peft_write,
    peft_model,
    peft_resume,
    renamed="mix.",
    framework_words="PEFT",
)


# ---- DCP


def dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The DCP tutorial's state: ``{"model": ..., "optim": ...}`` from ``get_state_dict``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optimizer_state}


def dcp_write(folder: Path) -> Artifact:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = Net()
    optimizer = adamw("unchanged")(model)
    train(model, optimizer)
    path = folder / "dcp"
    dcp.save(dcp_state(model, optimizer), checkpoint_id=str(path))
    return Artifact(path, list(model.state_dict()), parameters(model), folder)


def dcp_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    """``dcp.load`` into today's state, then ``set_state_dict`` (the tutorial's resume)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model = net(variant)
    optimizer = adamw(variant)(model)
    state = dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(artifact.path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return parameters(model)


DCP = Framework(
    "dcp",
    "torch.distributed.checkpoint",
    dcp_write,
    net,
    dcp_resume,
    optimizer=adamw,
    parts=("optimizer",),
)


# ---- torchao


def torchao_model(variant: str) -> nn.Module:
    """Today's model, quantized as released (int8 weight-only) before it loads."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = net(variant)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def torchao_write(folder: Path) -> Artifact:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = Net()
    train(model, adamw("unchanged")(model))
    quantize_(model, Int8WeightOnlyConfig())
    path = folder / "int8.pt"
    torch.save(model.state_dict(), path)
    return Artifact(path, list(model.state_dict()), parameters(model), folder)


def torchao_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    """torchao's documented load: the quantized model, ``load_state_dict(assign=True)``."""
    model = torchao_model(variant)
    model.load_state_dict(torch.load(artifact.path, weights_only=True), assign=True)
    return parameters(model)


TORCHAO = Framework("torchao", "torchao", torchao_write, torchao_model, torchao_resume)


# ---- a whole pickled model


def pickled_write(folder: Path) -> Artifact:
    torch.manual_seed(0)
    model = Net()
    train(model, adamw("unchanged")(model))
    path = folder / "model.pt"
    torch.save(model, path)
    return Artifact(path, list(model.state_dict()), parameters(model), folder)


def pickled_resume(artifact: Artifact, variant: str) -> Mapping[str, torch.Tensor]:
    """Unpickled whole (the user trusts the file), its weights into today's model."""
    model = net(variant)
    model.load_state_dict(torch.load(artifact.path, weights_only=False).state_dict())
    return parameters(model)


PICKLED = Framework(
    "pickled-model",
    "torch",
    pickled_write,
    net,
    pickled_resume,
    cli_flags=("--unsafe-unpickle",),
)


FRAMEWORKS = {
    f.name: f for f in (LIGHTNING, TRAINER, TRAINER_PEFT, ACCELERATE, PEFT, DCP, TORCHAO, PICKLED)
}
