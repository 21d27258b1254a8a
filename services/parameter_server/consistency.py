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
a member that joined with `join_at` is required from that version on. `AsyncBarrier` is
the asynchronous parameter server (Hogwild-style; TF's ParameterServerStrategy, ps-lite's
default, MXNet's dist_async): each push is an update of its own, applied at once. `BARRIERS`
maps a mode of `lmps.core.settings.CONSISTENCIES` to its class: a new mode is one class and
one row.

Pure torch: no grpc. Not thread-safe on its own: the store calls it under its lock.
"""

from __future__ import annotations

import math
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
    push: tuple[str, int, float] | None = None
    """ASYNC: the one push this update is, as (worker id, step, weight): the same on every
    server it reached. Servers apply pushes in arrival order, which may differ between them,
    so the store folds it into the history digest whatever the order. None: a step of a
    barrier that makes the same steps in the same order on every server (the digest chains
    them)."""


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

    def admit(
        self, worker_id: str, step: int, version: int, computed_at: int | None = None
    ) -> None:
        """Raise unless `worker_id` may push for `step` with the server at `version`, with
        a gradient computed at version `computed_at` (None: at `step`). Changes nothing:
        the store checks the gradients after this and before `push`."""
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

    def ready(self) -> Update | None:
        """The update of the pending step if it is already complete: after an update, the
        next step's pushes may all be in (bounded staleness lets workers push ahead). The
        store asks after every update it applies, until None."""
        ...

    def readable(self, version: int, wanted: int) -> bool:
        """May a pull asking for `wanted` be answered with the server at `version`?"""
        ...

    def rewind(self, version: int) -> None:
        """The update the barrier handed out last, for step `version`, was dropped unapplied
        (gradient clipping parks a complete step until its norm comes; an attempt that starts
        at `version` drops it): the pending step is `version` again, with nothing pushed."""
        ...


class SyncBarrier:
    """BSP: the update for step `version` is the weighted mean of the gradients of every
    member required for it (a member is required from the version it joined at on).

    Each worker's gradient is kept apart until the step completes, so a lost worker's
    contribution can be dropped and the sum runs in a fixed order (sorted worker ids) in
    fp64: the result does not depend on arrival order or timing, and weight * grad sums
    cannot overflow.

    Bounded staleness (`max_staleness` s > 0; Petuum's SSP, Ho et al., "More Effective
    Distributed ML via a Stale Synchronous Parallel Parameter Server", NIPS 2013): a worker's
    clock is the step it pushes for, and it may push for steps up to s past the server's
    version, with a gradient computed at any version >= step - s. Steps are still applied
    one at a time, in order, each the weighted mean of every required member's push for it:
    the composition of every step is SYNC's; only the versions the gradients were computed
    at may lag, by at most s. s = 0 is SYNC exactly.

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
        max_staleness: int = 0,
    ) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self._job_id = job_id
        self._numel = dict(numel)  # shard id -> elements, in load order
        self._version = version  # the pending step
        self._staleness = max_staleness
        self._first = dict.fromkeys(members, 0)  # member -> first version it is required for
        # step -> worker -> fp32 grad per shard / weight (samples); SYNC: only the pending
        # step; bounded staleness: up to s steps past it too.
        self._contrib: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self._weight: dict[int, dict[str, float]] = {}
        # The fp64 accumulator, reused for every shard of every step: a fresh 2 x shard-sized
        # buffer each time is page faults on every byte (large blocks are their own mappings).
        self._scratch = torch.empty(max(self._numel.values(), default=0), dtype=torch.float64)

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._first)

    @property
    def pushed(self) -> frozenset[str]:
        return frozenset(self._weight.get(self._version, {}))

    @property
    def ahead(self) -> frozenset[str]:
        """Workers with a push pending for a step past the pending one (bounded staleness)."""
        return frozenset(w for s, ws in self._weight.items() if s > self._version for w in ws)

    @property
    def pending(self) -> int:
        return len(self._required(self._version) - self._weight.get(self._version, {}).keys())

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_staleness(self) -> int:
        return self._staleness

    def _required(self, step: int) -> set[str]:
        """The members step `step` waits for."""
        return {w for w, first in self._first.items() if first <= step}

    def admit(
        self, worker_id: str, step: int, version: int, computed_at: int | None = None
    ) -> None:
        first = self._first.get(worker_id)
        if first is None:
            raise NotFound(f"push: worker {worker_id!r} is not a member of job {self._job_id!r}")
        if step < version:
            raise FailedPrecondition(f"push: stale step {step}; server is at version {version}")
        if step > version + self._staleness:
            bound = f" + max_staleness {self._staleness}" if self._staleness else ""
            raise OutOfRange(f"push: future step {step}; server is at version {version}{bound}")
        if step < first:
            raise FailedPrecondition(
                f"push: worker {worker_id!r} joined at version {first}, not for step {step}"
            )
        if worker_id in self._weight.get(step, {}):
            raise AlreadyExists(f"push: worker {worker_id!r} already pushed step {step}")
        if computed_at is not None:
            if computed_at > version:
                raise FailedPrecondition(
                    f"push: computed at version {computed_at}; server is at version {version}"
                )
            if not step - self._staleness <= computed_at <= step:
                raise FailedPrecondition(
                    f"push: step {step} computed at version {computed_at}, outside "
                    f"[step - max_staleness {self._staleness}, step]"
                )

    def push(
        self, worker_id: str, step: int, weight: float, grads: Mapping[str, torch.Tensor]
    ) -> Update | None:
        contrib = {sid: g.to(torch.float32) for sid, g in grads.items()}
        self._contrib.setdefault(step, {})[worker_id] = contrib
        self._weight.setdefault(step, {})[worker_id] = weight
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
        for worker_id in set(discard):  # every step it pushed for, ahead or pending
            for step in list(self._weight):
                self._contrib[step].pop(worker_id, None)
                self._weight[step].pop(worker_id, None)
                if not self._weight[step]:
                    del self._weight[step], self._contrib[step]
        return self._complete()

    def ready(self) -> Update | None:
        return self._complete()

    def readable(self, version: int, wanted: int) -> bool:
        return version >= wanted  # a pull sees exactly the steps every member made

    def rewind(self, version: int) -> None:
        if version != self._version - 1 or any(s >= version for s in self._weight):
            raise ValueError(f"rewind to {version}: the barrier is at {self._version}")
        self._version = version

    def _complete(self) -> Update | None:
        """The weighted mean once every member required for the pending step pushed
        (non-members that pushed before they left still count unless discarded), and a fresh
        pending step; else None."""
        step = self._version
        weights = self._weight.get(step, {})
        if not weights or not self._required(step) <= weights.keys():
            return None
        total = sum(weights.values())
        workers = sorted(weights)  # a fixed summation order: results don't depend on timing
        contrib = self._contrib.pop(step)
        del self._weight[step]
        mean = {}
        # The shards the step's pushes carry: all of them, or with streaming fragments the
        # step's fragment (the store checked every push carries exactly those).
        shards = {sid: n for sid, n in self._numel.items() if sid in contrib[workers[0]]}
        if len(workers) == 1 and _exact_scale(weights[workers[0]]):
            # One contribution: the fp64 mean (w * g) / w is g itself, bit for bit (the
            # product of an fp32 g and a w of <= 29 significant bits is exact in fp64, and
            # so is dividing it back), so the four passes below are skipped for one: g + 0.0,
            # a fresh tensor (the optimizer owns what it is handed; a push is a view of the
            # bytes received) that also maps -0.0 to +0.0 as the zeroed fp64 sum does.
            only = contrib.pop(workers[0])
            for sid in shards:
                mean[sid] = torch.add(only.pop(sid).to(torch.float32), 0.0)
            self._version += 1
            return Update(mean, ((workers[0], weights[workers[0]]),))
        for sid, numel in shards.items():
            # fp64: weight * grad sums cannot overflow, and the mean is back in fp32 range.
            acc = self._scratch[:numel].zero_()
            for w in workers:
                # Each contribution is let go of as soon as it is summed: the means replace
                # the gradients shard by shard, never a full extra copy of them.
                acc.add_(contrib[w].pop(sid), alpha=weights[w])
            mean[sid] = acc.div_(total).to(torch.float32)
            del acc
        made_of = tuple((w, weights[w]) for w in workers)
        self._version += 1
        return Update(mean, made_of)


def _exact_scale(weight: float) -> bool:
    """Whether weight * x is exact in fp64 for every fp32 x: the weight's significand has
    at most 53 - 24 = 29 bits (sequence and token counts below 2**29 have)."""
    mantissa, _ = math.frexp(weight)
    return math.isfinite(weight) and weight > 0 and (mantissa * 2**29).is_integer()


class AsyncBarrier:
    """ASYNC: every admitted push is an update of its own, applied at once (Recht et al.,
    "Hogwild!", NIPS 2011, on a parameter server: TF's ParameterServerStrategy, ps-lite's
    default, MXNet's dist_async). The update is the worker's gradient as pushed (its batch's
    mean gradient): one optimizer step with that gradient alone, so the push's weight does
    not scale it (it goes into the history digest only). The store makes one version per push.

    Staleness is unbounded: a push for any step up to the server's version is taken, whatever
    version its gradient was computed at (`step`, the lowest version its worker pulled; the
    store measures the staleness against its own version). A push for a step past the
    version is refused: no worker can have pulled it. A worker's steps only go up (its pull
    after a push sees the version that push made, on every server), so a push for a step it
    already pushed for, or an earlier one, is a duplicate and refused: each push is applied
    at most once. Nothing is ever pending: `pushed` is empty, `pending` 0, and a membership
    change completes nothing; membership is only who may push (a dropped worker's late pushes
    are refused).
    """

    def __init__(
        self,
        *,
        job_id: str,
        numel: Mapping[str, int],
        members: Iterable[str],
        version: int = 0,
        max_staleness: int = 0,
    ) -> None:
        if max_staleness:
            raise ValueError("max_staleness is for bounded staleness; ASYNC needs 0")
        self._job_id = job_id
        self._order = list(numel)  # shard id, in load order
        self._version = version  # the version the next push makes an update at
        self._members = frozenset(members)
        self._last: dict[str, int] = {}  # worker -> the step of its last push taken

    @property
    def members(self) -> frozenset[str]:
        return self._members

    @property
    def pushed(self) -> frozenset[str]:
        return frozenset()

    @property
    def pending(self) -> int:
        return 0

    @property
    def version(self) -> int:
        return self._version

    def admit(
        self, worker_id: str, step: int, version: int, computed_at: int | None = None
    ) -> None:
        if worker_id not in self._members:
            raise NotFound(f"push: worker {worker_id!r} is not a member of job {self._job_id!r}")
        if step > version:
            raise OutOfRange(f"push: future step {step}; server is at version {version}")
        last = self._last.get(worker_id)
        if last is not None and step <= last:
            raise AlreadyExists(
                f"push: worker {worker_id!r} already pushed for step {last} (>= {step})"
            )
        if computed_at is not None and computed_at != step:
            raise FailedPrecondition(
                f"push: step {step} computed at version {computed_at}; ASYNC pushes are for "
                "the version they were computed at"
            )

    def push(
        self, worker_id: str, step: int, weight: float, grads: Mapping[str, torch.Tensor]
    ) -> Update | None:
        self._last[worker_id] = step
        self._version += 1
        # A copy, as SYNC's mean is a fresh tensor: the optimizer owns what it is handed (a
        # pushed gradient is a read-only view of the bytes received).
        update = {sid: grads[sid].to(torch.float32, copy=True) for sid in self._order}
        return Update(update, ((worker_id, weight),), push=(worker_id, step, weight))

    def set_members(
        self, members: Iterable[str], discard: Iterable[str], join_at: int = 0
    ) -> Update | None:
        # Nothing is pending, so there is nothing to discard or complete; a joiner may push
        # at once (`join_at` only matters where a step waits for its members).
        self._members = frozenset(members)
        return None

    def ready(self) -> Update | None:
        return None

    def readable(self, version: int, wanted: int) -> bool:
        return version >= wanted  # any version will do; a worker asks for one it has seen

    def rewind(self, version: int) -> None:
        raise ValueError("ASYNC applies every update at once: there is none to rewind")


class BarrierFactory(Protocol):
    def __call__(
        self,
        *,
        job_id: str,
        numel: Mapping[str, int],
        members: Iterable[str],
        version: int = 0,
        max_staleness: int = 0,
    ) -> Barrier: ...


BARRIERS: dict[str, BarrierFactory] = {
    "sync": SyncBarrier,
    "bounded_staleness": SyncBarrier,  # with max_staleness > 0 (SSP)
    "async": AsyncBarrier,
}
"""Consistency mode (`lmps.core.settings.CONSISTENCIES`) -> the class of its barrier."""


def make_barrier(
    mode: Consistency,
    *,
    job_id: str,
    numel: Mapping[str, int],
    members: Iterable[str],
    version: int = 0,
    max_staleness: int = 0,
) -> Barrier:
    """The barrier of `mode` for one job; ValueError for a mode this build does not know.

    `numel`: elements of every shard by id, in the order updates list them; `version`: the
    version of the loaded values (the first pending step); `max_staleness`: how many steps
    past the server's version a push may be for (0 under SYNC and ASYNC).
    """
    factory = BARRIERS.get(mode)
    if factory is None:
        raise ValueError(f"unknown consistency {mode!r}; this server knows {sorted(BARRIERS)}")
    if mode == "sync" and max_staleness:
        raise ValueError("max_staleness is for bounded staleness; SYNC needs 0")
    return factory(
        job_id=job_id, numel=numel, members=members, version=version, max_staleness=max_staleness
    )
