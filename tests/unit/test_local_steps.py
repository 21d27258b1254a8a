"""Local steps (DiLoCo) in one process: two worker `Trainer`s with an `InnerLoop` each and two
`ParameterStore`s, against single-process torch running the same algorithm.

The reference keeps one model per worker with its own torch AdamW (inner state carried from
round to round) and one global model with torch SGD (Nesterov) as the outer optimizer; each
round's Δ = global - local is averaged by sequences in fp64 in worker order, as the SYNC
barrier does. The rounds' composition is read back from the step events (which batches each
worker trained at each version), as tests/unit/test_inprocess_parity.py does for SYNC.
Seconds long.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import pytest
import torch

from lmps.core.data import plan_data_shards, to_sequences
from lmps.core.model import GPT, GPTConfig, decay_mask, init_model
from lmps.core.optim import OptimizerSettings, ShardOptimizer, lr_at
from lmps.core.partition import Shard, assemble
from lmps.services.parameter_server.store import ParameterStore
from lmps.services.worker.local_steps import InnerLoop
from lmps.services.worker.replica import Replica
from lmps.services.worker.trainer import Lease, StepResult, Trainer
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

LEASE = 6  # batches per lease
SHARDS = 5  # leases per epoch: w0 gets 3, w1 2 (w1 runs dry first and leaves the barrier)
EPOCHS = 2

INNER = OptimizerSettings(
    kind="adamw",
    lr=2e-3,
    weight_decay=0.1,
    schedule="cosine",
    warmup_steps=3,
    total_steps=200,
    min_lr=2e-4,
)
OUTER = OptimizerSettings(kind="sgd", lr=0.7, momentum=0.9, nesterov=True, total_steps=100)


class Book:
    """Each epoch's leases of LEASE batches dealt round-robin; a worker out of leases leaves
    the stores' barrier (what the coordinator's LeaseDesk does)."""

    def __init__(self, stores: Mapping[str, ParameterStore], sequences: torch.Tensor) -> None:
        self.stores, self.sequences = stores, sequences
        self.lock = threading.Lock()
        self.piles: dict[str, list[Lease]] = {}
        self.members: set[str] = set()
        self.rows: dict[str, torch.Tensor] = {}  # lease id -> its sequences (rows)

    def start_epoch(self, epoch: int) -> None:
        plan = plan_data_shards(self.sequences.shape[0], BATCH, LEASE, SEED, epoch)
        assert len(plan) == SHARDS
        leases = []
        for j, ids in enumerate(plan):
            lease = Lease(f"e{epoch}-d{j}", j, 0, len(ids) // BATCH, self.sequences[ids])
            self.rows[lease.lease_id] = lease.tokens
            leases.append(lease)
        self.piles = {w: leases[k :: len(WORKERS)] for k, w in enumerate(WORKERS)}
        self.set_members(set(WORKERS))

    def set_members(self, members: set[str]) -> None:
        self.members = members
        for store in self.stores.values():
            store.set_members(JOB, sorted(members))

    def source(self, worker_id: str) -> _Source:
        return _Source(self, worker_id)


class _Source:
    def __init__(self, book: Book, worker_id: str) -> None:
        self.book, self.worker_id = book, worker_id

    def next_lease(self, epoch: int, next_step: int) -> Lease | None:
        with self.book.lock:
            pile = self.book.piles[self.worker_id]
            if pile:
                return pile.pop(0)
            self.book.set_members(self.book.members - {self.worker_id})
            return None

    def complete(self, lease: Lease) -> None:
        pass


def train_epochs(
    shards: Sequence[Shard],
    stores: Mapping[str, ParameterStore],
    book: Book,
    loops: Callable[[Replica], dict[str, Any]],
) -> tuple[list[StepResult], dict[str, torch.Tensor], list[Trainer]]:
    """EPOCHS epochs of one `Trainer` per worker of WORKERS over `stores`, with the leases of
    `book`; `loops(replica)`: the trainer's local-steps keywords (`local`, `streaming`).
    Returns every step's result, the stores' final values by shard id, and the trainers."""
    trainers = []
    for w in WORKERS:
        replica = Replica(CONFIG, shards, torch.device("cpu"))
        trainers.append(
            Trainer(
                worker_id=w,
                model=replica,
                params=StoreClient(w, stores, shards),
                leases=book.source(w),
                batch_size=BATCH,
                **loops(replica),
            )
        )
    results: list[StepResult] = []
    for epoch in range(EPOCHS):
        book.start_epoch(epoch)
        start = stores[SERVERS[0]].pull(JOB, 0, [], timeout_s=0)[0]
        results += run_epoch_in_threads(trainers, epoch, start)
    trained: dict[str, torch.Tensor] = {}
    for store in stores.values():
        trained.update(store.pull(JOB, 0, [], timeout_s=0)[1])
    return results, trained, trainers


def train(
    h: int, inner: OptimizerSettings, outer: OptimizerSettings, sequences: torch.Tensor
) -> tuple[list[StepResult], dict[str, torch.Tensor], Book, list[Trainer]]:
    shards, values = initial_shards(init_model(CONFIG, SEED))
    stores = loaded_stores(outer, shards, values, WORKERS)
    book = Book(stores, sequences)
    decay = {s.shard_id: s.weight_decay for s in shards}
    # h = 0: plain SYNC (each batch pushes its gradient; `outer` is then the only optimizer).
    results, trained, trainers = train_epochs(
        shards,
        stores,
        book,
        lambda replica: {"local": InnerLoop(replica, h, inner, decay) if h else None},
    )
    return results, assemble(shards, trained), book, trainers


def _groups(model: GPT, weight_decay: float) -> list[dict[str, object]]:
    params = list(model.named_parameters())
    return [
        {"params": [p for n, p in params if decay_mask(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if not decay_mask(n, p)], "weight_decay": 0.0},
    ]


def _torch_optimizer(model: GPT, s: OptimizerSettings) -> torch.optim.Optimizer:
    groups = _groups(model, s.weight_decay)
    if s.kind == "sgd":
        return torch.optim.SGD(
            groups, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, foreach=False
        )
    # The fused kernel, as `ShardOptimizer`'s AdamW. Every parameter of CONFIG has a multiple
    # of 16 elements (the kernel's work unit, at least its vector width), so no element falls
    # in its scalar tail: the whole tensors get exactly what the padded shards get.
    assert all(p.numel() % 16 == 0 for p in model.parameters())
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps, fused=True)


def inner_step(model: GPT, opt: torch.optim.Optimizer, tokens: torch.Tensor, lr: float) -> None:
    """One inner optimizer step of a reference worker on (B, T+1) `tokens` at `lr`."""
    tokens = tokens.long()
    opt.zero_grad()
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss is not None
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()


class Event(Protocol):
    """What the reference reads of a step (a `StepResult` or a `job_pb2.StepEvent`)."""

    @property
    def step(self) -> int: ...
    @property
    def worker_id(self) -> str: ...
    @property
    def batch_index(self) -> int: ...


def diloco_reference(
    config: GPTConfig,
    seed: int,
    h: int,
    inner: OptimizerSettings,
    outer: OptimizerSettings,
    events: Sequence[Event],
    tokens_of: Callable[[Any], torch.Tensor],
) -> GPT:
    """DiLoCo in one process, on the rounds a run made (`events`, one per batch, at the
    round's version; `tokens_of(event)`: its (B, T+1) tokens): one model and torch optimizer
    per worker (inner state kept across rounds), a global model with the outer optimizer,
    Δ averaged by sequences in fp64 in worker order."""
    global_model = init_model(config, seed)
    outer_opt = _torch_optimizer(global_model, outer)
    locals_: dict[str, GPT] = {}
    inner_opts: dict[str, torch.optim.Optimizer] = {}
    rounds: dict[int, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for r in events:
        rounds[r.step][r.worker_id].append(r)
    for version in sorted(rounds):
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        weights: dict[str, float] = {}
        for w in sorted(rounds[version]):
            if w not in locals_:
                locals_[w] = init_model(config, seed)
                inner_opts[w] = _torch_optimizer(locals_[w], inner)
            model, opt = locals_[w], inner_opts[w]
            model.load_state_dict(global_model.state_dict())
            model.train()
            batches = sorted(rounds[version][w], key=lambda r: r.batch_index)
            sequences = 0
            for k, r in enumerate(batches):
                tokens = tokens_of(r)
                sequences += tokens.shape[0]
                inner_step(model, opt, tokens, lr_at(inner, version * h + k))
            local = dict(model.named_parameters())
            deltas[w] = {
                n: (p.detach() - local[n].detach()) for n, p in global_model.named_parameters()
            }
            weights[w] = float(sequences)
        total = sum(weights.values())
        outer_opt.zero_grad()
        for n, p in global_model.named_parameters():
            acc = torch.zeros(p.shape, dtype=torch.float64)
            for w in sorted(deltas):
                acc.add_(deltas[w][n], alpha=weights[w])
            p.grad = acc.div_(total).to(torch.float32)
        for group in outer_opt.param_groups:
            group["lr"] = lr_at(outer, version)
        outer_opt.step()
    return global_model


def _sequences() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    n = SHARDS * LEASE * BATCH * CONFIG.block_size + 1
    tokens = torch.randint(0, CONFIG.vocab_size, (n,), generator=g, dtype=torch.int32)
    return to_sequences(tokens, CONFIG.block_size)


@pytest.mark.parametrize("h", [4, 6])
def test_local_steps_match_single_process_diloco(h: int) -> None:
    sequences = _sequences()
    results, trained, book, trainers = train(h, INNER, OUTER, sequences)

    # Every batch trained once; one version per round; a round is one lease's next <= H batches.
    assert len(results) == EPOCHS * SHARDS * LEASE
    assert len({(r.lease_id, r.batch_index) for r in results}) == len(results)
    per_round: dict[tuple[int, str], list[int]] = defaultdict(list)
    for r in results:
        per_round[(r.step, r.worker_id)].append(r.batch_index)
    rounds_per_lease = -(-LEASE // h)
    assert {len(b) for b in per_round.values()} == {h, LEASE - h * (rounds_per_lease - 1)}
    versions = sorted({r.step for r in results})
    assert versions == list(range(len(versions)))
    # w0 holds 3 leases an epoch, w1 2: the last rounds of each epoch are w0's alone.
    assert len(versions) == EPOCHS * 3 * rounds_per_lease
    # The inner state lives on, round after round: AdamW counted every inner step.
    for t in trainers:
        assert t.local is not None and t.local.optimizer is not None
        steps_done = sum(1 for r in results if r.worker_id == t.worker_id)
        state = next(iter(t.local.optimizer.state_dict().values()))
        assert int(state["step"]) == steps_done

    def tokens_of(r: StepResult) -> torch.Tensor:
        return book.rows[r.lease_id][r.batch_index * BATCH : (r.batch_index + 1) * BATCH]

    expected = diloco_reference(CONFIG, SEED, h, INNER, OUTER, results, tokens_of)
    init = dict(init_model(CONFIG, SEED).named_parameters())
    moved = worst = 0.0
    for n, p in expected.named_parameters():
        # Bit for bit: the same kernels on the same values in the same order.
        torch.testing.assert_close(trained[n], p.detach(), rtol=0, atol=0, msg=f"{n} differs")
        moved = max(moved, float((init[n] - p).detach().abs().max()))
        worst = max(worst, float((trained[n] - p).detach().abs().max()))
    assert moved > 1e-2, "training did not move the parameters"
    print(f"\nlocal steps H={h}: {len(versions)} rounds, max abs diff {worst:.3e}")


def test_one_local_sgd_step_with_outer_sgd_lr_1_is_sync() -> None:
    """H = 1, inner SGD(η), outer SGD(lr 1, no momentum): θ' = θ - (θ - (θ - η g)), which is
    SYNC's θ - η g but for the rounding of the two subtractions (each at most half an ulp
    of θ). So per step the two runs part by about an ulp of |θ| per element, and the
    parting grows only as gradients differ at points that close: far below SGD's effect."""
    sequences = _sequences()
    eta = 0.05
    inner = OptimizerSettings(kind="sgd", lr=eta, total_steps=100)
    outer = OptimizerSettings(kind="sgd", lr=1.0, total_steps=100)
    local_results, local, _, _ = train(1, inner, outer, sequences)
    sync_results, sync, _, _ = train(0, inner, inner, sequences)
    # The same rounds: H = 1 makes one version per batch, as SYNC does.
    assert sorted((r.step, r.worker_id, r.lease_id, r.batch_index) for r in local_results) == (
        sorted((r.step, r.worker_id, r.lease_id, r.batch_index) for r in sync_results)
    )
    steps = len({r.step for r in sync_results})
    init = dict(init_model(CONFIG, SEED).named_parameters())
    worst = moved = 0.0
    for n, p in sync.items():
        ulp = float(torch.finfo(torch.float32).eps) * max(1.0, float(p.abs().max()))
        diff = float((local[n] - p).abs().max())
        assert diff <= 4 * steps * ulp, f"{n}: {diff:.3e} > {4 * steps * ulp:.3e}"
        worst = max(worst, diff)
        moved = max(moved, float((init[n] - p).detach().abs().max()))
    assert moved > 100 * worst, "the runs differ by as much as training moved them"
    print(f"\nH=1 vs SYNC: {steps} steps, max abs diff {worst:.3e}, moved {moved:.3e}")


def test_a_round_cancelled_between_inner_steps_has_nothing_to_push() -> None:
    shards, values = initial_shards(init_model(CONFIG, SEED))
    replica = Replica(CONFIG, shards, torch.device("cpu"))
    loop = InnerLoop(replica, 3, INNER, {s.shard_id: s.weight_decay for s in shards})
    batches = list(_sequences()[: 3 * BATCH].split(BATCH))
    calls = iter([True, False])
    assert loop.run_round(0, values, batches, active=lambda: next(calls)) is None
    done = loop.run_round(0, values, batches)
    assert done is not None and len(done.losses) == 3
    assert set(done.delta) == set(values)
    with pytest.raises(ValueError, match=r"1\.\.3 batches"):
        loop.run_round(1, values, batches * 2)


def test_assign_keeps_the_state_and_refuses_a_mismatch_changing_nothing() -> None:
    shards = {"a": torch.zeros(4), "b": torch.ones(2)}
    opt = ShardOptimizer(shards, decay={"a": True, "b": False}, settings=INNER)
    opt.step({"a": torch.ones(4), "b": torch.ones(2)}, 0)
    before = {k: v.clone() for k, v in opt.values.items()}
    state = opt.state_dict()
    for bad, match in (
        ({"a": torch.zeros(4)}, "missing"),
        ({"a": torch.zeros(3), "b": torch.zeros(2)}, "expected 4 float"),
        ({"a": torch.zeros(4, dtype=torch.int64), "b": torch.zeros(2)}, "expected 4 float"),
    ):
        with pytest.raises(ValueError, match=match):
            opt.assign(bad)
        for k, v in opt.values.items():
            assert torch.equal(v, before[k])
    opt.assign({"a": torch.full((4,), 2.0, dtype=torch.bfloat16), "b": torch.zeros(2)})
    assert torch.equal(opt.values["a"], torch.full((4,), 2.0))
    for sid, st in opt.state_dict().items():  # moments and step count untouched
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state[sid][k]))
