"""Unit tests for the consistency seam (services/parameter_server/consistency.py) on its own.

A `SyncBarrier` object and plain tensors: no store, no optimizer, no gRPC, no threads.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from lmps.core.errors import AlreadyExists, FailedPrecondition, NotFound, OutOfRange
from lmps.core.settings import CONSISTENCIES
from lmps.services.parameter_server.consistency import (
    BARRIERS,
    AsyncBarrier,
    Barrier,
    SyncBarrier,
    Update,
    make_barrier,
)

NUMEL = {"w#0": 7, "w#1": 5, "b#0": 3}  # load order, deliberately not sorted
Grads = dict[str, torch.Tensor]


def grads(seed: int, dtype: torch.dtype = torch.float32) -> Grads:
    g = torch.Generator().manual_seed(seed)
    return {sid: torch.randn(n, generator=g).to(dtype) for sid, n in NUMEL.items()}


def barrier(*members: str) -> Barrier:
    return make_barrier("sync", job_id="job", numel=NUMEL, members=members)


def push(b: Barrier, worker: str, weight: float, g: Grads, version: int = 0) -> Update | None:
    b.admit(worker, version, version)
    return b.push(worker, version, weight, g)


def reference_mean(contributions: dict[str, tuple[float, Grads]]) -> Grads:
    """fp64 sum of weight * fp32 grad over sorted worker ids, divided by the total weight."""
    total = sum(w for w, _ in contributions.values())
    out = {}
    for sid, n in NUMEL.items():
        acc = torch.zeros(n, dtype=torch.float64)
        for worker in sorted(contributions):
            weight, g = contributions[worker]
            acc.add_(g[sid].to(torch.float32), alpha=weight)
        out[sid] = (acc / total).to(torch.float32)
    return out


def assert_equal(a: Grads, b: Grads) -> None:
    assert list(a) == list(b)
    for sid in a:
        assert a[sid].dtype == torch.float32
        assert torch.equal(a[sid], b[sid]), sid


# -- the table -----------------------------------------------------------------------------


def test_every_consistency_mode_has_a_barrier():
    assert sorted(BARRIERS) == sorted(CONSISTENCIES)
    assert isinstance(barrier("w0"), SyncBarrier)


def test_an_unknown_mode_is_a_value_error():
    with pytest.raises(ValueError, match="unknown consistency"):
        make_barrier("hogwild", job_id="job", numel=NUMEL, members=["w0"])  # type: ignore[arg-type]


def test_the_seam_and_the_store_import_without_grpc():
    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "import lmps.services.parameter_server.consistency, lmps.services.parameter_server.store\n"
        "assert not [m for m in sys.modules if m.endswith('_pb2')], 'generated code imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- completing a step ---------------------------------------------------------------------


def test_the_step_completes_once_every_member_pushed():
    b = barrier("w0", "w1", "w2")
    assert (b.members, b.pushed, b.pending) == (frozenset({"w0", "w1", "w2"}), frozenset(), 3)
    assert push(b, "w1", 1.0, grads(1)) is None
    assert push(b, "w0", 1.0, grads(0)) is None
    assert (b.pushed, b.pending) == (frozenset({"w0", "w1"}), 1)

    update = push(b, "w2", 1.0, grads(2))

    assert update is not None
    assert update.made_of == (("w0", 1.0), ("w1", 1.0), ("w2", 1.0))
    assert (b.pushed, b.pending) == (frozenset(), 3)  # a fresh pending step
    assert push(b, "w0", 1.0, grads(3), version=1) is None  # the next step starts empty


def test_the_update_is_the_weighted_fp64_mean_in_sorted_order():
    contributions = {"w1": (3.0, grads(1)), "w0": (0.5, grads(0, torch.bfloat16))}
    b = barrier(*contributions)
    for worker, (weight, g) in contributions.items():
        update = push(b, worker, weight, g)
    assert update is not None
    assert update.made_of == (("w0", 0.5), ("w1", 3.0))
    assert_equal(update.grads, reference_mean(contributions))  # shards in load order


def test_the_mean_does_not_depend_on_push_order():
    # Element 0 cancels: (3e17 - 3e17) + 2 = 2 in fp64, but (3e17 + 2) - 3e17 = 0, so a sum
    # in arrival order would differ between these orders.
    firsts = {"w0": (1e17, 3.0), "w1": (-1e17, 3.0), "w2": (1.0, 2.0)}
    contributions = {}
    for i, (worker, (first, weight)) in enumerate(firsts.items()):
        g = grads(10 + i)
        g["w#0"][0] = first
        contributions[worker] = (weight, g)
    updates = []
    for order in itertools.permutations(contributions):
        b = barrier(*contributions)
        for worker in order:
            update = push(b, worker, *contributions[worker])
        assert update is not None
        updates.append(update)
    for other in updates[1:]:
        assert other.made_of == updates[0].made_of
        assert_equal(other.grads, updates[0].grads)
    assert float(updates[0].grads["w#0"][0]) == 0.25  # 2 / (3 + 3 + 2)
    assert_equal(updates[0].grads, reference_mean(contributions))


# -- membership ----------------------------------------------------------------------------


def test_discarding_drops_only_that_workers_contribution():
    b = barrier("w0", "w1", "w2")
    push(b, "w0", 1.0, grads(0))
    push(b, "w1", 1.0, grads(1))

    assert b.set_members(["w0", "w1", "w2"], discard=["w1"]) is None

    assert (b.pushed, b.pending) == (frozenset({"w0"}), 2)
    assert push(b, "w1", 2.0, grads(21)) is None  # w1 may push again, another gradient
    update = push(b, "w2", 1.0, grads(2))
    assert update is not None
    want = {"w0": (1.0, grads(0)), "w1": (2.0, grads(21)), "w2": (1.0, grads(2))}
    assert_equal(update.grads, reference_mean(want))


def test_discarding_everything_empties_the_step():
    b = barrier("w0", "w1")
    push(b, "w0", 1.0, grads(0))
    assert b.set_members(["w0", "w1"], discard=b.pushed) is None
    assert (b.pushed, b.pending) == (frozenset(), 2)


def test_removing_the_last_missing_member_completes_the_step():
    b = barrier("w0", "w1")
    push(b, "w0", 2.0, grads(0))

    update = b.set_members(["w0"], discard=())

    assert update is not None
    assert update.made_of == (("w0", 2.0),)
    assert_equal(update.grads, reference_mean({"w0": (2.0, grads(0))}))
    assert (b.members, b.pushed, b.pending) == (frozenset({"w0"}), frozenset(), 1)


def test_a_worker_that_left_after_pushing_still_counts_unless_discarded():
    b = barrier("w0", "w1", "w2")
    push(b, "w2", 1.0, grads(2))
    assert b.set_members(["w0", "w1"], discard=()) is None
    push(b, "w0", 1.0, grads(0))
    update = push(b, "w1", 1.0, grads(1))
    assert update is not None
    assert [w for w, _ in update.made_of] == ["w0", "w1", "w2"]


def test_no_pushes_no_update_whatever_the_members():
    b = barrier("w0")
    assert b.set_members([], discard=()) is None
    assert b.set_members(["w1"], discard=()) is None
    assert (b.members, b.pending) == (frozenset({"w1"}), 1)


# -- refused pushes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "worker, step, error",
    [
        ("w0", 5, AlreadyExists),  # w0 already pushed step 5
        ("w1", 4, FailedPrecondition),  # stale
        ("w1", 6, OutOfRange),  # future
        ("w9", 5, NotFound),  # not a member
    ],
    ids=["duplicate", "stale", "future", "non-member"],
)
def test_a_refused_push_changes_nothing(worker: str, step: int, error: type[Exception]):
    b = make_barrier("sync", job_id="job", numel=NUMEL, members=["w0", "w1"], version=5)
    push(b, "w0", 3.0, grads(0), version=5)

    with pytest.raises(error):
        b.admit(worker, step, 5)

    assert (b.members, b.pushed, b.pending) == (frozenset({"w0", "w1"}), frozenset({"w0"}), 1)
    update = push(b, "w1", 1.0, grads(1), version=5)
    assert update is not None
    assert_equal(update.grads, reference_mean({"w0": (3.0, grads(0)), "w1": (1.0, grads(1))}))


# -- what a pull may see -------------------------------------------------------------------


def test_a_pull_sees_a_version_once_it_is_reached():
    b = barrier("w0")
    assert b.readable(3, 3) and b.readable(4, 3) and b.readable(0, 0)
    assert not b.readable(2, 3)


# -- joining mid-step (SetMembersRequest.join_at) ------------------------------------------


def test_a_joiner_from_the_next_version_is_not_waited_for_now() -> None:
    b = barrier("w0", "w1")
    assert push(b, "w0", 1.0, grads(1)) is None
    assert b.set_members(["w0", "w1", "j"], discard=(), join_at=1) is None
    assert (b.members, b.pending) == (frozenset({"w0", "w1", "j"}), 1)  # w1 only
    update = push(b, "w1", 2.0, grads(2))
    assert update is not None and [w for w, _ in update.made_of] == ["w0", "w1"]
    assert_equal(update.grads, reference_mean({"w0": (1.0, grads(1)), "w1": (2.0, grads(2))}))
    assert (b.version, b.pending) == (1, 3)  # step 1 waits for the joiner too
    assert push(b, "w0", 1.0, grads(3), version=1) is None
    assert push(b, "w1", 1.0, grads(4), version=1) is None
    update = push(b, "j", 1.0, grads(5), version=1)
    assert update is not None and [w for w, _ in update.made_of] == ["j", "w0", "w1"]


def test_a_joiner_from_the_pending_version_is_waited_for() -> None:
    b = barrier("w0")
    assert b.set_members(["w0", "j"], discard=(), join_at=0) is None  # 0: at once
    assert b.pending == 2
    b3 = make_barrier("sync", job_id="job", numel=NUMEL, members=["w0"], version=4)
    assert b3.set_members(["w0", "j"], discard=(), join_at=4) is None
    assert push(b3, "w0", 1.0, grads(1), version=4) is None  # waits for the joiner at 4
    update = push(b3, "j", 1.0, grads(2), version=4)
    assert update is not None and b3.version == 5


def test_a_join_at_a_version_already_made_is_refused_with_nothing_changed() -> None:
    b = make_barrier("sync", job_id="job", numel=NUMEL, members=["w0", "w1"], version=3)
    assert push(b, "w0", 1.0, grads(1), version=3) is None
    with pytest.raises(FailedPrecondition):
        b.set_members(["w0", "j"], discard=["w0"], join_at=2)
    assert (b.members, b.pushed, b.pending, b.version) == (
        frozenset({"w0", "w1"}),
        frozenset({"w0"}),
        1,
        3,
    )


def test_a_push_before_the_joiners_first_version_is_refused() -> None:
    b = barrier("w0", "w1")
    b.set_members(["w0", "w1", "j"], discard=(), join_at=1)
    with pytest.raises(FailedPrecondition):
        b.admit("j", 0, 0)
    assert (b.pushed, b.pending) == (frozenset(), 2)


def test_a_member_keeps_its_first_version_when_the_members_are_sent_again() -> None:
    b = barrier("w0")
    b.set_members(["w0", "j"], discard=(), join_at=1)
    b.set_members(["w0", "j"], discard=())  # e.g. another worker left: j still from 1
    assert b.pending == 1
    b.set_members(["w0", "j", "k"], discard=(), join_at=0)
    assert b.pending == 2  # k at once, j still from 1


# -- bounded staleness ----------------------------------------------------------------------


def ssp(*members: str, s: int = 2, version: int = 0) -> Barrier:
    return make_barrier(
        "bounded_staleness",
        job_id="job",
        numel=NUMEL,
        members=members,
        version=version,
        max_staleness=s,
    )


def test_sync_refuses_a_staleness_bound() -> None:
    with pytest.raises(ValueError, match="SYNC needs 0"):
        make_barrier("sync", job_id="job", numel=NUMEL, members=["w0"], max_staleness=1)


@pytest.mark.parametrize(
    "step, computed_at, error",
    [
        (13, None, OutOfRange),  # more than s = 2 past the version (10)
        (12, 9, FailedPrecondition),  # computed 3 before its step
        (11, 11, FailedPrecondition),  # computed at a version this server has not made
        (10, 11, FailedPrecondition),  # computed after its step
        (9, 9, FailedPrecondition),  # stale step
    ],
)
def test_bounded_staleness_refuses_pushes_past_the_bound(
    step: int, computed_at: int | None, error: type[Exception]
) -> None:
    b = ssp("w0", "w1", version=10)
    with pytest.raises(error):
        b.admit("w0", step, 10, computed_at)
    b.admit("w0", 12, 10, 10)  # at the bound: fine
    b.admit("w0", 10, 10, 8)


def test_pushes_ahead_wait_and_complete_in_order() -> None:
    """w0 runs 2 steps ahead; each step is still the mean of both members' pushes for it,
    made one at a time in order once w1 catches up."""
    b = ssp("w0", "w1")
    for step in range(3):
        b.admit("w0", step, 0, 0)
        assert b.push("w0", step, 1.0, grads(step)) is None
    assert b.version == 0 and b.pushed == {"w0"} and b.pending == 1
    b.admit("w1", 0, 0, 0)
    first = b.push("w1", 0, 3.0, grads(10))
    assert first is not None and b.version == 1
    assert_equal(first.grads, reference_mean({"w0": (1.0, grads(0)), "w1": (3.0, grads(10))}))
    assert b.ready() is None  # step 1 still waits for w1
    b.admit("w1", 1, 1, 0)
    assert b.push("w1", 1, 3.0, grads(11)) is not None
    # w1 leaves: step 2 completes with w0's push alone, through `ready`... or at once.
    update = b.set_members(["w0"], discard=())
    assert update is not None and update.made_of == (("w0", 1.0),) and b.version == 3


def test_a_lost_worker_loses_every_push_it_had_pending_ahead() -> None:
    b = ssp("w0", "w1")
    for step in range(2):
        b.admit("w0", step, 0, 0)
        b.push("w0", step, 1.0, grads(step))
    assert b.set_members(["w1"], discard=["w0"]) is None  # nothing of w0's is left
    assert b.pushed == frozenset() and b.version == 0
    b.admit("w1", 0, 0, 0)
    update = b.push("w1", 0, 2.0, grads(5))
    assert update is not None and update.made_of == (("w1", 2.0),)
    assert b.ready() is None


# -- ASYNC: every push an update of its own ------------------------------------------------


def hogwild(*members: str, version: int = 0) -> Barrier:
    return make_barrier("async", job_id="job", numel=NUMEL, members=members, version=version)


def async_push(b: Barrier, worker: str, step: int, weight: float, g: Grads) -> Update:
    b.admit(worker, step, b.version, step)
    update = b.push(worker, step, weight, g)
    assert update is not None, "an ASYNC push is applied at once"
    return update


def test_async_applies_each_push_at_once_as_its_own_gradient() -> None:
    b = hogwild("w0", "w1")
    assert isinstance(b, AsyncBarrier)
    g0, g1 = grads(0), grads(1, torch.bfloat16)

    first = async_push(b, "w0", 0, 3.0, g0)
    # The second push was computed at version 0 but lands at 1: taken, and applied alone.
    second = async_push(b, "w1", 0, 0.5, g1)

    # The gradient as pushed, in fp32, shards in load order: the weight does not scale it.
    assert_equal(first.grads, g0)
    assert_equal(second.grads, {sid: t.to(torch.float32) for sid, t in g1.items()})
    assert (first.made_of, first.push) == ((("w0", 3.0),), ("w0", 0, 3.0))
    assert (second.made_of, second.push) == ((("w1", 0.5),), ("w1", 0, 0.5))
    assert b.version == 2
    assert (b.pushed, b.pending) == (frozenset(), 0)  # nothing is ever pending
    assert b.ready() is None
    g0["w#0"].fill_(7.0)  # the update owns its tensors: the pusher's buffers may change
    assert not torch.equal(first.grads["w#0"], g0["w#0"])


def test_async_version_counts_pushes_whatever_their_staleness() -> None:
    b = hogwild("w0", "w1", "w2", version=4)
    last = dict.fromkeys(["w0", "w1", "w2"], 3)
    for i in range(30):
        worker = f"w{i % 3}"
        # Any step from just past the worker's last one up to the server's version.
        step = last[worker] + 1 + (i * 7) % max(1, b.version - last[worker])
        step = min(step, b.version)
        async_push(b, worker, step, 1.0, grads(i))
        last[worker] = step
        assert b.version == 4 + i + 1
    assert max(b.version - s for s in last.values()) > 1  # some pushes were stale


@pytest.mark.parametrize(
    "worker, step, computed_at, error",
    [
        ("w9", 3, 3, NotFound),  # not a member
        ("w0", 6, 6, OutOfRange),  # past the server's version (5): nobody pulled it
        ("w0", 2, 2, AlreadyExists),  # w0 pushed for step 2 already: a duplicate
        ("w0", 1, 1, AlreadyExists),  # ... or an earlier one: its steps only go up
        ("w1", 4, 3, FailedPrecondition),  # an ASYNC push is for the version it was computed at
    ],
    ids=["non-member", "future", "duplicate", "earlier", "computed-elsewhere"],
)
def test_async_refuses_and_changes_nothing(
    worker: str, step: int, computed_at: int, error: type[Exception]
) -> None:
    b = hogwild("w0", "w1", version=4)
    async_push(b, "w0", 2, 1.0, grads(0))
    assert b.version == 5

    with pytest.raises(error):
        b.admit(worker, step, b.version, computed_at)

    assert (b.version, b.members) == (5, frozenset({"w0", "w1"}))
    async_push(b, "w0", 3, 1.0, grads(1))  # w0's next push is still taken
    async_push(b, "w1", 0, 1.0, grads(2))  # and a very stale one of w1's
    assert b.version == 7


def test_async_membership_only_says_who_may_push() -> None:
    b = hogwild("w0", "w1")
    async_push(b, "w0", 0, 1.0, grads(0))
    assert b.set_members(["w1", "w2"], discard=["w0"], join_at=0) is None  # completes nothing
    assert (b.members, b.version, b.pending) == (frozenset({"w1", "w2"}), 1, 0)
    with pytest.raises(NotFound):
        b.admit("w0", 1, 1, 1)  # dropped: its late pushes are refused
    async_push(b, "w2", 1, 1.0, grads(1))  # a joiner pushes at once
    assert b.version == 2


def test_async_pulls_see_any_version_reached() -> None:
    b = hogwild("w0")
    assert b.readable(3, 3) and b.readable(9, 3) and b.readable(0, 0)
    assert not b.readable(2, 3)


def test_async_refuses_a_staleness_bound() -> None:
    with pytest.raises(ValueError, match="ASYNC needs 0"):
        make_barrier("async", job_id="job", numel=NUMEL, members=["w0"], max_staleness=1)


@pytest.mark.parametrize("weight", [1.0, 3.0, 7.0, 1e6, 2.0**29 - 1, 0.5, 0.1, 1 / 3])
def test_one_contribution_is_the_fp64_mean_bit_for_bit(weight: float):
    # A step of one worker skips the fp64 sum where (w * g) / w is exact (w of <= 29
    # significant bits); it must give what the sum gives, extremes of fp32 included.
    g = grads(5)
    g["w#0"] = torch.tensor([3.4e38, -3.4e38, 1e-45, -1e-45, 1.17e-38, 0.0, -0.0])
    g["b#0"] = torch.tensor([1.0000001, 2.0**-126 * 1.5, 65504.0])
    update = push(barrier("w0"), "w0", weight, g)
    assert update is not None
    got, want = update.grads, reference_mean({"w0": (weight, g)})
    assert_equal(got, want)
    for sid in got:  # fresh tensors, bit for bit (signed zeros too)
        assert torch.equal(got[sid].view(torch.int32), want[sid].view(torch.int32)), sid
        assert got[sid].data_ptr() != g[sid].data_ptr()
