"""A coordinator restart does not make the result depend on timing: the restored epoch waits
for the workers the interrupted one had, so its steps are made of the same batches as an
uninterrupted run's (docs/architecture.md, "Deterministic leases"). Real processes, SIGKILL
and SIGSTOP."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from lmps.v1 import coordinator_pb2, job_pb2
from tests.chaos.test_failures import by_step, params_of, start, submit
from tests.cluster.jobs import Driver

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

# How long the test keeps a worker from re-registering once the restored epoch is RUNNING:
# well below the jobs' wait_for_members_s (30 s), which bounds how long the epoch waits.
HOLD_S = 5.0


def state_of(driver: Driver, job_id: str) -> int:
    return int(driver.stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=60).state)


def test_coordinator_restart_waits_for_a_late_worker(tmp_path: Path) -> None:
    """num_workers 0 (every registered worker): after a coordinator restart the epoch waits
    for the two workers the interrupted one had, rather than starting with whichever
    re-registered first and rebalancing when the other turns up (another composition)."""
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        # The oracle: the same job, uninterrupted, on the same two workers.
        ref_id = submit(driver, checkpoint_every=4, workers=0)
        ref_events = driver.run_epoch(ref_id, 0)
        ref = by_step([e.step for e in ref_events if e.WhichOneof("kind") == "step"])
        expected = params_of(cluster.coordinator, ref_id)
        job_id = submit(driver, checkpoint_every=4, workers=0)
        request = coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=0)
        with pytest.raises(grpc.RpcError):
            for n, _ in enumerate(driver.stub.RunEpoch(request, timeout=300)):
                if n == 30:
                    # Frozen, worker-1 cannot re-register with the new coordinator.
                    cluster.kill("worker-1", signal.SIGSTOP)
                    cluster.kill("coordinator", signal.SIGKILL)
                    cluster.restart("coordinator")
        started = threading.Event()

        def retry() -> list[job_pb2.ProgressEvent]:
            events = []
            for ev in driver.stub.RunEpoch(request, timeout=300):
                events.append(ev)
                started.set()  # the first event is the start: the epoch has its workers
            return events

        with ThreadPoolExecutor(1) as pool:
            retried = pool.submit(retry)
            # Worker-1 stays frozen until the restored epoch has planned without it (the
            # race) or has been waiting for it a while (its start event follows the wait).
            while state_of(driver, job_id) != coordinator_pb2.RUNNING and not retried.done():
                time.sleep(0.2)
            started.wait(HOLD_S)
            cluster.kill("worker-1", signal.SIGCONT)
            events = retried.result(timeout=300)
        begin, summary = events[0].start, events[-1].summary
        steps = by_step([e.step for e in events if e.WhichOneof("kind") == "step"])
        got = params_of(cluster.coordinator, job_id)
        worst = max(float((got[n] - v).abs().max()) for n, v in expected.items())
        print(
            f"\nFAULT coordinator SIGKILL + restart, worker-1 late: resumed at step "
            f"{begin.start_step} with {list(begin.workers)}, {summary.end_step} steps "
            f"(uninterrupted {ref_events[-1].summary.end_step}), max abs diff {worst:.3e}"
        )
        assert begin.batches_done > 0, "did not resume from the mid-epoch checkpoint"
        assert list(begin.workers) == ["worker-0", "worker-1"]
        assert steps == {s: c for s, c in ref.items() if s >= begin.start_step}
        assert summary.end_step == ref_events[-1].summary.end_step
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]
    finally:
        with contextlib.suppress(ProcessLookupError):
            cluster.kill("worker-1", signal.SIGCONT)  # a frozen process ignores SIGTERM
        driver.close()
        cluster.stop()
