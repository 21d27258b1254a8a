"""Helpers for cluster tests: submit a small job straight through the coordinator's stub."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmps.client.train import submit_messages
from lmps.core.model import GPTConfig
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)


def random_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32)


def make_spec(
    config: GPTConfig,
    optimizer: job_pb2.OptimizerConfig,
    *,
    batch_size: int,
    batches_per_lease: int = 1,
    seed: int = 7,
    epochs: int = 1,
    workers: int = 2,
    servers: int = 2,
    shard_bytes: int = 2048,
) -> job_pb2.JobSpec:
    return job_pb2.JobSpec(
        name="test",
        model=codec.model_to_proto(config),
        optimizer=optimizer,
        batch_size=batch_size,
        batches_per_lease=batches_per_lease,
        seed=seed,
        epochs=epochs,
        num_servers=servers,
        num_workers=workers,
        consistency=job_pb2.SYNC,
        shard_bytes=shard_bytes,  # small: forces big tensors to be split across servers
        wait_for_members_s=30,
    )


class Driver:
    """A thin test client of the coordinator."""

    def __init__(self, coordinator: str) -> None:
        self.channel = open_channel(coordinator)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    def submit(self, spec: job_pb2.JobSpec, train: torch.Tensor, evals: torch.Tensor) -> str:
        resp = self.stub.SubmitJob(submit_messages(spec, train, evals), timeout=120)
        return str(resp.job_id)

    def run_epoch(self, job_id: str, epoch: int) -> list[job_pb2.ProgressEvent]:
        stream: Iterator[job_pb2.ProgressEvent] = self.stub.RunEpoch(
            coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=epoch), timeout=300
        )
        return list(stream)

    def close(self) -> None:
        self.channel.close()
