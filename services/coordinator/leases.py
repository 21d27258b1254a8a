"""Data leases for one epoch: every data shard is completed exactly once. Pure.

In SYNC mode the step composition must not depend on timing, or two runs of the same job
(or a resumed run) would differ. So shard j is owned by worker j mod W (workers sorted by
id) and each worker takes its own shards in order. Shards of a lost worker become orphans
that any worker (including a replacement that joins mid-epoch) takes first.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    ) -> None:
        """`shard_batches[j]`: batches in data shard j; `done[j]`: batches already trained."""
        self.epoch = epoch
        self.shard_batches = list(shard_batches)
        self.done: dict[int, int] = {j: n for j, n in (done or {}).items() if n > 0}
        self.own: dict[str, deque[int]] = {w: deque() for w in sorted(workers)}
        self.orphans: deque[int] = deque()
        order = sorted(workers)
        for j, n in enumerate(self.shard_batches):
            if self.done.get(j, 0) >= n:
                continue  # finished before a checkpoint we resumed from
            if order:
                self.own[order[j % len(order)]].append(j)
            else:
                self.orphans.append(j)
        self.outstanding: dict[str, Lease] = {}
        self.completed: list[int] = [
            j for j, n in enumerate(self.shard_batches) if self.done.get(j, 0) >= n
        ]
        self.lost: set[str] = set()
        self.releases = 0  # leases handed back by lost workers
        self.redone_batches = 0  # batches trained by a lost worker but not applied, trained again
        self._next_id = 0
        self._lock = threading.Lock()

    def take(self, worker_id: str) -> Lease | None:
        with self._lock:
            if worker_id in self.lost:
                raise FailedPrecondition(
                    f"worker {worker_id!r} was dropped from epoch {self.epoch}"
                )
            queue = self.orphans if self.orphans else self.own.get(worker_id, deque())
            if not queue:
                return None
            j = queue.popleft()
            lease = Lease(
                f"e{self.epoch}-l{self._next_id}-s{j}",
                worker_id,
                j,
                self.done.get(j, 0),
                self.shard_batches[j],
            )
            self._next_id += 1
            self.outstanding[lease.lease_id] = lease
            return lease

    def record(self, lease_id: str, batch_index: int, step: int) -> None:
        """A step event: `batch_index` of the lease was pushed at `step`."""
        with self._lock:
            lease = self.outstanding.get(lease_id)
            if lease is not None:
                lease.seen.append((batch_index, step))

    def complete(self, lease_id: str, worker_id: str) -> None:
        with self._lock:
            lease = self.outstanding.get(lease_id)
            if lease is None or lease.worker_id != worker_id:
                raise NotFound(f"unknown lease {lease_id!r} for worker {worker_id!r}")
            del self.outstanding[lease_id]
            self.done[lease.data_shard] = lease.batches
            self.completed.append(lease.data_shard)

    def lose(self, worker_id: str, applied_below: int) -> list[int]:
        """Worker lost: its shards become orphans. Batches it pushed at steps below
        `applied_below` are kept (they are in the parameters); the rest will be redone."""
        with self._lock:
            self.lost.add(worker_id)
            orphaned: list[int] = []
            for lid in [
                lid for lid, lease in self.outstanding.items() if lease.worker_id == worker_id
            ]:
                lease = self.outstanding.pop(lid)
                kept = [b for b, s in lease.seen if s < applied_below]
                first = max([lease.first_batch - 1, *kept]) + 1
                self.redone_batches += len(lease.seen) - len(kept)
                self.done[lease.data_shard] = first
                orphaned.append(lease.data_shard)
                self.releases += 1
            orphaned += list(self.own.pop(worker_id, deque()))
            self.orphans.extend(orphaned)
            return orphaned

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
        """Batches per data shard that are in the parameters at version `below_step`."""
        with self._lock:
            out = dict(self.done)
            for lease in self.outstanding.values():
                kept = [b for b, s in lease.seen if s < below_step]
                if kept:
                    out[lease.data_shard] = max(out.get(lease.data_shard, 0), max(kept) + 1)
            return out

    @property
    def finished(self) -> bool:
        with self._lock:
            return not self.outstanding and not self.orphans and not any(self.own.values())
