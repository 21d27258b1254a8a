"""A real cluster loaded with a small job, RPC helpers that record and judge status codes, and
a fingerprint of every piece of state the fuzz tests must not change.

What "intact" means (`Fuzzed.assert_intact`): every process answers SERVING on
grpc.health.v1; every parameter server holds the same job at the same version with
bit-identical shards (sha256 of every shard pulled from every server), the same barrier
members and nothing pending; the coordinator knows the same jobs in the same states; the
workers hold the same job at the same step.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    job_pb2,
    parameter_pb2,
    parameter_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens
from tests.fuzz.contract import documented_codes

Code = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING

# Barrier members the fuzz tests install on every server after the setup epoch. No real
# worker has these ids, so no legitimate push can reach the barrier during the run; two of
# them, so a push that was wrongly accepted would sit pending (and show in the
# fingerprint) instead of running the optimizer.
FUZZ_MEMBERS = ("fuzz-member-a", "fuzz-member-b")
SGD = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.05, schedule=job_pb2.CONSTANT)
BATCH = 2
TIMEOUT_S = 20.0  # a call that takes longer than this hangs: DEADLINE_EXCEEDED fails it

# Status codes seen, per RPC (reported at the end of the run).
STATS: dict[str, Counter[str]] = defaultdict(Counter)


@dataclass(frozen=True)
class KnownBug:
    """A wrong answer the code gives today, tolerated by the fuzz run so that it keeps looking
    for new ones. Each has a strict-xfail reproducer in test_bug_reproducers.py: when the code
    is fixed (or the proto documents the code), the reproducer XPASSes, which fails the run
    under strict, and the entry here must go."""

    bug: str  # id used in the reproducer and the report, e.g. "B3"
    rpc: str
    code: str
    details: str  # a substring of the status details that identifies this failure


KNOWN_BUGS: list[KnownBug] = [
    # Empty: every bug the fuzz run found is fixed (tests/fuzz/test_bug_reproducers.py).
]


def known_bug(rpc: str, out: Outcome) -> str:
    for k in KNOWN_BUGS:
        if k.rpc in (rpc, "*") and k.code == out.code.name and k.details in out.details:
            return k.bug
    return ""


@dataclass
class Outcome:
    code: Code
    details: str
    responses: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.code == Code.OK


def _outcome(err: grpc.RpcError) -> Outcome:
    return Outcome(err.code(), err.details() or "")


def unary(fn: Any, request: Any, timeout: float = TIMEOUT_S) -> Outcome:
    try:
        return Outcome(Code.OK, "", [fn(request, timeout=timeout)])
    except grpc.RpcError as err:
        return _outcome(err)


def server_stream(
    fn: Any, request: Any, timeout: float = TIMEOUT_S, cancel_after: int | None = None
) -> Outcome:
    """Read the whole stream, or cancel it after `cancel_after` messages."""
    call = fn(request, timeout=timeout)
    got: list[Any] = []
    try:
        for msg in call:
            got.append(msg)
            if cancel_after is not None and len(got) >= cancel_after:
                call.cancel()
        return Outcome(Code.OK, "", got)
    except grpc.RpcError as err:
        out = _outcome(err)
        out.responses = got
        return out


def client_stream(
    fn: Any,
    messages: Sequence[Any],
    timeout: float = TIMEOUT_S,
    cancel_after: int | None = None,
) -> Outcome:
    """Send `messages`; with `cancel_after`, send that many, hold the stream open (never
    half-closing it) and cancel the call: an abrupt client that vanishes mid-stream."""
    if cancel_after is None:
        try:
            return Outcome(Code.OK, "", [fn(iter(messages), timeout=timeout)])
        except grpc.RpcError as err:
            return _outcome(err)
    sent, release = threading.Event(), threading.Event()

    def gen() -> Iterator[Any]:
        yield from messages[:cancel_after]
        sent.set()
        release.wait(timeout)

    future = fn.future(gen(), timeout=timeout)
    try:
        # The server may answer before reading everything (a bad first message): then the
        # generator is never drained and there is nothing left to cancel.
        while not sent.wait(0.01) and not future.done():
            pass
        time.sleep(0.02)  # let the last messages reach the server
        future.cancel()
    finally:
        release.set()
    try:
        return Outcome(Code.OK, "", [future.result()])
    except grpc.FutureCancelledError:
        return Outcome(Code.CANCELLED, "cancelled by the test")
    except grpc.RpcError as err:
        return _outcome(err)


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


@dataclass
class Server:
    name: str
    channel: grpc.Channel
    stub: parameter_pb2_grpc.ParameterServiceStub
    shards: dict[str, int]  # shard_id -> numel, in the server's order


@dataclass
class Fuzzed:
    """The cluster under fuzz and what the tests need to build inputs for it."""

    cluster: LocalCluster
    job_id: str
    spec: job_pb2.JobSpec
    train: torch.Tensor
    version: int
    coord_channel: grpc.Channel
    coord: coordinator_pb2_grpc.CoordinatorServiceStub
    servers: dict[str, Server]
    workers: dict[str, tuple[grpc.Channel, worker_pb2_grpc.WorkerServiceStub]]
    shard_map: coordinator_pb2.ShardMap
    documented: dict[str, frozenset[str]]
    baseline: dict[str, Any] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # shard_id -> fp32 value

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case
        return f"Fuzzed(job_id={self.job_id!r}, version={self.version})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis' pretty-printer
        p.text(repr(self))

    # -- judging outcomes ------------------------------------------------------------------

    def check(
        self,
        rpc: str,
        out: Outcome,
        *,
        ok: bool | None,
        caused: Iterable[Code] = (),
        what: object = "",
        label: str = "",
    ) -> Outcome:
        """Record `out` and assert it is acceptable for `rpc`.

        ok: True when the input is valid and read-only (the call must succeed), False when it
        was built to be refused, None when either is fine. caused: codes this test provoked on
        purpose (its own cancellation or short deadline). Every other code must be documented
        in the proto.
        """
        stats = STATS[rpc + label]
        caused = set(caused)
        if out.ok:
            stats["OK"] += 1
            assert ok is not False, f"{rpc} accepted an input it must refuse: {what}"
            return out
        known = known_bug(rpc, out)
        stats[f"{out.code.name} (known bug {known})" if known else out.code.name] += 1
        allowed = set(self.documented.get(rpc, ())) | {c.name for c in caused}
        assert out.code.name in allowed or known, (
            f"{rpc} answered {out.code.name} ({out.details[:300]!r}), not among the codes its "
            f"proto documents {sorted(self.documented.get(rpc, ()))} or the test caused "
            f"{sorted(c.name for c in caused)}; input: {str(what)[:600]}"
        )
        assert ok is not True or out.code in caused, (
            f"{rpc} refused a valid read-only input with {out.code.name} "
            f"({out.details[:300]!r}): {str(what)[:600]}"
        )
        return out

    # -- health and state ------------------------------------------------------------------

    def channels(self) -> dict[str, grpc.Channel]:
        out = {"coordinator": self.coord_channel}
        out.update({name: s.channel for name, s in self.servers.items()})
        out.update({name: ch for name, (ch, _) in self.workers.items()})
        return out

    def assert_serving(self, names: Iterable[str] | None = None) -> None:
        channels = self.channels()
        for name in names if names is not None else channels:
            status = health(channels[name])
            assert status == SERVING, f"{name} reports health status {status}, not SERVING"

    def pull_all(self, server: Server) -> tuple[int, dict[str, torch.Tensor]]:
        msgs = list(
            server.stub.Pull(parameter_pb2.PullRequest(job_id=self.job_id), timeout=TIMEOUT_S)
        )
        versions = {m.version for m in msgs}
        assert len(versions) == 1, f"{server.name}: one pull mixed versions {versions}"
        return versions.pop(), {m.shard_id: codec.decode(m.tensor) for m in msgs}

    def fingerprint(self) -> dict[str, Any]:
        """Everything the fuzz run must leave as it was (see the module docstring)."""
        fp: dict[str, Any] = {}
        digest = hashlib.sha256()
        for name, server in sorted(self.servers.items()):
            version, values = self.pull_all(server)
            for sid in sorted(values):
                t = values[sid].contiguous()
                digest.update(f"{name}/{sid}/{version}/{t.dtype}/{list(t.shape)}".encode())
                digest.update(t.numpy().tobytes())
            ls = server.stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=TIMEOUT_S)
            fp[name] = (ls.job_id, ls.version, tuple(ls.members), tuple(ls.pushed), len(values))
        fp["parameters_sha256"] = digest.hexdigest()
        status = self.coord.GetClusterStatus(
            coordinator_pb2.ClusterStatusRequest(), timeout=TIMEOUT_S
        )
        fp["jobs"] = sorted((j.job_id, j.state, j.step, j.epochs_done) for j in status.jobs)
        fp["members"] = sorted((m.id, m.role, m.address) for m in status.members)
        for name, (_, stub) in sorted(self.workers.items()):
            st = stub.GetStatus(worker_pb2.WorkerStatusRequest(), timeout=TIMEOUT_S)
            fp[name] = (st.worker_id, st.job_id, st.training, st.step)
        return fp

    def assert_intact(self) -> None:
        self.assert_serving()
        now = self.fingerprint()
        changed = {
            k: (self.baseline.get(k), v) for k, v in now.items() if self.baseline.get(k) != v
        }
        assert not changed, f"the fuzz run changed cluster state (before, after): {changed}"

    # -- handy views -----------------------------------------------------------------------

    @property
    def worker_ids(self) -> list[str]:
        return sorted(self.workers)

    def shard_ids(self) -> list[str]:
        return [sid for s in self.servers.values() for sid in s.shards]


def start(run_dir: str) -> Fuzzed:
    """Start 1 coordinator + 2 servers + 2 workers, submit a small job and train one epoch
    (so the version is past 0 and stale steps exist), then hand the barrier to FUZZ_MEMBERS.
    The caller must `stop` it."""
    cluster = LocalCluster(ClusterSpec(servers=2, workers=2, worker_threads=1, run_dir=run_dir))
    cluster.start()
    try:
        return _prepare(cluster)
    except BaseException:
        cluster.stop()
        raise


def _prepare(cluster: LocalCluster) -> Fuzzed:
    spec = make_spec(SMALL, SGD, batch_size=BATCH)
    train = random_tokens(3 * 2 * BATCH * SMALL.block_size + 1, SMALL.vocab_size, 11)
    evals = random_tokens(2 * SMALL.block_size + 1, SMALL.vocab_size, 12)
    driver = Driver(cluster.coordinator)
    try:
        job_id = driver.submit(spec, train, evals)
        events = driver.run_epoch(job_id, 0)
    finally:
        driver.close()
    assert events[-1].WhichOneof("kind") == "summary", "the setup epoch did not finish"
    coord_channel = open_channel(cluster.coordinator)
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(coord_channel)
    shard_map = coord.GetShardMap(coordinator_pb2.GetShardMapRequest(job_id=job_id), timeout=30)
    servers: dict[str, Server] = {}
    workers = {}
    for proc in cluster.procs:
        if proc.name.startswith("ps-"):
            ch = open_channel(proc.address)
            stub = parameter_pb2_grpc.ParameterServiceStub(ch)
            ls = stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job_id), timeout=30)
            shards = {i.spec.shard_id: int(i.spec.numel) for i in ls.shards}
            servers[proc.name] = Server(proc.name, ch, stub, shards)
            stub.SetMembers(
                parameter_pb2.SetMembersRequest(job_id=job_id, members=FUZZ_MEMBERS), timeout=30
            )
        elif proc.name.startswith("worker-"):
            ch = open_channel(proc.address)
            workers[proc.name] = (ch, worker_pb2_grpc.WorkerServiceStub(ch))
    version = int(events[-1].summary.end_step)
    fx = Fuzzed(
        cluster=cluster,
        job_id=job_id,
        spec=spec,
        train=train,
        version=version,
        coord_channel=coord_channel,
        coord=coord,
        servers=servers,
        workers=workers,
        shard_map=shard_map,
        documented=documented_codes(),
    )
    for server in servers.values():
        v, values = fx.pull_all(server)
        assert v == version, f"{server.name} is at version {v}, the epoch ended at {version}"
        fx.values.update(values)
    fx.baseline = fx.fingerprint()
    return fx


def stop(fx: Fuzzed) -> None:
    for ch in fx.channels().values():
        ch.close()
    fx.cluster.stop()


def report(write: Callable[[str], None]) -> None:
    """Write the per-RPC case counts and the status codes seen."""
    total = sum(sum(c.values()) for c in STATS.values())
    write(f"fuzz: {total} RPC cases against a live cluster")
    for rpc in sorted(STATS):
        codes = ", ".join(f"{k} {v}" for k, v in STATS[rpc].most_common())
        write(f"  {rpc:<46} {sum(STATS[rpc].values()):>5}  {codes}")
