"""Unit tests for the coordinator's data leases (services/coordinator/leases.py). Pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmps.core.errors import FailedPrecondition, NotFound
from lmps.services.coordinator.leases import EpochLeases, Lease


def drain(leases: EpochLeases, worker: str) -> list[int]:
    """Take and complete leases for `worker` until it gets none; the shards it trained."""
    shards = []
    while (lease := leases.take(worker)) is not None:
        shards.append(lease.data_shard)
        leases.complete(lease.lease_id, worker)
    return shards


def take(leases: EpochLeases, worker: str) -> Lease:
    lease = leases.take(worker)
    assert lease is not None, f"{worker} got no lease"
    return lease


# -- ownership -----------------------------------------------------------------------------


def test_shard_j_is_owned_by_sorted_workers_j_mod_w():
    leases = EpochLeases(0, [2] * 7, ["w-c", "w-a", "w-b"])

    # sorted: w-a, w-b, w-c; each takes its own shards in increasing order.
    assert drain(leases, "w-b") == [1, 4]
    assert drain(leases, "w-c") == [2, 5]
    assert drain(leases, "w-a") == [0, 3, 6]
    assert leases.finished
    assert sorted(leases.completed) == list(range(7))


def test_two_runs_give_identical_assignments():
    def run(workers: list[str]) -> list[tuple[str, str, int, int]]:
        leases = EpochLeases(3, [4, 4, 2, 4, 1], workers, done={3: 1})
        out = []
        # A fixed interleaving of the workers' requests, as if timing differed between them.
        for w in ["w-1", "w-1", "w-0", "w-1", "w-0", "w-0", "w-1"]:
            lease = leases.take(w)
            if lease is not None:
                out.append((lease.lease_id, w, lease.data_shard, lease.first_batch))
                leases.complete(lease.lease_id, w)
        return out

    first = run(["w-0", "w-1"])
    assert first == run(["w-1", "w-0"])  # input order of the workers does not matter
    assert [(w, j) for _, w, j, _ in first] == [
        ("w-1", 1),
        ("w-1", 3),
        ("w-0", 0),
        ("w-0", 2),
        ("w-0", 4),
    ]


def test_a_worker_without_own_shards_gets_none():
    leases = EpochLeases(0, [1, 1], ["a", "b", "c"])
    assert leases.take("c") is None
    assert leases.take("stranger") is None  # unknown worker, no orphans: nothing to do


def test_no_workers_makes_every_shard_an_orphan_anyone_takes():
    leases = EpochLeases(0, [1, 1, 1], [])
    assert not leases.finished
    assert drain(leases, "late") == [0, 1, 2]
    assert leases.finished


def test_lease_fields():
    leases = EpochLeases(7, [5, 3], ["w"])
    lease = take(leases, "w")
    assert lease == Lease("e7-l0-s0", "w", 0, 0, 5)
    assert take(leases, "w").lease_id == "e7-l1-s1"
    assert set(leases.outstanding) == {"e7-l0-s0", "e7-l1-s1"}


# -- resuming with a `done` map ------------------------------------------------------------


def test_done_map_skips_finished_shards_and_resumes_partial_ones():
    # Shard 0 finished, shard 2 half done, shard 3's zero entry means nothing done yet.
    leases = EpochLeases(1, [4, 4, 4, 4], ["a", "b"], done={0: 4, 2: 2, 3: 0})

    assert leases.completed == [0]
    assert 3 not in leases.done  # zero entries are dropped
    first = take(leases, "a")  # a would own 0 and 2; 0 is done
    assert (first.data_shard, first.first_batch, first.batches) == (2, 2, 4)
    assert leases.take("a") is None
    second = take(leases, "b")
    assert (second.data_shard, second.first_batch) == (1, 0)
    third = take(leases, "b")
    assert (third.data_shard, third.first_batch) == (3, 0)


def test_done_beyond_the_shard_counts_as_finished():
    leases = EpochLeases(0, [2, 2], ["a"], done={1: 9})
    assert leases.completed == [1]
    assert drain(leases, "a") == [0]
    assert leases.finished


def test_all_done_is_finished_at_once():
    leases = EpochLeases(0, [2, 3], ["a"], done={0: 2, 1: 3})
    assert leases.finished
    assert leases.take("a") is None


# -- record / complete / progress ----------------------------------------------------------


def test_complete_marks_the_whole_shard_done():
    leases = EpochLeases(0, [3, 3], ["a"])
    lease = take(leases, "a")
    leases.record(lease.lease_id, 0, 10)
    leases.complete(lease.lease_id, "a")

    assert leases.completed == [0]
    assert leases.done == {0: 3}
    assert lease.lease_id not in leases.outstanding
    assert not leases.finished  # shard 1 is still queued


def test_complete_with_wrong_worker_or_unknown_lease_is_not_found():
    leases = EpochLeases(0, [2, 2], ["a", "b"])
    lease = take(leases, "a")

    with pytest.raises(NotFound):
        leases.complete(lease.lease_id, "b")
    with pytest.raises(NotFound):
        leases.complete("e0-l99-s0", "a")
    # Neither attempt changed anything: the right worker can still complete it, once.
    assert lease.lease_id in leases.outstanding
    leases.complete(lease.lease_id, "a")
    with pytest.raises(NotFound):
        leases.complete(lease.lease_id, "a")
    assert leases.completed == [0]


def test_record_for_an_unknown_lease_is_ignored():
    leases = EpochLeases(0, [2], ["a"])
    leases.record("nope", 0, 0)
    assert leases.progress(below_step=100) == {}


def test_progress_counts_batches_pushed_below_the_step():
    leases = EpochLeases(0, [4, 4, 4], ["a", "b"], done={2: 1})
    done_lease = take(leases, "a")  # shard 0
    leases.complete(done_lease.lease_id, "a")
    lease = take(leases, "b")  # shard 1
    for batch, step in [(0, 10), (1, 11), (2, 12)]:
        leases.record(lease.lease_id, batch, step)

    assert leases.progress(below_step=10) == {0: 4, 2: 1}
    assert leases.progress(below_step=11) == {0: 4, 1: 1, 2: 1}
    assert leases.progress(below_step=12) == {0: 4, 1: 2, 2: 1}
    assert leases.progress(below_step=99) == {0: 4, 1: 3, 2: 1}


def test_progress_of_a_resumed_lease_never_drops_below_its_start():
    leases = EpochLeases(0, [6], ["a"], done={0: 3})
    lease = take(leases, "a")
    assert lease.first_batch == 3
    leases.record(lease.lease_id, 3, 50)
    assert leases.progress(below_step=50) == {0: 3}
    assert leases.progress(below_step=51) == {0: 4}


def test_progress_returns_a_copy():
    leases = EpochLeases(0, [2], ["a"], done={0: 1})
    leases.progress(below_step=0)[0] = 99
    assert leases.done == {0: 1}


# -- losing a worker -----------------------------------------------------------------------


def test_lose_keeps_applied_batches_and_counts_the_rest_as_redone():
    leases = EpochLeases(0, [5, 5, 5, 5], ["a", "b"])
    lease = take(leases, "a")  # shard 0; a also owns shard 2
    for batch, step in [(0, 0), (1, 1), (2, 2), (3, 3)]:
        leases.record(lease.lease_id, batch, step)

    orphaned = leases.lose("a", applied_below=2)

    assert orphaned == [0, 2]  # the outstanding shard first, then a's untaken ones
    assert leases.done[0] == 2  # batches 0 and 1 (steps 0, 1) are in the parameters
    assert leases.redone_batches == 2  # batches 2 and 3 were pushed at steps >= 2
    assert leases.releases == 1
    assert lease.lease_id not in leases.outstanding
    # Orphans come first for anyone, before b's own shards 1 and 3.
    redo = take(leases, "b")
    assert (redo.data_shard, redo.first_batch) == (0, 2)
    assert take(leases, "b").data_shard == 2
    assert take(leases, "b").data_shard == 1
    assert take(leases, "b").data_shard == 3


def test_lose_with_nothing_applied_restarts_from_the_leases_first_batch():
    leases = EpochLeases(0, [6], ["a", "b"], done={0: 2})
    lease = take(leases, "a")
    leases.record(lease.lease_id, 2, 7)
    leases.record(lease.lease_id, 3, 8)

    leases.lose("a", applied_below=7)

    assert leases.done[0] == 2  # not 0: the resumed start is kept
    assert leases.redone_batches == 2
    assert take(leases, "b").first_batch == 2


def test_a_lost_worker_can_neither_take_nor_complete():
    leases = EpochLeases(0, [2, 2], ["a", "b"])
    lease = take(leases, "a")
    leases.lose("a", applied_below=0)

    with pytest.raises(FailedPrecondition):
        leases.take("a")
    with pytest.raises(NotFound):
        leases.complete(lease.lease_id, "a")
    assert drain(leases, "b") == [0, 1]
    assert leases.finished
    assert sorted(leases.completed) == [0, 1]


def test_lose_without_outstanding_lease_orphans_only_untaken_shards():
    leases = EpochLeases(0, [1, 1, 1, 1], ["a", "b"])
    done = take(leases, "a")
    leases.complete(done.lease_id, "a")

    assert leases.lose("a", applied_below=0) == [2]
    assert leases.releases == 0
    assert leases.redone_batches == 0
    assert leases.lose("a", applied_below=0) == []  # losing it twice changes nothing


def test_orphans_are_taken_by_a_newcomer_too():
    leases = EpochLeases(0, [1, 1, 1], ["a", "b"])
    leases.lose("a", applied_below=0)
    assert drain(leases, "new") == [0, 2]  # not in the epoch's worker list, still welcome
    assert drain(leases, "b") == [1]
    assert leases.finished


# -- rebalance -----------------------------------------------------------------------------


def test_rebalance_spreads_untaken_shards_round_robin_over_the_workers():
    leases = EpochLeases(0, [1] * 8, ["a", "b"])
    first_a, first_b = take(leases, "a"), take(leases, "b")  # shards 0 and 1 stay leased

    leases.rebalance(["b", "c", "a"])  # c joins mid-epoch

    # Pending 2..7 in shard order, round-robin over sorted workers a, b, c.
    assert [list(leases.own[w]) for w in ("a", "b", "c")] == [[2, 5], [3, 6], [4, 7]]
    assert drain(leases, "c") == [4, 7]
    leases.complete(first_a.lease_id, "a")
    leases.complete(first_b.lease_id, "b")
    assert drain(leases, "a") == [2, 5]
    assert drain(leases, "b") == [3, 6]
    assert leases.finished


def test_rebalance_includes_orphans_and_skips_lost_workers():
    leases = EpochLeases(0, [1] * 6, ["a", "b"])
    lease = take(leases, "a")
    leases.lose("a", applied_below=0)  # orphans 0, 2, 4

    leases.rebalance(["a", "b", "c"])  # a is listed but lost

    assert "a" not in leases.own
    assert not leases.orphans
    assert [list(leases.own[w]) for w in ("b", "c")] == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(NotFound):
        leases.complete(lease.lease_id, "a")


# -- the property: every shard completed exactly once --------------------------------------


def check_partition(leases: EpochLeases, n: int) -> None:
    """Every shard is in exactly one place: completed, leased, orphaned or queued."""
    places = [
        *leases.completed,
        *(lease.data_shard for lease in leases.outstanding.values()),
        *leases.orphans,
        *(j for q in leases.own.values() for j in q),
    ]
    assert sorted(places) == list(range(n))


ops = st.lists(
    st.tuples(st.sampled_from(["take", "complete", "lose", "join"]), st.integers(0, 7)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    shard_batches=st.lists(st.integers(1, 4), min_size=0, max_size=12),
    n_workers=st.integers(1, 4),
    done=st.dictionaries(st.integers(0, 11), st.integers(0, 5), max_size=6),
    steps=ops,
)
def test_any_interleaving_completes_every_shard_exactly_once(shard_batches, n_workers, done, steps):
    n = len(shard_batches)
    workers = [f"w{i}" for i in range(n_workers)]
    leases = EpochLeases(0, shard_batches, workers, done={j: d for j, d in done.items() if j < n})
    alive = list(workers)
    held: dict[str, list[Lease]] = {w: [] for w in workers}
    for step, (op, k) in enumerate(steps):
        w = alive[k % len(alive)]
        if op == "take":
            lease = leases.take(w)
            if lease is not None:
                held[w].append(lease)
        elif op == "complete" and held[w]:
            lease = held[w].pop(k % len(held[w]))  # completion order differs from take order
            leases.record(lease.lease_id, lease.first_batch, step)
            leases.complete(lease.lease_id, w)
        elif op == "lose" and len(alive) > 1:
            for lease in held.pop(w):
                leases.record(lease.lease_id, lease.first_batch, step)
            leases.lose(w, applied_below=step + k % 2)
            alive.remove(w)
            with pytest.raises(FailedPrecondition):
                leases.take(w)
        elif op == "join":
            new = f"j{step}"
            alive.append(new)
            held[new] = []
            leases.rebalance(sorted(alive))
        check_partition(leases, n)

    for w in alive:  # finish the epoch: outstanding leases first, then whatever is left
        for lease in held[w]:
            leases.complete(lease.lease_id, w)
        drain(leases, w)

    assert leases.finished
    assert sorted(leases.completed) == list(range(n))  # each shard exactly once
    assert all(leases.done[j] >= shard_batches[j] for j in range(n))


def test_progress_leaves_out_the_unapplied_last_batch_of_a_completed_lease():
    # A worker completes its lease once the last batch is pushed, before that step is made.
    leases = EpochLeases(0, [2, 2], ["a", "b"])
    lease = take(leases, "a")  # shard 0
    for batch, step in [(0, 5), (1, 6)]:
        leases.record(lease.lease_id, batch, step)
    leases.complete(lease.lease_id, "a")
    assert leases.progress(below_step=6) == {0: 1}
    assert leases.unapplied(6) == 1
    assert leases.progress(below_step=7) == {0: 2}
    assert leases.unapplied(7) == 0


# -- local steps: a push is a round of up to H batches of one lease ------------------------


def test_account_with_local_steps_counts_rounds_per_step():
    """H = 3, one worker, leases of 6 and 4 batches: rounds [0-2] [3-5] of shard 0, then
    [0-2] [3] of shard 1 (rounds never cross a lease), one per step from 10. The servers
    stand at 13: three rounds are in, whatever events came."""
    leases = EpochLeases(0, [6, 4], ["a"], per_push=3)
    first = take(leases, "a")
    for b in range(3):
        leases.record(first.lease_id, b, 10)  # round 0; round 1's events never came
    leases.complete(first.lease_id, "a")
    second = take(leases, "a")
    leases.record(second.lease_id, 0, 12)  # round 2, only its first batch reported
    assert leases.progress(13) == {0: 6, 1: 3}  # a round is in the parameters whole
    assert leases.account({"a": 10}, below_step=13) == 5  # batches 3-5 at 11, 1-2 at 12
    assert sorted(first.seen) == [(0, 10), (1, 10), (2, 10), (3, 11), (4, 11), (5, 11)]
    assert sorted(second.seen) == [(0, 12), (1, 12), (2, 12)]
    assert leases.progress(13) == {0: 6, 1: 3} and leases.unapplied(13) == 0
    assert leases.progress(12) == {0: 6}  # round 2 not in: shard 1 from its first batch
    assert leases.account({"a": 10}, below_step=14) == 1  # the short last round, at 13
    assert leases.progress(14) == {0: 6, 1: 4}
    assert leases.account({"a": 10}, below_step=15) is None  # 5 steps, 4 rounds


def test_account_with_local_steps_refuses_events_off_their_round():
    leases = EpochLeases(0, [6], ["a"], per_push=3)
    lease = take(leases, "a")
    leases.record(lease.lease_id, 3, 10)  # batch 3 is round 1's: step 11, not 10
    assert leases.account({"a": 10}, below_step=12) is None and leases.unreported == 0
    plain = EpochLeases(0, [6], ["a"])  # without local steps, batch 3 is due at step 13
    plain_lease = take(plain, "a")
    plain.record(plain_lease.lease_id, 3, 13)
    assert plain.account({"a": 10}, below_step=14) == 3


@pytest.mark.parametrize(
    ("events", "applied_below", "done", "redone", "unreported"),
    [
        # Round 1 (batches 3-5, step 6) reported in part and not applied: trained again.
        ([(0, 5), (1, 5), (2, 5), (3, 6)], 6, 3, 1, 0),
        # ... applied: all of it is in, its unreported batches 4 and 5 too.
        ([(0, 5), (1, 5), (2, 5), (3, 6)], 7, 6, 0, 2),
        # Round 2 (6-8, step 7) pushed and reported in part, then discarded with the worker.
        ([(0, 5), (1, 5), (2, 5), (3, 6), (4, 6), (5, 6), (6, 7), (7, 7)], 7, 6, 2, 0),
    ],
)
def test_lose_mid_round_keeps_or_redoes_the_whole_round(
    events, applied_below, done, redone, unreported
):
    leases = EpochLeases(0, [9, 9], ["a", "b"], per_push=3)
    lease = take(leases, "a")
    for batch, step in events:
        leases.record(lease.lease_id, batch, step)
    assert leases.lose("a", applied_below=applied_below) == [0]
    assert leases.done[0] == done  # a round's start
    assert (leases.redone_batches, leases.unreported) == (redone, unreported)
    redo = take(leases, "b")
    assert (redo.data_shard, redo.first_batch) == (0, done)


def test_progress_after_a_partial_round_stands_at_a_round_start():
    leases = EpochLeases(0, [6], ["a"], per_push=3)
    lease = take(leases, "a")
    for b in range(3):
        leases.record(lease.lease_id, b, 4)
    leases.record(lease.lease_id, 3, 5)  # round 1's first event; 4 and 5 still on the way
    assert leases.progress(below_step=4) == {}
    assert leases.progress(below_step=5) == {0: 3}
    assert leases.progress(below_step=6) == {0: 6}  # round 1 is in whole
    assert leases.unapplied(5) == 1


def test_rounds_of_a_resumed_lease_count_from_its_first_batch():
    leases = EpochLeases(0, [8], ["a"], done={0: 3}, per_push=3)
    lease = take(leases, "a")
    assert lease.first_batch == 3  # rounds [3-5] [6-7]
    leases.record(lease.lease_id, 3, 8)
    assert leases.progress(below_step=8) == {0: 3}
    assert leases.progress(below_step=9) == {0: 6}
    assert leases.account({"a": 8}, below_step=10) == 4  # 4, 5 at 8; 6, 7 at 9
    assert leases.progress(below_step=10) == {0: 8}


def test_per_push_must_be_positive():
    with pytest.raises(ValueError, match="per_push must be >= 1"):
        EpochLeases(0, [1], ["a"], per_push=0)
