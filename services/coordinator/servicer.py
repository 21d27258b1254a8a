"""gRPC face of the coordinator: unpack, call the registry or the driver, pack.

Thin, as the grpc examples' servicers: the driver speaks plain types (settings, leases,
export plans) and every message the coordinator answers with is packed here.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import torch

from lmps.core.errors import Aborted, InvalidArgument
from lmps.core.model import perplexity
from lmps.core.settings import JobState
from lmps.rpc import codec
from lmps.rpc.codec import CodecError
from lmps.services.coordinator.driver import Driver, ExportPlan
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.leases import DataLease
from lmps.services.coordinator.registry import Registry, Role
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2

_ROLES = {coordinator_pb2.PARAMETER_SERVER: Role.PS, coordinator_pb2.WORKER: Role.WORKER}
_ROLE_ENUM = {v: k for k, v in _ROLES.items()}
_STATES = {
    JobState.READY: coordinator_pb2.READY,
    JobState.RUNNING: coordinator_pb2.RUNNING,
    JobState.FAILED: coordinator_pb2.FAILED,
    JobState.COMPLETED: coordinator_pb2.COMPLETED,
}


def job_status(job: Job) -> coordinator_pb2.JobStatus:
    spec = codec.job_settings_to_proto(job.settings)
    spec.tokenizer_json = ""
    return coordinator_pb2.JobStatus(
        job_id=job.job_id,
        name=job.settings.name,
        state=_STATES[job.state],
        epochs_done=job.epochs_done,
        step=job.step,
        parameters=job.parameters,
        shards=len(job.shards),
        servers=sorted(job.servers),
        workers=sorted(job.workers),
        train_sequences=job.train.shape[0],
        eval_sequences=job.eval.shape[0],
        last_eval_loss=job.last_eval_loss,
        error=job.error,
        spec=spec,
    )


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, registry: Registry, driver: Driver) -> None:
        self.registry = registry
        self.driver = driver

    def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RegisterResponse:
        role = _ROLES.get(request.role)
        if role is None:
            raise InvalidArgument("register: role must be PARAMETER_SERVER or WORKER")
        member_id = self.registry.register(role, request.address, request.id, request.incarnation)
        return coordinator_pb2.RegisterResponse(
            id=member_id, heartbeat_interval_s=self.registry.heartbeat_s
        )

    def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        self.registry.heartbeat(request.id)
        return coordinator_pb2.HeartbeatResponse()

    def SubmitJob(
        self,
        request_iterator: Iterator[coordinator_pb2.SubmitJobRequest],
        context: grpc.ServicerContext,
    ) -> coordinator_pb2.SubmitJobResponse:
        first = next(request_iterator, None)
        if first is None or not first.HasField("spec"):
            raise InvalidArgument("submit: the first message must be a JobSpec")
        parts: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        init: dict[str, torch.Tensor] = {}
        for msg in request_iterator:
            if msg.HasField("init"):
                if msg.init.name in init:
                    raise InvalidArgument(f"submit: initial value of {msg.init.name!r} sent twice")
                try:
                    init[msg.init.name] = codec.decode(msg.init.value)
                except CodecError as err:
                    raise InvalidArgument(f"submit: {msg.init.name}: {err}") from None
                continue
            if not msg.HasField("data"):
                raise InvalidArgument("submit: only one JobSpec is allowed")
            if msg.data.split not in parts:
                raise InvalidArgument(
                    f"submit: split must be 'train' or 'eval', got {msg.data.split!r}"
                )
            try:
                t = codec.decode(msg.data.tokens)
            except CodecError as err:
                raise InvalidArgument(f"submit: {err}") from None
            if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64, torch.int16):
                raise InvalidArgument("submit: dataset parts must be 1-D integer token tensors")
            # Check the range before narrowing: 2**32 + k would wrap to k in int32. Only the
            # int32 range here: SFT rows carry negative values (not-a-target ids, padding);
            # each task checks its own layout and the vocabulary in `to_splits`.
            bounds = torch.iinfo(torch.int32)
            if t.numel() and (int(t.min()) < bounds.min or int(t.max()) > bounds.max):
                raise InvalidArgument("submit: dataset values must be int32, in [-2**31, 2**31)")
            parts[msg.data.split].append(t.to(torch.int32))
        if not context.is_active():
            raise Aborted("submit: the client cancelled the stream")
        train = torch.cat(parts["train"]) if parts["train"] else torch.empty(0, dtype=torch.int32)
        evals = torch.cat(parts["eval"]) if parts["eval"] else torch.empty(0, dtype=torch.int32)
        spec = first.spec
        if (spec.train_tokens, spec.eval_tokens) != (train.numel(), evals.numel()):
            raise InvalidArgument(
                f"submit: the stream carried {train.numel()} train and {evals.numel()} eval "
                f"tokens, the spec announced {spec.train_tokens} and {spec.eval_tokens} "
                "(a truncated upload?)"
            )
        job = self.driver.submit(first.spec, train, evals, init or None)
        return coordinator_pb2.SubmitJobResponse(job_id=job.job_id, status=job_status(job))

    def RunEpoch(
        self, request: coordinator_pb2.RunEpochRequest, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.ProgressEvent]:
        yield from self.driver.run_epoch(request.job_id, request.epoch, context)

    def LeaseData(
        self, request: coordinator_pb2.LeaseDataRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.LeaseDataResponse:
        lease = self.driver.lease(request.job_id, request.worker_id, request.epoch)
        if lease is None:
            return coordinator_pb2.LeaseDataResponse(done=True)
        return coordinator_pb2.LeaseDataResponse(lease=lease_to_proto(lease))

    def CompleteLease(
        self, request: coordinator_pb2.CompleteLeaseRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.CompleteLeaseResponse:
        self.driver.complete_lease(request.job_id, request.worker_id, request.lease_id)
        return coordinator_pb2.CompleteLeaseResponse()

    def GetShardMap(
        self, request: coordinator_pb2.GetShardMapRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ShardMap:
        job = self.driver.job(request.job_id)
        entries = []
        for sid, address in sorted(job.servers.items()):
            mine = [s for s in job.shards if s.server_id == sid]
            entries.append(
                coordinator_pb2.ServerEntry(
                    server_id=sid,
                    address=address,
                    bytes=sum(s.numel * 4 for s in mine),
                    shards=len(mine),
                )
            )
        return coordinator_pb2.ShardMap(
            job_id=job.job_id, shards=[codec.shard_to_proto(s) for s in job.shards], servers=entries
        )

    def GetClusterStatus(
        self, request: coordinator_pb2.ClusterStatusRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ClusterStatus:
        members = [
            coordinator_pb2.Member(
                id=rec.id,
                role=_ROLE_ENUM[rec.role],
                address=rec.address,
                last_seen_s=age,
                alive=alive,
                incarnation=rec.incarnation,
            )
            for rec, age, alive in self.registry.all()
        ]
        jobs = [job_status(j) for j in self.driver.jobs.values()]
        return coordinator_pb2.ClusterStatus(members=members, jobs=jobs)

    def GetJob(
        self, request: coordinator_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.JobStatus:
        return job_status(self.driver.job(request.job_id))

    def Evaluate(
        self, request: coordinator_pb2.EvaluateJobRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.EvaluateJobResponse:
        job = self.driver.job(request.job_id)
        e = self.driver.evaluate(job)
        return coordinator_pb2.EvaluateJobResponse(
            loss=e.loss,
            perplexity=perplexity(e.loss),
            tokens=e.count,
            version=e.version,
            accuracy=e.accuracy,
            macro_f1=e.macro_f1,
            confusion=e.confusion,
        )

    def ExportModel(
        self, request: coordinator_pb2.ExportModelRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.ExportModelResponse]:
        plan = self.driver.export(self.driver.job(request.job_id))
        yield from export_messages(plan)


def lease_to_proto(lease: DataLease) -> coordinator_pb2.DataLease:
    return coordinator_pb2.DataLease(
        lease_id=lease.lease_id,
        epoch=lease.epoch,
        data_shard=lease.data_shard,
        tokens=codec.encode(lease.tokens),
        batches=lease.batches,
        first_batch=lease.first_batch,
    )


def export_messages(plan: ExportPlan) -> Iterator[coordinator_pb2.ExportModelResponse]:
    yield coordinator_pb2.ExportModelResponse(
        header=coordinator_pb2.ExportHeader(
            job_id=plan.job_id,
            model=codec.model_to_proto(plan.model),
            tokenizer_json=plan.tokenizer_json,
            shards=[codec.shard_to_proto(s) for s in plan.shards],
            version=plan.version,
            task=codec.task_to_proto(plan.task),
            labels=list(plan.labels),
        )
    )
    for msg in plan.values:
        yield coordinator_pb2.ExportModelResponse(shard=msg)
