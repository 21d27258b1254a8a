"""Gradient clipping's two RPCs on one real parameter-server process, over real gRPC.

GradNorm and ApplyStep (`protos/lmps/v1/parameter.proto`): every documented status code, a
refused call changes nothing, the applied step is torch's clip_grad_norm_ then SGD; and the
two clients of the exchange on the same server: `ServerPool` (a worker's push followed by its
step's norm) and the coordinator's `Fleet.settle` (a step whose workers never committed it).
"""

from __future__ import annotations

import functools
import math
import threading
import uuid
from collections.abc import Callable

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from lmps.client.launcher import LocalCluster
from lmps.core import clip
from lmps.core.settings import Consistency
from lmps.rpc import codec
from lmps.services.coordinator.fleet import Fleet
from lmps.services.worker.pool import ServerPool
from lmps.v1 import parameter_pb2
from tests.conftest import health_status, load_messages
from tests.service.test_parameter_server import (
    LR,
    MEMBERS,
    SERVER,
    SGD,
    SHARDS,
    Grads,
    Stub,
    pull_all,
    push,
    random_values,
)

pytestmark = pytest.mark.cluster

Code = grpc.StatusCode
MAX_NORM = 0.5  # random normal gradients of 30 elements have norms of about 5: they clip


def load(stub: Stub, max_grad_norm: float, consistency: Consistency = "sync") -> tuple[str, Grads]:
    job_id = f"clip-{uuid.uuid4().hex[:8]}"
    init = random_values(seed=0)
    msgs = list(load_messages(job_id, SHARDS, init, MEMBERS, SGD))
    msgs[0].header.max_grad_norm = max_grad_norm
    msgs[0].header.consistency = codec.consistency_to_proto(consistency)
    stub.Load(iter(msgs), timeout=30)
    return job_id, init


def code(call: Callable[[], object]) -> Code:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def grad_norm(stub: Stub, job_id: str, step: int, timeout: float = 10.0) -> object:
    request = parameter_pb2.GradNormRequest(job_id=job_id, step=step)
    return stub.GradNorm(request, timeout=timeout)


def apply_step(stub: Stub, job_id: str, step: int, norm: float) -> object:
    request = parameter_pb2.ApplyStepRequest(job_id=job_id, step=step, grad_norm=norm)
    return stub.ApplyStep(request, timeout=10)


def awaiting(stub: Stub, job_id: str) -> bool:
    listing = stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job_id), timeout=10)
    return bool(listing.awaiting_norm)


def clipped_sgd(init: Grads, grads: list[Grads]) -> tuple[Grads, float]:
    """torch: the mean of `grads`, clip_grad_norm_(MAX_NORM), one SGD step."""
    params = {sid: torch.nn.Parameter(t.clone()) for sid, t in init.items()}
    for sid, p in params.items():
        p.grad = sum(g[sid] for g in grads) / len(grads)  # type: ignore[assignment]
    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM))
    torch.optim.SGD(list(params.values()), lr=LR, foreach=False).step()
    return {sid: p.detach() for sid, p in params.items()}, norm


def test_grad_norm_and_apply_step_status_codes(ps_stub: Stub, ps_channel: grpc.Channel) -> None:
    job_id, init = load(ps_stub, MAX_NORM)
    assert code(lambda: grad_norm(ps_stub, "no-such-job", 0)) == Code.NOT_FOUND
    assert code(lambda: grad_norm(ps_stub, job_id, 1)) == Code.OUT_OF_RANGE
    # Step 0 is pending (nobody pushed): GradNorm waits, until its deadline.
    assert code(lambda: grad_norm(ps_stub, job_id, 0, timeout=0.5)) == Code.DEADLINE_EXCEEDED
    assert code(lambda: apply_step(ps_stub, job_id, 0, 1.0)) == Code.FAILED_PRECONDITION

    g0, g1 = random_values(10), random_values(11)
    assert push(ps_stub, job_id, "w0", 0, g0).applied is False
    resp = push(ps_stub, job_id, "w1", 0, g1)
    assert (resp.version, resp.applied, resp.pending) == (0, False, 0)  # parked, not applied
    assert awaiting(ps_stub, job_id)
    assert code(lambda: push(ps_stub, job_id, "w0", 0, g0)) == Code.FAILED_PRECONDITION

    answer = grad_norm(ps_stub, job_id, 0)
    assert isinstance(answer, parameter_pb2.GradNormResponse)
    assert answer.version == 0
    assert [n.shard_id for n in answer.norms] == [s.shard_id for s in SHARDS]
    sums = {n.shard_id: n.sum_sq for n in answer.norms}
    norm = clip.total_norm(sums)
    want, torch_norm = clipped_sgd(init, [g0, g1])
    assert norm == pytest.approx(torch_norm, rel=1e-6) and norm > MAX_NORM

    before = pull_all(ps_stub, job_id)[1]
    for bad in (math.nan, math.inf, -1.0, norm / 3):
        assert code(functools.partial(apply_step, ps_stub, job_id, 0, bad)) == Code.INVALID_ARGUMENT
    assert code(lambda: apply_step(ps_stub, job_id, 1, norm)) == Code.OUT_OF_RANGE
    assert code(lambda: apply_step(ps_stub, "no-such-job", 0, norm)) == Code.NOT_FOUND
    assert all(torch.equal(v, before[k]) for k, v in pull_all(ps_stub, job_id)[1].items())

    done = apply_step(ps_stub, job_id, 0, norm)
    assert isinstance(done, parameter_pb2.ApplyStepResponse)
    assert (done.version, done.grad_norm) == (1, norm)
    version, after = pull_all(ps_stub, job_id, min_version=1)
    assert version == 1 and not awaiting(ps_stub, job_id)
    for sid, t in want.items():
        torch.testing.assert_close(after[sid], t, rtol=0, atol=1e-6)
    # A second worker's ApplyStep: OK, nothing changes; another norm: refused.
    assert apply_step(ps_stub, job_id, 0, norm) == done
    assert code(lambda: apply_step(ps_stub, job_id, 0, norm * 2)) == Code.FAILED_PRECONDITION
    assert all(torch.equal(v, after[k]) for k, v in pull_all(ps_stub, job_id)[1].items())
    assert grad_norm(ps_stub, job_id, 0) == parameter_pb2.GradNormResponse(
        norms=answer.norms, version=1
    )
    assert health_status(ps_channel) == health_pb2.HealthCheckResponse.SERVING


def test_clipping_off_or_outside_sync_is_refused(ps_stub: Stub) -> None:
    job_id, _ = load(ps_stub, 0.0)
    assert code(lambda: grad_norm(ps_stub, job_id, 0)) == Code.FAILED_PRECONDITION
    assert code(lambda: apply_step(ps_stub, job_id, 0, 1.0)) == Code.FAILED_PRECONDITION
    assert code(lambda: load(ps_stub, MAX_NORM, "async")) == Code.INVALID_ARGUMENT
    assert code(lambda: load(ps_stub, -1.0)) == Code.INVALID_ARGUMENT


def test_worker_pools_commit_each_step_and_agree_on_its_norm(
    ps_cluster: LocalCluster, ps_stub: Stub
) -> None:
    job_id, init = load(ps_stub, MAX_NORM)
    address = {SERVER: ps_cluster.procs[1].address}
    grads = {"w0": random_values(20), "w1": random_values(21)}
    pools = {w: ServerPool(job_id, w, SHARDS, address, timeout_s=30, clip=True) for w in grads}
    made: dict[str, tuple[int, float]] = {}

    def step(worker: str) -> None:
        stream = pools[worker].open_push(0, 1.0)
        for sid, g in grads[worker].items():
            stream.add(sid, g)
        made[worker] = (stream.close(), stream.grad_norm)

    try:
        threads = [threading.Thread(target=step, args=(w,)) for w in grads]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        want, torch_norm = clipped_sgd(init, list(grads.values()))
        assert made["w0"] == made["w1"]  # the same norm, bit for bit
        assert made["w0"][0] == 1 and made["w0"][1] == pytest.approx(torch_norm, rel=1e-6)
        version, values = pools["w0"].pull(1)
        assert version == 1
        for sid, t in want.items():
            torch.testing.assert_close(values[sid], t, rtol=0, atol=1e-6)
    finally:
        for p in pools.values():
            p.close()


def test_the_coordinator_commits_a_step_its_workers_left_parked(
    ps_cluster: LocalCluster, ps_stub: Stub
) -> None:
    job_id, init = load(ps_stub, MAX_NORM)
    servers = {SERVER: ps_cluster.procs[1].address}
    g0, g1 = random_values(30), random_values(31)
    push(ps_stub, job_id, "w0", 0, g0)
    push(ps_stub, job_id, "w1", 0, g1)  # both pushed; neither committed (they died)
    fleet = Fleet()
    assert fleet.versions(job_id, servers) == [1]  # a parked step counts as made for joins
    assert awaiting(ps_stub, job_id)
    assert fleet.version(job_id, servers) == 1  # settles first: commits step 0
    want, _ = clipped_sgd(init, [g0, g1])
    version, values = pull_all(ps_stub, job_id, min_version=1)
    assert version == 1 and not awaiting(ps_stub, job_id)
    for sid, t in want.items():
        torch.testing.assert_close(values[sid], t, rtol=0, atol=1e-6)
    assert fleet.settle(job_id, servers) is None  # nothing waits any more
