"""The README and docs/ say what the code and the packaging say.

Options, ini names, version floors, interpreters and the release snapshots' folder are
written in several places; a change to one that the others miss leaves a user with a
command that fails or a promise that is untrue. Everything here is read as text (ast,
tomllib, configparser): nothing of the package is imported, so no torch either.
"""

from __future__ import annotations

import ast
import configparser
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGE = CHECKOUT / "pytest_statedict"
DOCS = CHECKOUT / "docs"
README = CHECKOUT / "README.md"
# what users read: the README, every docs page, the contributor and change notes
PAGES = [README, CHECKOUT / "CONTRIBUTING.md", CHECKOUT / "CHANGELOG.md", *DOCS.glob("*.md")]

# The README's first lines: .ci/run runs the second command, and a newcomer copies both.
README_COMMANDS = (
    "```bash\n"
    "python -m pip install -q tox && python -m tox -e demo"
    "   # the demo: snapshots written, a refactor caught, accepted\n"
    "python -m pip install -q tox && python -m tox -p 2"
    "      # the whole test suite (and lint)\n"
    "```"
)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def docs_text() -> str:
    return "\n".join(text(page) for page in PAGES if page.exists())


def module(name: str) -> ast.Module:
    return ast.parse(text(PACKAGE / f"{name}.py"))


def string_calls(tree: ast.AST, method: str) -> Iterator[str]:
    """The first argument of every ``x.<method>("...")`` call in ``tree``."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == method
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def command_line_options() -> set[str]:
    return {name for name in string_calls(module("plugin"), "addoption")}


def ini_options() -> set[str]:
    return set(string_calls(module("plugin"), "addini"))


def pyproject() -> dict:  # type: ignore[type-arg]
    with (CHECKOUT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def tox() -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    config.read(CHECKOUT / "tox.ini", encoding="utf-8")
    return config


def public_names() -> list[str]:
    for node in module("__init__").body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError("pytest_statedict/__init__.py has no __all__")


def other_statedict_names() -> set[str]:
    """``statedict_*`` names that are not ini options: fixtures, markers, public names and
    the JUnit property."""
    plugin = module("plugin")
    fixtures = {
        node.name
        for node in ast.walk(plugin)
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).startswith("pytest.fixture") for d in node.decorator_list)
    }
    markers = {
        line.split("(")[0].split(":")[0]
        for line in string_values(plugin)
        if re.match(r"statedict_\w+\(", line)
    }
    junit = {
        node.value.value
        for node in module("run_report").body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and ast.unparse(node.targets[0]) == "JUNIT_PROPERTY"
    }
    return fixtures | markers | set(public_names()) | junit


def string_values(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def test_the_readme_starts_with_its_two_commands_and_stays_short() -> None:
    readme = text(README)
    first_block = re.search(r"```.*?```", readme, re.S)
    assert first_block and first_block.group(0) == README_COMMANDS
    assert "python -m pip install -q tox && python -m tox -p 2" in text(CHECKOUT / ".ci" / "run")
    lines = readme.count("\n")
    assert lines <= 260, f"README.md has {lines} lines: move the rest to docs/"


def test_every_option_is_documented_and_every_documented_option_exists() -> None:
    options = command_line_options()
    ini = ini_options()
    assert options and ini, "plugin.py's addoption/addini calls were not found"
    reference = text(DOCS / "options.md")
    for name in sorted(options | ini):
        assert f"`{name}" in reference, f"{name} is missing from docs/options.md"
    mentioned = set(re.findall(r"--statedict-[a-z]+(?:-[a-z]+)*", docs_text()))
    assert mentioned <= options, f"documented options that do not exist: {mentioned - options}"
    names = set(re.findall(r"(?<![\w.\-])statedict_[a-z_]+[a-z]", docs_text()))
    unknown = names - ini - other_statedict_names()
    assert not unknown, f"documented ini names that do not exist: {unknown}"


def test_the_torch_floor_is_pyprojects() -> None:
    requirement = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    floor = re.fullmatch(r"torch>=([\d.]+)", requirement)
    assert floor, requirement
    said = re.findall(r"torch (\d+\.\d+) or newer|torch>=(\d+\.\d+)", docs_text())
    floors = {a or b for a, b in said}
    assert floors == {floor.group(1)}, f"the docs name torch floors {floors}, pyproject {floor}"
    assert f"torch {floor.group(1)} or newer" in text(README)


def test_the_python_versions_are_pyprojects_and_toxs() -> None:
    requires = re.fullmatch(r">=(3\.\d+)", pyproject()["project"]["requires-python"])
    assert requires
    said = set(re.findall(r"Python (3\.\d+) or newer|Python (3\.\d+)\+", docs_text()))
    assert {a or b for a, b in said} == {requires.group(1)}
    config = tox()
    interpreters = {
        config[section]["base_python"].split()[0]
        for section in config.sections()
        if "base_python" in config[section]
    }
    assert interpreters, "tox.ini names no base_python"
    for page in (README, CHECKOUT / "CONTRIBUTING.md"):
        named = set(re.findall(r"`(python3\.\d+)`", text(page)))
        assert named == interpreters, f"{page.name} names {named}, tox.ini needs {interpreters}"
    # the compatibility table's Python column: one row per env that CI runs
    table = re.findall(r"^\| `(\w+)` \| (3\.\d+) \|", text(DOCS / "compatibility.md"), re.M)
    for env, version in table:
        base = config[f"testenv:{env}"].get("base_python", "").split()
        assert not base or base[0] == f"python{version}", (env, version, base)
    classified = {
        c.rsplit(" :: ", 1)[1]
        for c in pyproject()["project"].get("classifiers", [])
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    if classified:
        assert classified == {version for _, version in table}, classified


def test_the_release_folder_is_the_codes_default() -> None:
    default = next(
        node.value.value
        for node in module("releases").body
        if isinstance(node, ast.Assign)
        and ast.unparse(node.targets[0]) == "DEFAULT_DIR"
        and isinstance(node.value, ast.Constant)
    )
    everything = docs_text()
    assert f"`{default}" in everything
    folders = set(re.findall(r"tests/[\w/]*releases(?=[/`\s)]|$)", everything))
    assert folders == {default}, folders
    # a test module in tests/ reaching the folder from its own file
    parent = default.removeprefix("tests/").split("/")
    for expression in re.findall(r"Path\(__file__\)\.parent((?: / \"[^\"]+\")+)", everything):
        parts = re.findall(r"\"([^\"]+)\"", expression)
        if parts[-1] == "releases":
            assert parts == parent, expression
    # the option's and the command's help say the same default
    assert default in text(PACKAGE / "plugin.py")
    assert default in text(PACKAGE / "cli.py")


def test_every_public_name_is_in_the_api_reference() -> None:
    reference = text(DOCS / "api.md")
    missing = [n for n in public_names() if f"::: pytest_statedict.{n}\n" not in reference]
    assert not missing, f"not in docs/api.md: {missing}"


def test_every_page_is_in_the_site_and_every_link_leads_somewhere() -> None:
    """mkdocs --strict checks the site in the lint env; this checks the same pages here, and
    the README's links, which mkdocs does not read."""
    nav = set(re.findall(r":\s*([\w-]+\.md)\s*$", text(CHECKOUT / "mkdocs.yml"), re.M))
    assert nav == {page.name for page in DOCS.glob("*.md")}
    for page in (README, CHECKOUT / "CONTRIBUTING.md", CHECKOUT / "CHANGELOG.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text(page)):
            assert (page.parent / target).exists(), f"{page.name} links to {target}: not found"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_no_machine_paths(page: Path) -> None:
    """A path of one machine (a home folder, a pyenv) is no instruction for a reader."""
    if page.exists():
        assert not re.search(r"/root/|/home/\w|\.pyenv|/work/", text(page))
