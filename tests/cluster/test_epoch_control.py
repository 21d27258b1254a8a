"""Driving jobs: cancelled epochs recover, busy clusters refuse jobs, unknown ids: NOT_FOUND."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.v1 import coordinator_pb2, job_pb2
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens

pytestmark = pytest.mark.cluster

SGD = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.05, schedule=job_pb2.CONSTANT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        servers=2, workers=2, worker_threads=1, run_dir=str(tmp_path_factory.mktemp("ctl"))
    )
    with LocalCluster(spec) as c:
        yield c


@pytest.fixture
def driver(cluster: LocalCluster) -> Iterator[Driver]:
    d = Driver(cluster.coordinator)
    yield d
    d.close()


def submit(driver: Driver, batches: int = 40) -> str:
    spec = make_spec(SMALL, SGD, batch_size=4)
    train = random_tokens(batches * 4 * SMALL.block_size + 1, SMALL.vocab_size, 3)
    return driver.submit(spec, train, random_tokens(2 * SMALL.block_size + 1, SMALL.vocab_size, 4))


def wait_state(
    driver: Driver, job_id: str, state: int, timeout_s: float = 60
) -> coordinator_pb2.JobStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        st = driver.stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=5)
        if st.state == state:
            return st
        assert time.monotonic() < deadline, f"job stuck in state {st.state}"
        time.sleep(0.2)


def test_cancelled_epoch_recovers_and_busy_cluster_refuses_jobs(driver: Driver) -> None:
    job_id = submit(driver)
    stream = driver.stub.RunEpoch(
        coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=0), timeout=120
    )
    seen = 0
    for ev in stream:
        if ev.WhichOneof("kind") == "step":
            seen += 1
            if seen == 1:
                # While an epoch runs, a new job would reload the servers under the workers' feet.
                with pytest.raises(grpc.RpcError) as err:
                    submit(driver)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            if seen >= 4:
                break
    stream.cancel()
    wait_state(driver, job_id, coordinator_pb2.READY)
    # The same epoch again, from wherever the servers got to: it completes normally.
    events = driver.run_epoch(job_id, 0)
    summary = events[-1].summary
    assert events[-1].WhichOneof("kind") == "summary"
    assert summary.batches == 40 and summary.data_shards_completed == 40
    # It resumed where the servers were, or rolled back to the last checkpoint when the
    # cancellation caught a worker between its pushes to the two servers.
    assert summary.end_step > summary.start_step >= 0
    status = wait_state(driver, job_id, coordinator_pb2.COMPLETED)  # its spec's one epoch
    assert status.step == summary.end_step and status.epochs_done == 1


def test_unknown_ids_are_not_found(driver: Driver) -> None:
    calls = [
        lambda: list(
            driver.stub.RunEpoch(coordinator_pb2.RunEpochRequest(job_id="job-nope"), timeout=10)
        ),
        lambda: driver.stub.GetJob(coordinator_pb2.GetJobRequest(job_id="job-nope"), timeout=10),
        lambda: driver.stub.Heartbeat(coordinator_pb2.HeartbeatRequest(id="worker-99"), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    job_id = submit(driver, batches=4)
    with pytest.raises(grpc.RpcError) as err:
        driver.stub.LeaseData(
            coordinator_pb2.LeaseDataRequest(job_id=job_id, worker_id="worker-99", epoch=0),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The cluster is unharmed: the job still trains.
    assert driver.run_epoch(job_id, 0)[-1].summary.batches == 4
