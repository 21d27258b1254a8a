"""What the coordinator does with jobs: submit, run epochs, hand out data leases, export.

The coordinator of TF2 ParameterServerStrategy, as a service: it owns the job, the workers
only train what they are leased. The parts have their own rooms: `cluster.Cluster` (who is
alive), `placement.Placement` (deploy, checkpoint, restore, evaluate), `leases.LeaseDesk`
(one epoch's leases and barrier members) and `epoch.EpochRun` (one epoch, surviving lost
members). The driver speaks plain types; the servicer packs them into messages.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from lmps.core.errors import FailedPrecondition, InvalidArgument, LmpsError, NotFound
from lmps.core.model import GPTConfig, init_model
from lmps.core.partition import Shard
from lmps.core.settings import JobSettings, JobState, default_total_steps
from lmps.core.tasks import Evaluation, TaskName
from lmps.rpc import codec
from lmps.services.coordinator import checkpoint, jobs
from lmps.services.coordinator.cluster import Cluster
from lmps.services.coordinator.epoch import EpochRun
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.leases import DataLease
from lmps.services.coordinator.placement import Placement
from lmps.services.coordinator.registry import Registry, Role
from lmps.v1 import job_pb2, tensor_pb2

log = logging.getLogger("lmps.coordinator")

# Codes an epoch may end with and still be run again: members missing or lost, a client gone.
RETRYABLE = frozenset({"UNAVAILABLE", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED"})


@dataclass(frozen=True)
class ExportPlan:
    """A model export: the header's fields, then every shard's value at `version`."""

    job_id: str
    model: GPTConfig
    tokenizer_json: str
    shards: list[Shard]
    version: int
    values: Iterator[tensor_pb2.ShardTensor]  # the servers' Pull stream, passed through
    task: TaskName = "lm"
    labels: tuple[str, ...] = ()


def job_settings(spec: job_pb2.JobSpec, total_steps: int) -> JobSettings:
    """The one conversion of a submitted `JobSpec` (InvalidArgument naming the field)."""
    try:
        return codec.job_settings_from_proto(spec, total_steps=total_steps)
    except ValueError as err:  # CodecError too
        raise InvalidArgument(f"job spec: {err}") from None


def fails_for_good(err: Exception, context: grpc.ServicerContext) -> bool:
    """Whether an epoch's error FAILs the job: anything but a client that went away or a
    retryable code (UNAVAILABLE, ...), which running the epoch again may get past."""
    if not context.is_active():
        return False
    if isinstance(err, LmpsError):
        return err.code not in RETRYABLE
    if isinstance(err, grpc.RpcError):
        code = getattr(err, "code", None)
        return callable(code) and code().name not in RETRYABLE
    return True  # a bug here would meet the next epoch too


class Driver:
    def __init__(
        self, registry: Registry, state_dir: Path | None = None, keep_jobs: int = 0
    ) -> None:
        self.keep_jobs = keep_jobs  # newest jobs kept (`retire_old_jobs`); 0 = all
        self.fleet = Fleet()
        self.cluster = Cluster(registry=registry, fleet=self.fleet)
        self.state_dir = state_dir
        self.placement = Placement(cluster=self.cluster, fleet=self.fleet, jobs_dir=self.jobs_dir)
        self.jobs: dict[str, Job] = {}
        self.latest = ""
        self._lock = threading.Lock()
        if self.jobs_dir is not None:
            for job in jobs.load_all(self.jobs_dir):
                job.state = JobState.between_epochs(job.epochs_done, job.settings.epochs)
                self.jobs[job.job_id] = job
                self.latest = job.job_id
                log.info(
                    "recovered job %s at step %d (epochs done %d)",
                    job.job_id,
                    job.step,
                    job.epochs_done,
                )
            self.retire_old_jobs()  # a state dir from before --keep-jobs, or with a larger one

    @property
    def jobs_dir(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "jobs"

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id or self.latest)
        if job is None:
            if not job_id:
                raise NotFound("no job has been submitted")
            kept = f"the newest {self.keep_jobs}" if self.keep_jobs else "every job"
            raise NotFound(
                f"unknown job {job_id!r}: `lmps status` lists the jobs this coordinator has "
                f"(it keeps {kept}: --keep-jobs)"
            )
        return job

    def retire_old_jobs(self) -> None:
        """Forget all but the newest `keep_jobs` jobs, in memory and under the state dir, so
        that neither grows without bound. A job running an epoch is never forgotten."""
        if not self.keep_jobs:
            return
        with self._lock:
            old = list(self.jobs.values())[: -self.keep_jobs]  # oldest first (submit order)
            gone = [j.job_id for j in old if j.state != JobState.RUNNING]
            for job_id in gone:
                del self.jobs[job_id]
        if gone and self.jobs_dir is not None:
            checkpoint.remove_jobs(self.jobs_dir, gone)
        if gone:
            log.info("forgot jobs %s (--keep-jobs %d)", ", ".join(gone), self.keep_jobs)

    # -- submit ----------------------------------------------------------------------------

    def _check_idle(self) -> None:
        busy = [j.job_id for j in self.jobs.values() if j.state == JobState.RUNNING]
        if busy:
            raise FailedPrecondition(f"job {busy[0]} is running an epoch; submit after it ends")

    def submit(
        self,
        spec: job_pb2.JobSpec,
        train_tokens: torch.Tensor,
        eval_tokens: torch.Tensor,
        init: Mapping[str, torch.Tensor] | None = None,
    ) -> Job:
        # Twice through the one conversion: the default total_steps depends on the data,
        # which is checked against the spec's model first (the 1 is a stand-in).
        settings = job_settings(spec, total_steps=1)
        train, evals = jobs.to_splits(settings, train_tokens, eval_tokens)
        self._check_idle()
        workers_hint = settings.num_workers or max(1, len(self.cluster.heartbeating(Role.WORKER)))
        total = default_total_steps(
            settings.epochs,
            train.shape[0],
            settings.batch_size,
            workers_hint,
            batches_per_lease=settings.batches_per_lease,
            local_steps=settings.local_steps.steps if settings.local_steps else 1,
            consistency=settings.consistency,
            fragments=settings.local_steps.fragments if settings.local_steps else 1,
        )
        settings = job_settings(spec, total_steps=total)
        model = init_model(settings.model, settings.seed)
        params = {n: p.detach() for n, p in model.named_parameters()}
        if init:
            params = jobs.initial_params(model, init)
        job = Job(
            job_id=f"job-{uuid.uuid4().hex[:8]}",
            settings=settings,
            train=train,
            eval=evals,
            parameters=sum(p.numel() for p in params.values()),
            created=time.time(),
        )
        # Deploy marks the jobs it replaces on the servers (even when the load fails
        # halfway): they come back from their checkpoints when next used.
        self.placement.deploy(job, params, {}, version=0, wait_s=settings.wait_for_members_s)
        with self._lock:
            self.jobs[job.job_id] = job
            self.latest = job.job_id
        if self.jobs_dir is not None:
            jobs.save(self.jobs_dir, job)
            self.placement.checkpoint(job, 0, epoch=None, done={})
        self.retire_old_jobs()
        log.info(
            "job %s: %d parameters in %d shards on %s; workers %s; %d train / %d eval sequences",
            job.job_id,
            job.parameters,
            len(job.shards),
            sorted(job.servers),
            sorted(job.workers),
            train.shape[0],
            evals.shape[0],
        )
        return job

    # -- epochs ----------------------------------------------------------------------------

    def run_epoch(
        self, job_id: str, epoch_no: int, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.ProgressEvent]:
        job = self.job(job_id)
        with job.lock:
            if job.state == JobState.RUNNING:
                raise FailedPrecondition(f"job {job.job_id} is already running an epoch")
            if job.state == JobState.FAILED:
                raise FailedPrecondition(f"job {job.job_id} failed: {job.error}")
            if epoch_no != job.epochs_done:
                raise FailedPrecondition(
                    f"job {job.job_id} has finished {job.epochs_done} epochs; "
                    f"run epoch {job.epochs_done} next"
                )
            self.placement.ensure_loaded(job)
            job.state = JobState.RUNNING
        run = EpochRun(
            job=job,
            epoch_no=epoch_no,
            context=context,
            cluster=self.cluster,
            placement=self.placement,
            fleet=self.fleet,
        )
        try:
            yield from run.run()
        except Exception as err:
            if fails_for_good(err, context):
                log.error("job %s failed in epoch %d: %s", job.job_id, epoch_no, err)
                with job.lock:
                    job.state, job.error = JobState.FAILED, f"epoch {epoch_no}: {err}"
            raise
        finally:
            with job.lock:
                if job.state == JobState.RUNNING:
                    job.state = JobState.between_epochs(job.epochs_done, job.settings.epochs)
                job.epoch = None

    # -- leases ----------------------------------------------------------------------------

    def lease(self, job_id: str, worker_id: str, epoch: int) -> DataLease | None:
        """The worker's next data lease in `epoch`; None when it has none left."""
        job = self.job(job_id)
        with job.lock:
            if worker_id not in job.workers:
                raise NotFound(f"worker {worker_id!r} is not part of job {job.job_id}")
            desk = job.epoch
            if desk is None or desk.epoch != epoch or job.state != JobState.RUNNING:
                raise FailedPrecondition(f"epoch {epoch} of job {job.job_id} is not running")
            return desk.take(worker_id)

    def complete_lease(self, job_id: str, worker_id: str, lease_id: str) -> None:
        desk = self.job(job_id).epoch
        if desk is None:
            raise NotFound(f"unknown lease {lease_id!r}: no epoch is running")
        desk.complete(lease_id, worker_id)

    # -- evaluation, export ----------------------------------------------------------------

    def evaluate(self, job: Job) -> Evaluation:
        return self.placement.evaluate(job)

    def export(self, job: Job) -> ExportPlan:
        self.placement.ensure_loaded(job)
        with job.lock:
            if job.state == JobState.RUNNING:
                raise FailedPrecondition("export: an epoch is running; export between epochs")
            version = job.step
        return ExportPlan(
            job_id=job.job_id,
            model=job.settings.model,
            tokenizer_json=job.settings.tokenizer_json,
            shards=list(job.shards),
            version=version,
            values=self.fleet.pull(job.job_id, job.shards, job.servers, version),
            task=job.settings.task,
            labels=job.settings.labels,
        )
