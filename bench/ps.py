"""A bench rig: 2 real parameter-server processes loaded straight through their stub.

`LocalCluster(ClusterSpec(servers=2, workers=0))` starts a coordinator (the servers register
with it) and the servers; no worker and no job go through the coordinator. The rig plans the
shards itself with `plan_shards`, streams `Load` to each server, and then times rounds of
`ServerPool.pull` + `ServerPool.push` as one worker (the only member of the SYNC barrier), so
every push runs a real SGD step on the servers and the next pull waits for it.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from bench.common import Context
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.model import GPTConfig, decay_mask, init_model, preset
from lmps.core.partition import ParamInfo, Shard, plan_shards, server_loads, shard_view
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.services.worker.pool import ServerPool
from lmps.v1 import job_pb2, parameter_pb2, parameter_pb2_grpc, tensor_pb2

WORKER_ID = "bench-worker"
SGD = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=1e-4, schedule=job_pb2.CONSTANT)

MODELS: dict[str, GPTConfig] = {
    "mini": preset("mini", 4096),
    "small": preset("small", 8192),
}
"""Model-sized parameter sets: the presets' shapes at the vocab sizes they are made for."""


@dataclass(frozen=True)
class ModelParams:
    """A model's parameters and one fixed, small, finite gradient for each."""

    name: str
    infos: list[ParamInfo]
    values: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * 4 for v in self.values.values())

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.values.values())


@functools.cache
def model_params(name: str) -> ModelParams:
    """The preset's parameters (seed 0) and gradients; cached, treat as read-only."""
    model = init_model(MODELS[name], seed=0)
    named = {n: p.detach().clone() for n, p in model.named_parameters()}
    infos = [ParamInfo(n, tuple(p.shape), decay_mask(n, p)) for n, p in named.items()]
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in named.items()}
    return ModelParams(name, infos, named, grads)


@dataclass(frozen=True)
class Round:
    pull_s: float
    push_s: float

    @property
    def total_s(self) -> float:
        return self.pull_s + self.push_s


@dataclass
class Loaded:
    """A job loaded on the servers: its shard plan and the version the servers are at."""

    job_id: str
    shards: list[Shard]
    grads: dict[str, torch.Tensor]
    version: int = 0

    def imbalance(self) -> float:
        """Bytes on the most loaded server / mean bytes per server (1.0 = perfect)."""
        loads = list(server_loads(self.shards).values())
        return max(loads) / (sum(loads) / len(loads))


class PSRig:
    """Use as a context manager: starts the processes on enter, stops them on exit."""

    def __init__(self, log_dir: Path, servers: int = 2) -> None:
        self.cluster = LocalCluster(
            ClusterSpec(servers=servers, workers=0, run_dir=str(log_dir), worker_threads=1)
        )
        self.addresses: dict[str, str] = {}
        self._ids = itertools.count()

    def __enter__(self) -> PSRig:
        self.cluster.start()
        self.addresses = {p.name: p.address for p in self.cluster.procs if p.name != "coordinator"}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cluster.stop()

    def load(self, params: ModelParams, shard_bytes: int) -> Loaded:
        """Plan `params` into shards of at most `shard_bytes` and load them (version 0)."""
        job_id = f"bench-{params.name}-{shard_bytes}-{next(self._ids)}"
        shards = plan_shards(params.infos, sorted(self.addresses), shard_bytes)
        for server_id, address in self.addresses.items():
            mine = [s for s in shards if s.server_id == server_id]
            with open_channel(address) as channel:
                stub = parameter_pb2_grpc.ParameterServiceStub(channel)
                stub.Load(
                    _load_messages(job_id, mine, params.values), timeout=300, wait_for_ready=True
                )
        grads = {s.shard_id: shard_view(params.grads[s.param], s) for s in shards}
        return Loaded(job_id, shards, grads)

    def pool(self, job: Loaded, wire_dtype: torch.dtype = torch.float32) -> ServerPool:
        return ServerPool(job.job_id, WORKER_ID, job.shards, self.addresses, wire_dtype=wire_dtype)

    def rounds(self, pool: ServerPool, job: Loaded, n: int) -> list[Round]:
        """`n` timed pull-all + push-all rounds; each push is one SGD step on the servers."""
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            version, values = pool.pull(job.version)
            t1 = time.perf_counter()
            if version != job.version or len(values) != len(job.shards):
                raise RuntimeError(f"pulled version {version} / {len(values)} shards")
            pool.push(job.version, 1.0, job.grads)
            t2 = time.perf_counter()
            job.version += 1
            out.append(Round(t1 - t0, t2 - t1))
        return out


def _load_messages(
    job_id: str, shards: list[Shard], values: Mapping[str, torch.Tensor]
) -> Iterator[parameter_pb2.LoadRequest]:
    yield parameter_pb2.LoadRequest(
        header=parameter_pb2.LoadHeader(
            job_id=job_id,
            optimizer=SGD,
            shards=[codec.shard_to_proto(s) for s in shards],
            members=[WORKER_ID],
            version=0,
            consistency=job_pb2.SYNC,
        )
    )
    for s in shards:
        yield parameter_pb2.LoadRequest(
            shard=tensor_pb2.ShardTensor(
                shard_id=s.shard_id,
                version=0,
                tensor=codec.encode(shard_view(values[s.param], s)),
            )
        )


def shared_rig(ctx: Context) -> PSRig:
    """One rig for all benchmarks of a run (starting one costs seconds); it is stopped when
    the run's `ctx.stack` closes."""
    rig = ctx.shared.get("ps-rig")
    if rig is None:
        rig = ctx.stack.enter_context(PSRig(ctx.log_dir("parameter_servers")))
        ctx.shared["ps-rig"] = rig
    if not isinstance(rig, PSRig):
        raise TypeError(f"ctx.shared['ps-rig'] is a {type(rig).__name__}")
    return rig
