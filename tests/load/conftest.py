"""Print the load test's figures at the end of the session."""

from __future__ import annotations

import pytest

from tests.load import test_load


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if test_load.REPORT:
        terminalreporter.section("lmps load test")
        for line in test_load.REPORT:
            terminalreporter.write_line(line)
