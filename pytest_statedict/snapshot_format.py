"""The snapshot file format: one JSON file, one line per tensor, stable across runs.

The writer keeps the text byte-for-byte stable (a change shows as a small diff in a pull
request); the parser validates a file field by field, so that a hand-edited or corrupt
snapshot gets an error naming the file, the line and the field. A format version at the
top makes a file from another version a "regenerate", not a diff.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol

from .errors import SnapshotError, StaleSnapshotError, hide_from_bad_input
from .readers.limits import (
    MAX_DIM,
    MAX_DIMS,
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    MAX_SNAPSHOT_TENSORS,
)
from .schema_entries import (
    DTYPE_ITEMSIZE,
    KINDS,
    Fingerprint,
    ModuleVersion,
    OptimizerSchema,
    ParamGroup,
    ParamState,
    StateSpec,
    TensorEntry,
    module_version,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SnapshotContent",
    "json_containers",
    "json_depth",
    "snapshot_fields",
    "snapshot_text",
]

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

FORMAT_NAME = "pytest-statedict"


FORMAT_VERSION = 1


TOP_LEVEL_FIELDS = {
    "format", "version", "totals", "ordered", "tensors", "versions", "non_persistent_buffers",
    "extras", "optimizer",
}  # fmt: skip


def json_containers(raw: bytes | str) -> int:
    """The arrays and objects a JSON text would build (strings' brackets count too), counted
    before ``json.loads`` builds them: 60 MB of ``[[],[],...]`` parses into ~3 GB."""
    if isinstance(raw, bytes):
        return raw.count(b"[") + raw.count(b"{")
    return raw.count("[") + raw.count("{")


def json_depth(data: Any) -> int:
    """How deep lists and dicts nest in parsed JSON (counted level by level without
    recursion, only the containers of each level kept, and only to just past
    :data:`MAX_JSON_DEPTH`, beyond which nothing is accepted anyway)."""
    depth = 0
    level = [data] if type(data) in _CONTAINERS else []
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        level = [
            child
            for item in level
            for child in (item.values() if type(item) is dict else item)
            if type(child) in _CONTAINERS
        ]
    return depth


_CONTAINERS = (list, dict)  # what json.loads builds that holds more


def _is_module_version(x: Any) -> bool:
    """What :func:`module_version` keeps as it is (a snapshot holds nothing else)."""
    return module_version(x) is x


def _is_int(x: Any) -> bool:
    """An integer, not a bool (``True`` is an ``int`` in Python, never in a snapshot)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(shape: Any) -> bool:
    """A list of at most :data:`MAX_DIMS` ints (``type(d) is int``: no bools) in
    ``[0, MAX_DIM]``."""
    return (
        type(shape) is list
        and len(shape) <= MAX_DIMS
        and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    )


_shape_texts: dict[tuple[int, ...], str] = {}


_spec_texts: dict[tuple[tuple[int, ...], str], str] = {}


class SnapshotContent(Protocol):
    """What a snapshot records of a schema (:class:`~.schema.Schema` is one)."""

    @property
    def tensors(self) -> tuple[TensorEntry, ...]: ...
    @property
    def ordered(self) -> bool: ...
    @property
    def versions(self) -> Mapping[str, ModuleVersion] | None: ...
    @property
    def non_persistent_buffers(self) -> tuple[str, ...]: ...
    @property
    def optimizer(self) -> OptimizerSchema | None: ...
    @property
    def extras(self) -> Mapping[str, str]: ...
    @property
    def totals(self) -> dict[str, int]: ...


def snapshot_text(schema: SnapshotContent) -> str:
    """The snapshot text: stable byte for byte, one line per tensor and per group."""
    dump = _dump
    lines = [
        "{",
        f'"format": {dump(FORMAT_NAME)}, "version": {FORMAT_VERSION},',
        f'"totals": {dump(schema.totals)},',
    ]
    if not schema.ordered:
        lines.append('"ordered": false,')
    lines.append('"tensors": [')
    lines.extend(_joined("  " + _entry_line(t) for t in schema.tensors))
    lines.append("],")
    tail: list[str] = [f'"versions": {dump(schema.versions)}']
    if schema.non_persistent_buffers:
        tail.append(f'"non_persistent_buffers": {dump(list(schema.non_persistent_buffers))}')
    if schema.extras:
        tail.append(f'"extras": {dump(dict(schema.extras))}')
    if schema.optimizer is not None:
        tail.append(_optimizer_to_json(schema.optimizer))
    lines.append(",\n".join(tail))
    lines.append("}")
    return "\n".join(lines) + "\n"


def snapshot_fields(text: str, path: str) -> dict[str, Any]:
    """A snapshot's schema, as the keyword arguments of :class:`~.schema.Schema`: parsed
    and validated, every problem naming the file and, if it can, the line."""
    return _SnapshotParser(text, path).parse()


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))


# The lines written for every tensor and every optimizer state are built from pieces below,
# not by a json.dumps per line (4x the time, and most of a passing snapshot check's): each
# piece is what json.dumps writes for it (``_quote`` is json's own string encoder), and
# anything off the common path (values, objects, unusual field types) goes through _dump.
_quote = encode_basestring_ascii


_BOOL_TEXT = {True: "true", False: "false"}


_MAX_CACHED = 4096


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


_TENSOR_FIELDS = frozenset(
    ("key", "kind", "shape", "dtype", "requires_grad", "tied_to", "layout", "qscheme", "values")
)


_OBJECT_FIELDS = frozenset(("key", "kind", "type", "values"))


class _SnapshotParser:
    """Validates a snapshot field by field so a hand-edited file gets a precise error."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path

    def fail(self, problem: str, needle: str | None = None) -> SnapshotError:
        return SnapshotError(self.path, problem, self.line_of(needle) if needle else None)

    def line_of(self, needle: str) -> int | None:
        quoted = json.dumps(needle, ensure_ascii=True)
        # split only to name a problem's line: a string a line is ~60 bytes more a tensor
        for number, line in enumerate(self.text.splitlines(), 1):
            if quoted in line:
                return number
        return None

    def parse(self) -> dict[str, Any]:
        data = self._load_json()
        self._check_header(data)
        tensors = self.list_of(data, "tensors", self.entry)
        unknown = set(data) - TOP_LEVEL_FIELDS
        if unknown:
            raise self.fail(f"unknown field {sorted(unknown)[0]!r}", sorted(unknown)[0])
        self._check_unique_keys(tensors)
        versions = self._versions(data)
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
        return {
            "tensors": tuple(tensors),
            "ordered": ordered,
            "versions": versions,
            "non_persistent_buffers": tuple(npb),
            "optimizer": None if optimizer is None else self.optimizer(optimizer),
            "extras": extras,
            "source": self.path,
        }

    def _no_duplicates(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """``json.loads``'s object hook: a field twice in one object is an error, not the last."""
        seen = dict(pairs)
        if len(seen) < len(pairs):
            names = [key for key, _ in pairs]
            twice = next(key for i, key in enumerate(names) if key in names[:i])
            raise self.fail(f"duplicated field {twice!r} in one object", twice)
        return seen

    def _load_json(self) -> Any:
        """The file's JSON, refused before parsing if it would build too many containers and
        after if it nests too deep."""
        if not self.text.strip():
            raise self.fail("the file is empty")
        containers = json_containers(self.text)
        if containers > MAX_JSON_CONTAINERS:
            raise self.fail(
                f"{containers:,} JSON arrays and objects, more than {MAX_JSON_CONTAINERS:,}"
            )
        # each tensor's line has one "key" (a "key" inside a string is escaped: \"key\")
        entries = self.text.count('"key"')
        if entries > MAX_SNAPSHOT_TENSORS:
            raise self.fail(
                f"{entries:,} tensor entries, more than {MAX_SNAPSHOT_TENSORS:,} (a snapshot of "
                "a model and its optimizer state has far fewer)"
            )
        try:
            data = json.loads(self.text, object_pairs_hook=self._no_duplicates)
        except json.JSONDecodeError as exc:
            raise SnapshotError(self.path, f"invalid JSON ({exc.msg})", exc.lineno) from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise self.fail(f"invalid JSON ({str(exc)[:200]})") from None
        except RecursionError:
            raise self.fail(f"its JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
        if json_depth(data) > MAX_JSON_DEPTH:
            raise self.fail(f"its JSON nests deeper than {MAX_JSON_DEPTH} levels")
        return data

    def _check_header(self, data: Any) -> None:
        """The format name and version: another version is stale (regenerate or upgrade)."""
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

    def _check_unique_keys(self, tensors: list[TensorEntry]) -> None:
        keys = [t.key for t in tensors]
        duplicated = (
            sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) < len(keys) else []
        )
        if duplicated:
            raise self.fail(f"key {duplicated[0]!r} appears more than once", duplicated[0])

    def _versions(self, data: Mapping[str, Any]) -> Any:
        versions = data.get("versions")
        if versions is not None and not (
            isinstance(versions, dict) and all(map(_is_module_version, versions.values()))
        ):
            raise self.fail(
                '"versions" must be null or an object of module versions (numbers, strings, '
                "booleans or null)",
                "versions",
            )
        return versions

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
            return self._object_entry(item, key)
        if not item.keys() <= _TENSOR_FIELDS:
            unknown = sorted(set(item) - _TENSOR_FIELDS)[0]
            raise self.fail(f"{key!r}: unknown field {unknown!r}", key)
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

    def _object_entry(self, item: dict[str, Any], key: str) -> TensorEntry:
        """An entry of kind "object": a type name, and values only for packed tensors."""
        if not isinstance(item.get("type"), str):
            raise self.fail(f'{key!r}: an object entry needs a string "type"', key)
        unknown = set(item) - _OBJECT_FIELDS
        if unknown:
            raise self.fail(f"{key!r}: unknown field {sorted(unknown)[0]!r}", key)
        values = self.fingerprint(key, item["values"]) if "values" in item else None
        return TensorEntry(key=key, kind="object", type=item["type"], fingerprint=values)

    def fingerprint(self, key: str, values: Any) -> Fingerprint:
        if not isinstance(values, dict) or not isinstance(values.get("xxh3"), str):
            raise self.fail(f'{key!r}: "values" needs a string "xxh3"', key)
        stats = self._fingerprint_stats(key, values)
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
        block_means = self._block_means(key, values, len(blocks))
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

    def _fingerprint_stats(self, key: str, values: dict[str, Any]) -> dict[str, float]:
        """min, max, mean and std: numbers, or the strings "nan", "inf" and "-inf"."""
        stats = {}
        for stat in ("min", "max", "mean", "std"):
            raw = values.get(stat)
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise self.fail(f'{key!r}: "values.{stat}" must be a number', key)
            try:
                stats[stat] = float(raw)
            except ValueError:
                raise self.fail(f'{key!r}: "values.{stat}" must be a number', key) from None
        return stats

    def _block_means(self, key: str, values: dict[str, Any], blocks: int) -> tuple[float, ...]:
        """One mean a block, or none (snapshots before them lack it)."""
        means = values.get("block_means", [])
        if not (isinstance(means, list) and len(means) in (0, blocks)):
            raise self.fail(f'{key!r}: "values.block_means" needs one number a block', key)
        try:
            if any(isinstance(m, bool) or not isinstance(m, (int, float, str)) for m in means):
                raise ValueError
            return tuple(float(m) for m in means)
        except ValueError:
            raise self.fail(f'{key!r}: "values.block_means" must hold numbers', key) from None

    def optimizer(self, data: Any) -> OptimizerSchema:
        if not isinstance(data, dict) or not isinstance(data.get("class"), str):
            raise self.fail('"optimizer" needs a string "class"', "optimizer")
        groups = [
            self._param_group(group, i)
            for i, group in enumerate(self.list_of(data, "param_groups", lambda g, i: g))
        ]
        if "implementation_flags" in data:  # informational, so snapshots before it lack it
            groups = self._with_flags(groups, data["implementation_flags"])
        states = [
            self._param_state(state, i)
            for i, state in enumerate(self.list_of(data, "state", lambda s, i: s))
        ]
        return OptimizerSchema(cls=data["class"], param_groups=tuple(groups), state=tuple(states))

    def _param_group(self, group: Any, i: int) -> ParamGroup:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise self.fail(f'optimizer param_group #{i} has no "params" list', "params")
        if not all(isinstance(p, str) or _is_int(p) for p in group["params"]):
            raise self.fail(
                f'optimizer param_group #{i}: "params" must hold names or indices', "params"
            )
        hyper = {k: v for k, v in group.items() if k != "params"}
        return ParamGroup(hyperparams=hyper, params=tuple(group["params"]))

    def _with_flags(self, groups: list[ParamGroup], flags: Any) -> list[ParamGroup]:
        """The groups with their "implementation_flags", one object a group."""
        if not (
            isinstance(flags, list)
            and len(flags) == len(groups)
            and all(isinstance(f, dict) for f in flags)
        ):
            raise self.fail(
                '"implementation_flags" needs one object per param_group',
                "implementation_flags",
            )
        return [replace(g, flags=f) for g, f in zip(groups, flags, strict=True)]

    def _param_state(self, state: Any, i: int) -> ParamState:
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
        return ParamState(param=state["param"], entries=entries)
