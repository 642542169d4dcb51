"""Build the sdist and the wheel as a release would, and check what a user would install.

    python .ci/check_dist.py                 # build into a temporary folder, check, delete
    python .ci/check_dist.py --outdir dist   # keep the checked files (to upload them)

Needs ``build`` and ``twine`` (the build itself installs the build backend that
pyproject.toml names into an isolated environment, as pip does). ``python -m build``
makes the sdist and then the wheel from that sdist, so a file the sdist lacks fails the
wheel too. Then:

- ``twine check --strict`` on both: the metadata and the README render on PyPI;
- the wheel holds the package (every module of the source tree, and ``py.typed`` for type
  checkers) and its ``.dist-info``, nothing else: no tests, examples or benchmarks;
- its ``entry_points.txt`` declares the pytest plugin (``pytest11``) and the ``statedict``
  command, without which pytest would not load the plugin nor pip install the command;
- the sdist holds what builds the wheel and the documents that go with it, nothing else.

Exit status 0 when all holds, 1 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import configparser
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pytest_statedict"
ENTRY_POINTS = {
    "pytest11": ("statedict", "pytest_statedict.plugin"),
    "console_scripts": ("statedict", "pytest_statedict.cli:main"),
}
# The sdist's files besides the package: the build's own (PKG-INFO, setup.cfg, the
# egg-info folder) and the documents. CHANGELOG.md is required where the checkout has one.
SDIST_DOCUMENTS = ("pyproject.toml", "README.md", "LICENSE")
SDIST_MAY_HOLD = ("PKG-INFO", "setup.cfg", "MANIFEST.in", "CHANGELOG.md")


def package_files() -> set[str]:
    """The files a wheel must hold for the package: every module, and ``py.typed``."""
    source = ROOT / PACKAGE
    modules = {
        f"{PACKAGE}/{path.relative_to(source).as_posix()}"
        for path in source.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    return modules | {f"{PACKAGE}/py.typed"}


def run(command: list[str], what: str) -> str:
    """Run ``command``; on failure, stop with its output (the build's log says why)."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(
            f"check_dist: {what} failed (exit status {done.returncode}):\n{output.strip()}"
        )
    return output


def wheel_problems(wheel: Path) -> list[str]:
    name, version = wheel.name.split("-")[:2]
    dist_info = f"{name}-{version}.dist-info/"
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        entry_points = archive.read(dist_info + "entry_points.txt").decode("utf-8")
    problems = [
        f"wheel: {n} is neither the package nor its .dist-info"
        for n in names
        if not n.startswith((f"{PACKAGE}/", dist_info))
    ]
    shipped = {n for n in names if n.startswith(f"{PACKAGE}/")}
    expected = package_files()
    problems += [f"wheel: {n} is missing" for n in sorted(expected - shipped)]
    problems += [f"wheel: {n} is not a module of the package" for n in sorted(shipped - expected)]
    declared = configparser.ConfigParser(delimiters=("=",))
    declared.optionxform = str  # type: ignore[assignment,method-assign]  # names keep their case
    declared.read_string(entry_points)
    for group, (entry, target) in ENTRY_POINTS.items():
        found = declared.get(group, entry, fallback=None)
        if found != target:
            problems.append(
                f"wheel: entry_points.txt [{group}] declares {entry} = {found}, not {target}"
            )
    return problems


def sdist_problems(sdist: Path) -> list[str]:
    top = sdist.name.removesuffix(".tar.gz") + "/"
    with tarfile.open(sdist) as archive:
        names = {m.name.removeprefix(top) for m in archive.getmembers() if m.isfile()}
    required = set(SDIST_DOCUMENTS) | package_files()
    if (ROOT / "CHANGELOG.md").is_file():
        required.add("CHANGELOG.md")
    problems = [f"sdist: {n} is missing" for n in sorted(required - names)]
    allowed = required | set(SDIST_MAY_HOLD)
    problems += [
        f"sdist: {n} is not needed to build the wheel (MANIFEST.in leaves it out)"
        for n in sorted(names - allowed)
        if not n.startswith(f"{PACKAGE}.egg-info/")
    ]
    return problems


def describe(path: Path, count: int) -> str:
    return f"{path.name} ({count} files, {path.stat().st_size / 1024:.0f} KiB)"


def check(outdir: Path) -> int:
    run([sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)], "python -m build")
    (sdist,) = outdir.glob("*.tar.gz")
    (wheel,) = outdir.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        wheel_count = sum(not n.endswith("/") for n in archive.namelist())
    with tarfile.open(sdist) as archive:
        sdist_count = sum(m.isfile() for m in archive.getmembers())
    print(f"built {describe(sdist, sdist_count)} and {describe(wheel, wheel_count)}")
    run(
        [sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
        "twine check --strict",
    )
    print("twine check --strict: both PASSED")
    problems = wheel_problems(wheel) + sdist_problems(sdist)
    if problems:
        print("check_dist: FAILED", *problems, sep="\n  ", file=sys.stderr)
        return 1
    modules = len(package_files()) - 1
    print(
        f"wheel: the package's {modules} modules and py.typed, and its .dist-info; entry "
        "points " + ", ".join(f"[{g}] {e} = {t}" for g, (e, t) in ENTRY_POINTS.items())
    )
    print(f"sdist: {', '.join(SDIST_DOCUMENTS)} and the package; no tests, examples or docs")
    print("check_dist: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--outdir", type=Path, help="keep the checked sdist and wheel here (default: deleted)"
    )
    args = parser.parse_args(argv)
    if args.outdir is not None:
        args.outdir.mkdir(parents=True, exist_ok=True)
        stale = [*args.outdir.glob("*.tar.gz"), *args.outdir.glob("*.whl")]
        if stale:
            parser.error(f"{args.outdir} already holds {', '.join(p.name for p in stale)}")
        return check(args.outdir.resolve())
    with tempfile.TemporaryDirectory(prefix="check-dist-") as folder:
        return check(Path(folder))


if __name__ == "__main__":
    raise SystemExit(main())
