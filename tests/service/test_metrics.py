"""Each `lmps serve ROLE` process exports its own role's series, and `promtool` accepts them.

Real processes started through the `lmps serve` CLI (which knows every role), one small job
trained through the coordinator, then every /metrics endpoint scraped: mid-epoch and after.
Catalogue: docs/metrics.md.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmps.client.launcher import free_port, wait_healthy
from lmps.v1 import coordinator_pb2, job_pb2
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens

pytestmark = pytest.mark.cluster

PROMTOOL = shutil.which("promtool")
ROLE_PREFIX = {"coordinator": "lmps_coordinator_", "ps": "lmps_ps_", "worker": "lmps_worker_"}
BATCHES, BATCHES_PER_LEASE = 6, 3


@dataclass
class Member:
    role: str
    address: str
    metrics_port: int
    proc: subprocess.Popen[bytes]


def lmps_cmd() -> list[str]:
    script = Path(sys.executable).parent / "lmps"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lmps.client.cli"]


def scrape(member: Member) -> str:
    url = f"http://127.0.0.1:{member.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> {sorted labels: value} of one scrape."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[name][tuple(sorted(labels.items()))]


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Member]]:
    logs = tmp_path_factory.mktemp("metrics")
    started: dict[str, Member] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def start(role: str, *extra: str) -> Member:
        port, metrics = free_port(), free_port()
        local = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics)]
        with open(logs / f"{role}.log", "wb") as log:
            proc = subprocess.Popen(
                [*lmps_cmd(), "serve", role, *local, "--grace", "1", *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        started[role] = Member(role, f"127.0.0.1:{port}", metrics, proc)
        return started[role]

    try:
        coordinator = start("coordinator", "--state-dir", str(logs / "state"))
        wait_healthy(coordinator.address, 90)
        join = ["--coordinator", coordinator.address]
        for role in ("ps", "worker"):
            start(role, *join, "--id", f"{role}-0")
        for m in started.values():
            wait_healthy(m.address, 90)
        yield started
    finally:
        for m in started.values():
            m.proc.terminate()
        for m in started.values():
            try:
                m.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                m.proc.kill()


@pytest.fixture(scope="module")
def trained(members: dict[str, Member]) -> dict[str, str]:
    """One epoch of a small job; returns {"job_id", "during": the coordinator's scrape at the
    first step, and every role's scrape afterwards}."""
    optimizer = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, schedule=job_pb2.CONSTANT)
    spec = make_spec(
        SMALL,
        optimizer,
        batch_size=4,
        batches_per_lease=BATCHES_PER_LEASE,
        workers=1,
        servers=1,
    )
    driver = Driver(members["coordinator"].address)
    out: dict[str, str] = {}
    try:
        tokens = random_tokens(BATCHES * 4 * 16 + 1, 64, 0)
        job_id = driver.submit(spec, tokens, random_tokens(33, 64, 1))
        stream = driver.stub.RunEpoch(
            coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=0), timeout=300
        )
        for ev in stream:
            if ev.HasField("step") and "during" not in out:
                out["during"] = scrape(members["coordinator"])
        status = driver.stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=30)
    finally:
        driver.close()
    out["job_id"], out["eval_loss"] = job_id, repr(status.last_eval_loss)
    for role, m in members.items():
        out[role] = scrape(m)
    return out


def test_each_process_exports_only_its_own_role(trained: dict[str, str]) -> None:
    for role, prefix in ROLE_PREFIX.items():
        names = set(samples(trained[role]))
        assert any(n.startswith(prefix) for n in names), f"{role}: no {prefix}* series"
        foreign = sorted(
            n for n in names for p in ROLE_PREFIX.values() if p != prefix and n.startswith(p)
        )
        assert not foreign, f"the {role} process exports another role's series: {foreign}"
        # Shared by every role: the RPC series and the process collector's.
        assert "lmps_rpc_total" in names, role
        assert "process_resident_memory_bytes" in names, role


def test_promtool_check_metrics_is_clean(trained: dict[str, str]) -> None:
    if PROMTOOL is None:
        reason = "no promtool: `apt-get install prometheus` provides it (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must provide it)")
        pytest.skip(reason)
    for role in [*ROLE_PREFIX, "during"]:
        proc = subprocess.run(
            [PROMTOOL, "check", "metrics"],
            input=trained[role],
            capture_output=True,
            text=True,
            timeout=30,
        )
        report = proc.stdout + proc.stderr
        assert proc.returncode == 0 and not report.strip(), f"{role}: {report}"


def test_coordinator_exports_training_series(trained: dict[str, str]) -> None:
    job = {"job_id": trained["job_id"]}
    during, after = trained["during"], trained["coordinator"]
    assert value(during, "lmps_coordinator_epoch_running", **job) == 1
    assert value(during, "lmps_coordinator_epoch", **job) == 0
    assert value(during, "lmps_coordinator_epoch_workers", **job) == 1
    assert value(during, "lmps_coordinator_leases_outstanding", **job) >= 1
    assert "lmps_coordinator_eval_loss" not in samples(during)  # no epoch has ended yet
    states = ("ready", "running", "completed", "failed")
    assert {s: value(during, "lmps_coordinator_job_state", state=s, **job) for s in states} == {
        "ready": 0,
        "running": 1,
        "completed": 0,
        "failed": 0,
    }

    # One worker: one optimizer step per batch.
    assert value(after, "lmps_coordinator_step", **job) == BATCHES
    assert value(after, "lmps_coordinator_total_steps", **job) == BATCHES
    assert value(after, "lmps_coordinator_epoch", **job) == 1  # the next to run
    assert value(after, "lmps_coordinator_epoch_running", **job) == 0
    assert value(after, "lmps_coordinator_leases_outstanding", **job) == 0
    # Its spec's one epoch is done.
    assert {s: value(after, "lmps_coordinator_job_state", state=s, **job) for s in states} == {
        "ready": 0,
        "running": 0,
        "completed": 1,
        "failed": 0,
    }
    loss = value(after, "lmps_coordinator_eval_loss", **job)
    assert math.isfinite(loss) and loss == float(trained["eval_loss"])
    for role in ("ps", "worker"):
        assert value(after, "lmps_coordinator_members_alive", role=role) == 1
    for counter in ("failovers", "restores", "servers_lost"):
        assert value(after, f"lmps_coordinator_{counter}_total") == 0


def test_role_series_agree_with_the_training(trained: dict[str, str]) -> None:
    ps, worker = trained["ps"], trained["worker"]
    assert value(ps, "lmps_ps_updates_total") == BATCHES
    assert value(ps, "lmps_ps_version") == BATCHES
    assert value(ps, "lmps_ps_parameter_bytes") > 0
    assert value(worker, "lmps_worker_steps_total") == BATCHES
    for phase in ("pull", "compute", "push"):
        assert value(worker, "lmps_worker_phase_seconds_count", phase=phase) == BATCHES
