"""Checkpoints: a job stopped with its whole cluster and resumed (onto a different number of
parameter servers) ends exactly where an uninterrupted run ends; fine-tuning starts from the
given weights."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from lmps.client import model_io
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.client.train import submit_messages
from lmps.core.model import init_model
from lmps.services.coordinator import checkpoint
from lmps.v1 import coordinator_pb2, job_pb2
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens

pytestmark = pytest.mark.cluster

ADAMW = job_pb2.OptimizerConfig(
    kind=job_pb2.ADAMW,
    lr=3e-3,
    weight_decay=0.1,
    schedule=job_pb2.COSINE,
    warmup_steps=2,
    total_steps=40,
    min_lr=3e-4,
)
TRAIN = random_tokens(24 * 4 * SMALL.block_size + 1, SMALL.vocab_size, 8)
EVALS = random_tokens(4 * SMALL.block_size + 1, SMALL.vocab_size, 9)


def spec() -> job_pb2.JobSpec:
    s = make_spec(SMALL, ADAMW, batch_size=4, batches_per_lease=2, servers=0, workers=2, epochs=2)
    s.checkpoint_every = 5
    return s


def cluster(tmp: Path, name: str, servers: int, state: Path) -> LocalCluster:
    return LocalCluster(
        ClusterSpec(
            servers=servers,
            workers=2,
            worker_threads=1,
            run_dir=str(tmp / name),
            state_dir=str(state),
        )
    ).start()


def params_of(coordinator: str, job_id: str) -> dict[str, torch.Tensor]:
    trained = model_io.fetch_model(coordinator, job_id)
    return {n: p.detach().clone() for n, p in trained.model.named_parameters()}


def test_resume_on_a_new_cluster_with_more_servers_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    # A: two epochs without interruption.
    a = cluster(tmp_path, "a", 2, tmp_path / "state-a")
    try:
        d = Driver(a.coordinator)
        job_a = d.submit(spec(), TRAIN, EVALS)
        for epoch in range(2):
            d.run_epoch(job_a, epoch)
        expected = params_of(a.coordinator, job_a)
        d.close()
    finally:
        a.stop()
    # B: one epoch, then the whole cluster goes away (SIGTERM to every process).
    b = cluster(tmp_path, "b", 2, tmp_path / "state-b")
    try:
        d = Driver(b.coordinator)
        job_b = d.submit(spec(), TRAIN, EVALS)
        d.run_epoch(job_b, 0)
        d.close()
    finally:
        codes = b.stop()
    assert all(c == 0 for c in codes.values()), codes
    latest = checkpoint.latest(tmp_path / "state-b" / "jobs", job_b)
    assert latest is not None and (latest / "optimizer.safetensors").exists()
    # C: a new cluster with 3 servers on B's state: the job is found and re-sharded.
    c = cluster(tmp_path, "c", 3, tmp_path / "state-b")
    try:
        d = Driver(c.coordinator)
        summary = d.run_epoch(job_b, 1)[-1].summary
        assert summary.start_step == checkpoint.version_of(latest)
        shard_map = d.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(job_id=job_b), timeout=10)
        assert {s.server_id for s in shard_map.servers} == {"ps-0", "ps-1", "ps-2"}
        got = params_of(c.coordinator, job_b)
        d.close()
    finally:
        c.stop()
    worst = 0.0
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]
        worst = max(worst, float((got[name] - value).abs().max()))
    print(f"\nresume parity (2 -> 3 servers, AdamW state restored): max abs diff {worst:.3e}")


def test_init_from_starts_at_the_given_weights(tmp_path: Path) -> None:
    c = cluster(tmp_path, "ft", 2, tmp_path / "state")
    try:
        d = Driver(c.coordinator)
        base = init_model(SMALL, 1234)
        weights = {n: p.detach() for n, p in base.named_parameters()}
        job_id = str(
            d.stub.SubmitJob(submit_messages(spec(), TRAIN, EVALS, weights), timeout=60).job_id
        )
        got = params_of(c.coordinator, job_id)
        for name, value in weights.items():
            assert torch.equal(got[name], value), name
        # Weights that don't fit the model are refused.
        bad = dict(weights)
        bad["transformer.wte.weight"] = torch.zeros(3, 3)
        with pytest.raises(grpc.RpcError) as err:
            d.stub.SubmitJob(submit_messages(spec(), TRAIN, EVALS, bad), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        d.close()
    finally:
        c.stop()
