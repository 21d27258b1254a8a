"""A real cluster (coordinator, 2 parameter servers, 2 workers) under mutual TLS and a token.

Every process gets the same LMPS_* variables (ClusterSpec.extra_env); this test process gets
them too, so its default channels are good clients. Strangers use explicit configurations.
The job trains its first epoch, then strangers try every door, the parameters are checked
unchanged, and the last test trains the second epoch on the same cluster.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmps.client.certs import DevPki
from lmps.client.cli import main as lmps_main
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.client.train import submit_messages
from lmps.rpc import codec, security
from lmps.rpc.channel import open_channel
from lmps.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    job_pb2,
    parameter_pb2,
    parameter_pb2_grpc,
    tensor_pb2,
)
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens
from tests.security.helpers import client_security, cluster_env
from tests.security.test_guard import HeldStream

pytestmark = pytest.mark.cluster

BATCH = 4
STREAM_LIMIT = 1000  # far above a training stream here (~70 messages), small enough to test
OK = grpc.StatusCode.OK
SGD = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.05, schedule=job_pb2.CONSTANT)


@pytest.fixture(scope="module")
def cluster(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    env = {**cluster_env(pki), "LMPS_MAX_STREAM_MESSAGES": str(STREAM_LIMIT)}
    spec = ClusterSpec(
        servers=2,
        workers=2,
        worker_threads=1,
        run_dir=str(tmp_path_factory.mktemp("secure-cluster")),
        extra_env=env,
    )
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        with LocalCluster(spec) as c:
            yield c


@pytest.fixture(scope="module")
def job(cluster: LocalCluster) -> str:
    """A job submitted and trained for one epoch over mutual TLS with the token."""
    train = random_tokens(8 * BATCH * SMALL.block_size + 1, SMALL.vocab_size, seed=1)
    evals = random_tokens(2 * BATCH * SMALL.block_size + 1, SMALL.vocab_size, seed=2)
    driver = Driver(cluster.coordinator)
    try:
        job_id = driver.submit(make_spec(SMALL, SGD, batch_size=BATCH, epochs=2), train, evals)
        events = driver.run_epoch(job_id, 0)
    finally:
        driver.close()
    kinds = [ev.WhichOneof("kind") for ev in events]
    assert kinds[0] == "start" and kinds[-1] == "summary" and "step" in kinds
    return job_id


def _servers(cluster: LocalCluster) -> list[str]:
    return [p.address for p in cluster.procs if p.name.startswith("ps-")]


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def checksum(cluster: LocalCluster, job_id: str) -> tuple[str, list[int], list[list[str]]]:
    """sha256 of every parameter shard (pulled by a good client), versions, barrier members."""
    digest = hashlib.sha256()
    versions, members = [], []
    for address in _servers(cluster):
        with open_channel(address) as ch:
            ps = parameter_pb2_grpc.ParameterServiceStub(ch)
            for msg in ps.Pull(parameter_pb2.PullRequest(job_id=job_id), timeout=30):
                digest.update(msg.shard_id.encode() + msg.tensor.data)
            listing = ps.ListShards(parameter_pb2.ListShardsRequest(job_id=job_id), timeout=10)
            versions.append(listing.version)
            members.append(sorted(listing.members))
    return digest.hexdigest(), versions, members


def _jobs(cluster: LocalCluster) -> int:
    with open_channel(cluster.coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        return len(stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=10).jobs)


def _attempts(
    cluster: LocalCluster, job_id: str, config: security.Security, refused: grpc.StatusCode
) -> list[str]:
    """Every door a stranger might try; the names of those that did not answer `refused`."""
    step = checksum(cluster, job_id)[1][0]
    grad = codec.encode(torch.ones(4))
    push = [
        parameter_pb2.PushRequest(
            header=parameter_pb2.PushHeader(
                job_id=job_id, worker_id="worker-0", step=step, weight=1.0
            )
        ),
        parameter_pb2.PushRequest(grad=tensor_pb2.ShardTensor(shard_id="x#0", tensor=grad)),
    ]
    load = [parameter_pb2.LoadRequest(header=parameter_pb2.LoadHeader(job_id="evil"))]
    spec = make_spec(SMALL, SGD, batch_size=BATCH)
    tokens = random_tokens(2 * BATCH * SMALL.block_size + 1, SMALL.vocab_size, seed=3)
    calls: dict[str, Callable[[grpc.Channel], object]] = {
        "SubmitJob": lambda ch: coordinator_pb2_grpc.CoordinatorServiceStub(ch).SubmitJob(
            submit_messages(spec, tokens, tokens), timeout=10
        ),
        "RunEpoch": lambda ch: list(
            coordinator_pb2_grpc.CoordinatorServiceStub(ch).RunEpoch(
                coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=1), timeout=10
            )
        ),
        "GetClusterStatus": lambda ch: coordinator_pb2_grpc.CoordinatorServiceStub(
            ch
        ).GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=10),
    }
    failures = []
    for name, call in calls.items():
        with open_channel(cluster.coordinator, config=config) as ch:
            if _code(functools.partial(call, ch)) != refused:
                failures.append(f"coordinator {name}")
    for address in _servers(cluster):
        ps_calls: dict[str, Callable[[parameter_pb2_grpc.ParameterServiceStub], object]] = {
            "Load": lambda ps: ps.Load(iter(load), timeout=10),
            "Push": lambda ps: ps.Push(iter(push), timeout=10),
            "SetMembers": lambda ps: ps.SetMembers(
                parameter_pb2.SetMembersRequest(job_id=job_id, members=[]), timeout=10
            ),
            "Pull": lambda ps: list(ps.Pull(parameter_pb2.PullRequest(job_id=job_id), timeout=10)),
            "GradNorm": lambda ps: ps.GradNorm(
                parameter_pb2.GradNormRequest(job_id=job_id, step=0), timeout=10
            ),
            "ApplyStep": lambda ps: ps.ApplyStep(
                parameter_pb2.ApplyStepRequest(job_id=job_id, step=0, grad_norm=1.0), timeout=10
            ),
        }
        with open_channel(address, config=config) as ch:
            ps = parameter_pb2_grpc.ParameterServiceStub(ch)
            for name, ps_call in ps_calls.items():
                if _code(functools.partial(ps_call, ps)) != refused:
                    failures.append(f"{address} {name}")
    return failures


def test_token_is_required_and_refusals_touch_nothing(
    cluster: LocalCluster, job: str, pki: DevPki
) -> None:
    before, jobs = checksum(cluster, job), _jobs(cluster)
    for token in ("", "wrong-token"):
        config = client_security(pki, token=token)
        assert _attempts(cluster, job, config, grpc.StatusCode.UNAUTHENTICATED) == [], token
    assert checksum(cluster, job) == before and _jobs(cluster) == jobs


def test_wrong_certificates_fail_the_handshake_and_touch_nothing(
    cluster: LocalCluster, job: str, pki: DevPki, stranger_pki: DevPki
) -> None:
    before = checksum(cluster, job)
    token = pki.token.read_text().strip()
    strangers = {
        "plaintext": security.Security(token=token),
        "another CA's client certificate": client_security(stranger_pki, token=token, ca=pki.ca),
        "no client certificate": client_security(pki, cert=False),
    }
    for name, config in strangers.items():
        assert _attempts(cluster, job, config, grpc.StatusCode.UNAVAILABLE) == [], name
    assert checksum(cluster, job) == before


def test_health_answers_without_a_token(
    cluster: LocalCluster, pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_token = client_security(pki, token="")
    for proc in cluster.procs:
        with open_channel(proc.address, config=no_token) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, proc.name
    # The documented exec probe: `lmps health` with the certificates, no token.
    monkeypatch.delenv("LMPS_AUTH_TOKEN_FILE")
    assert lmps_main(["health", cluster.coordinator]) == 0


def test_limits_refuse_long_streams_and_call_floods_and_server_stays_up(
    cluster: LocalCluster, job: str
) -> None:
    before = checksum(cluster, job)
    address = _servers(cluster)[0]
    limit = security.Limits().max_streams_per_peer  # the default
    grad = codec.encode(torch.ones(4))
    header = parameter_pb2.PushHeader(job_id=job, worker_id="worker-0", step=before[1][0])
    long_push = [parameter_pb2.PushRequest(header=header)] + [
        parameter_pb2.PushRequest(grad=tensor_pb2.ShardTensor(shard_id="x#0", tensor=grad))
    ] * (STREAM_LIMIT + 50)
    with open_channel(address) as ch:
        ps = parameter_pb2_grpc.ParameterServiceStub(ch)
        code = _code(lambda: ps.Push(iter(long_push), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        held = [HeldStream(ch) for _ in range(limit + 1)]
        opened = [h.opened() for h in held]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in opened
        assert opened.count(grpc.StatusCode.OK) <= limit
        listing = _code(lambda: ps.ListShards(parameter_pb2.ListShardsRequest(), timeout=5))
        assert listing == grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for h in held:
            h.end()
            h.call.cancel()
        deadline = time.monotonic() + 10  # slots are freed as the server sees the streams end
        while _code(lambda: ps.ListShards(parameter_pb2.ListShardsRequest(), timeout=5)) != OK:
            assert time.monotonic() < deadline, "call slots were not released"
            time.sleep(0.1)
    assert checksum(cluster, job) == before


def test_cluster_still_trains_after_the_attempts(cluster: LocalCluster, job: str) -> None:
    before = checksum(cluster, job)
    driver = Driver(cluster.coordinator)
    try:
        events = driver.run_epoch(job, 1)
    finally:
        driver.close()
    steps = {ev.step.step for ev in events if ev.WhichOneof("kind") == "step"}
    assert events[-1].WhichOneof("kind") == "summary" and steps
    after = checksum(cluster, job)
    assert after[0] != before[0]
    assert after[1] == [v + len(steps) for v in before[1]]
