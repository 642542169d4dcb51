"""The parts a schema is made of: tensor entries, value fingerprints, optimizer groups and
state, module versions, and the dtype vocabulary.

Nothing here imports torch: the parts are read and written as plain JSON by
:mod:`.snapshot_format`, and compared by :mod:`.compare`, without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

KINDS = ("parameter", "buffer", "tensor", "object")


# The class of an optimizer known only by its state_dict (a checkpoint file).
UNKNOWN_CLASS = "unknown"


# Optimizer state kept per element of its parameter, so shaped as the parameter is: a
# state of another shape was restored onto the wrong parameter (a reordered model). A 0-d
# state under one of these names is per-tensor by design (NovoGrad's ``exp_avg_sq``, a
# layer-wise second moment), never a misplaced elementwise one.
ELEMENTWISE_STATE = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
     "acc_delta", "sum", "prev", "ax", "grad_avg", "exp_inf", "mu_product_buffer",
     "variance"}
)  # fmt: skip


def elementwise_shapes(entries: Mapping[str, StateSpec]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """A parameter's per-element optimizer state (``exp_avg``...), each with its shape: the
    shape its parameter had when it was saved."""
    for name, spec in entries.items():
        if name in ELEMENTWISE_STATE and spec.type is None and spec.shape:
            yield name, spec.shape


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


def float_text(x: float) -> str:
    """A statistic as reports show it: six significant digits."""
    return f"{x:.6g}"


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
                bad.append(f"{stat} {float_text(e)} -> {float_text(a)}")
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
