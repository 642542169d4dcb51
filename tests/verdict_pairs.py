"""Refactor pairs for the one-verdict table (tests/test_one_verdict.py).

Each row is a model as a release saved it (v1) and as it is today (v2), with the optimizer
each was trained with, one step taken. Its old artifact is one file (a general checkpoint,
or a ``.safetensors`` of the model alone): every surface judges the same pair from the
same file. ``v1_<row>`` and ``v2_<row>`` build ``(model, optimizer)``, so that
``statedict diff --model verdict_pairs:v2_<row>`` and ``statedict_releases`` can too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class Net(nn.Module):
    """A small model whose parts the rows change one at a time."""

    def __init__(
        self,
        *,
        head: str = "head",
        width: int = 4,
        kernel: int = 3,
        dtype: torch.dtype = torch.float32,
        extra_buffer: bool = False,
        drop_norm: bool = False,
        swapped: bool = False,
    ) -> None:
        super().__init__()
        # two blocks of one shape: registered the other way round, their names swap
        # positions in model.parameters() (the optimizer's numbering) but not in shape
        first, second = ("b", "a") if swapped else ("a", "b")
        setattr(self, first, nn.Linear(6, 6))
        setattr(self, second, nn.Linear(6, 6))
        self.conv = nn.Conv1d(1, 2, kernel)
        if not drop_norm:
            self.norm = nn.LayerNorm(6)
        setattr(self, head, nn.Linear(6, width).to(dtype))
        if extra_buffer:
            self.register_buffer("scale", torch.ones(6))


class Versioned(nn.Module):
    """Version 2 renamed ``w`` to ``weight``; its load hook converts version-1 checkpoints.

    ``refuse_old``: the hook refuses them instead (a project that dropped the conversion);
    ``refuse_unversioned``: it refuses a checkpoint with no module versions at all, as
    torchvision's MNASNet does (a ``.safetensors`` file keeps none).
    """

    _version = 2

    def __init__(self, *, refuse_old: bool = False, refuse_unversioned: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.ones(4))
        self.refuse_old = refuse_old
        self.refuse_unversioned = refuse_unversioned

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        version = local_metadata.get("version")
        if version is None and self.refuse_unversioned:
            raise ValueError("Versioned: a checkpoint without module versions is not supported")
        if version is not None and version < 2:
            if self.refuse_old:
                raise ValueError(f"Versioned: checkpoints of version {version} are not supported")
            if prefix + "w" in state_dict:
                state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )


class VersionedV1(nn.Module):
    """What ``Versioned`` was at version 1: its parameter was called ``w``."""

    _version = 1

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.ones(4))


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)


class Wrapped(nn.Module):
    """``Net`` inside a wrapper, as DataParallel saves it (every key under ``module.``)."""

    def __init__(self) -> None:
        super().__init__()
        self.module = Net()


def named(model: nn.Module, **hyper: Any) -> torch.optim.Optimizer:
    """AdamW over ``model.named_parameters()``: its state_dict names them (torch >= 2.6)."""
    return torch.optim.AdamW(model.named_parameters(), lr=0.01, **hyper)


def positional(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over ``model.parameters()``: its state_dict numbers them by position only."""
    return torch.optim.AdamW(model.parameters(), lr=0.01)


def decay_groups(model: nn.Module, *, swapped: bool = False) -> torch.optim.Optimizer:
    """Weight decay for matrices, none for the rest: two param_groups (swapped: the other order)."""
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim > 1]
    rest = [(n, p) for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [
        {
            "params": [p for _, p in decay],
            "param_names": [n for n, _ in decay],
            "weight_decay": 0.1,
        },
        {"params": [p for _, p in rest], "param_names": [n for n, _ in rest], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups[::-1] if swapped else groups, lr=0.01)


def trainable(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the parameters that still train (a frozen layer leaves the optimizer)."""
    return torch.optim.AdamW(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=0.01
    )


def frozen_conv() -> nn.Module:
    model = Net()
    model.conv.requires_grad_(False)
    return model


def tied() -> nn.Module:
    model = Net(width=6)
    model.head.weight = model.a.weight  # a new tie: both keys stay in the state_dict
    return model


@dataclass(frozen=True)
class Row:
    old_model: Callable[[], nn.Module]
    new_model: Callable[[], nn.Module]
    old_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = named
    new_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = named
    fmt: str = "pt"  # the old artifact: "pt" (a general checkpoint) or "safetensors"
    strip: tuple[str, ...] = ()  # keys the old checkpoint lacks (saved by an older torch)


ROWS: dict[str, Row] = {
    "unchanged": Row(Net, Net),
    "rename": Row(Net, lambda: Net(head="classifier")),
    "widen": Row(Net, lambda: Net(width=6)),
    "kernel": Row(Net, lambda: Net(kernel=5)),
    "freeze": Row(Net, frozen_conv, named, trainable),
    "regroup": Row(Net, Net, named, decay_groups),
    "reorder_groups": Row(Net, Net, decay_groups, lambda m: decay_groups(m, swapped=True)),
    "reorder_modules": Row(Net, lambda: Net(swapped=True)),
    "dtype": Row(Net, lambda: Net(dtype=torch.float64)),
    "hyperparameters": Row(Net, Net, named, lambda m: named(m, weight_decay=0.5)),
    "added_buffer": Row(Net, lambda: Net(extra_buffer=True)),
    "removed_layer": Row(Net, lambda: Net(drop_norm=True)),
    "wrapper_prefix": Row(Net, Wrapped),
    "new_tie": Row(lambda: Net(width=6), tied),
    "hook_conversion": Row(VersionedV1, Versioned),
    "hook_refusal": Row(VersionedV1, lambda: Versioned(refuse_old=True)),
    "missing_versions": Row(
        lambda: Versioned(refuse_unversioned=True),
        lambda: Versioned(refuse_unversioned=True),
        fmt="safetensors",
    ),
    "batchnorm_count": Row(Normed, Normed, strip=("bn.num_batches_tracked",)),
    "positional_unchanged": Row(Net, Net, positional, positional),
    "positional_widen": Row(Net, lambda: Net(width=6), positional, positional),
    "positional_reorder": Row(Net, lambda: Net(swapped=True), positional, positional),
}


def stepped(model: nn.Module, make: Callable[[nn.Module], torch.optim.Optimizer]) -> Any:
    """``make(model)``, one step taken from fixed gradients (so that it has state)."""
    torch.manual_seed(0)
    optimizer = make(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    return optimizer


def build(row: str, version: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    spec = ROWS[row]
    torch.manual_seed(0)
    model = (spec.old_model if version == "v1" else spec.new_model)()
    return model, stepped(model, spec.old_optimizer if version == "v1" else spec.new_optimizer)


def today_optimizer(row: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """Today's optimizer over a given model (what ``optimizer=`` of a gate is handed)."""
    return lambda model: stepped(model, ROWS[row].new_optimizer)


def __getattr__(name: str) -> Callable[[], tuple[nn.Module, torch.optim.Optimizer]]:
    version, _, row = name.partition("_")
    if version in ("v1", "v2") and row in ROWS:
        return lambda: build(row, version)
    raise AttributeError(name)
