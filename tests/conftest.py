"""Shared fixtures: one real parameter-server process and a way to load jobs onto it.

Everything here talks to real processes over real gRPC; nothing is faked. Multi-process
fixtures are session-scoped because each process pays torch's import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.optim import OptimizerSettings
from lmps.core.partition import Shard
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import parameter_pb2, parameter_pb2_grpc, tensor_pb2

LoadJob = Callable[..., parameter_pb2.LoadResponse]


def health_status(channel: grpc.Channel, service: str = "") -> int:
    """The grpc.health.v1 status `channel`'s server reports for `service`."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="session")
def ps_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A coordinator plus ONE parameter server, each its own process (no workers).

    The server registers with the coordinator at startup, hence the coordinator. Tests load
    their own jobs straight onto the server with `load_job` (each Load replaces the last).
    """
    run_dir = tmp_path_factory.mktemp("ps-cluster")
    cluster = LocalCluster(ClusterSpec(servers=1, workers=0, run_dir=str(run_dir)))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ps_channel(ps_cluster: LocalCluster) -> Iterator[grpc.Channel]:
    """A channel to the parameter server of `ps_cluster`."""
    channel = open_channel(ps_cluster.procs[1].address)
    try:
        yield channel
    finally:
        channel.close()


@pytest.fixture
def ps_stub(ps_channel: grpc.Channel) -> parameter_pb2_grpc.ParameterServiceStub:
    return parameter_pb2_grpc.ParameterServiceStub(ps_channel)


def load_messages(
    job_id: str,
    shards: Sequence[Shard],
    values: Mapping[str, torch.Tensor],
    members: Sequence[str],
    settings: OptimizerSettings,
    version: int = 0,
) -> Iterator[parameter_pb2.LoadRequest]:
    """The Load stream the coordinator sends: a header, then one value per shard."""
    header = parameter_pb2.LoadHeader(
        job_id=job_id,
        optimizer=codec.optimizer_to_proto(settings),
        shards=[codec.shard_to_proto(s) for s in shards],
        members=list(members),
        version=version,
    )
    yield parameter_pb2.LoadRequest(header=header)
    for sid, value in values.items():
        shard = tensor_pb2.ShardTensor(shard_id=sid, version=version, tensor=codec.encode(value))
        yield parameter_pb2.LoadRequest(shard=shard)


@pytest.fixture
def load_job(ps_stub: parameter_pb2_grpc.ParameterServiceStub) -> LoadJob:
    """`load_job(job_id, shards, values, members, settings)` loads a job over real gRPC."""

    def load(*args: object, **kwargs: object) -> parameter_pb2.LoadResponse:
        return ps_stub.Load(load_messages(*args, **kwargs), timeout=30)  # type: ignore[arg-type]

    return load
