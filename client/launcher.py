"""Start a whole lmps cluster as local processes on 127.0.0.1 (the tests' backbone too)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmps.rpc.bootstrap import PortInUse, port_taken
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc

PORT_TRIES = 3
"""Times a starting member is started again on another port when one the launcher picked
for it was taken before it could bind it (`LocalCluster._wait`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ticks(pid: int) -> int:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); 0 where
    there is no /proc, no such process, or only its zombie. A reused PID starts later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # Field 2 (the command name) is in parentheses and may hold spaces: split after it.
    fields = stat.rsplit(")", 1)[1].split()
    return 0 if fields[0] == "Z" else int(fields[19])


def wait_healthy(address: str, timeout_s: float = 60.0, service: str = "") -> None:
    """Block until `address` answers SERVING on the gRPC health service."""
    deadline = time.monotonic() + timeout_s
    with open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f}s")
            time.sleep(0.2)


class MemberExited(RuntimeError):
    """A member exited while the cluster was starting; carries the tail of its log."""

    def __init__(self, name: str, code: int, log: str, tail: str) -> None:
        super().__init__(f"{name} exited with {code}:\n{tail}")
        self.name, self.code, self.log, self.tail = name, code, log, tail

    def summary(self) -> str:
        """One line: who exited, the last line it logged, where the whole log is."""
        lines = [x for x in self.tail.splitlines() if x.strip()]
        last = lines[-1].strip() if lines else "(empty log)"
        return f"{self.name} exited with {self.code} while starting: {last} (log: {self.log})"


@dataclass
class Proc:
    name: str  # "coordinator", "ps-0", "worker-1"
    address: str
    metrics_port: int
    log: str
    pid: int = 0
    started: int = 0
    """`start_ticks(pid)` at launch: `lmps cluster down` signals only that very process."""


@dataclass
class ClusterSpec:
    servers: int = 2
    workers: int = 2
    host: str = "127.0.0.1"
    coordinator_port: int = 0  # 0 = pick free ports
    run_dir: str = ".lmps/cluster"
    worker_threads: int = 0  # torch threads per worker; 0 = cores / workers
    extra_env: dict[str, str] = field(default_factory=dict)
    state_dir: str = ""  # coordinator's jobs and checkpoints; "" = RUN_DIR/state


class LocalCluster:
    """1 coordinator + N parameter servers + M workers, each its own OS process."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.procs: list[Proc] = []
        self._popen: dict[str, subprocess.Popen[bytes]] = {}
        self._roles: dict[str, tuple[str, int]] = {}
        self.run_dir = Path(spec.run_dir)

    @property
    def coordinator(self) -> str:
        return self.procs[0].address

    def _cmd(self, role: str, port: int, metrics: int, name: str) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            f"lmps.services.{role}.main",
            "--host",
            self.spec.host,
            "--port",
            str(port),
            "--metrics-port",
            str(metrics),
            "--grace",
            "2",
        ]
        if role == "coordinator":
            cmd += ["--state-dir", self.spec.state_dir or str(self.run_dir / "state")]
        else:
            cmd += ["--coordinator", self.coordinator, "--id", name]
            cmd += ["--advertise", f"{self.spec.host}:{port}"]
        return cmd

    def _spawn(self, role: str, name: str, threads: int, port: int = 0) -> Proc:
        port = port or free_port()
        metrics = free_port()
        log = self.run_dir / f"{name}.log"
        proc = Proc(name, f"{self.spec.host}:{port}", metrics, str(log))
        self.procs.append(proc)  # before _cmd: workers need the coordinator's address
        self._roles[name] = (role, threads)
        self._launch(proc, fresh=True)
        return proc

    def _launch(self, proc: Proc, fresh: bool = False) -> None:
        """Start `proc`; a new member's log starts empty (bounded), a restart appends."""
        role, threads = self._roles[proc.name]
        port = int(proc.address.rsplit(":", 1)[1])
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
            **self.spec.extra_env,
        }
        with open(proc.log, "wb" if fresh else "ab") as out:
            p = subprocess.Popen(
                self._cmd(role, port, proc.metrics_port, proc.name),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        proc.pid = p.pid
        proc.started = start_ticks(p.pid)
        self._popen[proc.name] = p

    def restart(self, name: str, timeout_s: float = 60.0) -> None:
        """Start a member again (after `kill`) with the same id, port and log."""
        old = self._popen[name]
        try:
            old.wait(timeout=10)  # reap it (a SIGKILL takes a moment to land)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} is still running") from None
        proc = next(p for p in self.procs if p.name == name)
        self._launch(proc)
        self._wait(proc, timeout_s)

    def add_worker(self, name: str, timeout_s: float = 60.0) -> Proc:
        """Start one more worker (a replacement or an extra) and wait until it serves."""
        proc = self._spawn("worker", name, self.spec.worker_threads or 1)
        self._wait(proc, timeout_s, fresh=True)
        return proc

    def start(self, timeout_s: float = 90.0) -> LocalCluster:
        port = self.spec.coordinator_port
        if port and port_taken(self.spec.host, port):
            raise PortInUse(self.spec.host, port, "--port")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count() or 1
        threads = self.spec.worker_threads or max(1, cores // max(1, self.spec.workers))
        try:
            self._spawn("coordinator", "coordinator", 1, port)
            for i in range(self.spec.servers):
                self._spawn("parameter_server", f"ps-{i}", 1)
            for i in range(self.spec.workers):
                self._spawn("worker", f"worker-{i}", threads)
            for p in self.procs:
                self._wait(p, timeout_s, fresh=True)
            self._wait_registered(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, proc: Proc, timeout_s: float, fresh: bool = False) -> None:
        """Until `proc` serves. A port the launcher picked may have been taken by another
        process (an ephemeral port) before the member bound it (CI saw it): the member is
        started again on another one, up to PORT_TRIES times, where nobody else knows it
        yet. Its metrics port is the launcher's alone; its main port too while it is
        `fresh` (starting for the first time: it has not registered), except the
        coordinator's when the spec fixed it. The members started with a coordinator's
        old address are started again with the new one."""
        deadline = time.monotonic() + timeout_s
        moves = PORT_TRIES
        while True:
            popen = self._popen.get(proc.name)
            if popen is not None and popen.poll() is not None:
                tail = Path(proc.log).read_text(errors="replace")[-3000:]
                port = int(proc.address.rsplit(":", 1)[1])
                own = not (proc is self.procs[0] and self.spec.coordinator_port)
                if moves and f"port {proc.metrics_port} is already in use" in tail:
                    moves -= 1
                    proc.metrics_port = free_port()
                    self._launch(proc)
                    continue
                if moves and fresh and own and f"port {port} is already in use" in tail:
                    moves -= 1
                    proc.address = f"{self.spec.host}:{free_port()}"
                    self._launch(proc)
                    if proc is self.procs[0]:
                        self._relaunch_members()
                    continue
                raise MemberExited(proc.name, popen.returncode, proc.log, tail)
            try:
                wait_healthy(proc.address, timeout_s=1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def _relaunch_members(self) -> None:
        """Stop every member but the coordinator and start it again, fresh: the coordinator
        moved, and they were given its old address."""
        for proc in self.procs[1:]:
            popen = self._popen[proc.name]
            popen.kill()
            popen.wait(timeout=10)
            self._launch(proc, fresh=True)

    def _wait_registered(self, timeout_s: float) -> None:
        want = self.spec.servers + self.spec.workers
        deadline = time.monotonic() + timeout_s
        with open_channel(self.coordinator) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            while True:
                status = stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=5)
                if sum(m.alive for m in status.members) >= want:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(status.members)}/{want} members registered")
                time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one member (fault injection)."""
        self._popen[name].send_signal(sig)

    def returncodes(self, timeout_s: float = 15.0) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name, p in self._popen.items():
            try:
                out[name] = p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                out[name] = None
        return out

    def stop(self, timeout_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM everyone (workers first), SIGKILL whoever outlives `timeout_s`."""
        for name in reversed(list(self._popen)):
            p = self._popen[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = self.returncodes(timeout_s)
        for name, code in codes.items():
            if code is None:
                self._popen[name].kill()
                self._popen[name].wait()
        return codes

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"procs": [asdict(p) for p in self.procs]}, indent=2))

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _still_ours(proc: Proc) -> bool:
    """Whether `proc.pid` is still the process `lmps cluster up` started (not a reused PID)."""
    if not Path("/proc").is_dir():
        return True  # nothing to check against off Linux: trust the record
    now = start_ticks(proc.pid)
    if not now:
        return False  # gone
    if proc.started:
        return now == proc.started
    # A record written before start times were kept: the command line must still be ours.
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"lmps.services." in cmdline


def saved_procs(path: Path) -> list[Proc]:
    """The processes recorded in the cluster file `path` (none when there is no file)."""
    if not path.exists():
        return []
    return [Proc(**p) for p in json.loads(path.read_text())["procs"]]


def recorded_coordinator(path: Path) -> str | None:
    """The coordinator address in the cluster file `path`, if there is one."""
    return next((p.address for p in saved_procs(path) if p.name == "coordinator"), None)


def running_saved(path: Path) -> list[Proc]:
    """The processes recorded in the cluster file `path` that are still running."""
    return [p for p in saved_procs(path) if _still_ours(p)]


def stop_saved(path: Path, timeout_s: float = 15.0) -> list[str]:
    """Stop a detached cluster recorded by `save` (for `lmps cluster down`). Only processes
    that are still the ones started (same PID and start time) are signalled."""
    if not path.exists():
        raise FileNotFoundError(
            f"no running cluster recorded at {path}; start one with `lmps cluster up`"
        )
    procs = running_saved(path)
    stopped = []
    for p in reversed(procs):
        try:
            os.kill(p.pid, signal.SIGTERM)
            stopped.append(p.name)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for p in procs:
        while time.monotonic() < deadline:
            if not _still_ours(p):
                break
            time.sleep(0.1)
        else:
            if _still_ours(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
    path.unlink()
    return stopped
