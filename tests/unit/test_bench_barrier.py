"""`bench barrier`'s alternative (accumulate on arrival) against the barrier as built."""

from __future__ import annotations

import pytest
import torch

from bench.barrier import OnArrival, compare, server_shards
from lmps.services.parameter_server.consistency import SyncBarrier


def test_accumulating_on_arrival_gives_the_barriers_mean_bit_for_bit() -> None:
    # `compare` raises on the first step whose means differ; it checks every step.
    result = compare("tiny", repeats=1, steps=2)
    assert result["same_bits"] and result["shards"] > 0
    assert result["accumulator_bytes"] == 8 * result["params"]


@pytest.mark.parametrize("order", [("w0", "w1"), ("w1", "w0")])
def test_either_push_may_start_the_accumulator_with_two_workers(order) -> None:
    # fp addition commutes, so (0 + a*g_a) + b*g_b is the sorted-order sum whichever comes
    # first. Values spread over 60 binades, so that the sums round, and signed zeros (a
    # barrier starting from +0.0 maps -0.0 to +0.0; the alternative has to as well).
    shards = server_shards("tiny")
    gen = torch.Generator().manual_seed(1)

    def grad(n: int) -> torch.Tensor:
        g = torch.randn(n, generator=gen) * torch.exp2(
            torch.randint(-30, 30, (n,), generator=gen).float()
        )
        zeros = torch.rand(n, generator=gen) < 0.2
        return torch.where(zeros, torch.where(g < 0, -0.0, 0.0), g)

    grads = {w: {s.shard_id: grad(s.numel) for s in shards} for w in ("w0", "w1")}
    weight = {"w0": 3.0, "w1": 5.0}
    barrier = SyncBarrier(
        job_id="t", numel={s.shard_id: s.numel for s in shards}, members=["w0", "w1"]
    )
    for w in ("w0", "w1"):
        update = barrier.push(w, 0, weight[w], grads[w])
    assert update is not None
    alt = OnArrival(shards)
    first, last = order
    alt.first(grads[first], weight[first])
    mean = alt.last(grads[last], weight[last], weight["w0"] + weight["w1"])
    for sid, g in update.grads.items():
        # Bit patterns: torch.equal takes -0.0 for +0.0.
        assert torch.equal(g.view(torch.int32), mean[sid].view(torch.int32)), sid
