"""Issue 8, what a job's life looks like from the real `lmps` CLI on a real local cluster:
finished jobs show `completed` (also after a coordinator restart), failed ones `failed: <why>`;
`lmps generate --job` samples any job the coordinator keeps, not only the one the parameter
servers hold now; the coordinator keeps the newest `--keep-jobs` jobs and deletes the rest
from its state dir; Ctrl-C while `lmps train` waits for workers is one line and exit 130.

The tests share one cluster (one parameter server, one worker, `--keep-jobs 2`) and run in
file order: the first trains the jobs the next ones look at."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmps.client.launcher import ClusterSpec, LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]
SENTENCE = (
    "the parameter server holds shards of every tensor and applies the optimizer while "
    "workers lease data pull parameters compute gradients and push them back"
)
WORDS = SENTENCE.split()
SHORT = " ".join(f"{w}{i % 7}" if i % 5 == 0 else w for i, w in enumerate(WORDS * 25))
LONG = " ".join(f"{w}{i % 7}" if i % 5 == 0 else w for i, w in enumerate(WORDS * 120))
SMALL = ["--batch-size", "2", "--block-size", "16", "--vocab-size", "300", "--epochs", "1"]
SMALL += ["--batches-per-lease", "3", "--log-every", "1", "--cache-dir", "cache"]
KEEP_JOBS = 2
# Wide enough that no table cell wraps: rows are matched whole.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "1000"}
JOB = re.compile(r"^job (job-[0-9a-f]+): ", re.M)
STEP = re.compile(r"step (\d+)/(\d+) ")
RATE = re.compile(r"\d+ tokens in \S+s: \S+ tokens/s \((KV cache on|no KV cache).*\)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("lifecycle")
    spec = ClusterSpec(
        servers=1,
        workers=1,
        worker_threads=1,
        run_dir=str(logs),
        state_dir=str(logs / "state"),
        extra_env={"LMPS_KEEP_JOBS": str(KEEP_JOBS)},
    )
    with LocalCluster(spec) as c:
        yield c


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every `lmps` command runs in: corpora, the corpus cache, run folders."""
    path = tmp_path_factory.mktemp("work")
    (path / "short.txt").write_text(SHORT)
    (path / "long.txt").write_text(LONG)
    return path


def lmps(*argv: str, cwd: Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*LMPS, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done


def train(cluster: LocalCluster, work: Path, out: str, *extra: str) -> str:
    """`lmps train` of the short corpus to the end; returns the job id."""
    done = lmps(
        "train",
        "--coordinator",
        cluster.coordinator,
        "--data",
        "short.txt",
        *SMALL,
        "--out",
        out,
        *extra,
        cwd=work,
    )
    m = JOB.search(done.stdout)
    assert m, done.stdout
    return m.group(1)


def states(cluster: LocalCluster, work: Path) -> dict[str, str]:
    """Job id -> the state cell of its row in `lmps status`."""
    out = lmps("status", "--coordinator", cluster.coordinator, cwd=work).stdout
    rows = re.findall(r"^│ (job-[0-9a-f]+) +│ (.+?) +│ ", out, re.M)
    return dict(rows)


def greedy(work: Path, *source: str) -> str:
    """Greedy text from a saved model or a job on the cluster: equal text, equal weights."""
    args = ["--prompt", "the parameter", "--temperature", "0", "--max-tokens", "24"]
    done = lmps("generate", *source, *args, cwd=work)
    (line,) = done.stderr.splitlines()  # streamed text on stdout, the speed on stderr
    assert RATE.fullmatch(line), line
    return done.stdout


@pytest.fixture(scope="module")
def two_jobs(cluster: LocalCluster, work: Path) -> tuple[str, str]:
    """Two finished jobs with different weights (different seeds); the second is the one
    the parameter server holds."""
    first = train(cluster, work, "first", "--seed", "1")
    second = train(cluster, work, "second", "--seed", "2")
    return first, second


def test_completed_jobs_generate_by_id_also_after_a_coordinator_restart(
    cluster: LocalCluster, work: Path, two_jobs: tuple[str, str]
) -> None:
    first, second = two_jobs
    assert states(cluster, work) == {first: "completed", second: "completed"}
    coordinator = ["--coordinator", cluster.coordinator]
    saved_first, saved_second = greedy(work, "--model", "first"), greedy(work, "--model", "second")
    assert saved_first != saved_second, "the two jobs should differ to tell them apart"
    # The server holds the second job: the first comes back from its checkpoint.
    assert greedy(work, *coordinator, "--job", first) == saved_first
    assert greedy(work, *coordinator, "--job", second) == saved_second  # and back again
    assert greedy(work, *coordinator, "--job", second, "--no-cache") == saved_second
    assert greedy(work, *coordinator) == saved_second  # no --job: the latest

    cluster.kill("coordinator", signal.SIGKILL)
    cluster.restart("coordinator")
    # Recovered from the state dir: their checkpoints have every epoch done.
    assert states(cluster, work) == {first: "completed", second: "completed"}
    assert greedy(work, *coordinator, "--job", first) == saved_first


def test_the_newest_jobs_are_kept_and_a_completed_one_runs_more_epochs(
    cluster: LocalCluster, work: Path, two_jobs: tuple[str, str]
) -> None:
    first, second = two_jobs
    jobs_dir = Path(cluster.spec.state_dir) / "jobs"
    # A crashed coordinator's half-written checkpoint (another PID): pruned with the others.
    leftover = jobs_dir / second / ".tmp-step-00000099-999999999-1"
    leftover.mkdir()
    third = train(cluster, work, "third")
    assert states(cluster, work) == {second: "completed", third: "completed"}
    assert sorted(p.name for p in jobs_dir.iterdir()) == sorted([second, third])
    gone = lmps("generate", "--coordinator", cluster.coordinator, "--job", first, cwd=work, code=2)
    (line,) = gone.stderr.splitlines()
    assert f"unknown job {first!r}" in line and "--keep-jobs" in line, line

    # COMPLETED is not the end: asked for more epochs, it trains them and completes again.
    more = lmps(
        "train",
        "--coordinator",
        cluster.coordinator,
        "--resume",
        second,
        "--epochs",
        "2",
        "--out",
        "second",
        cwd=work,
    )
    assert "epoch 2/2" in more.stdout, more.stdout
    assert states(cluster, work)[second] == "completed"
    assert not leftover.exists()


def test_a_failed_job_shows_failed_with_its_error(cluster: LocalCluster, work: Path) -> None:
    """The parameter server dies mid-epoch and the checkpoint to roll back to is corrupt:
    running the epoch again would meet it again, so the job fails for good."""
    argv = ["train", "--coordinator", cluster.coordinator, "--data", "long.txt", *SMALL]
    proc = subprocess.Popen(
        [*LMPS, *argv, "--out", "doomed"],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen, job_id = [], ""
    for line in proc.stdout:
        seen.append(line)
        if m := JOB.match(line):
            job_id = m.group(1)
        if (m := STEP.match(line)) and int(m.group(1)) >= 2:
            weights = Path(cluster.spec.state_dir) / "jobs" / job_id / "step-00000000"
            with (weights / "model.safetensors").open("r+b") as f:
                f.seek(-8, os.SEEK_END)
                f.write(b"\xff" * 8)
            cluster.kill("ps-0", signal.SIGKILL)
            cluster.restart("ps-0")
            break
    rest, _ = proc.communicate(timeout=300)
    output = "".join(seen) + rest
    assert proc.returncode == 2, output
    assert "Traceback" not in output, output
    state = states(cluster, work)[job_id]
    assert state.startswith("failed: epoch 0: "), state
    assert "step-00000000" in state and "corrupt" in state, state
    again = lmps(
        "train",
        "--coordinator",
        cluster.coordinator,
        "--resume",
        job_id,
        "--epochs",
        "1",
        cwd=work,
        code=2,
    )
    (line,) = again.stderr.splitlines()
    assert f"job {job_id} failed: epoch 0: " in line, line


def test_ctrl_c_while_waiting_for_workers_is_one_line(cluster: LocalCluster, work: Path) -> None:
    """Two workers asked of a one-worker cluster: the submit waits for the second."""
    argv = ["train", "--coordinator", cluster.coordinator, "--data", "short.txt", *SMALL]
    proc = subprocess.Popen(
        [*LMPS, *argv, "--workers", "2", "--wait-members", "30"],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("corpus "):  # printed just before the job is submitted
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=60)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    assert rest.strip().splitlines()[-1] == (
        "interrupted while submitting the job; no job to resume (one the coordinator was "
        "still creating would show in `lmps status`)"
    ), output
