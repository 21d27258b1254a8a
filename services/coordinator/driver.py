"""What the coordinator does: submit jobs (init, partition, load servers, configure workers),
drive epochs, hand out data leases, evaluate and export. Talks to servers and workers."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from lmps import codec, wire
from lmps.channel import DEFAULT_TIMEOUT_S, open_channel
from lmps.codec import CodecError
from lmps.data import plan_data_shards, to_sequences
from lmps.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lmps.model import decay_mask, init_model
from lmps.partition import DEFAULT_SHARD_BYTES, ParamInfo, Shard, plan_shards, shard_view
from lmps.v1 import (
    coordinator_pb2,
    job_pb2,
    parameter_pb2,
    parameter_pb2_grpc,
    tensor_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from services.coordinator.jobs import Job
from services.coordinator.leases import EpochLeases
from services.coordinator.members import PS, WORKER, Registry

log = logging.getLogger("lmps.coordinator")
_T = TypeVar("_T")
_R = TypeVar("_R")

DEFAULT_BATCHES_PER_LEASE = 8
LONG_TIMEOUT_S = 24 * 3600.0  # an epoch stream may legitimately run for hours


@dataclass(frozen=True)
class _Done:
    worker_id: str
    error: BaseException | None


class Driver:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.jobs: dict[str, Job] = {}
        self.latest = ""
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fanout")

    # -- plumbing --------------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = open_channel(address)
            return ch

    def ps(self, address: str) -> parameter_pb2_grpc.ParameterServiceStub:
        return parameter_pb2_grpc.ParameterServiceStub(self._channel(address))

    def worker(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        return worker_pb2_grpc.WorkerServiceStub(self._channel(address))

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id or self.latest)
        if job is None:
            raise NotFound(f"unknown job {job_id!r}" if job_id else "no job has been submitted")
        return job

    def _fanout(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """Run fn over items in parallel; re-raise the first error."""
        futures = [self._pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    # -- submit ----------------------------------------------------------------------------

    def _wait_members(self, role: str, want: int, wait_s: float) -> list[tuple[str, str]]:
        deadline = time.monotonic() + wait_s
        while True:
            alive = [(r.id, r.address) for r in self.registry.alive(role)]
            if (want and len(alive) >= want) or (not want and alive):
                return alive[:want] if want else alive
            if time.monotonic() >= deadline:
                name = "parameter servers" if role == PS else "workers"
                cmd = "lmps serve ps" if role == PS else "lmps serve worker"
                raise Unavailable(
                    f"need {want or 1} {name}, {len(alive)} registered after {wait_s:.0f}s; "
                    f"start more with `{cmd} --coordinator <this address>`"
                )
            time.sleep(0.2)

    def _check_idle(self) -> None:
        busy = [j.job_id for j in self.jobs.values() if j.state == "RUNNING"]
        if busy:
            raise FailedPrecondition(f"job {busy[0]} is running an epoch; submit after it ends")

    def submit(
        self, spec: job_pb2.JobSpec, train_tokens: torch.Tensor, eval_tokens: torch.Tensor
    ) -> Job:
        try:
            config = wire.model_from_proto(spec.model)
            wire_dtype = codec.wire_dtype(spec.wire_dtype)
        except (ValueError, CodecError) as err:
            raise InvalidArgument(f"job spec: {err}") from None
        if not wire_dtype.is_floating_point:
            raise InvalidArgument("job spec: wire_dtype must be a float type")
        if spec.batch_size <= 0:
            raise InvalidArgument("job spec: batch_size must be > 0")
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
            wire.optimizer_from_proto(spec.optimizer)
        except ValueError as err:
            raise InvalidArgument(f"job spec: optimizer: {err}") from None
        spec.batches_per_lease = spec.batches_per_lease or DEFAULT_BATCHES_PER_LEASE
        spec.shard_bytes = spec.shard_bytes or DEFAULT_SHARD_BYTES
        wait_s = spec.wait_for_members_s or 60.0
        servers = dict(self._wait_members(PS, spec.num_servers, wait_s))
        workers = dict(self._wait_members(WORKER, spec.num_workers, wait_s))
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        model = init_model(config, int(spec.seed))
        params = dict(model.named_parameters())
        infos = [ParamInfo(n, tuple(p.shape), decay_mask(n, p)) for n, p in params.items()]
        shards = plan_shards(infos, sorted(servers), int(spec.shard_bytes))
        job = Job(
            job_id=job_id,
            spec=spec,
            config=config,
            shards=shards,
            servers=servers,
            workers=workers,
            train=train,
            eval=evals,
            parameters=sum(p.numel() for p in params.values()),
        )
        values = {s.shard_id: shard_view(params[s.param].data, s) for s in shards}
        self._load_servers(job, values, version=0)
        self._configure_workers(job)
        with self._lock:
            self.jobs[job_id] = job
            self.latest = job_id
        log.info(
            "job %s: %d parameters in %d shards on %s; workers %s; %d train / %d eval sequences",
            job_id,
            job.parameters,
            len(shards),
            sorted(servers),
            sorted(workers),
            train.shape[0],
            evals.shape[0],
        )
        return job

    def _load_servers(self, job: Job, values: dict[str, torch.Tensor], version: int) -> None:
        def load(server_id: str) -> None:
            mine = [s for s in job.shards if s.server_id == server_id]
            header = parameter_pb2.LoadHeader(
                job_id=job.job_id,
                optimizer=job.spec.optimizer,
                shards=[wire.shard_to_proto(s) for s in mine],
                members=sorted(job.workers),
                version=version,
                consistency=job.spec.consistency,
            )

            def messages() -> Iterator[parameter_pb2.LoadRequest]:
                yield parameter_pb2.LoadRequest(header=header)
                for s in mine:
                    yield parameter_pb2.LoadRequest(
                        shard=tensor_pb2.ShardTensor(
                            shard_id=s.shard_id,
                            version=version,
                            tensor=codec.encode(values[s.shard_id]),
                        )
                    )

            self.ps(job.servers[server_id]).Load(messages(), timeout=300.0, wait_for_ready=True)

        self._fanout(load, sorted(job.servers))

    def _configure_workers(self, job: Job) -> None:
        spec = job_pb2.JobSpec.FromString(job.spec.SerializeToString())
        spec.tokenizer_json = ""  # workers don't tokenize
        request = worker_pb2.ConfigureRequest(
            job_id=job.job_id,
            spec=spec,
            shards=[wire.shard_to_proto(s) for s in job.shards],
            servers=[
                worker_pb2.ServerAddress(server_id=k, address=v)
                for k, v in sorted(job.servers.items())
            ],
        )

        def configure(worker_id: str) -> None:
            self.worker(job.workers[worker_id]).Configure(
                request, timeout=300.0, wait_for_ready=True
            )

        self._fanout(configure, sorted(job.workers))

    # -- membership of the SYNC barrier ----------------------------------------------------

    def _set_members(self, job: Job, members: set[str], discard_pending: bool = False) -> None:
        """Tell every server which workers the barrier waits for. Caller holds job.lock."""
        job.active = set(members)
        request = parameter_pb2.SetMembersRequest(
            job_id=job.job_id, members=sorted(members), discard_pending=discard_pending
        )

        def send(address: str) -> None:
            self.ps(address).SetMembers(request, timeout=DEFAULT_TIMEOUT_S, wait_for_ready=True)

        self._fanout(send, list(job.servers.values()))

    # -- leases ----------------------------------------------------------------------------

    def lease(self, req: coordinator_pb2.LeaseDataRequest) -> coordinator_pb2.LeaseDataResponse:
        job = self.job(req.job_id)
        if req.worker_id not in job.workers:
            raise NotFound(f"worker {req.worker_id!r} is not part of job {job.job_id}")
        with job.lock:
            epoch = job.epoch
            if epoch is None or epoch.epoch != req.epoch:
                raise FailedPrecondition(f"epoch {req.epoch} of job {job.job_id} is not running")
            lease = epoch.take(req.worker_id)
            if lease is None:
                # Out of data: the barrier must stop waiting for this worker before we answer,
                # or the other workers' next step would wait for it forever.
                if req.worker_id in job.active:
                    self._set_members(job, job.active - {req.worker_id})
                return coordinator_pb2.LeaseDataResponse(done=True)
        ids = job.epoch_plan[lease.data_shard]
        tokens = job.train[ids]  # (batches * B, T+1)
        return coordinator_pb2.LeaseDataResponse(
            lease=coordinator_pb2.DataLease(
                lease_id=lease.lease_id,
                epoch=req.epoch,
                data_shard=lease.data_shard,
                tokens=codec.encode(tokens),
                batches=tokens.shape[0] // job.spec.batch_size,
            )
        )

    def complete_lease(self, req: coordinator_pb2.CompleteLeaseRequest) -> None:
        job = self.job(req.job_id)
        epoch = job.epoch
        if epoch is None:
            raise NotFound(f"unknown lease {req.lease_id!r}: no epoch is running")
        epoch.complete(req.lease_id, req.worker_id)

    # -- epochs ----------------------------------------------------------------------------

    def run_epoch(
        self, job_id: str, epoch_no: int, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.ProgressEvent]:
        job = self.job(job_id)
        with job.lock:
            if job.state == "RUNNING":
                raise FailedPrecondition(f"job {job.job_id} is already running an epoch")
            if job.state == "FAILED":
                raise FailedPrecondition(f"job {job.job_id} failed: {job.error}")
            job.state = "RUNNING"
            plan = plan_data_shards(
                job.train.shape[0],
                job.spec.batch_size,
                job.spec.batches_per_lease,
                int(job.spec.seed),
                epoch_no,
            )
            job.epoch_plan = plan
            job.epoch = EpochLeases(epoch_no, len(plan))
            # Start from where the servers are (an aborted epoch may have moved them on) and
            # drop any half-collected step it left behind.
            job.step = self._server_version(job)
            self._set_members(job, set(job.workers), discard_pending=True)
        try:
            yield from self._run_epoch(job, epoch_no, plan, context)
        finally:
            with job.lock:
                if job.state == "RUNNING":
                    job.state = "READY"

    def _run_epoch(
        self, job: Job, epoch_no: int, plan: list[torch.Tensor], context: grpc.ServicerContext
    ) -> Iterator[job_pb2.ProgressEvent]:
        start_step = job.step
        started = time.perf_counter()
        batches = sum(len(ids) for ids in plan) // job.spec.batch_size
        yield job_pb2.ProgressEvent(
            job_id=job.job_id,
            epoch=epoch_no,
            start=job_pb2.EpochStart(
                epoch=epoch_no,
                start_step=start_step,
                data_shards=len(plan),
                total_batches=batches,
                workers=sorted(job.workers),
            ),
        )
        events: queue.Queue[job_pb2.ProgressEvent | _Done] = queue.Queue()
        calls = {}
        request = worker_pb2.TrainEpochRequest(
            job_id=job.job_id, epoch=epoch_no, start_step=start_step
        )
        for wid, address in sorted(job.workers.items()):
            calls[wid] = self.worker(address).TrainEpoch(
                request, timeout=LONG_TIMEOUT_S, wait_for_ready=True
            )

        def relay(wid: str, call: Iterator[job_pb2.ProgressEvent]) -> None:
            try:
                for ev in call:
                    events.put(ev)
                events.put(_Done(wid, None))
            except BaseException as err:
                events.put(_Done(wid, err))

        threads = [
            threading.Thread(target=relay, args=(w, c), daemon=True) for w, c in calls.items()
        ]
        for t in threads:
            t.start()
        running = set(calls)
        losses: list[float] = []
        tokens = 0
        end_step = start_step
        try:
            while running:
                if not context.is_active():
                    raise FailedPrecondition("client went away")
                try:
                    ev = events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if isinstance(ev, _Done):
                    running.discard(ev.worker_id)
                    if ev.error is not None:
                        self._lose_worker(job, ev.worker_id, ev.error)
                    continue
                losses.append(ev.step.loss)
                tokens += ev.step.tokens
                end_step = max(end_step, ev.step.step + 1)
                yield ev
        finally:
            for c in calls.values():
                c.cancel()
        epoch = job.epoch
        assert epoch is not None
        if not epoch.finished:
            with job.lock:
                job.state = "FAILED"
                job.error = (
                    f"epoch {epoch_no} ended with unprocessed data shards (all workers lost?)"
                )
            raise Unavailable(job.error)
        with job.lock:
            job.step = self._server_version(job)
            job.epochs_done += 1
        loss, _, _ = self.evaluate(job)
        wall = time.perf_counter() - started
        job.last_eval_loss = loss
        yield job_pb2.ProgressEvent(
            job_id=job.job_id,
            epoch=epoch_no,
            summary=job_pb2.EpochSummary(
                epoch=epoch_no,
                start_step=start_step,
                end_step=job.step,
                train_loss=sum(losses) / len(losses) if losses else math.nan,
                eval_loss=loss,
                eval_perplexity=math.exp(min(loss, 700.0)),
                tokens=tokens,
                wall_s=wall,
                tokens_per_s=tokens / wall if wall > 0 else 0.0,
                data_shards_completed=len(epoch.completed),
                batches=len(losses),
            ),
        )

    def _lose_worker(self, job: Job, worker_id: str, error: BaseException) -> None:
        """A worker's stream broke: stop waiting for it and give its data to the others."""
        log.warning("worker %s lost during epoch: %s", worker_id, error)
        with job.lock:
            if job.epoch is not None:
                requeued = job.epoch.release_worker(worker_id)
                if requeued:
                    log.warning("re-queued data shards %s of %s", requeued, worker_id)
            if worker_id in job.active:
                self._set_members(job, job.active - {worker_id})

    def _server_version(self, job: Job) -> int:
        def version(address: str) -> int:
            resp = self.ps(address).ListShards(
                parameter_pb2.ListShardsRequest(job_id=job.job_id), timeout=DEFAULT_TIMEOUT_S
            )
            return int(resp.version)

        versions = set(self._fanout(version, list(job.servers.values())))
        if len(versions) != 1:
            raise Unavailable(f"parameter servers disagree on the version: {sorted(versions)}")
        return int(versions.pop())

    # -- evaluation and export -------------------------------------------------------------

    def evaluate(self, job: Job) -> tuple[float, int, int]:
        """(mean loss, tokens, version) on the eval split, spread over the workers."""
        if job.eval.shape[0] == 0:
            return math.nan, 0, job.step
        workers = sorted(job.workers.items())
        parts = [p for p in torch.tensor_split(job.eval, len(workers)) if p.shape[0]]

        def run(i: int) -> worker_pb2.EvaluateResponse:
            _, address = workers[i]
            resp: worker_pb2.EvaluateResponse = self.worker(address).Evaluate(
                worker_pb2.EvaluateRequest(
                    job_id=job.job_id, tokens=codec.encode(parts[i]), min_version=job.step
                ),
                timeout=600.0,
                wait_for_ready=True,
            )
            return resp

        results = self._fanout(run, list(range(len(parts))))
        loss_sum = sum(r.loss_sum for r in results)
        count = sum(r.tokens for r in results)
        version = min(r.version for r in results)
        return loss_sum / max(count, 1), count, version

    def export(self, job: Job) -> Iterator[coordinator_pb2.ExportModelResponse]:
        with job.lock:
            if job.state == "RUNNING":
                raise FailedPrecondition("export: an epoch is running; export between epochs")
            version = job.step
        yield coordinator_pb2.ExportModelResponse(
            header=coordinator_pb2.ExportHeader(
                job_id=job.job_id,
                model=job.spec.model,
                tokenizer_json=job.spec.tokenizer_json,
                shards=[wire.shard_to_proto(s) for s in job.shards],
                version=version,
            )
        )
        for address in sorted(job.servers.values()):
            stream = self.ps(address).Pull(
                parameter_pb2.PullRequest(job_id=job.job_id, min_version=version),
                timeout=600.0,
                wait_for_ready=True,
            )
            for msg in stream:
                yield coordinator_pb2.ExportModelResponse(shard=msg)


def shards_by_server(shards: Sequence[Shard]) -> dict[str, list[Shard]]:
    out: dict[str, list[Shard]] = {}
    for s in shards:
        out.setdefault(s.server_id, []).append(s)
    return out
