"""What every reader checks before it reads: a regular, readable, non-empty file, read
within a bound, and JSON parsed within a depth.

Only regular files are read: a path symlinked to ``/dev/zero`` (endless) or to a FIFO
(blocks forever) is refused by its type, before it is opened. Errors name the file and
never echo its content beyond a short hex of its first bytes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointError, StateDictError, hide_from_bad_input
from ..snapshot_format import json_containers, json_depth
from .limits import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH

# pytest leaves this module's frames out of bad-input errors (see hide_from_bad_input)
__tracebackhide__ = hide_from_bad_input

FORMATS_READ = (
    "a torch.save file, .safetensors, a sharded *.index.json, a torch.distributed.checkpoint "
    "folder or a statedict snapshot .json"
)


Fail = Callable[[str], StateDictError]


def require_regular_file(
    path: Path, fail: Fail | None = None, what: str = "checkpoint file"
) -> os.stat_result:
    """The file's stat, or ``fail(problem)`` (a :class:`CheckpointError` by default)."""
    fail = fail or (lambda problem: CheckpointError(path, problem))
    try:
        info = path.stat()  # follows symlinks: the type of what is read
    except FileNotFoundError:
        problem = "a symlink to a missing file" if path.is_symlink() else "no such file"
        raise fail(problem) from None
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        formats = f" ({FORMATS_READ})" if what == "checkpoint file" else ""
        raise fail(f"is a directory, not a {what}{formats}")
    if not stat.S_ISREG(info.st_mode):
        raise fail("is not a regular file (a device, FIFO or socket): only files are read")
    if not os.access(path, os.R_OK):
        raise fail("permission denied")
    if info.st_size == 0:
        raise fail("the file is empty")
    return info


def open_regular(path: Path, fail: Fail | None = None) -> BinaryIO:
    """``path`` opened for reading, only if it is still a regular file once open.

    Opened without blocking, so a FIFO swapped in after :func:`require_regular_file`
    looked cannot hang the open; its type is then checked on the open descriptor.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        fail = fail or (lambda problem: CheckpointError(path, problem))
        raise fail("is not a regular file (a device, FIFO or socket)")
    return os.fdopen(fd, "rb")


def read_bounded(
    path: Path, limit: int, what: str, fail: Fail | None = None, too_big: Fail | None = None
) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (``what`` names it in errors).

    ``fail`` makes the error of a path that is no readable file, ``too_big`` that of a file
    over the limit (both ``fail``, or a :class:`CheckpointError`, by default).
    """
    size = require_regular_file(path, fail, what).st_size
    fail = fail or (lambda problem: CheckpointError(path, problem))
    too_big = too_big or fail
    if size > limit:
        raise too_big(f"{size:,} bytes, more than a {what} may have ({limit:,})")
    try:
        with open_regular(path, fail) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:  # grew since it was measured
        raise too_big(f"more than a {what} may have ({limit:,} bytes)")
    return data


def parse_json(raw: bytes | str, fail: Callable[[str], StateDictError], what: str) -> Any:
    """JSON within :data:`MAX_JSON_DEPTH`; every failure (a 5000-digit number, nesting
    deep enough to exhaust the interpreter's stack) is ``fail(problem)``."""
    check_json_containers(raw, fail, what)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise fail(f"{what} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise fail(f"{what} is not UTF-8 text") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise fail(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise fail(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise fail(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def check_json_containers(raw: bytes | str, fail: Fail, what: str) -> None:
    """Refuse JSON with more arrays and objects than :data:`MAX_JSON_CONTAINERS`."""
    count = json_containers(raw)
    if count > MAX_JSON_CONTAINERS:
        raise fail(
            f"{what} holds {count:,} JSON arrays and objects, more than {MAX_JSON_CONTAINERS:,}"
        )


def magic_hex(head: bytes) -> str:
    """The first bytes of a file as hex, for an error (never the file's text)."""
    return head[:4].hex(" ")
