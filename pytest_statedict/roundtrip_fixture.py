"""The pytest side of round-trips: the ``statedict_roundtrip`` marker and fixture.

The marker reruns a test once per (save device, load device, format); the fixture runs
:func:`.round_trip.roundtrip` for its combination and records the outcome in the run's
records (the summary line, ``--statedict-report``) through the session's recorder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from .errors import StateDictMismatch, UnsupportedFormatError
from .round_trip import FORMATS, RoundTripResult, roundtrip

if TYPE_CHECKING:
    from .session_api import CheckRecorder

__all__ = ["RoundTripFixture", "default_devices", "device_available", "parametrize_roundtrip"]


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
        self, session: CheckRecorder, save_device: str, load_device: str, format: str
    ) -> None:
        self._session = session
        self.save_device = save_device
        self.load_device = load_device
        self.format = format

    @classmethod
    def for_request(
        cls, request: pytest.FixtureRequest, session: CheckRecorder
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
