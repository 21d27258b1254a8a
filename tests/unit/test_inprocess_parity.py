"""Picotron-style parity in one process: two worker `Trainer`s (two `Replica`s, one thread
each) and two `ParameterStore`s train exactly like one torch model stepping on the union of
the workers' batches.

The same oracle as tests/cluster/test_parity.py, without gRPC or subprocesses: the loop
(services/worker/trainer.py), the SYNC barrier and the server-side optimizer are the real
ones; the transport is a direct call into the stores and the coordinator's leases are a
fixed round-robin deal (so every run composes the same steps) that releases a worker from
the barrier when it runs dry, as the coordinator does. Seconds long. With `max_grad_norm`
the stores clip every step and the clients exchange its norm as `ServerPool` does (the same
`StepCommitter`); tests/unit/test_clip.py runs that against torch's clip_grad_norm_.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import pytest
import torch

from lmps.core.clip import StepCommitter
from lmps.core.data import plan_data_shards, to_sequences
from lmps.core.model import GPT, GPTConfig, decay_mask, init_model
from lmps.core.optim import OptimizerSettings, lr_at
from lmps.core.partition import ParamInfo, Shard, assemble, plan_shards, shard_view
from lmps.services.parameter_server.store import ParameterStore
from lmps.services.worker.replica import Replica
from lmps.services.worker.trainer import CollectingPush, Lease, StepResult, Trainer

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
JOB = "job-parity"
SERVERS = ("ps-0", "ps-1")
WORKERS = ("w0", "w1")
BATCH = 4
BATCHES = 11  # per epoch, one per lease: both workers get work, and one runs dry first
EPOCHS = 2
SEED = 11
WAIT_S = 30.0

OPTIMIZERS = {
    "sgd": OptimizerSettings(kind="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": OptimizerSettings(
        kind="adamw",
        lr=1e-3,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        schedule="cosine",
        warmup_steps=2,
        total_steps=20,
        min_lr=1e-4,
    ),
}


class StoreNorms:
    """`lmps.core.clip.NormServer` straight into one store (GradNorm, ApplyStep)."""

    def __init__(self, store: ParameterStore, cancelled: threading.Event | None = None) -> None:
        self.store = store
        self.cancelled = cancelled  # set: a waiting GradNorm ends (the epoch was cancelled)

    def grad_norm(self, step: int) -> tuple[int, dict[str, float]]:
        cancelled = self.cancelled
        return self.store.grad_norm(
            JOB, step, WAIT_S, None if cancelled is None else lambda: not cancelled.is_set()
        )

    def apply_step(self, step: int, grad_norm: float) -> float:
        return self.store.apply_step(JOB, step, grad_norm)[1]


class StorePush(CollectingPush):
    """`CollectingPush` that, when the stores clip, commits the step's norm after the push
    (what `PushStream.close` does)."""

    def __init__(
        self, client: StoreClient, step: int, weight: float, computed_at: int | None = None
    ) -> None:
        super().__init__(client, step, weight, computed_at)
        self.committer = client.committer

    def close(self) -> int | None:
        made = super().close()
        if self.committer is not None:
            self.grad_norm = self.committer.after_push(self.step)
        return made


class StoreClient:
    """`ParameterClient` straight into the stores: each shard pulled from and pushed to the
    store that owns it (what `ServerPool` does over gRPC). `clip`: the stores clip, and the
    client exchanges each step's norm after its push and before a pull (`StepCommitter`)."""

    def __init__(
        self,
        worker_id: str,
        stores: Mapping[str, ParameterStore],
        shards: Sequence[Shard],
        mixed: bool = False,
        clip: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self.stores = stores
        self.owned = {sid: [s.shard_id for s in shards if s.server_id == sid] for sid in stores}
        self.cancelled = threading.Event()
        self.mixed = mixed  # bounded staleness: stores may answer at different versions
        self.pulls: list[dict[str, int]] = []  # every pull: store -> version it answered
        self.committer = (
            StepCommitter(
                {sid: StoreNorms(store, self.cancelled) for sid, store in stores.items()}, shards
            )
            if clip
            else None
        )

    def pull(
        self,
        min_version: int,
        timeout_s: float | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        if self.committer is not None:
            self.committer.before_pull(min_version)
        answered: dict[str, int] = {}
        values: dict[str, torch.Tensor] = {}
        for sid, store in self.stores.items():
            wanted = [] if shard_ids is None else [s for s in self.owned[sid] if s in shard_ids]
            if shard_ids is not None and not wanted:
                continue
            v, part = store.pull(
                JOB,
                min_version,
                wanted,
                timeout_s or WAIT_S,
                active=lambda: not self.cancelled.is_set(),
            )
            answered[sid] = v
            values.update(part)
        self.pulls.append(answered)
        versions = set(answered.values())
        assert self.mixed or len(versions) == 1, f"stores at different versions {versions}"
        return min(versions), values

    def push(
        self,
        step: int,
        weight: float,
        grads: Mapping[str, torch.Tensor],
        computed_at: int | None = None,
    ) -> None:
        for sid, store in self.stores.items():
            # Copies, as gRPC would make: the store keeps a pending gradient as given, and
            # these are views of the replica's .grad, which a worker running ahead
            # (bounded staleness) overwrites in its next step.
            part = [(s, grads[s].clone()) for s in self.owned[sid] if s in grads]
            store.push(JOB, self.worker_id, step, weight, part, computed_at)

    def open_push(self, step: int, weight: float, computed_at: int | None = None) -> CollectingPush:
        return StorePush(self, step, weight, computed_at)

    def cancel(self) -> None:
        self.cancelled.set()


class LeaseBook:
    """The coordinator's leases, in miniature: each epoch's data shards dealt round-robin
    to the workers up front; a worker whose pile is empty leaves the stores' barrier."""

    def __init__(self, stores: Mapping[str, ParameterStore], sequences: torch.Tensor) -> None:
        self.stores = stores
        self.sequences = sequences
        self.lock = threading.Lock()
        self.piles: dict[str, list[Lease]] = {}
        self.members: set[str] = set()
        self.completed: list[str] = []
        self.plans: dict[int, list[torch.Tensor]] = {}
        self.epoch_of: dict[str, int] = {}  # lease id -> epoch

    def start_epoch(self, epoch: int) -> None:
        plan = plan_data_shards(self.sequences.shape[0], BATCH, 1, SEED, epoch)
        assert len(plan) == BATCHES
        self.plans[epoch] = plan
        leases = [
            Lease(f"e{epoch}-d{i}", i, 0, 1, self.sequences[ids]) for i, ids in enumerate(plan)
        ]
        self.piles = {w: leases[k :: len(WORKERS)] for k, w in enumerate(WORKERS)}
        self.epoch_of.update((lease.lease_id, epoch) for lease in leases)
        self.set_members(set(WORKERS))

    def set_members(self, members: set[str]) -> None:
        self.members = members
        for store in self.stores.values():
            store.set_members(JOB, sorted(members))

    def for_worker(self, worker_id: str) -> WorkerLeases:
        return WorkerLeases(self, worker_id)


class WorkerLeases:
    """One worker's `LeaseSource` over the book."""

    def __init__(self, book: LeaseBook, worker_id: str) -> None:
        self.shared = book
        self.worker_id = worker_id

    def next_lease(self, epoch: int, next_step: int) -> Lease | None:
        with self.shared.lock:
            pile = self.shared.piles[self.worker_id]
            if pile:
                return pile.pop(0)
            # Done: release this worker from the barrier; a step it already pushed for stays.
            self.shared.set_members(self.shared.members - {self.worker_id})
            return None

    def complete(self, lease: Lease) -> None:
        with self.shared.lock:
            self.shared.completed.append(lease.lease_id)


def initial_shards(model: GPT) -> tuple[list[Shard], dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    infos = [ParamInfo(n, tuple(p.shape), decay_mask(n, p)) for n, p in params.items()]
    shards = plan_shards(infos, SERVERS, shard_bytes=2048)  # small: big tensors split
    values = {s.shard_id: shard_view(params[s.param].detach(), s).clone() for s in shards}
    return shards, values


def loaded_stores(
    settings: OptimizerSettings,
    shards: Sequence[Shard],
    values: Mapping[str, torch.Tensor],
    workers: Sequence[str],
    **load: Any,
) -> dict[str, ParameterStore]:
    """A store per server of SERVERS, each loaded for JOB with the shards it owns, their
    `values`, the `workers` and `load`'s further keywords (consistency, max_grad_norm ...)."""
    stores = {sid: ParameterStore(sid) for sid in SERVERS}
    for sid, store in stores.items():
        mine = [s for s in shards if s.server_id == sid]
        store.load(
            JOB, settings, mine, [(s.shard_id, values[s.shard_id]) for s in mine], workers, **load
        )
    return stores


def run_epoch_in_threads(
    trainers: Sequence[Trainer], epoch: int, start_step: int
) -> list[StepResult]:
    """Every trainer's `epoch` from `start_step`, each in a thread of its own: their steps'
    results. The first error cancels every trainer and fails the test (reported by this, the
    main thread), and so does a trainer still running after 2 x WAIT_S."""
    results: list[StepResult] = []
    errors: list[BaseException] = []

    def run(trainer: Trainer) -> None:
        try:
            results.extend(trainer.run_epoch(epoch, start_step))
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            for t in trainers:
                t.cancel()

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * WAIT_S)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a trainer hung"
    return results


def train_in_process(
    settings: OptimizerSettings, sequences: torch.Tensor, *, max_grad_norm: float = 0.0
) -> tuple[list[StepResult], int, dict[str, torch.Tensor], LeaseBook]:
    shards, values = initial_shards(init_model(CONFIG, SEED))
    assert {s.server_id for s in shards} == set(SERVERS)
    stores = loaded_stores(settings, shards, values, WORKERS, max_grad_norm=max_grad_norm)
    leases = LeaseBook(stores, sequences)
    trainers = [
        Trainer(
            worker_id=w,
            model=Replica(CONFIG, shards, torch.device("cpu")),
            params=StoreClient(w, stores, shards, clip=max_grad_norm > 0),
            leases=leases.for_worker(w),
            batch_size=BATCH,
        )
        for w in WORKERS
    ]
    results: list[StepResult] = []
    for epoch in range(EPOCHS):
        leases.start_epoch(epoch)
        start_step = stores[SERVERS[0]].pull(JOB, 0, [], timeout_s=0)[0]  # the job's step
        results += run_epoch_in_threads(trainers, epoch, start_step)
    trained: dict[str, torch.Tensor] = {}
    versions = set()
    for store in stores.values():
        version, values_now = store.pull(JOB, 0, [], timeout_s=0)
        versions.add(version)
        trained.update(values_now)
    assert len(versions) == 1, versions
    return results, versions.pop(), assemble(shards, trained), leases


def reference_optimizer(model: GPT, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """torch's own optimizer for `settings` (SGD or AdamW, no foreach) on `model`, with the
    servers' two groups: weight decay where `decay_mask` says so, none elsewhere."""
    params = list(model.named_parameters())
    groups = [
        {
            "params": [p for n, p in params if decay_mask(n, p)],
            "weight_decay": settings.weight_decay,
        },
        {"params": [p for n, p in params if not decay_mask(n, p)], "weight_decay": 0.0},
    ]
    if settings.kind == "sgd":
        return torch.optim.SGD(
            groups,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            foreach=False,
        )
    return torch.optim.AdamW(
        groups,
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        foreach=False,
    )


def reference(
    settings: OptimizerSettings,
    sequences: torch.Tensor,
    results: Sequence[StepResult],
    plans: Mapping[int, list[torch.Tensor]],
    epoch_of: Mapping[str, int],
    *,
    max_grad_norm: float = 0.0,
    norms: list[float] | None = None,
) -> GPT:
    """Single-process torch: each step's batch is the union of the workers' batches. With
    `max_grad_norm`, torch.nn.utils.clip_grad_norm_ before every step; `norms` gets what it
    returns (the norm before clipping), one per step."""
    model = init_model(CONFIG, SEED)
    opt = reference_optimizer(model, settings)
    steps: dict[int, list[StepResult]] = defaultdict(list)
    for r in results:
        steps[r.step].append(r)
    model.train()
    for step in sorted(steps):
        rows = []
        for r in sorted(steps[step], key=lambda r: r.worker_id):
            ids = plans[epoch_of[r.lease_id]][r.data_shard][
                r.batch_index * BATCH : (r.batch_index + 1) * BATCH
            ]
            rows.append(sequences[ids])
        batch = torch.cat(rows).long()
        opt.zero_grad()
        _, loss = model(batch[:, :-1], batch[:, 1:])
        assert loss is not None
        loss.backward()
        if max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if norms is not None:
                norms.append(float(norm))
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, step)
        opt.step()
    return model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_two_trainers_and_two_stores_match_single_process_torch(name: str) -> None:
    settings = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(
        0,
        CONFIG.vocab_size,
        (BATCHES * BATCH * CONFIG.block_size + 1,),
        generator=g,
        dtype=torch.int32,
    )
    sequences = to_sequences(tokens, CONFIG.block_size)
    start = time.perf_counter()
    results, version, trained, leases = train_in_process(settings, sequences)
    secs = time.perf_counter() - start

    # Every batch of every epoch was trained exactly once, and every lease completed.
    assert len(results) == EPOCHS * BATCHES
    assert sorted(leases.completed) == sorted({r.lease_id for r in results})
    assert len({r.lease_id for r in results}) == EPOCHS * BATCHES
    steps = {r.step for r in results}
    assert steps == set(range(len(steps)))  # versions 0..n-1, none skipped
    assert version == len(steps)
    per_step = defaultdict(list)
    for r in results:
        per_step[r.step].append(r.worker_id)
    assert all(len(ws) == len(set(ws)) for ws in per_step.values())  # one push per worker
    assert any(len(ws) == 2 for ws in per_step.values()), "no step combined both workers"
    assert any(len(ws) == 1 for ws in per_step.values()), "no worker was released early"

    expected = reference(settings, sequences, results, leases.plans, leases.epoch_of)
    worst = 0.0
    for n, p in expected.named_parameters():
        torch.testing.assert_close(trained[n], p, msg=lambda m, n=n: f"{name} {n}: {m}")  # type: ignore[misc]
        worst = max(worst, float((trained[n] - p).detach().abs().max()))
    # Training moved the parameters: the comparison is not trivially init == init.
    init = dict(init_model(CONFIG, SEED).named_parameters())
    moved = max(float((init[n] - p).detach().abs().max()) for n, p in expected.named_parameters())
    assert moved > 1e-3
    print(
        f"\nin-process parity {name}: {len(steps)} steps, max abs diff {worst:.3e} in {secs:.2f}s"
    )
