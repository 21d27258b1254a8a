"""Parameter-server memory: peak RSS growth over the warm baseline vs the state it holds.

Two real parameter-server processes (`LocalCluster(servers=2, workers=0)`, each registered
with a real coordinator) are loaded straight through their stub with a model's shards
(`plan_shards` over the 2 servers), AdamW and `checkpoint_every`, and driven over real gRPC
by 2 `ServerPool`s (two workers, both members of the SYNC barrier) pushing full gradients
concurrently and pulling every step. RSS comes from /proc/PID/status: the warm baseline is
VmRSS once the server is up and has run a tiny job through the same paths, then VmHWM is reset
(`/proc/PID/clear_refs` 5) so the peak is the peak of the training steps alone.

Per server: state held = fp32 masters + optimizer state (ListShards), incoming gradients per
step = workers x the server's fp32 shard bytes. The target (issue 8) is
peak - baseline <= 2 x state + one step's incoming gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from bench.common import Context, write_result
from bench.ps import model_params
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.optim import OptimizerSettings
from lmps.core.partition import DEFAULT_SHARD_BYTES, ParamInfo, Shard, plan_shards, shard_view
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.services.worker.pool import ServerPool
from lmps.v1 import job_pb2, parameter_pb2, parameter_pb2_grpc, tensor_pb2

NAME = "ps_memory"
MIB = 1 << 20
WORKERS = ("w0", "w1")
ADAMW = OptimizerSettings(kind="adamw", lr=1e-4, weight_decay=0.1)


@dataclass(frozen=True)
class ServerMemory:
    """One server's figures, in bytes."""

    server: str
    baseline: int  # VmRSS, warm, before the load
    after_load: int  # VmRSS right after the load
    peak: int  # VmHWM over load + steps (reset at the baseline)
    end: int  # VmRSS after the last step
    end_anon: int  # RssAnon after the last step
    state: int  # masters + optimizer state held after the steps
    incoming: int  # one step's incoming gradient bytes (all workers, fp32)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    @property
    def target(self) -> int:
        return 2 * self.state + self.incoming


def _status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of `pid` in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024  # kB
    return out


def _reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0; our own child process)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _load_messages(
    job_id: str,
    shards: list[Shard],
    values: Mapping[str, torch.Tensor],
    checkpoint_every: int,
) -> Iterator[parameter_pb2.LoadRequest]:
    yield parameter_pb2.LoadRequest(
        header=parameter_pb2.LoadHeader(
            job_id=job_id,
            optimizer=codec.optimizer_to_proto(ADAMW),
            shards=[codec.shard_to_proto(s) for s in shards],
            members=list(WORKERS),
            version=0,
            consistency=job_pb2.SYNC,
            checkpoint_every=checkpoint_every,
        )
    )
    for s in shards:
        yield parameter_pb2.LoadRequest(
            shard=tensor_pb2.ShardTensor(
                shard_id=s.shard_id, version=0, tensor=codec.encode(shard_view(values[s.param], s))
            )
        )


def _train(
    stubs: Mapping[str, parameter_pb2_grpc.ParameterServiceStub],
    addresses: Mapping[str, str],
    job_id: str,
    infos: list[ParamInfo],
    values: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    *,
    steps: int,
    checkpoint_every: int,
    shard_bytes: int,
    after_load: Callable[[], None] = lambda: None,
) -> None:
    """Load one job on every server, then `steps` of: both workers push, both pull."""
    shards = plan_shards(infos, sorted(addresses), shard_bytes)
    for name, stub in stubs.items():
        mine = [s for s in shards if s.server_id == name]
        stub.Load(_load_messages(job_id, mine, values, checkpoint_every), timeout=300)
    after_load()
    by_shard = {s.shard_id: shard_view(grads[s.param], s) for s in shards}
    pools = [ServerPool(job_id, w, shards, dict(addresses)) for w in WORKERS]
    try:
        for step in range(steps):
            threads = [
                threading.Thread(target=pool.push, args=(step, 1.0 + i, by_shard))
                for i, pool in enumerate(pools)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for pool in pools:
                version, _ = pool.pull(step + 1)
                if version != step + 1:
                    raise RuntimeError(f"pulled version {version}, expected {step + 1}")
    finally:
        for pool in pools:
            pool.close()


def measure(
    log_dir: Path,
    *,
    model: str = "small",
    steps: int = 20,
    checkpoint_every: int = 5,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_env: dict[str, str] | None = None,
) -> list[ServerMemory]:
    """Run the measurement once (fresh processes) and return each server's figures."""
    params = model_params(model)
    spec = ClusterSpec(
        servers=2, workers=0, run_dir=str(log_dir), worker_threads=1, extra_env=extra_env or {}
    )
    with LocalCluster(spec) as cluster:
        servers = {p.name: p for p in cluster.procs if p.name != "coordinator"}
        addresses = {name: p.address for name, p in servers.items()}
        channels = [open_channel(a) for a in addresses.values()]
        try:
            stubs = {
                name: parameter_pb2_grpc.ParameterServiceStub(ch)
                for name, ch in zip(addresses, channels, strict=True)
            }
            # Warm-up: a tiny job through the same code paths (load, pushes, pulls, a
            # snapshot), so that code and buffers touched on first use are in the baseline.
            # Shards of full size, so that torch's intra-op threads start here too.
            tiny = [ParamInfo("w", (512, 1024), True), ParamInfo("b", (1024,), False)]
            _train(
                stubs,
                addresses,
                "ps-memory-warm-up",
                tiny,
                {i.name: torch.zeros(i.shape) for i in tiny},
                {i.name: torch.full(i.shape, 1e-3) for i in tiny},
                steps=6,
                checkpoint_every=5,
                shard_bytes=shard_bytes,
            )
            baseline = {}
            for name, p in servers.items():
                baseline[name] = _status(p.pid)["VmRSS"]
                _reset_peak(p.pid)
            loaded: dict[str, int] = {}
            job_id = f"ps-memory-{model}"
            _train(
                stubs,
                addresses,
                job_id,
                params.infos,
                params.values,
                params.grads,
                steps=steps,
                checkpoint_every=checkpoint_every,
                shard_bytes=shard_bytes,
                after_load=lambda: loaded.update(
                    {name: _status(p.pid)["VmRSS"] for name, p in servers.items()}
                ),
            )
            out = []
            for name, p in servers.items():
                listing = stubs[name].ListShards(
                    parameter_pb2.ListShardsRequest(job_id=job_id), timeout=30
                )
                state = listing.total_bytes + sum(s.optimizer_state_bytes for s in listing.shards)
                st = _status(p.pid)
                out.append(
                    ServerMemory(
                        server=name,
                        baseline=baseline[name],
                        after_load=loaded[name],
                        peak=st["VmHWM"],
                        end=st["VmRSS"],
                        end_anon=st["RssAnon"],
                        state=state,
                        incoming=len(WORKERS) * listing.total_bytes,
                    )
                )
        finally:
            for ch in channels:
                ch.close()
    return out


def run(ctx: Context) -> dict[str, Any]:
    steps = 10 if ctx.quick else 20
    rows = measure(ctx.log_dir(NAME), steps=steps)
    table = Table(
        title=f"ps_memory: small preset, AdamW, 2 servers, 2 workers, {steps} steps, "
        "checkpoint_every 5 (MiB)"
    )
    for col in (
        "server",
        "baseline",
        "after load",
        "peak",
        "growth",
        "state",
        "incoming/step",
        "target",
        "growth/state",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.server,
            f"{r.baseline / MIB:.0f}",
            f"{r.after_load / MIB:.0f}",
            f"{r.peak / MIB:.0f}",
            f"{r.growth / MIB:.0f}",
            f"{r.state / MIB:.0f}",
            f"{r.incoming / MIB:.0f}",
            f"{r.target / MIB:.0f}",
            f"{r.growth / r.state:.2f}",
        )
    table.caption = (
        "growth = peak VmHWM - warm baseline VmRSS; state = fp32 masters + AdamW moments; "
        "target = 2 x state + one step's incoming fp32 gradients (issue 8)"
    )
    ctx.console.print(table)
    payload = {
        "params": {"model": "small", "steps": steps, "checkpoint_every": 5, "workers": 2},
        "unit": "bytes",
        "servers": [{**asdict(r), "growth": r.growth, "target": r.target} for r in rows],
    }
    path = write_result(ctx, NAME, payload)
    ctx.console.print(f"wrote {path}")
    return payload
