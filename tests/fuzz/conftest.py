"""Print how many fuzz cases ran, per RPC and status code, at the end of the session."""

from __future__ import annotations

import pytest

from tests.fuzz import harness


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if harness.STATS:
        terminalreporter.section("lmps fuzz cases")
        harness.report(terminalreporter.write_line)
