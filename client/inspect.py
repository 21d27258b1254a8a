"""`lmps status` and `lmps shards`: tables of members, jobs and parameter shards."""

from __future__ import annotations

import math

import grpc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmps.rpc.channel import DEFAULT_TIMEOUT_S, open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, parameter_pb2, parameter_pb2_grpc

_ROLE = {coordinator_pb2.PARAMETER_SERVER: "ps", coordinator_pb2.WORKER: "worker"}
_STATE = {
    coordinator_pb2.READY: "ready",
    coordinator_pb2.RUNNING: "running",
    coordinator_pb2.FAILED: "failed",
    coordinator_pb2.COMPLETED: "completed",
}


def show_status(coordinator: str, console: Console) -> None:
    with open_channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        status = stub.GetClusterStatus(
            coordinator_pb2.ClusterStatusRequest(), timeout=DEFAULT_TIMEOUT_S
        )
    table = Table(title=f"members of {coordinator}")
    for col in ("id", "role", "address", "last seen", "alive"):
        table.add_column(col)
    for m in status.members:
        table.add_row(
            m.id,
            _ROLE.get(m.role, "?"),
            m.address,
            f"{m.last_seen_s:.1f}s ago",
            "yes" if m.alive else "[red]no[/]",
        )
    console.print(table)
    if not status.jobs:
        console.print("no jobs yet: submit one with `lmps train`")
        return
    jobs = Table(title="jobs")
    # Ids whole, never cut to "job-1a2b…": they are what `--job` and `--resume` take.
    jobs.add_column("job", no_wrap=True, min_width=max(len(j.job_id) for j in status.jobs))
    for col in ("state", "epochs", "step", "parameters", "shards", "eval loss"):
        jobs.add_column(col)
    for j in status.jobs:
        loss = "-" if math.isnan(j.last_eval_loss) else f"{j.last_eval_loss:.4f}"
        jobs.add_row(
            j.job_id,
            Text(job_state(j)),  # plain text: an error may hold "[...]", not rich markup
            f"{j.epochs_done}/{j.spec.epochs}" if j.spec.epochs else str(j.epochs_done),
            str(j.step),
            f"{j.parameters:,}",
            str(j.shards),
            loss,
        )
    console.print(jobs)


def job_state(job: coordinator_pb2.JobStatus) -> str:
    """`ready`, `running`, `completed`, or `failed: <why>` (the error is the state's reason,
    so it sits in the same cell rather than in a column that is empty for every other job)."""
    state = _STATE.get(job.state, "?")
    return f"{state}: {job.error}" if job.state == coordinator_pb2.FAILED and job.error else state


def show_shards(coordinator: str, job_id: str, console: Console, stats: bool = True) -> None:
    with open_channel(coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        shard_map = stub.GetShardMap(
            coordinator_pb2.GetShardMapRequest(job_id=job_id), timeout=DEFAULT_TIMEOUT_S
        )
        job = stub.GetJob(
            coordinator_pb2.GetJobRequest(job_id=shard_map.job_id), timeout=DEFAULT_TIMEOUT_S
        )
    infos: dict[str, parameter_pb2.ShardInfo] = {}
    versions: dict[str, str] = {}
    for server in shard_map.servers:
        try:
            with open_channel(server.address) as ch:
                resp = parameter_pb2_grpc.ParameterServiceStub(ch).ListShards(
                    parameter_pb2.ListShardsRequest(job_id=shard_map.job_id, with_stats=stats),
                    timeout=DEFAULT_TIMEOUT_S,
                )
            versions[server.server_id] = str(resp.version)
            infos.update({i.spec.shard_id: i for i in resp.shards})
        except grpc.RpcError as err:
            versions[server.server_id] = f"unreachable ({err.code().name})"
    summary = Table(title=f"servers of {shard_map.job_id}")
    for col in ("server", "address", "shards", "MiB", "version"):
        summary.add_column(col)
    for s in shard_map.servers:
        summary.add_row(
            s.server_id, s.address, str(s.shards), f"{s.bytes / 2**20:.2f}", versions[s.server_id]
        )
    console.print(summary)
    table = Table(title="shards")
    # Replication 2: the backup that takes over if the owner is lost ("-": a single copy).
    replicated = job.spec.replication > 1
    # Streaming fragments: version v syncs the shards of fragment v mod F only.
    fragmented = job.spec.local_steps.fragments > 1
    columns = ("shard", "server", *(["backup"] if replicated else []))
    columns += ("fragment",) if fragmented else ()
    for col in (*columns, "param shape", "slice", "KiB", "norm", "mean", "max|x|"):
        table.add_column(col)
    for spec in shard_map.shards:
        info = infos.get(spec.shard_id)
        st = info.stats if info is not None and info.HasField("stats") else None
        table.add_row(
            spec.shard_id,
            spec.server_id,
            *([spec.backup_server_id or "-"] if replicated else []),
            *([str(spec.fragment)] if fragmented else []),
            "x".join(map(str, spec.param_shape)) or "scalar",
            f"[{spec.start}:{spec.start + spec.numel}]",
            f"{spec.numel * 4 / 1024:.1f}",
            f"{st.norm:.4g}" if st else "-",
            f"{st.mean:.3g}" if st else "-",
            f"{st.max_abs:.3g}" if st else "-",
        )
    console.print(table)
