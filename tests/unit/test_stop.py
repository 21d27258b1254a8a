"""Stopping an epoch at a step boundary (the client went away: Ctrl-C): `LeaseDesk.freeze`
against two real `ParameterStore`s one version apart. In-process, no gRPC, no threads."""

from __future__ import annotations

import torch

from lmps.services.coordinator.stop import STOPPER
from tests.unit.test_join import JOB, S, Stores, assert_one_history, desk_over, grad, loaded
from tests.unit.test_join import version as version_of


def test_a_frozen_barrier_makes_the_steps_below_the_stop_and_none_past_it() -> None:
    a, b = loaded(), loaded()
    desk = desk_over(Stores({"a": a, "b": b}))
    for store in (a, b):
        store.push(JOB, "w0", S, 1.0, grad(1.0))
    b.push(JOB, "w1", S, 1.0, grad(2.0))  # b made step S; w1's push to a is in flight

    assert desk.freeze(STOPPER) == S + 1
    a.push(JOB, "w1", S, 1.0, grad(2.0))  # lands: a makes step S too
    assert_one_history(a, b, S + 1)
    for store in (a, b):  # every member pushes S + 1: nothing is made
        assert not store.push(JOB, "w0", S + 1, 1.0, grad(1.0)).applied
        assert not store.push(JOB, "w1", S + 1, 1.0, grad(2.0)).applied
    desk.active = desk.active - {"w1"}  # a worker out of data leaves: the stopper stays
    desk.barrier.set_members(JOB, desk.servers, desk.active)
    assert desk.active == {"w0", STOPPER}
    assert (version_of(a), version_of(b)) == (S + 1, S + 1)

    # The resumed attempt drops the stopper and the pushes made at the stop.
    desk.open(["w0", "w1"])
    for store in (a, b):
        assert not store.push(JOB, "w0", S + 1, 1.0, grad(3.0)).applied
        assert store.push(JOB, "w1", S + 1, 1.0, grad(3.0)).applied
    assert_one_history(a, b, S + 2)
    # SGD lr 0.1 from zeros: step S (mean 1.5) then step S + 1 (mean 3, the stop's pushes gone).
    want = torch.full_like(a.pull(JOB, 0, [], 0)[1][0][1], -0.1 * 1.5 - 0.1 * 3.0)
    torch.testing.assert_close(a.pull(JOB, 0, [], 0)[1][0][1], want)
