"""A real Prometheus server scrapes every lmps process and sees training happen."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmps.client.launcher import ClusterSpec, LocalCluster, free_port
from lmps.v1 import job_pb2
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens

pytestmark = pytest.mark.cluster

PROMETHEUS = shutil.which("prometheus")


def query(port: int, promql: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[LocalCluster, int]]:
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary: `apt-get install prometheus` (.ci/run does)")
    spec = ClusterSpec(servers=2, workers=1, worker_threads=1, run_dir=str(tmp_path / "logs"))
    with LocalCluster(spec) as cluster:
        targets = [f"127.0.0.1:{p.metrics_port}" for p in cluster.procs]
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: lmps\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            yield cluster, port
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


def wait_for(
    port: int, promql: str, ok: object, timeout_s: float = 60.0
) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = query(port, promql)
            if ok(result):  # type: ignore[operator]
                return result
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"prometheus never satisfied {promql!r}")
        time.sleep(0.5)


def test_prometheus_scrapes_every_service_and_sees_training(
    prometheus: tuple[LocalCluster, int],
) -> None:
    cluster, port = prometheus
    n = len(cluster.procs)
    wait_for(port, "up", lambda r: len(r) == n and all(x["value"][1] == "1" for x in r))
    optimizer = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, schedule=job_pb2.CONSTANT)
    spec = make_spec(SMALL, optimizer, batch_size=4, workers=1, servers=2)
    driver = Driver(cluster.coordinator)
    try:
        job_id = driver.submit(spec, random_tokens(6 * 4 * 16 + 1, 64, 0), random_tokens(33, 64, 1))
        driver.run_epoch(job_id, 0)
    finally:
        driver.close()
    # 6 batches, one worker: 6 optimizer steps on each of the 2 servers.
    updates = wait_for(
        port,
        "lmps_ps_updates_total",
        lambda r: len(r) == 2 and all(x["value"][1] == "6" for x in r),
    )
    assert len(updates) == 2
    wait_for(port, "lmps_worker_steps_total", lambda r: len(r) == 1 and r[0]["value"][1] == "6")
    # The coordinator's training series; each role's series from its own processes only.
    wait_for(port, "lmps_coordinator_step", lambda r: len(r) == 1 and r[0]["value"][1] == "6")
    assert len(query(port, "lmps_coordinator_members_alive")) == 2  # by role: ps, worker
    assert len(query(port, "lmps_ps_version")) == 2
    assert len(query(port, "lmps_worker_loss")) == 1
    rpcs = wait_for(
        port,
        'sum by (method) (lmps_rpc_total{method="/lmps.v1.ParameterService/Push", code="OK"})',
        lambda r: len(r) == 1 and r[0]["value"][1] == "12",
    )
    assert rpcs
