"""Process lifecycle of every service: metrics, the `lmps` CLI's health/help, SIGTERM."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmps.client.launcher import ClusterSpec, LocalCluster, free_port, wait_healthy
from lmps.rpc.channel import open_channel
from lmps.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    parameter_pb2,
    parameter_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

pytestmark = pytest.mark.cluster

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def lmps(*argvs: list[str], timeout: float = 60) -> list[tuple[int, str, str]]:
    """Run the `lmps` console script once per argv, concurrently (each pays torch's import).

    Falls back to `python -m client.cli` where the script is not installed.
    Returns (exit code, stdout, stderr) per argv.
    """
    script = Path(sys.executable).parent / "lmps"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "lmps.client.cli"]
    procs = [
        subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        results.append((proc.returncode, out, err))
    return results


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def rpc_count(text: str, method: str, code: str = "OK") -> float:
    """Value of lmps_rpc_total{method=..., code=...} in a scrape; 0 when absent."""
    for line in text.splitlines():
        labels = (f'method="{method}"', f'code="{code}"')
        if line.startswith("lmps_rpc_total{") and all(label in line for label in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(servers=1, workers=1, run_dir=str(tmp_path_factory.mktemp("lifecycle")))
    with LocalCluster(spec) as running:
        yield running


def _one_rpc(name: str, channel: grpc.Channel) -> str:
    """Make one OK call on the service `name` runs; return its full method name."""
    if name == "coordinator":
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=10)
        return "/lmps.v1.CoordinatorService/GetClusterStatus"
    if name.startswith("ps-"):
        ps = parameter_pb2_grpc.ParameterServiceStub(channel)
        ps.ListShards(parameter_pb2.ListShardsRequest(), timeout=10)
        return "/lmps.v1.ParameterService/ListShards"
    worker = worker_pb2_grpc.WorkerServiceStub(channel)
    worker.GetStatus(worker_pb2.WorkerStatusRequest(), timeout=10)
    return "/lmps.v1.WorkerService/GetStatus"


def test_metrics_endpoint_counts_rpcs(cluster: LocalCluster) -> None:
    for proc in cluster.procs:
        with open_channel(proc.address) as channel:
            method = _one_rpc(proc.name, channel)
            before = rpc_count(scrape(proc.metrics_port), method)
            assert before >= 1, f"{proc.name}: no lmps_rpc_total sample for {method}"
            for _ in range(3):
                _one_rpc(proc.name, channel)
        text = scrape(proc.metrics_port)
        assert rpc_count(text, method) == before + 3, proc.name
        assert f'lmps_rpc_seconds_count{{method="{method}"}}' in text, proc.name
        assert "# TYPE lmps_rpc_total counter" in text


def test_metrics_label_errors_with_their_status_code(cluster: LocalCluster) -> None:
    ps = next(p for p in cluster.procs if p.name == "ps-0")
    method = "/lmps.v1.ParameterService/GetShard"
    before = scrape(ps.metrics_port)
    with open_channel(ps.address) as channel:
        stub = parameter_pb2_grpc.ParameterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetShard(parameter_pb2.GetShardRequest(shard_id="nope#0"), timeout=10)
    # The interceptor maps the store's error to a specific status, never UNKNOWN/INTERNAL.
    code = info.value.code().name
    assert code in ("NOT_FOUND", "FAILED_PRECONDITION"), info.value.details()
    text = scrape(ps.metrics_port)
    assert rpc_count(text, method, code) == rpc_count(before, method, code) + 1
    assert rpc_count(text, method, "OK") == rpc_count(before, method, "OK")
    assert re.search(r"^lmps_ps_parameter_bytes \d", text, re.M), "ps-specific gauge missing"


@pytest.fixture(scope="module")
def cli(cluster: LocalCluster) -> dict[str, tuple[int, str, str]]:
    """`lmps serve ps --help`, `lmps health` on a live and on a dead address, run at once."""
    ps = next(p for p in cluster.procs if p.name == "ps-0")
    argvs = {
        "help": ["serve", "ps", "--help"],
        "live": ["health", ps.address],
        "dead": ["health", f"127.0.0.1:{free_port()}", "--timeout", "1"],
    }
    return dict(zip(argvs, lmps(*argvs.values()), strict=True))


def test_serve_ps_help_teaches(cli: dict[str, tuple[int, str, str]]) -> None:
    code, text, err = cli["help"]
    assert code == 0, err
    for needle in ("--coordinator", "LMPS_COORDINATOR", "--port", "LMPS_PORT", "--metrics-port"):
        assert needle in text, f"`lmps serve ps --help` does not mention {needle}"
    assert "parameter server" in text.lower()


def test_health_command(cli: dict[str, tuple[int, str, str]]) -> None:
    code, out, err = cli["live"]
    assert code == 0, err
    assert out.strip() == "SERVING"
    code, out, err = cli["dead"]
    assert code != 0
    assert "did not become healthy" in err


def _watch(address: str, seen: list[int], started: threading.Event) -> Callable[[], None]:
    """Record every health status `address` streams until the stream ends."""

    def run() -> None:
        with open_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for resp in stub.Watch(health_pb2.HealthCheckRequest(), timeout=30):
                    seen.append(resp.status)
                    started.set()
            except grpc.RpcError:
                pass  # the server went away: expected at the end
            finally:
                started.set()

    return run


def test_sigterm_stops_every_process_cleanly(tmp_path: Path) -> None:
    spec = ClusterSpec(servers=1, workers=1, run_dir=str(tmp_path))
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        watches: dict[str, list[int]] = {}
        threads = []
        for proc in cluster.procs:
            seen: list[int] = []
            started = threading.Event()
            thread = threading.Thread(target=_watch(proc.address, seen, started), daemon=True)
            thread.start()
            assert started.wait(10), f"{proc.name}: no health Watch response"
            watches[proc.name] = seen
            threads.append(thread)

        t0 = time.monotonic()
        codes = cluster.stop(timeout_s=20)
        elapsed = time.monotonic() - t0
    finally:
        cluster.stop()

    assert codes == {p.name: 0 for p in cluster.procs}, codes
    assert elapsed < 10, f"SIGTERM took {elapsed:.1f}s (grace is 2s)"
    for thread in threads:
        thread.join(timeout=10)
    for name, seen in watches.items():
        assert seen[0] == SERVING, name
        # An open Watch sees the flip to NOT_SERVING before the server goes.
        assert NOT_SERVING in seen, f"{name} never reported NOT_SERVING: {seen}"
    for proc in cluster.procs:
        log = Path(proc.log).read_text(errors="replace")
        assert "Traceback" not in log, f"{proc.name} log:\n{log[-2000:]}"
        # The port is really closed now.
        with pytest.raises(TimeoutError):
            wait_healthy(proc.address, timeout_s=0.5)


@contextmanager
def _launcher_picks_taken(monkeypatch: pytest.MonkeyPatch, at: int) -> Iterator[int]:
    """The launcher's `at`-th port pick (0-based: the coordinator's port, its metrics port,
    then each member's two) is a port something already listens on; the rest are free."""
    import socket

    from lmps.client import launcher

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        picks = iter([0] * at + [taken])
        real = launcher.free_port
        monkeypatch.setattr(launcher, "free_port", lambda: next(picks, 0) or real())
        yield taken


def test_a_metrics_port_taken_before_the_member_binds_it_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher picks free ports, and another process may take one before the member it
    was picked for binds it (CI saw a coordinator exit so). The metrics port is the
    launcher's alone, so the member is started again on another one."""
    with _launcher_picks_taken(monkeypatch, at=1) as taken:  # the coordinator's metrics
        spec = ClusterSpec(servers=1, workers=0, worker_threads=1, run_dir=str(tmp_path))
        with LocalCluster(spec) as cluster:
            coordinator = cluster.procs[0]
            assert coordinator.metrics_port != taken
            url = f"http://127.0.0.1:{coordinator.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert b"lmps_" in resp.read()
        log = Path(coordinator.log).read_text()
        assert f"port {taken} is already in use" in log


@pytest.mark.parametrize(
    ("at", "moved"),
    [(0, "coordinator"), (2, "ps-0")],
    ids=["coordinator", "parameter-server"],
)
def test_a_main_port_taken_before_a_starting_member_binds_it_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: int, moved: str
) -> None:
    """The same race on a member's gRPC port: while it starts, nobody but the launcher knows
    that port (a server or worker registers only once it serves), so it moves. When it is
    the coordinator's, the members already started with the old address start again with
    the new one; the cluster comes up whole, every member registered."""
    with _launcher_picks_taken(monkeypatch, at=at) as taken:
        spec = ClusterSpec(servers=1, workers=1, worker_threads=1, run_dir=str(tmp_path))
        with LocalCluster(spec) as cluster:  # start() waits until all are registered
            proc = next(p for p in cluster.procs if p.name == moved)
            assert not proc.address.endswith(f":{taken}")
            wait_healthy(proc.address, timeout_s=5)
            for p in cluster.procs[1:]:
                assert f"--coordinator {cluster.coordinator}" in _cmdline(p.pid)
        log = Path(proc.log).read_text()
        assert f"port {taken} is already in use" in log


def _cmdline(pid: int) -> str:
    """A running process's command line (Linux /proc), its arguments joined by spaces."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
