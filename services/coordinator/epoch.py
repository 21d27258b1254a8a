"""One epoch of one job, surviving lost workers and lost parameter servers.

Workers: one TrainEpoch stream per worker is relayed into one event queue. A worker whose
stream breaks or whose heartbeats stop is dropped: it leaves the SYNC barrier (its pending
gradient discarded on every server), and its data shards go to the others. A worker that
(re)registers during the epoch is configured and joins, taking orphaned shards.
Parameter servers: one that dies or restarts takes its shards' state with it, so the epoch
rolls back to the latest checkpoint once enough servers are back, and carries on.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from lmps.core.data import plan_data_shards
from lmps.core.errors import LmpsError, Unavailable
from lmps.core.partition import promote
from lmps.services.coordinator.fleet import Diverged
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.leases import EpochLeases
from lmps.services.coordinator.registry import WORKER
from lmps.v1 import job_pb2, worker_pb2

log = logging.getLogger("lmps.epoch")
LONG_TIMEOUT_S = 24 * 3600.0  # an epoch stream may legitimately run for hours
RECOVERY_WAIT_S = 600.0  # how long a rolled-back epoch waits for servers to come back


@dataclass(frozen=True)
class _Done:
    worker_id: str
    call: Any  # the stream that ended (a re-joined worker has a newer one)
    error: BaseException | None


@dataclass(frozen=True)
class _ServerLost:
    reason: str


class ServerLost(Exception):
    pass


@dataclass
class _Totals:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    lost: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    restores: int = 0
    steps_lost: int = 0
    releases: int = 0
    redone: int = 0
    failovers: int = 0
    servers_lost: list[str] = field(default_factory=list)


class EpochRun:
    def __init__(self, driver: Any, job: Job, epoch_no: int, context: grpc.ServicerContext) -> None:
        self.driver = driver
        self.job = job
        self.epoch_no = epoch_no
        self.context = context
        self.totals = _Totals()
        self.started = time.perf_counter()
        self.start_step = job.step

    # -- the whole epoch, with rollbacks ---------------------------------------------------

    def run(self) -> Iterator[job_pb2.ProgressEvent]:
        first = True
        while True:
            try:
                yield from self._attempt(first)
                return
            except ServerLost as lost:
                first = False
                reached = self.job.step
                if self._failover():
                    log.warning("epoch %d: %s; backups took over", self.epoch_no, lost)
                    continue
                log.warning(
                    "epoch %d: %s; rolling back to the last checkpoint", self.epoch_no, lost
                )
                self._wait_for_servers()
                version = self.driver.restore(self.job, wait_s=RECOVERY_WAIT_S)
                self.totals.restores += 1
                self.totals.steps_lost += max(0, reached - version)

    def _failover(self) -> bool:
        """Replication 2: drop the lost servers and promote backups, keeping the version.
        False when that is impossible (no replicas, a shard with no copy left, or the
        survivors disagree on the version) and the epoch must roll back instead."""
        job, d = self.job, self.driver
        if (job.spec.replication or 1) < 2:
            return False
        dead = d.lost_servers(job)
        if not dead:
            return False
        try:
            shards = promote(job.shards, dead)
            survivors = {s: a for s, a in job.servers.items() if s not in dead}
            version = d.fleet.version(job.job_id, survivors)
            progress = job.epoch.progress(below_step=version) if job.epoch else {}
            workers = {r.id: r.address for r in d.registry.alive(WORKER)}
            if job.spec.num_workers:
                workers = dict(sorted(workers.items())[: job.spec.num_workers])
            d.fleet.configure(job.job_id, job.spec, shards, survivors, workers)
        except (ValueError, grpc.RpcError, LmpsError) as err:
            log.warning("failover impossible: %s", err)
            return False
        with job.lock:
            job.shards, job.servers, job.workers = shards, survivors, workers
            job.server_epochs = {s: i for s, i in job.server_epochs.items() if s not in dead}
            job.resume = {"epoch": self.epoch_no, "done": progress}
            job.step = version
        self.totals.failovers += 1
        self.totals.servers_lost += sorted(dead)
        return True

    def _wait_for_servers(self) -> None:
        deadline = time.monotonic() + RECOVERY_WAIT_S
        while not self._servers_back():
            if not self.context.is_active():
                raise Unavailable("client went away while waiting for parameter servers")
            if time.monotonic() > deadline:
                raise Unavailable(f"parameter servers did not come back in {RECOVERY_WAIT_S:.0f}s")
            time.sleep(0.5)

    def _servers_back(self) -> bool:
        """As many servers as the job had are registered and answering (maybe new ones)."""
        want = self.job.spec.num_servers or len(self.job.servers)
        d = self.driver
        return sum(d.fleet.reachable(r.address) for r in d.registry.alive("ps")) >= want

    # -- one attempt -----------------------------------------------------------------------

    def _attempt(self, first: bool) -> Iterator[job_pb2.ProgressEvent]:
        job, d = self.job, self.driver
        spec = job.spec
        plan = plan_data_shards(
            job.train.shape[0],
            spec.batch_size,
            spec.batches_per_lease,
            int(spec.seed),
            self.epoch_no,
        )
        done = job.resume["done"] if job.resume and job.resume.get("epoch") == self.epoch_no else {}
        self._refresh_workers()
        shard_batches = [len(ids) // spec.batch_size for ids in plan]
        leases = EpochLeases(self.epoch_no, shard_batches, sorted(job.workers), done)
        with job.lock:
            job.epoch_plan = plan
            job.epoch = leases
            # Start from where the servers are and drop any half-collected step. Servers at
            # different versions (an epoch cancelled between a worker's pushes to two of
            # them) hold a half-applied step: roll back to the last checkpoint instead.
            try:
                job.step = d.fleet.version(job.job_id, job.servers)
            except Unavailable as err:
                raise ServerLost(str(err)) from None
            job.active = set(job.workers)
            d.fleet.set_members(job.job_id, job.servers, job.active, discard_pending=True)
        start_step = job.step
        if first:
            self.start_step = start_step
        remaining = sum(n - min(n, done.get(j, 0)) for j, n in enumerate(shard_batches))
        yield job_pb2.ProgressEvent(
            job_id=job.job_id,
            epoch=self.epoch_no,
            start=job_pb2.EpochStart(
                epoch=self.epoch_no,
                start_step=start_step,
                data_shards=len(plan),
                total_batches=remaining,
                workers=sorted(job.workers),
                batches_done=sum(shard_batches) - remaining,
            ),
        )
        self.events: queue.Queue[job_pb2.ProgressEvent | _Done | _ServerLost] = queue.Queue()
        self.calls: dict[str, Any] = {}
        self.reported: set[int] = set()  # id() of calls the monitor already reported
        self.lost_at: dict[str, float] = {}
        self.last_step: dict[str, int] = {}
        self.stop = threading.Event()
        for wid in sorted(job.workers):
            self._start_worker(wid, start_step)
        monitor = threading.Thread(target=self._monitor, name="epoch-monitor", daemon=True)
        monitor.start()
        every = int(spec.checkpoint_every)
        next_ckpt = (start_step // every + 1) * every if every else 0
        ckpt_thread: threading.Thread | None = None
        try:
            while self.calls:
                if not self.context.is_active():
                    raise Unavailable("client went away")
                try:
                    ev = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(ev, _ServerLost):
                    raise ServerLost(ev.reason)
                if isinstance(ev, _Done):
                    if self.calls.get(ev.worker_id) is not ev.call:
                        continue  # already handled (the monitor reported it first)
                    if ev.error is None:
                        self.calls.pop(ev.worker_id)
                    else:
                        if not d.servers_intact(job):
                            raise ServerLost(f"a parameter server was lost ({ev.error})")
                        try:
                            self._lose(ev.worker_id, ev.error)
                        except (grpc.RpcError, LmpsError) as err:
                            # The servers could not all be told: one of them is gone too.
                            raise ServerLost(f"dropping {ev.worker_id} failed: {err}") from None
                    continue
                step = ev.step
                leases.record(step.lease_id, step.batch_index, step.step)
                self.last_step[step.worker_id] = step.step
                self.totals.losses.append(step.loss)
                self.totals.tokens += step.tokens
                job.step = max(job.step, step.step + 1)
                active = set(job.active)
                if (
                    every
                    and active
                    and all(self.last_step.get(w, -1) >= next_ckpt - 1 for w in active)
                ):
                    if ckpt_thread is None or not ckpt_thread.is_alive():
                        ckpt_thread = self._checkpoint_async(next_ckpt, leases.progress(next_ckpt))
                    next_ckpt += every
                yield ev
        finally:
            self.stop.set()
            for call in list(self.calls.values()):
                call.cancel()
            if ckpt_thread is not None:
                ckpt_thread.join(timeout=120)
        if not leases.finished:
            raise Unavailable(
                f"epoch {self.epoch_no}: data shards left but no worker to train them"
            )
        try:
            summary = self._finish(leases)
        except (grpc.RpcError, LmpsError) as err:
            if d.servers_intact(job) and not isinstance(err, Diverged):
                raise
            raise ServerLost(
                f"a parameter server was lost at the end of the epoch: {err}"
            ) from None
        yield summary

    def _finish(self, leases: EpochLeases) -> job_pb2.ProgressEvent:
        job, d = self.job, self.driver
        with job.lock:
            job.step = d.fleet.version(job.job_id, job.servers)
            job.epochs_done = self.epoch_no + 1
            job.resume = None
        loss, _, _ = d.evaluate(job)
        job.last_eval_loss = loss
        path = d.checkpoint(job, job.step, epoch=None, done={})
        wall = time.perf_counter() - self.started
        t = self.totals
        return job_pb2.ProgressEvent(
            job_id=job.job_id,
            epoch=self.epoch_no,
            summary=job_pb2.EpochSummary(
                epoch=self.epoch_no,
                start_step=self.start_step,
                end_step=job.step,
                train_loss=sum(t.losses) / len(t.losses) if t.losses else math.nan,
                eval_loss=loss,
                eval_perplexity=math.exp(min(loss, 700.0)),
                tokens=t.tokens,
                wall_s=wall,
                tokens_per_s=t.tokens / wall if wall > 0 else 0.0,
                data_shards_completed=len(leases.completed),
                batches=len(t.losses),
                leases_released=leases.releases + t.releases,
                batches_redone=leases.redone_batches + t.redone,
                workers_lost=t.lost,
                workers_joined=t.joined,
                restores=t.restores,
                steps_lost=t.steps_lost,
                checkpoint=str(path or ""),
                failovers=t.failovers,
                servers_lost=t.servers_lost,
            ),
        )

    # -- workers ---------------------------------------------------------------------------

    def _refresh_workers(self) -> None:
        """Use the workers alive now (heartbeating and answering): configure newcomers,
        forget the dead. A worker killed a moment ago still looks alive in the registry."""
        job, d = self.job, self.driver
        alive = {r.id: r.address for r in d.registry.alive(WORKER) if d.fleet.reachable(r.address)}
        if job.spec.num_workers:
            alive = dict(sorted(alive.items())[: job.spec.num_workers])
        if not alive:
            alive = d.wait_members(
                WORKER, job.spec.num_workers, job.spec.wait_for_members_s or 60.0
            )
        for wid, address in sorted(alive.items()):
            if job.workers.get(wid) == address:
                continue
            try:
                d.fleet.configure(
                    job.job_id, job.spec, job.shards, job.servers, {wid: address}, timeout_s=60.0
                )
            except grpc.RpcError as err:
                log.warning("epoch %d: worker %s left out: %s", self.epoch_no, wid, err)
                del alive[wid]
        if not alive:
            raise Unavailable("no worker could be configured for the epoch")
        job.workers = alive

    def _start_worker(self, wid: str, start_step: int) -> None:
        job = self.job
        request = worker_pb2.TrainEpochRequest(
            job_id=job.job_id, epoch=self.epoch_no, start_step=start_step
        )
        call = self.driver.fleet.worker(job.workers[wid]).TrainEpoch(
            request, timeout=LONG_TIMEOUT_S, wait_for_ready=True
        )
        self.calls[wid] = call
        threading.Thread(
            target=self._relay, args=(wid, call), name=f"relay-{wid}", daemon=True
        ).start()

    def _relay(self, wid: str, call: Iterator[job_pb2.ProgressEvent]) -> None:
        try:
            for ev in call:
                self.events.put(ev)
            self.events.put(_Done(wid, call, None))
        except BaseException as err:  # reported to the epoch loop
            self.events.put(_Done(wid, call, err))

    def _lose(self, wid: str, error: object) -> None:
        job, d = self.job, self.driver
        log.warning("epoch %d: worker %s lost: %s", self.epoch_no, wid, error)
        call = self.calls.pop(wid, None)
        if call is not None:
            call.cancel()
        self.lost_at[wid] = time.monotonic()
        with job.lock:
            job.workers.pop(wid, None)
            job.active = job.active - {wid}
            applied_below = d.fleet.set_members(job.job_id, job.servers, job.active, discard=[wid])
            assert job.epoch is not None
            job.epoch.lose(wid, applied_below)
        self.totals.lost.append(wid)

    def _join(self, wid: str, address: str) -> None:
        job, d = self.job, self.driver
        log.info("epoch %d: worker %s joins", self.epoch_no, wid)
        d.fleet.configure(
            job.job_id, job.spec, job.shards, job.servers, {wid: address}, timeout_s=20.0
        )
        with job.lock:
            # Mid-step the servers may be one version apart: any will do, the worker
            # follows the version it pulls.
            version = d.fleet.lowest_version(job.job_id, job.servers)
            # Member first, then the stream: its first push must find it in the barrier.
            d.fleet.set_members(job.job_id, job.servers, job.active | {wid})
            job.active = job.active | {wid}
            job.workers[wid] = address
            assert job.epoch is not None
            job.epoch.lost.discard(wid)
            job.epoch.rebalance([*self.calls, wid])
        self._start_worker(wid, version)
        self.totals.joined.append(wid)

    def _monitor(self) -> None:
        """Watch heartbeats: dead workers are dropped, new workers join, lost servers abort."""
        job, d = self.job, self.driver
        while not self.stop.wait(0.5):
            try:
                # Registry only here: probing every half second could misread a busy server.
                if not d.servers_intact(job, probe=False):
                    self.events.put(
                        _ServerLost("a parameter server stopped heartbeating or restarted")
                    )
                    return
                for wid, call in list(self.calls.items()):
                    if not d.registry.is_alive(wid) and id(call) not in self.reported:
                        self.reported.add(id(call))
                        self.events.put(
                            _Done(wid, call, Unavailable(f"{wid} missed its heartbeats"))
                        )
                for rec in d.registry.alive(WORKER):
                    if rec.id in self.calls or self.stop.is_set():
                        continue
                    limit = job.spec.num_workers
                    if limit and len(self.calls) >= limit:
                        continue
                    lost = rec.id in self.lost_at
                    if rec.id in job.workers and not lost:
                        continue  # finished its data this epoch
                    if lost and rec.last_seen <= self.lost_at[rec.id]:
                        continue  # not heard from since we dropped it: still dead
                    self._join(rec.id, rec.address)
                    self.lost_at.pop(rec.id, None)
            except Exception:  # the monitor must survive a failed call and try again
                log.exception("epoch monitor")

    def _checkpoint_async(self, version: int, done: dict[int, int]) -> threading.Thread:
        def write() -> None:
            try:
                self.driver.checkpoint(self.job, version, epoch=self.epoch_no, done=done)
            except Exception as err:  # a missed checkpoint is not fatal: the next one may do
                log.warning("checkpoint at version %d failed: %s", version, err)

        t = threading.Thread(target=write, name=f"checkpoint-{version}", daemon=True)
        t.start()
        return t
