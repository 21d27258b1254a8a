"""Streaming fragments (Streaming DiLoCo) as the coordinator plans them: shards dealt into
fragments per server (`partition.assign_fragments`), the settings and their wire form, the
job's length in outer steps, and the lease book's pushes (windows, then flushes) with its
at-least-once rule. Pure, milliseconds; the servers' and workers' side is test_fragments."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from lmps.client import train
from lmps.client.train_options import TrainOptions
from lmps.core.model import preset
from lmps.core.optim import lr_at
from lmps.core.partition import (
    ParamInfo,
    Shard,
    assign,
    assign_backups,
    assign_fragments,
    plan_shards,
    promote,
    split_params,
)
from lmps.core.settings import LocalSteps, default_total_steps, lease_versions
from lmps.rpc import codec
from lmps.services.coordinator.leases import EpochLeases, Lease
from lmps.v1 import coordinator_pb2, job_pb2
from tests.unit.test_lease_desk import FakeBarrier, rounds_desk

FAST = settings(max_examples=80, deadline=None)

# -- dealing shards into fragments ---------------------------------------------------------

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)
param_lists = st.lists(shapes, min_size=1, max_size=10).map(
    lambda ps: [ParamInfo(f"p{i}.weight", shape, i % 2 == 0) for i, shape in enumerate(ps)]
)


def _owners(shards: list[Shard]) -> dict[str, list[Shard]]:
    out: dict[str, list[Shard]] = {}
    for sh in shards:
        out.setdefault(sh.server_id, []).append(sh)
    return out


@FAST
@given(
    params=param_lists,
    servers=st.integers(1, 4).map(lambda n: [f"ps-{i}" for i in range(n)]),
    shard_bytes=st.integers(4, 200),
    fragments=st.integers(1, 4),
)
def test_every_server_deals_its_bytes_evenly_into_every_fragment(
    params: list[ParamInfo], servers: list[str], shard_bytes: int, fragments: int
) -> None:
    owned = assign(split_params(params, shard_bytes), servers)
    if any(len(mine) < fragments for mine in _owners(owned).values()):
        with pytest.raises(ValueError, match=f"fewer than fragments {fragments}"):
            assign_fragments(owned, fragments)
        return
    dealt = assign_fragments(owned, fragments)
    # Only the fragment changes, shards keep their order, and the same input deals the same.
    assert [dataclasses.replace(s, fragment=0) for s in dealt] == owned
    assert assign_fragments(owned, fragments) == dealt
    for server, mine in _owners(dealt).items():
        loads = [sum(s.numel for s in mine if s.fragment == f) for f in range(fragments)]
        largest = max(s.numel for s in mine)
        assert all(0 <= s.fragment < fragments for s in mine)
        assert all(n > 0 for n in loads), server  # every server syncs at every version
        # LPT: within the largest shard of each other, so of 1/F of the server's bytes.
        assert max(loads) - min(loads) <= largest, server
        assert all(abs(n - sum(loads) / fragments) <= largest for n in loads), server


def test_fragments_go_largest_first_onto_the_lightest_ties_by_index() -> None:
    """One server, shards of 5, 4, 3, 3, 1 elements, F = 2: 5 -> 0, 4 -> 1, 3 -> 1 (4 < 5),
    3 -> 0 (5 < 7), 1 -> 1 (7 < 8), so 8 and 8."""
    params = [ParamInfo(f"p{i}", (n,), True) for i, n in enumerate([5, 4, 3, 3, 1])]
    shards = plan_shards(params, ["ps-0"], shard_bytes=1 << 20, fragments=2)
    assert [s.fragment for s in shards] == [0, 1, 1, 0, 1]
    equal = plan_shards([ParamInfo(f"q{i}", (2,), True) for i in range(4)], ["ps-0"], fragments=3)
    assert [s.fragment for s in equal] == [0, 1, 2, 0]  # equal sizes: input order, low first


def test_one_fragment_is_fragment_zero_and_plans_as_before() -> None:
    params = [ParamInfo(f"h.{i}.w", (i % 5 + 1, 37), i % 2 == 0) for i in range(20)]
    servers = [f"ps-{j}" for j in range(3)]
    plain = plan_shards(params, servers, shard_bytes=400)
    assert plan_shards(params, servers, shard_bytes=400, fragments=1) == plain
    assert {s.fragment for s in plain} == {0}


def test_a_server_with_fewer_shards_than_fragments_is_refused() -> None:
    params = [ParamInfo("a", (10,), True), ParamInfo("b", (10,), True), ParamInfo("c", (1,), True)]
    message = (
        "server ps-1 owns 1 shards, fewer than fragments 2: lower fragments, use fewer "
        "servers or a smaller shard_bytes"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_shards(params, ["ps-0", "ps-1"], fragments=2)
    with pytest.raises(ValueError, match="fragments must be >= 1"):
        assign_fragments([], 0)


def test_backups_and_failover_keep_each_shards_fragment() -> None:
    """A fragment is a property of the shard id: the backup of a shard syncs it at the
    same versions, and a promoted or re-created copy still does."""
    params = [ParamInfo(f"h.{i}.w", (i % 4 + 1, 16), True) for i in range(12)]
    servers = ["ps-0", "ps-1", "ps-2"]
    shards = plan_shards(params, servers, shard_bytes=128, replication=2, fragments=2)
    fragment = {s.shard_id: s.fragment for s in shards}
    assert len(set(fragment.values())) == 2 and all(s.backup_server_id for s in shards)
    promoted = promote(shards, {"ps-1"})
    rebacked = assign_backups(promoted, ["ps-0", "ps-2"])
    for after in (promoted, rebacked):
        assert {s.shard_id: s.fragment for s in after} == fragment


def test_shard_fragment_travels_on_the_wire() -> None:
    shard = Shard("wte#1", "wte", (8, 4), 16, 16, "ps-0", True, "ps-1", fragment=3)
    wire = codec.shard_to_proto(shard)
    assert wire.fragment == 3 and codec.shard_from_proto(wire) == shard
    unset = dataclasses.replace(shard, fragment=0)
    assert (
        codec.shard_to_proto(unset).fragment == 0
        and codec.shard_from_proto(codec.shard_to_proto(unset)) == unset
    )


# -- settings, their wire form, the job's length ---------------------------------------------


def _spec(steps: int, fragments: int, **fields: object) -> job_pb2.JobSpec:
    inner = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-3, schedule=job_pb2.COSINE)
    return job_pb2.JobSpec(
        name="t",
        model=codec.model_to_proto(preset("tiny", 64)),
        optimizer=job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.7, momentum=0.9, nesterov=True),
        batch_size=4,
        seed=7,
        epochs=2,
        local_steps=job_pb2.LocalSteps(steps=steps, inner_optimizer=inner, fragments=fragments),
        **fields,  # type: ignore[arg-type]
    )


def test_fragments_resolve_the_lease_and_keep_the_inner_horizon() -> None:
    s = codec.job_settings_from_proto(_spec(steps=4, fragments=2), total_steps=12)
    assert s.local_steps is not None
    assert (s.local_steps.fragments, s.local_steps.window) == (2, 2)
    assert s.batches_per_lease == 8  # F x H: F rounds a lease
    assert s.optimizer.total_steps == 12  # outer: rounds of F windows
    assert s.local_steps.inner.total_steps == 12 * 4  # inner: outer x H, as without fragments
    # What the coordinator keeps and what a worker is configured with decode to the same.
    wire = codec.job_settings_to_proto(s)
    assert wire.local_steps.fragments == 2
    assert codec.job_settings_from_proto(wire, total_steps=999) == s
    # 0 on the wire is off, as 1 is: exactly plain local steps.
    for off in (0, 1):
        plain = codec.job_settings_from_proto(_spec(steps=4, fragments=off), total_steps=12)
        assert plain.local_steps is not None
        assert (plain.local_steps.fragments, plain.local_steps.window) == (1, 4)
        assert plain.batches_per_lease == 4


@pytest.mark.parametrize(
    ("steps", "fragments", "fields", "message"),
    [
        (4, 3, {}, r"local_steps.fragments 3 must be in \[1, local_steps.steps 4\] and divide"),
        (4, 8, {}, "local_steps.fragments 8 must be in"),
        (
            4,
            2,
            {"consistency": job_pb2.BOUNDED_STALENESS, "max_staleness": 2},
            "local_steps.fragments 2 needs SYNC: max_staleness must be 0, got 2",
        ),
        (4, 2, {"batches_per_lease": 6}, "batches_per_lease 6 must be a multiple of"),
    ],
)
def test_bad_fragments_name_the_field(
    steps: int, fragments: int, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        codec.job_settings_from_proto(_spec(steps, fragments, **fields), total_steps=10)


def test_fragments_validate_themselves_and_take_ssp_zero() -> None:
    s = codec.job_settings_from_proto(_spec(steps=4, fragments=4), total_steps=10)
    assert s.local_steps is not None and s.local_steps.window == 1
    with pytest.raises(ValueError, match=re.escape("local_steps.fragments 0 must be in")):
        LocalSteps(steps=4, inner=s.local_steps.inner, fragments=0)
    with pytest.raises(ValueError, match=r"local_steps.overlap .* needs local_steps.fragments > 1"):
        LocalSteps(steps=4, inner=s.local_steps.inner, overlap=True)
    assert LocalSteps(steps=4, inner=s.local_steps.inner, fragments=2, overlap=True).overlap
    # A lease of H batches is allowed (a multiple of H), and bounded staleness 0 is SYNC.
    assert dataclasses.replace(s, batches_per_lease=4).batches_per_lease == 4
    ssp0 = _spec(steps=4, fragments=2, consistency=job_pb2.BOUNDED_STALENESS)
    assert codec.job_settings_from_proto(ssp0, total_steps=10).max_staleness == 0


def test_a_lease_is_its_windows_then_its_flushes() -> None:
    assert lease_versions(8, 2, 2) == 5  # 4 windows, 1 flush
    assert lease_versions(5, 2, 2) == 4  # the last window is short
    assert lease_versions(16, 1, 4) == 19
    assert lease_versions(8, 4) == 2 and lease_versions(3) == 3  # no fragments: rounds


def test_default_total_steps_counts_outer_rounds_with_fragments() -> None:
    # One worker, 16 batches in leases of 8, H = 4, F = 2: 5 versions a lease, 10 an epoch,
    # 20 a job of 2 epochs: 10 outer rounds.
    assert default_total_steps(2, 32, 2, 1, batches_per_lease=8, local_steps=4, fragments=2) == 10
    # One lease of 8: 5 versions, ceil(5 / 2) = 3 rounds (the lr schedule must not run out).
    assert default_total_steps(1, 16, 2, 1, batches_per_lease=8, local_steps=4, fragments=2) == 3
    # 11 batches, leases 8 and 3: 5 + 3 versions, 4 rounds.
    assert default_total_steps(1, 22, 2, 1, batches_per_lease=8, local_steps=4, fragments=2) == 4
    # 2 workers, 5 leases of 8 (worker 0 has 3: 15 versions), F = 2: 8 rounds.
    assert default_total_steps(1, 80, 2, 2, batches_per_lease=8, local_steps=4, fragments=2) == 8
    # F = H = 4: windows of one batch; a lease of 16 is 16 + 3 versions, 5 rounds.
    assert default_total_steps(1, 32, 2, 1, batches_per_lease=16, local_steps=4, fragments=4) == 5


@FAST
@given(
    epochs=st.integers(0, 3),
    sequences=st.integers(0, 200),
    workers=st.integers(1, 5),
    h=st.integers(1, 6),
    leases=st.integers(1, 4),
)
def test_one_fragment_sizes_a_job_as_plain_local_steps(
    epochs: int, sequences: int, workers: int, h: int, leases: int
) -> None:
    args = (epochs, sequences, 2, workers)
    plain = default_total_steps(*args, batches_per_lease=h * leases, local_steps=h)
    assert default_total_steps(*args, batches_per_lease=h * leases, local_steps=h, fragments=1) == (
        plain
    )


# -- the lease book: windows, flushes, at least once ---------------------------------------


def take(leases: EpochLeases, worker: str) -> Lease:
    lease = leases.take(worker)
    assert lease is not None, f"{worker} got no lease"
    return lease


def test_account_counts_a_leases_flushes_as_pushes_of_no_batches() -> None:
    """K = 2, F = 2 (one flush), one worker from step 10, leases of 4 batches: windows at 10
    and 11, the flush at 12; the next lease's windows at 13 and 14, its flush at 15."""
    leases = EpochLeases(0, [4, 4], ["a"], per_push=2, flushes=1)
    first = take(leases, "a")
    leases.record(first.lease_id, 0, 10)
    leases.complete(first.lease_id, "a")
    second = take(leases, "a")
    leases.record(second.lease_id, 0, 13)
    # The servers stand at 14: the first lease's flush (12) is in, the second's is not.
    assert leases.account({"a": 10}, below_step=14) == 4  # batch 1 at 10, 2-3 at 11, 1 at 13
    assert sorted(first.seen) == [(0, 10), (1, 10), (2, 11), (3, 11)]
    assert sorted(second.seen) == [(0, 13), (1, 13)]
    assert leases.progress(14) == {0: 4} and leases.unapplied(14) == 2
    assert leases.progress(13) == {0: 4}
    # At 12 the first lease's flush is not in: its batches are not in every fragment yet.
    assert leases.progress(12) == {0: 0} and leases.unapplied(12) == 6
    assert leases.account({"a": 10}, below_step=16) == 2  # the second's window at 14
    assert leases.progress(16) == {0: 4, 1: 4}
    assert leases.account({"a": 10}, below_step=17) is None  # 7 steps, 6 pushes


def test_account_refuses_an_event_at_a_flush() -> None:
    leases = EpochLeases(0, [4, 4], ["a"], per_push=2, flushes=1)
    lease = take(leases, "a")
    leases.record(lease.lease_id, 2, 12)  # batch 2 is the window at 11; 12 is the flush
    assert leases.account({"a": 10}, below_step=13) is None and leases.unreported == 0


@pytest.mark.parametrize(
    ("flushes", "progress"),
    [
        # Without fragments a round is in once applied: the shard stands after it.
        (0, {5: {0: 0}, 6: {0: 2}, 7: {0: 4}}),
        # With one flush (at 7) the lease is in whole once the flush is, not before.
        (1, {5: {0: 0}, 6: {0: 0}, 7: {0: 0}, 8: {0: 4}}),
    ],
)
def test_a_lease_is_in_the_parameters_once_its_last_flush_is(
    flushes: int, progress: dict[int, dict[int, int]]
) -> None:
    leases = EpochLeases(0, [4], ["a"], per_push=2, flushes=flushes)
    lease = take(leases, "a")
    for batch, step in [(0, 5), (1, 5), (2, 6), (3, 6)]:
        leases.record(lease.lease_id, batch, step)
    leases.complete(lease.lease_id, "a")
    for below, done in progress.items():
        assert leases.progress(below) == done, below
    if flushes:  # a partial lease is trained again whole: every reported batch of it
        assert (leases.unapplied(7), leases.unapplied(8)) == (4, 0)


def test_progress_after_the_first_window_of_a_resumed_lease_stands_at_its_first_batch() -> None:
    leases = EpochLeases(0, [6], ["a"], done={0: 2}, per_push=2, flushes=1)
    lease = take(leases, "a")
    assert lease.first_batch == 2  # windows [2-3] at 4, [4-5] at 5, the flush at 6
    leases.record(lease.lease_id, 2, 4)
    assert leases.progress(6) == {0: 2}
    assert leases.progress(7) == {0: 6}  # the flush's step follows from the first window's


@pytest.mark.parametrize(
    ("events", "applied_below", "done", "orphaned", "redone", "unreported"),
    [
        # The flush (at 7) not applied: the lease is trained again from its first batch,
        # every batch it reported counted as redone (it is partly in the parameters).
        ([(0, 5), (1, 5), (2, 6), (3, 6)], 7, 0, [0], 4, 0),
        # Windows applied but not the flush, half reported: the same.
        ([(0, 5), (2, 6)], 7, 0, [0], 2, 0),
        # The flush applied: the lease is whole (completed, not orphaned), batches 1 and 3
        # in with no event.
        ([(0, 5), (2, 6)], 8, 4, [], 0, 2),
    ],
)
def test_lose_keeps_a_lease_only_whole(
    events: list[tuple[int, int]],
    applied_below: int,
    done: int,
    orphaned: list[int],
    redone: int,
    unreported: int,
) -> None:
    leases = EpochLeases(0, [4, 4], ["a", "b"], per_push=2, flushes=1)
    lease = take(leases, "a")
    for batch, step in events:
        leases.record(lease.lease_id, batch, step)
    assert leases.lose("a", applied_below=applied_below) == orphaned
    assert leases.done[0] == done
    assert (leases.redone_batches, leases.unreported) == (redone, unreported)
    assert leases.releases == len(orphaned)
    assert (0 in leases.completed) == (not orphaned)
    again = take(leases, "b")  # orphans first: the lost lease again, else b's own shard
    assert (again.data_shard, again.first_batch) == ((0, 0) if orphaned else (1, 0))
    assert leases.progress(applied_below) == {0: done}


def test_lose_redoes_a_resumed_lease_from_its_first_batch() -> None:
    leases = EpochLeases(0, [6], ["a", "b"], done={0: 2}, per_push=2, flushes=1)
    lease = take(leases, "a")
    leases.record(lease.lease_id, 2, 4)
    leases.record(lease.lease_id, 4, 5)
    assert leases.lose("a", applied_below=6) == [0]  # the flush at 6 is not in
    assert leases.done[0] == 2 and leases.redone_batches == 2


def test_reported_step_skips_flushes_back_to_their_window() -> None:
    leases = EpochLeases(0, [4, 4], ["a"], per_push=2, flushes=1)
    take(leases, "a")
    take(leases, "a")  # pushes from 10: windows 10, 11, flush 12, windows 13, 14, flush 15
    got = [leases.reported_step("a", 10, step) for step in range(10, 17)]
    assert got == [10, 11, 11, 13, 14, 14, 16]  # past its leases: unknown, the step itself
    plain = EpochLeases(0, [4], ["a"], per_push=2)
    take(plain, "a")
    assert plain.reported_step("a", 10, 11) == 11


def test_flushes_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="flushes must be >= 0"):
        EpochLeases(0, [1], ["a"], flushes=-1)


def test_the_desk_hands_its_book_the_flushes_and_knows_each_workers_flushes() -> None:
    desk = rounds_desk(FakeBarrier(), shards=2, batches=4, per_push=2, flushes=1)
    assert (desk.book.per_push, desk.book.flushes) == (2, 1)
    desk.open(["w0", "w1"], at=10)
    lease = desk.take("w0")
    assert lease is not None and lease.batches == 4
    assert [desk.reported_step("w0", s) for s in (11, 12)] == [11, 11]  # 12: w0's flush
    assert desk.reported_step("stopper", 12) == 12  # no known first step: the step itself
    assert desk.remaining == 8


# -- the client's view of a fragments run ----------------------------------------------------


def test_the_client_counts_versions_and_the_outer_lr_per_round(tmp_path: Path) -> None:
    """A step event's step is a version; with F = 2 the run lasts 2 x total_steps of them,
    and the lr of version v is the outer schedule's at v // 2 (as the servers apply it)."""
    spec = _spec(steps=4, fragments=2)
    spec.optimizer.CopyFrom(
        job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.7, schedule=job_pb2.COSINE, total_steps=10)
    )
    status = coordinator_pb2.JobStatus(job_id="job-1", step=0, spec=spec)
    opts = TrainOptions(local_steps=4, fragments=2)
    recorder, bar = train._outputs(tmp_path, "job-1", status, opts, Console(file=io.StringIO()))
    assert bar.total == 20
    recorder.epoch_started(0, workers=1)
    recorder.step(job_pb2.StepEvent(worker_id="w", step=7, loss=1.0))
    recorder.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["kind"] == "step"]
    outer = codec.optimizer_from_proto(spec.optimizer)
    assert row["step"] == 8 and row["lr"] == lr_at(outer, 3) != lr_at(outer, 7)
