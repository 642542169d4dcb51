"""From models, state_dicts, optimizers, checkpoints and files to a :class:`Schema`.

Everything here is O(number of tensors): shapes, dtypes and storage identities are read
from tensor metadata, which works on the meta device and on memory-mapped checkpoints
without touching a byte of data. Only ``values=True`` reads data, one tensor at a time.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import CheckpointError, UnsupportedObjectError, hide_from_bad_input
from .layout import (
    MODEL_KEYS,
    StorageViews,
    Tensors,
    flags,
    hyperparams,
    is_optimizer_state_dict,
    optimizer_state_schema,
    select_part,
    state_specs,
    type_name,
    versions,
)
from .layout import is_state_dict as layout_is_state_dict
from .layout import mapping_schema as layout_mapping_schema
from .readers import dcp_folder, dispatch, hf_index, safetensors_file, snapshot_file
from .readers.dispatch import CheckpointLoader
from .runtime import checkpoint_loader
from .schema import (
    Fingerprint,
    OptimizerSchema,
    ParamGroup,
    ParamState,
    Schema,
    StateSpec,
    TensorEntry,
    dtype_name,
)

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

# Optimizer state that is elementwise: its shape must equal its parameter's. A mismatch
# means the state was restored onto the wrong parameter (a reordered model). A 0-dim
# state under one of these names is per-tensor by design (NovoGrad's ``exp_avg_sq``, a
# layer-wise second moment), never a misplaced elementwise one.
ELEMENTWISE_STATE = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
     "acc_delta", "sum", "prev", "ax", "grad_avg", "exp_inf", "mu_product_buffer"}
)  # fmt: skip


_tensor_specs: dict[tuple[Any, Any], StateSpec] = {}


class _TorchTensors(Tensors):
    """torch tensors, to the walks of ``layout``."""

    types = (torch.Tensor,)

    def entries(
        self, state: Mapping[str, Any], kind_of: Any, *, values: bool
    ) -> tuple[tuple[TensorEntry, ...], tuple[str, ...]]:
        return _entries(state, kind_of, values=values)

    def spec(self, tensor: Any) -> StateSpec:
        # A StateSpec is frozen: the few (shape, dtype) pairs an optimizer repeats for
        # thousands of parameters are each made once and shared, keyed by torch.Size and
        # torch.dtype (hashable)
        key = (tensor.shape, tensor.dtype)
        spec = _tensor_specs.get(key)
        if spec is None:
            if len(_tensor_specs) >= 4096:
                _tensor_specs.clear()
            spec = _tensor_specs[key] = StateSpec(
                shape=tuple(tensor.shape), dtype=dtype_name(tensor.dtype)
            )
        return spec

    def hyperparam(self, tensor: Any) -> dict[str, Any]:
        if tensor.numel() <= 16 and not tensor.is_meta:
            return {"tensor": tensor.detach().cpu().tolist(), "dtype": dtype_name(tensor.dtype)}
        return {"tensor_shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


TORCH_TENSORS = _TorchTensors()


def schema_of(
    obj: Any,
    *,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    values: bool = False,
    weights_only: bool = True,
    part: str | None = None,
) -> Schema:
    """The schema of a module, state_dict, optimizer, general checkpoint or checkpoint file.

    ``optimizer`` adds an optimizer's param_groups and state layout (by parameter name when
    ``obj`` is the module it optimizes). ``values=True`` adds a fingerprint of every tensor.
    ``weights_only=False`` must be asked for by name to unpickle arbitrary objects from a
    file: only do that for files you trust. ``part`` picks one entry of a general
    checkpoint, e.g. ``"modelB_state_dict"`` (``"a/b"`` or ``"optimizer_states/0"`` for
    nested ones).
    """
    if isinstance(obj, Schema):
        if optimizer is not None:
            raise UnsupportedObjectError(
                "schema_of(): a Schema is already a schema; optimizer= applies to a module, "
                "state_dict or checkpoint"
            )
        if values and not obj.has_values:
            raise UnsupportedObjectError(
                "schema_of(): values=True needs a Schema taken with values=True (this one "
                "records no value fingerprints)"
            )
        return obj
    if isinstance(obj, (str, os.PathLike)):
        schema = schema_of_file(
            obj, values=values, weights_only=weights_only, part=part, loader=checkpoint_loader()
        )
        if optimizer is not None:
            schema = _with_optimizer(schema, optimizer_schema(optimizer))
        return schema
    _reject_bound_state_dict(obj)
    if part is not None:
        obj = select_part(obj, part)
    if isinstance(obj, nn.Module):
        return module_schema(obj, optimizer=optimizer, values=values)
    if isinstance(obj, torch.optim.Optimizer):
        return Schema(tensors=(), optimizer=optimizer_schema(obj))
    if isinstance(obj, Mapping):
        schema = mapping_schema(obj, values=values)
        if optimizer is not None:
            schema = _with_optimizer(schema, optimizer_schema(optimizer))
        return schema
    raise UnsupportedObjectError(
        f"schema_of(): cannot take the schema of a {type(obj).__module__}.{type(obj).__qualname__}"
        "; pass an nn.Module, a state_dict (a mapping of names to tensors), an optimizer, a "
        "general checkpoint dict, a checkpoint path or a Schema"
    )


def _reject_bound_state_dict(obj: Any) -> None:
    """``model.state_dict`` (the method) where ``model.state_dict()`` was meant."""
    if inspect.ismethod(obj) and obj.__name__ == "state_dict":
        owner = type(obj.__self__).__name__
        raise UnsupportedObjectError(
            f"got the bound method {owner}.state_dict, not a state_dict: call it, "
            f"`{owner.lower()}.state_dict()` (a classic mistake, also when saving checkpoints)"
        )


def _with_optimizer(schema: Schema, opt: OptimizerSchema) -> Schema:
    return replace(schema, optimizer=opt)


# ---- checkpoint files --------------------------------------------------------------------


def schema_of_file(
    path: str | os.PathLike[str],
    *,
    values: bool = False,
    weights_only: bool = True,
    part: str | None = None,
    loader: CheckpointLoader | None = None,
) -> Schema:
    """The schema of a checkpoint or snapshot file or folder, reading no tensor data if it can.

    ``readers`` recognise the format and read the file; this builds the schema of what a
    torch file or a ``loader`` hook (``pytest_statedict_load_checkpoint``) returns. ``part``
    picks one entry of a general checkpoint (``"modelA_state_dict"``, or a path into nested
    entries: ``"optimizer_states/0"``).
    """
    path = Path(path)
    custom = dispatch.from_hook(path, loader)
    if custom is not None:
        return _object_schema(path, custom, set(), values=values, part=part)
    fmt, where = dispatch.detect(path)
    if fmt == dispatch.DCP:
        if values:
            raise CheckpointError(where, "values=True is not supported for DCP checkpoints")
        return dcp_folder.read_schema(where, part=part)
    if fmt == dispatch.INDEX:
        if part is not None:
            raise CheckpointError(where, "a sharded checkpoint has no parts to choose from")
        return _sharded_schema(where, values=values, loader=loader)
    if fmt == dispatch.SNAPSHOT:
        if part:
            raise CheckpointError(where, "a snapshot holds one schema, without parts")
        snapshot = snapshot_file.read_snapshot(where)
        if values and not snapshot.has_values:
            raise CheckpointError(
                where,
                "values=True needs a snapshot taken with values=True (this one records no "
                "value fingerprints)",
            )
        return snapshot
    return _single_file_schema(where, values=values, weights_only=weights_only, part=part,
                               loader=None)  # fmt: skip


def _single_file_schema(
    path: Path,
    *,
    values: bool,
    weights_only: bool,
    part: str | None,
    loader: CheckpointLoader | None,
) -> Schema:
    """One torch.save or .safetensors file (a shard too): from its header where it can."""
    custom = dispatch.from_hook(path, loader)
    if custom is not None:
        return _object_schema(path, custom, set(), values=values, part=part)
    safetensors = dispatch.file_format(path) == dispatch.SAFETENSORS
    if safetensors and not values and not part:
        return safetensors_file.read_schema(path)
    obj, locations = dispatch.load_file(path, weights_only=weights_only)
    # the safetensors writer sorts the keys: state_dict order is lost
    return _object_schema(path, obj, locations, values=values, part=part, ordered=not safetensors)


def _object_schema(
    path: Path,
    obj: Any,
    locations: set[str],
    *,
    values: bool,
    part: str | None,
    ordered: bool = True,
) -> Schema:
    try:
        if part is not None:
            obj = select_part(obj, part)
        if isinstance(obj, nn.Module):
            schema = module_schema(obj, values=values)
        elif isinstance(obj, dict):
            schema = mapping_schema(obj, values=values)
        else:
            raise UnsupportedObjectError(
                f"it holds a {type(obj).__module__}.{type(obj).__qualname__}, not a state_dict "
                "or a checkpoint dict"
            )
    except UnsupportedObjectError as exc:
        raise CheckpointError(path, str(exc).removeprefix("schema_of(): ")) from None
    return replace(
        schema,
        ordered=ordered,
        saved_on=tuple(sorted(locations)),
        source=str(path),
    )


def _sharded_schema(index: Path, *, values: bool, loader: CheckpointLoader | None) -> Schema:
    """A Hugging Face sharded checkpoint: each shard's own schema, of the keys mapped to it."""
    return hf_index.sharded_schema(
        index,
        lambda shard: _single_file_schema(
            shard, values=values, weights_only=True, part=None, loader=loader
        ),
    )


def load_state_dict_file(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
    part: str | None = None,
    loader: CheckpointLoader | None = None,
) -> tuple[dict[str, Any], set[str]]:
    """The model state_dict inside one checkpoint file: ``part``, or the usual model entry."""
    path = Path(path)
    obj, locations = dispatch.load_file(
        path, loader=loader, map_location=map_location, weights_only=weights_only
    )
    return model_state(path, obj, part=part), locations


def model_state(path: Path, obj: Any, *, part: str | None = None) -> dict[str, Any]:
    """The model state_dict in what a checkpoint file held: ``part``, or the usual model entry."""
    if part is not None:
        try:
            obj = select_part(obj, part)
        except UnsupportedObjectError as exc:
            raise CheckpointError(path, str(exc).removeprefix("schema_of(): ")) from None
    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in MODEL_KEYS:
            if is_state_dict(obj.get(key)):
                return obj[key]
    raise CheckpointError(
        path,
        f"no model state_dict in it (looked for a mapping of names to tensors, at the top "
        f"or under {', '.join(MODEL_KEYS)})",
    )


# ---- modules and state_dicts -------------------------------------------------------------


def module_schema(
    module: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    values: bool = False,
) -> Schema:
    state = module.state_dict(keep_vars=True)
    # One walk over the modules (duplicates included, as state_dict() does) for the
    # parameters, buffers and non-persistent buffers: three named_* walks cost 3x more.
    named_params: list[tuple[str, torch.Tensor]] = []
    buffers: set[str] = set()
    non_persistent: list[str] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        if sub._parameters:
            named_params += [(dot + n, p) for n, p in sub._parameters.items() if p is not None]
        if sub._buffers:
            buffers.update(dot + n for n, b in sub._buffers.items() if b is not None)
            non_persistent += [
                dot + n
                for n in sorted(sub._non_persistent_buffers_set)
                if sub._buffers.get(n) is not None
            ]
    params = {name for name, _ in named_params}

    def kind_of(key: str) -> str:
        if key in params:
            return "parameter"
        if key in buffers:
            return "buffer"
        return "tensor"

    entries, notes = _entries(state, kind_of, values=values)
    opt = None
    if optimizer is not None:
        names = {id(p): n for n, p in reversed(named_params)}  # a tied tensor: its first name
        opt = optimizer_schema(optimizer, names=names)
    return Schema(
        tensors=entries,
        versions=versions(state),
        non_persistent_buffers=tuple(non_persistent),
        optimizer=opt,
        source=f"{type(module).__name__} module",
        notes=notes,
    )


def mapping_schema(obj: Mapping[Any, Any], *, values: bool = False) -> Schema:
    """A bare state_dict, an optimizer's, or a general checkpoint with parts of usual names."""
    return layout_mapping_schema(obj, TORCH_TENSORS, values=values)


def is_state_dict(obj: Any) -> bool:
    """Names to tensors (a few non-tensor entries such as ``_extra_state`` allowed)."""
    return layout_is_state_dict(obj, TORCH_TENSORS)


def _entries(
    state: Mapping[str, Any], kind_of: Any, *, values: bool
) -> tuple[tuple[TensorEntry, ...], tuple[str, ...]]:
    """The entries of a state_dict, and notes on storage that a save would waste.

    Runs once per tensor of models with thousands of them: each attribute is read once.
    """
    views = StorageViews()
    entries = []
    strided = torch.strided
    fingerprints = _fingerprints(state) if values else {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            entries.append(
                TensorEntry(
                    key=key,
                    kind="object",
                    type=type_name(value),
                    fingerprint=fingerprints.get(key),
                )
            )
            continue
        layout = value.layout
        storage = _storage_of(value) if layout == strided else None
        tied_to = None
        if storage is not None:
            used = value.numel() * value.element_size()
            tied_to = views.add(storage._cdata, storage.nbytes, key, used)
        kind = kind_of(key)
        entries.append(
            TensorEntry(
                key,
                kind,
                tuple(value.shape),
                dtype_name(value.dtype),
                bool(value.requires_grad) if kind == "parameter" else None,
                tied_to,
                None if layout == strided else str(layout).removeprefix("torch."),
                str(value.qscheme()).removeprefix("torch.") if value.is_quantized else None,
                None,
                fingerprints.get(key),
            )
        )
    return tuple(entries), views.waste_notes()


def _storage_of(tensor: torch.Tensor) -> Any:
    """The storage behind a strided tensor (meta tensors included); None if it has none."""
    if tensor.numel() == 0:
        return None
    try:
        return tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None


def require_module(obj: Any, caller: str) -> nn.Module:
    """``obj`` if it is a model; else an error that says what was passed and what to pass."""
    if isinstance(obj, nn.Module):
        return obj
    hint = ""
    if isinstance(obj, Mapping):
        hint = (
            ": that looks like a state_dict; pass the model it came from (the check loads "
            "into a fresh copy of the model with its own load_state_dict)"
        )
    elif callable(obj) and getattr(obj, "__name__", "") == "state_dict":
        hint = ": that is the bound method model.state_dict; pass the model itself"
    raise UnsupportedObjectError(
        f"{caller} needs the model (a torch.nn.Module), not a {type_name(obj)}{hint}"
    )


def nothing_to_check(obj: Any) -> UnsupportedObjectError:
    """The error for a check of an object with no tensors (and no optimizer) at all.

    An empty schema matches only another empty one, so such a check would guard nothing;
    it is nearly always a mistake, often layers kept in a plain list or dict, which
    ``nn.Module`` does not register (``nn.ModuleList`` / ``nn.ModuleDict`` do).
    """
    hint = ""
    if isinstance(obj, nn.Module):
        what = f"{type_name(obj)} has nothing in its state_dict"
        non_persistent = [name for name, _ in obj.named_buffers() if name not in obj.state_dict()]
        if non_persistent:
            what += f" (its buffers {', '.join(non_persistent[:5])} are non-persistent)"
        hidden = _unregistered_modules(obj)
        if hidden:
            hint = (
                f"; {', '.join(hidden[:5])} hold(s) modules in a plain list, tuple or dict, "
                "which nn.Module does not register: use nn.ModuleList / nn.ModuleDict"
            )
    elif isinstance(obj, (str, os.PathLike)):
        what = f"{os.fspath(obj)} holds no tensors"
    elif isinstance(obj, Schema):
        what = f"the schema {obj.source or ''} has no keys".replace("  ", " ")
    else:
        what = "an empty state_dict"
    return UnsupportedObjectError(
        f"nothing to check: {what}, so the check would guard nothing{hint}"
    )


def _unregistered_modules(model: nn.Module) -> list[str]:
    internals = set(vars(nn.Module()))  # _modules, _parameters, hooks...
    found = []
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name in internals:
                continue
            items = value.values() if isinstance(value, dict) else value
            if isinstance(value, (list, tuple, dict)) and any(
                isinstance(v, nn.Module) for v in items
            ):
                found.append(f"{prefix}.{name}" if prefix else name)
    return found


# ---- fingerprints ------------------------------------------------------------------------


# Statistics read at most this many elements of a tensor: 64 evenly spaced contiguous blocks.
STAT_SAMPLE, STAT_BLOCKS = Fingerprint.SAMPLE, 64
# Hex digits kept of each block's running digest and of the sample's hashes.
SHORT_HEX = 8


class _Statistics(NamedTuple):
    """What :func:`_statistics` reads from a tensor's sample (see :class:`Fingerprint`)."""

    min: float
    max: float
    mean: float
    std: float
    block_means: tuple[float, ...] = ()
    sample_numbers: str | None = None
    sample_bits: str | None = None
    sample_signs: str | None = None


_NO_STATISTICS = _Statistics(math.nan, math.nan, math.nan, math.nan)


def fingerprint(tensor: torch.Tensor, key: str = "") -> Fingerprint:
    """xxh3-128 of all the bytes with its running digest after each block, plus statistics
    of a fixed sample of the values.

    xxh3 is a non-cryptographic hash: a snapshot guards against accidents, not attackers,
    and xxh3 runs at memory bandwidth (sha256 is ~15x slower here). The hash decides exact
    comparisons; the block digests say where a change begins. The statistics, for
    ``rtol``/``atol`` comparisons and the report, are taken over the whole tensor up to
    2**14 elements and over 64 evenly spaced blocks of it beyond, so their cost does not
    grow with the tensor and the hash sets the speed.
    """
    _require_values(tensor, key)
    t = tensor.detach()
    if t.is_conj() or t.is_neg():  # lazy views: the bytes are those of the unresolved tensor
        t = t.resolve_conj().resolve_neg()
    if t.layout != torch.strided:
        t = t.to_dense()
    quantization = b""
    if t.is_quantized:  # the integers and the scale and zero point(s) that give them value
        quantization = _quantization_bytes(t)
        t = t.int_repr()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return _fingerprint_of(_digests(t, quantization), _statistics_of([t])[0])


def _fingerprint_of(digests: tuple[str, tuple[str, ...]], stats: _Statistics) -> Fingerprint:
    digest, blocks = digests
    return Fingerprint(digest, *stats[:4], blocks, *stats[4:])


def _digests(t: torch.Tensor, tail: bytes = b"") -> tuple[str, tuple[str, ...]]:
    """xxh3-128 of a contiguous CPU tensor's bytes (then ``tail``: a quantized tensor's
    scale and zero points), and 8 hex digits of its running digest at the end of each block.

    One streaming pass, as fast as hashing the bytes at once (a separate hash a block, and
    a whole hash combined from them, would change every snapshot's ``xxh3``); the last
    running digest is the whole hash.
    """
    import xxhash

    running = xxhash.xxh3_128()
    update, hexdigest = running.update, running.hexdigest
    data = memoryview(_bytes_of(t)).cast("B")
    blocks = []
    for start, end in _byte_ranges(tuple(t.shape), t.element_size()):
        update(data[start:end])  # releases the GIL while it hashes
        blocks.append(hexdigest()[:SHORT_HEX])
    if tail:
        update(tail)
    return hexdigest(), tuple(blocks)


@functools.lru_cache(maxsize=4096)
def _byte_ranges(shape: tuple[int, ...], itemsize: int) -> tuple[tuple[int, int], ...]:
    return tuple((s * itemsize, e * itemsize) for s, e in Fingerprint.block_ranges(shape))


def _quantization_bytes(t: torch.Tensor) -> bytes:
    """A quantized tensor's scheme, scale(s), zero point(s) and axis, as bytes to hash."""
    scheme = t.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        params = [torch.tensor([t.q_scale()], dtype=torch.float64),
                  torch.tensor([t.q_zero_point()], dtype=torch.int64)]  # fmt: skip
    else:
        params = [t.q_per_channel_scales().cpu(), t.q_per_channel_zero_points().cpu(),
                  torch.tensor([t.q_per_channel_axis()], dtype=torch.int64)]  # fmt: skip
    out = str(scheme).encode()
    for p in params:
        p = p.contiguous()
        out += bytes(_bytes_of(p))
    return out


def is_tensor_sequence(value: Any) -> bool:
    """A tuple or list of tensors (and ``None``): a quantized module's packed weight and bias."""
    return (
        isinstance(value, (tuple, list))
        and any(isinstance(v, torch.Tensor) for v in value)
        and all(v is None or isinstance(v, torch.Tensor) for v in value)
    )


def sequence_fingerprint(values: tuple[Any, ...] | list[Any], key: str = "") -> Fingerprint:
    """One fingerprint of a tuple of tensors: each one's hash, shape and dtype, hashed.

    A dynamic-quantized ``Linear`` keeps its weight and bias as one ``(weight, bias)``
    state_dict entry; without this a changed bias in it would not be seen. The statistics
    are those of all the elements together (integers for quantized ones).
    """
    import xxhash

    hasher = xxhash.xxh3_128()
    flat = []
    for i, value in enumerate(values):
        if value is None:
            hasher.update(b"None;")
            continue
        part = fingerprint(value, f"{key}[{i}]")
        hasher.update(f"{part.xxh3}:{value.dtype}:{list(value.shape)};".encode())
        plain = value.detach()
        plain = plain.int_repr() if plain.is_quantized else plain
        if plain.layout != torch.strided:
            plain = plain.to_dense()
        if plain.is_complex():
            plain = torch.view_as_real(plain)
        if plain.dtype not in _NO_ARITHMETIC:
            flat.append(plain.reshape(-1).cpu().to(torch.float64))
    both = torch.cat(flat) if flat else torch.empty(0, dtype=torch.float64)
    lo, hi, mean, std = _statistics_of([both])[0][:4]  # no blocks: the parts' hashes, hashed
    return Fingerprint(xxh3=hasher.hexdigest(), min=lo, max=hi, mean=mean, std=std)


# Below this many bytes, hashing on a second thread saves less than starting it costs.
OVERLAP_MIN_BYTES = 16 << 20


def _fingerprints(state: Mapping[str, Any]) -> dict[str, Fingerprint]:
    """The fingerprint of every tensor of a state_dict, hashed on a second thread.

    xxhash releases the GIL while it hashes, so a worker thread hashes the tensors while
    this one takes their statistics (torch calls): where a core is free, the statistics
    cost no time beside the hash. Only tensors hashed where they lie (contiguous, dense,
    on the CPU) go to the worker; the others are copied, fingerprinted and freed here one
    at a time, so memory stays at one tensor's temporaries.
    """
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    sequences = {k: v for k, v in state.items() if is_tensor_sequence(v)}
    for key, tensor in tensors.items():
        _require_values(tensor, key)  # before any work starts
    for key, sequence in sequences.items():
        for i, tensor in enumerate(sequence):
            if tensor is not None:
                _require_values(tensor, f"{key}[{i}]")
    in_place = {k: v.detach() for k, v in tensors.items() if _hashable_in_place(v)}
    if sum(t.nbytes for t in in_place.values()) < OVERLAP_MIN_BYTES:
        in_place = {}
    digests: dict[str, tuple[str, tuple[str, ...]]] = {}
    failure: list[BaseException] = []

    def hash_all() -> None:
        try:
            for key, t in in_place.items():
                digests[key] = _digests(t)
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=hash_all, name="statedict-xxh3", daemon=True)
    if in_place:
        worker.start()
    out: dict[str, Fingerprint] = {}
    statistics: dict[str, _Statistics] = {}
    alike: dict[tuple[Any, ...], list[str]] = {}  # taken together: a torch call for many
    for key, t in in_place.items():
        alike.setdefault((t.shape, t.dtype), []).append(key)
    try:
        for keys in alike.values():
            rows = _Scratch.rows_for(in_place[keys[0]])
            for i in range(0, len(keys), rows):
                group = keys[i : i + rows]
                found = _statistics_of([in_place[key] for key in group])
                statistics.update(zip(group, found, strict=True))
        for key, tensor in tensors.items():
            if key not in in_place:
                out[key] = fingerprint(tensor, key)
    finally:
        if in_place:
            worker.join()
    if failure:
        raise failure[0]
    for key, stats in statistics.items():
        out[key] = _fingerprint_of(digests[key], stats)
    for key, sequence in sequences.items():
        out[key] = sequence_fingerprint(sequence, key)
    return {key: out[key] for key in state if key in out}  # in the state_dict's order


def _require_values(tensor: torch.Tensor, key: str) -> None:
    if tensor.is_meta:
        raise UnsupportedObjectError(
            f"{key!r} is on the meta device and has no values: values=True needs real tensors"
        )


def _hashable_in_place(t: torch.Tensor) -> bool:
    """A plain dense contiguous CPU tensor: its bytes can be hashed without a copy."""
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.is_quantized
        and not (t.is_conj() or t.is_neg())
        and t.is_contiguous()
    )


# Dtypes torch has no arithmetic for (it raises NotImplementedError, or RuntimeError up to
# torch 2.6, on any conversion): the hash alone fingerprints them.
_NO_ARITHMETIC = frozenset(
    d
    for name in ("bits1x8", "bits2x4", "bits4x2", "bits8", "bits16", "float4_e2m1fn_x2")
    if isinstance(d := getattr(torch, name, None), torch.dtype)
)


def _statistics_of(tensors: list[torch.Tensor]) -> list[_Statistics]:
    """min, max, mean and std of the sample of each contiguous CPU tensor (all of one shape
    and dtype, at most :meth:`_Scratch.rows_for` of them), stable across machines; the mean of each
    block's part of the sample; and, for floating-point values, hashes of the sample that
    tell its numbers from its bits.

    The sample is summed in float64 and mean and std are rounded to 12 significant digits,
    so that CPUs whose vector units add in other orders write the same snapshot text. No
    ``torch.std_mean`` (its Welford pass runs ~30x slower on a small sample) and no
    ``torch.dot`` (BLAS runs it on all cores: on a loaded machine one call stalls for
    milliseconds). On samples this small, what costs is torch's per-call overhead (so the
    tensors of one shape are taken together, a row each) and fresh memory (first touch
    runs at 0.3-3.4 GiB/s here, so the rows are a :class:`_Scratch` kept per thread).
    """
    t = tensors[0]
    real = torch.view_as_real(t) if t.is_complex() else t
    total = real.numel()
    if total == 0 or real.dtype in _NO_ARITHMETIC:
        return [_NO_STATISTICS] * len(tensors)  # the hash alone fingerprints them
    x, centred, x_bytes = _Scratch.here().take(tensors, total)
    k, n = x.shape
    if k == 1:  # as over many, but over a dimension aminmax runs ~8x slower
        flat = x.view(-1)
        low, high = torch.aminmax(flat)
        lo, hi, means = [low.item()], [high.item()], [flat.sum().item() / n]
        torch.sub(x, means[0], out=centred)  # two passes: no cancellation when std << |mean|
    else:
        lo, hi = x.amin(1).tolist(), x.amax(1).tolist()
        means = [s / n for s in x.sum(1).tolist()]
        torch.sub(x, torch.tensor(means, dtype=torch.float64).unsqueeze(1), out=centred)
    stds = [math.sqrt(v / n) for v in centred.mul_(centred).sum(1).tolist()]
    plan = _block_plan(total, _byte_ranges(tuple(t.shape), t.element_size()), real.itemsize)
    found = [  # + 0.0: which zero aminmax finds first depends on how it is called
        _Statistics(lo[i] + 0.0, hi[i] + 0.0, _rounded(means[i]), _rounded(stds[i]), means_i)
        for i, means_i in enumerate(plan.means(x))
    ]
    if not real.is_floating_point():
        return found
    # Hashes that tell bits from numbers: -0.0 and 0.0, or two NaN payloads, are equal
    # numbers in other bits, which no statistic shows (float64 holds every number of the
    # narrower types exactly). Only a sample that is not the whole tensor needs its own
    # bits hash (else the whole hash is that), and only one with a NaN the signs hash
    # (else numbers equal in other bits can only be signed zeros).
    row = n * 8
    rows = [x_bytes[i * row : (i + 1) * row] for i in range(len(tensors))]
    bits = [_short_hash(r) for r in rows] if n < total else [None] * len(tensors)
    signs: list[str | None] = [None] * len(tensors)
    for i, stats in enumerate(found):
        if math.isnan(stats.min):
            x[i].nan_to_num_(nan=math.nan, posinf=math.inf, neginf=-math.inf)  # one NaN
            signs[i] = _short_hash(rows[i])
    x.add_(0.0)  # -0.0 + 0.0 is 0.0
    return [
        stats._replace(sample_numbers=_short_hash(r), sample_bits=b, sample_signs=s)
        for stats, r, b, s in zip(found, rows, bits, signs, strict=True)
    ]


class _Scratch:
    """Room for the samples of :attr:`ROWS` tensors in float64 and their centred copies,
    kept per thread (:meth:`here`): fresh memory would cost its first touch each time."""

    # torch runs an operation over 32768 elements or more on all its threads: on a busy
    # machine that stalls it for milliseconds, so no batch reaches that many.
    SERIAL_MAX = (1 << 15) - 1
    ROWS = SERIAL_MAX // 64  # small tensors: 511 of 64 elements, 7 of 4096, 1 sample
    _local = threading.local()

    @classmethod
    def rows_for(cls, t: torch.Tensor) -> int:
        """How many tensors like ``t`` to take at once."""
        n = t.numel() * (2 if t.is_complex() else 1)
        return max(1, min(cls.ROWS, cls.SERIAL_MAX // max(1, min(n, STAT_SAMPLE))))

    def __init__(self) -> None:
        self.x = torch.empty(self.SERIAL_MAX, dtype=torch.float64)
        self.centred = torch.empty_like(self.x)
        self.bytes = memoryview(_bytes_of(self.x)).cast("B")
        block = STAT_SAMPLE // STAT_BLOCKS
        rows = self.x[:STAT_SAMPLE].view(STAT_BLOCKS, block)
        self.spaced, self.last = rows[:-1], rows[-1:]
        self.sample, self.sample_centred = (
            self.x[:STAT_SAMPLE].view(1, -1),
            self.centred[:STAT_SAMPLE].view(1, -1),
        )

    @classmethod
    def here(cls) -> _Scratch:
        scratch = getattr(cls._local, "scratch", None)
        if scratch is None:
            scratch = cls._local.scratch = cls()
        return scratch

    def take(self, tensors: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The samples of ``tensors`` (``n`` numbers each: complex as real pairs) in float64,
        a row each, room for them centred, and their bytes: the whole tensor if small, else
        evenly spaced blocks from its first to its last element (one strided view and one
        copy: slicing 64 blocks one by one costs more than hashing). Never the tensors
        themselves: the samples are changed in place.
        """
        k = len(tensors)
        assert k * min(n, STAT_SAMPLE) <= self.SERIAL_MAX, "see rows_for"
        if n <= STAT_SAMPLE:
            x = self.x[: k * n].view(k, n)
            for row, t in zip(x, tensors, strict=True):
                row.copy_((torch.view_as_real(t) if t.is_complex() else t).reshape(-1))
            return x, self.centred[: k * n].view(k, n), self.bytes
        (t,) = tensors  # a sample is as many numbers as torch takes in one thread
        real = torch.view_as_real(t) if t.is_complex() else t
        block = STAT_SAMPLE // STAT_BLOCKS
        stride = (n - block) // (STAT_BLOCKS - 1)
        end = real.storage_offset() + n
        self.spaced.copy_(real.as_strided((STAT_BLOCKS - 1, block), (stride, 1)))
        self.last.copy_(real.as_strided((1, block), (block, 1), end - block))
        return self.sample, self.sample_centred, self.bytes


def _short_hash(data: Any) -> str:
    """8 hex digits of xxh3-64: enough to tell a changed sample, in few snapshot bytes."""
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)[:SHORT_HEX]


class _BlockPlan(NamedTuple):
    """How to sum each block's part of a sample (:func:`_sample_into`) with one row-wise
    sum: the sample in ``rows`` rows of ``width`` (a block each for a whole tensor, one of
    the 64 spaced runs for a sampled one), ``groups[b]:groups[b + 1]`` the rows of block
    ``b``, a ``tail`` after the rows that is the last block, and the rare ``moves``
    ``(start, end, from, to)`` of a run's elements that lie in the next block.
    """

    width: int
    rows: int
    groups: tuple[int, ...]
    tail: bool
    moves: tuple[tuple[int, int, int, int], ...]
    counts: tuple[int, ...]

    def means(self, x: torch.Tensor) -> list[tuple[float, ...]]:
        """The block means of each row of ``x``, a sample a row."""
        whole = self.rows * self.width
        k = x.shape[0]
        rows = x if whole == x.shape[1] else x[:, :whole]
        row_sums = rows.reshape(k, self.rows, self.width).sum(2).tolist()
        tails = x[:, whole:].sum(1).tolist() if self.tail else None
        out = []
        for i, sums_by_row in enumerate(row_sums):
            sums = [
                sum(sums_by_row[a:b]) for a, b in zip(self.groups, self.groups[1:], strict=False)
            ]
            if tails is not None:
                sums.append(tails[i])
            for start, end, source, block in self.moves:
                moved = x[i, start:end].sum().item()
                sums[source] -= moved
                sums[block] += moved
            out.append(
                tuple(s / c if c else math.nan for s, c in zip(sums, self.counts, strict=True))
            )
        return out


@functools.lru_cache(maxsize=4096)
def _block_plan(n: int, byte_ranges: tuple[tuple[int, int], ...], itemsize: int) -> _BlockPlan:
    """The :class:`_BlockPlan` of a flat tensor of ``n`` elements of ``itemsize`` bytes."""
    ends = [end // itemsize for _, end in byte_ranges]
    if n <= STAT_SAMPLE:  # the sample is the tensor: a row a block, the last maybe short
        width = ends[0]
        rows = n // width
        tail = rows < len(ends)
        counts = tuple(end - start for start, end in zip([0, *ends], ends, strict=False))
        return _BlockPlan(width, rows, tuple(range(rows + 1)), tail, (), counts)
    width = STAT_SAMPLE // STAT_BLOCKS
    stride = (n - width) // (STAT_BLOCKS - 1)
    starts = [i * stride for i in range(STAT_BLOCKS - 1)] + [n - width]
    first_block = [next(b for b, end in enumerate(ends) if start < end) for start in starts]
    counts = [0] * len(ends)
    moves = []
    for row, (start, block) in enumerate(zip(starts, first_block, strict=True)):
        here = block
        while start < starts[row] + width:  # split the run where blocks end
            take = min(starts[row] + width, ends[here]) - start
            counts[here] += take
            if here != block:
                sample_start = row * width + start - starts[row]
                moves.append((sample_start, sample_start + take, block, here))
            start += take
            here += 1
    groups = [first_block.index(b) if b in first_block else None for b in range(len(ends))]
    bounds = []
    for b in range(len(ends)):  # rows of blocks no run begins in: an empty group
        later = [g for g in groups[b:] if g is not None]
        bounds.append(later[0] if later else STAT_BLOCKS)
    return _BlockPlan(
        width, STAT_BLOCKS, (*bounds, STAT_BLOCKS), False, tuple(moves), tuple(counts)
    )


def _rounded(x: float) -> float:
    return float(f"{x:.12g}")


def _bytes_of(t: torch.Tensor) -> Any:
    """A zero-copy buffer over a contiguous CPU tensor's bytes (no numpy needed).

    The caller keeps ``t`` alive while the buffer is used.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return b""
    return (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())


# ---- optimizers --------------------------------------------------------------------------


def optimizer_schema(
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    *,
    names: Mapping[int, str] | None = None,
) -> OptimizerSchema:
    """Param_groups (hyperparameters exactly, members by name when known) and state layout."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return _live_optimizer_schema(optimizer, names or {})
    if not is_optimizer_state_dict(optimizer):
        raise UnsupportedObjectError(
            f"optimizer=: expected a torch.optim.Optimizer or its state_dict(), got a "
            f"{type_name(optimizer)}"
        )
    return optimizer_state_schema(optimizer, TORCH_TENSORS)


def _live_optimizer_schema(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> OptimizerSchema:
    groups = []
    states = []
    problems = []
    index = 0
    for group in optimizer.param_groups:
        members: list[str | int] = []
        for param in group["params"]:
            member = names.get(id(param), index)
            members.append(member)
            entries = optimizer.state.get(param)
            if entries:
                specs = state_specs(entries, TORCH_TENSORS)
                states.append(ParamState(param=member, entries=specs))
                shape = None
                for name, spec in specs.items():
                    # a 0-d state (NovoGrad's layer-wise exp_avg_sq) is per-tensor by design
                    if name in ELEMENTWISE_STATE and spec.type is None and spec.shape:
                        shape = tuple(param.shape) if shape is None else shape
                        if spec.shape != shape:
                            problems.append(
                                f"optimizer state {name!r} of {member!r} has shape "
                                f"{list(spec.shape)} but the parameter has shape "
                                f"{list(shape)}: resuming would apply it to the wrong tensor"
                            )
            index += 1
        groups.append(
            ParamGroup(
                hyperparams=hyperparams(group, TORCH_TENSORS),
                params=tuple(members),
                flags=flags(group, TORCH_TENSORS),
            )
        )
    cls = type(optimizer)
    return OptimizerSchema(
        cls=f"{cls.__module__}.{cls.__qualname__}",
        param_groups=tuple(groups),
        state=tuple(states),
        problems=tuple(problems),
    )
