"""`ServerPool.open_pull` over real gRPC (one parameter-server process, `ps_cluster`): every
shard reaches the sink once, as received; a shard can be waited for on its own; a version
that never comes ends in the server's deadline, and a cancelled pull wakes its waiters."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace

import grpc
import pytest
import torch

from lmps.client.launcher import LocalCluster
from lmps.services.worker.pool import ServerPool
from tests.conftest import LoadJob
from tests.service.test_parameter_server import MEMBERS, SERVER, SGD, SHARDS, random_values

pytestmark = pytest.mark.cluster


def loaded_pool(cluster: LocalCluster, load_job: LoadJob, timeout_s: float = 30) -> ServerPool:
    job_id = f"pulls-{uuid.uuid4().hex[:8]}"
    load_job(job_id, SHARDS, random_values(4), MEMBERS, SGD)
    return ServerPool(job_id, "w0", SHARDS, {SERVER: cluster.procs[1].address}, timeout_s=timeout_s)


def test_every_shard_reaches_the_sink_once_and_can_be_waited_for(
    ps_cluster: LocalCluster, load_job: LoadJob
) -> None:
    pool = loaded_pool(ps_cluster, load_job)
    got: dict[str, torch.Tensor] = {}
    calls: list[str] = []
    lock = threading.Lock()

    def sink(sid: str, value: torch.Tensor) -> None:
        with lock:
            calls.append(sid)
            got[sid] = value.clone()

    try:
        pull = pool.open_pull(0, sink)
        assert pull.version() == 0
        last = SHARDS[-1].shard_id
        pull.wait([last])
        assert last in got
        assert pull.result() == 0
    finally:
        pool.close()
    assert sorted(calls) == sorted(s.shard_id for s in SHARDS)  # each exactly once
    want = random_values(4)
    for s in SHARDS:
        assert torch.equal(got[s.shard_id], want[s.shard_id].reshape(-1)), s.shard_id


def test_a_version_that_never_comes_ends_in_deadline_exceeded(
    ps_cluster: LocalCluster, load_job: LoadJob
) -> None:
    pool = loaded_pool(ps_cluster, load_job)
    try:
        pull = pool.open_pull(1, lambda sid, v: None, timeout_s=0.5)  # nobody pushes step 0
        with pytest.raises(grpc.RpcError) as info:
            pull.version()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError):  # every later call says the same
            pull.wait([SHARDS[0].shard_id])
    finally:
        pool.close()


def test_cancelling_the_pool_wakes_a_waiting_pull(
    ps_cluster: LocalCluster, load_job: LoadJob
) -> None:
    pool = loaded_pool(ps_cluster, load_job)
    errors: list[BaseException] = []
    pull = pool.open_pull(1, lambda sid, v: None)

    def waiter() -> None:
        try:
            pull.result()
        except BaseException as err:  # what the trainer would see
            errors.append(err)

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        thread.join(timeout=0.3)
        assert thread.is_alive()  # waiting for version 1
        pool.cancel()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert isinstance(errors[0], grpc.RpcError)
        assert errors[0].code() == grpc.StatusCode.CANCELLED
    finally:
        pool.close()


def test_a_subset_pull_asks_every_server_but_hands_over_only_the_subset(
    ps_cluster: LocalCluster, load_job: LoadJob
) -> None:
    """Streaming fragments pull one fragment's shards. A server holding none of them is
    still asked for one shard of its own, so the pull waits for its version too (the
    worker's next push must not reach it before it made the step); that shard is not handed
    to the sink. Here two server ids name the one process, which holds every shard."""
    job_id = f"pulls-{uuid.uuid4().hex[:8]}"
    load_job(job_id, SHARDS, random_values(4), MEMBERS, SGD)
    # The pool's view: wte on SERVER, the rest on "ps-other". The subset is one of SERVER's
    # two shards (a pull of all of a server's shards asks for none by name, and this one
    # process would then send every shard it holds).
    shards = [replace(s, server_id=SERVER if i < 2 else "ps-other") for i, s in enumerate(SHARDS)]
    address = ps_cluster.procs[1].address
    pool = ServerPool(job_id, "w0", shards, {SERVER: address, "ps-other": address}, timeout_s=30)
    wanted = [shards[0].shard_id]
    handed: list[str] = []
    try:
        pull = pool.open_pull(0, lambda sid, v: handed.append(sid), shard_ids=wanted)
        assert pull._servers == 2  # the other server is asked too (for its version)
        assert pull.result() == 0
        version, values = pool.pull(0, shard_ids=wanted)
        with pytest.raises(ValueError, match="no server owns shards"):
            pool.open_pull(0, lambda sid, v: None, shard_ids=["nope#0"])
    finally:
        pool.close()
    assert sorted(handed) == sorted(wanted)
    assert version == 0 and list(values) == wanted
    want = random_values(4)
    assert torch.equal(values[wanted[0]], want[wanted[0]].reshape(-1))
