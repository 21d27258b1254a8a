"""gRPC face of a worker: configure a replica, train epochs on leased data, evaluate.

Thin: the loop itself is `services/worker/trainer.py`; this file unpacks requests, builds
the trainer's collaborators (replica, `ServerPool`, `CoordinatorLeases`) and packs its step
results into `ProgressEvent`s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import torch

from lmps.core.errors import FailedPrecondition, InvalidArgument, NotFound
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.rpc.codec import CodecError
from lmps.services.worker.fragments import StreamingLoop
from lmps.services.worker.leases import CoordinatorLeases
from lmps.services.worker.local_steps import InnerLoop
from lmps.services.worker.metrics import WorkerMetrics
from lmps.services.worker.pool import ServerPool
from lmps.services.worker.replica import Replica, pick_device
from lmps.services.worker.trainer import StepResult, Trainer, check_eval_tokens
from lmps.v1 import coordinator_pb2_grpc, job_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("lmps.worker")


def _step_event(r: StepResult) -> job_pb2.StepEvent:
    return job_pb2.StepEvent(
        worker_id=r.worker_id,
        step=r.step,
        loss=r.loss,
        tokens=r.tokens,
        tokens_per_s=r.tokens_per_s,
        compute_s=r.compute_s,
        pull_s=r.pull_s,
        push_s=r.push_s,
        lease_id=r.lease_id,
        data_shard=r.data_shard,
        batch_index=r.batch_index,
        computed_at=r.computed_at,
        grad_norm=r.grad_norm,
    )


@dataclass
class _Job:
    job_id: str
    replica: Replica
    pool: ServerPool
    trainer: Trainer


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        worker_id: str,
        coordinator: str,
        device: str = "auto",
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.metrics = WorkerMetrics() if metrics is None else metrics
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
            # The spec is the coordinator's resolved one: total_steps is already set.
            local = codec.local_steps_from_proto(
                request.spec, int(request.spec.optimizer.total_steps) or 1
            )
            mode = codec.consistency_from_proto(request.spec.consistency)
            # The task's options, resolved once (the coordinator's spec is complete).
            settings = codec.job_settings_from_proto(
                request.spec, total_steps=int(request.spec.optimizer.total_steps) or 1
            )
            staleness = int(request.spec.max_staleness) if mode == "bounded_staleness" else 0
            with torch.random.fork_rng(devices=[]):
                replica = Replica(
                    config,
                    shards,
                    self.device,
                    task=settings.task,
                    micro_batches=settings.micro_batches,
                    autocast=settings.autocast,
                    freeze_backbone=settings.freeze_backbone,
                )
            inner = None
            streaming = None
            if local is not None:
                decay = {s.shard_id: s.weight_decay for s in shards}
                inner = InnerLoop(
                    replica, local.steps, local.inner, decay, max_grad_norm=settings.max_grad_norm
                )
                if local.fragments > 1:
                    fragment_of = {s.shard_id: s.fragment for s in shards}
                    streaming = StreamingLoop(
                        inner, fragment_of, local.fragments, overlap=local.overlap
                    )
            pool = ServerPool(
                request.job_id,
                self.worker_id,
                shards,
                {s.server_id: s.address for s in request.servers},
                wire_dtype=dtype,
                # Bounded staleness and ASYNC: the servers may answer a pull at different
                # versions.
                mixed_versions=staleness > 0 or mode == "async",
                compression=codec.compression_from_proto(request.spec.push_compression),
                # SYNC with max_grad_norm: each push is followed by its step's norm exchange.
                clip=settings.clip_on_servers,
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
            leases = CoordinatorLeases(self._coordinator, request.job_id, self.worker_id)
            trainer = Trainer(
                worker_id=self.worker_id,
                model=replica,
                params=pool,
                leases=leases,
                batch_size=request.spec.batch_size,
                local=inner,
                staleness=staleness,
                asynchronous=mode == "async",
                weigh=replica.task.weight,
                # ASYNC with max_grad_norm: the worker clips its own pushes.
                max_grad_norm=settings.max_grad_norm if mode == "async" else 0.0,
                streaming=streaming,
            )
            self._job = _Job(request.job_id, replica, pool, trainer)
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
        # A cancelled epoch must not leave pulls blocked on the barrier for minutes, not
        # even one made just after the cancellation (the trainer was between calls).
        generation = job.pool.begin()
        context.add_callback(lambda: job.pool.cancel(generation))
        try:
            for r in job.trainer.run_epoch(request.epoch, request.start_step, context.is_active):
                self.metrics.observe(r)
                self.steps_done += 1
                yield job_pb2.ProgressEvent(
                    job_id=job.job_id, epoch=request.epoch, step=_step_event(r)
                )
        finally:
            with self._lock:
                self._training = False
                self._lock.notify_all()

    def Evaluate(
        self, request: worker_pb2.EvaluateRequest, context: grpc.ServicerContext
    ) -> worker_pb2.EvaluateResponse:
        job = self._require(request.job_id)
        try:
            sequences = codec.decode(request.tokens)
        except CodecError as err:
            raise InvalidArgument(f"evaluate: {err}") from None
        check_eval_tokens(sequences, job.replica.config, job.replica.task)
        with self._lock:
            if self._training:
                raise FailedPrecondition("evaluate: an epoch is running on this worker")
            # Bounded by the caller's deadline and cancelled with it: a pull waiting for a
            # version that never comes must not hold this worker's lock.
            remaining = context.time_remaining()
            timeout = 600.0 if remaining is None else max(0.1, min(remaining, 600.0))
            generation = job.pool.begin()
            context.add_callback(lambda: job.pool.cancel(generation))
            version, values = job.pool.pull(request.min_version, timeout_s=timeout)
            job.replica.load(values)
            counts = job.replica.evaluate(sequences)
        confusion = [] if counts.confusion is None else counts.confusion.flatten().tolist()
        return worker_pb2.EvaluateResponse(
            loss_sum=counts.loss_sum, tokens=counts.count, version=version, confusion=confusion
        )

    def GetStatus(
        self, request: worker_pb2.WorkerStatusRequest, context: grpc.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        job = self._job
        return worker_pb2.WorkerStatus(
            worker_id=self.worker_id,
            job_id=job.job_id if job else "",
            device=str(self.device),
            training=self._training,
            step=job.trainer.step if job else 0,
            steps_done=self.steps_done,
        )
