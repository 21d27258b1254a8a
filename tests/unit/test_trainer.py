"""Unit tests for the worker's loop (services/worker/trainer.py) on fakes: no gRPC, no torch
model, no threads; and for its coordinator lease adapter (services/worker/leases.py) on a
fake stub."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import pytest
import torch

from lmps.core.errors import InvalidArgument
from lmps.core.model import GPTConfig
from lmps.rpc import codec
from lmps.rpc.channel import DEFAULT_TIMEOUT_S
from lmps.services.worker.leases import CoordinatorLeases
from lmps.services.worker.trainer import (
    CollectingPush,
    Lease,
    PullInFlight,
    StepResult,
    Trainer,
    check_eval_tokens,
)
from lmps.v1 import coordinator_pb2

B, T = 2, 4  # sequences per batch, tokens per sequence (inputs)


def lease(lease_id: str, data_shard: int, batches: int, first_batch: int = 0) -> Lease:
    # Row r of the lease holds the value 100 * data_shard + r everywhere: batches are traceable.
    rows = torch.arange(batches * B, dtype=torch.int32) + 100 * data_shard
    return Lease(lease_id, data_shard, first_batch, batches, rows[:, None].expand(-1, T + 1))


class FakeLeases:
    def __init__(self, *leases: Lease) -> None:
        self.queue = list(leases)
        self.calls: list[tuple[str, object]] = []

    def next_lease(self, epoch: int, next_step: int) -> Lease | None:
        self.calls.append(("lease", (epoch, next_step)))
        return self.queue.pop(0) if self.queue else None

    def complete(self, lease: Lease) -> None:
        self.calls.append(("complete", lease.lease_id))


class FakeParams:
    """Servers whose version jumps by `skip` on every pull, as if other workers ran ahead."""

    def __init__(self, skip: int = 0, fail_at_pull: int = -1) -> None:
        self.skip = skip
        self.fail_at_pull = fail_at_pull
        self.pulls: list[int] = []
        self.pushes: list[tuple[int, float, dict[str, torch.Tensor]]] = []
        self.cancelled = 0

    def pull(
        self,
        min_version: int,
        timeout_s: float | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        if len(self.pulls) == self.fail_at_pull:
            raise RuntimeError("server gone")
        self.pulls.append(min_version)
        version = min_version + self.skip
        return version, {"s": torch.full((1,), float(version))}

    def push(
        self,
        step: int,
        weight: float,
        grads: Mapping[str, torch.Tensor],
        computed_at: int | None = None,
    ) -> None:
        self.pushes.append((step, weight, dict(grads)))

    def open_push(self, step: int, weight: float, computed_at: int | None = None) -> CollectingPush:
        return CollectingPush(self, step, weight, computed_at)

    def cancel(self) -> None:
        self.cancelled += 1


class FakeModel:
    def __init__(self) -> None:
        self.loaded: list[float] = []
        self.batches: list[torch.Tensor] = []

    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        self.loaded.append(float(values["s"]))

    def load_one(self, shard_id: str, value: torch.Tensor) -> None:
        raise AssertionError("FakeParams cannot stream a pull: the trainer loads it whole")

    def train_step(
        self,
        batch: torch.Tensor,
        on_grad: Callable[[str, torch.Tensor], None] | None = None,
        arrivals: PullInFlight | None = None,
    ) -> tuple[float, dict[str, torch.Tensor]]:
        assert arrivals is None
        self.batches.append(batch)
        grads = {"s": batch[:, 0].float().sum().reshape(1)}
        if on_grad is not None:
            on_grad("s", grads["s"])
        return float(batch[0, 0]), grads


def make(
    leases: FakeLeases, params: FakeParams | None = None
) -> tuple[Trainer, FakeParams, FakeModel]:
    params = params or FakeParams()
    model = FakeModel()
    trainer = Trainer(worker_id="w0", model=model, params=params, leases=leases, batch_size=B)
    return trainer, params, model


def test_one_result_per_batch_and_leases_completed_after_their_batches() -> None:
    leases = FakeLeases(lease("a", 3, 2, first_batch=4), lease("b", 5, 1))
    trainer, params, model = make(leases)
    results = list(trainer.run_epoch(epoch=1, start_step=10))
    assert [(r.lease_id, r.data_shard, r.batch_index, r.step) for r in results] == [
        ("a", 3, 4, 10),
        ("a", 3, 5, 11),
        ("b", 5, 0, 12),
    ]
    assert leases.calls == [
        ("lease", (1, 10)),
        ("complete", "a"),
        ("lease", (1, 12)),
        ("complete", "b"),
        ("lease", (1, 13)),
    ]
    # Each batch is its own slice of the lease's rows.
    assert [b[:, 0].tolist() for b in model.batches] == [[300, 301], [302, 303], [500, 501]]
    assert params.pulls == [10, 11, 12]
    assert [(s, w) for s, w, _ in params.pushes] == [(10, 2.0), (11, 2.0), (12, 2.0)]
    assert trainer.step == 13
    r = results[0]
    assert isinstance(r, StepResult) and r.worker_id == "w0"
    assert r.tokens == B * T and r.loss == 300.0
    assert min(r.pull_s, r.compute_s, r.push_s) >= 0 and r.tokens_per_s > 0


def test_follows_the_pulled_version() -> None:
    # Servers two versions ahead on every pull: the worker computes at, and pushes for, the
    # version it pulled, and asks for the one after it next.
    trainer, params, model = make(FakeLeases(lease("a", 0, 3)), FakeParams(skip=2))
    steps = [r.step for r in trainer.run_epoch(epoch=0, start_step=0)]
    assert steps == [2, 5, 8]
    assert params.pulls == [0, 3, 6]
    assert [s for s, _, _ in params.pushes] == steps
    assert model.loaded == [2.0, 5.0, 8.0]
    assert trainer.step == 9


def test_step_is_live_while_the_caller_holds_a_result() -> None:
    trainer, _, _ = make(FakeLeases(lease("a", 0, 2)))
    it = trainer.run_epoch(epoch=0, start_step=7)
    assert next(it).step == 7 and trainer.step == 7  # advanced only when the next is asked
    assert next(it).step == 8
    assert list(it) == [] and trainer.step == 9


def test_stops_before_leasing_when_inactive() -> None:
    leases = FakeLeases(lease("a", 0, 2))
    trainer, params, _ = make(leases)
    assert list(trainer.run_epoch(epoch=0, start_step=4, active=lambda: False)) == []
    assert leases.calls == [] and params.pulls == []
    assert trainer.step == 4


def test_stops_mid_lease_without_completing_it() -> None:
    leases = FakeLeases(lease("a", 0, 3), lease("b", 1, 1))
    trainer, params, _ = make(leases)
    checks = iter([True, True, True, False])  # loop, batch 0, batch 1, batch 2 -> stop
    results = list(trainer.run_epoch(epoch=0, start_step=0, active=lambda: next(checks)))
    assert [r.batch_index for r in results] == [0, 1]
    assert leases.calls == [("lease", (0, 0))]  # never completed, no second lease
    assert len(params.pushes) == 2


def test_a_failed_pull_ends_the_epoch_with_the_error_and_no_completion() -> None:
    leases = FakeLeases(lease("a", 0, 2))
    trainer, params, _ = make(leases, FakeParams(fail_at_pull=1))
    it = trainer.run_epoch(epoch=0, start_step=0)
    assert next(it).step == 0
    with pytest.raises(RuntimeError, match="server gone"):
        next(it)
    assert leases.calls == [("lease", (0, 0))]
    assert len(params.pushes) == 1


def test_empty_epoch_and_cancel() -> None:
    leases = FakeLeases()
    trainer, params, _ = make(leases)
    assert list(trainer.run_epoch(epoch=2, start_step=5)) == []
    assert leases.calls == [("lease", (2, 5))]
    trainer.cancel()
    assert params.cancelled == 1


CONFIG = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10, dropout=0.0)


def test_check_eval_tokens() -> None:
    check_eval_tokens(torch.zeros((3, 5), dtype=torch.int32), CONFIG)
    check_eval_tokens(torch.zeros((0, 2), dtype=torch.int64), CONFIG)
    bad = [
        ("int tensor", torch.zeros((3, 5))),
        ("int tensor", torch.zeros((3,), dtype=torch.int32)),
        ("int tensor", torch.zeros((3, 1), dtype=torch.int32)),
        (r"\[0, 10\)", torch.full((1, 3), 10, dtype=torch.int32)),
        (r"\[0, 10\)", torch.full((1, 3), -1, dtype=torch.int32)),
        ("exceed block_size", torch.zeros((1, 6), dtype=torch.int32)),
    ]
    for match, tokens in bad:
        with pytest.raises(InvalidArgument, match=match):
            check_eval_tokens(tokens, CONFIG)


class FakeCoordinator:
    """The two coordinator RPCs the worker's lease adapter calls, recorded."""

    def __init__(self, *responses: coordinator_pb2.LeaseDataResponse) -> None:
        self.responses = list(responses)
        self.calls: list[tuple[object, dict[str, object]]] = []

    def LeaseData(self, request: object, **kwargs: object) -> coordinator_pb2.LeaseDataResponse:
        self.calls.append((request, kwargs))
        return self.responses.pop(0)

    def CompleteLease(self, request: object, **kwargs: object) -> object:
        self.calls.append((request, kwargs))
        return coordinator_pb2.CompleteLeaseResponse()


def test_coordinator_leases_decode_tokens_and_wait_for_a_restarting_coordinator() -> None:
    tokens = torch.arange(2 * B * (T + 1), dtype=torch.int32).reshape(2 * B, T + 1)
    wire = coordinator_pb2.DataLease(
        lease_id="L", epoch=3, data_shard=7, tokens=codec.encode(tokens), batches=2, first_batch=4
    )
    stub = FakeCoordinator(
        coordinator_pb2.LeaseDataResponse(lease=wire), coordinator_pb2.LeaseDataResponse(done=True)
    )
    leases = CoordinatorLeases(cast(Any, stub), "job", "w1")
    got = leases.next_lease(epoch=3, next_step=9)
    assert got is not None
    assert (got.lease_id, got.data_shard, got.first_batch, got.batches) == ("L", 7, 4, 2)
    assert torch.equal(got.tokens, tokens)
    leases.complete(got)
    assert leases.next_lease(epoch=3, next_step=11) is None
    requests = [r for r, _ in stub.calls]
    assert requests == [
        coordinator_pb2.LeaseDataRequest(job_id="job", worker_id="w1", epoch=3, next_step=9),
        coordinator_pb2.CompleteLeaseRequest(job_id="job", worker_id="w1", lease_id="L"),
        coordinator_pb2.LeaseDataRequest(job_id="job", worker_id="w1", epoch=3, next_step=11),
    ]
    assert all(kw == {"timeout": DEFAULT_TIMEOUT_S, "wait_for_ready": True} for _, kw in stub.calls)
