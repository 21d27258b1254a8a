"""The contenders of `slowlink`: one row each, and the two ways a row is launched.

A row names its launcher ("ddp": `bench.slowlink.ddp`, one rank per worker namespace;
"lmps": `lmps_run`, servers here and one worker per worker namespace) and, for lmps, the
JobSpec fields it sets on top of the SYNC job. A new lmps mode is one more row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.peers.launch import module_cmd, run_all
from bench.slowlink import lmps_run
from bench.slowlink.job import SlowJob
from bench.slowlink.outcome import Outcome, Point
from bench.slowlink.topology import Topology
from lmps.v1 import job_pb2, tensor_pb2

DDP_PORT = 29500
"""Rank 0's TCP store, in rank 0's namespace (its own ports: no clash with anything)."""
PARAM_TOL = 1e-6
"""Largest parameter difference between DDP ranks after the run (they should be equal)."""


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    launcher: str
    """"ddp" or "lmps" (`LAUNCHERS`)."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """lmps only: JobSpec field -> value set on the SYNC job (a message is copied in)."""


@dataclass(frozen=True)
class RunArgs:
    servers: int
    threads: int
    """Torch threads per worker / rank."""
    log_dir: Path
    timeout_s: float


def run_ddp(topo: Topology, job: SlowJob, contender: Contender, args: RunArgs) -> Outcome:
    world = len(topo.workers)
    master = f"{topo.workers[0].ip}:{DDP_PORT}"
    cmds = [
        [
            *link.exec_prefix(),
            *module_cmd(
                "bench.slowlink.ddp",
                *("--job", job.to_json(), "--threads", str(args.threads)),
                *("--rank", str(rank), "--world", str(world)),
                *("--master", master, "--ifname", link.ifname),
            ),
        ]
        for rank, link in enumerate(topo.workers)
    ]
    out = run_all(contender.key, cmds, args.log_dir, [args.threads] * world, args.timeout_s)
    ranks = out.results
    train = [
        Point(
            max(r["step_times"][i] for r in ranks),
            (i + 1) * job.tokens_per_step,
            sum(r["losses"][i] for r in ranks) / world,  # equal shares: the mean of means
        )
        for i in range(job.steps)
    ]
    n_evals = range(len(ranks[0]["evals"]))
    evals = [
        Point(
            max(r["evals"][i][1] for r in ranks),
            int(ranks[0]["evals"][i][2]) * job.tokens_per_step,
            float(ranks[0]["evals"][i][3]),  # all-reduced: the same on every rank
        )
        for i in n_evals
    ]
    pauses = [
        (min(r["evals"][i][0] for r in ranks), max(r["evals"][i][1] for r in ranks))
        for i in n_evals[1:]
    ]
    diff = max(r["max_abs_diff_vs_rank0"] for r in ranks)
    return Outcome(
        t0=min(r["t0"] for r in ranks),
        t1=max(r["t1"] for r in ranks),
        tokens=job.tokens,
        train=train,
        evals=evals,
        checks={"replicas_equal": diff <= PARAM_TOL},
        pauses=pauses,
        extra={"max_param_diff_across_ranks": diff, "cpu_s": sum(r["cpu_s"] for r in ranks)},
    )


def run_lmps(topo: Topology, job: SlowJob, contender: Contender, args: RunArgs) -> Outcome:
    return lmps_run.run(
        topo,
        job,
        contender.overrides,
        servers=args.servers,
        threads=args.threads,
        log_dir=args.log_dir / contender.key,
        timeout_s=args.timeout_s,
    )


LAUNCHERS: dict[str, Callable[[Topology, SlowJob, Contender, RunArgs], Outcome]] = {
    "ddp": run_ddp,
    "lmps": run_lmps,
}

SYNC = "lmps-sync"
"""The row whose final eval loss is everyone's target."""


# --- DiLoCo local steps (JobSpec.local_steps, a lmps.v1.LocalSteps) --------------------
# The servers' optimizer becomes DiLoCo's outer optimizer (SGD, lr 0.7, Nesterov momentum
# 0.9, as in the paper); each worker runs H AdamW inner steps (lr 1e-3, weight decay 0.1)
# per round. Rounds never cross a lease and batches_per_lease must be a multiple of H, so a
# lease is one round (batches_per_lease = H), and a row is left out of a plan whose epoch
# has fewer than H steps (the quick plan): its workers would get one short lease between
# them, not one round each.
LOCAL_H = (8, 32)
OUTER_SGD = job_pb2.OptimizerConfig(
    kind=job_pb2.SGD, lr=0.7, momentum=0.9, nesterov=True, schedule=job_pb2.CONSTANT
)


def local_steps(h: int, job: SlowJob, fragments: int = 1, overlap: bool = False) -> Contender:
    """DiLoCo with H inner steps a round; `fragments` F > 1: streaming (each version syncs
    1/F of every server's shards after H / F inner steps; a lease ends with F - 1 flushes);
    `overlap`: each fragment's sync runs while the next window trains."""
    inner = job_pb2.OptimizerConfig(
        kind=job_pb2.ADAMW,
        lr=1e-3,
        weight_decay=0.1,
        beta1=job.beta1,
        beta2=job.beta2,
        eps=job.eps,
        schedule=job_pb2.CONSTANT,
    )
    overrides = {
        "optimizer": OUTER_SGD,
        "local_steps": job_pb2.LocalSteps(
            steps=h, inner_optimizer=inner, fragments=fragments, overlap=overlap
        ),
        "batches_per_lease": h,
    }
    if fragments > 1:
        key, label = f"lmps-local-{h}-f{fragments}", f"lmps local H={h}, {fragments} fragments"
        if overlap:
            key, label = f"{key}-overlap", f"{label}, overlapped"
        return Contender(key, label, "lmps", overrides)
    return Contender(f"lmps-local-{h}", f"lmps local H={h}", "lmps", overrides)


FRAGMENTS = 4
"""Streaming fragments in the lineup: H = 32 in 4 fragments (a window of 8 inner steps)."""


INT8 = job_pb2.PushCompression(kind=tensor_pb2.Compressed.INT8)
SSP_S = 2


def lineup(job: SlowJob, workers: int, servers: int) -> list[Contender]:
    rows = [
        Contender("ddp", f"DDP over gloo, {workers} ranks", "ddp"),
        Contender(SYNC, f"lmps SYNC, {servers} PS + {workers} workers", "lmps"),
        Contender("lmps-async", "lmps ASYNC", "lmps", {"consistency": job_pb2.ASYNC}),
        Contender(
            f"lmps-ssp-{SSP_S}",
            f"lmps bounded staleness s={SSP_S}",
            "lmps",
            {"consistency": job_pb2.BOUNDED_STALENESS, "max_staleness": SSP_S},
        ),
        Contender(
            "lmps-sync-int8", "lmps SYNC, int8 pushes (EF)", "lmps", {"push_compression": INT8}
        ),
    ]
    rows += [local_steps(h, job) for h in LOCAL_H if h <= job.steps_per_epoch]
    h = max(LOCAL_H)
    if h <= job.steps_per_epoch:
        for base in (local_steps(h, job), local_steps(h, job, FRAGMENTS)):
            if base.key != f"lmps-local-{h}":
                rows.append(base)
            rows.append(
                Contender(
                    f"{base.key}-int8",
                    f"{base.label}, int8 pushes (EF)",
                    "lmps",
                    {**base.overrides, "push_compression": INT8},
                )
            )
        rows.append(local_steps(h, job, FRAGMENTS, overlap=True))
    return rows
