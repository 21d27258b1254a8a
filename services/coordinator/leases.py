"""Data leases for one epoch: every data shard is completed exactly once. Pure.

`EpochLeases` is the bookkeeping; `LeaseDesk` is the lease lifecycle's single owner for a
running epoch: it hands leases out, takes them back, and keeps the SYNC barrier's members
(the workers still training) in step with them. As ps-lite's scheduler (Parameter Server,
OSDI'14) and TF2 ParameterServerStrategy's coordinator, a lost worker's data goes back to
the queue and the others (or a replacement) train it.

SYNC: the step composition must not depend on timing, or two runs of the same job (or a
resumed run) would differ. So shard j is owned by worker j mod W (workers sorted by id) and
each worker takes its own shards in order. Shards of a lost worker become orphans that any
worker (including a replacement that joins mid-epoch) takes first.

Local steps (DiLoCo): a push is one round, up to H (`per_push`) consecutive batches of one
lease counted from its first batch (rounds never cross a lease; the last of a lease may be
shorter), and every batch of a round is reported at the round's step. A round is applied
whole or not at all, so where a shard stands (`progress`, `lose`) is always a round's start.
Without local steps H is 1: a round is a batch.

Streaming fragments (F > 1): a push is a window of K = H / F batches (`per_push`) that syncs
one fragment of the model, and a lease ends with F - 1 flushes (`flushes`: pushes of no
batches and no events, one per other fragment), so a lease of b batches is ceil(b / K) +
F - 1 pushes in order. A window's events come at its own step v, yet its batches are in
every fragment only once the lease's last flush (F - 1 steps after its last window) is
applied, from version (last window's step) + F on. So a lease counts as in the parameters
whole or not at all: its shard stands at the lease's first batch until then, at its end
after; a lease lost or stopped halfway is trained again from its first batch (partly in the
parameters already: at least once, counted in `redone_batches` and `unapplied`).

A new consistency mode is a sibling of `LeaseDesk` with its own membership rule (a row of
`DESKS`), plus the branches marked `# SYNC:` in epoch.py and streams.py. Bounded staleness
keeps SYNC's. `AsyncLeaseDesk` is ASYNC's: every push is applied at once, so no barrier
waits for anyone and every reported batch is in the parameters.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lmps.core.errors import FailedPrecondition, NotFound


@dataclass
class Lease:
    lease_id: str
    worker_id: str
    data_shard: int
    first_batch: int  # batches before this one were already trained (a resumed shard)
    batches: int  # batches in the whole data shard
    seen: list[tuple[int, int]] = field(default_factory=list)  # (batch_index, step) from events


class EpochLeases:
    def __init__(
        self,
        epoch: int,
        shard_batches: Sequence[int],
        workers: Sequence[str],
        done: Mapping[int, int] | None = None,
        *,
        per_push: int = 1,
        flushes: int = 0,
    ) -> None:
        """`shard_batches[j]`: batches in data shard j; `done[j]`: batches already trained;
        `per_push`: batches a worker trains per push (H of local steps, H / F with F
        fragments; 1 without); `flushes`: pushes of no batches that end every lease (F - 1
        with fragments; 0 without)."""
        if per_push < 1:
            raise ValueError(f"per_push must be >= 1, got {per_push}")
        if flushes < 0:
            raise ValueError(f"flushes must be >= 0, got {flushes}")
        self.epoch = epoch
        self.per_push = per_push
        self.flushes = flushes
        self.shard_batches = list(shard_batches)
        self.done: dict[int, int] = {j: n for j, n in (done or {}).items() if n > 0}
        self.own: dict[str, deque[int]] = {w: deque() for w in sorted(workers)}
        self.orphans: deque[int] = deque()
        order = sorted(workers)
        for j, n in enumerate(self.shard_batches):
            if self.done.get(j, 0) >= n:
                continue  # finished before a checkpoint we resumed from
            if order:  # SYNC: deterministic ownership, shard j -> worker j mod W
                self.own[order[j % len(order)]].append(j)
            else:
                self.orphans.append(j)
        self.outstanding: dict[str, Lease] = {}
        # Completed leases: their last pushes may be unapplied yet, or their events still
        # on the way (a worker completes a lease right after its last push).
        self.closed: dict[str, Lease] = {}
        self.completed: list[int] = [
            j for j, n in enumerate(self.shard_batches) if self.done.get(j, 0) >= n
        ]
        self.lost: set[str] = set()
        # The leases each worker took since it (re)joined, in order: it trains them so.
        self.taken: dict[str, list[Lease]] = {}
        self.releases = 0  # leases handed back by lost workers
        self.redone_batches = 0  # batches trained by a lost worker but not applied, trained again
        self.unreported = 0  # batches pushed whose event never came (`account`, `lose`)
        # ASYNC: a worker out of shards of its own takes another's (see `take`).
        self.steal = False
        self._next_id = 0
        self._lock = threading.Lock()

    def take(self, worker_id: str) -> Lease | None:
        with self._lock:
            if worker_id in self.lost:
                raise FailedPrecondition(
                    f"worker {worker_id!r} was dropped from epoch {self.epoch}"
                )
            # SYNC: orphans first, then the worker's own shards in order; no stealing of
            # another's shards, so which batches make a step does not depend on timing.
            queue = self.orphans if self.orphans else self.own.get(worker_id, deque())
            if queue:
                j = queue.popleft()
            elif self.steal and any(self.own.values()):
                # ASYNC: no step depends on who trains a shard, so a worker out of its own
                # takes the last shard of the longest queue rather than stop while a slower
                # one still has several to go.
                j = max(self.own.values(), key=len).pop()
            else:
                return None
            lease = Lease(
                f"e{self.epoch}-l{self._next_id}-s{j}",
                worker_id,
                j,
                self.done.get(j, 0),
                self.shard_batches[j],
            )
            self._next_id += 1
            self.outstanding[lease.lease_id] = lease
            self.taken.setdefault(worker_id, []).append(lease)
            return lease

    def _rounds(self, lease: Lease) -> list[range]:
        """The lease's pushes in training order: rounds of `per_push` batches each from its
        first batch, the last cut at the lease's end (rounds never cross a lease), then
        `flushes` empty ones (pushes of no batches)."""
        h = self.per_push
        windows = [
            range(b, min(b + h, lease.batches)) for b in range(lease.first_batch, lease.batches, h)
        ]
        return windows + [range(0)] * self.flushes

    def _whole_below(self, lease: Lease, below_step: int | None) -> bool:
        """Fragments: the lease's last push (its last flush) is at a step below `below_step`,
        so every batch of it is in every fragment. A window i (0-based) of n reported at step
        s puts that push at s + (n - 1 - i) + flushes (a worker pushes once a step, in
        order); the latest any event says, to be safe. False without events or a step."""
        if below_step is None or not lease.seen:
            return False
        n = -(-(lease.batches - lease.first_batch) // self.per_push)
        last = max(
            s + n - 1 - (b - lease.first_batch) // self.per_push + self.flushes
            for b, s in lease.seen
        )
        return last < below_step

    def _round_start(self, lease: Lease, batch: int) -> int:
        """The first batch of the round `batch` belongs to."""
        return (
            lease.first_batch + max(0, batch - lease.first_batch) // self.per_push * self.per_push
        )

    def _round_end(self, lease: Lease, batch: int) -> int:
        """One past the last batch of the round `batch` belongs to."""
        return min(lease.batches, self._round_start(lease, batch) + self.per_push)

    def record(self, lease_id: str, batch_index: int, step: int) -> None:
        """A step event: `batch_index` of the lease was pushed at `step`."""
        with self._lock:
            lease = self.outstanding.get(lease_id) or self.closed.get(lease_id)
            if lease is not None:
                lease.seen.append((batch_index, step))

    def complete(self, lease_id: str, worker_id: str) -> None:
        with self._lock:
            lease = self.outstanding.get(lease_id)
            if lease is None or lease.worker_id != worker_id:
                raise NotFound(f"unknown lease {lease_id!r} for worker {worker_id!r}")
            del self.outstanding[lease_id]
            self.closed[lease_id] = lease
            self.done[lease.data_shard] = lease.batches
            self.completed.append(lease.data_shard)

    def lose(self, worker_id: str, applied_below: int | None) -> list[int]:
        """Worker lost: its shards become orphans. Batches it pushed at steps below
        `applied_below` are kept (they are in the parameters); the rest will be redone.
        None: every batch it reported is kept (ASYNC: a reported push is applied).

        A round is applied whole: one batch of it reported below `applied_below` keeps the
        round (its batches whose events never came are counted in `unreported`), and the
        re-leased shard starts at the next round. With fragments (`flushes`) a lease is kept
        only whole (its last flush below `applied_below`; then it is completed, and None keeps
        none: ASYNC has no fragments); any other is trained again from its first batch, its
        reported batches counted in `redone_batches` (partly in the parameters: at least
        once)."""
        with self._lock:
            self.lost.add(worker_id)
            self.taken.pop(worker_id, None)
            orphaned: list[int] = []
            for lid in [
                lid for lid, lease in self.outstanding.items() if lease.worker_id == worker_id
            ]:
                lease = self.outstanding.pop(lid)
                if self.flushes:
                    orphaned += self._lose_fragmented(lease, applied_below)
                    continue
                kept = [b for b, s in lease.seen if applied_below is None or s < applied_below]
                first = max([lease.first_batch, *(self._round_end(lease, b) for b in kept)])
                self.redone_batches += len(lease.seen) - len(kept)
                self.unreported += len(set(range(lease.first_batch, first)) - set(kept))
                self.done[lease.data_shard] = first
                orphaned.append(lease.data_shard)
                self.releases += 1
            orphaned += list(self.own.pop(worker_id, deque()))
            self.orphans.extend(orphaned)
            return orphaned

    def _lose_fragmented(self, lease: Lease, applied_below: int | None) -> list[int]:
        """`lose` of one lease with fragments: the shards to orphan (none when it is whole)."""
        if self._whole_below(lease, applied_below):
            # Its last flush is applied: every batch is in, reported or not (its worker was
            # lost between that push and completing the lease).
            seen = {b for b, _ in lease.seen}
            self.unreported += len(set(range(lease.first_batch, lease.batches)) - seen)
            self.closed[lease.lease_id] = lease
            self.done[lease.data_shard] = lease.batches
            self.completed.append(lease.data_shard)
            return []
        self.redone_batches += len(lease.seen)
        self.done[lease.data_shard] = lease.first_batch
        self.releases += 1
        return [lease.data_shard]

    def readmit(self, worker_id: str) -> None:
        """A dropped worker is back (it re-registered): it may take leases again."""
        with self._lock:
            self.lost.discard(worker_id)
            self.taken[worker_id] = []  # its order starts again at the version it joins at

    def rebalance(self, workers: list[str]) -> None:
        """Spread every shard not yet leased over `workers` (those training now plus a
        worker that just joined), round-robin in shard order, so a newcomer gets a share."""
        with self._lock:
            pending = sorted([*self.orphans, *(j for q in self.own.values() for j in q)])
            self.orphans.clear()
            order = sorted(w for w in workers if w not in self.lost)
            self.own = {w: deque() for w in order}
            for i, j in enumerate(pending):
                self.own[order[i % len(order)]].append(j)

    def progress(self, below_step: int) -> dict[int, int]:
        """Batches per data shard that are in the parameters at version `below_step`.

        A lease is completed once its last batch is pushed, before that step is applied:
        a batch pushed at a step >= `below_step` is not in the parameters, done or not. A
        round is in the parameters whole or not at all: a shard stands at a round's start.
        With fragments (`flushes`) a lease is in whole (once its last flush is below
        `below_step`) or not at all: until then its shard stands at the lease's first batch."""
        with self._lock:
            out = dict(self.done)
            for lease in [*self.closed.values(), *self.outstanding.values()]:
                if self.flushes:
                    if self._whole_below(lease, below_step):
                        out[lease.data_shard] = max(out.get(lease.data_shard, 0), lease.batches)
                    elif lease.first_batch or lease.data_shard in out:
                        out[lease.data_shard] = lease.first_batch
                    continue
                late = [b for b, s in lease.seen if s >= below_step]
                kept = [b for b, s in lease.seen if s < below_step]
                if late:  # rounds go in order: the first unapplied one is where to resume
                    start = self._round_start(lease, min(late))
                    if start or lease.data_shard in out:
                        out[lease.data_shard] = start
                elif kept:
                    end = self._round_end(lease, max(kept))
                    out[lease.data_shard] = max(out.get(lease.data_shard, 0), end)
            return out

    def unapplied(self, below_step: int) -> int:
        """Batches pushed at steps >= `below_step`: not in the parameters at that version.
        With fragments, every batch reported of a lease not whole below it (`progress`:
        trained again from the lease's first batch)."""
        with self._lock:
            leases = [*self.closed.values(), *self.outstanding.values()]
            if self.flushes:
                return sum(
                    len(lease.seen) for lease in leases if not self._whole_below(lease, below_step)
                )
            return sum(1 for lease in leases for _, s in lease.seen if s >= below_step)

    def reported_step(self, worker_id: str, since: int, step: int) -> int:
        """The latest step <= `step` at which `worker_id` pushed batches, so events report
        it: `step` itself but with fragments, where a flush has none (then the step of the
        window before it, by its lease order as `account` reads it: `since` is the step of
        its first push). `step` when unknown; -1 when only flushes came since `since`."""
        with self._lock:
            if not self.flushes:
                return step
            order = [r for lease in self.taken.get(worker_id, []) for r in self._rounds(lease)]
            i = step - since
            if not 0 <= i < len(order):
                return step
            while i >= 0 and not order[i]:
                i -= 1
            return since + i if i >= 0 else -1

    def account(self, members: Mapping[str, int], below_step: int) -> int | None:
        """Record the pushes of the barrier's `members` that no step event reported, so that
        `progress(below_step)` and `unapplied` count them. `members[w]`: the step from which
        the barrier has required worker w (it still does). Returns how many were recorded;
        None, recording nothing, when the events or leases do not fit (see below).

        SYNC: every step a server made needed one push of every member, and a worker trains
        the rounds of its leases (`per_push` batches of one lease, one batch without local
        steps; with fragments each lease ends with `flushes` rounds of no batches) in the
        order it took them, one round per step. So w pushed the first
        `below_step - members[w]` rounds at the steps `members[w]`, ... `below_step - 1`,
        reported or not (a push that reached the servers that made the step but failed on a
        lost one is never reported, yet it is in the parameters), and the rest of a lease it
        completed right after them (pushed, not in the parameters). None when an event is
        not where this order puts it, a member made more steps than its leases hold rounds,
        or a worker that is not a member (nor lost) holds a lease: its steps are unknown."""
        with self._lock:
            found: list[tuple[Lease, int, int]] = []
            for worker, since in sorted(members.items()):
                leases = self.taken.get(worker, [])
                order = [(lease, r) for lease in leases for r in self._rounds(lease)]
                at = {
                    (lease.lease_id, b): since + i for i, (lease, r) in enumerate(order) for b in r
                }
                if any(at.get((lease.lease_id, b)) != s for lease in leases for b, s in lease.seen):
                    return None
                applied = below_step - since
                if applied > len(order):
                    return None
                for i, (lease, r) in enumerate(order):
                    pushed = i < applied or lease.lease_id in self.closed
                    found += [
                        (lease, b, since + i)
                        for b in r
                        if pushed and (b, since + i) not in lease.seen
                    ]
            if any(
                lease.worker_id not in members and lease.worker_id not in self.lost
                for lease in self.outstanding.values()
            ):
                return None
            for lease, b, step in found:
                lease.seen.append((b, step))
            self.unreported += len(found)
            return len(found)

    @property
    def finished(self) -> bool:
        with self._lock:
            return not self.outstanding and not self.orphans and not any(self.own.values())


@dataclass(frozen=True)
class DataLease:
    """A lease as handed to a worker: the rest of one data shard, as token rows."""

    lease_id: str
    epoch: int
    data_shard: int
    first_batch: int  # batches of the shard trained before (a resumed shard)
    batches: int  # batches in `tokens`
    tokens: torch.Tensor  # int32 (batches * B, T+1)


class Barrier(Protocol):
    """Where the SYNC barrier's members are set on every server (`Fleet.set_members`)."""

    def set_members(
        self,
        job_id: str,
        servers: Mapping[str, str],
        members: set[str],
        discard_pending: bool = False,
        discard: Sequence[str] = (),
        join_at: int = 0,
    ) -> int:
        """FailedPrecondition when `join_at` > 0 and a server is past it."""
        ...

    def versions(self, job_id: str, servers: Mapping[str, str]) -> list[int]:
        """Every server's version."""
        ...


JOIN_TRIES = 20  # a join retried this often (servers moving on meanwhile) is given up


class LeaseDesk:
    """The leases of one attempt at an epoch, and the barrier membership that goes with them.

    SYNC: the active set (workers still training) is exactly the barrier's members. A worker
    out of data leaves the barrier before it is told `done`; a lost worker leaves it with
    its pending gradient discarded; a joining worker enters it before its stream starts.
    Thread-safe; callers that also change the job's workers hold the job's lock around it.
    """

    def __init__(
        self,
        *,
        job_id: str,
        epoch: int,
        plan: Sequence[torch.Tensor],
        train: torch.Tensor,
        batch_size: int,
        workers: Sequence[str],
        done: Mapping[int, int],
        servers: Mapping[str, str],
        barrier: Barrier,
        per_push: int = 1,
        flushes: int = 0,
    ) -> None:
        """`plan[j]`: sequence ids of data shard j (rows of `train`); `done[j]`: batches of
        shard j already trained (resuming); `per_push`: batches per push, H of local steps
        (H / F with F fragments; 1 without); `flushes`: F - 1 with fragments (`EpochLeases`)."""
        self.job_id, self.epoch = job_id, epoch
        self.plan, self.train, self.batch_size = list(plan), train, batch_size
        self.shard_batches = [len(ids) // batch_size for ids in plan]
        self.book = EpochLeases(
            epoch, self.shard_batches, sorted(workers), done, per_push=per_push, flushes=flushes
        )
        self.servers = dict(servers)
        self.barrier = barrier
        self.active: set[str] = set()  # SYNC: the workers the barrier waits for
        self.since: dict[str, int] = {}  # member -> the version the barrier requires it from
        self._lock = threading.RLock()

    @property
    def remaining(self) -> int:
        """Batches left to train when the epoch (re)starts."""
        done = self.book.done
        return sum(n - min(n, done.get(j, 0)) for j, n in enumerate(self.shard_batches))

    def open(self, workers: Sequence[str], at: int | None = None) -> None:
        """`workers` become the barrier's members, from version `at` (the servers' common
        version; None: unknown, and `account` cannot tell their unreported pushes). SYNC: a
        step half-collected before this attempt (an aborted one's pushes) is discarded, or
        it would mix into the first step."""
        with self._lock:
            self.active = set(workers)
            self.since = {} if at is None else dict.fromkeys(workers, at)
            self.barrier.set_members(self.job_id, self.servers, self.active, discard_pending=True)

    def take(self, worker_id: str) -> DataLease | None:
        """The worker's next lease; None when it has no data left in this epoch."""
        with self._lock:
            lease = self.book.take(worker_id)
            if lease is None:
                self._out_of_data(worker_id)
                return None
        ids = self.plan[lease.data_shard][lease.first_batch * self.batch_size :]
        tokens = self.train[ids]  # (batches * B, T+1)
        return DataLease(
            lease_id=lease.lease_id,
            epoch=self.epoch,
            data_shard=lease.data_shard,
            first_batch=lease.first_batch,
            batches=tokens.shape[0] // self.batch_size,
            tokens=tokens,
        )

    def _out_of_data(self, worker_id: str) -> None:
        """`worker_id` has no data left; called before it is told `done`. SYNC: it leaves the
        barrier now, or the other workers' next step would wait for it forever."""
        if worker_id in self.active:
            self.active = self.active - {worker_id}
            self.barrier.set_members(self.job_id, self.servers, self.active)

    def complete(self, lease_id: str, worker_id: str) -> None:
        self.book.complete(lease_id, worker_id)

    def record(self, lease_id: str, batch_index: int, step: int) -> None:
        self.book.record(lease_id, batch_index, step)

    def lose(self, worker_id: str) -> None:
        """The worker is gone: out of the barrier (its pending gradient discarded on every
        server), its shards orphaned, batches it pushed but that were never applied redone."""
        with self._lock:
            # SYNC: the barrier stops waiting for it and drops its half of the pending step.
            self.active = self.active - {worker_id}
            applied_below = self.barrier.set_members(
                self.job_id, self.servers, self.active, discard=[worker_id]
            )
            self.book.lose(worker_id, applied_below)

    def join(self, worker_id: str, training: Sequence[str]) -> int | None:
        """The worker enters the barrier (before its stream starts: its first push must find
        it a member) and gets a share of the shards not yet leased, with `training`.

        Returns the version its stream starts at, the same on every server; None when the
        servers kept moving past it (`JOIN_TRIES`): nothing changed, try again later.

        SYNC: a join takes effect at one version on every server. Mid-step the servers can
        be one version apart, (s, s + 1): s + 1 had every member's push, s still waits for
        one in flight. The joiner is required from the highest version, v = s + 1: nobody
        waits for it at s (no server can have a push for s + 1 yet: every worker's pull for
        s + 1 waits for all servers, and the lagging one gets there when its push lands).
        Not later: should the others run out of data, the servers would never get there."""
        with self._lock:
            members = self.active | {worker_id}
            for _ in range(JOIN_TRIES):
                at = max(self.barrier.versions(self.job_id, self.servers))
                try:
                    # SYNC: member first, then the stream, or its first push would be refused.
                    self.barrier.set_members(self.job_id, self.servers, members, join_at=at)
                except FailedPrecondition:
                    # A server made step `at` meanwhile (without the joiner). Take the joiner
                    # out where it got in (it pushed nowhere: nothing to discard), retry.
                    self.barrier.set_members(self.job_id, self.servers, self.active)
                    continue
                self.active = members
                self.since[worker_id] = at
                self.book.readmit(worker_id)
                self.book.rebalance([*training, worker_id])
                return at
            return None

    def progress(self, below_step: int) -> dict[int, int]:
        return self.book.progress(below_step)

    def unapplied(self, below_step: int) -> int:
        return self.book.unapplied(below_step)

    def account(self, below_step: int) -> int | None:
        """The servers are at version `below_step` (the ones left after a loss, or after a
        stop): record the members' pushes below it, and those of leases they completed,
        that no event reported (`EpochLeases.account`), before `progress(below_step)` says
        where each data shard stands. Returns how many; None when that cannot be told (then
        the epoch must roll back to a checkpoint instead of resuming at `below_step`).
        Members without a known first version (a stopper) count only if they hold leases."""
        with self._lock:
            members = {w: self.since[w] for w in self.active if w in self.since}
            if any(self.book.taken.get(w) for w in self.active - members.keys()):
                return None
            return self.book.account(members, below_step)

    @property
    def unreported(self) -> int:
        """Batches pushed whose event never came, recorded by `account`."""
        return self.book.unreported

    def reported_step(self, worker_id: str, step: int) -> int:
        """The latest step <= `step` whose push of `worker_id` an event reports: `step`,
        but with fragments, where a flush has none, the window before it
        (`EpochLeases.reported_step`). A stop waiting for its events waits for that one."""
        with self._lock:
            since = self.since.get(worker_id)
            return step if since is None else self.book.reported_step(worker_id, since, step)

    def freeze(self, stopper: str) -> int | None:
        """Stop the epoch at a step boundary: `stopper`, a member that never pushes, joins
        the barrier at the highest version v, so every server makes the steps below v (a
        lagging one gets its in-flight push) and none makes v. Returns v; None when the
        servers kept moving past it (`JOIN_TRIES`).

        SYNC: the same one-version join as `join` (see there); the stopper stays in
        `active`, so a worker leaving the barrier meanwhile does not take it out."""
        with self._lock:
            members = self.active | {stopper}
            for _ in range(JOIN_TRIES):
                at = max(self.barrier.versions(self.job_id, self.servers))
                try:
                    self.barrier.set_members(self.job_id, self.servers, members, join_at=at)
                except FailedPrecondition:
                    self.barrier.set_members(self.job_id, self.servers, self.active)
                    continue
                self.active = members
                return at
            return None

    @property
    def finished(self) -> bool:
        return self.book.finished


class AsyncLeaseDesk(LeaseDesk):
    """ASYNC: the leases of one attempt at an epoch, and the workers whose pushes the
    servers take (their members). Nothing on a server waits for a member, so no change of
    membership moves a barrier: a worker out of data stays a member (it pushes no more); a
    lost one is dropped, so that a late push of its (a worker cut off that still trains) is
    refused instead of training its re-leased batch twice; a joiner is a member at once and
    starts at the servers' lowest version. A worker out of shards of its own takes another's
    (`EpochLeases.steal`): the result depends on timing anyway, so who trains a shard is free.

    A worker reports a batch once its push is applied on every server (each applies it on
    arrival), so every reported batch is in the parameters: a lost worker's shard resumes
    after its last reported batch, none redone. Its event's step s says where: from version
    s + 1 on, every server holds it. A push applied whose event never came (the worker lost,
    or its stream cancelled, between the push and the event) cannot be told from one never
    made, so its batch is trained again: at least once. How many there are is known, though:
    the servers made one version per push, so at a version v they agree on, v - opened_at
    pushes are in, and those not reported are counted (`account`, `unapplied`).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.book.steal = True  # nothing waits for a slow worker's shards: the others help
        self.opened_at: int | None = None  # the servers' version when the attempt opened
        self._made: list[int] = []  # every reported push's s + 1, sorted

    def open(self, workers: Sequence[str], at: int | None = None) -> None:
        with self._lock:
            super().open(workers, at)
            self.opened_at = at

    def _out_of_data(self, worker_id: str) -> None:
        pass  # ASYNC: nobody waits for it; it stays a member and simply stops pushing

    def record(self, lease_id: str, batch_index: int, step: int) -> None:
        with self._lock:
            super().record(lease_id, batch_index, step)
            bisect.insort(self._made, step + 1)

    def reported_below(self, version: int) -> int:
        """Reported pushes in every server's parameters at `version` (step < `version`)."""
        with self._lock:
            return bisect.bisect_right(self._made, version)

    @property
    def highest(self) -> int:
        """The highest version a reported push made (opened_at, or 0, before any)."""
        with self._lock:
            return self._made[-1] if self._made else self.opened_at or 0

    def _unreported(self, version: int) -> int:
        """Pushes in the parameters at `version` (a version the servers agree on) whose
        events never came: the servers made version - opened_at of them since the attempt
        opened, and the events account for the rest."""
        if self.opened_at is None or version <= self.opened_at:
            return 0
        return max(0, version - self.opened_at - self.reported_below(version))

    def lose(self, worker_id: str) -> None:
        """The worker is gone: no longer a member (the servers refuse its pushes from now
        on; none of its is pending anywhere), its shards orphaned, resuming after the last
        batch it reported (every reported push is applied)."""
        with self._lock:
            self.active = self.active - {worker_id}
            self.barrier.set_members(self.job_id, self.servers, self.active)
            self.book.lose(worker_id, applied_below=None)

    def join(self, worker_id: str, training: Sequence[str]) -> int | None:
        """The worker becomes a member (before its stream starts: its first push must find
        it one) and gets a share of the shards not yet leased. Returns the version its stream
        starts at: the servers' lowest, so its first pull sees whatever they are at."""
        with self._lock:
            members = self.active | {worker_id}
            self.barrier.set_members(self.job_id, self.servers, members)
            at = min(self.barrier.versions(self.job_id, self.servers))
            self.active = members
            self.since[worker_id] = at
            self.book.readmit(worker_id)
            self.book.rebalance([*training, worker_id])
            return at

    def account(self, below_step: int) -> int | None:
        """The servers agree on version `below_step` (after a loss or a stop): count the
        pushes in it whose events never came (`unreported`; their batches are trained again,
        at least once: `unapplied`). There is no lease order to read them from, as SYNC has:
        no push is a step of every member. Returns how many; None when more pushes were
        reported than the servers made versions since the attempt opened (the events do not
        add up: roll back)."""
        with self._lock:
            if self.opened_at is not None and len(self._made) > below_step - self.opened_at:
                return None
            n = self._unreported(below_step)
            self.book.unreported += n
            return n

    def unapplied(self, below_step: int) -> int:
        """Batches the next attempt trains again if it starts at `below_step`: those reported
        at steps >= it (none, at a version the servers settled on), and the pushes in the
        parameters at `below_step` that never reported (at least once)."""
        with self._lock:
            return self.book.unapplied(below_step) + self._unreported(below_step)

    def freeze(self, stopper: str) -> int | None:
        """ASYNC: there is no barrier to freeze (`EpochStop` cancels the streams and takes
        in the events on their way instead)."""
        return None


DESKS: dict[str, type[LeaseDesk]] = {
    "sync": LeaseDesk,
    "bounded_staleness": LeaseDesk,  # SSP keeps SYNC's membership: every member, every step
    "async": AsyncLeaseDesk,
}
"""Consistency mode (`lmps.core.settings.CONSISTENCIES`) -> its lease desk."""
