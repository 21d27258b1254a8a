"""One epoch of one job, surviving lost workers and lost parameter servers.

The coordinator loop of TF2 ParameterServerStrategy, for SYNC training over a parameter
server (Parameter Server, OSDI'14), and its siblings (bounded staleness keeps SYNC's leases;
ASYNC has `leases.AsyncLeaseDesk` and the branches marked `# ASYNC:`). An attempt runs in
phases: plan (workers, data shards, leases, the servers' version), start (one TrainEpoch
stream per worker), relay (merge their events, checkpoint mid-epoch, drop and admit
workers: streams.py) and finish (eval, checkpoint, summary); a client that goes away stops
the epoch at a step boundary (stop.py). A parameter server that dies or restarts takes its
shards' state with it: with replication the backups take over (failover); without, the
epoch rolls back to the latest checkpoint once enough servers are back, and carries on.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Iterator

import grpc

from lmps.core.data import plan_data_shards
from lmps.core.errors import LmpsError, Unavailable
from lmps.core.model import perplexity
from lmps.services.coordinator.cluster import Cluster
from lmps.services.coordinator.fleet import Diverged, Fleet
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.leases import DESKS, AsyncLeaseDesk
from lmps.services.coordinator.placement import Placement
from lmps.services.coordinator.registry import Role
from lmps.services.coordinator.stop import EpochStop
from lmps.services.coordinator.streams import (
    Attempt,
    Done,
    ServerLost,
    ServersLost,
    Totals,
    WorkerStreams,
)
from lmps.v1 import job_pb2

log = logging.getLogger("lmps.epoch")
RECOVERY_WAIT_S = 600.0  # how long a rolled-back epoch waits for servers to come back


class EpochRun:
    def __init__(
        self,
        *,
        job: Job,
        epoch_no: int,
        context: grpc.ServicerContext,
        cluster: Cluster,
        placement: Placement,
        fleet: Fleet,
    ) -> None:
        self.job, self.epoch_no, self.context = job, epoch_no, context
        self.cluster, self.placement, self.fleet = cluster, placement, fleet
        self.totals = Totals()
        self.started = time.perf_counter()
        self.start_step = job.step
        self.batches_before = 0  # of this epoch, in the parameters before it (re)started
        # Batches an interrupted run of this epoch trained past its stop (trained again now).
        self.redone_before = job.resume.redone if job.resume else 0
        if job.resume and job.resume.epoch != epoch_no:
            self.redone_before = 0

    # -- the whole epoch, with failovers and rollbacks -------------------------------------

    def run(self) -> Iterator[job_pb2.ProgressEvent]:
        first = True
        while True:
            try:
                yield from self._attempt(first)
                return
            except ServerLost as lost:
                first = False
                reached = self.job.step
                desk = self.job.epoch  # the failed attempt's
                dead = self.placement.failover(self.job, self.epoch_no)
                if dead:
                    self.totals.failovers += 1
                    self.totals.servers_lost += dead
                    if desk is not None:  # it resumes at the survivors' version, job.step
                        self.totals.unreported += desk.unreported
                        self.redone_before += desk.book.redone_batches
                        self.redone_before += desk.unapplied(self.job.step)
                    log.warning("epoch %d: %s; backups took over", self.epoch_no, lost)
                    continue
                log.warning(
                    "epoch %d: %s; rolling back to the last checkpoint", self.epoch_no, lost
                )
                # As many servers as the job had, registered and answering (maybe new ones).
                self.cluster.wait_back(
                    Role.PS,
                    self.job.settings.num_servers or len(self.job.servers),
                    RECOVERY_WAIT_S,
                    gone=lambda: not self.context.is_active(),
                )
                version = self.placement.restore(self.job, wait_s=RECOVERY_WAIT_S)
                self.totals.restores += 1
                self.totals.steps_lost += max(0, reached - version)

    # -- one attempt, in phases ------------------------------------------------------------

    def _attempt(self, first: bool) -> Iterator[job_pb2.ProgressEvent]:
        a = self._plan()
        if first:
            self.start_step = a.start_step
            self.batches_before = sum(a.desk.shard_batches) - a.desk.remaining
        yield self._start_event(a)
        streams = WorkerStreams(
            job=self.job,
            epoch_no=self.epoch_no,
            attempt=a,
            totals=self.totals,
            cluster=self.cluster,
            placement=self.placement,
            fleet=self.fleet,
        )
        streams.start()
        stopped = False
        try:
            yield from self._relay(a, streams)
        except BaseException:  # GeneratorExit too: grpc drops the stream of a gone client
            stopped = not self.context.is_active()
            if stopped:
                self._stop().at_step_boundary(a, streams)
            raise
        finally:
            streams.close()
            if a.checkpointing is not None:
                a.checkpointing.join(timeout=120)
            if stopped:
                self._stop().settle(a)
        if not a.desk.finished:
            raise Unavailable(
                f"epoch {self.epoch_no}: data shards left but no worker to train them"
            )
        try:
            summary = self._finish(a)
        except (grpc.RpcError, LmpsError) as err:
            if self.cluster.servers_intact(self.job) and not isinstance(err, Diverged):
                raise
            raise ServerLost(
                f"a parameter server was lost at the end of the epoch: {err}"
            ) from None
        yield summary

    def _plan(self) -> Attempt:
        """Workers configured, data shards planned and leased out (resuming what a
        checkpoint says is done), the barrier opened at the servers' common version."""
        job, s = self.job, self.job.settings
        plan = plan_data_shards(
            job.train.shape[0], s.batch_size, s.batches_per_lease, s.seed, self.epoch_no
        )
        done = job.resume.done_in(self.epoch_no) if job.resume else {}
        self.cluster.wait_rejoin(job, gone=lambda: not self.context.is_active())
        self.placement.refresh_workers(job, self.epoch_no)
        desk = DESKS[s.consistency](  # ASYNC: AsyncLeaseDesk
            job_id=job.job_id,
            epoch=self.epoch_no,
            plan=plan,
            train=job.train,
            batch_size=s.batch_size,
            workers=sorted(job.workers),
            done=done,
            servers=job.servers,
            barrier=self.fleet,
            # Local steps: a worker pushes once a round of H batches (DiLoCo); with F
            # fragments once a window of H / F, and ends each lease with F - 1 flushes.
            per_push=s.local_steps.window if s.local_steps else 1,
            flushes=s.local_steps.fragments - 1 if s.local_steps else 0,
        )
        with job.lock:
            job.epoch = desk
            # Start from where the servers are and drop any half-collected step. Servers at
            # different versions (an epoch cancelled between a worker's pushes to two of
            # them) hold a half-applied step: roll back to the last checkpoint instead.
            try:
                # SYNC: every server stands at one common version made of the same steps.
                # ASYNC: of the same pushes (in any order), once every push reached every
                # server; one cut off between two of them leaves them apart: a rollback.
                job.step = self.fleet.version(job.job_id, job.servers)
            except Unavailable as err:
                raise ServerLost(str(err)) from None
            # SYNC: the active set = the barrier's members; discard_pending at attempt start.
            desk.open(sorted(job.workers), at=job.step)
        every = s.checkpoint_every
        next_ckpt = (job.step // every + 1) * every if every else 0
        return Attempt(desk, job.step, every, next_ckpt)

    def _start_event(self, a: Attempt) -> job_pb2.ProgressEvent:
        remaining = a.desk.remaining
        return job_pb2.ProgressEvent(
            job_id=self.job.job_id,
            epoch=self.epoch_no,
            start=job_pb2.EpochStart(
                epoch=self.epoch_no,
                start_step=a.start_step,
                data_shards=len(a.desk.plan),
                total_batches=remaining,
                workers=sorted(self.job.workers),
                batches_done=sum(a.desk.shard_batches) - remaining,
            ),
        )

    def _relay(self, a: Attempt, streams: WorkerStreams) -> Iterator[job_pb2.ProgressEvent]:
        """Pass the workers' step events on until every stream has ended."""
        while a.calls:
            if not self.context.is_active():
                raise Unavailable("client went away")
            try:
                ev = a.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(ev, ServersLost):
                raise ServerLost(ev.reason)
            if isinstance(ev, Done):
                streams.ended(ev)
                continue
            self._record(a, ev.step)
            self._maybe_checkpoint(a)
            yield ev

    def _record(self, a: Attempt, step: job_pb2.StepEvent) -> None:
        a.desk.record(step.lease_id, step.batch_index, step.step)
        a.last_step[step.worker_id] = step.step
        self.totals.losses.append(step.loss)
        self.totals.tokens += step.tokens
        # SYNC: step s makes version s + 1. ASYNC: every server holds the push from s + 1 on.
        self.job.step = max(self.job.step, step.step + 1)

    def _stop(self) -> EpochStop:
        return EpochStop(
            job=self.job,
            epoch_no=self.epoch_no,
            fleet=self.fleet,
            placement=self.placement,
            redone_before=self.redone_before,
            record=self._record,
        )

    def _maybe_checkpoint(self, a: Attempt) -> None:
        """Checkpoint version `next_checkpoint` once it is whole, in the background."""
        if isinstance(a.desk, AsyncLeaseDesk):
            self._maybe_checkpoint_async(a, a.desk)
            return
        # SYNC: version v is whole once every active worker has pushed its step v - 1 (with
        # local steps a round's events come once its push is in: any of them says so; with
        # fragments a flush has no events, so a later push's event says it).
        active = set(a.desk.active)
        every, target = a.checkpoint_every, a.next_checkpoint
        if not (every and active and all(a.last_step.get(w, -1) >= target - 1 for w in active)):
            return
        if a.checkpointing is None or not a.checkpointing.is_alive():
            done = a.desk.progress(target)
            a.checkpointing = self.placement.checkpoint_async(
                self.job, target, self.epoch_no, done, redone=self.redone_before
            )
        a.next_checkpoint += every

    def _maybe_checkpoint_async(self, a: Attempt, desk: AsyncLeaseDesk) -> None:
        """ASYNC: version v is whole once all v - start pushes that made it have reported:
        a reported push with step < v is among the first v on every server, so when there
        are v - start of them they are exactly the pushes every server's snapshot at v holds
        (the same pushes, each server in its own order), and `progress(v)` says which
        batches they are. A version that never gets there (a push in it whose event never
        comes, or servers that took different pushes as their v-th) is passed over once a
        server is past the next multiple, whose snapshot replaces the one at v."""
        every = a.checkpoint_every
        while every:
            target = a.next_checkpoint
            if desk.reported_below(target) == target - a.start_step:
                if a.checkpointing is None or not a.checkpointing.is_alive():
                    done = desk.progress(target)
                    a.checkpointing = self.placement.checkpoint_async(
                        self.job, target, self.epoch_no, done, redone=self.redone_before
                    )
            elif desk.highest < target + every:
                return  # pushes in `target` are still on their way
            else:
                log.info(
                    "epoch %d: no checkpoint at %d: it never became whole", self.epoch_no, target
                )
            a.next_checkpoint += every

    def _finish(self, a: Attempt) -> job_pb2.ProgressEvent:
        job, t = self.job, self.totals
        with job.lock:
            # SYNC: with every worker out of data the servers agree on one version (ASYNC:
            # once every push reached every server).
            job.step = self.fleet.version(job.job_id, job.servers)
            job.epochs_done = self.epoch_no + 1
            job.resume = None
        trained = time.perf_counter()
        evaluation = self.placement.evaluate(job)
        loss = evaluation.loss
        job.last_eval_loss = loss
        path = self.placement.checkpoint(job, job.step, epoch=None, done={})
        wall = time.perf_counter() - self.started
        book = a.desk.book
        again = 0
        if isinstance(a.desk, AsyncLeaseDesk):
            # ASYNC: pushes in the parameters whose events never came (a worker lost just
            # after one) had their batches trained again: in `batches` twice, and redone.
            again = a.desk.account(job.step) or 0
        return job_pb2.ProgressEvent(
            job_id=job.job_id,
            epoch=self.epoch_no,
            summary=job_pb2.EpochSummary(
                epoch=self.epoch_no,
                start_step=self.start_step,
                end_step=job.step,
                train_loss=sum(t.losses) / len(t.losses) if t.losses else math.nan,
                eval_loss=loss,
                eval_perplexity=perplexity(loss),
                tokens=t.tokens,
                wall_s=wall,
                closing_s=time.perf_counter() - trained,
                tokens_per_s=t.tokens / wall if wall > 0 else 0.0,
                data_shards_completed=len(book.completed),
                batches=self.batches_before + len(t.losses) + t.unreported + book.unreported,
                leases_released=book.releases,
                batches_redone=book.redone_batches + self.redone_before + again,
                workers_lost=t.lost,
                workers_joined=t.joined,
                restores=t.restores,
                steps_lost=t.steps_lost,
                checkpoint=str(path or ""),
                failovers=t.failovers,
                servers_lost=t.servers_lost,
                eval_accuracy=evaluation.accuracy,
                eval_macro_f1=evaluation.macro_f1,
                eval_confusion=evaluation.confusion,
            ),
        )
