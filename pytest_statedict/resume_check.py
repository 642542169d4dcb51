"""The resume check: one more optimizer step on the original and on the reloaded copy.

A checkpoint that loads bit for bit can still fail to resume training exactly: state an
optimizer keeps outside its ``state_dict``, random numbers, packed quantized weights that
share storage with a parameter. Both sides take one step from the same gradients and are
compared bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .bitwise import compare_states, difference, on_cpu
from .errors import StateDictError, first_line
from .model_copy import attribute_tensors, retie, storage_key

__all__ = ["check_resume", "rebuild_optimizer"]


def rebuild_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, fresh: nn.Module
) -> torch.optim.Optimizer:
    """The same optimizer class and groups over the fresh model's parameters, matched by name."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    groups = []
    for group in optimizer.param_groups:
        groups.append(
            {**group, "params": [fresh.get_parameter(names[id(p)]) for p in group["params"]]}
        )
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults)


def check_resume(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fresh: nn.Module,
    fresh_opt: torch.optim.Optimizer,
    factory: Callable[[], nn.Module] | None,
) -> tuple[list[str], str]:
    """One more step from the same gradients: the original (a copy) and the reloaded.

    Returns the mismatches after the step, and what the check cost or why it was skipped.
    Its cost is one optimizer step on each side, a copy of the model and optimizer, and
    one more comparison. Both steps see the same gradients
    and the same random numbers (torch's and Python's generators seeded alike), so an
    optimizer that draws random numbers resumes exactly when its state_dict holds all it
    keeps. A step that needs what the check cannot give (second-order gradients) is
    skipped, with the reason.
    """
    if getattr(optimizer, "is_second_order", False):
        return [], (
            f"skipped: {type(optimizer).__name__} is a second-order optimizer, its step needs "
            "gradients from backward(create_graph=True); its state was compared exactly"
        )
    started = time.perf_counter()
    outside = _state_outside_state_dict(optimizer, fresh_opt)
    stepped: set[str] | None = _representatives(model, optimizer)
    twin_model, twin_opt = _resume_twin(model, optimizer, factory)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), _python_random_kept():
        try:
            _step(twin_opt, _gradients(twin_model, stepped, optimizer))
        except Exception:
            # an optimizer that assumes every parameter has a gradient: give all of them one
            stepped = None
            twin_model, twin_opt = _resume_twin(model, optimizer, factory)
            _step(twin_opt, _gradients(twin_model, stepped, optimizer))
        _step(fresh_opt, _gradients(fresh, stepped, optimizer))
    mismatches, _, _ = compare_states(
        {f"after one more step: {k}": v for k, v in twin_model.state_dict().items()},
        {f"after one more step: {k}": v for k, v in fresh.state_dict().items()},
    )
    optimizer_problem = difference(on_cpu(twin_opt.state_dict()), on_cpu(fresh_opt.state_dict()))
    if optimizer_problem:
        mismatches.append(f"optimizer after one more step: {optimizer_problem}")
    if mismatches:
        mismatches.append("resuming from the checkpoint does not continue training exactly")
        if outside:
            mismatches.append(
                f"{type(optimizer).__name__} keeps state outside its state_dict, which a "
                f"checkpoint does not carry: {', '.join(outside)}"
            )
    total = sum(len(group["params"]) for group in optimizer.param_groups)
    which = (
        f"{len(stepped)} of {total} parameters (one per group, dtype and shape)"
        if stepped is not None and len(stepped) < total
        else "every parameter"
    )
    return mismatches, (
        f"one more optimizer step on a copy and on the reloaded model, over {which}, "
        f"{time.perf_counter() - started:.2f} s (check_resume=False skips it)"
    )


def _representatives(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    """The parameters the resume step gives a gradient: one per param group, dtype and
    shape, which prove the optimizer's arithmetic on every kind of state it keeps at a
    fraction of a full step's cost (the loaded state of every parameter was already
    compared bit for bit). Optimizers skip a parameter without a gradient."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen: set[tuple[Any, ...]] = set()
    chosen = set()
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            kind = (index, p.dtype, tuple(p.shape), p.device, p.requires_grad)
            if kind not in seen and id(p) in names:
                seen.add(kind)
                chosen.add(names[id(p)])
    return chosen


def _gradients(
    model: nn.Module, names: set[str] | None, optimizer: torch.optim.Optimizer
) -> dict[torch.Tensor, torch.Tensor]:
    """Fixed gradients for ``names`` (every trainable parameter when None): the same values
    on both sides, a fresh tensor each (an optimizer may change its gradients in place)."""
    sparse = isinstance(optimizer, torch.optim.SparseAdam)
    grads: dict[torch.Tensor, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and (names is None or name in names):
            grad = _fixed_gradient(p)
            grads[p] = grad.to_sparse() if sparse else grad
    return grads


def _fixed_gradient(p: torch.Tensor) -> torch.Tensor:
    """A gradient of varied values that costs a few passes over memory (no random draws)."""
    pattern = torch.arange(p.numel(), dtype=torch.float64, device=p.device)
    pattern.mul_(0.6180339887498949).frac_().sub_(0.5)
    return pattern.to(p.dtype).reshape(p.shape)


def _step(optimizer: torch.optim.Optimizer, grads: Mapping[torch.Tensor, torch.Tensor]) -> None:
    """``optimizer.step()`` from ``grads``, with the closure LBFGS-like optimizers require."""
    torch.manual_seed(0)
    random.seed(0)
    for p, g in grads.items():
        p.grad = g
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    with torch.no_grad():
        if closure is not None and closure.default is inspect.Parameter.empty:

            def same_loss() -> Any:
                # re-evaluated by a line search: the same gradients, the same loss (a
                # tensor, as a training loop's closure returns: some optimizers call .item())
                for p, g in grads.items():
                    p.grad = g.clone()
                return torch.tensor(1.0)

            optimizer.step(same_loss)
        else:
            optimizer.step()


@contextmanager
def _python_random_kept() -> Iterator[None]:
    """Python's ``random`` module state as it was (``_step`` seeds it)."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def _state_outside_state_dict(
    optimizer: torch.optim.Optimizer, reloaded: torch.optim.Optimizer
) -> list[str]:
    """Attributes in which the optimizer differs from its reloaded twin: what
    ``state_dict`` leaves out (a random generator, a step counter kept on the object)."""
    kept = {"state", "param_groups", "defaults"}
    differ = []
    theirs = vars(reloaded)
    for name, value in vars(optimizer).items():
        if name in kept or name.startswith("_") or name not in theirs:
            continue
        other = theirs[name]
        if isinstance(value, random.Random) and isinstance(other, random.Random):
            same = value.getstate() == other.getstate()
        elif isinstance(value, torch.Generator) and isinstance(other, torch.Generator):
            same = torch.equal(value.get_state(), other.get_state())
        elif isinstance(value, (int, float, str, bool, type(None))):
            same = value == other
        else:
            continue
        if not same:
            differ.append(f"{name} ({type(value).__module__}.{type(value).__qualname__})")
    return differ


def _resume_twin(
    model: nn.Module, optimizer: torch.optim.Optimizer, factory: Callable[[], nn.Module] | None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The original model and optimizer, copied to take one more step in their place.

    A deep copy, with two repairs. A non-leaf tensor held as a plain attribute (legacy
    ``weight_norm``'s ``weight``, recomputed from its parameters) is copied detached: it
    cannot be deep-copied. A quantized module's packed weights, a TorchScript object that
    ``deepcopy`` re-packs from the *original's* tensors, are packed again from the copy's
    own, so that what shares storage in the model (a dynamic-quantized decoder whose packed
    bias is a tied parameter) shares it in the copy, as it does in the reloaded model:
    otherwise one more step moves the parameter and not its packed twin, a false mismatch.
    Where no copy can be made, ``factory`` builds one, loaded from the model's state.
    """
    memo = {id(t): t.detach().clone() for t in attribute_tensors(model) if not t.is_leaf}
    try:
        twin_model, twin_opt = copy.deepcopy((model, optimizer), memo)
    except Exception as exc:  # whatever a module's or an optimizer's __deepcopy__ raises
        if factory is None:
            raise StateDictError(
                f"roundtrip(): the resume check steps a copy of {type(model).__name__} and "
                f"its optimizer, and they cannot be copied ({first_line(exc, 300)}); pass "
                "factory=<a function that builds a fresh model>, or check_resume=False"
            ) from None
        devices = [t.device for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
        twin_model = factory().to(devices[0] if devices else "cpu")
        # one deepcopy of the whole state keeps what shares storage sharing it
        twin_model.load_state_dict(copy.deepcopy(model.state_dict()), strict=True, assign=True)
        retie(model, twin_model)
        twin_opt = rebuild_optimizer(model, optimizer, twin_model)
        twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        return twin_model, twin_opt
    _repack(model, twin_model)
    # Optimizer.__getstate__ keeps only defaults, state and param_groups: the data the
    # class set up beside them (LBFGS's flat list of parameters and its cache) is copied
    # with the same memo, so that it names the copy's parameters. Never a function: an LR
    # scheduler's ``step`` wrapper is bound to the original and would step it.
    for name in set(vars(optimizer)) - set(vars(twin_opt)):
        value = vars(optimizer)[name]
        if not callable(value):
            setattr(twin_opt, name, copy.deepcopy(value, memo))
    return twin_model, twin_opt


def _packed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Quantized modules whose weight and bias live packed in a TorchScript object."""
    for name, module in model.named_modules():
        if (
            hasattr(module, "_weight_bias")
            and hasattr(module, "set_weight_bias")
            and any(isinstance(v, torch._C.ScriptObject) for v in vars(module).values())
        ):
            yield name, module


def _place(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """Where a tensor's data is, and its shape: what a packed weight shares with its twin."""
    return (*storage_key(t), tuple(t.shape))


def _repack(original: nn.Module, twin: nn.Module) -> None:
    """Pack the twin's quantized weights from the twin's tensors (see ``_resume_twin``)."""
    packed = list(_packed_modules(original))
    if not packed:
        return
    own: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
    t: torch.Tensor
    for name, t in original.named_parameters(remove_duplicate=False):
        own[_place(t)] = twin.get_parameter(name)
    for name, t in original.named_buffers(remove_duplicate=False):
        own[_place(t)] = twin.get_buffer(name)

    def twin_of(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        shared = own.get(_place(t))
        return shared.detach() if shared is not None else t.detach().clone()

    for name, module in packed:
        weight, bias = module._weight_bias()  # type: ignore[operator]
        twin.get_submodule(name).set_weight_bias(twin_of(weight), twin_of(bias))  # type: ignore[operator]
