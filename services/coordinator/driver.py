"""What the coordinator does with jobs: submit (init, partition, load servers, configure
workers), checkpoint and restore (re-sharding to the servers at hand), hand out data
leases, evaluate and export. Epochs themselves are run by `epoch.EpochRun`."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import torch

from lmps.core.data import to_sequences
from lmps.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lmps.core.model import GPT, decay_mask, init_model
from lmps.core.partition import DEFAULT_SHARD_BYTES, ParamInfo, assemble, plan_shards
from lmps.rpc import codec
from lmps.rpc.codec import CodecError
from lmps.services.coordinator import checkpoint, jobs
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.registry import PS, WORKER, Registry
from lmps.v1 import coordinator_pb2, job_pb2

log = logging.getLogger("lmps.coordinator")

DEFAULT_BATCHES_PER_LEASE = 8
DEFAULT_KEEP_CHECKPOINTS = 3


class Driver:
    def __init__(self, registry: Registry, state_dir: Path | None = None) -> None:
        self.registry = registry
        self.fleet = Fleet()
        self.state_dir = state_dir
        self.jobs: dict[str, Job] = {}
        self.latest = ""
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()  # one writer at a time, versions never go back
        if state_dir is not None:
            for job in jobs.load_all(self.jobs_dir):
                self.jobs[job.job_id] = job
                self.latest = job.job_id
                log.info(
                    "recovered job %s at step %d (epochs done %d)",
                    job.job_id,
                    job.step,
                    job.epochs_done,
                )

    @property
    def jobs_dir(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "jobs"

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id or self.latest)
        if job is None:
            raise NotFound(f"unknown job {job_id!r}" if job_id else "no job has been submitted")
        return job

    # -- members ---------------------------------------------------------------------------

    def wait_members(self, role: str, want: int, wait_s: float) -> dict[str, str]:
        """`want` alive members of `role` (0 = all, at least one), sorted by id. Alive means
        heartbeating and answering a health check now (a dead member heartbeats no more, but
        stays in the registry until its heartbeats expire)."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = [
                (r.id, r.address)
                for r in self.registry.alive(role)
                if self.fleet.reachable(r.address)
            ]
            if (want and len(alive) >= want) or (not want and alive):
                return dict(alive[:want] if want else alive)
            if time.monotonic() >= deadline:
                name = "parameter servers" if role == PS else "workers"
                cmd = "lmps serve ps" if role == PS else "lmps serve worker"
                raise Unavailable(
                    f"need {want or 1} {name}, {len(alive)} registered after {wait_s:.0f}s; "
                    f"start more with `{cmd} --coordinator <this address>`"
                )
            time.sleep(0.2)

    def incarnations(self, ids: Mapping[str, str]) -> dict[str, str]:
        out = {}
        for member_id in ids:
            rec = self.registry.find(member_id)
            out[member_id] = rec.incarnation if rec else ""
        return out

    def lost_servers(self, job: Job, probe: bool = True) -> set[str]:
        """Servers of the job that are dead, restarted (state gone) or, with `probe`,
        not answering a health check now."""
        lost = set()
        for server_id, incarnation in job.server_epochs.items():
            rec = self.registry.find(server_id)
            if (
                rec is None
                or not self.registry.is_alive(server_id)
                or rec.incarnation != incarnation
                or (probe and not self.fleet.reachable(job.servers[server_id]))
            ):
                lost.add(server_id)
        return lost

    def servers_intact(self, job: Job, probe: bool = True) -> bool:
        """Every server of the job alive and still the process we loaded."""
        return not self.lost_servers(job, probe)

    # -- submit ----------------------------------------------------------------------------

    def _check_idle(self) -> None:
        busy = [j.job_id for j in self.jobs.values() if j.state == "RUNNING"]
        if busy:
            raise FailedPrecondition(f"job {busy[0]} is running an epoch; submit after it ends")

    def submit(
        self,
        spec: job_pb2.JobSpec,
        train_tokens: torch.Tensor,
        eval_tokens: torch.Tensor,
        init: Mapping[str, torch.Tensor] | None = None,
    ) -> Job:
        try:
            config = codec.model_from_proto(spec.model)
            wire_dtype = codec.wire_dtype(spec.wire_dtype)
        except (ValueError, CodecError) as err:
            raise InvalidArgument(f"job spec: {err}") from None
        if not wire_dtype.is_floating_point:
            raise InvalidArgument("job spec: wire_dtype must be a float type")
        if spec.batch_size <= 0:
            raise InvalidArgument("job spec: batch_size must be > 0")
        if not (math.isfinite(spec.wait_for_members_s) and 0 <= spec.wait_for_members_s <= 3600):
            raise InvalidArgument("job spec: wait_for_members_s must be in [0, 3600] seconds")
        if spec.replication > 2:
            raise InvalidArgument("job spec: replication must be 1 or 2")
        for name, tokens in (("train", train_tokens), ("eval", eval_tokens)):
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size):
                raise InvalidArgument(f"{name} data has token ids outside [0, {config.vocab_size})")
        train = to_sequences(train_tokens, config.block_size)
        evals = to_sequences(eval_tokens, config.block_size)
        if train.shape[0] < spec.batch_size:
            raise InvalidArgument(
                f"train split has {train.shape[0]} sequences of {config.block_size + 1} tokens, "
                f"fewer than one batch of {spec.batch_size}"
            )
        self._check_idle()
        spec = job_pb2.JobSpec.FromString(spec.SerializeToString())
        if not spec.optimizer.total_steps:
            batches = train.shape[0] // spec.batch_size
            workers_hint = spec.num_workers or max(1, len(self.registry.alive(WORKER)))
            spec.optimizer.total_steps = max(1, spec.epochs) * math.ceil(batches / workers_hint)
        try:
            codec.optimizer_from_proto(spec.optimizer)
        except ValueError as err:
            raise InvalidArgument(f"job spec: optimizer: {err}") from None
        spec.batches_per_lease = spec.batches_per_lease or DEFAULT_BATCHES_PER_LEASE
        spec.shard_bytes = spec.shard_bytes or DEFAULT_SHARD_BYTES
        model = init_model(config, int(spec.seed))
        params = {n: p.detach() for n, p in model.named_parameters()}
        if init:
            params = _initial_params(model, init)
        job = Job(
            job_id=f"job-{uuid.uuid4().hex[:8]}",
            spec=spec,
            config=config,
            train=train,
            eval=evals,
            parameters=sum(p.numel() for p in params.values()),
            created=time.time(),
        )
        try:
            self.deploy(job, params, {}, version=0, wait_s=spec.wait_for_members_s or 60.0)
        except BaseException:
            # Some servers may already hold the refused job: the others' state there is gone,
            # so they come back from their checkpoints when next used.
            for other in self.jobs.values():
                other.needs_restore = self.state_dir is not None
            raise
        with self._lock:
            self.jobs[job.job_id] = job
            self.latest = job.job_id
        if self.state_dir is not None:
            jobs.save(self.jobs_dir, job)
            self.checkpoint(job, 0, epoch=None, done={})
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

    def deploy(
        self,
        job: Job,
        params: Mapping[str, torch.Tensor],
        state: Mapping[str, Mapping[str, torch.Tensor]],
        version: int,
        wait_s: float,
    ) -> None:
        """Partition `params` (full tensors) over the servers at hand and load them, then
        configure the workers. Used for new jobs and for restores (re-sharding)."""
        servers = self.wait_members(PS, job.spec.num_servers, wait_s)
        workers = self.wait_members(WORKER, job.spec.num_workers, wait_s)
        infos = [ParamInfo(n, tuple(t.shape), decay_mask(n, t)) for n, t in params.items()]
        replication = job.spec.replication or 1
        if replication > len(servers):
            raise Unavailable(f"replication {replication} needs {replication} parameter servers")
        try:
            shards = plan_shards(infos, sorted(servers), int(job.spec.shard_bytes), replication)
        except ValueError as err:
            raise InvalidArgument(f"job spec: {err}") from None
        values, states = checkpoint.scatter_state(shards, params, state)
        self.fleet.load(
            job.job_id,
            job.spec,
            shards,
            servers,
            sorted(workers),
            version,
            values,
            states if state else None,
        )
        self.fleet.configure(job.job_id, job.spec, shards, servers, workers)
        job.shards, job.servers, job.workers = shards, servers, workers
        job.server_epochs = self.incarnations(servers)
        job.active = set(workers)
        job.step = version

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(
        self, job: Job, version: int, epoch: int | None, done: Mapping[int, int]
    ) -> Path | None:
        """Write a consistent checkpoint of `version` (fetched from every server)."""
        if self.state_dir is None:
            return None
        with self._checkpoint_lock:
            return self._checkpoint(job, version, epoch, done)

    def _checkpoint(
        self, job: Job, version: int, epoch: int | None, done: Mapping[int, int]
    ) -> Path:
        assert self.state_dir is not None
        latest = checkpoint.latest(self.jobs_dir, job.job_id)
        if latest is not None and checkpoint.version_of(latest) > version:
            raise FailedPrecondition(f"checkpoint {version} is older than {latest.name}")
        values, states = self.fleet.snapshot(job.job_id, job.servers, version, timeout_s=120.0)
        params = assemble(job.shards, values)
        state = checkpoint.gather_state(job.shards, states) if states else {}
        manifest = {
            "epochs_done": job.epochs_done,
            "epoch": epoch,
            "done": {str(k): v for k, v in done.items()},
            "last_eval_loss": None if math.isnan(job.last_eval_loss) else job.last_eval_loss,
            "servers": sorted(job.servers),
            "shard_bytes": int(job.spec.shard_bytes),
        }
        path = checkpoint.write(self.jobs_dir, job.job_id, version, params, state, manifest)
        checkpoint.prune(
            self.jobs_dir, job.job_id, job.spec.keep_checkpoints or DEFAULT_KEEP_CHECKPOINTS
        )
        log.info("checkpoint %s", path)
        return path

    def restore(self, job: Job, wait_s: float = 300.0) -> int:
        """Load the latest checkpoint into the servers at hand. Returns its version."""
        if self.state_dir is None:
            raise FailedPrecondition("no --state-dir: this coordinator keeps no checkpoints")
        path = checkpoint.latest(self.jobs_dir, job.job_id)
        if path is None:
            raise FailedPrecondition(f"job {job.job_id} has no checkpoint to restore")
        ckpt = checkpoint.read(path)
        self.deploy(job, ckpt.params, ckpt.state, ckpt.version, wait_s)
        jobs.apply_manifest(job, ckpt.manifest)
        job.needs_restore = False
        log.info("job %s restored from %s onto %s", job.job_id, path, sorted(job.servers))
        return ckpt.version

    def ensure_loaded(self, job: Job) -> None:
        with job.lock:
            if job.needs_restore:
                self.restore(job, wait_s=job.spec.wait_for_members_s or 60.0)

    # -- leases ----------------------------------------------------------------------------

    def lease(self, req: coordinator_pb2.LeaseDataRequest) -> coordinator_pb2.LeaseDataResponse:
        job = self.job(req.job_id)
        with job.lock:
            if req.worker_id not in job.workers:
                raise NotFound(f"worker {req.worker_id!r} is not part of job {job.job_id}")
            epoch = job.epoch
            if epoch is None or epoch.epoch != req.epoch or job.state != "RUNNING":
                raise FailedPrecondition(f"epoch {req.epoch} of job {job.job_id} is not running")
            lease = epoch.take(req.worker_id)
            if lease is None:
                # Out of data: the barrier must stop waiting for this worker before we answer,
                # or the other workers' next step would wait for it forever.
                if req.worker_id in job.active:
                    job.active = job.active - {req.worker_id}
                    self.fleet.set_members(job.job_id, job.servers, job.active)
                return coordinator_pb2.LeaseDataResponse(done=True)
        batch = job.spec.batch_size
        ids = job.epoch_plan[lease.data_shard][lease.first_batch * batch :]
        tokens = job.train[ids]  # (batches * B, T+1)
        return coordinator_pb2.LeaseDataResponse(
            lease=coordinator_pb2.DataLease(
                lease_id=lease.lease_id,
                epoch=req.epoch,
                data_shard=lease.data_shard,
                tokens=codec.encode(tokens),
                batches=tokens.shape[0] // batch,
                first_batch=lease.first_batch,
            )
        )

    def complete_lease(self, req: coordinator_pb2.CompleteLeaseRequest) -> None:
        job = self.job(req.job_id)
        epoch = job.epoch
        if epoch is None:
            raise NotFound(f"unknown lease {req.lease_id!r}: no epoch is running")
        epoch.complete(req.lease_id, req.worker_id)

    # -- epochs, evaluation, export ------------------------------------------------------

    def run_epoch(
        self, job_id: str, epoch_no: int, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.ProgressEvent]:
        from lmps.services.coordinator.epoch import EpochRun

        job = self.job(job_id)
        with job.lock:
            if job.state == "RUNNING":
                raise FailedPrecondition(f"job {job.job_id} is already running an epoch")
            if job.state == "FAILED":
                raise FailedPrecondition(f"job {job.job_id} failed: {job.error}")
            if epoch_no != job.epochs_done:
                raise FailedPrecondition(
                    f"job {job.job_id} has finished {job.epochs_done} epochs; "
                    f"run epoch {job.epochs_done} next"
                )
            self.ensure_loaded(job)
            job.state = "RUNNING"
        try:
            yield from EpochRun(self, job, epoch_no, context).run()
        finally:
            with job.lock:
                if job.state == "RUNNING":
                    job.state = "READY"
                job.epoch = None

    def evaluate(self, job: Job) -> tuple[float, int, int]:
        """(mean loss, tokens, version) on the eval split, spread over the workers."""
        self.ensure_loaded(job)
        if job.eval.shape[0] == 0:
            return math.nan, 0, job.step
        workers = {w: a for w, a in job.workers.items() if self.registry.is_alive(w)} or job.workers
        loss_sum, count, version = self.fleet.evaluate(job.job_id, workers, job.eval, job.step)
        return loss_sum / max(count, 1), count, version

    def export(self, job: Job) -> Iterator[coordinator_pb2.ExportModelResponse]:
        self.ensure_loaded(job)
        with job.lock:
            if job.state == "RUNNING":
                raise FailedPrecondition("export: an epoch is running; export between epochs")
            version = job.step
        yield coordinator_pb2.ExportModelResponse(
            header=coordinator_pb2.ExportHeader(
                job_id=job.job_id,
                model=job.spec.model,
                tokenizer_json=job.spec.tokenizer_json,
                shards=[codec.shard_to_proto(s) for s in job.shards],
                version=version,
            )
        )
        for msg in self.fleet.pull(job.job_id, job.shards, job.servers, version):
            yield coordinator_pb2.ExportModelResponse(shard=msg)


def _initial_params(model: GPT, init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate fine-tuning weights against the model: same names, same shapes, finite."""
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(init))
    extra = sorted(set(init) - set(expected))
    if missing or extra:
        raise InvalidArgument(f"init: parameters missing {missing[:3]}, unexpected {extra[:3]}")
    out = {}
    for name, p in expected.items():
        t = init[name]
        if tuple(t.shape) != tuple(p.shape) or not t.is_floating_point():
            raise InvalidArgument(
                f"init: {name} must be float {tuple(p.shape)}, got {t.dtype} {tuple(t.shape)}"
            )
        t32 = t.to(torch.float32)  # check after the cast: 1e39 in fp64 becomes Inf here
        if not bool(torch.isfinite(t32).all()):
            raise InvalidArgument(f"init: {name} has NaN or Inf (in float32)")
        out[name] = t32
    return out
