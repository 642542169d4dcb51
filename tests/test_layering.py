"""The package's import graph: readers at the bottom, and no circle anywhere.

Every import counts, function-level and ``TYPE_CHECKING`` ones included: a lazy import is
still a dependency, a circle through one breaks the day someone moves it to the top of the
module, and a type checker follows the ``TYPE_CHECKING`` ones as an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pytest_statedict

PACKAGE = Path(pytest_statedict.__file__).parent
NAME = "pytest_statedict"
# What a reader may import from the package, besides the other readers.
BELOW_READERS = {
    f"{NAME}.errors",
    f"{NAME}.schema",
    f"{NAME}.schema_entries",
    f"{NAME}.snapshot_format",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package's modules that the file imports, anywhere in it."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import x` imports the module x; `from .m import f` imports m
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found.update(submodules or {base})
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_the_graph_sees_every_import() -> None:
    edges = graph()
    assert f"{NAME}.formats.reading" in edges[f"{NAME}.extract"]
    assert f"{NAME}.readers.unpickling" in edges[f"{NAME}.readers.torch_zip"]
    assert f"{NAME}.runtime" in edges[f"{NAME}.round_trip"]  # a function-level import
    assert f"{NAME}.assertions" in edges[NAME]  # an import under TYPE_CHECKING


def test_no_module_imports_another_ones_private_names() -> None:
    """A name another module needs is that module's public surface, not its ``_detail``."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or node.module in modules):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module_name(path)} imports {private} from {node.module}"


def test_readers_import_nothing_above_them() -> None:
    for module, imported in graph().items():
        if module.startswith(f"{NAME}.readers"):
            above = {m for m in imported if not m.startswith(f"{NAME}.readers")} - BELOW_READERS
            assert not above, f"{module} imports {sorted(above)}"


def test_formats_sit_between_readers_and_extract() -> None:
    """Formats wrap readers and build schemas with ``layout``; ``extract`` (torch) is above."""
    below = BELOW_READERS | {f"{NAME}.layout"}
    for module, imported in graph().items():
        if module.startswith(f"{NAME}.formats"):
            above = {
                m
                for m in imported
                if not m.startswith((f"{NAME}.readers", f"{NAME}.formats")) and m not in below
            }
            assert not above, f"{module} imports {sorted(above)}"


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(edges.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_the_old_checkpoint_module_is_gone() -> None:
    assert not (PACKAGE / "checkpoint.py").exists()
    for path in PACKAGE.rglob("*.py"):
        assert f"{NAME}.checkpoint" not in imports_of(path), path


def test_the_readers_import_no_torch_until_they_read() -> None:
    """Importing the layer is free: torch loads inside the functions that need it."""
    import subprocess
    import sys

    readers = sorted(m for m in graph() if m.startswith(f"{NAME}.readers"))
    code = "import sys\n" + "".join(f"import {m}\n" for m in readers)
    code += "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_subpackage_is_shipped() -> None:
    """setuptools lists packages one by one: a subpackage missing there is missing in wheels."""
    tomllib = pytest.importorskip("tomllib")
    checkout = Path(__file__).resolve().parents[1]  # the package may be installed elsewhere
    pyproject = tomllib.loads((checkout / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = set(pyproject["tool"]["setuptools"]["packages"])
    source = checkout / "pytest_statedict"
    assert {module_name(p.parent, source) for p in source.rglob("__init__.py")} <= shipped
