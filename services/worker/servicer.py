"""gRPC face of a worker: configure a replica, train epochs on leased data, evaluate."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import prometheus_client
import torch

from lmps.core.errors import FailedPrecondition, InvalidArgument, NotFound
from lmps.rpc import codec
from lmps.rpc.channel import DEFAULT_TIMEOUT_S, open_channel
from lmps.rpc.codec import CodecError
from lmps.services.worker.pool import ServerPool
from lmps.services.worker.replica import Replica, pick_device
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("lmps.worker")

STEPS = prometheus_client.Counter("lmps_worker_steps_total", "Training steps computed")
TOKENS = prometheus_client.Counter("lmps_worker_tokens_total", "Training tokens processed")
LOSS = prometheus_client.Gauge("lmps_worker_loss", "Loss of the last step")
PHASE = prometheus_client.Histogram(
    "lmps_worker_phase_seconds",
    "Time per step phase",
    ["phase"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@dataclass
class _Job:
    job_id: str
    spec: job_pb2.JobSpec
    replica: Replica
    pool: ServerPool
    step: int = 0


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, worker_id: str, coordinator: str, device: str = "auto") -> None:
        self.worker_id = worker_id
        self.device = pick_device(device)
        self._coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(coordinator))
        self._job: _Job | None = None
        self._lock = threading.Condition()  # guards _job and _training
        self._training = False
        self.steps_done = 0

    def _require(self, job_id: str) -> _Job:
        job = self._job
        if job is None or job.job_id != job_id:
            raise NotFound(f"unknown job {job_id!r} on worker {self.worker_id}")
        return job

    def Configure(
        self, request: worker_pb2.ConfigureRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ConfigureResponse:
        try:
            config = codec.model_from_proto(request.spec.model)
            shards = [codec.shard_from_proto(s) for s in request.shards]
            dtype = codec.wire_dtype(request.spec.wire_dtype)
            with torch.random.fork_rng(devices=[]):
                replica = Replica(config, shards, self.device)
            pool = ServerPool(
                request.job_id,
                self.worker_id,
                shards,
                {s.server_id: s.address for s in request.servers},
                wire_dtype=dtype,
            )
        except (ValueError, CodecError) as err:
            raise InvalidArgument(f"configure: {err}") from None
        with self._lock:
            # A cancelled epoch takes a moment to unwind; a reconfigure right after it waits.
            if not self._lock.wait_for(lambda: not self._training, timeout=30.0):
                pool.close()
                raise FailedPrecondition("configure: an epoch is running on this worker")
            if self._job is not None:
                self._job.pool.close()
            self._job = _Job(request.job_id, request.spec, replica, pool)
        log.info(
            "configured for job %s: %d parameters on %s", request.job_id, replica.numel, self.device
        )
        return worker_pb2.ConfigureResponse(device=str(self.device), parameters=replica.numel)

    def TrainEpoch(
        self, request: worker_pb2.TrainEpochRequest, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.ProgressEvent]:
        with self._lock:
            job = self._require(request.job_id)
            if not self._lock.wait_for(lambda: not self._training, timeout=30.0):
                raise FailedPrecondition("an epoch is already running on this worker")
            self._training = True
        # A cancelled epoch must not leave pulls blocked on the barrier for minutes.
        context.add_callback(job.pool.cancel)
        try:
            job.step = request.start_step
            yield from self._train(job, request.epoch, context)
        finally:
            with self._lock:
                self._training = False
                self._lock.notify_all()

    def _train(
        self, job: _Job, epoch: int, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.ProgressEvent]:
        batch_size = job.spec.batch_size
        while context.is_active():
            resp = self._coordinator.LeaseData(
                coordinator_pb2.LeaseDataRequest(
                    job_id=job.job_id, worker_id=self.worker_id, epoch=epoch, next_step=job.step
                ),
                timeout=DEFAULT_TIMEOUT_S,
                wait_for_ready=True,
            )
            if resp.done:
                return
            lease = resp.lease
            tokens = codec.decode(lease.tokens)  # (batches * B, T+1)
            for b in range(lease.batches):
                if not context.is_active():
                    return
                batch = tokens[b * batch_size : (b + 1) * batch_size]
                t0 = time.perf_counter()
                version, values = job.pool.pull(job.step)
                # A worker that joined mid-epoch (or lagged) follows the servers' version;
                # its gradient is then computed at, and pushed for, that version.
                job.step = version
                job.replica.load(values)
                t1 = time.perf_counter()
                loss, grads = job.replica.train_step(batch)
                t2 = time.perf_counter()
                job.pool.push(job.step, float(batch.shape[0]), grads)
                t3 = time.perf_counter()
                n_tokens = batch.shape[0] * (batch.shape[1] - 1)
                STEPS.inc()
                TOKENS.inc(n_tokens)
                LOSS.set(loss)
                PHASE.labels("pull").observe(t1 - t0)
                PHASE.labels("compute").observe(t2 - t1)
                PHASE.labels("push").observe(t3 - t2)
                self.steps_done += 1
                yield job_pb2.ProgressEvent(
                    job_id=job.job_id,
                    epoch=epoch,
                    step=job_pb2.StepEvent(
                        worker_id=self.worker_id,
                        step=job.step,
                        loss=loss,
                        tokens=n_tokens,
                        tokens_per_s=n_tokens / max(t3 - t0, 1e-9),
                        compute_s=t2 - t1,
                        pull_s=t1 - t0,
                        push_s=t3 - t2,
                        lease_id=lease.lease_id,
                        data_shard=lease.data_shard,
                        batch_index=lease.first_batch + b,
                    ),
                )
                job.step += 1
            self._coordinator.CompleteLease(
                coordinator_pb2.CompleteLeaseRequest(
                    job_id=job.job_id, worker_id=self.worker_id, lease_id=lease.lease_id
                ),
                timeout=DEFAULT_TIMEOUT_S,
                wait_for_ready=True,
            )

    def Evaluate(
        self, request: worker_pb2.EvaluateRequest, context: grpc.ServicerContext
    ) -> worker_pb2.EvaluateResponse:
        job = self._require(request.job_id)
        try:
            sequences = codec.decode(request.tokens)
        except CodecError as err:
            raise InvalidArgument(f"evaluate: {err}") from None
        if sequences.dim() != 2 or sequences.shape[1] < 2 or sequences.is_floating_point():
            raise InvalidArgument(
                f"evaluate: tokens must be an int tensor (N, T+1), got {list(sequences.shape)}"
            )
        vocab = job.replica.config.vocab_size
        if sequences.numel() and (int(sequences.min()) < 0 or int(sequences.max()) >= vocab):
            raise InvalidArgument(f"evaluate: token ids must be in [0, {vocab})")
        context_len = job.replica.config.block_size + 1
        if sequences.shape[1] > context_len:
            raise InvalidArgument(
                f"evaluate: sequences of {sequences.shape[1]} tokens exceed block_size + 1 = "
                f"{context_len}"
            )
        with self._lock:
            if self._training:
                raise FailedPrecondition("evaluate: an epoch is running on this worker")
            # Bounded by the caller's deadline and cancelled with it: a pull waiting for a
            # version that never comes must not hold this worker's lock.
            remaining = context.time_remaining()
            timeout = 600.0 if remaining is None else max(0.1, min(remaining, 600.0))
            context.add_callback(job.pool.cancel)
            version, values = job.pool.pull(request.min_version, timeout_s=timeout)
            job.replica.load(values)
            loss_sum, count = job.replica.evaluate(sequences)
        return worker_pb2.EvaluateResponse(loss_sum=loss_sum, tokens=count, version=version)

    def GetStatus(
        self, request: worker_pb2.WorkerStatusRequest, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        job = self._job
        return worker_pb2.WorkerStatus(
            worker_id=self.worker_id,
            job_id=job.job_id if job else "",
            device=str(self.device),
            training=self._training,
            step=job.step if job else 0,
            steps_done=self.steps_done,
        )
