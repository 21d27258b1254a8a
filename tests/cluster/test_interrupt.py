"""Issue 8, "Ctrl-C, then --resume": on the real `lmps` CLI and a real local cluster, SIGINT
mid-epoch stops the job at a step boundary with one line saying where and how to go on, and
`lmps train --resume JOB` continues mid-epoch from exactly there: the last step is the
schedule's last and the parameters equal an uninterrupted run's (SGD with momentum, AdamW
with a cosine schedule). The pushes made at the stop step are discarded, and counted as
redone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmps.client.launcher import ClusterSpec, LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]
WORKERS = 2
SENTENCE = (
    "the parameter server holds shards of every tensor and applies the optimizer while "
    "workers lease data pull parameters compute gradients and push them back"
)
TEXT = " ".join(f"{w}{i % 7}" if i % 5 == 0 else w for i, w in enumerate(SENTENCE.split() * 80))
SMALL = ["--batch-size", "2", "--block-size", "16", "--vocab-size", "300", "--epochs", "2"]
SMALL += ["--batches-per-lease", "3", "--log-every", "1", "--cache-dir", "cache"]
OPTIMIZERS = {
    "sgd": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--schedule", "constant"],
    "adamw": [
        "--optimizer",
        "adamw",
        "--lr",
        "3e-3",
        "--schedule",
        "cosine",
        "--warmup-steps",
        "3",
    ],
}
STEP = re.compile(r"step (\d+)/(\d+) ")
STOPPED = re.compile(r"interrupted at step (\d+) of (\d+); resume with: lmps train --resume (\S+)")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("logs")
    spec = ClusterSpec(
        servers=2, workers=WORKERS, worker_threads=1, run_dir=str(logs), state_dir=str(logs / "st")
    )
    with LocalCluster(spec) as c:
        yield c


def lmps(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*LMPS, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def interrupted(
    argv: list[str], cwd: Path, after_step: int, signum: int
) -> tuple[int, int, str, str]:
    """`lmps ARGV`, `signum` once it printed step `after_step`: (step, total, job, output)."""
    proc = subprocess.Popen(
        [*LMPS, *argv],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        m = STEP.match(line)
        if m and int(m.group(1)) >= after_step:
            proc.send_signal(signum)
            break
    rest, _ = proc.communicate(timeout=180)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    m = STOPPED.search(output)
    assert m, output
    return int(m.group(1)), int(m.group(2)), m.group(3), output


@pytest.mark.parametrize(
    ("optimizer", "signum", "epoch"),
    [("sgd", signal.SIGINT, 0), ("adamw", signal.SIGTERM, 1)],
    ids=["sgd-sigint-epoch1", "adamw-sigterm-epoch2"],
)
def test_ctrl_c_then_resume_gives_the_uninterrupted_model(
    tmp_path: Path, cluster: LocalCluster, optimizer: str, signum: int, epoch: int
) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    argv = ["train", "--coordinator", cluster.coordinator, "--data", "corpus.txt", *SMALL]
    argv += OPTIMIZERS[optimizer]
    lmps(*argv, "--out", "whole", cwd=tmp_path)
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    total = whole["epochs"][-1]["end_step"]
    per_epoch = whole["epochs"][0]["steps"]
    assert per_epoch > 8

    after = epoch * per_epoch + 4
    step, planned, job_id, _ = interrupted([*argv, "--out", "cut"], tmp_path, after, signum)
    assert planned == total
    assert after <= step < (epoch + 1) * per_epoch, f"stopped at {step}: not mid-epoch"
    lmps(*argv, "--resume", job_id, "--out", "cut", cwd=tmp_path)
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["resumed_at_step"] == step
    assert report["epochs"][-1]["end_step"] == total  # never past the schedule
    assert sum(e["steps"] for e in report["epochs"]) == total - step
    # Each worker pushed its batch of the stop step; none is in the model: all redone.
    assert sum(e["batches_redone"] for e in report["epochs"]) == WORKERS
    assert report["epochs"][0]["batches_redone"] == WORKERS

    expected = load_file(str(tmp_path / "whole" / "model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert got.keys() == expected.keys()
    worst = 0.0
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]
        worst = max(worst, float((got[name] - value).abs().max()))
    print(
        f"\n{signal.Signals(signum).name} at step {step} of {total}, resumed ({optimizer}): "
        f"max abs diff {worst:.3e}"
    )
