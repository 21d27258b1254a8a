"""The step-composition digest: servers that applied the same steps agree, servers that
applied a step with different workers (one got a push the other never saw) disagree."""

from __future__ import annotations

import torch

from lmps.core.optim import OptimizerSettings
from lmps.core.partition import ParamInfo, plan_shards
from lmps.services.parameter_server.store import ParameterStore

SHARDS = plan_shards([ParamInfo("w", (8,), True)], ["ps"])
SGD = OptimizerSettings(kind="sgd", lr=0.1)


def loaded() -> ParameterStore:
    store = ParameterStore("ps")
    value = [(s.shard_id, torch.zeros(s.numel)) for s in SHARDS]
    store.load("job", SGD, SHARDS, value, members=["w0", "w1"])
    return store


def grad(x: float) -> list[tuple[str, torch.Tensor]]:
    return [(s.shard_id, torch.full((s.numel,), x)) for s in SHARDS]


def test_same_steps_same_history_whatever_the_push_order() -> None:
    a, b = loaded(), loaded()
    assert a.history("job") == b.history("job")
    a.push("job", "w0", 0, 1.0, grad(1.0))
    a.push("job", "w1", 0, 1.0, grad(2.0))
    b.push("job", "w1", 0, 1.0, grad(2.0))
    b.push("job", "w0", 0, 1.0, grad(1.0))
    assert a.history("job") == b.history("job")
    assert a.history("job") != loaded().history("job")  # it moves with every step


def test_a_step_missing_a_workers_push_is_told_apart() -> None:
    # w0 died between its pushes: server a got it, server b did not and dropped w0.
    a, b = loaded(), loaded()
    for store in (a, b):
        store.push("job", "w1", 0, 1.0, grad(2.0))
    a.push("job", "w0", 0, 1.0, grad(1.0))
    b.set_members("job", ["w1"], discard=["w0"])
    _, va = a.pull("job", 1, [], 1.0)
    _, vb = b.pull("job", 1, [], 1.0)
    assert a.history("job") != b.history("job")
    assert not torch.equal(va[0][1], vb[0][1])  # and indeed the shards differ


def test_weights_are_part_of_the_history() -> None:
    a, b = loaded(), loaded()
    for store, weight in ((a, 1.0), (b, 2.0)):
        store.push("job", "w0", 0, weight, grad(1.0))
        store.push("job", "w1", 0, weight, grad(1.0))
    assert a.history("job") != b.history("job")
