"""Where snapshots live, and how they are written.

Layout: ``<dir of test file>/__statedict__/<module>/<test>/<snapshot>.json`` where
``<test>`` is the test's name within its module (``TestClass.test_x[param-id]``) and
``<snapshot>`` is the ``name=`` given, or the index of the unnamed check within the test.
One folder per test makes ownership plain (a folder whose test is gone is unused) and keeps
xdist workers from ever sharing a file.

Every name component is sanitised: characters outside a safe set become ``_``, and a name
that had to change, or that is too long for a file system, gets a short hash of the
original, so two ids that sanitise alike still get distinct files, and no id can climb out
of the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import hide_from_bad_input

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

SNAPSHOT_DIRNAME = "__statedict__"
SUFFIX = ".json"
MAX_COMPONENT = 120  # bytes; file systems allow 255, leave room for the hash and suffix

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]]")


def sanitise(name: str) -> str:
    """A file-name-safe, injective rendering of a test id or snapshot name."""
    safe = _UNSAFE.sub("_", name)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != name or len(safe) > MAX_COMPONENT or not safe:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{safe[:MAX_COMPONENT]}-{digest}"
    return safe


def test_dirname(parts: list[str]) -> str:
    """``["TestA", "test_x[id]"]`` -> ``TestA.test_x[id]`` (sanitised).

    Class and function names are identifiers (no dots), so the join is unambiguous.
    """
    return sanitise(".".join(parts))


def module_snapshot_dir(module_path: Path, root: Path | None = None) -> Path:
    """The folder holding one test module's snapshots (``statedict_snapshot_dir`` moves it)."""
    base = root if root is not None else module_path.parent / SNAPSHOT_DIRNAME
    return base / sanitise(module_path.stem)


def snapshot_path(module_dir: Path, test_parts: list[str], name: str | None, index: int) -> Path:
    """A named snapshot is ``<name>.json``; unnamed ones are numbered ``0.json``, ``1.json``..."""
    leaf = sanitise(name) if name is not None else str(index)
    return module_dir / test_dirname(test_parts) / f"{leaf}{SUFFIX}"


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename: old or new, never partial."""
    import tempfile  # not at import: the plugin is loaded into runs that never write

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(fd, _file_mode(path))  # mkstemp makes 0600: a snapshot is a project file
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def snapshot_files(module_dir: Path) -> list[Path]:
    """The snapshot files of a module: ``<module>/<test>/<leaf>.json``, nothing deeper.

    Temp files of a killed write (dot-files) are not snapshots; deeper files belong to
    someone else (another module's folder nested here by ``statedict_snapshot_dir``).
    """
    if not module_dir.is_dir():
        return []
    return sorted(
        p for p in module_dir.glob(f"*/*{SUFFIX}") if p.is_file() and not p.name.startswith(".")
    )


def remove_snapshot(path: Path) -> None:
    """Delete an unused snapshot, and its test's folder once empty."""
    path.unlink(missing_ok=True)
    for folder in (path.parent, path.parent.parent):
        try:
            folder.rmdir()
        except OSError:
            break
