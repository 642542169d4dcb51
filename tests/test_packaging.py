"""What a user installs: ``statedict --version``, and the checks of .ci/check_dist.py.

Building the distributions takes ``build``, ``twine`` and an index to fetch the build
backend from, so CI's lint env runs ``.ci/check_dist.py`` itself; here its checks are held
against small archives made to break each one.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest

from pytest_statedict import distribution

CHECKOUT = Path(__file__).resolve().parent.parent
CHECK_DIST = CHECKOUT / ".ci" / "check_dist.py"


def test_statedict_version_prints_the_installed_release_without_torch(tmp_path: Path) -> None:
    """The console script as a user runs it, with torch unimportable: ``--version`` must
    answer where torch is broken or absent (and cost no torch import elsewhere)."""
    blocked = tmp_path / "blocked"
    (blocked / "torch").mkdir(parents=True)
    (blocked / "torch" / "__init__.py").write_text(
        "raise ImportError('torch is blocked: statedict --version imported it')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocked), env.get("PYTHONPATH")]))
    script = shutil.which("statedict", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "pytest_statedict"]
    done = subprocess.run(
        [*command, "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"statedict (pytest-statedict) {version('pytest-statedict')}\n"


def test_a_source_tree_reports_its_pyproject_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"))
    assert distribution.source_tree_version(CHECKOUT) == pyproject["project"]["version"]

    # run from a checkout, never installed: the version is the checkout's, and says so
    monkeypatch.setattr(distribution, "installed_version", lambda: None)
    monkeypatch.setattr(distribution, "CHECKOUT", CHECKOUT)
    assert distribution.version_line() == (
        f"statedict (pytest-statedict) {pyproject['project']['version']} "
        f"(not installed: run from {CHECKOUT})"
    )
    # a copy unpacked inside another project reads no version from that project's file
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\nversion = "9.9"\n')
    monkeypatch.setattr(distribution, "CHECKOUT", tmp_path)
    assert distribution.source_tree_version(tmp_path) is None
    assert distribution.version_line() == (
        "statedict (pytest-statedict), version unknown (not installed)"
    )


# ---- .ci/check_dist.py -----------------------------------------------------------------


@pytest.fixture(scope="module")
def check_dist() -> ModuleType:
    if not CHECK_DIST.exists():
        pytest.skip("the CI scripts are not in this checkout")
    spec = importlib.util.spec_from_file_location("check_dist", CHECK_DIST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENTRY_POINTS = (
    "[console_scripts]\nstatedict = pytest_statedict.cli:main\n\n"
    "[pytest11]\nstatedict = pytest_statedict.plugin\n"
)
DIST_INFO = "pytest_statedict-0.1.0.dist-info/"


def make_wheel(folder: Path, files: dict[str, str]) -> Path:
    path = folder / "pytest_statedict-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def make_sdist(folder: Path, names: set[str]) -> Path:
    path = folder / "pytest_statedict-0.1.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name in sorted(names):
            info = tarfile.TarInfo(f"pytest_statedict-0.1.0/{name}")
            archive.addfile(info, io.BytesIO(b""))
    return path


def test_check_dist_passes_the_package_and_names_each_stray_or_missing_file(
    check_dist: ModuleType, tmp_path: Path
) -> None:
    package = check_dist.package_files()
    assert (
        "pytest_statedict/py.typed" in package and "pytest_statedict/readers/limits.py" in package
    )
    wheel = {name: "" for name in package} | {
        DIST_INFO + "METADATA": "",
        DIST_INFO + "entry_points.txt": ENTRY_POINTS,
    }
    assert check_dist.wheel_problems(make_wheel(tmp_path, wheel)) == []

    broken = {n: t for n, t in wheel.items() if not n.endswith("py.typed")}
    broken["tests/conftest.py"] = ""
    broken["pytest_statedict/notes.txt"] = ""
    broken[DIST_INFO + "entry_points.txt"] = ENTRY_POINTS.replace("[pytest11]", "[pytest12]")
    assert check_dist.wheel_problems(make_wheel(tmp_path, broken)) == [
        "wheel: tests/conftest.py is neither the package nor its .dist-info",
        "wheel: pytest_statedict/py.typed is missing",
        "wheel: pytest_statedict/notes.txt is not a module of the package",
        "wheel: entry_points.txt [pytest11] declares statedict = None, not pytest_statedict.plugin",
    ]

    sdist = package | set(check_dist.SDIST_DOCUMENTS) | {"PKG-INFO", "setup.cfg"}
    sdist |= {"pytest_statedict.egg-info/PKG-INFO"}
    if (CHECKOUT / "CHANGELOG.md").is_file():
        sdist.add("CHANGELOG.md")
    assert check_dist.sdist_problems(make_sdist(tmp_path, sdist)) == []
    stray = (sdist - {"LICENSE"}) | {"tests/conftest.py"}
    assert check_dist.sdist_problems(make_sdist(tmp_path, stray)) == [
        "sdist: LICENSE is missing",
        "sdist: tests/conftest.py is not needed to build the wheel (MANIFEST.in leaves it out)",
    ]
