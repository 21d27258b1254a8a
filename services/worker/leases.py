"""The coordinator as the trainer's `LeaseSource`: LeaseData / CompleteLease over gRPC."""

from __future__ import annotations

from lmps.rpc import codec
from lmps.rpc.channel import DEFAULT_TIMEOUT_S
from lmps.services.worker.trainer import Lease
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorLeases:
    """Leases of one job for one worker. Calls wait for a coordinator that is restarting."""

    def __init__(
        self, coordinator: coordinator_pb2_grpc.CoordinatorServiceStub, job_id: str, worker_id: str
    ) -> None:
        self.coordinator = coordinator
        self.job_id = job_id
        self.worker_id = worker_id

    def next_lease(self, epoch: int, next_step: int) -> Lease | None:
        resp = self.coordinator.LeaseData(
            coordinator_pb2.LeaseDataRequest(
                job_id=self.job_id, worker_id=self.worker_id, epoch=epoch, next_step=next_step
            ),
            timeout=DEFAULT_TIMEOUT_S,
            wait_for_ready=True,
        )
        if resp.done:
            return None
        m = resp.lease
        return Lease(
            lease_id=m.lease_id,
            data_shard=m.data_shard,
            first_batch=m.first_batch,
            batches=m.batches,
            tokens=codec.decode(m.tokens),  # (batches * B, T+1)
        )

    def complete(self, lease: Lease) -> None:
        self.coordinator.CompleteLease(
            coordinator_pb2.CompleteLeaseRequest(
                job_id=self.job_id, worker_id=self.worker_id, lease_id=lease.lease_id
            ),
            timeout=DEFAULT_TIMEOUT_S,
            wait_for_ready=True,
        )
