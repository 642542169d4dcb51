"""The pytest entry point: options, markers, fixtures, and hooks that hand to the session.

Loaded into every pytest run of an environment, so it imports neither torch nor deepdiff:
those come with the first statedict feature a test uses.
"""

from __future__ import annotations

import shlex
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from .runtime import SESSIONS, active_session
from .session import REPORT_KEY, StateDictSession
from .unused import renamed_modules

if TYPE_CHECKING:
    from .roundtrip_fixture import RoundTripFixture

SESSION_KEY = pytest.StashKey[StateDictSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("statedict", "state_dict snapshots and round-trips")
    group.addoption(
        "--statedict-update",
        action="store_true",
        default=False,
        help="write missing statedict snapshots, rewrite changed ones, delete unused ones",
    )
    group.addoption(
        "--statedict-warn-unused",
        action="store_true",
        default=False,
        help="list unused statedict snapshots without failing the session",
    )
    group.addoption(
        "--statedict-devices",
        default=None,
        metavar="DEVICES",
        help="comma-separated devices for the statedict_roundtrip marker, e.g. cpu,cuda "
        "(default: cpu plus the accelerator)",
    )
    group.addoption(
        "--statedict-report",
        action="append",
        default=[],
        metavar="PATH",
        help="write every statedict check of the run, with its outcome and diff, to PATH: "
        ".json (docs/report-schema.md) or .md (for a pull request or $GITHUB_STEP_SUMMARY); "
        "may be given twice",
    )
    parser.addini(
        "statedict_releases_dir",
        "folder (relative to the rootdir) of the release snapshots that statedict_releases() "
        "tests and `statedict record --release` writes (default tests/__statedict__/releases)",
        default="",
    )
    parser.addini(
        "statedict_releases_expected_to_fail",
        "releases expected to fail the release gate, one 'NAME: reason' per line",
        type="linelist",
        default=[],
    )
    parser.addini(
        "statedict_ignore_hyperparams",
        "optimizer hyperparameters (e.g. lr initial_lr, set by a schedule) that snapshots "
        "and assert_state_dict_matches leave out, in every test",
        type="args",
        default=[],
    )
    parser.addini(
        "statedict_snapshot_dir",
        "folder (relative to the rootdir) for statedict snapshots instead of __statedict__/ "
        "beside each test file",
        default="",
    )


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "statedict_roundtrip(devices=None, formats=('torch',)): rerun the test once per "
        "(save device, load device, format), giving the statedict_roundtrip fixture that pair",
    )
    config.addinivalue_line(
        "markers",
        "statedict_releases(gate): set by statedict_releases(): one test per release snapshot",
    )
    for path in config.getoption("statedict_report"):
        if not path.endswith((".json", ".md")):
            raise pytest.UsageError(
                f"--statedict-report={path}: the report is written as JSON or Markdown by its "
                "suffix, .json or .md"
            )
    session = StateDictSession(config)
    config.stash[SESSION_KEY] = session
    SESSIONS.append(session)
    if config.pluginmanager.hasplugin("xdist"):
        from .xdist import XdistSupport

        config.pluginmanager.register(XdistSupport(session), "statedict-xdist")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session in SESSIONS:
        SESSIONS.remove(session)


def _session(config: pytest.Config) -> StateDictSession:
    return config.stash[SESSION_KEY]


def pytest_sessionstart(session: pytest.Session) -> None:
    _session(session.config).start()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, object, object]:
    # outermost: the items before any plugin or conftest filtered them (one list copy, not
    # a hook call per item: this runs in every pytest run)
    _session(config).items_collected(list(items))
    return (yield)


def pytest_collection_finish(session: pytest.Session) -> None:
    # after every pytest_collection_modifyitems: what it removed, by whatever means, is gone
    _session(session.config).collection_finished(session.items)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Called for every test function of every run: the keyword lookup (marks of the
    # function, its class and module) is much cheaper than walking the markers.
    keywords = metafunc.definition.keywords
    if "statedict_releases" in keywords:
        releases = metafunc.definition.get_closest_marker("statedict_releases")
        if releases is not None:
            from .releases import parametrize_releases

            parametrize_releases(metafunc, releases)
    if "statedict_roundtrip" not in keywords:
        return
    marker = metafunc.definition.get_closest_marker("statedict_roundtrip")
    if marker is not None:
        from .roundtrip_fixture import parametrize_roundtrip

        parametrize_roundtrip(metafunc, marker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    session = _session(item.config)
    session.start_test(item)
    try:
        return (yield)
    finally:
        session.finish_test(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # each attempt (pytest-rerunfailures reruns within one protocol) starts afresh
    _session(item.config).start_attempt(item)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: Any, request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    session = _session(request.config)
    session.fixture_starts(fixturedef, request)
    ok = False
    try:
        result = yield
        ok = True
        return result
    finally:
        session.fixture_finished(ok)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, Any, Any]:
    """Each phase's report carries what the phase did with snapshots (xdist sends it on)."""
    report = yield
    record = _session(item.config).take_phase_record()
    if record is not None:
        setattr(report, REPORT_KEY, record)
        if report.failed and record["results"]:
            # JUnit XML reads a test's properties from its teardown report, which copies
            # the item's; a failure in teardown itself goes on its report too
            from .run_report import junit_properties

            properties = junit_properties(record["results"])
            item.user_properties.extend(properties)
            if report.when == "teardown":
                report.user_properties.extend(properties)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    session = active_session()
    if session is not None:
        session.report(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = _session(session.config)
    if state.finish(session, exitstatus) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if state.report_paths and not hasattr(session.config, "workerinput"):
        from .run_report import write_reports

        # a report CI asked for and could not get fails the run
        if not write_reports(state, int(session.exitstatus)) and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = _session(config)
    if state.deleted:
        terminalreporter.section("statedict: deleted unused snapshots")
        for path in state.deleted:
            terminalreporter.line(f"  {state.relative(path)}")
    if state.unused:
        _show_unused(terminalreporter, state)
    expected = [r for r in state.results if r["outcome"] in ("xfailed", "xpassed")]
    if expected:
        _show_expected_to_fail(terminalreporter, expected)
    if state.problems:
        terminalreporter.section("statedict: errors")
        for problem in state.problems:
            terminalreporter.line(f"  {problem}")
    for path in state.reports_written:
        terminalreporter.write_line(f"statedict report written: {state.relative(path)}")
    _write_summary_line(terminalreporter, state)


def _show_unused(terminalreporter: Any, state: StateDictSession) -> None:
    """The unused snapshots, what to do with them, and the renamed modules they may be."""
    terminalreporter.section("statedict: unused snapshots")
    for path in state.unused:
        terminalreporter.line(f"  {state.relative(path)}")
    if state.update:
        terminalreporter.line("No test that ran asked for these files; they could not be deleted.")
    else:
        terminalreporter.line(
            "No test that ran asked for these files. Delete them with `pytest "
            "--statedict-update`"
            + ("" if state.warn_unused else ", or pass --statedict-warn-unused.")
        )
    for old, new in renamed_modules(state):
        terminalreporter.line(
            f"The snapshots of {state.relative(old)} match tests that have none yet: if "
            "the test module was renamed, keep them by moving the folder:\n"
            f"  git mv {shlex.quote(state.relative(old))} {shlex.quote(state.relative(new))}"
        )


def _show_expected_to_fail(terminalreporter: Any, expected: list[dict[str, Any]]) -> None:
    """The releases and gates marked expected_to_fail: those that fail, and those that load
    again."""
    kinds = " and ".join(sorted({f"{r['kind']}s" for r in expected}))
    terminalreporter.section(f"statedict: {kinds} expected to fail")
    for r in expected:
        if r["outcome"] == "xfailed":
            terminalreporter.line(f"  {r['name']}: {r['reason']} (fails, as expected)")
        else:
            terminalreporter.line(
                f"  {r['name']}: loads again, though expected to fail ({r['reason']}): "
                "remove it from expected_to_fail"
            )


def _write_summary_line(terminalreporter: Any, state: StateDictSession) -> None:
    """The one-line summary: red if anything failed, yellow if only warned, else green."""
    line = state.summary_line()
    if line:
        failed = state.any_failed or state.fails_session
        warned = not failed and bool(state.unused or state.incomplete or state.linked_roots)
        terminalreporter.write_line(line, red=failed, yellow=warned, green=not (failed or warned))


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: Any, right: Any) -> Any:
    """``assert schema_a == schema_b`` shows the schema diff, not two long reprs."""
    if op != "==" or not (_is_schema(left) and _is_schema(right)):
        return None
    from .compare import diff_schemas
    from .report import render_diff

    diff = diff_schemas(left, right)
    if not diff:
        return [
            "schemas differ only in what one side cannot know (the kinds, requires_grad, "
            "non-persistent buffers or module versions of a bare state_dict or file): use "
            "assert_state_dict_matches"
        ]
    text = render_diff(
        diff,
        title="schemas differ (left: expected, right: actual)",
        verbose=_session(config).verbose,
    )
    return text.splitlines()


def _is_schema(obj: object) -> bool:
    # Checked by name so that asserting on arbitrary objects never imports our modules.
    return type(obj).__name__ == "Schema" and type(obj).__module__ == "pytest_statedict.schema"


@pytest.fixture
def statedict_snapshot(request: pytest.FixtureRequest) -> Any:
    """Check objects against this test's snapshots: ``statedict_snapshot.assert_match(model)``."""
    from .assertions import SnapshotFixture

    return SnapshotFixture()


@pytest.fixture
def statedict_roundtrip(request: pytest.FixtureRequest) -> RoundTripFixture:
    """Run the save/load round-trip for this test's device pair (cpu -> cpu by default)."""
    from .roundtrip_fixture import RoundTripFixture

    return RoundTripFixture.for_request(request, _session(request.config))
