"""Exact comparison of tensors: dtype, shape, layout, then the bits.

``torch.equal`` is not enough: it ignores dtype (float32 and float16 of equal values are
"equal"), says NaN != NaN, and 0.0 == -0.0. Here a tensor equals another when its bytes do,
so NaN payloads, -0.0 and infinities are equal to themselves and a flipped bit is not.
Contiguous CPU tensors are compared with ``memcmp`` at memory bandwidth; other devices
through an integer view of the same bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Mapping
from typing import Any

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _load_memcmp() -> Any:
    name = ctypes.util.find_library("c") or ctypes.util.find_library("msvcrt")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        memcmp = libc.memcmp
    except (OSError, AttributeError):
        return None
    memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    memcmp.restype = ctypes.c_int
    return memcmp


_MEMCMP = _load_memcmp()


def difference(expected: Any, actual: Any) -> str | None:
    """None when ``actual`` is exactly ``expected``; otherwise what differs, in words."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)):
            return f"type {type(expected).__name__} -> {type(actual).__name__}"
        return tensor_difference(expected, actual)
    if isinstance(expected, dict) and isinstance(actual, dict):
        return _dict_difference(expected, actual)
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return _sequence_difference(expected, actual)
    if isinstance(expected, float) and isinstance(actual, float):
        return _float_difference(expected, actual)
    try:
        same = type(expected) is type(actual) and bool(expected == actual)
    except Exception:  # an object whose == raises or is ambiguous
        same = repr(expected) == repr(actual)
    return None if same else f"{expected!r} -> {actual!r}"


def _dict_difference(expected: dict[Any, Any], actual: dict[Any, Any]) -> str | None:
    """Other keys, or the first key whose values differ."""
    if expected.keys() != actual.keys():
        return f"keys {sorted(map(str, expected))} -> {sorted(map(str, actual))}"
    for key in expected:
        inner = difference(expected[key], actual[key])
        if inner:
            return f"[{key!r}] {inner}"
    return None


def _sequence_difference(
    expected: list[Any] | tuple[Any, ...], actual: list[Any] | tuple[Any, ...]
) -> str | None:
    """Another length or type (list or tuple), or the first item that differs."""
    if len(expected) != len(actual) or type(expected) is not type(actual):
        return f"{expected!r} -> {actual!r}"
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        inner = difference(e, a)
        if inner:
            return f"[{i}] {inner}"
    return None


def _float_difference(expected: float, actual: float) -> str | None:
    """Floats by number and sign: -0.0 is not 0.0, and any NaN is the same as any NaN."""
    same = expected == actual and math.copysign(1, expected) == math.copysign(1, actual)
    return (
        None
        if same or (math.isnan(expected) and math.isnan(actual))
        else (f"{expected!r} -> {actual!r}")
    )


def tensor_difference(expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    if expected.layout != actual.layout:
        return f"layout {expected.layout} -> {actual.layout}"
    if expected.dtype != actual.dtype:
        return f"dtype {_dtype(expected)} -> {_dtype(actual)}"
    if expected.shape != actual.shape:
        return f"shape {list(expected.shape)} -> {list(actual.shape)}"
    if expected.is_meta or actual.is_meta:
        side = "expected" if expected.is_meta else "actual"
        return f"the {side} tensor is on the meta device (never loaded: it has no values)"
    if expected.layout == torch.sparse_coo:
        e, a = expected.coalesce(), actual.coalesce()
        return _first(
            ("indices", tensor_difference(e.indices(), a.indices())),
            ("values", tensor_difference(e.values(), a.values())),
        )
    if expected.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        compressed, plain = (
            (torch.Tensor.crow_indices, torch.Tensor.col_indices)
            if expected.layout in (torch.sparse_csr, torch.sparse_bsr)
            else (torch.Tensor.ccol_indices, torch.Tensor.row_indices)
        )
        return _first(
            ("compressed indices", tensor_difference(compressed(expected), compressed(actual))),
            ("plain indices", tensor_difference(plain(expected), plain(actual))),
            ("values", tensor_difference(expected.values(), actual.values())),
        )
    if expected.is_quantized:
        return _quantized_difference(expected, actual)
    return _bytes_difference(expected, actual)


def _first(*named: tuple[str, str | None]) -> str | None:
    for name, problem in named:
        if problem:
            return f"{name}: {problem}"
    return None


def _quantized_difference(expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    if expected.qscheme() != actual.qscheme():
        return f"qscheme {expected.qscheme()} -> {actual.qscheme()}"
    if expected.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        params = [
            ("scale", difference(expected.q_scale(), actual.q_scale())),
            ("zero_point", difference(expected.q_zero_point(), actual.q_zero_point())),
        ]
    else:
        params = [
            ("scales", tensor_difference(
                expected.q_per_channel_scales(), actual.q_per_channel_scales())),
            ("zero_points", tensor_difference(
                expected.q_per_channel_zero_points(), actual.q_per_channel_zero_points())),
            ("axis", difference(expected.q_per_channel_axis(), actual.q_per_channel_axis())),
        ]  # fmt: skip
    return _first(*params, ("int_repr", _bytes_difference(expected.int_repr(), actual.int_repr())))


def _bytes_difference(expected: torch.Tensor, actual: torch.Tensor) -> str | None:
    if expected.numel() == 0:
        return None
    if actual.device != expected.device:
        actual = actual.to(expected.device)
    e, a = expected.contiguous(), actual.contiguous()
    nbytes = e.numel() * e.element_size()
    if e.device.type == "cpu" and _MEMCMP is not None:
        if _MEMCMP(e.data_ptr(), a.data_ptr(), nbytes) == 0:
            return None
    elif torch.equal(_int_view(e), _int_view(a)):
        return None
    return _describe_bit_difference(e, a)


def _int_view(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    size = t.element_size()
    if size in _INT_VIEW:
        return flat.view(_INT_VIEW[size])
    return flat.view(torch.uint8)


def _describe_bit_difference(e: torch.Tensor, a: torch.Tensor) -> str:
    ev, av = _int_view(e), _int_view(a)
    per = max(1, ev.numel() // max(1, e.numel()))  # integer words per element
    differs = (ev != av).reshape(e.numel(), per).any(dim=1) if per > 1 else ev != av
    count = int(differs.sum())
    first = int(differs.nonzero()[0, 0])
    index = list(torch.unravel_index(torch.tensor(first), e.shape)) if e.dim() else []
    where = [int(i) for i in index]
    old, new = e.reshape(-1)[first], a.reshape(-1)[first]
    try:
        shown = f"{old.item()!r} -> {new.item()!r}"
    except (RuntimeError, TypeError):
        shown = "(bits differ)"
    return f"{count} of {e.numel()} elements differ in their bits, first at {where}: {shown}"


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def compare_states(
    expected: Mapping[str, Any], actual: Mapping[str, Any]
) -> tuple[list[str], int, int]:
    """Every key's difference between two state_dicts, and the tensors and bytes compared.

    A key on one side only is a mismatch of its own (missing or unexpected after loading).
    """
    mismatches = [f"{key}: missing after loading" for key in expected if key not in actual]
    mismatches += [f"{key}: unexpected after loading" for key in actual if key not in expected]
    tensors = nbytes = 0
    for key, e in expected.items():
        if key not in actual:
            continue
        problem = difference(e, actual[key])
        if problem:
            mismatches.append(f"{key}: {problem}")
        if isinstance(e, torch.Tensor):
            tensors += 1
            nbytes += e.numel() * e.element_size()
    return mismatches, tensors, nbytes


def on_cpu(obj: Any) -> Any:
    """``obj`` (an optimizer state_dict, ...) with every tensor in it copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [on_cpu(v) for v in obj]
    return obj
