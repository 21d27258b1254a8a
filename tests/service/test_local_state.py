"""Issue 8, on the real `lmps` CLI and real processes: `lmps clean` also removes the state of
`lmps serve coordinator` (.lmps/coordinator), never while a coordinator uses it, and says what
it removed; Ctrl-C while `lmps train` waits for a coordinator is one line, exit 130, with the
command that resumes the job; `lmps generate` without a coordinator says so at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmps.client.launcher import free_port, wait_healthy

pytestmark = pytest.mark.cluster  # real processes, one per command

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def run(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LMPS, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.returncode == code, (result.args, result.returncode, text)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_clean_removes_the_coordinator_state_once_no_coordinator_uses_it(tmp_path: Path) -> None:
    state = tmp_path / ".lmps" / "coordinator"  # `lmps serve coordinator`'s default
    (state / "jobs" / "job-0123abcd").mkdir(parents=True)
    (state / "jobs" / "job-0123abcd" / "job.json").write_text("{}")  # no checkpoint: skipped
    port = free_port()
    serve = ["serve", "coordinator", "--port", str(port), "--metrics-port", "-1"]
    coordinator = subprocess.Popen(
        [*LMPS, *serve], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_healthy(f"127.0.0.1:{port}", timeout_s=60)  # serving: its state dir is taken
        line = one_line(run("clean", cwd=tmp_path), code=1)
        assert f"a coordinator is running with its state in {Path('.lmps/coordinator')}" in line
        assert (state / "jobs" / "job-0123abcd").is_dir()
    finally:
        coordinator.send_signal(signal.SIGTERM)
        coordinator.communicate(timeout=30)
    cleaned = run("clean", cwd=tmp_path)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert cleaned.stdout.strip() == "removed .lmps/coordinator (1 job)", cleaned.stdout
    assert not state.exists()
    assert run("clean", cwd=tmp_path).stdout.strip() == "nothing to clean"


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "new-job"])
def test_ctrl_c_while_waiting_for_the_coordinator_is_one_line(tmp_path: Path, resume: bool) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens: --wait waits
    argv = ["train", "--coordinator", address, "--wait", "30", "--epochs", "2"]
    argv += ["--resume", "job-0123abcd"] if resume else []
    proc = subprocess.Popen(
        [*LMPS, *argv],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.strip() == f"waiting up to 30s for the coordinator at {address}", first
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, first + rest
    assert "Traceback" not in rest, rest
    lines = rest.strip().splitlines()
    assert len(lines) == 1, rest
    if resume:
        assert lines[0] == (
            f"interrupted while waiting for the coordinator at {address}; resume with: "
            f"lmps train --resume job-0123abcd --epochs 2 --coordinator {address}"
        )
    else:
        assert lines[0] == (
            f"interrupted while waiting for the coordinator at {address}; no job was submitted"
        )


def test_generate_without_a_coordinator_says_so_at_once(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    # Before: ExportModel waited for a coordinator until its 600 s deadline, saying nothing.
    line = one_line(run("generate", "--coordinator", address, "--job", "job-x", cwd=tmp_path), 2)
    assert line == f"lmps: error: no coordinator at {address}; start one with `lmps cluster up`"


def test_keep_jobs_must_not_be_negative(tmp_path: Path) -> None:
    done = run("serve", "coordinator", "--keep-jobs", "-1", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--keep-jobs: -1 is negative; 0 keeps every job" in done.stderr, done.stderr
