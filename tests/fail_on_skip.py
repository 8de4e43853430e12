"""pytest plugin: with CIRFLOW_FAIL_ON_SKIP=1 (set by .ci/run) a run that skipped any test fails, naming them.

On a public clone the tests that need ../shared/fixtures skip (tests/shared_fixtures.py); CI has the fixtures,
so there a skip means a test did not run and must not count as passing."""
from __future__ import annotations

import os

ENV = "CIRFLOW_FAIL_ON_SKIP"


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(ENV) != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        if reporter is not None:
            reporter.write_line(f"{ENV}=1: {len(skipped)} skipped test(s) fail this run:", red=True)
            for report in skipped:
                reporter.write_line(f"  {report.nodeid}: {report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr}")
        session.exitstatus = 1
