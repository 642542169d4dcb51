"""Fingerprints of tensor values: an exact hash, where a change begins, and statistics.

What ``schema_of(..., values=True)`` records of every tensor (see :class:`Fingerprint`):
xxh3-128 of all the bytes with its running digest at the end of each block, and statistics
of a fixed sample of the values for ``rtol``/``atol`` comparisons. Kept apart from
``extract`` (which walks models and state_dicts) because it is a different idea with its
own constraints: it is the only code that reads tensor data, and its speed is the hash's.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import UnsupportedObjectError
from .readers.limits import MAX_VIEW_COPY_BYTES
from .schema_entries import Fingerprint

__all__ = [
    "OVERLAP_MIN_BYTES",
    "SHORT_HEX",
    "STAT_BLOCKS",
    "STAT_SAMPLE",
    "block_plan",
    "byte_ranges",
    "fingerprint",
    "is_tensor_sequence",
    "sequence_fingerprint",
    "state_fingerprints",
    "tensor_digests",
]


# Statistics read at most this many elements of a tensor: 64 evenly spaced contiguous blocks.
STAT_SAMPLE, STAT_BLOCKS = Fingerprint.SAMPLE, 64
# Hex digits kept of each block's running digest and of the sample's hashes.
SHORT_HEX = 8


class _Statistics(NamedTuple):
    """What :func:`_statistics_of` reads from a tensor's sample (see :class:`Fingerprint`)."""

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
    if t.is_nested:  # its components' values, and their shapes (as the hash's tail)
        parts = t.unbind()
        shapes = repr([tuple(p.shape) for p in parts]).encode()
        flat = torch.cat([p.reshape(-1) for p in parts]) if parts else t.new_empty(0)
        return _fingerprint_of(tensor_digests(flat.contiguous(), shapes), _statistics_of([flat])[0])
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
    return _fingerprint_of(tensor_digests(t, quantization), _statistics_of([t])[0])


def _fingerprint_of(digests: tuple[str, tuple[str, ...]], stats: _Statistics) -> Fingerprint:
    digest, blocks = digests
    return Fingerprint(digest, *stats[:4], blocks, *stats[4:])


def tensor_digests(t: torch.Tensor, tail: bytes = b"") -> tuple[str, tuple[str, ...]]:
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
    for start, end in byte_ranges(tuple(t.shape), t.element_size()):
        update(data[start:end])  # releases the GIL while it hashes
        blocks.append(hexdigest()[:SHORT_HEX])
    if tail:
        update(tail)
    return hexdigest(), tuple(blocks)


@functools.lru_cache(maxsize=4096)
def byte_ranges(shape: tuple[int, ...], itemsize: int) -> tuple[tuple[int, int], ...]:
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


def state_fingerprints(state: Mapping[str, Any]) -> dict[str, Fingerprint]:
    """The fingerprint of every tensor of a state_dict, hashed on a second thread.

    xxhash releases the GIL while it hashes, so a worker thread hashes the tensors while
    this one takes their statistics (torch calls): where a core is free, the statistics
    cost no time beside the hash. Only tensors hashed where they lie (contiguous, dense,
    on the CPU) go to the worker; the others are copied, fingerprinted and freed here one
    at a time, so memory stays at one tensor's temporaries.
    """
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    sequences = {k: v for k, v in state.items() if is_tensor_sequence(v)}
    _require_all_values(tensors, sequences)  # before any work starts
    in_place = _to_hash_in_place(tensors)
    digests: dict[str, tuple[str, tuple[str, ...]]] = {}
    failure: list[BaseException] = []
    worker = threading.Thread(
        target=_hash_all, args=(in_place, digests, failure), name="statedict-xxh3", daemon=True
    )
    if in_place:
        worker.start()
    out: dict[str, Fingerprint] = {}
    try:
        statistics = _statistics_by_shape(in_place)
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


def _require_all_values(tensors: Mapping[str, torch.Tensor], sequences: Mapping[str, Any]) -> None:
    """Every tensor has values, those in sequences too (none on the meta device)."""
    for key, tensor in tensors.items():
        _require_values(tensor, key)
    for key, sequence in sequences.items():
        for i, tensor in enumerate(sequence):
            if tensor is not None:
                _require_values(tensor, f"{key}[{i}]")


def _to_hash_in_place(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the worker thread hashes where they lie: none if together they are too
    small for the thread to pay."""
    in_place = {k: v.detach() for k, v in tensors.items() if _hashable_in_place(v)}
    if sum(t.nbytes for t in in_place.values()) < OVERLAP_MIN_BYTES:
        return {}
    return in_place


def _hash_all(
    in_place: Mapping[str, torch.Tensor],
    digests: dict[str, tuple[str, tuple[str, ...]]],
    failure: list[BaseException],
) -> None:
    """The worker thread's part: every digest, or the exception that stopped it."""
    try:
        for key, t in in_place.items():
            digests[key] = tensor_digests(t)
    except BaseException as exc:  # re-raised on the caller's thread
        failure.append(exc)


def _statistics_by_shape(in_place: Mapping[str, torch.Tensor]) -> dict[str, _Statistics]:
    """The statistics of the tensors, those of one shape and dtype taken together: a torch
    call for many."""
    statistics: dict[str, _Statistics] = {}
    alike: dict[tuple[Any, ...], list[str]] = {}
    for key, t in in_place.items():
        alike.setdefault((t.shape, t.dtype), []).append(key)
    for keys in alike.values():
        rows = _Scratch.rows_for(in_place[keys[0]])
        for i in range(0, len(keys), rows):
            group = keys[i : i + rows]
            found = _statistics_of([in_place[key] for key in group])
            statistics.update(zip(group, found, strict=True))
    return statistics


def _require_values(tensor: torch.Tensor, key: str) -> None:
    if tensor.is_meta:
        raise UnsupportedObjectError(
            f"{key!r} is on the meta device and has no values: values=True needs real tensors"
        )
    copied = tensor.numel() * tensor.element_size()
    if copied > MAX_VIEW_COPY_BYTES and _is_plain_view(tensor):
        held = tensor.untyped_storage().nbytes()
        if copied > held:
            raise UnsupportedObjectError(
                f"{key!r} is a view that repeats its storage (a stride of 0, as "
                f"`expand` makes): hashing its values would copy {copied:,} bytes out of the "
                f"{held:,} it holds, more than the {MAX_VIEW_COPY_BYTES:,} a fingerprint "
                "copies; store the tensor it expands, or take this schema without values"
            )


def _is_plain_view(t: torch.Tensor) -> bool:
    """A dense CPU or GPU tensor of torch's own, whose elements lie in one storage."""
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.layout == torch.strided
        and not t.is_nested
        and not t.is_quantized
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
    plan = block_plan(total, byte_ranges(tuple(t.shape), t.element_size()), real.itemsize)
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
    """How to sum each block's part of a sample (:meth:`_Scratch.take`) with one row-wise
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
def block_plan(n: int, ranges: tuple[tuple[int, int], ...], itemsize: int) -> _BlockPlan:
    """The :class:`_BlockPlan` of a flat tensor of ``n`` elements of ``itemsize`` bytes."""
    ends = [end // itemsize for _, end in ranges]
    if n <= STAT_SAMPLE:  # the sample is the tensor: a row a block, the last maybe short
        width = ends[0]
        rows = n // width
        tail = rows < len(ends)
        sizes = tuple(end - start for start, end in zip([0, *ends], ends, strict=False))
        return _BlockPlan(width, rows, tuple(range(rows + 1)), tail, (), sizes)
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
