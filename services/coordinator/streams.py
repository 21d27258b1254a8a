"""The workers' side of one attempt at an epoch: their TrainEpoch streams, relayed into one
queue and watched. A worker whose stream breaks or whose heartbeats stop is dropped (its
leases go back to the queue, see leases.LeaseDesk); a worker that (re)registers during the
epoch is configured and joins. TF2 ParameterServerStrategy's coordinator survives worker
loss the same way: the failed closure is rescheduled on another worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from lmps.core.errors import LmpsError, Unavailable
from lmps.services.coordinator.cluster import Cluster
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.leases import LeaseDesk
from lmps.services.coordinator.placement import Placement
from lmps.services.coordinator.registry import Role
from lmps.v1 import job_pb2, worker_pb2

log = logging.getLogger("lmps.epoch")
LONG_TIMEOUT_S = 24 * 3600.0  # an epoch stream may legitimately run for hours


class ServerLost(Exception):
    """A parameter server of the job died or restarted: fail over or roll back."""


@dataclass(frozen=True)
class Done:
    """A worker's stream ended (`error` None: it trained all its data)."""

    worker_id: str
    call: Any  # the stream that ended (a re-joined worker has a newer one)
    error: BaseException | None


@dataclass(frozen=True)
class ServersLost:
    reason: str


Event = job_pb2.ProgressEvent | Done | ServersLost


@dataclass
class Totals:
    """What the epoch's summary counts, over all its attempts."""

    losses: list[float] = field(default_factory=list)  # one per step event
    unreported: int = 0  # batches trained whose event never came (LeaseDesk.account)
    tokens: int = 0
    lost: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    restores: int = 0
    steps_lost: int = 0
    failovers: int = 0
    servers_lost: list[str] = field(default_factory=list)


@dataclass
class Attempt:
    """Everything one attempt at the epoch holds; a rollback starts a fresh one."""

    desk: LeaseDesk
    start_step: int
    checkpoint_every: int  # 0 = epoch ends only
    next_checkpoint: int  # the next version to checkpoint mid-epoch
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    calls: dict[str, Any] = field(default_factory=dict)  # worker -> its TrainEpoch stream
    reported: set[int] = field(default_factory=set)  # id() of calls the monitor reported
    lost_at: dict[str, float] = field(default_factory=dict)  # worker -> when dropped
    last_step: dict[str, int] = field(default_factory=dict)  # worker -> last step it pushed
    stop: threading.Event = field(default_factory=threading.Event)
    checkpointing: threading.Thread | None = None


class WorkerStreams:
    def __init__(
        self,
        *,
        job: Job,
        epoch_no: int,
        attempt: Attempt,
        totals: Totals,
        cluster: Cluster,
        placement: Placement,
        fleet: Fleet,
    ) -> None:
        self.job, self.epoch_no, self.a, self.totals = job, epoch_no, attempt, totals
        self.cluster, self.placement, self.fleet = cluster, placement, fleet

    def start(self) -> None:
        """A stream per configured worker, and the monitor."""
        for wid in sorted(self.job.workers):
            self._start_worker(wid, self.a.start_step)
        threading.Thread(target=self._monitor, name="epoch-monitor", daemon=True).start()

    def close(self) -> None:
        self.a.stop.set()
        for call in list(self.a.calls.values()):
            call.cancel()

    def ended(self, ev: Done) -> None:
        """A stream ended: a finished worker is let go, a broken one is dropped."""
        a = self.a
        if a.calls.get(ev.worker_id) is not ev.call:
            return  # already handled (the monitor reported it first)
        if ev.error is None:
            a.calls.pop(ev.worker_id)
            return
        if not self.cluster.servers_intact(self.job):
            raise ServerLost(f"a parameter server was lost ({ev.error})")
        try:
            self.lose(ev.worker_id, ev.error)
        except (grpc.RpcError, LmpsError) as err:
            # The servers could not all be told: one of them is gone too.
            raise ServerLost(f"dropping {ev.worker_id} failed: {err}") from None

    def lose(self, wid: str, error: object) -> None:
        job, a = self.job, self.a
        log.warning("epoch %d: worker %s lost: %s", self.epoch_no, wid, error)
        call = a.calls.pop(wid, None)
        if call is not None:
            call.cancel()
        a.lost_at[wid] = time.monotonic()
        with job.lock:
            job.workers.pop(wid, None)
            a.desk.lose(wid)
        self.totals.lost.append(wid)

    def _join(self, wid: str, address: str) -> None:
        job, a = self.job, self.a
        log.info("epoch %d: worker %s joins", self.epoch_no, wid)
        self.placement.configure(job, {wid: address}, timeout_s=20.0)
        with job.lock:
            # SYNC: the join takes effect at one version on every server (the highest of
            # theirs, see LeaseDesk.join); the worker's stream starts there. ASYNC: at once,
            # starting at the lowest (AsyncLeaseDesk.join).
            version = a.desk.join(wid, training=list(a.calls))
            if version is None:  # the servers kept moving on: the monitor tries again
                log.warning("epoch %d: worker %s could not join; retrying", self.epoch_no, wid)
                return
            job.workers[wid] = address
        self._start_worker(wid, version)
        self.totals.joined.append(wid)

    def _start_worker(self, wid: str, start_step: int) -> None:
        job = self.job
        request = worker_pb2.TrainEpochRequest(
            job_id=job.job_id, epoch=self.epoch_no, start_step=start_step
        )
        call = self.fleet.worker(job.workers[wid]).TrainEpoch(
            request, timeout=LONG_TIMEOUT_S, wait_for_ready=True
        )
        self.a.calls[wid] = call
        threading.Thread(
            target=self._relay, args=(wid, call), name=f"relay-{wid}", daemon=True
        ).start()

    def _relay(self, wid: str, call: Iterator[job_pb2.ProgressEvent]) -> None:
        try:
            for ev in call:
                self.a.events.put(ev)
            self.a.events.put(Done(wid, call, None))
        except BaseException as err:  # reported to the epoch loop
            self.a.events.put(Done(wid, call, err))

    def _monitor(self) -> None:
        """Watch heartbeats: dead workers are dropped, new workers join, lost servers abort."""
        job, a = self.job, self.a
        while not a.stop.wait(0.5):
            try:
                # Registry only here: probing every half second could misread a busy server.
                if not self.cluster.servers_intact(job, probe=False):
                    a.events.put(
                        ServersLost("a parameter server stopped heartbeating or restarted")
                    )
                    return
                for wid, call in list(a.calls.items()):
                    if not self.cluster.is_alive(wid) and id(call) not in a.reported:
                        a.reported.add(id(call))
                        a.events.put(Done(wid, call, Unavailable(f"{wid} missed its heartbeats")))
                for rec in self.cluster.heartbeating(Role.WORKER):
                    if rec.id in a.calls or a.stop.is_set():
                        continue
                    limit = job.settings.num_workers
                    if limit and len(a.calls) >= limit:
                        continue
                    lost = rec.id in a.lost_at
                    if rec.id in job.workers and not lost:
                        continue  # finished its data this epoch
                    if lost and rec.last_seen <= a.lost_at[rec.id]:
                        continue  # not heard from since we dropped it: still dead
                    self._join(rec.id, rec.address)
                    a.lost_at.pop(rec.id, None)
            except Exception:  # the monitor must survive a failed call and try again
                log.exception("epoch monitor")
