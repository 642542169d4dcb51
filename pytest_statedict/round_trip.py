"""Save, load onto another device, compare every tensor bit for bit.

The loaded copy costs no anonymous memory on the CPU: the file is loaded with
``mmap=True``, and the fresh model is a structural copy of the original built on the meta
device (parameters and buffers are never copied) into which the loaded tensors are
assigned (``load_state_dict(strict=True, assign=True)``), so the model's own
``_load_from_state_dict`` hooks still run. The comparison streams tensor by tensor.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import resume_check
from .bitwise import compare_states, difference, on_cpu
from .errors import (
    CheckpointError,
    StateDictError,
    StateDictMismatch,
    UnsupportedFormatError,
    first_line,
    hide_from_bad_input,
)
from .extract import require_module, schema_of
from .model_copy import (
    attribute_tensors,
    copy_module,
    materialised_copy,
    meta_copy,
    restore_tied_keys,
    retie,
    tied_parameter_groups,
)

if TYPE_CHECKING:
    pass

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
    memo = {id(t): t.detach().clone() for t in attribute_tensors(model) if not t.is_leaf}
    return copy_module(model, memo, "roundtrip()").to(target)


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
        restore_tied_keys(original, state)
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
        retie(original, fresh)
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
        else materialised_copy(original, load_device)
    )
    fresh_opt = (
        resume_check.rebuild_optimizer(original, optimizer, fresh)
        if optimizer is not None
        else None
    )
    # one process, no process group: torch >= 2.7 says so with no_dist, older ones assume it
    single = {"no_dist": True} if "no_dist" in inspect.signature(dcp.save).parameters else {}
    try:
        dcp.save(saved, checkpoint_id=checkpoint, **single)
        template_model, template_optim = get_state_dict(fresh, [fresh_opt] if fresh_opt else [])
        template: dict[str, Any] = {"model": template_model}
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


def _compare_state(
    expected: Mapping[str, Any], actual: Mapping[str, Any], result: RoundTripResult
) -> None:
    mismatches, tensors, nbytes = compare_states(expected, actual)
    result.mismatches.extend(mismatches)
    result.tensors_compared += tensors
    result.bytes_compared += nbytes


def _record(result: RoundTripResult, key: str, problem: str | None) -> None:
    if problem:
        result.mismatches.append(f"{key}: {problem}")


def _compare_ties(original: nn.Module, fresh: nn.Module, result: RoundTripResult) -> None:
    for names in tied_parameter_groups(original):
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
    fresh_opt = resume_check.rebuild_optimizer(model, optimizer, fresh_model)
    try:
        fresh_opt.load_state_dict(dict(loaded_state))
    except (RuntimeError, ValueError, KeyError) as exc:
        result.mismatches.append(f"optimizer.load_state_dict failed: {exc}")
        return
    _record(result, "optimizer after load_state_dict",
            difference(on_cpu(expected), on_cpu(fresh_opt.state_dict())))  # fmt: skip
    if check_resume:
        mismatches, result.resume = resume_check.check_resume(
            model, optimizer, fresh_model, fresh_opt, factory
        )
        result.mismatches.extend(mismatches)


# ---- pytest: the marker and the fixture ---------------------------------------------------
