"""Release history: a snapshot per release, and a gate that every one of them still loads.

A release snapshot is an ordinary snapshot file (the schema of the model, and of its
optimizer when one was recorded) named after the release, in one folder of the project:
``tests/__statedict__/releases/<name>.json`` by default, or the ini option
``statedict_releases_dir`` (relative to the rootdir). ``statedict record CHECKPOINT
--release NAME`` and :func:`record_release` write one, never over an existing release.
``test_releases = statedict_releases(make_model)`` in a test module makes one test per
release, newest first, each loading the release's layout through the model's own
``load_state_dict`` as :func:`~pytest_statedict.gate.assert_checkpoint_loads` does.
``statedict history`` prints what changed from release to release.

Which release is newest is read from the names, not from file times (a git checkout sets
those): names that are all versions (``v0.9``, ``1.0rc1``, ``2.0``: PEP 440, a leading
``v`` allowed) sort as versions, so ``v0.10`` is newer than ``v0.9`` and ``1.0rc1`` older
than ``1.0``; otherwise names sort naturally, runs of digits as numbers.

Nothing here imports torch until a release is recorded or checked: the plugin reads the
folder at collection.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import storage
from .errors import StateDictError, StateDictMismatch, hide_from_bad_input
from .printable import printable
from .runtime import active_session, begin_check, end_check

if TYPE_CHECKING:
    from torch import nn

    from .compare import SchemaDiff
    from .conversion import Converter
    from .rename import Rename
    from .schema import Schema

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

DEFAULT_DIR = "tests/__statedict__/releases"
DIR_INI = "statedict_releases_dir"
EXPECTED_INI = "statedict_releases_expected_to_fail"
MARKER = "statedict_releases"
PARAMETER = "statedict_release"  # the argument of the generated test
MAX_NAME = 100


class _NotGiven:
    """The default of ``optimizer=``: not given differs from ``None`` (leave it unchecked)."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()


# ---- names, order and the folder ---------------------------------------------------------


def check_name(name: str) -> str:
    """``name`` if it can name a release file as it is, else a :class:`StateDictError`."""
    if not isinstance(name, str) or not name:
        raise StateDictError(f"a release name must be a non-empty string, not {name!r}")
    safe = storage.sanitise(name, fold_case=False)
    if safe != name or len(name) > MAX_NAME or name.startswith(("-", ".")):
        raise StateDictError(
            f"release name {name!r} cannot name a file as it is: use letters, digits and "
            f"'.', '_', '-' (at most {MAX_NAME} characters, not starting with '.' or '-'), "
            "e.g. v1.2.0"
        )
    return name


def _natural(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.lower())
        for part in re.findall(r"\d+|\D+", name)
    )


def newest_first(names: Iterable[str]) -> list[str]:
    """Release names, newest first: as versions when every name is one, else naturally."""
    from packaging.version import InvalidVersion, Version

    names = sorted(set(names))
    try:
        versions = {name: Version(name) for name in names}
    except InvalidVersion:
        return sorted(names, key=_natural, reverse=True)
    return sorted(names, key=lambda n: (versions[n], _natural(n)), reverse=True)


@dataclass(frozen=True)
class Release:
    """One release snapshot: its name, its file, and why it is expected to fail, if it is."""

    name: str
    path: Path
    expected_to_fail: str | None = None

    def __repr__(self) -> str:
        return f"Release({self.name!r})"


def list_releases(folder: Path) -> list[Release]:
    """The release snapshots in ``folder``, newest first (none when there is no folder).

    Dot-files (a killed write's temp file) are not releases, nor is a file that resolves
    outside the folder (a symlink).
    """
    try:
        if not folder.is_dir():
            return []
        files = {
            p.stem: p
            for p in folder.glob(f"*{storage.SUFFIX}")
            if not p.name.startswith(".") and p.is_file() and storage.inside(p, folder)
        }
    except OSError as exc:
        raise StateDictError(f"release folder {folder} cannot be listed ({exc})") from None
    return [Release(name, files[name]) for name in newest_first(files)]


def configured_dir(config: pytest.Config) -> Path:
    """The releases folder of a pytest run: the ini option, relative to the rootdir."""
    return config.rootpath / (config.getini(DIR_INI) or DEFAULT_DIR)


def project_dir(start: Path | None = None) -> tuple[Path, Path]:
    """(rootdir, releases folder) of the project around ``start`` (default: the cwd), found
    outside pytest (the command line) as pytest finds them: the first folder upwards with a
    ``pytest.ini``, ``.pytest.ini``, ``pyproject.toml`` with ``[tool.pytest.ini_options]``,
    ``tox.ini`` with ``[pytest]`` or ``setup.cfg`` with ``[tool:pytest]``; else ``start``.
    """
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        found = _ini_setting(folder)
        if found is not None:
            return folder, folder / (found or DEFAULT_DIR)
    return start, start / DEFAULT_DIR


def _ini_setting(folder: Path) -> str | None:
    """The releases-folder setting of ``folder``'s pytest config file: None when it has
    none, '' when it has one without the setting."""
    for name in ("pytest.ini", ".pytest.ini"):  # a config file even with no [pytest]
        if (folder / name).is_file():
            return _cfg_setting(folder / name, "pytest") or ""
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file():
        try:
            import tomllib
        except ImportError:  # Python 3.10: pytest depends on tomli there
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StateDictError(f"{pyproject} cannot be read ({exc})") from None
        table = data.get("tool", {}).get("pytest")
        if isinstance(table, dict):  # [tool.pytest.ini_options], or pytest 9's [tool.pytest]
            options = table.get("ini_options", table)
            return str(options.get(DIR_INI, "")) if isinstance(options, dict) else ""
    for name, section in (("tox.ini", "pytest"), ("setup.cfg", "tool:pytest")):
        if (folder / name).is_file():
            setting = _cfg_setting(folder / name, section)
            if setting is not None:
                return setting
    return None


def _cfg_setting(path: Path, section: str) -> str | None:
    """The setting in ``section`` of an ini-style file ('' without it; None: no section)."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error) as exc:
        raise StateDictError(f"{path} cannot be read ({exc})") from None
    if not parser.has_section(section):
        return None
    return parser.get(section, DIR_INI, fallback="").strip()


# ---- recording ---------------------------------------------------------------------------


def record_release(
    model: Any,
    name: str,
    optimizer: Any = None,
    *,
    directory: str | os.PathLike[str] | None = None,
    part: str | None = None,
) -> Path:
    """Write the release snapshot ``name`` of ``model`` (a module, a state_dict, a general
    checkpoint or a checkpoint path), with ``optimizer``'s layout when given.

    The file goes to ``directory`` (relative to the rootdir in a pytest run, else to the
    working directory) or the project's releases folder (in a pytest run,
    ``statedict_releases_dir`` of its ini; outside, the one :func:`project_dir` finds), and
    never over an existing release: a release's layout is history. Returns the file.
    """
    __tracebackhide__ = True
    session = active_session()
    if directory is not None:
        base = Path.cwd() if session is None else session.config.rootpath
        folder = base / directory
    elif session is not None:
        base, folder = session.config.rootpath, configured_dir(session.config)
    else:
        base, folder = project_dir()
    return record_into(folder, name, model, optimizer, base=base, part=part)


def record_into(
    folder: Path,
    name: str,
    obj: Any,
    optimizer: Any = None,
    *,
    base: Path,
    part: str | None,
    names_from: nn.Module | None = None,
    names_optimizer: Any = None,
) -> Path:
    """Write ``obj``'s release snapshot ``name`` into ``folder`` (``base``: the folder it
    is named from, see :func:`~pytest_statedict.storage.linked_root`). ``names_from``, the
    release's model (with ``names_optimizer``, its optimizer), names the positions of a
    checkpoint's optimizer state (see :mod:`.param_names`)."""
    __tracebackhide__ = True
    refuse_recorded(folder, name)  # before reading the checkpoint, which may be large
    from .extract import schema_of

    schema = schema_of(obj, optimizer=optimizer, part=part)
    if names_from is not None:
        from .param_names import positions_named

        schema = positions_named(schema, names_from, names_optimizer)
    if not schema.tensors:
        raise StateDictError(
            f"release {name}: {obj!r} has no tensors: a release snapshot guards a model's layout"
        )
    return write_release(folder, name, schema.to_json(), base=base)


def write_release(folder: Path, name: str, text: str, *, base: Path) -> Path:
    """Write a release file atomically, refusing an existing one (by name, so that
    ``v1`` and ``V1`` on a case-insensitive file system count as one)."""
    path = folder / f"{name}{storage.SUFFIX}"
    shown = _shown(path)
    refuse_recorded(folder, name)
    try:  # exclusive: of two processes recording one release at once, one wins
        storage.write_snapshot(path, text, folder, base=base, display=shown, exclusive=True)
    except FileExistsError:
        raise _already_recorded(name, shown) from None
    return path


def refuse_recorded(folder: Path, name: str) -> None:
    """A :class:`StateDictError` unless ``name`` is a valid release name not yet recorded
    in ``folder`` (by name, so that ``v1`` and ``V1`` on a case-insensitive file system
    count as one)."""
    check_name(name)
    path = folder / f"{name}{storage.SUFFIX}"
    existing = [p for p in list_releases(folder) if p.name.lower() == name.lower()]
    if existing or os.path.lexists(path):
        raise _already_recorded(name, _shown(existing[0].path) if existing else _shown(path))


def _already_recorded(name: str, where: str) -> StateDictError:
    return StateDictError(
        f"release {name} is already recorded in {where}: a release snapshot is never "
        "overwritten (old checkpoints of that release still have that layout). Record "
        "the new layout under a new name, or delete the file by hand if it was recorded "
        "by mistake"
    )


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


# ---- the gate ----------------------------------------------------------------------------


def statedict_releases(
    make_model: Callable[..., nn.Module],
    *,
    optimizer: Callable[[nn.Module], Any] | None = NOT_GIVEN,
    expected_to_fail: Mapping[str, str] | None = None,
    directory: str | os.PathLike[str] | None = None,
    strict: bool = True,
    rename: Rename = None,
    convert: Converter | None = None,
    ignore: Iterable[str] = (),
) -> Callable[[Release], None]:
    """A test function, parametrized over every release snapshot: ``test_releases =
    statedict_releases(build_model)`` in a test module.

    ``make_model()`` (or ``make_model(release_name)``, to build today's model as that
    release was configured) gives the model, ideally on the meta device: no value of it is
    used. ``optimizer(model)`` gives today's optimizer, checked against releases that
    recorded one (``optimizer=None``: leave their optimizer state unchecked).
    ``expected_to_fail`` maps release names to the reason of a deliberate break; those
    are expected failures, listed in the summary. ``directory`` (relative to the rootdir)
    replaces ``statedict_releases_dir``; ``strict``, ``rename``, ``convert`` (the project's
    conversion of old checkpoints, run on each release's meta tensors) and ``ignore`` (key
    globs left out on both sides) are the gate's.
    """
    gate = ReleaseGate(
        make_model,
        optimizer=optimizer,
        expected_to_fail=dict(expected_to_fail or {}),
        directory=directory,
        strict=strict,
        rename=rename,
        convert=convert,
        ignore=tuple(ignore),
    )

    def test_releases(statedict_release: Release) -> None:
        __tracebackhide__ = True
        gate.check(statedict_release)

    test_releases.__doc__ = (
        f"Release snapshots still load into today's {getattr(make_model, '__name__', 'model')}."
    )
    return getattr(pytest.mark, MARKER)(gate=gate)(test_releases)  # type: ignore[no-any-return]


@dataclass
class ReleaseGate:
    """What ``statedict_releases`` was given, and the model it built (once)."""

    make_model: Callable[..., nn.Module]
    optimizer: Callable[[nn.Module], Any] | None = NOT_GIVEN
    expected_to_fail: dict[str, str] = field(default_factory=dict)
    directory: str | os.PathLike[str] | None = None
    strict: bool = True
    rename: Rename = None
    convert: Converter | None = None
    ignore: tuple[str, ...] = ()
    _model: Any = field(default=None, repr=False)
    _layout: Any = field(default=NOT_GIVEN, repr=False)

    def folder(self, config: pytest.Config) -> Path:
        if self.directory is not None:
            return config.rootpath / self.directory
        return configured_dir(config)

    def releases(self, config: pytest.Config) -> list[Release]:
        """The releases to test, each with why it is expected to fail (the argument's reason,
        else the ini's). A name in either that is no release is an error: a typo would
        otherwise expect nothing."""
        folder = self.folder(config)
        expected = dict(self.expected_to_fail)
        sources = {name: "expected_to_fail=" for name in expected}
        if self.directory is None:
            for name, reason in ini_expected_to_fail(config).items():
                expected.setdefault(name, reason)
                sources.setdefault(name, f"the ini option {EXPECTED_INI}")
        found = list_releases(folder)
        unknown = sorted(set(expected) - {r.name for r in found})
        if unknown:
            raise StateDictError(
                f"statedict_releases: {sources[unknown[0]]} names {unknown[0]!r}, which is "
                f"not a release in {_shown(folder)} (releases: "
                f"{', '.join(r.name for r in found) or 'none'})"
            )
        return [Release(r.name, r.path, expected.get(r.name)) for r in found]

    def model_for(self, release: Release) -> nn.Module:
        from .extract import require_module

        per_release = _takes_argument(self.make_model)
        if not per_release and self._model is not None:
            return self._model  # type: ignore[no-any-return]
        model = require_module(
            self.make_model(release.name) if per_release else self.make_model(),
            "statedict_releases(make_model): make_model()",
        )
        if not per_release:
            self._model = model
        return model

    def check(self, release: Release) -> None:
        """One release's gate, recorded as the run's check of kind ``release``."""
        __tracebackhide__ = True
        session = begin_check("release")
        extra = {"reason": release.expected_to_fail} if release.expected_to_fail else {}
        try:
            self._check(self.model_for(release), release)
        except Exception as exc:
            end_check()
            if session is not None:
                expected = release.expected_to_fail and isinstance(exc, StateDictMismatch)
                outcome = "xfailed" if expected else "failed"
                session.check_finished("release", release.name, outcome, exc, **extra)
            raise
        end_check()
        if session is not None:
            outcome = "xpassed" if release.expected_to_fail else "passed"
            session.check_finished("release", release.name, outcome, **extra)

    def _check(self, model: nn.Module, release: Release) -> None:
        __tracebackhide__ = True
        from .gate import assert_checkpoint_loads
        from .readers.snapshot_file import read_snapshot

        schema = read_snapshot(release.path)
        failures: list[str] = []
        diff = None
        if not self._loads_by_layout(model, schema):
            try:
                assert_checkpoint_loads(
                    model,
                    release.path,
                    strict=self.strict,
                    rename=self.rename,
                    convert=self.convert,
                    ignore=self.ignore,
                )
            except StateDictMismatch as exc:
                failures.append(str(exc))
                diff = exc.diff
        if schema.optimizer is not None:
            problem = self._optimizer_problem(model, release, schema)
            if problem:
                failures.append(problem)
        if failures:
            failures.append(
                f"  release {release.name} no longer loads. If the break is deliberate, record "
                f"it: statedict_releases(..., expected_to_fail={{{release.name!r}: 'why'}}) or "
                f"the line '{release.name}: why' in the ini option {EXPECTED_INI}"
            )
            raise StateDictMismatch("\n".join(failures), diff)

    def _loads_by_layout(self, model: nn.Module, schema: Schema) -> bool:
        """True when the release surely loads: no code of the model's runs on load, so
        torch's ``load_state_dict`` decides from keys and shapes alone, and they agree, and
        no two of its tensors load into one tied parameter (their values decide that).

        False hands the release to the gate itself (a real load through the model's own
        ``load_state_dict``), which decides, and words the failure.
        """
        from .rename import compile_rename, matches_any

        known = self._model_layout(model)
        if known is None or self.convert is not None:
            return False  # code runs on load, or before it
        layout, tied = known
        mapping = compile_rename(self.rename)
        loaded: dict[str, tuple[int, ...]] = {}
        for entry in schema.tensors:
            if entry.kind == "object" or entry.layout or entry.qscheme:
                continue  # the gate loads no value for these either
            if not _buildable(entry.dtype):
                return False
            key = mapping(entry.key) if mapping is not None else entry.key
            if not matches_any(key, self.ignore):
                loaded[key] = tuple(entry.shape or ())
        layout = {k: shape for k, shape in layout.items() if not matches_any(k, self.ignore)}
        if any(layout[k] != shape for k, shape in loaded.items() if k in layout):
            return False
        if self.strict and loaded.keys() != layout.keys():
            return False
        return not any(sum(k in loaded for k in keys) > 1 for keys in tied)

    def _model_layout(
        self, model: nn.Module
    ) -> tuple[dict[str, tuple[int, ...]], list[tuple[str, ...]]] | None:
        """Key -> shape of what ``load_state_dict`` expects, and the keys that share one
        tied parameter; None when the model has load code of its own (a ``load_state_dict``
        or ``_load_from_state_dict`` override, extra state, a load hook). Kept for the model
        built once, as its every release asks."""
        if model is self._model and self._layout is not NOT_GIVEN:
            return self._layout  # type: ignore[no-any-return]
        from .tie_verdict import tied_groups
        from .verdict import plain_layout

        layout = plain_layout(model)
        known = None if layout is None else (layout, tied_groups(model.state_dict(keep_vars=True)))
        if model is self._model:
            self._layout = known
        return known

    def _optimizer_problem(self, model: nn.Module, release: Release, schema: Schema) -> str:
        """Why the release's optimizer state would not load (or resume) today, or ''."""
        from .gate import optimizer_failure

        assert schema.optimizer is not None
        if self.optimizer is NOT_GIVEN:
            return (
                f"  release {release.name} recorded an optimizer "
                f"({printable(schema.optimizer.cls)}): pass "
                "statedict_releases(..., optimizer=lambda model: ...) to check that its state "
                "still loads, or optimizer=None to leave it unchecked"
            )
        if self.optimizer is None:
            return ""
        lines, _ = optimizer_failure(
            model,
            self.optimizer(model),
            schema,
            rename=self.rename,
            ignore=self.ignore,
            shown=f"release {release.name}",
        )
        if not lines:
            return ""
        head = f"  release {release.name}'s optimizer state: {lines[0].strip()}"
        return "\n".join([head, *lines[1:]])


def _takes_argument(factory: Callable[..., Any]) -> bool:
    """Whether ``make_model`` wants the release's name (one required positional parameter)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in parameters
    )


_BUILDABLE: dict[str | None, bool] = {}


def _buildable(dtype: str | None) -> bool:
    """Whether the gate can build a meta tensor of ``dtype`` (not a quantized one)."""
    known = _BUILDABLE.get(dtype)
    if known is None:
        import torch

        from .meta_state import QUANTIZED_DTYPES

        value = getattr(torch, dtype or "float32", None)
        known = _BUILDABLE[dtype] = isinstance(value, torch.dtype) and (
            value not in QUANTIZED_DTYPES
        )
    return known


def ini_expected_to_fail(config: pytest.Config) -> dict[str, str]:
    """``NAME: reason`` lines of the ini option, as a mapping; a line without a reason is
    a usage error (the reason is what the summary shows)."""
    expected = {}
    for line in config.getini(EXPECTED_INI):
        name, sep, reason = line.partition(":")
        if not sep or not name.strip() or not reason.strip():
            raise pytest.UsageError(
                f"{EXPECTED_INI}: {line!r} is not 'NAME: reason' (say why the release is "
                "expected to fail: the summary shows it)"
            )
        expected[name.strip()] = reason.strip()
    return expected


def parametrize_releases(metafunc: pytest.Metafunc, marker: pytest.Mark) -> None:
    """One test per release, newest first (ids: the names); none yet is one skipped test."""
    gate: ReleaseGate = marker.kwargs["gate"]
    config = metafunc.config
    releases = gate.releases(config)
    if not releases:
        shown = _shown(gate.folder(config))
        metafunc.parametrize(
            PARAMETER,
            [
                pytest.param(
                    None,
                    marks=pytest.mark.skip(
                        reason=f"no release snapshots in {shown} yet: record one with "
                        "`statedict record CHECKPOINT --release NAME`"
                    ),
                )
            ],
            ids=["no-releases"],
        )
        return
    params = [
        pytest.param(
            release,
            id=release.name,
            marks=(
                [pytest.mark.xfail(reason=release.expected_to_fail, raises=StateDictMismatch)]
                if release.expected_to_fail
                else []
            ),
        )
        for release in releases
    ]
    metafunc.parametrize(PARAMETER, params)


# ---- history -----------------------------------------------------------------------------


def history(folder: Path) -> str:
    """Per release, newest first, the keys added, removed, renamed, reshaped or retyped
    since the release before it, and whether that one's checkpoints load strictly."""
    from .compare import diff_schemas
    from .readers.snapshot_file import read_snapshot

    releases = list_releases(folder)
    if not releases:
        raise StateDictError(
            f"no release snapshots in {_shown(folder)}: record one with `statedict record "
            "CHECKPOINT --release NAME`"
        )
    schemas = [read_snapshot(r.path) for r in releases]
    out = [f"release history of {_shown(folder)} (newest first)"]
    for i, (release, schema) in enumerate(zip(releases, schemas, strict=True)):
        totals = schema.totals
        out.append("")
        if i + 1 == len(releases):
            out.append(
                f"{release.name}: the first release, {len(schema.tensors)} keys, "
                f"{totals['elements']:,} elements"
            )
            continue
        older, before = releases[i + 1].name, schemas[i + 1]
        diff = diff_schemas(before, schema)
        out.append(f"{release.name} (since {older}):")
        shown = _change_sections(diff, before, schema)
        for heading, lines in shown:
            out.append(f"  {heading} ({len(lines)}):")
            out.extend(f"    {line}" for line in lines)
        if not shown:
            out.append("  no layout change")
            continue
        out.append(_strict_load_line(older, diff))
    return "\n".join(out)


def _change_sections(
    diff: SchemaDiff, before: Schema, after: Schema
) -> list[tuple[str, list[str]]]:
    """A release's changes since the one before, each heading with its lines (none empty);
    a key renamed is listed as renamed, not as removed and added."""
    from .report import ambiguous_rename_lines, entry_line

    renamed_old = {old for old, _ in diff.renames}
    renamed_new = {new for _, new in diff.renames}
    sections = [
        ("added", [f"+ {entry_line(t)}" for t in diff.added if t.key not in renamed_new]),
        ("removed", [f"- {entry_line(t)}" for t in diff.removed if t.key not in renamed_old]),
        ("renamed", [f"{printable(old)} -> {printable(new)}" for old, new in diff.renames]),
        ("renamed, ambiguously", ambiguous_rename_lines(diff)),
        ("reshaped", [f"{printable(c.key)}: {list(c.expected or ())} -> {list(c.actual or ())}"
                      for c in diff.changed if c.attribute == "shape"]),
        ("dtype changed", [f"{printable(c.key)}: {printable(c.expected)} -> {printable(c.actual)}"
                           for c in diff.changed if c.attribute == "dtype"]),
        ("module versions", [f"{printable(m) or '<root>'}: {printable(a)} -> {printable(b)}"
                             for m, a, b in diff.versions]),
        ("optimizer", _optimizer_changes(before, after, diff.optimizer)),
    ]  # fmt: skip
    if diff.prefix:
        how, prefix = diff.prefix
        sections.insert(0, ("prefix", [f"every key has {prefix!r} {how}"]))
    return [(heading, lines) for heading, lines in sections if lines]


def _strict_load_line(older: str, diff: SchemaDiff) -> str:
    """Whether the older release's checkpoints load with strict=True, by their layout."""
    from .report import load_refusals

    if diff.layouts_load_strict:
        return f"  {older} checkpoints load with strict=True: yes, by their layout"
    reasons = load_refusals(len(diff.removed), len(diff.added), len(diff.shape_mismatches))
    if not reasons:  # then the keys differ only by a prefix
        reasons = [f"every key's prefix {diff.prefix[1]!r} {diff.prefix[0]}"]  # type: ignore[index]
    return (
        f"  {older} checkpoints load with strict=True: NO by their layout "
        f"({', '.join(reasons)}; the model's load hooks may convert them)"
    )


def _optimizer_changes(before: Schema, after: Schema, lines: list[str]) -> list[str]:
    """The optimizer lines of a release's changes: its class, groups and hyperparameters,
    and state entries that changed shape or dtype. Whether a parameter has state at all
    says whether the recorded optimizer had stepped, not what the release changed."""
    if before.optimizer is None and after.optimizer is not None:
        cls = printable(after.optimizer.cls)
        return [f"recorded from this release on ({'class unknown' if cls == 'unknown' else cls})"]
    if before.optimizer is not None and after.optimizer is None:
        return ["not recorded in this release"]
    if before.optimizer is None or after.optimizer is None:
        return lines  # neither recorded one
    kept = [line for line in lines if not _STATE_PRESENCE.match(line)]
    old, new = len(before.optimizer.state), len(after.optimizer.state)
    if old != new:
        kept.append(f"state recorded for {old} parameters, now {new}")
    return kept


_STATE_PRESENCE = re.compile(r"state of .*: (removed|added) \(")
