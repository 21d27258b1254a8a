"""A bounded load test against ONE parameter-server process on 127.0.0.1.

N pullers read every shard as fast as they can while M pushers run the SYNC barrier as its
only members (pull the step's version, push a gradient, repeat), for a fixed time. Asserts:
no call fails; every step is applied exactly once (the server's version equals the rounds
completed, exactly one push per round reports `applied`, and the parameters equal the
closed form of that many SGD steps, bit for bit); every pull is one consistent version whose
values match it; the server's memory (VmRSS) grows by less than a generous bound; the server
still answers SERVING. Prints p50/p99 latencies and throughput; asserts nothing about speed.

Knobs (environment): LMPS_LOAD_SECONDS (default 10), LMPS_LOAD_PULLERS (8),
LMPS_LOAD_PUSHERS (4).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import job_pb2, parameter_pb2, parameter_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.cluster

SECONDS = float(os.environ.get("LMPS_LOAD_SECONDS", "10"))
PULLERS = int(os.environ.get("LMPS_LOAD_PULLERS", "8"))
PUSHERS = int(os.environ.get("LMPS_LOAD_PUSHERS", "4"))
SHARDS = 8
NUMEL = 32 * 1024  # 128 KiB of fp32 per shard, 1 MiB in all
LR = 2.0**-10
# Pusher i sends gradient i + 1 everywhere: the weighted mean is (M + 1) / 2 and every
# version v has the exact value -v * LR * (M + 1) / 2 (small multiples of 2**-11: exact).
MEAN_GRAD = (PUSHERS + 1) / 2
RSS_GROWTH_LIMIT = 128 * 2**20  # ~20x the growth measured; leaking every push would exceed it
TIMEOUT_S = 30.0
REPORT: list[str] = []


def expected(version: int) -> float:
    return -version * LR * MEAN_GRAD


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Record:
    pull_s: list[float] = field(default_factory=list)  # pullers' whole-model pulls
    push_s: list[float] = field(default_factory=list)  # pushers' Push calls
    barrier_s: list[float] = field(default_factory=list)  # pushers' pulls (wait for the step)
    applied: list[int] = field(default_factory=list)  # steps whose push reported applied
    pulled_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, who: str, err: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{who}: {type(err).__name__}: {err}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A coordinator and ONE parameter server (the server registers at start-up)."""
    spec = ClusterSpec(servers=1, workers=0, run_dir=str(tmp_path_factory.mktemp("load")))
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        ps = cluster.procs[1]
        yield ps.address, ps.pid
    finally:
        cluster.stop()


def load_job(stub: parameter_pb2_grpc.ParameterServiceStub, members: list[str]) -> list[str]:
    ids = [f"w{i}.weight#0" for i in range(SHARDS)]
    header = parameter_pb2.LoadHeader(
        job_id="load",
        optimizer=job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=LR),
        shards=[
            parameter_pb2.ShardSpec(
                shard_id=sid, param=sid[:-2], param_shape=[NUMEL], numel=NUMEL, server_id="ps-0"
            )
            for sid in ids
        ],
        members=members,
    )
    zeros = codec.encode(torch.zeros(NUMEL))
    messages = [parameter_pb2.LoadRequest(header=header)] + [
        parameter_pb2.LoadRequest(shard=tensor_pb2.ShardTensor(shard_id=sid, tensor=zeros))
        for sid in ids
    ]
    stub.Load(iter(messages), timeout=TIMEOUT_S)
    return ids


def pull(stub: parameter_pb2_grpc.ParameterServiceStub, min_version: int) -> tuple[int, list]:
    msgs = list(
        stub.Pull(
            parameter_pb2.PullRequest(job_id="load", min_version=min_version), timeout=TIMEOUT_S
        )
    )
    versions = {m.version for m in msgs}
    assert len(versions) == 1, f"one pull mixed versions {sorted(versions)}"
    return versions.pop(), msgs


class Run:
    """The workload: pushers run rounds until time is up, then all finish the same round."""

    def __init__(
        self, address: str, ids: list[str], members: list[str], seconds: float, start: int
    ) -> None:
        self.address, self.ids, self.members, self.start = address, ids, members, start
        self.end = time.monotonic() + seconds
        self.limit: int | None = None  # rounds to complete, fixed once time is up
        self.limit_lock = threading.Lock()
        self.pushers_done = threading.Event()
        self.rec = Record()

    def rounds_left(self, step: int) -> bool:
        # The first pusher to see the clock run out at step s fixes the limit at s + 1: no
        # pusher can have pushed beyond s yet (s + 1 needs this one's push for s), so every
        # pusher can finish round s and stop there together.
        with self.limit_lock:
            if self.limit is None and time.monotonic() >= self.end:
                self.limit = step + 1
            return self.limit is None or step < self.limit

    def pusher(self, i: int) -> None:
        worker = self.members[i]
        grads = [
            parameter_pb2.PushRequest(
                grad=tensor_pb2.ShardTensor(
                    shard_id=sid, tensor=codec.encode(torch.full((NUMEL,), float(i + 1)))
                )
            )
            for sid in self.ids
        ]
        with open_channel(self.address) as ch:
            stub = parameter_pb2_grpc.ParameterServiceStub(ch)
            step = self.start
            try:
                while self.rounds_left(step):
                    t0 = time.perf_counter()
                    version, _ = pull(stub, step)
                    t1 = time.perf_counter()
                    assert version == step, f"{worker} pulled version {version} at step {step}"
                    h = parameter_pb2.PushHeader(
                        job_id="load", worker_id=worker, step=step, weight=1.0
                    )
                    resp = stub.Push(
                        iter([parameter_pb2.PushRequest(header=h), *grads]), timeout=TIMEOUT_S
                    )
                    t2 = time.perf_counter()
                    with self.rec.lock:
                        self.rec.barrier_s.append(t1 - t0)
                        self.rec.push_s.append(t2 - t1)
                        if resp.applied:
                            self.rec.applied.append(step)
                    step += 1
            except BaseException as err:
                self.rec.fail(worker, err)

    def puller(self, i: int) -> None:
        with open_channel(self.address) as ch:
            stub = parameter_pb2_grpc.ParameterServiceStub(ch)
            last = 0
            try:
                while not self.pushers_done.is_set():
                    t0 = time.perf_counter()
                    version, msgs = pull(stub, 0)
                    dt = time.perf_counter() - t0
                    assert version >= last, f"puller {i}: version went back {last} -> {version}"
                    last = version
                    assert [m.shard_id for m in msgs] == self.ids
                    want = expected(version)
                    for m in msgs:
                        t = codec.decode(m.tensor)
                        assert bool((t == want).all()), f"{m.shard_id} at v{version} != {want}"
                    with self.rec.lock:
                        self.rec.pull_s.append(dt)
                        self.rec.pulled_bytes += sum(len(m.tensor.data) for m in msgs)
            except BaseException as err:
                self.rec.fail(f"puller {i}", err)

    def run(self) -> float:
        pushers = [threading.Thread(target=self.pusher, args=(i,)) for i in range(PUSHERS)]
        pullers = [threading.Thread(target=self.puller, args=(i,)) for i in range(PULLERS)]
        started = time.perf_counter()
        for t in pushers + pullers:
            t.start()
        for t in pushers:
            t.join(SECONDS + 4 * TIMEOUT_S)
        self.pushers_done.set()
        for t in pullers:
            t.join(2 * TIMEOUT_S)
        assert not any(t.is_alive() for t in pushers + pullers), "a load thread hung"
        return time.perf_counter() - started


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def test_load_one_server(server: tuple[str, int]) -> None:
    address, pid = server
    members = [f"load-w{i}" for i in range(PUSHERS)]
    with open_channel(address) as ch:
        stub = parameter_pb2_grpc.ParameterServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        ids = load_job(stub, members)
        warm_up = Run(address, ids, members, seconds=1.0, start=0)  # threads, buffers, arenas
        warm_up.run()
        assert not warm_up.rec.errors, warm_up.rec.errors[:3]
        version0, _ = pull(stub, 0)
        rss_before = rss_bytes(pid)
        run = Run(address, ids, members, seconds=SECONDS, start=version0)
        wall = run.run()
        rss_after = rss_bytes(pid)
        rec = run.rec

        assert not rec.errors, f"{len(rec.errors)} calls failed, e.g. {rec.errors[:3]}"
        rounds = (run.limit or version0) - version0
        version, msgs = pull(stub, 0)
        assert version == version0 + rounds, f"version {version} after {rounds} rounds"
        assert sorted(rec.applied) == list(range(version0, version0 + rounds)), (
            "each round must be applied by exactly one push"
        )
        for m in msgs:
            assert bool((codec.decode(m.tensor) == expected(version)).all()), m.shard_id
        listed = stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=TIMEOUT_S)
        assert not listed.pushed, f"pushes left pending: {list(listed.pushed)}"
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        growth = rss_after - rss_before
        assert growth < RSS_GROWTH_LIMIT, f"server RSS grew by {growth / 2**20:.0f} MiB"

    mib = 2**20
    lines = [
        f"load: 1 parameter server, {PULLERS} pullers + {PUSHERS} pushing members, "
        f"{SHARDS} shards x {NUMEL * 4 // 1024} KiB = {SHARDS * NUMEL * 4 / mib:.0f} MiB, "
        f"{wall:.1f} s",
        f"  pull (whole model)  n={len(rec.pull_s):>6}  p50 {pct(rec.pull_s, 0.5):7.2f} ms  "
        f"p99 {pct(rec.pull_s, 0.99):7.2f} ms  {len(rec.pull_s) / wall:7.1f}/s  "
        f"{rec.pulled_bytes / mib / wall:7.1f} MiB/s",
        f"  push (whole model)  n={len(rec.push_s):>6}  p50 {pct(rec.push_s, 0.5):7.2f} ms  "
        f"p99 {pct(rec.push_s, 0.99):7.2f} ms  {len(rec.push_s) / wall:7.1f}/s",
        f"  barrier pull        n={len(rec.barrier_s):>6}  p50 {pct(rec.barrier_s, 0.5):7.2f} ms  "
        f"p99 {pct(rec.barrier_s, 0.99):7.2f} ms",
        f"  steps applied {rounds} ({rounds / wall:.1f}/s, each exactly once); server RSS "
        f"{rss_before / mib:.0f} -> {rss_after / mib:.0f} MiB "
        f"(mean pull {statistics.fmean(rec.pull_s) * 1e3:.2f} ms)",
    ]
    REPORT[:] = lines  # printed at the end of the session by tests/load/conftest.py
