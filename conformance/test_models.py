"""The conformance sweep: every architecture of ``architectures.py`` through every operation.

One test, parametrized as (architecture, operation), so that pytest's output is the table
(``conftest.py`` also prints it as a grid). A row passes, or is skipped with a reason a
user would accept (the model is above the sweep's size cap; an operation that does not
apply). Everything else, a crash from inside torch included, is a failure.

Each architecture is built once per worker (the rows of one architecture run together on
one worker: ``--dist loadgroup``), seeded, with its optimizer stepped once from fixed
gradients, and reused by its operations, none of which changes it.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import FAMILIES, MAX_PARAMS, SWEEP_VARIANTS, Architecture, all_architectures
from torch import nn

from pytest_statedict import (
    CheckpointError,
    Schema,
    StateDictMismatch,
    UnsupportedFormatError,
    assert_checkpoint_loads,
    assert_state_dict_matches,
    roundtrip,
    schema_of,
)
from pytest_statedict.cli import main as statedict_main

ARCHITECTURES = {a.name: a for a in all_architectures()}

MODEL_OPS = (
    "schema",
    "json",
    "twin",
    "refactor",
    "roundtrip_torch",
    "roundtrip_safetensors",
    "file_schema",
    "show",
    "file_gate",
    "snapshot_gate",
)
# Optimizer and scheduler rows train one small MLP: the model-level operations are the
# model rows' job; these check what the optimizer (or scheduler) adds.
OPTIMIZER_OPS = (
    "schema",
    "json",
    "twin",
    "roundtrip_torch",
    "roundtrip_safetensors",
    "file_schema",
)
SCHEDULER_OPS = ("roundtrip_torch", "roundtrip_safetensors")
# What a family's larger members leave to its smallest (architectures.FAMILIES: the same
# module classes and keys at other sizes): the operations that build the model again or
# write and reload it with its optimizer. Their rows stay, skipped with that reason.
FAMILY_OPS = ("twin", "refactor", "roundtrip_torch", "roundtrip_safetensors")


def operations(arch: Architecture) -> tuple[str, ...]:
    group = arch.name.split("/")[0]
    if group in ("optim", "timm-optim"):
        return OPTIMIZER_OPS
    if group == "sched":
        return SCHEDULER_OPS
    ops = MODEL_OPS
    if arch.hf and not arch.quantized:
        ops += ("pretrained_schema",)
    if arch.wrapper_prefix:
        ops += ("prefix_rename",)
    return ops


ROWS = [(a, op) for a in ARCHITECTURES.values() for op in operations(a)]


def marks(arch: Architecture, op: str) -> list[pytest.MarkDecorator]:
    found = [pytest.mark.xdist_group(arch.name)]
    if arch.variant_of and op in FAMILY_OPS and not SWEEP_VARIANTS:
        found.append(
            pytest.mark.skip(
                reason=f"run on {arch.variant_of}, the smallest of its family "
                "(STATEDICT_SWEEP_VARIANTS=all runs it here too)"
            )
        )
    return found


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "row" in metafunc.fixturenames:
        metafunc.parametrize(
            "row",
            [pytest.param((a.name, op), id=f"{a.name}-{op}", marks=marks(a, op)) for a, op in ROWS],
        )


# ---------------------------------------------------------------------- the subject


@dataclass
class Subject:
    """One architecture, built, its optimizer stepped once, and its files on disk."""

    arch: Architecture
    model: nn.Module
    optimizer: Any
    scheduler: Any
    folder: Path
    _torch_file: Path | None = None
    _snapshot: Path | None = None
    _schema: Schema | None = None
    _twin: tuple[nn.Module, Any] | None = None
    unsafe_file: str | None = None  # why torch.load(weights_only=True) refuses torch_file

    @property
    def schema(self) -> Schema:
        """``schema_of(model, optimizer=...)``, read once: the operations compare it, the
        snapshot is its text, and none of them changes the model."""
        if self._schema is None:
            self._schema = schema_of(self.model, optimizer=self.optimizer)
        return self._schema

    @property
    def twin(self) -> tuple[nn.Module, Any]:
        """A second build of the architecture, seeded and stepped as the first (twin's)."""
        if self._twin is None:
            model, optimizer, _ = build(self.arch)
            self._twin = (model, optimizer)
        return self._twin

    def take_twin(self) -> nn.Module:
        """The twin's model for a refactor to rename in place (built here if twin did not
        run): refactor's check is by key and shape, which the stepped twin shares with a
        fresh build, so the architecture is built twice in all, not three times."""
        model, _ = self.twin
        self._twin = None
        return model

    @property
    def torch_file(self) -> Path:
        """``torch.save(model.state_dict())``: what a plain training script writes."""
        if self._torch_file is None:
            self._torch_file = self.folder / "model.pt"
            state = self.model.state_dict()
            torch.save(state, self._torch_file)
            if all(type(value) is torch.Tensor for value in state.values()):
                # plain tensors (quantized ones too) are what weights_only=True always
                # loads; a wrong guess here fails the file rows loudly, it hides nothing
                return self._torch_file
            try:
                torch.load(self._torch_file, weights_only=True)
            except Exception as exc:  # a dynamic-quantized LSTM pickles torch.ScriptObject
                lines = str(exc).splitlines()
                found = [x for x in lines if "Unsupported global" in x] or lines[:1]
                self.unsafe_file = found[0].split(" was not an allowed")[0].strip()[:200]
        return self._torch_file

    @contextlib.contextmanager
    def reading_file(self) -> Any:
        """An operation on ``torch_file``; where torch itself refuses to load it with
        weights_only=True, the right answer is a CheckpointError saying so (then a skip)."""
        self.torch_file  # noqa: B018 (writes it, and learns whether it is safe to load)
        if self.unsafe_file is None:
            yield
            return
        with pytest.raises((CheckpointError, AssertionError), match="arbitrary code"):
            yield
        pytest.skip(
            "torch.load(weights_only=True) refuses this model's torch.save file too "
            f"({self.unsafe_file}); the plugin refuses it by name"
        )

    @property
    def snapshot(self) -> Path:
        """The snapshot the plugin writes for ``assert_match(model, optimizer=...)``."""
        if self._snapshot is None:
            self._snapshot = self.folder / "snapshot.json"
            self._snapshot.write_text(self.schema.to_json(), encoding="utf-8")
        return self._snapshot


def parameter_count(arch: Architecture) -> int:
    """Counted on the meta device (nothing allocated); a real build where meta cannot.

    A quantized architecture is counted by its float model (``size_model``): the quantized
    one has no parameters (its weights are packed), so it passed the cap at any size, and
    its builder calibrates on real data (torchvision's quantized ResNeXt-101s, 87M and 81M
    float parameters, took a quarter of the sweep's time, built four times each). Counted
    once per worker.
    """
    return cheap_build(arch).parameters


@dataclass(frozen=True)
class CheapBuild:
    """What the meta build tells: the parameter count, the module classes, and the
    state_dict keys with every number as ``#`` (depth adds numbered layers:
    ``denselayer18``, ``block3-5``, ``features.12``)."""

    parameters: int
    classes: frozenset[str]
    keys: frozenset[str]


_CHEAP: dict[str, CheapBuild] = {}


def cheap_build(arch: Architecture) -> CheapBuild:
    """``arch`` built once per worker on meta (its float model if quantized): the subject's
    size cap and the family check ask the same build (they built it three times)."""
    if arch.name not in _CHEAP:
        model = built_cheaply(arch.size_model or arch.build)
        _CHEAP[arch.name] = CheapBuild(
            sum(p.numel() for p in model.parameters()),
            frozenset(f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()),
            frozenset(re.sub(r"\d+", "#", k) for k in model.state_dict()),
        )
    return _CHEAP[arch.name]


def built_cheaply(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device; with its parameters on meta where the builder does
    arithmetic on tensors (torchvision's RegNets); for real where it calibrates on data
    (quantized models)."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:
        try:
            with _parameters_on_meta():
                return build()
        except Exception:
            return build()


@contextlib.contextmanager
def _parameters_on_meta() -> Any:
    """Each parameter moves to the meta device as its module registers it (accelerate's
    ``init_empty_weights``), so the initialisers that follow fill nothing, while a builder's
    own arithmetic (RegNet's widths: ``torch.arange(...).tolist()``) stays on the CPU: the
    RegNets above the cap, up to 644M parameters, took 5-15 s each to be skipped."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build(arch: Architecture) -> tuple[nn.Module, Any, Any]:
    """The model, seeded, and its optimizer (default AdamW) after one step from fixed grads."""
    torch.manual_seed(0)
    model = arch.build()
    params = [p for p in model.parameters() if p.requires_grad]
    if arch.optimizer is not None:
        optimizer = arch.optimizer(model)
    elif params:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    else:  # a quantized model: its weights are packed, not parameters
        optimizer = None
    scheduler = arch.scheduler(optimizer) if arch.scheduler is not None else None
    if optimizer is not None:
        one_step(model, optimizer)
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(1.0)
            else:
                scheduler.step()
    return model, optimizer, scheduler


def one_step(model: nn.Module, optimizer: Any) -> None:
    """One optimizer step from gradients fixed by a seed (no forward pass: none is needed).

    The loss is sum(c * p + p^2 / 2) over the parameters, c from a seeded generator: the
    same gradients for a model and its twin, and a closure for the optimizers that need
    one (LBFGS) or differentiate it again (timm's AdaHessian). Sparse embeddings get a
    sparse gradient from a real lookup (SparseAdam takes nothing else).
    """
    generator = torch.Generator().manual_seed(1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    coefficients = [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]
    second_order = getattr(optimizer, "is_second_order", False)
    sparse = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        if sparse:
            loss = sum(m(torch.tensor([1, 3, 5])).square().sum() for m in sparse)
        else:
            loss = sum(
                (c * p).sum() + 0.5 * p.square().sum()
                for p, c in zip(params, coefficients, strict=True)
            )
        loss.backward(create_graph=second_order)
        return loss

    if isinstance(optimizer, torch.optim.LBFGS):
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


_CACHE: dict[str, Subject | str] = {}


@pytest.fixture
def subject(row: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Subject:
    name = row[0]
    arch = ARCHITECTURES[name]
    cached = _CACHE.get(name)
    if cached is None:
        _CACHE.clear()  # one architecture at a time: rows of one run together
        if MAX_PARAMS:
            count = parameter_count(arch)
            if count > MAX_PARAMS:
                _CACHE[name] = (
                    f"{count / 1e6:.1f}M parameters, above the sweep's cap of "
                    f"{MAX_PARAMS / 1e6:g}M (STATEDICT_SWEEP_MAX_PARAMS=0 runs it)"
                )
        if name not in _CACHE:
            model, optimizer, scheduler = build(arch)
            folder = tmp_path_factory.mktemp(re.sub(r"\W+", "_", name))
            _CACHE[name] = Subject(arch, model, optimizer, scheduler, folder)
        cached = _CACHE[name]
    if isinstance(cached, str):
        pytest.skip(cached)
    return cached


# ------------------------------------------------------------------------- families


def layout(arch: Architecture) -> tuple[frozenset[str], frozenset[str]]:
    """The module classes and the numberless keys (``CheapBuild``); of a quantized model,
    those of the float model it converts module by module (built on meta, where the
    quantized one calibrates on data)."""
    found = cheap_build(arch)
    return found.classes, found.keys


@pytest.mark.parametrize(
    "family", [pytest.param(f, id=f[0]) for f in FAMILIES if f[0] in ARCHITECTURES]
)
def test_variants_are_their_family_at_other_sizes(family: list[str]) -> None:
    """Why a family's larger members may leave twin, refactor and the round-trips to its
    smallest: each has the smallest's module classes and key layout (depth adds indices).
    Built on the meta device; the members above the size cap, whose rows are all skipped,
    only with the cap lifted."""
    first, *others = family
    members = [
        n
        for n in others
        if n in ARCHITECTURES
        and not (MAX_PARAMS and parameter_count(ARCHITECTURES[n]) > MAX_PARAMS)
    ]
    if not members:
        pytest.skip(f"every larger member of {first}'s family is above the size cap")
    expected = layout(ARCHITECTURES[first])
    for name in members:
        if name in ARCHITECTURES:
            assert ARCHITECTURES[name].variant_of == first
            assert layout(ARCHITECTURES[name]) == expected, f"{name} is not {first} resized"


# ------------------------------------------------------------------------- the test


def test_conformance(row: tuple[str, str], subject: Subject) -> None:
    OPERATIONS[row[1]](subject)


def op_schema(s: Subject) -> None:
    """schema_of(model, optimizer=) after one step records every key, shape and state."""
    schema = s.schema
    state = s.model.state_dict()
    assert [t.key for t in schema] == list(state)
    for entry in schema:
        value = state[entry.key]
        if isinstance(value, torch.Tensor):
            assert entry.shape == tuple(value.shape), entry.key
    params = {id(p): p for p in s.model.parameters()}
    assert schema.totals["parameters"] == sum(p.numel() for p in params.values())
    if s.optimizer is not None:
        assert schema.optimizer is not None
        assert schema.optimizer.cls.endswith(type(s.optimizer).__name__)
        stateful = [p for p in s.optimizer.state if s.optimizer.state[p]]
        assert len(schema.optimizer.state) == len(stateful)


def op_json(s: Subject) -> None:
    """Snapshot text -> parse -> text is the identity (plain and with values)."""
    for schema in (s.schema, schema_of(s.model, optimizer=s.optimizer, values=True)):
        text = schema.to_json()
        assert Schema.from_json(text).to_json() == text
    path = s.snapshot
    assert schema_of(path).to_json() == path.read_text(encoding="utf-8")


def op_twin(s: Subject) -> None:
    """A twin rebuilt with the same seed and step matches, values and optimizer included."""
    twin, twin_optimizer = s.twin
    # values: module against module (a Schema or snapshot path as expected= takes no
    # values=: see sweep-findings); the optimizer against the original's schema
    assert_state_dict_matches(twin, s.model, values=True)
    assert_state_dict_matches(twin, s.schema, optimizer=twin_optimizer)


def renamed_module(model: nn.Module) -> tuple[str, str, list[str]]:
    """Rename one submodule of ``model`` in place, as a refactor would; return its old and
    new names and the state_dict keys that move with it.

    The submodule is the owner of the middle key of the state_dict (walking up past
    parametrizations and private holders such as quantized ``_packed_params``).
    """
    keys = list(model.state_dict())
    for key in keys[len(keys) // 2 :] + keys[: len(keys) // 2]:
        parts = key.split(".")[:-1]
        for end in range(len(parts), 0, -1):
            path = parts[:end]
            if path[-1].startswith("_") or "parametrizations" in path:
                continue
            parent = model.get_submodule(".".join(path[:-1]))
            old = path[-1]
            if old not in parent._modules:
                continue
            new = f"{old}_renamed"
            parent._modules = {(new if k == old else k): v for k, v in parent._modules.items()}
            prefix = ".".join(path) + "."
            moved = [k for k in keys if k.startswith(prefix)]
            return ".".join(path), ".".join([*path[:-1], new]), moved
    raise AssertionError(f"no renamable submodule in {type(model).__name__}")


def op_refactor(s: Subject) -> None:
    """A renamed submodule is caught by key: by the snapshot check and by the file gate."""
    refactored = s.take_twin()
    old, _, moved = renamed_module(refactored)
    assert moved, old
    with pytest.raises(StateDictMismatch) as caught:
        assert_state_dict_matches(refactored, s.snapshot)
    message = str(caught.value)
    assert any(k in message for k in moved), f"snapshot check does not name {old}:\n{message}"
    with s.reading_file(), pytest.raises(AssertionError) as caught:
        assert_checkpoint_loads(refactored, s.torch_file)
    message = str(caught.value)
    assert any(k in message for k in moved), f"file gate does not name {old}:\n{message}"


def _roundtrip(s: Subject, format: str) -> None:
    """The round-trip through ``format``; the resume check (one more optimizer step on a
    deep copy and on the reloaded model) in the torch format only: the optimizer's state
    reloads through torch.save in both formats, and the safetensors round-trip still
    compares every weight bit for bit, the ties and the optimizer's state, so a step from
    them is the torch round-trip's step (the check was 40% of a safetensors round-trip's
    CPU time on timm's mobileone_s0)."""
    try:
        result = roundtrip(
            s.model,
            s.optimizer,
            format=format,
            scheduler=s.scheduler,
            check_resume=format == "torch",
        )
    except UnsupportedFormatError as exc:
        # a named refusal of what the format cannot hold (safetensors: quantized tensors and
        # objects; torch with weights_only=True: TorchScript objects) is an answer, as the
        # statedict_roundtrip fixture skips that pair
        pytest.skip(str(exc).splitlines()[0])
    assert result.ok, str(result)


def op_roundtrip_torch(s: Subject) -> None:
    _roundtrip(s, "torch")


def op_roundtrip_safetensors(s: Subject) -> None:
    _roundtrip(s, "safetensors")


def op_file_schema(s: Subject) -> None:
    """A torch.save file reads back as the model's schema and matches the model (for the
    optimizer rows, a general checkpoint matches the model and its optimizer)."""
    if s.arch.optimizer is not None:
        path = s.folder / "checkpoint.pt"
        checkpoint = {
            "model_state_dict": s.model.state_dict(),
            "optimizer_state_dict": s.optimizer.state_dict(),
        }
        torch.save(checkpoint, path)
        schema = schema_of(path)
        assert schema.optimizer is not None
        assert len(schema.optimizer.state) == sum(1 for v in s.optimizer.state.values() if v)
        assert [t.key for t in schema] == list(s.model.state_dict())
        assert_state_dict_matches(s.model, path, optimizer=s.optimizer)
        return
    with s.reading_file():
        assert [t.key for t in schema_of(s.torch_file)] == list(s.model.state_dict())
        assert_state_dict_matches(s.model, s.torch_file)


def op_pretrained_schema(s: Subject) -> None:
    """save_pretrained's folder through schema_of and the gate: it reads, every key it holds
    that the model has keeps its shape and dtype, and the folder loads into the model by
    transformers' rules (tied keys left out, legacy layouts that transformers 5 writes and
    converts on load: MoE experts one by one, the ViT family's attention names)."""
    folder = s.folder / "pretrained"
    if not folder.exists():
        s.model.save_pretrained(folder)
    schema = schema_of(folder)
    assert len(schema.tensors) > 0
    model = schema_of(s.model).by_key()
    for t in schema:
        if t.key in model:
            assert (t.shape, t.dtype) == (model[t.key].shape, model[t.key].dtype), t.key
    assert_checkpoint_loads(s.model, folder)


def op_show(s: Subject) -> None:
    """`statedict show` prints the layer table of the file and of the snapshot."""
    first = next(iter(s.model.state_dict()))
    for path in (s.snapshot, s.torch_file):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = statedict_main(["show", str(path)])
        if path == s.torch_file and s.unsafe_file is not None:
            with s.reading_file():
                assert rc == 0, out.getvalue()
        assert rc == 0, out.getvalue()
        assert first in out.getvalue(), out.getvalue()


def op_file_gate(s: Subject) -> None:
    """The model's own torch.save file loads into it."""
    with s.reading_file():
        assert_checkpoint_loads(s.model, s.torch_file)


def op_snapshot_gate(s: Subject) -> None:
    """The model's own snapshot loads into it."""
    assert_checkpoint_loads(s.model, s.snapshot)


def op_prefix_rename(s: Subject) -> None:
    """A wrapper's prefix: the bare model's snapshot matches with rename=, and without it
    the check fails naming the prefix; the bare model's file passes the gate with rename=."""
    prefix = s.arch.wrapper_prefix
    assert prefix is not None
    bare = s.model.get_submodule(prefix.rstrip("."))
    bare_schema = schema_of(bare)
    strip = [(f"^{re.escape(prefix)}", "")]
    assert_state_dict_matches(s.model, bare_schema, rename=strip)
    with pytest.raises(StateDictMismatch) as caught:
        assert_state_dict_matches(s.model, bare_schema)
    assert prefix in str(caught.value)
    bare_file = s.folder / "bare.pt"
    torch.save(bare.state_dict(), bare_file)
    assert_checkpoint_loads(s.model, bare_file, rename=lambda key: prefix + key)


OPERATIONS = {
    name.removeprefix("op_"): f for name, f in globals().items() if name.startswith("op_")
}
assert set(OPERATIONS) >= {op for _, op in ROWS}
