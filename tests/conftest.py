"""Skips are allowed only for the reasons in tests/allowed_skips.txt (CI: AUTOQUANT_STRICT_SKIPS=1).

A test that skips for any other reason fails the session, so a probe that silently stops working
(as the PostgreSQL one did, importing a driver the project does not install) cannot hide a test.
"""

import os
import re
from pathlib import Path

import pytest

ALLOWED = [re.compile(line) for line in (Path(__file__).parent / "allowed_skips.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
_unexpected: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # An expected failure (xfail) is reported as skipped but is no skip: strict xfails still run and check.
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("AUTOQUANT_STRICT_SKIPS") == "1":
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(pattern.search(reason) for pattern in ALLOWED):
            _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected:
        print("\nSkips not in tests/allowed_skips.txt (fix the cause, or allow the reason there):")
        for line in _unexpected:
            print(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
