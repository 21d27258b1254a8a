"""ASYNC (Hogwild-style parameter server) in one process: `ParameterStore`s with the ASYNC
barrier on their own, then two worker `Trainer`s, one of them much slower, and two stores.

What ASYNC keeps, asserted here: every accepted push is applied exactly once, at once, as one
optimizer step with that worker's gradient alone, so a store's version is its number of
pushes (and the lr of a push is the schedule at the version it was applied at); the stores'
digests say whether they took the same pushes, whatever their order; a fast worker never
waits for a slow one. Each store applies the pushes in its own arrival order (the stores'
orders may differ: each worker pushes to them one after the other, in opposite orders), read
back from the version each store answered each push with; a single-process torch replay
that recomputes each gradient at the per-store versions its worker pulled and applies them
to each store's shards in that store's order reproduces the stores bit for bit. Seconds long.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import pytest
import torch

from lmps.client.train import build_spec
from lmps.client.train_options import TrainOptions
from lmps.core.data import plan_data_shards
from lmps.core.errors import InvalidArgument, NotFound, OutOfRange
from lmps.core.model import GPT, init_model
from lmps.core.optim import OptimizerSettings, lr_at
from lmps.core.partition import Shard, assemble, shard_view
from lmps.core.settings import default_total_steps
from lmps.rpc import codec
from lmps.services.coordinator.leases import DESKS, AsyncLeaseDesk, DataLease
from lmps.services.parameter_server.store import ParameterStore
from lmps.services.worker.replica import Arrivals, Replica
from lmps.services.worker.trainer import CollectingPush, Lease, StepResult, Trainer
from lmps.v1 import job_pb2
from tests.unit.test_inprocess_parity import (
    BATCH,
    CONFIG,
    JOB,
    SEED,
    SERVERS,
    WORKERS,
    StoreClient,
    initial_shards,
    loaded_stores,
    run_epoch_in_threads,
)
from tests.unit.test_lease_desk import FakeBarrier
from tests.unit.test_local_steps import _sequences, _torch_optimizer

SETTINGS = OptimizerSettings(
    kind="adamw", lr=3e-3, weight_decay=0.1, schedule="cosine", warmup_steps=4, total_steps=60
)
LEASE = 2  # batches per lease: 15 leases an epoch, taken from one queue by whoever is free
EPOCHS = 2
SLOW = "w1"
SLOW_S = 0.1  # added to every step of the slow worker: many times a step of the fast one
DESK_B = 2  # sequences per batch in the lease desk tests
HOP_S = 0.005  # between a push's arrival at one store and at the other: reorders happen

# -- the store on its own ------------------------------------------------------------------

SGD = OptimizerSettings(kind="sgd", lr=0.5, schedule="cosine", warmup_steps=2, total_steps=8)
ADAMW = OptimizerSettings(kind="adamw", lr=0.05, weight_decay=0.1)


def grads_of(shards: Sequence[Shard], seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(s.shard_id, torch.randn(s.numel, generator=g)) for s in shards]


def async_store(settings: OptimizerSettings, members: Sequence[str] = WORKERS) -> ParameterStore:
    shards, values = initial_shards(init_model(CONFIG, SEED))
    mine = [s for s in shards if s.server_id == SERVERS[0]]
    store = ParameterStore(SERVERS[0])
    values_of = [(s.shard_id, values[s.shard_id]) for s in mine]
    store.load(JOB, settings, mine, values_of, members, consistency="async")
    return store


def mine(store: ParameterStore) -> list[Shard]:
    return store.describe(JOB)[2]


def test_each_push_is_one_step_at_once_at_the_lr_of_the_version_it_lands_at() -> None:
    store = async_store(SGD)
    expected = dict(store.pull(JOB, 0, [], timeout_s=0)[1])
    # w1 computed all its gradients at version 0 and pushes them late: each is still applied
    # at once, alone (weights 1 and 7 do not scale it), at the lr of the store's version.
    pushes = [("w0", 0, 1.0), ("w0", 1, 1.0), ("w1", 0, 7.0), ("w0", 3, 1.0), ("w1", 1, 7.0)]
    for i, (worker, step, weight) in enumerate(pushes):
        g = grads_of(mine(store), i)
        result = store.push(JOB, worker, step, weight, list(g), computed_at=step)
        assert (result.version, result.applied, result.pending) == (i + 1, True, 0)
        assert result.staleness == i - step  # the version it landed at - computed_at
        lr = lr_at(SGD, i)
        for sid, t in g:
            expected[sid] = expected[sid].add(t, alpha=-lr)  # torch SGD, no momentum
    got = dict(store.pull(JOB, 0, [], timeout_s=0)[1])
    for sid, t in expected.items():
        assert torch.equal(got[sid], t), sid
    assert store.describe(JOB)[4] == []  # nothing pending, ever


def test_the_digest_is_the_set_of_pushes_whatever_their_order() -> None:
    a, b, c = (async_store(ADAMW) for _ in range(3))
    pushes = [("w0", 0, 1.0, 0), ("w1", 0, 1.0, 1), ("w0", 1, 1.0, 2), ("w1", 2, 3.0, 3)]
    for store, order in ((a, [0, 1, 2, 3]), (b, [1, 0, 3, 2]), (c, [0, 1, 2])):
        for i in order:
            worker, step, weight, seed = pushes[i]
            store.push(JOB, worker, step, weight, grads_of(mine(store), seed), computed_at=step)
    assert a.history(JOB) == b.history(JOB)  # the same pushes, in another order
    assert a.describe(JOB)[1] == b.describe(JOB)[1] == 4
    va, vb = (dict(s.pull(JOB, 0, [], timeout_s=0)[1]) for s in (a, b))
    assert any(not torch.equal(va[k], vb[k]) for k in va)  # AdamW steps do not commute
    assert c.history(JOB) != a.history(JOB)  # one push fewer: told apart


def test_an_async_store_refuses_non_members_and_future_steps() -> None:
    store = async_store(SGD, members=["w0"])
    g = grads_of(mine(store), 0)
    with pytest.raises(NotFound):
        store.push(JOB, "w9", 0, 1.0, list(g), computed_at=0)
    with pytest.raises(OutOfRange):
        store.push(JOB, "w0", 1, 1.0, list(g), computed_at=1)
    assert store.describe(JOB)[1] == 0
    with pytest.raises(InvalidArgument, match="ASYNC needs 0"):
        store.load(JOB, SGD, mine(store), g, ["w0"], consistency="async", max_staleness=2)


# -- two trainers, one slowed --------------------------------------------------------------


class SlowReplica(Replica):
    """A replica whose every step takes `SLOW_S` longer (a much slower machine)."""

    def train_step(
        self,
        batch: torch.Tensor,
        on_grad: Callable[[str, torch.Tensor], None] | None = None,
        arrivals: Arrivals | None = None,
    ) -> tuple[float, dict[str, torch.Tensor]]:
        time.sleep(SLOW_S)
        return super().train_step(batch, on_grad, arrivals)


@dataclass(frozen=True)
class Push:
    worker: str
    step: int  # the push's step: the lowest version its pull got
    pulled: dict[str, int]  # store -> the version it answered the pull before this push with
    applied: dict[str, int]  # store -> the version it applied this push at (its place there)
    staleness: dict[str, int]  # store -> what it measured (`PushResult.staleness`)


class Recorder:
    """A `ParameterClient` that pulls as `StoreClient` does and pushes to the stores one
    after the other, `HOP_S` apart (w0 in store order, w1 in reverse: the stores then see
    some pushes in different orders), recording for every push the versions each store
    answered its pull and its push with."""

    def __init__(
        self, worker_id: str, stores: Mapping[str, ParameterStore], shards: list[Shard]
    ) -> None:
        self.worker_id, self.stores = worker_id, stores
        self.client = StoreClient(worker_id, stores, shards, mixed=True)
        self.pushes: list[Push] = []
        order = list(stores)
        self.order = order if worker_id == WORKERS[0] else order[::-1]

    def pull(
        self,
        min_version: int,
        timeout_s: float | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        return self.client.pull(min_version, timeout_s, shard_ids)

    def push(
        self,
        step: int,
        weight: float,
        grads: Mapping[str, torch.Tensor],
        computed_at: int | None = None,
    ) -> int:
        applied, stale = {}, {}
        for i, sid in enumerate(self.order):
            if i:
                time.sleep(HOP_S)  # the second store hears of it a moment later
            part = [(s, grads[s].clone()) for s in self.client.owned[sid]]  # as gRPC copies
            r = self.stores[sid].push(JOB, self.worker_id, step, weight, part, computed_at)
            assert r.applied and r.pending == 0
            applied[sid], stale[sid] = r.version - 1, r.staleness
        pulled = dict(self.client.pulls[-1])
        self.pushes.append(Push(self.worker_id, step, pulled, applied, stale))
        return max(applied.values()) + 1

    def open_push(self, step: int, weight: float, computed_at: int | None = None) -> CollectingPush:
        return CollectingPush(self, step, weight, computed_at)

    def cancel(self) -> None:
        self.client.cancel()


class Queue:
    """The epoch's leases in one queue, taken by whichever worker asks first (the
    coordinator's ASYNC desk lets a worker out of its own shards take another's)."""

    def __init__(self, sequences: torch.Tensor) -> None:
        self.sequences = sequences
        self.lock = threading.Lock()
        self.queue: deque[Lease] = deque()
        self.rows: dict[str, torch.Tensor] = {}  # lease id -> its token rows
        self.completed: list[str] = []

    def start_epoch(self, epoch: int) -> None:
        plan = plan_data_shards(self.sequences.shape[0], BATCH, LEASE, SEED, epoch)
        for j, ids in enumerate(plan):
            lease = Lease(f"e{epoch}-d{j}", j, 0, len(ids) // BATCH, self.sequences[ids])
            self.rows[lease.lease_id] = lease.tokens
            self.queue.append(lease)

    def next_lease(self, epoch: int, next_step: int) -> Lease | None:
        with self.lock:
            return self.queue.popleft() if self.queue else None

    def complete(self, lease: Lease) -> None:
        with self.lock:
            self.completed.append(lease.lease_id)


def train() -> tuple[list[StepResult], dict[str, ParameterStore], list[Push], Queue, list[Shard]]:
    shards, values = initial_shards(init_model(CONFIG, SEED))
    stores = loaded_stores(SETTINGS, shards, values, WORKERS, consistency="async")
    queue = Queue(_sequences())
    clients = {w: Recorder(w, stores, shards) for w in WORKERS}
    trainers = [
        Trainer(
            worker_id=w,
            model=(SlowReplica if w == SLOW else Replica)(CONFIG, shards, torch.device("cpu")),
            params=clients[w],
            leases=queue,
            batch_size=BATCH,
            asynchronous=True,
        )
        for w in WORKERS
    ]
    results: list[StepResult] = []
    for epoch in range(EPOCHS):
        queue.start_epoch(epoch)
        start = min(st.pull(JOB, 0, [], timeout_s=0)[0] for st in stores.values())
        results += run_epoch_in_threads(trainers, epoch, start)
    pushes = [p for c in clients.values() for p in c.pushes]
    return results, stores, pushes, queue, shards


def replay(
    results: list[StepResult], pushes: list[Push], queue: Queue, shards: list[Shard]
) -> dict[str, dict[str, torch.Tensor]]:
    """Single-process torch, one model and optimizer per store (only the store's own shards
    of it are read): each push's gradient is recomputed at the per-store versions its pull
    got and applied alone, at the lr of its place, to each store in that store's order.
    Pushes are replayed as soon as the versions they were computed at exist. Returns each
    store's shard values at the end."""
    models = {sid: init_model(CONFIG, SEED) for sid in SERVERS}
    opts = {sid: _torch_optimizer(m, SETTINGS) for sid, m in models.items()}
    held = {sid: [s for s in shards if s.server_id == sid] for sid in SERVERS}

    def snapshot(sid: str) -> dict[str, torch.Tensor]:
        params = dict(models[sid].named_parameters())
        return {s.shard_id: shard_view(params[s.param].detach(), s).clone() for s in held[sid]}

    history = {sid: [snapshot(sid)] for sid in SERVERS}  # store -> version -> its shards
    order = {sid: sorted(pushes, key=lambda p: p.applied[sid]) for sid in SERVERS}
    batch_of = {(r.worker_id, r.computed_at): r for r in results}
    scratch = GPT(CONFIG)
    cache: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def gradient(p: Push) -> dict[str, torch.Tensor]:
        key = (p.worker, p.step)
        if key not in cache:
            values = {
                s.shard_id: history[s.server_id][p.pulled[s.server_id]][s.shard_id] for s in shards
            }
            scratch.load_state_dict(dict(assemble(shards, values)), strict=False)
            r = batch_of[key]
            rows = queue.rows[r.lease_id]
            tokens = rows[r.batch_index * BATCH : (r.batch_index + 1) * BATCH].long()
            scratch.zero_grad()
            scratch.train()
            _, loss = scratch(tokens[:, :-1], tokens[:, 1:])
            assert loss is not None
            loss.backward()
            cache[key] = {n: q.grad.detach().clone() for n, q in scratch.named_parameters()}  # type: ignore[union-attr]
        return cache[key]

    done = dict.fromkeys(SERVERS, 0)
    while any(n < len(pushes) for n in done.values()):
        moved = False
        for sid in SERVERS:
            while done[sid] < len(pushes):
                p = order[sid][done[sid]]
                assert p.applied[sid] == done[sid]
                if any(p.pulled[o] >= len(history[o]) for o in SERVERS):
                    break  # computed at a version not replayed yet: the other store first
                g = gradient(p)
                for n, q in models[sid].named_parameters():
                    q.grad = g[n].clone()
                for group in opts[sid].param_groups:
                    group["lr"] = lr_at(SETTINGS, done[sid])
                opts[sid].step()
                history[sid].append(snapshot(sid))
                done[sid] += 1
                moved = True
        assert moved, "the pushes' pulls do not fit any order of the stores' updates"
    return {sid: history[sid][-1] for sid in SERVERS}


def test_async_applies_every_push_once_never_waits_and_replays_exactly() -> None:
    results, stores, pushes, queue, shards = train()
    batches = EPOCHS * len(_sequences()) // BATCH

    # Every batch trained once, each with one push, and every push applied exactly once on
    # every store: each store's version is the number of pushes, each push has its own place.
    assert len(results) == len(pushes) == batches
    assert len({(r.lease_id, r.batch_index) for r in results}) == batches
    assert len(queue.completed) == len(queue.rows)
    for sid, store in stores.items():
        assert store.pull(JOB, 0, [], timeout_s=0)[0] == len(pushes)
        assert sorted(p.applied[sid] for p in pushes) == list(range(len(pushes)))

    # What each push and its event say: the step is the lowest version pulled (= computed_at);
    # the event's step is the highest version a store applied it at; each store measured
    # the staleness at the version it applied it at.
    by_key = {(p.worker, p.step): p for p in pushes}
    for r in results:
        p = by_key[(r.worker_id, r.computed_at)]
        assert p.step == min(p.pulled.values())
        assert r.step == max(p.applied.values())
        assert p.staleness == {sid: p.applied[sid] - p.step for sid in SERVERS}
    # The fast worker never waited for the slow one: it made far more of the pushes.
    slow = sum(p.worker == SLOW for p in pushes)
    assert slow / len(pushes) < 0.4, f"slow worker made {slow} of {len(pushes)} pushes"
    assert max(v for p in pushes for v in p.staleness.values()) > 1

    # Exact replay, store by store, in each store's own order.
    expected = replay(results, pushes, queue, shards)
    init = initial_shards(init_model(CONFIG, SEED))[1]
    for sid, store in stores.items():
        got = dict(store.pull(JOB, 0, [], timeout_s=0)[1])
        assert got.keys() == expected[sid].keys()
        for k, v in expected[sid].items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"{sid} {k} differs")
            assert not torch.equal(v, init[k])
    a, b = SERVERS
    reordered = sum(
        1
        for p in pushes
        for q in pushes
        if p.applied[a] < q.applied[a] and p.applied[b] > q.applied[b]
    )
    print(
        f"\nASYNC: {len(pushes)} pushes, {slow} by the slow worker; staleness up to "
        f"{max(v for p in pushes for v in p.staleness.values())}; {reordered} pairs of pushes "
        "applied in opposite orders by the two stores"
    )


# -- the coordinator's ASYNC lease desk ----------------------------------------------------


def async_desk(barrier: FakeBarrier, shards: int = 4, at: int = 10) -> AsyncLeaseDesk:
    """Two workers, data shards of two batches, opened with the servers at `at`."""
    batches = 2
    n = shards * batches * DESK_B
    desk = DESKS["async"](
        job_id="job-1",
        epoch=0,
        plan=list(torch.arange(n).reshape(shards, batches * DESK_B)),
        train=torch.arange(n * 4, dtype=torch.int32).reshape(n, 4),
        batch_size=DESK_B,
        workers=["w0", "w1"],
        done={},
        servers={"ps-0": "127.0.0.1:1"},
        barrier=barrier,
    )
    assert isinstance(desk, AsyncLeaseDesk)
    desk.open(["w0", "w1"], at=at)
    return desk


def taken(desk: AsyncLeaseDesk, worker: str) -> DataLease:
    lease = desk.take(worker)
    assert lease is not None
    return lease


def test_async_out_of_data_stays_a_member_after_helping_the_others() -> None:
    barrier = FakeBarrier()
    desk = async_desk(barrier, shards=4)
    shards = [taken(desk, "w0").data_shard, taken(desk, "w0").data_shard]
    # w0's own shards are 0 and 2; out of them it takes w1's last one, not stopping while
    # w1 still has two to go.
    assert shards == [0, 2]
    assert taken(desk, "w0").data_shard == 3
    assert taken(desk, "w1").data_shard == 1
    calls = len(barrier.calls)
    assert desk.take("w0") is None and desk.take("w1") is None
    assert len(barrier.calls) == calls  # no barrier to leave: the members stay
    assert desk.active == {"w0", "w1"}


def test_async_a_lost_worker_is_dropped_and_its_shard_resumes_after_what_it_reported() -> None:
    barrier = FakeBarrier()
    desk = async_desk(barrier)
    lease = taken(desk, "w1")  # shard 1
    desk.record(lease.lease_id, 0, 13)  # every reported push is applied, whatever its step
    desk.lose("w1")
    assert barrier.calls[-1][0] == ["w0"]  # out of the members: its late pushes are refused
    orphan = taken(desk, "w0")
    assert (orphan.data_shard, orphan.first_batch) == (1, 1)
    assert desk.book.redone_batches == 0 and desk.book.releases == 1


def test_async_a_joiner_is_a_member_at_once_from_the_lowest_version() -> None:
    barrier = FakeBarrier()
    desk = async_desk(barrier)
    barrier.at = [14, 12]  # servers a couple of pushes apart
    assert desk.join("w2", training=["w0", "w1"]) == 12
    assert barrier.calls[-1][0] == ["w0", "w1", "w2"] and barrier.join_at[-1] == 0
    assert taken(desk, "w2") is not None


def test_async_counts_the_pushes_applied_without_an_event() -> None:
    barrier = FakeBarrier()
    desk = async_desk(barrier, at=10)
    a, b = taken(desk, "w0"), taken(desk, "w1")
    for lease, batch, step in ((a, 0, 10), (b, 0, 11), (a, 1, 13)):
        desk.record(lease.lease_id, batch, step)
    # Version 12 is whole once the pushes at steps 10 and 11 are in; 14 holds four pushes,
    # one of which (made at 12 or 13 on some server) never reported.
    assert [desk.reported_below(v) for v in (11, 12, 14)] == [1, 2, 3]
    assert desk.highest == 14
    assert desk.progress(12) == {0: 1, 1: 1}  # the batch that made 14 is not in 12
    assert desk.account(14) == 1 and desk.unreported == 1
    assert desk.unapplied(14) == 1  # trained again (at least once), counted
    assert desk.progress(14) == {0: 2, 1: 1}
    assert desk.account(12) is None  # three events cannot come from two versions' pushes
    assert desk.freeze("(stopped)") is None  # no barrier to freeze


# -- settings and the CLI ------------------------------------------------------------------


def test_async_job_settings_refuse_a_bound_and_local_steps() -> None:
    spec = job_pb2.JobSpec(
        name="t",
        model=codec.model_to_proto(CONFIG),
        optimizer=job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-3),
        batch_size=4,
        seed=7,
        epochs=1,
        consistency=job_pb2.ASYNC,
    )
    assert codec.job_settings_from_proto(spec, total_steps=5).consistency == "async"
    spec.max_staleness = 2
    with pytest.raises(ValueError, match="ASYNC takes pushes of any staleness"):
        codec.job_settings_from_proto(spec, total_steps=5)
    spec.max_staleness = 0
    inner = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-3)
    spec.local_steps.CopyFrom(job_pb2.LocalSteps(steps=2, inner_optimizer=inner))
    with pytest.raises(ValueError, match="ASYNC applies each push alone"):
        codec.job_settings_from_proto(spec, total_steps=5)


def test_async_total_steps_are_the_batches() -> None:
    # 11 batches of 2 over 3 workers: SYNC makes as many steps as the busiest worker has
    # pushes (leases of 4: 4 + 4 + 3 -> 4 a epoch); ASYNC one per batch.
    assert default_total_steps(2, 22, 2, 3, batches_per_lease=4) == 8
    assert default_total_steps(2, 22, 2, 3, batches_per_lease=4, consistency="async") == 22
    assert default_total_steps(0, 1, 4, 1, consistency="async") == 1  # never zero


def test_the_cli_takes_consistency_async() -> None:
    assert TrainOptions(consistency="async").consistency_mode() == ("async", 0)
    spec = build_spec(TrainOptions(consistency="async"), vocab_size=64, tokenizer_json="")
    assert (spec.consistency, spec.max_staleness) == (job_pb2.ASYNC, 0)
    with pytest.raises(ValueError, match="must be sync, async or ssp:S"):
        TrainOptions(consistency="async:3")
    with pytest.raises(ValueError, match="no rounds for --local-steps"):
        TrainOptions(consistency="async", local_steps=4)
