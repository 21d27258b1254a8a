"""Issue 8, "outputs people look at", on the real `lmps` CLI and a real local cluster: the
default run folder runs/<job> with the model, metrics.jsonl and loss.png, all files with the
umask's mode; the clean progress lines of piped output; `lmps report`; a streaming-fragments
run (`--local-steps H --fragments F`) and its fragments in `lmps shards`."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmps.client import model_io, run_log
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.optim import lr_at
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.cluster import cli

pytestmark = pytest.mark.cluster

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]
SENTENCE = (
    "the parameter server holds shards of every tensor and applies the optimizer while "
    "workers lease data pull parameters compute gradients and push them back"
)
TEXT = " ".join(f"{w}{i % 7}" if i % 5 == 0 else w for i, w in enumerate(SENTENCE.split() * 80))
SMALL = ["--batch-size", "2", "--block-size", "16", "--vocab-size", "300", "--epochs", "1"]
LINE = re.compile(
    r"step (\d+)/(\d+) epoch 1/1 loss \d+\.\d{4} lr \d\.\d\de-\d\d (-|[\d,]+) tok/s "
    r"elapsed \d+:\d\d:\d\d eta (-:--:--|\d+:\d\d:\d\d)"
)


def lmps(*argv: str, cwd: Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    """`lmps ARGV` with stdout and stderr piped (not a terminal), under `umask`."""
    return subprocess.run(
        [*LMPS, *argv],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "60"},  # narrow: progress lines must still not wrap
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(servers=1, workers=2, run_dir=str(tmp_path_factory.mktemp("logs")))
    with LocalCluster(spec) as c:
        yield c


def test_train_leaves_a_run_folder_and_piped_progress_lines(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    argv = ["train", "--coordinator", cluster.coordinator, "--data", "corpus.txt", *SMALL]
    done = lmps(*argv, "--cache-dir", "cache", "--log-every", "3", cwd=tmp_path, umask=0o027)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(line.strip() for line in lines), f"blank lines in piped output:\n{done.stdout}"
    progress = [m for m in map(LINE.fullmatch, lines) if m]
    assert progress, done.stdout
    total = int(progress[0].group(2))
    steps = [int(m.group(1)) for m in progress]
    last = steps[-1]  # every 3rd step, and the epoch's last one
    assert steps == [*range(3, last + 1, 3), *([last] if last % 3 else [])], steps

    (run,) = (tmp_path / "runs").iterdir()
    job_id = run.name
    assert job_id.startswith("job-")
    names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()}
    expected = {"model.safetensors", "config.json", "tokenizer.json", "report.json"}
    expected |= {"metrics.jsonl", "loss.png"}
    assert names == dict.fromkeys(expected, 0o640), names  # 0666 less the umask, all alike
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    model_io.load(run)

    with open_channel(cluster.coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        status = stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=10)
    settings = codec.optimizer_from_proto(status.spec.optimizer)
    assert settings.total_steps == total and status.step == last
    rows = run_log.read_metrics(run / "metrics.jsonl")
    job = [r for r in rows if r["kind"] == "job"]
    step_rows = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert job == [{**job[0], "job_id": job_id, "total_steps": total, "start_step": 0}]
    assert [r["step"] for r in step_rows] == list(range(1, status.step + 1))
    for r in step_rows:
        assert r["epoch"] == 1 and r["tokens"] > 0 and r["loss"] > 0 and r["grad_norm"] is None
        assert r["lr"] == pytest.approx(lr_at(settings, r["step"] - 1))
        assert min(r["pull_ms"], r["compute_ms"], r["push_ms"]) >= 0
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 0), (1, status.step)]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]

    shown = lmps("report", str(run.relative_to(tmp_path)), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"job {job_id}, finished" in out and "epochs       1 of 1" in out
    assert f"steps        {status.step} of {total}" in out
    assert f"eval loss    {evals[1]['eval_loss']:.4f}" in out
    assert f"plot         {Path('runs') / job_id / 'loss.png'}" in out


def test_train_with_streaming_fragments_writes_its_run_and_shards_show_the_fragment(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    """`lmps train --local-steps 4 --fragments 2` on the real CLI and both workers: it trains
    (finite losses, the run folder and its report), the job is Streaming DiLoCo with F = 2,
    and `lmps shards` shows each shard's fragment column as the coordinator's map has it."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    argv = ["train", "--coordinator", cluster.coordinator, "--data", "corpus.txt", *SMALL]
    argv += ["--cache-dir", "cache", "--local-steps", "4", "--fragments", "2", "--out", "run"]
    cli.ok(cli.lmps(*argv, cwd=tmp_path))
    run = tmp_path / "run"
    assert {"model.safetensors", "report.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "report.json").read_text())
    model_io.load(run)
    rows = run_log.read_metrics(run / "metrics.jsonl")
    (job_id,) = {r["job_id"] for r in rows if r["kind"] == "job"}
    step_rows = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert step_rows and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in step_rows)
    assert len(evals) == 2 and all(math.isfinite(r["eval_loss"]) for r in evals)

    with open_channel(cluster.coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        status = stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=10)
        shard_map = stub.GetShardMap(coordinator_pb2.GetShardMapRequest(job_id=job_id), timeout=10)
    local = status.spec.local_steps
    assert (local.steps, local.fragments) == (4, 2) and status.epochs_done == 1
    # A row per version with batches: the defaults' leases of F x H = 8 batches are four
    # windows, then a flush (a version no event reports, so no row), at the lr of v // F.
    assert [r["step"] for r in step_rows] == [v for v in range(1, status.step + 1) if v % 5]
    settings = codec.optimizer_from_proto(status.spec.optimizer)
    for r in step_rows:
        assert r["lr"] == pytest.approx(lr_at(settings, (r["step"] - 1) // 2))
    assert evals[1]["step"] == status.step and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert {s.fragment for s in shard_map.shards} == {0, 1}

    argv = ["shards", "--coordinator", cluster.coordinator, "--job", job_id, "--no-stats"]
    shown = cli.ok(cli.lmps(*argv, cwd=tmp_path))
    lines = shown.replace("┃", "│").splitlines()  # rich's header rule is heavy
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
    assert ["shard", "server", "fragment"] in [row[:3] for row in cells], shown
    shown_as = {row[0]: row[1:3] for row in cells}
    for s in shard_map.shards:
        assert shown_as[s.shard_id] == [s.server_id, str(s.fragment)], shown


def test_default_run_folder_that_cannot_be_made_is_refused_before_upload(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "runs").write_text("not a folder")
    argv = ["train", "--coordinator", cluster.coordinator, "--data", "corpus.txt", *SMALL]
    done = lmps(*argv, "--cache-dir", "cache", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("lmps: error: --out runs is an existing file"), done.stderr
    assert "submitting" not in done.stdout and "job-" not in done.stdout


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path: Path) -> None:
    done = lmps("report", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"lmps: error: {tmp_path / 'metrics.jsonl'} is missing: pass a run folder written by "
        "`lmps train` (runs/JOB or --out)"
    )
