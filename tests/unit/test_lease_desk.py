"""The lease lifecycle's owner (services/coordinator/leases.py `LeaseDesk`) against a fake
fleet that records every barrier change. In-process, milliseconds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmps.core.errors import FailedPrecondition
from lmps.services.coordinator.leases import DataLease, LeaseDesk

B, T = 2, 4  # batch size, sequence length + 1


@dataclass
class FakeBarrier:
    """Records SetMembers calls as the servers would see them; `applied` plays the servers'
    answer (lowest version at which a dropped contribution could have been pending)."""

    calls: list[tuple[list[str], bool, list[str]]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # set_members and lease answers, in order
    applied: int = 0
    at: list[int] = field(default_factory=lambda: [0])  # the servers' versions
    join_at: list[int] = field(default_factory=list)  # join_at of every call

    def set_members(
        self,
        job_id: str,
        servers: Mapping[str, str],
        members: set[str],
        discard_pending: bool = False,
        discard: Sequence[str] = (),
        join_at: int = 0,
    ) -> int:
        self.calls.append((sorted(members), discard_pending, list(discard)))
        self.join_at.append(join_at)
        self.log.append(f"members {sorted(members)}")
        return self.applied

    def versions(self, job_id: str, servers: Mapping[str, str]) -> list[int]:
        return list(self.at)

    @property
    def members(self) -> list[str]:
        return self.calls[-1][0]


def make_desk(
    barrier: FakeBarrier,
    shards: int = 5,
    workers: Sequence[str] = ("w0", "w1"),
    done: Mapping[int, int] | None = None,
) -> LeaseDesk:
    batches = 2
    n = shards * batches * B
    plan = list(torch.arange(n).reshape(shards, batches * B))
    train = torch.arange(n * T, dtype=torch.int32).reshape(n, T)
    desk = LeaseDesk(
        job_id="job-1",
        epoch=0,
        plan=plan,
        train=train,
        batch_size=B,
        workers=workers,
        done=done or {},
        servers={"ps-0": "127.0.0.1:1"},
        barrier=barrier,
    )
    desk.open(workers)
    return desk


def take(desk: LeaseDesk, worker: str, barrier: FakeBarrier) -> DataLease | None:
    lease = desk.take(worker)
    barrier.log.append(f"{worker} done" if lease is None else f"{worker} lease {lease.data_shard}")
    return lease


def test_open_sets_the_barrier_and_discards_a_half_collected_step() -> None:
    barrier = FakeBarrier()
    desk = make_desk(barrier)
    assert barrier.calls == [(["w0", "w1"], True, [])]
    assert desk.active == {"w0", "w1"}


def test_shard_j_goes_to_worker_j_mod_w_with_its_tokens() -> None:
    barrier = FakeBarrier()
    desk = make_desk(barrier, shards=4)
    got: dict[str, list[int]] = {"w0": [], "w1": []}
    for w in ("w0", "w1", "w0", "w1"):
        lease = desk.take(w)
        assert lease is not None
        got[w].append(lease.data_shard)
        rows = desk.plan[lease.data_shard]
        torch.testing.assert_close(lease.tokens, desk.train[rows])
        assert lease.batches == 2 and lease.first_batch == 0
    assert got == {"w0": [0, 2], "w1": [1, 3]}


def test_out_of_data_leaves_the_barrier_before_done() -> None:
    barrier = FakeBarrier()
    desk = make_desk(barrier, shards=2)
    first = take(desk, "w0", barrier)
    assert first is not None
    desk.complete(first.lease_id, "w0")
    assert take(desk, "w0", barrier) is None
    # The barrier stopped waiting for w0 before w0 heard `done`.
    assert barrier.log[-2:] == ["members ['w1']", "w0 done"]
    assert desk.active == {"w1"}
    calls = len(barrier.calls)
    assert desk.take("w0") is None  # asking again changes nothing
    assert len(barrier.calls) == calls


def test_lost_worker_leaves_with_its_pending_gradient_and_its_shards_are_re_leased() -> None:
    barrier = FakeBarrier()
    desk = make_desk(barrier, shards=4)
    lease = desk.take("w1")
    assert lease is not None and lease.data_shard == 1
    desk.record(lease.lease_id, 0, 5)  # applied (below `applied`)
    desk.record(lease.lease_id, 1, 6)  # pushed but never applied: redone
    barrier.applied = 6
    desk.lose("w1")
    assert barrier.calls[-1] == (["w0"], False, ["w1"])
    with pytest.raises(FailedPrecondition):
        desk.take("w1")
    orphan = desk.take("w0")  # orphans first, resuming after the applied batch
    assert orphan is not None and orphan.data_shard == 1 and orphan.first_batch == 1
    assert orphan.batches == 1
    assert desk.book.redone_batches == 1 and desk.book.releases == 1


def test_a_joining_worker_enters_the_barrier_and_gets_a_share() -> None:
    barrier = FakeBarrier()
    desk = make_desk(barrier, shards=6, workers=["w0"])
    first = desk.take("w0")
    assert first is not None
    barrier.at = [3, 4]  # mid-step: one server made step 3, the other waits for a push
    assert desk.join("w1", training=["w0"]) == 4  # the highest version: the stream starts there
    assert barrier.calls[-1] == (["w0", "w1"], False, [])
    assert barrier.join_at[-1] == 4
    lease = desk.take("w1")
    assert lease is not None and lease.data_shard != first.data_shard


def test_resumed_shards_start_after_what_the_checkpoint_holds() -> None:
    barrier = FakeBarrier()
    desk = make_desk(barrier, shards=3, done={0: 2, 1: 1})
    assert desk.remaining == 3  # shard 0 done, one batch of shard 1 left, shard 2 whole
    lease = desk.take("w1")  # w1 owns shard 1
    assert lease is not None and (lease.data_shard, lease.first_batch, lease.batches) == (1, 1, 1)


@settings(max_examples=60, deadline=None)
@given(
    shards=st.integers(1, 12),
    events=st.lists(st.tuples(st.sampled_from(["w0", "w1", "w2"]), st.booleans()), max_size=40),
)
def test_every_shard_exactly_once_whoever_is_lost(
    shards: int, events: list[tuple[str, bool]]
) -> None:
    """Workers take and complete leases in any order; some are lost mid-lease. Whoever is
    left drains the rest: every shard is completed exactly once."""
    barrier = FakeBarrier()
    workers = ["w0", "w1", "w2"]
    desk = make_desk(barrier, shards=shards, workers=workers)
    alive = set(workers)
    for worker, lose in events:
        if worker not in alive:
            continue
        if lose and len(alive) > 1:
            desk.take(worker)
            desk.lose(worker)
            alive.discard(worker)
            assert worker not in barrier.members
            continue
        lease = desk.take(worker)
        if lease is not None:
            desk.complete(lease.lease_id, worker)
    for worker in sorted(alive):
        while (lease := desk.take(worker)) is not None:
            desk.complete(lease.lease_id, worker)
    assert desk.finished
    assert sorted(desk.book.completed) == list(range(shards))
    assert barrier.members == []  # everyone left the barrier when out of data


def opened_at(barrier: FakeBarrier, at: int, shards: int = 6) -> LeaseDesk:
    """Two workers, data shards of two batches, the barrier requiring both from `at`."""
    desk = make_desk(barrier, shards=shards)
    desk.open(["w0", "w1"], at=at)
    return desk


def leased(desk: LeaseDesk, worker: str) -> DataLease:
    lease = desk.take(worker)
    assert lease is not None
    return lease


def test_a_step_the_servers_made_but_nobody_reported_is_counted_done() -> None:
    """After a server loss the survivors stand at version 12: w1's push for step 11 reached
    them (it failed on the lost server, so w1 never reported it). Step 11 is in the
    parameters: resuming must not train w1's batch again."""
    barrier = FakeBarrier()
    desk = opened_at(barrier, 10)
    a, b = leased(desk, "w0"), leased(desk, "w1")  # data shards 0 and 1
    desk.record(a.lease_id, 0, 10)
    desk.record(b.lease_id, 0, 10)
    desk.record(a.lease_id, 1, 11)
    desk.complete(a.lease_id, "w0")
    c = leased(desk, "w0")  # shard 2, not trained yet: w0 waits for version 12
    assert desk.progress(12) == {0: 2, 1: 1}  # without the inference: shard 1 batch 1 again
    assert desk.account(12) == 1
    assert desk.progress(12) == {0: 2, 1: 2}
    assert desk.unapplied(12) == 0 and desk.unreported == 1
    assert desk.account(12) == 0  # recorded once: asking again adds nothing
    assert (c.data_shard, c.first_batch) == (2, 0)


def test_unreported_steps_follow_each_workers_lease_order_across_leases() -> None:
    """No event at all from w1 since step 10, the survivors at 13: w1 trained the leases it
    took in order, one batch per step: shard 1's two batches at 10 and 11, shard 3's first
    at 12. (w0 was lost meanwhile: not a member, so nothing is inferred for it.)"""
    barrier = FakeBarrier()
    desk = opened_at(barrier, 10)
    first = leased(desk, "w1")
    desk.complete(first.lease_id, "w1")
    second = leased(desk, "w1")
    assert (first.data_shard, second.data_shard) == (1, 3)
    leased(desk, "w0")
    desk.lose("w0")
    assert desk.account(13) == 3
    assert desk.progress(13) == {0: 0, 1: 2, 3: 1}  # shard 0: w0's, orphaned
    assert desk.unapplied(13) == 0


def test_a_completed_lease_pushed_past_the_version_is_redone_not_skipped() -> None:
    """w1 pushed its lease's last batch at step 11 and completed it, but no event came and
    the survivors stand at 11 (step 11 was not made): that batch is not in the parameters."""
    barrier = FakeBarrier()
    desk = opened_at(barrier, 10)
    a, b = leased(desk, "w0"), leased(desk, "w1")
    desk.record(a.lease_id, 0, 10)
    desk.record(b.lease_id, 0, 10)
    desk.complete(b.lease_id, "w1")
    assert desk.progress(11) == {0: 1, 1: 2}  # the completed lease claims both batches
    assert desk.account(11) == 1
    assert desk.progress(11) == {0: 1, 1: 1} and desk.unapplied(11) == 1


def test_events_that_do_not_fit_the_lease_order_are_not_guessed_at() -> None:
    barrier = FakeBarrier()
    desk = opened_at(barrier, 10)
    b = leased(desk, "w1")
    desk.record(b.lease_id, 1, 10)  # batch 1 at the step batch 0 was due
    assert desk.account(12) is None and desk.unreported == 0

    desk = opened_at(FakeBarrier(), 10)
    leased(desk, "w1")
    assert desk.account(13) is None  # three steps, but w1 only took a lease of two batches

    desk = make_desk(FakeBarrier())  # opened without a version: its members' steps unknown
    leased(desk, "w1")
    assert desk.account(11) is None


def test_a_joiner_counts_from_its_join_and_a_stopper_holds_nothing() -> None:
    barrier = FakeBarrier()
    desk = opened_at(barrier, 10)
    a = leased(desk, "w0")
    desk.record(a.lease_id, 0, 10)
    desk.record(a.lease_id, 1, 11)
    desk.complete(a.lease_id, "w0")
    desk.active = {"w0"}  # w1 ran out of data and left the barrier
    barrier.at = [12]
    assert desk.join("w2", training=["w0"]) == 12
    assert desk.freeze("(stopped)") == 12
    assert desk.account(12) == 0  # the joiner is required from 12: nothing below it
    j = leased(desk, "w2")
    assert desk.account(13) is None  # w0 made step 12 with no lease left: does not add up
    desk.active = desk.active - {"w0"}
    assert desk.account(13) == 1 and desk.progress(13)[j.data_shard] == 1


def rounds_desk(
    barrier: FakeBarrier, shards: int, batches: int, per_push: int, flushes: int = 0
) -> LeaseDesk:
    """A desk over `shards` data shards of `batches` batches each, for w0 and w1, pushing
    `per_push` batches at a time (local steps), `flushes` at each lease's end (fragments)."""
    n = shards * batches * B
    return LeaseDesk(
        job_id="job-1",
        epoch=0,
        plan=list(torch.arange(n).reshape(shards, batches * B)),
        train=torch.arange(n * T, dtype=torch.int32).reshape(n, T),
        batch_size=B,
        workers=["w0", "w1"],
        done={},
        servers={"ps-0": "127.0.0.1:1"},
        barrier=barrier,
        per_push=per_push,
        flushes=flushes,
    )


def test_local_steps_account_and_lose_go_by_rounds() -> None:
    """H = 2, data shards of four batches: a push is a round of two batches, every batch of
    it reported at the round's step. The desk hands its book the H it was built with."""
    barrier = FakeBarrier()
    desk = rounds_desk(barrier, shards=4, batches=4, per_push=2)
    desk.open(["w0", "w1"], at=10)
    a, b = leased(desk, "w0"), leased(desk, "w1")  # shards 0 and 1, 4 batches each
    assert (a.batches, b.batches) == (4, 4)  # the lease is still the whole shard's rest
    for lease in (a, b):
        desk.record(lease.lease_id, 0, 10)
        desk.record(lease.lease_id, 1, 10)
    desk.record(b.lease_id, 2, 11)  # w1's round at 11 reported in part
    # The servers stand at 12: both rounds at 11 are in, reported or not. From the events
    # alone, w0's shard stands after its first round and w1's is whole.
    assert desk.progress(12) == {0: 2, 1: 4}
    assert desk.account(12) == 3  # w0's batches 2, 3 and w1's batch 3, all at step 11
    assert desk.progress(12) == {0: 4, 1: 4}
    assert desk.unreported == 3 and desk.unapplied(12) == 0
    # w1 is lost before it completed its lease: every round of it is in (below 12).
    barrier.applied = 12
    desk.lose("w1")
    assert desk.book.done[1] == 4 and desk.book.redone_batches == 0
