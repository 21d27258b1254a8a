"""The core correctness oracle: a real 2-server, 2-worker cluster trains exactly like one
process running torch on the union of the workers' batches, step by step."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from lmps.client import model_io
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.data import plan_data_shards, to_sequences
from lmps.core.model import GPT, init_model
from lmps.core.optim import lr_at
from lmps.rpc import codec
from lmps.v1 import job_pb2
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens
from tests.unit.test_inprocess_parity import reference_optimizer

pytestmark = pytest.mark.cluster

BATCH = 4
SEED = 11
EPOCHS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        servers=2, workers=2, worker_threads=1, run_dir=str(tmp_path_factory.mktemp("parity"))
    )
    with LocalCluster(spec) as c:
        yield c


def reference(
    optimizer: job_pb2.OptimizerConfig,
    train: torch.Tensor,
    steps: dict[int, list[job_pb2.StepEvent]],
    plans: dict[int, list[torch.Tensor]],
    epoch_of: dict[int, int],
    *,
    max_grad_norm: float = 0.0,
    norms: list[float] | None = None,
) -> GPT:
    """Single-process torch: each step's batch is the union of the workers' batches. With
    `max_grad_norm`, torch.nn.utils.clip_grad_norm_ before every step; `norms` gets what it
    returns (the norm before clipping), one per step."""
    settings = codec.optimizer_from_proto(optimizer)
    model = init_model(SMALL, SEED)
    opt = reference_optimizer(model, settings)
    sequences = to_sequences(train, SMALL.block_size)
    model.train()
    for step in sorted(steps):
        plan = plans[epoch_of[step]]
        rows = []
        for ev in sorted(steps[step], key=lambda e: e.worker_id):
            ids = plan[ev.data_shard][ev.batch_index * BATCH : (ev.batch_index + 1) * BATCH]
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


OPTIMIZERS = {
    "sgd-momentum": job_pb2.OptimizerConfig(
        kind=job_pb2.SGD, lr=0.05, momentum=0.9, weight_decay=0.01, schedule=job_pb2.CONSTANT
    ),
    "adamw-cosine": job_pb2.OptimizerConfig(
        kind=job_pb2.ADAMW,
        lr=1e-3,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        schedule=job_pb2.COSINE,
        warmup_steps=2,
        total_steps=20,
        min_lr=1e-4,
    ),
}


@dataclass(frozen=True)
class Run:
    """A job trained on the cluster: its StepEvents by step, each step's epoch, each epoch's
    data plan, and the trained model fetched from the coordinator."""

    steps: dict[int, list[job_pb2.StepEvent]]
    epoch_of: dict[int, int]
    plans: dict[int, list[torch.Tensor]]
    trained: model_io.TrainedModel


def run_job(
    cluster: LocalCluster,
    spec: job_pb2.JobSpec,
    train: torch.Tensor,
    evals: torch.Tensor,
    epochs: int = EPOCHS,
) -> Run:
    """Submit `spec` (batch BATCH, seed SEED), run `epochs` epochs, fetch the model."""
    driver = Driver(cluster.coordinator)
    try:
        job_id = driver.submit(spec, train, evals)
        steps: dict[int, list[job_pb2.StepEvent]] = defaultdict(list)
        epoch_of: dict[int, int] = {}
        plans = {}
        n_seq = to_sequences(train, SMALL.block_size).shape[0]
        for epoch in range(epochs):
            plans[epoch] = plan_data_shards(n_seq, BATCH, 1, SEED, epoch)
            events = driver.run_epoch(job_id, epoch)
            kinds = [ev.WhichOneof("kind") for ev in events]
            assert kinds[0] == "start" and kinds[-1] == "summary"
            for ev in events:
                if ev.WhichOneof("kind") == "step":
                    steps[ev.step.step].append(ev.step)
                    epoch_of[ev.step.step] = epoch
        trained = model_io.fetch_model(cluster.coordinator, job_id)
    finally:
        driver.close()
    assert trained.version == len(steps)
    return Run(steps, epoch_of, plans, trained)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cluster_matches_single_process_torch(cluster: LocalCluster, name: str) -> None:
    optimizer = OPTIMIZERS[name]
    # 10 batches of 4 sequences of 17 tokens; leases of one batch so both workers get work.
    train = random_tokens(10 * BATCH * SMALL.block_size + 1, SMALL.vocab_size, seed=1)
    evals = random_tokens(4 * SMALL.block_size + 1, SMALL.vocab_size, seed=2)
    spec = make_spec(SMALL, optimizer, batch_size=BATCH, seed=SEED, epochs=EPOCHS)
    run = run_job(cluster, spec, train, evals)
    steps, plans, epoch_of, trained = run.steps, run.plans, run.epoch_of, run.trained
    # Every batch of every epoch was trained exactly once.
    assert sum(len(v) for v in steps.values()) == EPOCHS * 10
    assert len(steps) >= 3 * EPOCHS
    assert any(len(v) == 2 for v in steps.values()), "no step combined both workers"
    expected = reference(optimizer, train, steps, plans, epoch_of)
    got = dict(trained.model.named_parameters())
    worst = 0.0
    for n, p in expected.named_parameters():
        torch.testing.assert_close(got[n], p, msg=lambda m, n=n: f"{name} {n}: {m}")  # type: ignore[misc]
        worst = max(worst, float((got[n] - p).detach().abs().max()))
    # Training moved the parameters: the comparison is not trivially init == init.
    init = dict(init_model(SMALL, SEED).named_parameters())
    moved = max(float((init[n] - p).detach().abs().max()) for n, p in expected.named_parameters())
    assert moved > 1e-3
    print(f"\nparity {name}: {len(steps)} steps, max abs diff {worst:.3e}")
