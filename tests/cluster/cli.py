"""Helpers for cluster tests that run the real `lmps` CLI in a subprocess: run it, and check
that it succeeded or failed with one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]


def lmps(
    *argv: str, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`lmps *argv` in `cwd`, the environment's plus `env`, 200 columns wide."""
    return subprocess.run(
        [*LMPS, *argv],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that succeeded without a traceback."""
    text = done.stdout + done.stderr
    assert done.returncode == 0, (done.args, text)
    assert "Traceback" not in text, text
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one stderr line of a command refused with exit status 2; it holds every needle."""
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text
    assert done.returncode == 2, (done.args, done.returncode, text)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (done.args, done.stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
