"""The schema of a state_dict, and its snapshot file format.

A schema is what a checkpoint's *layout* depends on: keys in order, shapes, dtypes, kinds,
tying, module versions and the optimizer's groups and state. It never holds tensor data
(at most a fingerprint of it), so it is small, device-agnostic and cheap to diff.

This module imports no torch: snapshots are read and written as plain JSON, one line per
tensor, with a format version at the top so that a file from another version is reported
as "regenerate", not as a diff.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring_ascii
from typing import Any, ClassVar

from .errors import SnapshotError, StaleSnapshotError, hide_from_bad_input
from .readers.limits import MAX_DIM, MAX_DIMS, MAX_JSON_CONTAINERS, MAX_JSON_DEPTH

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

FORMAT_NAME = "pytest-statedict"
FORMAT_VERSION = 1

KINDS = ("parameter", "buffer", "tensor", "object")
# The class of an optimizer known only by its state_dict (a checkpoint file).
UNKNOWN_CLASS = "unknown"
# Optimizer state kept per element of its parameter, so shaped as the parameter is: a
# state of another shape was restored onto the wrong parameter (a reordered model). A 0-d
# state under one of these names is per-tensor by design (NovoGrad's ``exp_avg_sq``, a
# layer-wise second moment), never a misplaced elementwise one.
ELEMENTWISE_STATE = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
     "acc_delta", "sum", "prev", "ax", "grad_avg", "exp_inf", "mu_product_buffer"}
)  # fmt: skip
TOP_LEVEL_FIELDS = {
    "format", "version", "totals", "ordered", "tensors", "versions", "non_persistent_buffers",
    "extras", "optimizer",
}  # fmt: skip

# Byte sizes of the dtypes torch has, so totals can be computed without importing torch.
# Sub-byte types (uint1..uint7, int1..int7) are stored one element per byte by torch.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
    "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    **{f"{sign}int{bits}": 1 for sign in ("", "u") for bits in range(1, 8)},
}  # fmt: skip


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``torch.float32`` (from its text: no torch import needed)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def json_containers(raw: bytes | str) -> int:
    """The arrays and objects a JSON text would build (strings' brackets count too), counted
    before ``json.loads`` builds them: 60 MB of ``[[],[],...]`` parses into ~3 GB."""
    if isinstance(raw, bytes):
        return raw.count(b"[") + raw.count(b"{")
    return raw.count("[") + raw.count("{")


def json_depth(data: Any) -> int:
    """How deep lists and dicts nest in parsed JSON (counted without recursion, and only
    to just past :data:`MAX_JSON_DEPTH`, beyond which nothing is accepted anyway)."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            stack.extend((child, depth + 1) for child in item)
    return deepest


# A module's ``_version`` as torch keeps it in ``_metadata``: torch sets no type (1 by default,
# an int by convention, but Phi-3 sets "0.0.5"), so a snapshot keeps any JSON scalar as is.
ModuleVersion = int | float | str | bool | None


def module_version(value: Any) -> ModuleVersion:
    """``value`` as a snapshot keeps it: itself if a JSON scalar that reads back equal, else
    its ``repr`` (a version that is a tuple, or a NaN, has no JSON form equal to it)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return repr(value)[:200]


def _is_module_version(x: Any) -> bool:
    """What :func:`module_version` keeps as it is (a snapshot holds nothing else)."""
    return module_version(x) is x


def _is_int(x: Any) -> bool:
    """An integer, not a bool (``True`` is an ``int`` in Python, never in a snapshot)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(shape: Any) -> bool:
    return (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
    )


@dataclass(frozen=True)
class Fingerprint:
    """What a snapshot keeps of a tensor's values: an exact hash and a few statistics.

    The hash (xxh3-128 of the raw bytes) alone decides equality: the statistics are derived
    from the same bytes (and may carry NaN, which equals nothing); they let a tolerant
    (``rtol``/``atol``) comparison be made without storing the tensor.

    The other fields only say *where* and *how* values changed, so they take no part in
    equality; a snapshot written before them compares by hash as before (see
    ``docs/fingerprints.md``):

    * ``blocks``: the running xxh3-128 of the bytes, 8 hex digits of it taken at the end of
      each of at most :attr:`BLOCKS` blocks (:meth:`block_ranges`), from the one pass that
      computes ``xxh3``. The first digest that differs names the first block that changed
      and proves every block before it unchanged.
    * ``block_means``: the mean of each block's elements in the statistics' sample (all of
      them up to :attr:`SAMPLE` elements), to show how that block changed.
    * ``sample_numbers`` (floating point): 8 hex digits of xxh3 of the sample's numbers with
      ``-0.0`` made ``0.0`` and every NaN one NaN; ``sample_bits``, when the sample is not
      the whole tensor, of its bytes as stored; ``sample_signs``, when it holds a NaN, of its
      numbers with every NaN one NaN but zeros' signs kept. Bits that differ under equal
      numbers are a signed zero or a NaN payload, which no statistic can show.
    """

    # At most this many blocks, and this many elements in the statistics' sample.
    BLOCKS: ClassVar[int] = 8
    SAMPLE: ClassVar[int] = 1 << 14

    xxh3: str
    min: float = field(compare=False)
    max: float = field(compare=False)
    mean: float = field(compare=False)
    std: float = field(compare=False)
    blocks: tuple[str, ...] = field(default=(), compare=False)
    block_means: tuple[float, ...] = field(default=(), compare=False)
    sample_numbers: str | None = field(default=None, compare=False)
    sample_bits: str | None = field(default=None, compare=False)
    sample_signs: str | None = field(default=None, compare=False)

    @classmethod
    def block_ranges(cls, shape: Sequence[int]) -> list[tuple[int, int]]:
        """The (start, end) flat element indices of each block of a tensor of ``shape``.

        Equal runs of elements, whole leading-dimension rows when a tensor has at least
        :attr:`BLOCKS` of them (so that a report can name rows), the last run shorter.
        """
        n = math.prod(shape)
        unit = n // shape[0] if len(shape) >= 2 and shape[0] >= cls.BLOCKS else 1
        per = -(-(n // unit) // cls.BLOCKS) * unit if n else 1
        return [(start, min(start + per, n)) for start in range(0, n, per)]

    def close_to(self, other: Fingerprint, rtol: float, atol: float) -> list[str]:
        """Statistics of ``self`` (actual) not within tolerance of ``other`` (expected).

        Each may move by ``atol + rtol * max(|min|, |max|)`` of the expected values: if
        every element moved by at most ``atol + rtol * |element|`` (``torch.allclose``),
        none of min, max, mean and std can have moved by more, so a change within the
        tolerance always passes; a mean near zero does not make the bound vanish.
        """
        bound = other.tolerance(rtol, atol)
        bad = []
        for stat in ("min", "max", "mean", "std"):
            a, e = getattr(self, stat), getattr(other, stat)
            if math.isnan(a) and math.isnan(e):
                continue
            if a == e:  # equal infinities
                continue
            if not (abs(a - e) <= bound):
                bad.append(f"{stat} {_fmt_float(e)} -> {_fmt_float(a)}")
        return bad

    def tolerance(self, rtol: float, atol: float) -> float:
        """How far each statistic of a tensor with these (expected) values may move."""
        scale = max((abs(x) for x in (self.min, self.max) if math.isfinite(x)), default=0.0)
        return atol + rtol * scale

    def tolerance_excess(self, other: Fingerprint, rtol: float, atol: float) -> float:
        """How far the statistic of ``self`` furthest from ``other`` (expected) moved, in
        multiples of :meth:`close_to`'s tolerance: at most 1.0 when all are within it; inf
        for a NaN or infinity on one side only, or any move under a zero tolerance.

        It orders a report's values outside the tolerance, the furthest first.
        """
        bound = other.tolerance(rtol, atol)
        worst = 0.0
        for stat in ("min", "max", "mean", "std"):
            a, e = getattr(self, stat), getattr(other, stat)
            if (math.isnan(a) and math.isnan(e)) or a == e:
                continue
            moved = abs(a - e)
            if not math.isfinite(moved) or bound <= 0:
                return math.inf
            worst = max(worst, moved / bound)
        return worst


@dataclass(frozen=True, init=False)
class TensorEntry:
    """One key of a state_dict.

    ``kind`` is ``parameter`` or ``buffer`` when the module is known, ``tensor`` for a bare
    state_dict or checkpoint, and ``object`` for a non-tensor entry (``_extra_state``, a
    quantized layer's dtype, ...), whose Python type is in ``type``. ``tied_to`` names the
    first key sharing this entry's storage. ``layout`` and ``qscheme`` are set only for
    sparse and quantized tensors.
    """

    key: str
    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    requires_grad: bool | None = None
    tied_to: str | None = None
    layout: str | None = None
    qscheme: str | None = None
    type: str | None = None
    fingerprint: Fingerprint | None = None

    def __init__(
        self,
        key: str,
        kind: str,
        shape: tuple[int, ...] | None = None,
        dtype: str | None = None,
        requires_grad: bool | None = None,
        tied_to: str | None = None,
        layout: str | None = None,
        qscheme: str | None = None,
        type: str | None = None,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        # Made once per tensor, thousands of times for a big model: filling __dict__ at once
        # is 3x faster than the frozen dataclass's object.__setattr__ per field.
        self.__dict__.update(
            key=key,
            kind=kind,
            shape=shape,
            dtype=dtype,
            requires_grad=requires_grad,
            tied_to=tied_to,
            layout=layout,
            qscheme=qscheme,
            type=type,
            fingerprint=fingerprint,
        )

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    @property
    def nbytes(self) -> int:
        if self.dtype is None:
            return 0
        return self.numel * DTYPE_ITEMSIZE.get(self.dtype, 0)

    def describe(self) -> str:
        """Short words for a report: ``parameter float32[6, 3, 5, 5]``."""
        if self.kind == "object":
            return f"object {self.type}"
        text = f"{self.kind} {self.dtype}{list(self.shape or ())}"
        if self.layout:
            text += f" {self.layout}"
        if self.qscheme:
            text += f" {self.qscheme}"
        if self.requires_grad is False and self.kind == "parameter":
            text += " frozen"
        if self.tied_to:
            text += f" tied to {self.tied_to}"
        return text


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer param_group: its hyperparameters exactly, and its members.

    ``flags`` holds the implementation switches (``fused``, ``foreach``...): they choose how
    the maths runs, not what it is, and torch adds and defaults them differently from one
    release to the next. They are kept for the report's notes, never compared.
    """

    hyperparams: Mapping[str, Any]
    params: tuple[str | int, ...]
    flags: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class StateSpec:
    """Shape and dtype of one optimizer state tensor, or the type of a non-tensor one."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    type: str | None = None

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape or ())}" if self.type is None else self.type


@dataclass(frozen=True)
class ParamState:
    """The optimizer state of one parameter (``exp_avg``, ``momentum_buffer``, ``step``...)."""

    param: str | int
    entries: Mapping[str, StateSpec]


@dataclass(frozen=True)
class OptimizerSchema:
    """An optimizer's class, param_groups and the layout of its per-parameter state.

    ``problems`` lists state entries whose shape differs from their parameter's: how a
    reordered model silently corrupts Adam state on resume.
    """

    cls: str
    param_groups: tuple[ParamGroup, ...]
    state: tuple[ParamState, ...]
    problems: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Schema:
    """The schema of a state_dict (and optionally of its optimizer).

    ``versions`` maps a module's prefix to its ``_metadata`` version when that is not the
    default int 1 (``None``: unknown, a bare state_dict without ``_metadata``); a version
    is kept as torch keeps it, a string included (see :func:`module_version`).
    ``ordered`` is False when the key order carries no meaning (a ``.safetensors`` header
    is sorted by the writer, not in ``state_dict`` order): moved keys are then not reported.
    ``saved_on`` (the storage locations a checkpoint file was saved from) and ``source``
    are information for reports, not part of a snapshot.
    """

    tensors: tuple[TensorEntry, ...]
    ordered: bool = True
    versions: Mapping[str, ModuleVersion] | None = None
    non_persistent_buffers: tuple[str, ...] = ()
    optimizer: OptimizerSchema | None = None
    extras: Mapping[str, str] = field(default_factory=dict)
    saved_on: tuple[str, ...] = field(default=(), compare=False)
    source: str | None = field(default=None, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def by_key(self) -> dict[str, TensorEntry]:
        return {t.key: t for t in self.tensors}

    @property
    def totals(self) -> dict[str, int]:
        """Elements, parameters, trainable parameters and bytes; tied storages count once."""
        elements = params = trainable = nbytes = tensors = 0
        itemsize = DTYPE_ITEMSIZE.get
        for t in self.tensors:  # numel and nbytes inlined: once per tensor of every check
            kind = t.kind
            tensors += kind != "object"
            if t.tied_to is not None:
                continue
            numel = math.prod(t.shape) if t.shape is not None else 0
            elements += numel
            if t.dtype is not None:
                nbytes += numel * itemsize(t.dtype, 0)
            if kind == "parameter":
                params += numel
                if t.requires_grad:
                    trainable += numel
        return {
            "tensors": tensors,
            "elements": elements,
            "parameters": params,
            "trainable": trainable,
            "bytes": nbytes,
        }

    @property
    def knows_modules(self) -> bool:
        """Taken from a module (a live model, or a snapshot or pickle of one), so it knows
        which keys are parameters and buffers and which buffers are non-persistent.

        A bare state_dict, a checkpoint file of one or its snapshot knows neither: every
        key is a ``tensor`` and a non-persistent buffer (BERT's ``position_ids``, a rotary
        ``inv_freq``) was never saved, so the other side's cannot be a difference.
        """
        return bool(self.non_persistent_buffers) or any(
            t.kind in ("parameter", "buffer") for t in self.tensors
        )

    @property
    def has_values(self) -> bool:
        return any(t.fingerprint is not None for t in self.tensors)

    # ---- JSON --------------------------------------------------------------------------

    def to_json(self) -> str:
        """The snapshot text: stable byte for byte, one line per tensor and per group."""
        dump = _dump
        lines = [
            "{",
            f'"format": {dump(FORMAT_NAME)}, "version": {FORMAT_VERSION},',
            f'"totals": {dump(self.totals)},',
        ]
        if not self.ordered:
            lines.append('"ordered": false,')
        lines.append('"tensors": [')
        lines.extend(_joined("  " + _entry_line(t) for t in self.tensors))
        lines.append("],")
        tail: list[str] = [f'"versions": {dump(self.versions)}']
        if self.non_persistent_buffers:
            tail.append(f'"non_persistent_buffers": {dump(list(self.non_persistent_buffers))}')
        if self.extras:
            tail.append(f'"extras": {dump(dict(self.extras))}')
        if self.optimizer is not None:
            tail.append(_optimizer_to_json(self.optimizer))
        lines.append(",\n".join(tail))
        lines.append("}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str | os.PathLike[str] = "<snapshot>") -> Schema:
        """Parse and validate a snapshot; every problem names the file and, if it can, the line."""
        return _SnapshotParser(text, os.fspath(path)).parse()


def _fmt_float(x: float) -> str:
    return f"{x:.6g}"


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))


# The lines written for every tensor and every optimizer state are built from pieces below,
# not by a json.dumps per line (4x the time, and most of a passing snapshot check's): each
# piece is what json.dumps writes for it (``_quote`` is json's own string encoder), and
# anything off the common path (values, objects, unusual field types) goes through _dump.
_quote = encode_basestring_ascii
_BOOL_TEXT = {True: "true", False: "false"}
_MAX_CACHED = 4096
_shape_texts: dict[tuple[int, ...], str] = {}


def _shape_text(shape: tuple[int, ...]) -> str:
    """``[64, 64]``: models repeat a few shapes, so each is written once a process.

    Shapes are tuples of ints (torch's, or checked so when a snapshot is read): a cache
    keyed by them cannot mix up ``(1,)`` with ``(True,)`` or ``(1.0,)``, which compare equal.
    """
    text = _shape_texts.get(shape)
    if text is None:
        text = _dump(list(shape))
        if len(_shape_texts) >= _MAX_CACHED:
            _shape_texts.clear()
        _shape_texts[shape] = text
    return text


def _entry_line(t: TensorEntry) -> str:
    """``_dump(_entry_to_json(t))``, the same bytes, without building and encoding a dict."""
    rg = t.requires_grad
    if (
        t.fingerprint is not None
        or t.kind == "object"
        or type(t.key) is not str
        or type(t.kind) is not str
        or type(t.dtype) is not str
        or type(t.shape) is not tuple
        or not (rg is None or rg is True or rg is False)
    ):
        return _dump(_entry_to_json(t))
    line = (
        f'{{"key": {_quote(t.key)}, "kind": {_quote(t.kind)}, "shape": '
        f'{_shape_text(t.shape)}, "dtype": {_quote(t.dtype)}'
    )
    if rg is not None:
        line += f', "requires_grad": {_BOOL_TEXT[rg]}'
    for name in ("tied_to", "layout", "qscheme"):
        value = getattr(t, name)
        if value is not None:
            if type(value) is not str:
                return _dump(_entry_to_json(t))
            line += f', "{name}": {_quote(value)}'
    return line + "}"


def _joined(items: Iterable[str]) -> list[str]:
    items = list(items)
    return [item + ("," if i < len(items) - 1 else "") for i, item in enumerate(items)]


def _entry_to_json(t: TensorEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"key": t.key, "kind": t.kind}
    if t.kind == "object":
        out["type"] = t.type
    else:
        out["shape"] = list(t.shape or ())
        out["dtype"] = t.dtype
        for name in ("requires_grad", "tied_to", "layout", "qscheme"):
            value = getattr(t, name)
            if value is not None:
                out[name] = value
    if t.fingerprint is not None:  # an object's: a quantized module's packed tensors
        f = t.fingerprint
        out["values"] = {
            "xxh3": f.xxh3,
            "min": _json_float(f.min),
            "max": _json_float(f.max),
            "mean": _json_float(f.mean),
            "std": _json_float(f.std),
        }
        if f.blocks:
            out["values"]["blocks"] = list(f.blocks)
        if f.block_means:
            out["values"]["block_means"] = [_json_float(_short_float(m)) for m in f.block_means]
        for name in ("sample_numbers", "sample_bits", "sample_signs"):
            if getattr(f, name) is not None:
                out["values"][name] = getattr(f, name)
    return out


def _short_float(x: float) -> float:
    """6 significant digits: a block mean shows how a block moved, in few snapshot bytes."""
    return float(f"{x:.6g}")


def _json_float(x: float) -> float | str:
    """NaN and infinities as strings: strict JSON has no literal for them."""
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _optimizer_to_json(opt: OptimizerSchema) -> str:
    dump = _dump
    lines = ['"optimizer": {', f'"class": {dump(opt.cls)},', '"param_groups": [']
    lines.extend(
        _joined("  " + dump({**g.hyperparams, "params": list(g.params)}) for g in opt.param_groups)
    )
    lines.append("],")
    if any(g.flags for g in opt.param_groups):  # snapshots before them, and bare ones, lack it
        lines.append('"implementation_flags": [')
        lines.extend(_joined("  " + dump(dict(g.flags)) for g in opt.param_groups))
        lines.append("],")
    lines.append('"state": [')
    lines.extend(_joined("  " + _state_line(s) for s in opt.state))
    lines.append("]")
    lines.append("}")
    return "\n".join(lines)


def _state_to_json(s: ParamState) -> dict[str, Any]:
    return {
        "param": s.param,
        **{
            name: (
                {"type": spec.type}
                if spec.type is not None
                else {"shape": list(spec.shape or ()), "dtype": spec.dtype}
            )
            for name, spec in s.entries.items()
        },
    }


_spec_texts: dict[tuple[tuple[int, ...], str], str] = {}


def _state_line(s: ParamState) -> str:
    """``_dump(_state_to_json(s))``, the same bytes: one parameter's state, by pieces."""
    param = s.param
    if type(param) is str:
        parts = [f'{{"param": {_quote(param)}']
    elif type(param) is int:
        parts = [f'{{"param": {param}']
    else:
        return _dump(_state_to_json(s))
    for name, spec in s.entries.items():
        if type(name) is not str or name == "param" or spec.type is not None:
            return _dump(_state_to_json(s))
        shape, dtype = spec.shape or (), spec.dtype
        if type(dtype) is not str or type(shape) is not tuple:
            return _dump(_state_to_json(s))
        text = _spec_texts.get((shape, dtype))
        if text is None:
            text = f'{{"shape": {_shape_text(shape)}, "dtype": {_quote(dtype)}}}'
            if len(_spec_texts) >= _MAX_CACHED:
                _spec_texts.clear()
            _spec_texts[shape, dtype] = text
        parts.append(f"{_quote(name)}: {text}")
    return ", ".join(parts) + "}"


class _SnapshotParser:
    """Validates a snapshot field by field so a hand-edited file gets a precise error."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.lines = text.splitlines()

    def fail(self, problem: str, needle: str | None = None) -> SnapshotError:
        return SnapshotError(self.path, problem, self.line_of(needle) if needle else None)

    def line_of(self, needle: str) -> int | None:
        quoted = json.dumps(needle, ensure_ascii=True)
        for number, line in enumerate(self.lines, 1):
            if quoted in line:
                return number
        return None

    def parse(self) -> Schema:
        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise self.fail(f"duplicated field {key!r} in one object", key)
                seen[key] = value
            return seen

        if not self.text.strip():
            raise self.fail("the file is empty")
        containers = json_containers(self.text)
        if containers > MAX_JSON_CONTAINERS:
            raise self.fail(
                f"{containers:,} JSON arrays and objects, more than {MAX_JSON_CONTAINERS:,}"
            )
        try:
            data = json.loads(self.text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise SnapshotError(self.path, f"invalid JSON ({exc.msg})", exc.lineno) from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise self.fail(f"invalid JSON ({str(exc)[:200]})") from None
        except RecursionError:
            raise self.fail(f"its JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
        if json_depth(data) > MAX_JSON_DEPTH:
            raise self.fail(f"its JSON nests deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise self.fail(f'not a statedict snapshot (no "format": "{FORMAT_NAME}" header)')
        version = data.get("version")
        if not _is_int(version) or version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise StaleSnapshotError(
                self.path,
                f"written in snapshot format version {version!r}, this plugin reads version "
                f"{FORMAT_VERSION}",
                2,
                remedy=(
                    "it comes from a newer pytest-statedict: upgrade the plugin (regenerating "
                    "would downgrade the file)"
                    if newer
                    else "regenerate it with `pytest --statedict-update`"
                ),
            )
        tensors = self.list_of(data, "tensors", self.entry)
        unknown = set(data) - TOP_LEVEL_FIELDS
        if unknown:
            raise self.fail(f"unknown field {sorted(unknown)[0]!r}", sorted(unknown)[0])
        keys = [t.key for t in tensors]
        duplicated = (
            sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
        )
        if duplicated:
            raise self.fail(f"key {duplicated[0]!r} appears more than once", duplicated[0])
        versions = data.get("versions")
        if versions is not None and not (
            isinstance(versions, dict) and all(map(_is_module_version, versions.values()))
        ):
            raise self.fail(
                '"versions" must be null or an object of module versions (numbers, strings, '
                "booleans or null)",
                "versions",
            )
        npb = data.get("non_persistent_buffers", [])
        if not (isinstance(npb, list) and all(isinstance(x, str) for x in npb)):
            raise self.fail('"non_persistent_buffers" must be a list of strings')
        extras = data.get("extras", {})
        if not (isinstance(extras, dict) and all(isinstance(x, str) for x in extras.values())):
            raise self.fail('"extras" must be an object of type names', "extras")
        optimizer = data.get("optimizer")
        ordered = data.get("ordered", True)
        if not isinstance(ordered, bool):
            raise self.fail('"ordered" must be true or false', "ordered")
        return Schema(
            tensors=tuple(tensors),
            ordered=ordered,
            versions=versions,
            non_persistent_buffers=tuple(npb),
            optimizer=None if optimizer is None else self.optimizer(optimizer),
            extras=extras,
            source=self.path,
        )

    def list_of(self, data: Mapping[str, Any], name: str, parse_item: Any) -> list[Any]:
        items = data.get(name)
        if not isinstance(items, list):
            raise self.fail(f'"{name}" is missing or not a list', name)
        return [parse_item(item, i) for i, item in enumerate(items)]

    def entry(self, item: Any, index: int) -> TensorEntry:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            raise self.fail(f'tensor #{index} has no string "key"')
        key = item["key"]
        kind = item.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            raise self.fail(
                f"{key!r}: kind {str(kind)[:40]!r} is not one of {', '.join(KINDS)}", key
            )
        if kind == "object":
            if not isinstance(item.get("type"), str):
                raise self.fail(f'{key!r}: an object entry needs a string "type"', key)
            unknown = set(item) - {"key", "kind", "type", "values"}
            if unknown:
                raise self.fail(f"{key!r}: unknown field {sorted(unknown)[0]!r}", key)
            values = self.fingerprint(key, item["values"]) if "values" in item else None
            return TensorEntry(key=key, kind=kind, type=item["type"], fingerprint=values)
        unknown = set(item) - {
            "key", "kind", "shape", "dtype", "requires_grad", "tied_to", "layout", "qscheme",
            "values",
        }  # fmt: skip
        if unknown:
            raise self.fail(f"{key!r}: unknown field {sorted(unknown)[0]!r}", key)
        for name in ("shape", "dtype"):
            if name not in item:
                raise self.fail(f'{key!r}: no "{name}" field', key)
        shape = item.get("shape")
        if not _is_shape(shape):
            raise self.fail(
                f'{key!r}: "shape" must be a list of at most {MAX_DIMS} non-negative integers '
                "below 2**63",
                key,
            )
        dtype = item.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
            raise self.fail(f"{key!r}: unknown dtype {str(dtype)[:40]!r}", key)
        requires_grad = item.get("requires_grad")
        if requires_grad is not None and not isinstance(requires_grad, bool):
            raise self.fail(f'{key!r}: "requires_grad" must be true or false', key)
        for name in ("tied_to", "layout", "qscheme"):
            if item.get(name) is not None and not isinstance(item[name], str):
                raise self.fail(f'{key!r}: "{name}" must be a string', key)
        return TensorEntry(
            key=key,
            kind=kind,
            shape=tuple(shape or ()),
            dtype=dtype,
            requires_grad=requires_grad,
            tied_to=item.get("tied_to"),
            layout=item.get("layout"),
            qscheme=item.get("qscheme"),
            fingerprint=self.fingerprint(key, item["values"]) if "values" in item else None,
        )

    def fingerprint(self, key: str, values: Any) -> Fingerprint:
        if not isinstance(values, dict) or not isinstance(values.get("xxh3"), str):
            raise self.fail(f'{key!r}: "values" needs a string "xxh3"', key)
        stats = {}
        for stat in ("min", "max", "mean", "std"):
            raw = values.get(stat)
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise self.fail(f'{key!r}: "values.{stat}" must be a number', key)
            try:
                stats[stat] = float(raw)
            except ValueError:
                raise self.fail(f'{key!r}: "values.{stat}" must be a number', key) from None
        blocks = values.get("blocks", [])
        if not (
            isinstance(blocks, list)
            and len(blocks) <= Fingerprint.BLOCKS
            and all(isinstance(b, str) for b in blocks)
        ):
            raise self.fail(
                f'{key!r}: "values.blocks" must be a list of at most {Fingerprint.BLOCKS} strings',
                key,
            )
        means = values.get("block_means", [])
        if not (isinstance(means, list) and len(means) in (0, len(blocks))):
            raise self.fail(f'{key!r}: "values.block_means" needs one number a block', key)
        try:
            if any(isinstance(m, bool) or not isinstance(m, (int, float, str)) for m in means):
                raise ValueError
            block_means = tuple(float(m) for m in means)
        except ValueError:
            raise self.fail(f'{key!r}: "values.block_means" must hold numbers', key) from None
        hashes: dict[str, str | None] = {}
        for name in ("sample_numbers", "sample_bits", "sample_signs"):
            raw = values.get(name)
            if raw is not None and not isinstance(raw, str):
                raise self.fail(f'{key!r}: "values.{name}" must be a string', key)
            hashes[name] = raw
        return Fingerprint(
            xxh3=values["xxh3"],
            **stats,  # type: ignore[arg-type]  # the four statistics, each a float
            blocks=tuple(blocks),
            block_means=block_means,
            **hashes,  # type: ignore[arg-type]  # the three sample hashes, each a str or None
        )

    def optimizer(self, data: Any) -> OptimizerSchema:
        if not isinstance(data, dict) or not isinstance(data.get("class"), str):
            raise self.fail('"optimizer" needs a string "class"', "optimizer")
        groups = []
        for i, group in enumerate(self.list_of(data, "param_groups", lambda g, i: g)):
            if not isinstance(group, dict) or not isinstance(group.get("params"), list):
                raise self.fail(f'optimizer param_group #{i} has no "params" list', "params")
            if not all(isinstance(p, str) or _is_int(p) for p in group["params"]):
                raise self.fail(
                    f'optimizer param_group #{i}: "params" must hold names or indices', "params"
                )
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append(ParamGroup(hyperparams=hyper, params=tuple(group["params"])))
        if "implementation_flags" in data:  # informational, so snapshots before it lack it
            flags = data["implementation_flags"]
            if not (
                isinstance(flags, list)
                and len(flags) == len(groups)
                and all(isinstance(f, dict) for f in flags)
            ):
                raise self.fail(
                    '"implementation_flags" needs one object per param_group',
                    "implementation_flags",
                )
            groups = [replace(g, flags=f) for g, f in zip(groups, flags, strict=True)]
        states = []
        for i, state in enumerate(self.list_of(data, "state", lambda s, i: s)):
            param = state.get("param") if isinstance(state, dict) else None
            if not (isinstance(param, str) or _is_int(param)):
                raise self.fail(f'optimizer state #{i} has no "param"', "state")
            entries = {}
            for name, spec in state.items():
                if name == "param":
                    continue
                if isinstance(spec, dict) and isinstance(spec.get("type"), str):
                    entries[name] = StateSpec(type=spec["type"])
                elif (
                    isinstance(spec, dict)
                    and _is_shape(spec.get("shape"))
                    and isinstance(spec.get("dtype"), str)
                    and spec["dtype"] in DTYPE_ITEMSIZE
                ):
                    entries[name] = StateSpec(shape=tuple(spec["shape"]), dtype=spec["dtype"])
                else:
                    raise self.fail(
                        f"optimizer state of {state['param']!r}: entry {name!r} needs "
                        '"shape" and "dtype", or "type"',
                        name,
                    )
            states.append(ParamState(param=state["param"], entries=entries))
        return OptimizerSchema(cls=data["class"], param_groups=tuple(groups), state=tuple(states))
