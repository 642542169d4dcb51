"""A small image classifier, as a project would have it.

The classic CNN of the PyTorch recipe "What is a state_dict in PyTorch" (conv1, pool,
conv2, fc1, fc2, fc3) with a BatchNorm after conv1, and the optimizer the training script
uses: SGD with momentum, in two param groups (weights decay; biases and norm parameters
don't).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """32x32 RGB images in, ``num_classes`` logits out."""

    def __init__(self, width: int = 6, hidden: int = 120, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 5)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(width, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, hidden)
        self.fc2 = nn.Linear(hidden, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build(seed: int = 0, **config: int) -> Net:
    """The model, initialised from ``seed``: ``build()``, ``build(width=16)``.

    ``config`` overrides the defaults of :class:`Net` (``width``, ``hidden``, ``num_classes``).
    """
    torch.manual_seed(seed)
    return Net(**config)


def make_optimizer(
    model: nn.Module, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD with momentum; weight decay on conv and linear weights only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm = isinstance(model.get_submodule(name.rpartition(".")[0]), nn.BatchNorm2d)
        (no_decay if name.endswith("bias") or is_norm else decay).append(param)
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=momentum,
    )


def model_and_optimizer(**config: int) -> tuple[Net, torch.optim.SGD]:
    """The model and its optimizer as training makes them. ``statedict record CKPT
    --release NAME --model cnn_model:model_and_optimizer`` builds them to name the
    parameter each saved optimizer state belongs to (a checkpoint holds only positions)."""
    model = build(**config)
    return model, make_optimizer(model)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: int = 4, num_classes: int = 10
) -> float:
    """One step on random data (enough to give the optimizer its momentum buffers)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()
