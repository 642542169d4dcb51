"""Which release of pytest-statedict is running: for ``statedict --version`` and the run report.

An installed copy knows its version from its distribution's metadata. A source tree on
``sys.path`` (a checkout run with ``PYTHONPATH``, never installed) has none: there the
version is the checkout's ``pyproject.toml``, which is what such a copy would install as.
Both are read only when asked for: ``importlib.metadata`` costs a noticeable part of a
``statedict show``.
"""

from __future__ import annotations

import re
from pathlib import Path

DISTRIBUTION = "pytest-statedict"
# the checkout this package sits in, when it is run from one
CHECKOUT = Path(__file__).resolve().parent.parent


def installed_version() -> str | None:
    """The installed distribution's version, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return None


def source_tree_version(checkout: Path) -> str | None:
    """The version in the ``pyproject.toml`` of ``checkout``, the folder above the package.

    Read with a pattern, not a TOML parser: Python 3.10 has no ``tomllib``, and the line
    is the project's own (``version = "X.Y.Z"`` in its ``[project]`` table).
    """
    try:
        text = (checkout / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if project is None or f'name = "{DISTRIBUTION}"' not in project.group(1):
        return None  # some other project's pyproject.toml above an unpacked copy
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return found.group(1) if found else None


def version_line() -> str:
    """What ``statedict --version`` prints."""
    installed = installed_version()
    if installed is not None:
        return f"statedict ({DISTRIBUTION}) {installed}"
    from_source = source_tree_version(CHECKOUT)
    if from_source is not None:
        return f"statedict ({DISTRIBUTION}) {from_source} (not installed: run from {CHECKOUT})"
    return f"statedict ({DISTRIBUTION}), version unknown (not installed)"
