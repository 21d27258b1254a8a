"""A worker joining mid-step under SYNC: the coordinator's join (`LeaseDesk.join`) against two
real `ParameterStore`s one version apart. In-process, no gRPC, no threads.

Mid-step server b already made step s (every member's push arrived) while server a still
waits for w1's push for s. The join must take effect at one version on both: both make s
without the joiner and s + 1 with it, with the same step history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest
import torch

from lmps.core.errors import FailedPrecondition
from lmps.core.optim import OptimizerSettings
from lmps.core.partition import ParamInfo, plan_shards
from lmps.services.coordinator.leases import LeaseDesk
from lmps.services.parameter_server.store import ParameterStore

JOB = "job"
SHARDS = plan_shards([ParamInfo("w", (8,), True)], ["ps"])
SGD = OptimizerSettings(kind="sgd", lr=0.1)
S = 5  # the version the servers stand at when the step starts
B = 2  # batch size


class Stores:
    """`leases.Barrier` over in-process stores, as `Fleet` is over gRPC: every server is told,
    then the first refusal is raised. `on_read` runs after each read of the versions (the
    servers moving on between the read and the change)."""

    def __init__(self, stores: Mapping[str, ParameterStore]) -> None:
        self.stores = dict(stores)
        self.on_read: list[Callable[[], object]] = []
        self.join_at: list[int] = []

    def versions(self, job_id: str, servers: Mapping[str, str]) -> list[int]:
        out = [self.stores[s].describe(job_id)[1] for s in servers]
        if self.on_read:
            self.on_read.pop(0)()
        return out

    def set_members(
        self,
        job_id: str,
        servers: Mapping[str, str],
        members: set[str],
        discard_pending: bool = False,
        discard: Sequence[str] = (),
        join_at: int = 0,
    ) -> int:
        self.join_at.append(join_at)
        results, errors = [], []
        for s in servers:
            try:
                results.append(
                    self.stores[s].set_members(
                        job_id, sorted(members), discard_pending, discard, join_at
                    )
                )
            except FailedPrecondition as err:
                errors.append(err)
        if errors:
            raise errors[0]
        return min(v - int(applied) for v, applied in results)


def grad(x: float) -> list[tuple[str, torch.Tensor]]:
    return [(s.shard_id, torch.full((s.numel,), x)) for s in SHARDS]


def loaded() -> ParameterStore:
    store = ParameterStore("ps")
    value = [(s.shard_id, torch.zeros(s.numel)) for s in SHARDS]
    store.load(JOB, SGD, SHARDS, value, members=["w0", "w1"], version=S)
    return store


def desk_over(barrier: Stores) -> LeaseDesk:
    shards, batches = 4, 2
    n = shards * batches * B
    desk = LeaseDesk(
        job_id=JOB,
        epoch=0,
        plan=list(torch.arange(n).reshape(shards, batches * B)),
        train=torch.arange(n * 3, dtype=torch.int32).reshape(n, 3),
        batch_size=B,
        workers=["w0", "w1"],
        done={},
        servers={name: name for name in barrier.stores},
        barrier=barrier,
    )
    desk.open(["w0", "w1"])
    return desk


def version(store: ParameterStore) -> int:
    return store.describe(JOB)[1]


def values(store: ParameterStore) -> torch.Tensor:
    return store.pull(JOB, 0, [], 0)[1][0][1]


def assert_one_history(a: ParameterStore, b: ParameterStore, at: int) -> None:
    assert version(a) == version(b) == at
    assert a.history(JOB) == b.history(JOB)
    assert torch.equal(values(a), values(b))


def test_a_join_between_two_servers_one_version_apart_takes_effect_at_the_higher() -> None:
    a, b = loaded(), loaded()
    barrier = Stores({"a": a, "b": b})
    desk = desk_over(barrier)
    for store in (a, b):
        store.push(JOB, "w0", S, 1.0, grad(1.0))
    b.push(JOB, "w1", S, 1.0, grad(2.0))  # b made step S; w1's push to a is in flight
    assert (version(a), version(b)) == (S, S + 1)

    assert desk.join("j", training=["w0", "w1"]) == S + 1  # the joiner's stream starts here
    assert desk.active == {"w0", "w1", "j"}

    a.push(JOB, "w1", S, 1.0, grad(2.0))  # lands: a makes step S without the joiner
    assert_one_history(a, b, S + 1)
    for store in (a, b):  # step S + 1 waits for the joiner on both
        assert not store.push(JOB, "w0", S + 1, 1.0, grad(1.0)).applied
        assert not store.push(JOB, "w1", S + 1, 1.0, grad(2.0)).applied
        assert store.push(JOB, "j", S + 1, 1.0, grad(3.0)).applied
    assert_one_history(a, b, S + 2)


def test_a_join_refused_by_a_server_that_moved_on_is_taken_back_and_retried() -> None:
    a, b = loaded(), loaded()
    barrier = Stores({"a": a, "b": b})
    desk = desk_over(barrier)
    for store in (a, b):
        store.push(JOB, "w0", S, 1.0, grad(1.0))
    # Both at S when read; then w1's push lands on b: b refuses join_at S, a took it.
    barrier.on_read.append(lambda: b.push(JOB, "w1", S, 1.0, grad(2.0)))
    assert desk.join("j", training=["w0", "w1"]) == S + 1
    assert barrier.join_at == [0, S, 0, S + 1]  # open, refused, taken back, retried

    a.push(JOB, "w1", S, 1.0, grad(2.0))  # a makes step S without the joiner too
    assert_one_history(a, b, S + 1)
    for store in (a, b):
        store.push(JOB, "w0", S + 1, 1.0, grad(1.0))
        store.push(JOB, "w1", S + 1, 1.0, grad(2.0))
        assert store.push(JOB, "j", S + 1, 1.0, grad(3.0)).applied
    assert_one_history(a, b, S + 2)


def test_a_join_the_servers_keep_outrunning_is_given_up_with_nothing_changed() -> None:
    a, b = loaded(), loaded()
    barrier = Stores({"a": a, "b": b})
    desk = desk_over(barrier)

    def step() -> None:  # every read, both servers make a step before the change arrives
        for store in (a, b):
            at = version(store)
            store.push(JOB, "w0", at, 1.0, grad(1.0))
            store.push(JOB, "w1", at, 1.0, grad(2.0))

    barrier.on_read.extend([step] * 100)
    assert desk.join("j", training=["w0", "w1"]) is None
    assert desk.active == {"w0", "w1"}
    for store in (a, b):
        assert store.describe(JOB)[3] == ["w0", "w1"]
    assert_one_history(a, b, version(a))


def test_a_push_for_a_step_before_the_join_is_refused() -> None:
    a, b = loaded(), loaded()
    barrier = Stores({"a": a, "b": b})
    desk = desk_over(barrier)
    b.push(JOB, "w0", S, 1.0, grad(1.0))
    b.push(JOB, "w1", S, 1.0, grad(1.0))
    assert desk.join("j", training=["w0", "w1"]) == S + 1
    with pytest.raises(FailedPrecondition):
        a.push(JOB, "j", S, 1.0, grad(3.0))
