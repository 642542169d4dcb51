"""Save, load onto another device, compare every tensor bit for bit.

The loaded copy costs no anonymous memory on the CPU: the file is loaded with
``mmap=True``, and the fresh model is a structural copy of the original built on the meta
device (parameters and buffers are never copied) into which the loaded tensors are
assigned (``load_state_dict(strict=True, assign=True)``), so the model's own
``_load_from_state_dict`` hooks still run. The comparison streams tensor by tensor.
"""

from __future__ import annotations

import copy
import inspect
import os
import random
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from .bitwise import difference
from .errors import (
    CheckpointError,
    StateDictError,
    StateDictMismatch,
    UnsupportedFormatError,
    first_line,
    hide_from_bad_input,
)
from .extract import require_module, schema_of

if TYPE_CHECKING:
    from .session import StateDictSession

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

FORMATS = ("torch", "safetensors", "dcp")


@dataclass
class RoundTripResult:
    """What a round-trip compared and every mismatch it found (empty when exact)."""

    save_device: str
    load_device: str
    format: str
    mismatches: list[str] = field(default_factory=list)
    tensors_compared: int = 0
    bytes_compared: int = 0
    file_bytes: int = 0
    saved_on: tuple[str, ...] = ()
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    #: what the resume check cost, or why it did not run ("" without an optimizer)
    resume: str = ""

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def __bool__(self) -> bool:
        return self.ok

    @property
    def label(self) -> str:
        suffix = "" if self.format == "torch" else f" ({self.format})"
        return f"{self.save_device}->{self.load_device}{suffix}"

    def __str__(self) -> str:
        head = (
            f"round-trip {self.label}: {self.tensors_compared} tensors, "
            f"{self.bytes_compared} bytes compared bit for bit"
        )
        if self.saved_on and set(self.saved_on) != {"cpu"}:
            head += f" (the file was saved on {', '.join(self.saved_on)})"
        verdict = "exact" if self.ok else f"{len(self.mismatches)} mismatch(es)"
        lines = [f"{head}: {verdict}"]
        lines.extend(f"  {m}" for m in self.mismatches)
        lines.extend(f"  warning: {note}" for note in self.notes)
        if self.resume:
            lines.append(f"  resume check: {self.resume}")
        return "\n".join(lines)

    def assert_ok(self) -> None:
        __tracebackhide__ = True
        if not self.ok:
            raise StateDictMismatch(str(self), self)


def roundtrip(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    save_device: str = "cpu",
    load_device: str = "cpu",
    format: str = "torch",
    factory: Callable[[], nn.Module] | None = None,
    scheduler: Any = None,
    check_resume: bool = True,
    directory: str | os.PathLike[str] | None = None,
) -> RoundTripResult:
    """Save ``model`` (and ``optimizer``) on ``save_device``, load onto ``load_device``, compare.

    ``factory`` builds the fresh model to load into (default: a meta-device copy of
    ``model``, filled only by the load). With an optimizer, its state and param_groups
    must come back equal and, with ``check_resume``, one more step of the original and of
    the reloaded optimizer from the same gradients must give bit-identical parameters and
    state (this steps a deep copy, never your model). Never raises on a mismatch: the
    result lists them (``result.assert_ok()`` raises).
    """
    require_module(model, "roundtrip()")
    if format not in FORMATS:
        raise StateDictError(
            f"roundtrip(): format must be one of {', '.join(FORMATS)}, not {format!r}"
        )
    result = RoundTripResult(str(save_device), str(load_device), format)
    started = time.perf_counter()
    with _temporary_dir(directory) as folder:
        original = _on_device(model, save_device)
        result.notes = schema_of(original).notes
        extra = {}
        if scheduler is not None:
            extra["scheduler"] = scheduler.state_dict()
        if format == "dcp":
            fresh, loaded_extra = _dcp_roundtrip(
                original, optimizer, extra, folder, load_device, factory, result
            )
        else:
            if optimizer is not None:
                extra["optimizer"] = optimizer.state_dict()
            path = folder / ("model.safetensors" if format == "safetensors" else "checkpoint.pt")
            _save(original, extra, path, format)
            fresh, loaded_extra = _load_and_compare(
                original, path, format, load_device, factory, result
            )
        result.file_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if optimizer is not None and fresh is not None:
            _compare_optimizer(
                original,
                optimizer,
                fresh,
                loaded_extra.get("optimizer"),
                result,
                check_resume,
                factory,
            )
        if scheduler is not None and fresh is not None:
            _record(result, "scheduler state", difference(
                scheduler.state_dict(), loaded_extra.get("scheduler")))  # fmt: skip
    result.seconds = time.perf_counter() - started
    return result


@contextmanager
def _temporary_dir(directory: str | os.PathLike[str] | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="statedict-roundtrip-", dir=directory) as name:
        yield Path(name)


def _on_device(model: nn.Module, device: str) -> nn.Module:
    """The model on the save device: itself if already there, else a moved deep copy."""
    devices = {t.device for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    if any(d.type == "meta" for d in devices):
        raise StateDictError(
            "roundtrip(): the model has tensors on the meta device: a round-trip needs real "
            "values (use schema_of / assert_state_dict_matches for meta models)"
        )
    target = torch.device(device)
    if all(_same_device(d, target) for d in devices):
        return model
    memo = {id(t): t.detach().clone() for t in _attribute_tensors(model) if not t.is_leaf}
    return _deepcopy(model, memo, "roundtrip()").to(target)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _save(model: nn.Module, extra: Mapping[str, Any], path: Path, format: str) -> None:
    if format == "torch":
        torch.save({"model": model.state_dict(), **extra}, path)
        return
    try:
        from safetensors.torch import save_model
    except ImportError:
        raise StateDictError(
            "roundtrip(format='safetensors') needs the optional dependency: "
            "pip install 'pytest-statedict[safetensors]'"
        ) from None
    refused = safetensors_refusals(model.state_dict())
    if refused:
        shown = _listed(refused)
        raise UnsupportedFormatError(
            f"roundtrip(format='safetensors'): safetensors stores only dense tensors, and "
            f"{type(model).__name__}'s state_dict has {len(refused)} entr"
            f"{'y' if len(refused) == 1 else 'ies'} it cannot hold: {shown}. Round-trip this "
            "model with format='torch'"
        )
    save_model(model, str(path))
    if extra:
        torch.save(dict(extra), path.with_name("extra.pt"))


def _listed(refused: list[str]) -> str:
    return "; ".join(refused[:8]) + (f"; and {len(refused) - 8} more" if len(refused) > 8 else "")


def weights_only_refusals(state: Mapping[str, Any]) -> list[str]:
    """``key (what)`` for each state_dict entry holding a TorchScript object, which
    ``torch.load(weights_only=True)`` refuses (a dynamic-quantized LSTM's packed weights)."""
    refused = []

    def script_objects(value: Any) -> Iterator[Any]:
        if isinstance(value, torch._C.ScriptObject):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from script_objects(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from script_objects(item)

    for key, value in state.items():
        found = next(script_objects(value), None)
        if found is not None:
            refused.append(f"{key} (a TorchScript object, {found._type().qualified_name()})")
    return refused


def safetensors_refusals(state: Mapping[str, Any]) -> list[str]:
    """``key (why)`` for each state_dict entry a safetensors file cannot hold."""
    refused = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            refused.append(f"{key} (a {type(value).__name__}, not a tensor)")
        elif value.is_quantized:
            refused.append(f"{key} (a quantized {str(value.dtype).removeprefix('torch.')} tensor)")
        elif value.layout != torch.strided:
            refused.append(f"{key} (a {str(value.layout).removeprefix('torch.')} tensor)")
    return refused


def _load_and_compare(
    original: nn.Module,
    path: Path,
    format: str,
    load_device: str,
    factory: Callable[[], nn.Module] | None,
    result: RoundTripResult,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Load the file into a fresh model and compare its state_dict with the original's."""
    from .formats import reading
    from .runtime import checkpoint_loader

    loader = checkpoint_loader()
    if format == "torch":
        try:
            saved, locations = reading.load_file(path, loader=loader, map_location=load_device)
        except CheckpointError:
            refused = weights_only_refusals(original.state_dict())
            if not refused:
                raise
            raise UnsupportedFormatError(
                f"roundtrip(): {type(original).__name__}'s state_dict holds objects that "
                f"torch.load(weights_only=True) refuses to unpickle: {_listed(refused)}. Its "
                "checkpoints load only with weights_only=False, which runs code from the file"
            ) from None
        result.saved_on = tuple(sorted(locations))
        state = saved.pop("model")
        extra = saved
    else:
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(load_device))
        extra_path = path.with_name("extra.pt")
        extra = (
            reading.load_file(extra_path, loader=loader, map_location=load_device)[0]
            if extra_path.exists()
            else {}
        )
    expected = original.state_dict()
    if format == "safetensors":
        # safetensors keeps neither tied names nor module versions (no _metadata): both
        # come back from the saved side, as a torch.save file would give them
        _restore_tied_keys(original, state)
        state = OrderedDict(state)
        state._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    assign = factory is None
    fresh = meta_copy(original) if assign else factory().to(load_device)  # type: ignore[misc]
    try:
        fresh.load_state_dict(state, strict=True, assign=assign)
    except Exception as exc:  # a load hook may raise anything (ValueError, KeyError...)
        said = str(exc).strip() if type(exc) is RuntimeError else first_line(exc)
        result.mismatches.append(f"load_state_dict(strict=True) failed: {said}")
        return None, extra
    if factory is None:
        _retie(original, fresh)
    _compare_state(expected, fresh.state_dict(), result)
    _compare_ties(original, fresh, result)
    return fresh, extra


def _dcp_roundtrip(
    original: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any],
    folder: Path,
    load_device: str,
    factory: Callable[[], nn.Module] | None,
    result: RoundTripResult,
) -> tuple[nn.Module | None, dict[str, Any]]:
    """Save and load through torch.distributed.checkpoint, its planners and state_dict API.

    DCP loads in place, so the fresh model is materialised (uninitialised memory) first.
    DCP signals failure with ``CheckpointException``, a ``BaseException``: it is caught
    and reported like any other mismatch.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is not None and not optimizer.state:
        raise StateDictError(
            "roundtrip(format='dcp'): the optimizer has no state yet, and DCP's get_state_dict "
            "would step it to create some; step it once before the round-trip"
        )
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(original, optimizers)
    saved = {"model": model_state, **({"optim": optim_state} if optimizer is not None else {})}
    checkpoint = folder / "dcp"
    if extra:
        torch.save(extra, folder / "extra.pt")
    fresh = (
        factory().to(load_device)  # type: ignore[misc]
        if factory is not None
        else _materialised_copy(original, load_device)
    )
    fresh_opt = _rebuild_optimizer(original, optimizer, fresh) if optimizer is not None else None
    # one process, no process group: torch >= 2.7 says so with no_dist, older ones assume it
    single = {"no_dist": True} if "no_dist" in inspect.signature(dcp.save).parameters else {}
    try:
        dcp.save(saved, checkpoint_id=checkpoint, **single)
        template_model, template_optim = get_state_dict(fresh, [fresh_opt] if fresh_opt else [])
        template = {"model": template_model}
        if fresh_opt is not None:
            template["optim"] = template_optim
        dcp.load(template, checkpoint_id=checkpoint, **single)
        set_state_dict(
            fresh,
            [fresh_opt] if fresh_opt is not None else [],
            model_state_dict=template["model"],
            optim_state_dict=template.get("optim", {}),
        )
    except (CheckpointException, RuntimeError, KeyError, ValueError) as exc:
        result.mismatches.append(f"torch.distributed.checkpoint failed: {first_line(exc)}")
        return None, {}
    _compare_state(original.state_dict(), fresh.state_dict(), result)
    _compare_ties(original, fresh, result)
    loaded = torch.load(folder / "extra.pt", weights_only=True) if extra else {}
    if fresh_opt is not None:
        loaded["optimizer"] = fresh_opt.state_dict()
    return fresh, loaded


def _materialised_copy(model: nn.Module, device: str) -> nn.Module:
    """A copy with uninitialised tensors on ``device``, tied as the original is."""
    fresh = meta_copy(model).to_empty(device=device)
    _retie(model, fresh, only_shared_storage=False)
    return fresh


def meta_copy(model: nn.Module, *, caller: str = "roundtrip()") -> nn.Module:
    """A deep copy of the module structure whose parameters and buffers are on meta.

    Costs no memory for tensors, and keeps ties: a tensor shared by two modules maps to
    one meta tensor. Tensors held as plain attributes (legacy ``weight_norm``'s recomputed
    ``weight``, caches) become meta tensors too: they are no state, and a non-leaf one
    cannot be deep-copied at all. A model that still cannot be copied is refused with a
    message naming ``factory=``, the way to build the copy by the user's own code.
    """
    memo: dict[int, Any] = {}
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    for tensor in tensors:
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = empty
    for tensor in _attribute_tensors(model):
        memo.setdefault(id(tensor), torch.empty_like(tensor, device="meta"))
    return _deepcopy(model, memo, caller)


def _attribute_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors a module holds as plain attributes, outside its parameters and buffers."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                yield value


def _deepcopy(model: nn.Module, memo: dict[int, Any], caller: str) -> nn.Module:
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # whatever a module's __deepcopy__ or a tensor's raises
        raise StateDictError(
            f"{caller}: {type(model).__name__} cannot be copied to load into "
            f"({first_line(exc, 300)}); pass factory=<a function that builds a fresh "
            f"{type(model).__name__}> and the checkpoint is loaded into what it returns"
        ) from None


def _parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter object (tied weights), for groups of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _restore_tied_keys(original: nn.Module, state: dict[str, Any]) -> None:
    """safetensors stores a tied tensor under one of its names; give it back its others.

    This is what ``safetensors.torch.load_model`` relies on the model's own tying for.
    """
    for names in _parameter_groups(original):
        present = [n for n in names if n in state]
        if present:
            for name in names:
                state.setdefault(name, state[present[0]])


def _retie(original: nn.Module, fresh: nn.Module, *, only_shared_storage: bool = True) -> None:
    """Make the fresh copy's parameters tied where the original's are.

    ``assign=True`` and ``to_empty`` make one Parameter per key. After a load, only keys
    whose loaded tensors share storage (the file stored them as one) are re-tied, so a load
    that really broke a tie (two copies) is still reported.
    """
    for names in _parameter_groups(original):
        first = fresh.get_parameter(names[0])
        for name in names[1:]:
            other = fresh.get_parameter(name)
            if other is first or (only_shared_storage and _storage(other) != _storage(first)):
                continue
            owner, _, attr = name.rpartition(".")
            setattr(fresh.get_submodule(owner), attr, first)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.storage_offset()


def _compare_state(
    expected: Mapping[str, Any], actual: Mapping[str, Any], result: RoundTripResult
) -> None:
    for key in expected:
        if key not in actual:
            result.mismatches.append(f"{key}: missing after loading")
    for key in actual:
        if key not in expected:
            result.mismatches.append(f"{key}: unexpected after loading")
    for key, e in expected.items():
        if key not in actual:
            continue
        _record(result, key, difference(e, actual[key]))
        if isinstance(e, torch.Tensor):
            result.tensors_compared += 1
            result.bytes_compared += e.numel() * e.element_size()


def _record(result: RoundTripResult, key: str, problem: str | None) -> None:
    if problem:
        result.mismatches.append(f"{key}: {problem}")


def _compare_ties(original: nn.Module, fresh: nn.Module, result: RoundTripResult) -> None:
    for names in _parameter_groups(original):
        loaded = [fresh.get_parameter(n) for n in names]
        if any(p is not loaded[0] for p in loaded[1:]):
            result.mismatches.append(
                f"{' and '.join(names)}: tied in the original, no longer tied after loading"
            )


def _compare_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fresh_model: nn.Module,
    loaded_state: Mapping[str, Any] | None,
    result: RoundTripResult,
    check_resume: bool,
    factory: Callable[[], nn.Module] | None,
) -> None:
    if loaded_state is None:
        result.mismatches.append("optimizer: its state_dict did not come back from the file")
        return
    expected = optimizer.state_dict()
    _record(result, "optimizer param_groups",
            difference(expected["param_groups"], loaded_state["param_groups"]))  # fmt: skip
    _compare_state(
        {
            f"optimizer state[{i}].{k}": v
            for i, s in expected["state"].items()
            for k, v in s.items()
        },
        {
            f"optimizer state[{i}].{k}": v
            for i, s in loaded_state["state"].items()
            for k, v in s.items()
        },
        result,
    )
    never_loaded = [n for n, p in fresh_model.named_parameters() if p.is_meta]
    if never_loaded:  # reported with the tensors: there is nothing to resume from
        result.mismatches.append(
            "optimizer: not reloaded or resumed, the load left parameters without values ("
            + ", ".join(never_loaded[:5])
            + (", ..." if len(never_loaded) > 5 else "")
            + ")"
        )
        return
    fresh_opt = _rebuild_optimizer(model, optimizer, fresh_model)
    try:
        fresh_opt.load_state_dict(loaded_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        result.mismatches.append(f"optimizer.load_state_dict failed: {exc}")
        return
    _record(result, "optimizer after load_state_dict",
            difference(_cpu(expected), _cpu(fresh_opt.state_dict())))  # fmt: skip
    if check_resume:
        _check_resume(model, optimizer, fresh_model, fresh_opt, result, factory)


def _rebuild_optimizer(
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


def _check_resume(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fresh: nn.Module,
    fresh_opt: torch.optim.Optimizer,
    result: RoundTripResult,
    factory: Callable[[], nn.Module] | None,
) -> None:
    """One more step from the same gradients: the original (a copy) and the reloaded.

    Its cost is one optimizer step on each side, a copy of the model and optimizer, and
    one more comparison; ``result.resume`` states it. Both steps see the same gradients
    and the same random numbers (torch's and Python's generators seeded alike), so an
    optimizer that draws random numbers resumes exactly when its state_dict holds all it
    keeps. A step that needs what the check cannot give (second-order gradients) is
    skipped, with the reason.
    """
    if getattr(optimizer, "is_second_order", False):
        result.resume = (
            f"skipped: {type(optimizer).__name__} is a second-order optimizer, its step needs "
            "gradients from backward(create_graph=True); its state was compared exactly"
        )
        return
    started = time.perf_counter()
    outside = _state_outside_state_dict(optimizer, fresh_opt)
    stepped = _representatives(model, optimizer)
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
    before = len(result.mismatches)
    _compare_state(
        {f"after one more step: {k}": v for k, v in twin_model.state_dict().items()},
        {f"after one more step: {k}": v for k, v in fresh.state_dict().items()},
        result,
    )
    _record(result, "optimizer after one more step",
            difference(_cpu(twin_opt.state_dict()), _cpu(fresh_opt.state_dict())))  # fmt: skip
    if len(result.mismatches) > before:
        result.mismatches.append("resuming from the checkpoint does not continue training exactly")
        if outside:
            result.mismatches.append(
                f"{type(optimizer).__name__} keeps state outside its state_dict, which a "
                f"checkpoint does not carry: {', '.join(outside)}"
            )
    total = sum(len(group["params"]) for group in optimizer.param_groups)
    which = (
        f"{len(stepped)} of {total} parameters (one per group, dtype and shape)"
        if stepped is not None and len(stepped) < total
        else "every parameter"
    )
    result.resume = (
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
    grads = {}
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

            def same_loss() -> torch.Tensor:
                # re-evaluated by a line search: the same gradients, the same loss
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
    memo = {id(t): t.detach().clone() for t in _attribute_tensors(model) if not t.is_leaf}
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
        _retie(model, twin_model)
        twin_opt = _rebuild_optimizer(model, optimizer, twin_model)
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


def _repack(original: nn.Module, twin: nn.Module) -> None:
    """Pack the twin's quantized weights from the twin's tensors (see ``_resume_twin``)."""
    packed = list(_packed_modules(original))
    if not packed:
        return
    own: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}
    for name, t in original.named_parameters(remove_duplicate=False):
        own[(*_storage(t), tuple(t.shape))] = twin.get_parameter(name)
    for name, t in original.named_buffers(remove_duplicate=False):
        own[(*_storage(t), tuple(t.shape))] = twin.get_buffer(name)

    def twin_of(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        shared = own.get((*_storage(t), tuple(t.shape)))
        return shared.detach() if shared is not None else t.detach().clone()

    for name, module in packed:
        weight, bias = module._weight_bias()  # type: ignore[operator]
        twin.get_submodule(name).set_weight_bias(twin_of(weight), twin_of(bias))  # type: ignore[operator]


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


# ---- pytest: the marker and the fixture ---------------------------------------------------


def default_devices() -> list[str]:
    """cpu plus the accelerator; ``cuda`` when there is none, so CPU-only CI shows the skips."""
    accelerator = None
    if hasattr(torch, "accelerator"):
        try:
            current = torch.accelerator.current_accelerator()
        except RuntimeError:  # torch 2.6 raises where there is none, later ones return None
            current = None
        accelerator = current.type if current is not None else None
    elif torch.cuda.is_available():
        accelerator = "cuda"
    return ["cpu", accelerator or "cuda"]


def device_available(device: str) -> bool:
    d = torch.device(device)
    if d.type == "cpu":
        return True
    if d.type == "cuda":
        return torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count()
    if d.type == "mps":
        return torch.backends.mps.is_available()
    module = getattr(torch, d.type, None)
    is_available = getattr(module, "is_available", None)
    return bool(is_available()) if callable(is_available) else False


def parametrize_roundtrip(metafunc: pytest.Metafunc, marker: pytest.Mark) -> None:
    name = metafunc.definition.name
    if "statedict_roundtrip" not in metafunc.fixturenames:
        raise pytest.UsageError(
            f"{name}: the statedict_roundtrip marker parametrizes the statedict_roundtrip "
            "fixture; add `statedict_roundtrip` to the test's arguments"
        )
    # devices named on the marker win; --statedict-devices replaces the default
    explicit = marker.kwargs.get("devices") or (marker.args[0] if marker.args else None)
    option = metafunc.config.getoption("statedict_devices")
    if explicit:
        devices, source = list(explicit), f"{name}: statedict_roundtrip(devices=...)"
    elif option:
        devices = [d.strip() for d in option.split(",") if d.strip()]
        source = "--statedict-devices"
    else:
        devices, source = default_devices(), "statedict_roundtrip"
    formats = list(marker.kwargs.get("formats", ("torch",)))
    for device in devices:
        try:
            torch.device(device)
        except RuntimeError:
            raise pytest.UsageError(f"{source}: unknown device {device!r}") from None
    for fmt in formats:
        if fmt not in FORMATS:
            raise pytest.UsageError(
                f"{name}: statedict_roundtrip: unknown format {fmt!r} (one of {', '.join(FORMATS)})"
            )
    combos = [(s, d, f) for f in formats for s in devices for d in devices]
    ids = [f"{s}->{d}" + ("" if f == "torch" else f"-{f}") for s, d, f in combos]
    metafunc.parametrize("statedict_roundtrip", combos, ids=ids, indirect=True)


class RoundTripFixture:
    """``statedict_roundtrip(model, optimizer=None, **opts)``: one round-trip, asserted exact.

    ``save_device``, ``load_device`` and ``format`` tell the test its combination (build
    the model on ``save_device``).
    """

    def __init__(
        self, session: StateDictSession, save_device: str, load_device: str, format: str
    ) -> None:
        self._session = session
        self.save_device = save_device
        self.load_device = load_device
        self.format = format

    @classmethod
    def for_request(
        cls, request: pytest.FixtureRequest, session: StateDictSession
    ) -> RoundTripFixture:
        save, load, fmt = getattr(request, "param", ("cpu", "cpu", "torch"))
        for device in (save, load):
            if not device_available(device):
                reason = (
                    f"statedict round-trip {save}->{load}: device {device!r} is not available "
                    "on this machine"
                )
                label = RoundTripResult(save, load, fmt).label
                session.check_finished("roundtrip", label, "skipped", reason=reason)
                pytest.skip(reason)
        return cls(session, save, load, fmt)

    def __call__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **opts: Any
    ) -> RoundTripResult:
        __tracebackhide__ = True
        try:
            result = roundtrip(
                model,
                optimizer,
                save_device=self.save_device,
                load_device=self.load_device,
                format=self.format,
                **opts,
            )
        except UnsupportedFormatError as exc:
            # the model cannot be stored in this format at all: not a failure of the
            # checkpointing under test, a combination that does not apply (as a device
            # this machine lacks)
            label = RoundTripResult(self.save_device, self.load_device, self.format).label
            self._session.check_finished("roundtrip", label, "skipped", exc)
            pytest.skip(f"statedict round-trip {self.save_device}->{self.load_device}: {exc}")
        except Exception as exc:
            # a pair that could not even be tried (a format's extra not installed, a model
            # that cannot be moved) failed: the summary must not drop it from its count
            label = RoundTripResult(self.save_device, self.load_device, self.format).label
            self._session.check_finished("roundtrip", label, "failed", exc)
            raise
        if result.ok:
            self._session.check_finished("roundtrip", result.label, "passed")
        else:
            failure = StateDictMismatch(str(result), result)
            self._session.check_finished("roundtrip", result.label, "failed", failure)
            raise failure
        return result
