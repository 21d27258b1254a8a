"""Bounded staleness (Petuum SSP) in one process: two worker `Trainer`s, one of them slowed,
and two `ParameterStore`s with the bounded-staleness barrier.

What SSP keeps, asserted here: every step is still the weighted mean of every member's push
for it (SYNC's composition); each push's gradient was computed at versions within
`max_staleness` of its step (the bound, never exceeded); so a replay that computes each
gradient at exactly the (per-server) versions its worker pulled reproduces the servers'
parameters bit for bit. With max_staleness 0 the mode is SYNC exactly. Seconds long.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping

import pytest
import torch

from lmps.core.model import GPT, init_model
from lmps.core.optim import OptimizerSettings, lr_at
from lmps.core.partition import Shard, assemble, shard_view
from lmps.core.settings import Consistency
from lmps.services.parameter_server.store import ParameterStore
from lmps.services.worker.replica import Arrivals, Replica
from lmps.services.worker.trainer import StepResult, Trainer
from tests.unit.test_inprocess_parity import (
    BATCH,
    CONFIG,
    JOB,
    SEED,
    WORKERS,
    StoreClient,
    initial_shards,
    loaded_stores,
    run_epoch_in_threads,
)
from tests.unit.test_local_steps import EPOCHS, Book, _sequences, _torch_optimizer

SETTINGS = OptimizerSettings(kind="adamw", lr=3e-3, weight_decay=0.1, total_steps=100)
SLOW_S = 0.03  # added to every step of the slow worker: several times its compute here


class SlowReplica(Replica):
    """A replica whose every step takes `SLOW_S` longer (a slower machine)."""

    def train_step(
        self,
        batch: torch.Tensor,
        on_grad: Callable[[str, torch.Tensor], None] | None = None,
        arrivals: Arrivals | None = None,
    ) -> tuple[float, dict[str, torch.Tensor]]:
        time.sleep(SLOW_S)
        return super().train_step(batch, on_grad, arrivals)


class Recorder(StoreClient):
    """Records each push with the versions every store answered the pull before it."""

    def __init__(
        self, worker_id: str, stores: Mapping[str, ParameterStore], shards: list[Shard], mixed: bool
    ) -> None:
        super().__init__(worker_id, stores, shards, mixed)
        self.pushes: list[tuple[int, int | None, dict[str, int]]] = []

    def push(
        self,
        step: int,
        weight: float,
        grads: Mapping[str, torch.Tensor],
        computed_at: int | None = None,
    ) -> None:
        super().push(step, weight, grads, computed_at)
        self.pushes.append((step, computed_at, self.pulls[-1]))


def train(
    consistency: Consistency, staleness: int, slow: str | None
) -> tuple[list[StepResult], dict[str, torch.Tensor], Book, dict[str, Recorder], list[Shard]]:
    shards, values = initial_shards(init_model(CONFIG, SEED))
    stores = loaded_stores(
        SETTINGS, shards, values, WORKERS, consistency=consistency, max_staleness=staleness
    )
    book = Book(stores, _sequences())
    clients = {w: Recorder(w, stores, shards, mixed=staleness > 0) for w in WORKERS}
    trainers = [
        Trainer(
            worker_id=w,
            model=(SlowReplica if w == slow else Replica)(CONFIG, shards, torch.device("cpu")),
            params=clients[w],
            leases=book.source(w),
            batch_size=BATCH,
            staleness=staleness,
        )
        for w in WORKERS
    ]
    results: list[StepResult] = []
    for epoch in range(EPOCHS):
        book.start_epoch(epoch)
        start = max(st.pull(JOB, 0, [], timeout_s=0)[0] for st in stores.values())
        results += run_epoch_in_threads(trainers, epoch, start)
    trained: dict[str, torch.Tensor] = {}
    for store in stores.values():
        trained.update(store.pull(JOB, 0, [], timeout_s=0)[1])
    return results, assemble(shards, trained), book, clients, shards


def replay(
    results: list[StepResult], book: Book, clients: Mapping[str, Recorder], shards: list[Shard]
) -> dict[str, torch.Tensor]:
    """Single-process torch: step c is the sequence-weighted mean (fp64, worker order) of each
    worker's gradient for c, computed at the per-server versions its pull got."""
    model = init_model(CONFIG, SEED)
    opt = _torch_optimizer(model, SETTINGS)
    params = dict(model.named_parameters())

    def snapshot() -> dict[str, torch.Tensor]:
        return {s.shard_id: shard_view(params[s.param].detach(), s).clone() for s in shards}

    history = [snapshot()]  # version -> shard values
    batch_of = {(r.worker_id, r.step): r for r in results}
    pulled = {(w, step): answered for w, c in clients.items() for step, _, answered in c.pushes}
    by_step: dict[int, list[str]] = defaultdict(list)
    for w, step in sorted(batch_of):
        by_step[step].append(w)
    scratch = GPT(CONFIG)
    for step in sorted(by_step):
        assert step == len(history) - 1
        grads: dict[str, dict[str, torch.Tensor]] = {}
        for w in sorted(by_step[step]):
            answered = pulled[(w, step)]
            mixed = {s.shard_id: history[answered[s.server_id]][s.shard_id] for s in shards}
            scratch.load_state_dict(
                {n: t for n, t in assemble(shards, mixed).items()}, strict=False
            )
            r = batch_of[(w, step)]
            tokens = book.rows[r.lease_id][r.batch_index * BATCH : (r.batch_index + 1) * BATCH]
            tokens = tokens.long()
            scratch.zero_grad()
            scratch.train()
            _, loss = scratch(tokens[:, :-1], tokens[:, 1:])
            assert loss is not None
            loss.backward()
            grads[w] = {n: p.grad.detach().clone() for n, p in scratch.named_parameters()}  # type: ignore[union-attr]
        for n, p in params.items():
            acc = torch.zeros(p.shape, dtype=torch.float64)
            for w in sorted(grads):
                acc.add_(grads[w][n], alpha=float(BATCH))
            p.grad = acc.div_(BATCH * len(grads)).to(torch.float32)
        for group in opt.param_groups:
            group["lr"] = lr_at(SETTINGS, step)
        opt.step()
        history.append(snapshot())
    return {n: p.detach() for n, p in params.items()}


def test_zero_staleness_is_sync_bit_for_bit() -> None:
    sync, sync_params, *_ = train("sync", 0, slow="w1")
    ssp, ssp_params, *_ = train("bounded_staleness", 0, slow="w1")
    key = sorted((r.step, r.worker_id, r.lease_id, r.batch_index) for r in sync)
    assert sorted((r.step, r.worker_id, r.lease_id, r.batch_index) for r in ssp) == key
    for n, p in sync_params.items():
        assert torch.equal(ssp_params[n], p), n


@pytest.mark.parametrize("staleness", [1, 3])
def test_a_slowed_worker_never_makes_a_push_staler_than_the_bound(staleness: int) -> None:
    results, trained, book, clients, shards = train("bounded_staleness", staleness, slow="w1")
    assert len(results) == EPOCHS * 5 * 6  # every batch trained once
    seen = []
    for c in clients.values():
        for step, computed_at, answered in c.pushes:
            assert computed_at is not None and computed_at == min(answered.values())
            assert 0 <= step - computed_at <= staleness, (step, computed_at)
            seen.append(step - computed_at)
    # The fast worker ran ahead of the slowed one (it did not wait at every step).
    assert max(seen) > 0, "no push was stale: the mode behaved as SYNC"
    expected = replay(results, book, clients, shards)
    init = dict(init_model(CONFIG, SEED).named_parameters())
    for n, p in expected.items():
        torch.testing.assert_close(trained[n], p, rtol=0, atol=0, msg=f"{n} differs")
        assert not torch.equal(p, init[n].detach())
    print(f"\nSSP s={staleness}: staleness histogram {sorted(set(seen))} over {len(seen)} pushes")
