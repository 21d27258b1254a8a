"""Data leases for one epoch: a queue of data shards, each completed exactly once. Pure."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from lmps.errors import NotFound


@dataclass
class Lease:
    lease_id: str
    worker_id: str
    data_shard: int


@dataclass
class EpochLeases:
    """Shards are handed out in order; a lease given back (dead worker) goes to the front."""

    epoch: int
    num_shards: int
    queue: deque[int] = field(default_factory=deque)
    outstanding: dict[str, Lease] = field(default_factory=dict)
    completed: list[int] = field(default_factory=list)
    requeued: int = 0
    _next_id: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.queue.extend(range(self.num_shards))

    def take(self, worker_id: str) -> Lease | None:
        with self._lock:
            if not self.queue:
                return None
            shard = self.queue.popleft()
            lease = Lease(f"e{self.epoch}-l{self._next_id}", worker_id, shard)
            self._next_id += 1
            self.outstanding[lease.lease_id] = lease
            return lease

    def complete(self, lease_id: str, worker_id: str) -> None:
        with self._lock:
            lease = self.outstanding.get(lease_id)
            if lease is None or lease.worker_id != worker_id:
                raise NotFound(f"unknown lease {lease_id!r} for worker {worker_id!r}")
            del self.outstanding[lease_id]
            self.completed.append(lease.data_shard)

    def release_worker(self, worker_id: str) -> list[int]:
        """Put a lost worker's unfinished shards back at the front of the queue."""
        with self._lock:
            lost = [lid for lid, lease in self.outstanding.items() if lease.worker_id == worker_id]
            shards = [self.outstanding.pop(lid).data_shard for lid in lost]
            self.queue.extendleft(reversed(shards))
            self.requeued += len(shards)
            return shards

    @property
    def finished(self) -> bool:
        with self._lock:
            return not self.queue and not self.outstanding
