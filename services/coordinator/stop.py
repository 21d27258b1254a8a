"""The client went away (Ctrl-C, SIGTERM) mid-epoch: stop at a step boundary, resumable.

The barrier is frozen at the highest server version v (a member that never pushes: no step
past v is made), the workers' events are taken in until each has reported its push for v,
then the servers' settled version, where every data shard stands at it and the batches
pushed past it are recorded in `job.resume` and in a checkpoint, so `lmps train --resume`
continues mid-epoch with the same step composition (deterministic leases) and a restarted
coordinator does too. When the servers disagree (a half-applied step), the epoch rolls back
to the latest checkpoint instead. With local steps a step is a round of H batches: the stop
is at a round boundary, and the rounds pushed at v are trained again from their first batch.
With streaming fragments a step is a window of H / F batches or a flush, and a lease not
whole below v (its last flush applied) is trained again from its first batch.

ASYNC has no barrier to freeze, and needs none: each push is applied as it comes. The streams
are cancelled at once and the events on their way taken in (`drain`); the servers' version
v then holds every reported batch, and the pushes in v that never reported are counted and
trained again (at least once). A push cut off between two servers leaves them apart: a
rollback, as under SYNC.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

import grpc

from lmps.core.errors import LmpsError
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job, Resume
from lmps.services.coordinator.leases import AsyncLeaseDesk
from lmps.services.coordinator.placement import Placement
from lmps.services.coordinator.streams import Attempt, Done, ServersLost, WorkerStreams
from lmps.v1 import job_pb2

log = logging.getLogger("lmps.epoch")
STOPPER = "(stopped)"  # the barrier member that never pushes: no step is made past a stop
STOP_WAIT_S = 30.0  # how long a stop waits for the workers' last pushes to be reported


class EpochStop:
    """Stopping one epoch of one job; `record` takes in a step event as the epoch does."""

    def __init__(
        self,
        *,
        job: Job,
        epoch_no: int,
        fleet: Fleet,
        placement: Placement,
        redone_before: int,
        record: Callable[[Attempt, job_pb2.StepEvent], None],
    ) -> None:
        self.job = job
        self.epoch_no = epoch_no
        self.fleet = fleet
        self.placement = placement
        self.redone_before = redone_before
        self.record = record

    def at_step_boundary(self, a: Attempt, streams: WorkerStreams) -> None:
        """Freeze the barrier (no step past version v is made) and take in the workers'
        events until each has reported its push for v (then it waits for v + 1, forever):
        every step below v is in the parameters and recorded, the pushes at v are not."""
        if isinstance(a.desk, AsyncLeaseDesk):
            self.drain(a, streams)
            return
        try:
            at = a.desk.freeze(STOPPER)
        except (grpc.RpcError, LmpsError) as err:
            log.warning(
                "epoch %d: stopping: the barrier could not be frozen: %s", self.epoch_no, err
            )
            return
        if at is None:
            return  # settling finds out whether what was recorded matches the servers
        # With gradient clipping a worker reports a step once its norm is applied, so its
        # push for v (a step that is never made) is never reported: its step v - 1 is the last.
        last = at - 1 if self.job.settings.clip_on_servers else at
        deadline = time.monotonic() + STOP_WAIT_S
        while a.calls and time.monotonic() < deadline:
            # Fragments: a flush has no batches, so no event reports it: wait for the window
            # before it.
            waiting = [
                w
                for w in a.desk.active
                if w in a.calls and a.last_step.get(w, -1) < a.desk.reported_step(w, last)
            ]
            if not waiting:
                return
            try:
                ev = a.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(ev, ServersLost):
                return
            if isinstance(ev, Done):
                streams.ended(ev)
            else:
                self.record(a, ev.step)
        log.warning("epoch %d: stopping: workers did not report step %d", self.epoch_no, at)

    def drain(self, a: Attempt, streams: WorkerStreams) -> None:
        """ASYNC: cancel every stream now and take in the events already on their way until
        each stream's relay has ended, so every push reported is recorded before `settle`."""
        ending = {id(call) for call in a.calls.values()}
        streams.close()
        deadline = time.monotonic() + STOP_WAIT_S
        while ending and time.monotonic() < deadline:
            try:
                ev = a.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(ev, ServersLost):
                return
            if isinstance(ev, Done):
                ending.discard(id(ev.call))  # a cancelled stream: not a lost worker
            else:
                self.record(a, ev.step)
        if ending:
            log.warning("epoch %d: stopping: %d streams did not end", self.epoch_no, len(ending))

    def settle(self, a: Attempt) -> None:
        """After a stop: the servers' version v, where each data shard stands at v (what
        the resumed epoch starts from, kept in a checkpoint so that it survives a
        coordinator restart too) and the batches pushed at steps >= v, to be redone. A push
        below v whose event never came is told from the member's leases (`LeaseDesk.account`,
        as after a failover). When the servers disagree (a half-applied step) or it cannot
        be told, roll back to the latest checkpoint instead."""
        job = self.job
        try:
            version: int | None = self.fleet.version(job.job_id, job.servers)
        except (grpc.RpcError, LmpsError) as err:
            log.warning("epoch %d: stopped with the servers apart: %s", self.epoch_no, err)
            version = None
        # SYNC: a member's pushes below v whose events never came are in the parameters.
        # ASYNC: every reported push is; those in v never reported are counted (redone).
        if version is not None and a.desk.account(version) is not None:
            done = a.desk.progress(version)
            redone = self.redone_before + a.desk.unapplied(version)
            with job.lock:
                job.step = version
                job.resume = Resume(self.epoch_no, done, redone=redone)
            try:
                self.placement.checkpoint(
                    job, version, epoch=self.epoch_no, done=done, redone=redone
                )
            except (grpc.RpcError, LmpsError, OSError) as err:
                log.warning("epoch %d: no checkpoint at the stop: %s", self.epoch_no, err)
            log.info(
                "epoch %d stopped at step %d: %d batches pushed past it are discarded",
                self.epoch_no,
                version,
                redone - self.redone_before,
            )
            return
        try:
            with job.lock:
                restored = self.placement.restore(job, wait_s=60.0)
        except (grpc.RpcError, LmpsError) as err:
            log.error("epoch %d: stopped, and no rollback: %s", self.epoch_no, err)
            with job.lock:
                job.needs_restore = True
            return
        with job.lock:
            resume = job.resume if job.resume and job.resume.epoch == self.epoch_no else None
            redone = self.redone_before + a.desk.unapplied(restored)
            job.resume = Resume(self.epoch_no, resume.done if resume else {}, redone=redone)
        log.warning(
            "epoch %d stopped; rolled back to the checkpoint at %d", self.epoch_no, restored
        )
