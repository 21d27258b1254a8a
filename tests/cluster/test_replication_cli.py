"""Issue 8, "replication is a user feature": `lmps train --replication 2` on the real CLI and
a real local cluster ends with every shard on two servers (`lmps shards` shows the backup),
and a cluster with too few servers for it is refused in one line that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.cluster

SCRIPT = Path(sys.executable).parent / "lmps"
LMPS = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lmps.client.cli"]
SENTENCE = (
    "the parameter server holds shards of every tensor and applies the optimizer while "
    "workers lease data pull parameters compute gradients and push them back"
)
TEXT = " ".join(f"{w}{i % 7}" if i % 5 == 0 else w for i, w in enumerate(SENTENCE.split() * 80))
SMALL = ["--batch-size", "2", "--block-size", "16", "--vocab-size", "300", "--epochs", "1"]
SMALL += ["--cache-dir", "cache", "--log-every", "20"]


def lmps(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LMPS, *argv],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},  # wide: `lmps shards` rows on one line each
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_with_replication_two_puts_every_shard_on_two_servers(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    spec = ClusterSpec(servers=2, workers=1, worker_threads=1, run_dir=str(tmp_path / "c"))
    with LocalCluster(spec) as cluster:
        trained = lmps(
            "train",
            "--coordinator",
            cluster.coordinator,
            "--data",
            "corpus.txt",
            *SMALL,
            "--replication",
            "2",
            "--out",
            "run",
            cwd=tmp_path,
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        with open_channel(cluster.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            job = stub.GetJob(coordinator_pb2.GetJobRequest(), timeout=10)
            shard_map = stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        assert job.spec.replication == 2 and job.epochs_done == 1
        assert len(shard_map.shards) == job.shards > 1
        servers = {"ps-0", "ps-1"}
        for s in shard_map.shards:
            assert {s.server_id, s.backup_server_id} == servers, s  # owner and backup
        shown = lmps("shards", "--coordinator", cluster.coordinator, "--no-stats", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.replace("┃", "│").splitlines()  # rich's header rule is heavy
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
        assert ["shard", "server", "backup"] in [row[:3] for row in cells], shown.stdout
        shown_as = {row[0]: row[1:3] for row in cells}
        for s in shard_map.shards:
            assert shown_as[s.shard_id] == [s.server_id, s.backup_server_id], shown.stdout


def test_too_few_servers_for_replication_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    spec = ClusterSpec(servers=1, workers=0, run_dir=str(tmp_path / "c"))
    with LocalCluster(spec) as cluster:
        argv = ["train", "--coordinator", cluster.coordinator, "--data", "corpus.txt", *SMALL]
        refused = lmps(*argv, "--replication", "2", "--wait-members", "1", cwd=tmp_path)
        client = lmps(*argv, "--replication", "2", "--servers", "1", cwd=tmp_path)
    for result, needles in (
        (refused, ["UNAVAILABLE", "replication 2 needs 2 parameter servers, 1 registered"]),
        (client, ["--replication 2", "--servers 1 is too few"]),
    ):
        text = result.stdout + result.stderr
        assert "Traceback" not in text, text
        assert result.returncode == 2, text
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert "--replication 1" in refused.stderr  # what to do instead
