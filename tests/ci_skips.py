"""In CI a skipped test fails the run; locally a skip stays a skip with its reason.

``.ci/run`` sets ``CI=true`` and declares what the suite needs (the sandbox's isolation layers,
Redis, Ray, Phoenix, the embedded model); every test that would otherwise skip for a missing one
then fails the run instead, listed by name and reason. ``tests/conftest.py`` registers the plugin;
``-p tests.ci_skips`` loads it on its own (tests/test_ci_skips.py does, on a throwaway suite).
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


class SkipsFailInCI:
    """In CI a skipped test fails the run: a missing sandbox layer or service must not pass unseen.

    Locally (no ``CI``) a skip stays a skip with its reason (``-ra`` prints them). Skips at collection
    (``allow_module_level``, ``importorskip``) count too; deselection (``-k``, ``-m``) does not.
    """

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    @staticmethod
    def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            return str(longrepr[2]).removeprefix("Skipped: ")
        return str(longrepr)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.skipped.append((report.nodeid, self._reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append((report.nodeid, self._reason(report)))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.skipped and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.skipped:
            return
        terminalreporter.section("skipped in CI (CI=true): the run fails", sep="=", red=True, bold=True)
        for nodeid, reason in self.skipped:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
        terminalreporter.line(
            f"{len(self.skipped)} skipped; install what they name (scripts/setup/test-*.sh) or unset CI", red=True
        )


def register_skips_fail(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(SkipsFailInCI(), PLUGIN_NAME)


PLUGIN_NAME = "rlmflow-skips-fail-in-ci"


def pytest_configure(config: pytest.Config) -> None:
    """The hook of ``-p tests.ci_skips`` (conftest calls :func:`register_skips_fail` itself)."""
    if IN_CI:
        register_skips_fail(config)
