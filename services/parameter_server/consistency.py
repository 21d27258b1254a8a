"""The consistency seam of a parameter server: when pushes become an update, and which
version a pull may see.

The store (`store.py`) keeps values, optimizer, versions and snapshots; a `Barrier` decides
how workers' pushes combine into updates. The interface follows ps-lite's settable request
handle (Li et al., "Scaling Distributed Machine Learning with the Parameter Server", OSDI'14):
the server-side policy is one object told that a push arrived or that membership changed, each
of which may yield an update to apply, and asked which version a pull may see, the hook the
paper's bounded delay (and Petuum's SSP) needs. The update itself runs on the server, as with
MXNet KVStore's `set_optimizer`; the barrier only hands the store the gradient to apply.

`SyncBarrier` is bulk synchronous parallel (BSP, MXNet's dist_sync): step s is applied once
every member required for s pushed for s, with the sample-weighted mean of their gradients;
a member that joined with `join_at` is required from that version on. `BARRIERS` maps a
mode of `lmps.core.settings.CONSISTENCIES` to its class: a new mode is one class and one row.

Pure torch: no grpc. Not thread-safe on its own: the store calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from lmps.core.errors import AlreadyExists, FailedPrecondition, NotFound, OutOfRange
from lmps.core.settings import Consistency


@dataclass(frozen=True)
class Update:
    """What the store applies: one optimizer step with `grads`, made of `made_of`."""

    grads: dict[str, torch.Tensor]
    """fp32 gradient per shard id, in the order of the shards given to the barrier."""
    made_of: tuple[tuple[str, float], ...]
    """(worker id, weight) of every contribution, in summation order (the history digest)."""


class Barrier(Protocol):
    """How one job's pushes turn into updates. Every method runs under the store's lock."""

    @property
    def members(self) -> frozenset[str]:
        """Workers this job's updates wait for (ListShards `members`)."""
        ...

    @property
    def pushed(self) -> frozenset[str]:
        """Workers whose contribution is pending, not yet in an update (ListShards `pushed`)."""
        ...

    @property
    def pending(self) -> int:
        """Members required for the pending step that have still to push for it."""
        ...

    @property
    def version(self) -> int:
        """The pending step: the version the barrier started at plus the updates it made."""
        ...

    def admit(self, worker_id: str, step: int, version: int) -> None:
        """Raise unless `worker_id` may push for `step` with the server at `version`.
        Changes nothing: the store checks the gradients after this and before `push`."""
        ...

    def push(
        self, worker_id: str, step: int, weight: float, grads: Mapping[str, torch.Tensor]
    ) -> Update | None:
        """An admitted push with checked gradients arrived: the update to apply now, or None.

        `grads` become the barrier's (an fp32 gradient is kept as is, not copied): the caller
        must not write to them afterwards."""
        ...

    def set_members(
        self, members: Iterable[str], discard: Iterable[str], join_at: int = 0
    ) -> Update | None:
        """Membership changed; drop `discard`'s pending contributions. May complete a step.

        Members new in `members` are required from version `join_at` on (0: at once).
        FailedPrecondition, nothing changed, when `join_at` > 0 and the barrier is past it."""
        ...

    def readable(self, version: int, wanted: int) -> bool:
        """May a pull asking for `wanted` be answered with the server at `version`?"""
        ...


class SyncBarrier:
    """BSP: the update for step `version` is the weighted mean of the gradients of every
    member required for it (a member is required from the version it joined at on).

    Each worker's gradient is kept apart until the step completes, so a lost worker's
    contribution can be dropped and the sum runs in a fixed order (sorted worker ids) in
    fp64: the result does not depend on arrival order or timing, and weight * grad sums
    cannot overflow.

    SYNC: a join takes effect at one version on every server. Mid-step the servers may be one
    version apart (one made step s, another still waits for an in-flight push for s); a
    joiner required from s + 1 is not waited for at s on the lagging one, so both make s
    from the same pushes and s + 1 with the joiner.
    """

    def __init__(
        self,
        *,
        job_id: str,
        numel: Mapping[str, int],
        members: Iterable[str],
        version: int = 0,
    ) -> None:
        self._job_id = job_id
        self._numel = dict(numel)  # shard id -> elements, in load order
        self._version = version  # the pending step
        self._first = dict.fromkeys(members, 0)  # member -> first version it is required for
        self._contrib: dict[str, dict[str, torch.Tensor]] = {}  # worker -> fp32 grad per shard
        self._weight: dict[str, float] = {}  # worker -> weight (samples) for the pending step
        # The fp64 accumulator, reused for every shard of every step: a fresh 2 x shard-sized
        # buffer each time is page faults on every byte (large blocks are their own mappings).
        self._scratch = torch.empty(max(self._numel.values(), default=0), dtype=torch.float64)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._first)

    @property
    def pushed(self) -> frozenset[str]:
        return frozenset(self._weight)

    @property
    def pending(self) -> int:
        return len(self._required() - self._weight.keys())

    @property
    def version(self) -> int:
        return self._version

    def _required(self) -> set[str]:
        """The members the pending step waits for."""
        return {w for w, first in self._first.items() if first <= self._version}

    def admit(self, worker_id: str, step: int, version: int) -> None:
        first = self._first.get(worker_id)
        if first is None:
            raise NotFound(f"push: worker {worker_id!r} is not a member of job {self._job_id!r}")
        if step < version:
            raise FailedPrecondition(f"push: stale step {step}; server is at version {version}")
        if step > version:
            raise OutOfRange(f"push: future step {step}; server is at version {version}")
        if step < first:
            raise FailedPrecondition(
                f"push: worker {worker_id!r} joined at version {first}, not for step {step}"
            )
        if worker_id in self._weight:
            raise AlreadyExists(f"push: worker {worker_id!r} already pushed step {step}")

    def push(
        self, worker_id: str, step: int, weight: float, grads: Mapping[str, torch.Tensor]
    ) -> Update | None:
        self._contrib[worker_id] = {sid: g.to(torch.float32) for sid, g in grads.items()}
        self._weight[worker_id] = weight
        return self._complete()

    def set_members(
        self, members: Iterable[str], discard: Iterable[str], join_at: int = 0
    ) -> Update | None:
        if join_at and self._version > join_at:
            raise FailedPrecondition(
                f"set_members: join_at {join_at} is past; server is at version {self._version}"
            )
        # A member already here keeps the version it was required from; a new one (or one
        # removed before and added again) is required from `join_at` on.
        self._first = {w: self._first.get(w, join_at) for w in sorted(set(members))}
        for worker_id in set(discard):
            self._contrib.pop(worker_id, None)
            self._weight.pop(worker_id, None)
        return self._complete()

    def readable(self, version: int, wanted: int) -> bool:
        return version >= wanted  # a pull sees exactly the steps every member made

    def _complete(self) -> Update | None:
        """The weighted mean once every member required for the pending step pushed
        (non-members that pushed before they left still count unless discarded), and a fresh
        pending step; else None."""
        if not self._weight or not self._required() <= self._weight.keys():
            return None
        total = sum(self._weight.values())
        workers = sorted(self._contrib)  # a fixed summation order: results don't depend on timing
        contrib, self._contrib = self._contrib, {}
        mean = {}
        for sid, numel in self._numel.items():
            # fp64: weight * grad sums cannot overflow, and the mean is back in fp32 range.
            acc = self._scratch[:numel].zero_()
            for w in workers:
                # Each contribution is let go of as soon as it is summed: the means replace
                # the gradients shard by shard, never a full extra copy of them.
                acc.add_(contrib[w].pop(sid), alpha=self._weight[w])
            mean[sid] = acc.div_(total).to(torch.float32)
            del acc
        made_of = tuple((w, self._weight[w]) for w in workers)
        self._weight = {}
        self._version += 1
        return Update(mean, made_of)


class BarrierFactory(Protocol):
    def __call__(
        self, *, job_id: str, numel: Mapping[str, int], members: Iterable[str], version: int = 0
    ) -> Barrier: ...


BARRIERS: dict[str, BarrierFactory] = {
    "sync": SyncBarrier,
}
"""Consistency mode (`lmps.core.settings.CONSISTENCIES`) -> the class of its barrier."""


def make_barrier(
    mode: Consistency,
    *,
    job_id: str,
    numel: Mapping[str, int],
    members: Iterable[str],
    version: int = 0,
) -> Barrier:
    """The barrier of `mode` for one job; ValueError for a mode this build does not know.

    `numel`: elements of every shard by id, in the order updates list them; `version`: the
    version of the loaded values (the first pending step).
    """
    factory = BARRIERS.get(mode)
    if factory is None:
        raise ValueError(f"unknown consistency {mode!r}; this server knows {sorted(BARRIERS)}")
    return factory(job_id=job_id, numel=numel, members=members, version=version)
