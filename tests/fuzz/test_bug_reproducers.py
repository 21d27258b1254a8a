"""Minimal reproducers of the bugs the fuzz run found: a strict xfail each while the bug is
open, a plain regression test once it is fixed (B13).

A fix makes its reproducer pass, which strict xfail reports as a failure: that is the cue to
drop the `xfail` mark here (and the matching `KNOWN_BUGS` entry in harness.py, which lets
the fuzz run tolerate the bug meanwhile). Documenting a B2 code in the proto has the same
effect, since the allowed codes are read from the proto.

They share one small cluster (coordinator, 1 parameter server, 1 worker) and run in file
order: the last ones wedge or kill processes on purpose.
"""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.model import init_model
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    job_pb2,
    parameter_pb2,
    parameter_pb2_grpc,
    tensor_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens
from tests.fuzz.contract import documented_codes
from tests.fuzz.harness import SERVING, SGD, client_stream, health, server_stream, unary

pytestmark = pytest.mark.cluster

Code = grpc.StatusCode


def bug(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"bug: {reason}")


@dataclass
class Victim:
    cluster: LocalCluster
    driver: Driver
    spec: job_pb2.JobSpec
    train: torch.Tensor
    channels: dict[str, grpc.Channel]

    @property
    def coord(self) -> coordinator_pb2_grpc.CoordinatorServiceStub:
        return self.driver.stub

    @property
    def ps(self) -> parameter_pb2_grpc.ParameterServiceStub:
        return parameter_pb2_grpc.ParameterServiceStub(self.channels["ps-0"])

    @property
    def worker(self) -> worker_pb2_grpc.WorkerServiceStub:
        return worker_pb2_grpc.WorkerServiceStub(self.channels["worker-0"])

    def held(self) -> set[str]:
        """The jobs the parameter servers hold now."""
        out = set()
        for name in ("ps-0", "ps-1"):
            stub = parameter_pb2_grpc.ParameterServiceStub(self.channels[name])
            out.add(stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=10).job_id)
        return out

    def job(self) -> str:
        """The job ps-0 holds now (a reproducer may have submitted another)."""
        return str(self.ps.ListShards(parameter_pb2.ListShardsRequest(), timeout=10).job_id)

    def jobs(self) -> list[str]:
        status = self.coord.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=10)
        return [j.job_id for j in status.jobs]

    def log(self, name: str) -> str:
        proc = next(p for p in self.cluster.procs if p.name == name)
        return Path(proc.log).read_text(errors="replace")


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    """Coordinator, 2 parameter servers, 1 worker, one small job submitted."""
    run_dir = str(tmp_path_factory.mktemp("bugs"))
    cluster = LocalCluster(ClusterSpec(servers=2, workers=1, worker_threads=1, run_dir=run_dir))
    cluster.start()
    channels: dict[str, grpc.Channel] = {}
    try:
        driver = Driver(cluster.coordinator)
        spec = make_spec(SMALL, SGD, batch_size=2, servers=2, workers=1)
        train = random_tokens(40 * 2 * SMALL.block_size + 1, SMALL.vocab_size, 5)
        driver.submit(spec, train, random_tokens(2 * SMALL.block_size + 1, SMALL.vocab_size, 6))
        channels = {p.name: open_channel(p.address) for p in cluster.procs[1:]}
        # The reproducers send `spec` + the train tokens only: announce exactly those.
        spec.train_tokens, spec.eval_tokens = train.numel(), 0
        yield Victim(cluster, driver, spec, train, channels)
        driver.close()
    finally:
        for ch in channels.values():
            ch.close()
        cluster.stop(timeout_s=5)  # some reproducers leave handlers that never return


# -- B1: huge ids ------------------------------------------------------------------------------


def test_b1_huge_unknown_id_gets_not_found(victim: Victim) -> None:
    out = unary(victim.coord.GetJob, coordinator_pb2.GetJobRequest(job_id="x" * 20_000))
    assert out.code == Code.NOT_FOUND, (out.code, out.details[:120])


# -- B2: codes the proto does not document ------------------------------------------------------


def _b2_cases() -> list[Any]:
    def t(x: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
        return x

    cases: list[tuple[str, str, Callable[[Victim], Any]]] = [
        (
            "ParameterService/Pull",
            "INVALID_ARGUMENT for a non-float wire_dtype",
            lambda v: server_stream(
                v.ps.Pull, parameter_pb2.PullRequest(wire_dtype=tensor_pb2.INT32)
            ),
        ),
        (
            "ParameterService/SetMembers",
            "NOT_FOUND for an unknown job",
            lambda v: unary(v.ps.SetMembers, parameter_pb2.SetMembersRequest(job_id="nope")),
        ),
        (
            "ParameterService/GetShard",
            "INVALID_ARGUMENT for an empty shard_id",
            lambda v: unary(v.ps.GetShard, parameter_pb2.GetShardRequest()),
        ),
        (
            "ParameterService/Snapshot",
            "NOT_FOUND for an unknown job",
            lambda v: server_stream(v.ps.Snapshot, parameter_pb2.SnapshotRequest(job_id="nope")),
        ),
        (
            "CoordinatorService/LeaseData",
            "NOT_FOUND for an unknown job",
            lambda v: unary(v.coord.LeaseData, coordinator_pb2.LeaseDataRequest(job_id="nope")),
        ),
        (
            "CoordinatorService/LeaseData",
            "FAILED_PRECONDITION when no epoch runs",
            lambda v: unary(
                v.coord.LeaseData,
                coordinator_pb2.LeaseDataRequest(job_id=v.job(), worker_id="worker-0"),
            ),
        ),
        (
            "CoordinatorService/GetShardMap",
            "NOT_FOUND for an unknown job",
            lambda v: unary(v.coord.GetShardMap, coordinator_pb2.GetShardMapRequest(job_id="nope")),
        ),
        (
            "CoordinatorService/ExportModel",
            "NOT_FOUND for an unknown job",
            lambda v: server_stream(
                v.coord.ExportModel, coordinator_pb2.ExportModelRequest(job_id="nope")
            ),
        ),
        (
            "WorkerService/Evaluate",
            "NOT_FOUND for an unknown job",
            lambda v: unary(v.worker.Evaluate, worker_pb2.EvaluateRequest(job_id="nope")),
        ),
        (
            "WorkerService/Evaluate",
            "INVALID_ARGUMENT for 1-D tokens",
            lambda v: unary(
                v.worker.Evaluate,
                worker_pb2.EvaluateRequest(
                    job_id=v.job(), tokens=t(codec.encode(torch.zeros(3, dtype=torch.int32)))
                ),
            ),
        ),
    ]
    return [
        pytest.param(
            rpc,
            call,
            id=f"{rpc.split('/')[1]}-{what.split()[0]}-{i}",
            marks=(),
        )
        for i, (rpc, what, call) in enumerate(cases)
    ]


@pytest.mark.parametrize(("rpc", "call"), _b2_cases())
def test_b2_every_code_is_documented(
    victim: Victim, rpc: str, call: Callable[[Victim], Any]
) -> None:
    out = call(victim)
    assert not out.ok
    assert out.code.name in documented_codes()[rpc], (out.code, out.details)


# -- B4: long sequences --------------------------------------------------------------------------


def test_b4_worker_evaluate_refuses_long_sequences(victim: Victim) -> None:
    tokens = codec.encode(torch.zeros((1, SMALL.block_size + 2), dtype=torch.int32))
    out = unary(
        victim.worker.Evaluate, worker_pb2.EvaluateRequest(job_id=victim.job(), tokens=tokens)
    )
    assert out.code == Code.INVALID_ARGUMENT, (out.code, out.details)


# -- B6: a pull without a deadline ------------------------------------------------------------


def test_b6_pull_without_deadline_waits(victim: Victim) -> None:
    request = parameter_pb2.PullRequest(job_id=victim.job(), min_version=2**62)
    call = victim.ps.Pull(request)  # no deadline, as grpcurl or a careless client sends it
    try:
        time.sleep(1.0)
        if call.done():
            assert call.code() in (Code.DEADLINE_EXCEEDED, Code.NOT_FOUND), call.details()
    finally:
        call.cancel()


# -- B9, B10, B13: SubmitJob accepts or chokes on bad specs ------------------------------------


def test_b10_submit_refuses_token_ids_beyond_int32(victim: Victim) -> None:
    wrapped = victim.train.to(torch.int64) + 2**32
    messages = [
        coordinator_pb2.SubmitJobRequest(spec=victim.spec),
        coordinator_pb2.SubmitJobRequest(
            data=coordinator_pb2.DatasetPart(split="train", tokens=codec.encode(wrapped))
        ),
    ]
    out = client_stream(victim.coord.SubmitJob, messages, timeout=60)
    assert out.code == Code.INVALID_ARGUMENT, (out.code, out.details)


def test_b14_refused_submit_leaves_the_servers_alone(victim: Victim) -> None:
    previous = victim.held()
    assert len(previous) == 1
    messages = [coordinator_pb2.SubmitJobRequest(spec=victim.spec)]
    for name, p in init_model(SMALL, 0).named_parameters():
        value = p.detach().to(torch.float64)
        if name == "transformer.ln_f.weight":  # one shard: on one of the two servers
            value[0] = 1e39
        init = coordinator_pb2.InitialParameter(name=name, value=codec.encode(value))
        messages.append(coordinator_pb2.SubmitJobRequest(init=init))
    messages.append(
        coordinator_pb2.SubmitJobRequest(
            data=coordinator_pb2.DatasetPart(split="train", tokens=codec.encode(victim.train))
        )
    )
    out = client_stream(victim.coord.SubmitJob, messages, timeout=60)
    assert out.code == Code.INVALID_ARGUMENT, (out.code, out.details)
    deadline = time.monotonic() + 5  # the other server's Load may still be on its way
    while time.monotonic() < deadline:
        assert victim.held() == previous, "a refused job replaced the previous one on a server"
        time.sleep(0.25)


def test_b13_submit_refuses_tiny_shard_bytes(victim: Victim) -> None:
    """Found by the fuzz run as UNKNOWN; fixed during it (now a regression test)."""
    spec = job_pb2.JobSpec()
    spec.CopyFrom(victim.spec)
    spec.shard_bytes = 3
    messages = [
        coordinator_pb2.SubmitJobRequest(spec=spec),
        coordinator_pb2.SubmitJobRequest(
            data=coordinator_pb2.DatasetPart(split="train", tokens=codec.encode(victim.train))
        ),
    ]
    out = client_stream(victim.coord.SubmitJob, messages, timeout=60)
    assert out.code == Code.INVALID_ARGUMENT, (out.code, out.details)


def test_b3_cancelled_submit_creates_no_job(victim: Victim) -> None:
    parts = [
        coordinator_pb2.SubmitJobRequest(
            data=coordinator_pb2.DatasetPart(split="train", tokens=codec.encode(chunk))
        )
        for chunk in torch.split(victim.train, 100)
    ]
    messages = [coordinator_pb2.SubmitJobRequest(spec=victim.spec), *parts]
    before = victim.jobs()
    for _ in range(10):  # a race, but one that most tries lose
        out = client_stream(victim.coord.SubmitJob, messages, cancel_after=len(messages) // 2)
        assert out.code == Code.CANCELLED
    try:
        deadline = time.monotonic() + 15  # creating a job (load, configure) takes a while
        while time.monotonic() < deadline:
            created = [j for j in victim.jobs() if j not in before]
            assert not created, f"cancelled submits created {created}"
            time.sleep(0.5)
    finally:
        settle(victim)


def settle(victim: Victim, quiet_s: float = 3.0, limit_s: float = 30.0) -> None:
    """Wait until no new job has appeared for `quiet_s` (jobs B3 creates in the background
    would reload the servers under the next reproducers)."""
    deadline, count, since = time.monotonic() + limit_s, len(victim.jobs()), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.5)
        now = len(victim.jobs())
        if now != count:
            count, since = now, time.monotonic()


def test_b9_submit_refuses_nan_wait(victim: Victim) -> None:
    spec = job_pb2.JobSpec()
    spec.CopyFrom(victim.spec)
    spec.num_servers, spec.wait_for_members_s = 5, math.nan
    messages = [
        coordinator_pb2.SubmitJobRequest(spec=spec),
        coordinator_pb2.SubmitJobRequest(
            data=coordinator_pb2.DatasetPart(split="train", tokens=codec.encode(victim.train))
        ),
    ]
    out = client_stream(victim.coord.SubmitJob, messages, timeout=5)
    assert out.code in (Code.INVALID_ARGUMENT, Code.UNAVAILABLE), (out.code, out.details)


# -- B11: cancelled streams log a crash ---------------------------------------------------------


def test_b11_cancelled_push_logs_no_crash(victim: Victim) -> None:
    header = parameter_pb2.PushRequest(
        header=parameter_pb2.PushHeader(job_id=victim.job(), worker_id="nobody", weight=1.0)
    )
    before = victim.log("ps-0").count("Exception calling application")
    for _ in range(10):  # the server sees some cancellations as a clean end of stream (B3)
        out = client_stream(victim.ps.Push, [header], cancel_after=1)
        assert out.code == Code.CANCELLED
    time.sleep(0.5)
    assert victim.log("ps-0").count("Exception calling application") == before


# -- B5, B7, B8: waits that nothing can end -------------------------------------------------------


def test_b5_worker_evaluate_future_version_does_not_wedge_the_worker(victim: Victim) -> None:
    tokens = codec.encode(torch.zeros((1, 4), dtype=torch.int32))
    evals = random_tokens(2 * SMALL.block_size + 1, SMALL.vocab_size, 6)
    job = victim.driver.submit(victim.spec, victim.train, evals)  # servers and worker agree
    stuck = worker_pb2.EvaluateRequest(job_id=job, tokens=tokens, min_version=2**62)
    assert unary(victim.worker.Evaluate, stuck, timeout=1).code == Code.DEADLINE_EXCEEDED
    out = unary(
        victim.worker.Evaluate, worker_pb2.EvaluateRequest(job_id=job, tokens=tokens), timeout=10
    )
    assert out.ok, (out.code, out.details)


def test_b7_cancelled_pulls_free_their_threads(victim: Victim) -> None:
    request = parameter_pb2.PullRequest(job_id=victim.job(), min_version=2**62)
    for _ in range(3):  # 3 x 30: more than the pool, under the per-client stream limit
        calls = [victim.ps.Pull(request, timeout=30) for _ in range(30)]
        time.sleep(0.5)
        for c in calls:
            c.cancel()
    time.sleep(0.5)
    assert health(victim.channels["ps-0"]) == SERVING
    out = unary(victim.ps.ListShards, parameter_pb2.ListShardsRequest(), timeout=5)
    assert out.ok, (out.code, out.details)


def test_b8_sigterm_stops_a_server_with_a_waiting_pull(victim: Victim) -> None:
    channel = open_channel(next(p for p in victim.cluster.procs if p.name == "ps-0").address)
    stub = parameter_pb2_grpc.ParameterServiceStub(channel)
    request = parameter_pb2.PullRequest(job_id=victim.job(), min_version=2**62)
    waiting = threading.Thread(target=lambda: unary_drain(stub, request), daemon=True)
    waiting.start()
    time.sleep(0.5)
    try:
        victim.cluster.kill("ps-0", signal.SIGTERM)
        proc = victim.cluster._popen["ps-0"]
        try:
            proc.wait(timeout=10)  # grace is 2 s
        except subprocess.TimeoutExpired:
            pytest.fail("the server was still running 10 s after SIGTERM")
    finally:
        channel.close()


def unary_drain(stub: parameter_pb2_grpc.ParameterServiceStub, request: Any) -> None:
    with contextlib.suppress(grpc.RpcError):
        list(stub.Pull(request, timeout=60))
