"""Where snapshots live, and how they are read, written and deleted.

Layout: ``<dir of test file>/__statedict__/<module>/<test>/<snapshot>.json`` where
``<test>`` is the test's name within its module (``TestClass.test_x[param-id]``) and
``<snapshot>`` is the ``name=`` given, or the index of the unnamed check within the test.
One folder per test makes ownership plain (a folder whose test is gone is unused) and keeps
xdist workers from ever sharing a file. A check made while a class- or module-scoped fixture
is set up belongs to the fixture, not to whichever test happened to need it first:
``fixture-<name>`` (``fixture-<Class>.<name>``) beside the tests' folders.

Every name component is sanitised: characters outside a safe set become ``_``, and a name
that had to change, that is too long for a file system, that has upper-case letters (a
case-insensitive file system, macOS's or Windows', would give ``GELU`` and ``gelu`` one
file), or that Windows reserves (``CON``, ``lpt1.json``, a trailing dot) gets a short hash
of the original: two ids that sanitise alike still get distinct files on every file system,
and no id can climb out of the folder. The rule depends on the name alone, so a file's name
never depends on which other tests were collected. Names that 0.1.0 wrote differently are
still read (:func:`legacy_name`), and moved by ``--statedict-update``.

Nothing is written or deleted through a path that resolves (symlinks followed) outside the
snapshot root: the ``__statedict__`` folder, or the ``statedict_snapshot_dir`` folder; nor
under a root that is itself reached through a symlink (:func:`linked_root`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SnapshotError, hide_from_bad_input

if TYPE_CHECKING:
    import pytest

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input


class SnapshotSlot:
    """One snapshot file a test asked for: where it is written, where it is read from (its
    0.1.0 name, until an update moves it), and how a report names it.

    A plain class: the module is imported by every pytest run, and a NamedTuple or a
    dataclass costs a fraction of a millisecond to build where nothing uses it.
    """

    __slots__ = ("accept", "exists", "path", "root", "shown", "source")

    def __init__(
        self, *, path: Path, source: Path, root: Path, shown: str, accept: str, exists: bool
    ) -> None:
        self.path = path
        self.source = source
        self.root = root  # the snapshot root it must stay inside
        self.shown = shown  # the source, relative to where pytest runs
        self.accept = accept  # the command that accepts a change to it
        self.exists = exists


SNAPSHOT_DIRNAME = "__statedict__"
SUFFIX = ".json"
FIXTURE_PREFIX = "fixture-"  # never starts a test's folder: a test name is an identifier
MAX_COMPONENT = 120  # bytes; file systems allow 255, leave room for the hash and suffix

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]]")
_WINDOWS_RESERVED = re.compile(r"(?i)(con|prn|aux|nul|com[1-9]|lpt[1-9])(\..*)?")


def sanitise(name: str, *, fold_case: bool = True) -> str:
    """A file-name-safe rendering of a test id or snapshot name, injective ignoring case.

    ``fold_case=False`` is for names that are file names already (test modules): those are
    distinct in their folder on the file system that holds them, so their case is kept.
    """
    safe = _legacy_safe(name)
    if safe.endswith("."):  # Windows drops trailing dots: ``x.`` would be ``x``
        safe = safe.rstrip(".") + "_"
    if _WINDOWS_RESERVED.fullmatch(safe):  # ``con.json`` is ``CON`` on Windows
        safe = "_" + safe
    if safe != name or len(safe) > MAX_COMPONENT or not safe or (fold_case and not safe.islower()):
        safe = f"{safe[:MAX_COMPONENT]}-{_digest(name)}"
    return safe


def legacy_name(name: str) -> str:
    """The name 0.1.0 gave ``name`` (its files are read where the new name is missing)."""
    safe = _legacy_safe(name)
    if safe != name or len(safe) > MAX_COMPONENT or not safe:
        safe = f"{safe[:MAX_COMPONENT]}-{_digest(name)}"
    return safe


def _legacy_safe(name: str) -> str:
    safe = _UNSAFE.sub("_", name)
    return "_" + safe[1:] if safe.startswith(".") else safe


def _digest(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def test_dirname(parts: list[str]) -> str:
    """``["TestA", "test_x[id]"]`` -> ``TestA.test_x[id]`` (sanitised).

    Class and function names are identifiers (no dots), so the join is unambiguous.
    """
    return sanitise(".".join(parts))


def fixture_dirname(parts: list[str], param: str | None) -> str:
    """``fixture-TestA.model[param]``: the folder of a class- or module-scoped fixture."""
    name = ".".join(parts) + (f"[{param}]" if param is not None else "")
    return FIXTURE_PREFIX + sanitise(name)


def is_fixture_dirname(name: str) -> bool:
    return name.startswith(FIXTURE_PREFIX)


def is_fixture_path(folder: str) -> bool:
    """Whether a snapshot folder (as a string) is a fixture's."""
    return is_fixture_dirname(os.path.basename(folder))


def module_dirname(stem: str) -> str:
    """A test file's folder: ``test_x`` for ``test_x.py`` (and a doctest ``test_x.txt``)."""
    return sanitise(stem, fold_case=False)


def leaf_name(name: str | None, index: int) -> str:
    """A named snapshot is ``<name>.json``; unnamed ones are numbered ``0.json``, ``1.json``..."""
    return (sanitise(name) if name is not None else str(index)) + SUFFIX


def legacy_leaf_name(name: str | None, index: int) -> str:
    return (legacy_name(name) if name is not None else str(index)) + SUFFIX


def exists_as_named(path: Path, below: Path) -> bool:
    """Whether ``path`` exists under exactly this spelling from ``below`` down.

    On a case-insensitive file system ``GELU/0.json`` "exists" when only ``gelu/0.json``
    does: that file is another test's, never to be read or moved as this one's.
    """
    try:
        relative = path.relative_to(below)
        folder = below
        for part in relative.parts:
            if part not in os.listdir(folder):
                return False
            folder = folder / part
    except (OSError, ValueError):
        return False
    return True


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) into ``root`` (itself resolved)."""
    return path.resolve().is_relative_to(root.resolve())


def linked_root(root: Path, base: Path) -> Path | None:
    """The symlink on the way from ``base`` down to ``root`` (the root included), or None.

    ``base`` is the folder the root is named from: the test file's folder for
    ``__statedict__``, the rootdir for ``statedict_snapshot_dir``. :func:`inside` resolves
    the root as well, so a root reached through a symlink would make whatever it points
    at, outside the project, the snapshot folder to write and delete in.
    """
    try:
        parts = root.relative_to(base).parts
    except ValueError:  # an absolute statedict_snapshot_dir: only the root itself is known
        return root if root.is_symlink() else None
    folder = base
    for part in parts:
        folder = folder / part
        if folder.is_symlink():
            return folder
    return None


def _refuse_outside(path: Path, root: Path, base: Path, doing: str, shown: str | Path) -> None:
    link = linked_root(root, base)
    if link is not None:
        raise SnapshotError(
            shown,
            f"is in the snapshot folder {root}, reached through the symlink {link} (to "
            f"{link.resolve()}): refusing to {doing} it",
            remedy=f"make {link} a real folder: snapshots are the project's own files",
        )
    if not inside(path, root):
        raise SnapshotError(
            shown,
            f"resolves to {path.resolve()}, outside the snapshot folder {root}, through a "
            f"symlink: refusing to {doing} it",
            remedy="replace the symlink with a real folder or file inside the snapshot folder",
        )


def write_snapshot(
    path: Path,
    text: str,
    root: Path,
    *,
    base: Path,
    display: str | None = None,
    exclusive: bool = False,
) -> None:
    """:func:`atomic_write` inside ``root`` only, failures as a :class:`SnapshotError`
    (but an ``exclusive`` write's ``FileExistsError``, which the caller words).

    ``base``: the folder ``root`` is named from (see :func:`linked_root`).
    """
    shown = display or path
    _refuse_outside(path, root, base, "write", shown)
    try:
        atomic_write(path, text, exclusive=exclusive)
    except FileExistsError:
        raise  # only an exclusive write's: the name exists, which the caller words
    except OSError as exc:
        raise SnapshotError(
            shown,
            f"cannot be written ({_reason(exc)})",
            remedy="the old file, if any, is intact; free space or fix the folder's "
            "permissions and run again",
        ) from None


def atomic_write(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write via a temp file in the same folder and rename: old or new, never partial.

    ``exclusive``: publish only if ``path`` does not exist, by a hard link (atomic, and
    refused by the file system when the name exists: of two processes recording one
    release at once, exactly one succeeds, and the other gets a ``FileExistsError``).
    A string that is not valid Unicode (a lone surrogate from a key name) is written with
    backslash escapes rather than failing the write.
    """
    import tempfile  # not at import: the plugin is loaded into runs that never write

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(fd, _file_mode(path))  # mkstemp makes 0600: a snapshot is a project file
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _publish_exclusively(Path(tmp), path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _publish_exclusively(tmp: Path, path: Path) -> None:
    """Give the written ``tmp`` the name ``path`` unless that name exists, atomically: a
    hard link, or where the file system has none, an exclusive create of ``path``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FAT file systems)
        with open(path, "xb") as out, open(tmp, "rb") as written:
            out.write(written.read())
            out.flush()
            os.fsync(out.fileno())
    tmp.unlink()


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror}, {name}" if exc.strerror and name else str(exc)


def _file_mode(path: Path) -> int:
    """The mode the file has, or the one ``open()`` would give a new file (0666 - umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def snapshot_files(module_dir: Path, root: Path) -> list[Path]:
    """The snapshot files of a module: ``<module>/<test>/<leaf>.json``, nothing deeper.

    Temp files of a killed write (dot-files) are not snapshots; deeper files belong to
    someone else (another module's folder nested here by ``statedict_snapshot_dir``); a
    file that resolves outside ``root`` (a symlink) is not the project's to judge.
    """
    try:
        if not module_dir.is_dir():
            return []
        return sorted(
            p
            for p in module_dir.glob(f"*/*{SUFFIX}")
            if p.is_file() and not p.name.startswith(".") and inside(p, root)
        )
    except OSError as exc:
        raise SnapshotError(module_dir, f"cannot be listed ({_reason(exc)})") from None


def remove_snapshot(path: Path, root: Path, *, base: Path, display: str | None = None) -> None:
    """Delete a snapshot, and its test's and module's folders once empty (never ``root``)."""
    _refuse_outside(path, root, base, "delete", display or path)
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise SnapshotError(
            display or path,
            f"cannot be deleted ({_reason(exc)})",
            remedy="fix the folder's permissions, or delete it by hand",
        ) from None
    for folder in (path.parent, path.parent.parent):
        if folder.resolve() == root.resolve() or not inside(folder, root):
            break
        try:
            folder.rmdir()
        except OSError:
            break


# pytest-repeat's ids: ``test_x[2-5]``, ``test_x[a-2-5]`` (it parametrizes last)
REPEAT_ID = re.compile(r"(?:\[|-)(\d+)-\d+\]$")


def item_parts(item: pytest.Item) -> list[str]:
    """The names from the module down to the test: ``["TestA", "test_x[id]"]``.

    pytest-repeat's repetitions (``test_x[a-2-5]``) are one test to a snapshot: the same
    code asked the same question, so they share ``test_x[a]``'s files.
    """
    import pytest

    parts: list[str] = []
    for node in item.listchain():
        if isinstance(node, pytest.Module):
            parts = []
        else:
            parts.append(node.name)
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "__pytest_repeat_step_number" in callspec.params:
        step = callspec.params["__pytest_repeat_step_number"]
        match = REPEAT_ID.search(parts[-1])
        if match and int(match.group(1)) == step + 1:
            name = parts[-1][: match.start()]
            parts[-1] = name + "]" if match.group(0).startswith("-") else name
    return parts
