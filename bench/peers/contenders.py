"""The contenders of `peers`: how each is started, and its run reduced to one `Sample`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.peers import lmps_sync
from bench.peers.job import PeerJob
from bench.peers.launch import Launched, module_cmd, run_all
from lmps.client.launcher import free_port

TIMEOUT_S = 1800.0
"""One run of one contender; gpt2 on a CPU can take many minutes."""


@dataclass(frozen=True)
class Sample:
    """One run of one contender over the job's timed window."""

    wall_s: float
    cpu_s: float
    """User + system CPU of every process of the contender over the window."""
    tokens: int
    losses: list[float]
    """The global batch's mean loss at every step (warm-up steps included)."""
    whole_wall_s: float
    whole_cpu_s: float
    """The whole run: process start-up, data, model and connections included."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_s


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    processes: int
    threads: str
    """Torch threads, in words (per process where there are several)."""
    workers: int
    """Processes that compute gradients (the wire-bytes column counts per one of them)."""
    run: Callable[[PeerJob, Path], Sample]


def _mean_by_step(per_rank: list[list[float]]) -> list[float]:
    """The global batch's loss: ranks hold equal shares, so the mean of their means."""
    return [sum(col) / len(col) for col in zip(*per_rank, strict=True)]


def _sample(job: PeerJob, ranks: list[dict[str, Any]], run: Launched, **extra: Any) -> Sample:
    losses = [r["losses"] for r in ranks if "losses" in r]
    return Sample(
        wall_s=max(r["wall_s"] for r in ranks),
        cpu_s=sum(r["cpu_s"] for r in ranks),
        tokens=job.timed_steps * job.tokens_per_step,
        losses=_mean_by_step(losses),
        whole_wall_s=run.wall_s,
        whole_cpu_s=run.cpu_s,
        extra=extra,
    )


def single(threads: int) -> Contender:
    key = f"torch-{threads}"

    def run(job: PeerJob, log_dir: Path) -> Sample:
        cmd = module_cmd("bench.peers.single", "--job", job.to_json(), "--threads", str(threads))
        out = run_all(key, [cmd], log_dir, [threads], TIMEOUT_S)
        return _sample(job, out.results, out)

    return Contender(key, "torch, 1 process", 1, str(threads), 1, run)


def ddp(world: int, threads: int) -> Contender:
    key = f"ddp-{world}"

    def run(job: PeerJob, log_dir: Path) -> Sample:
        port = free_port()
        cmds = [
            module_cmd(
                "bench.peers.ddp",
                *("--job", job.to_json(), "--threads", str(threads)),
                *("--rank", str(r), "--world", str(world), "--port", str(port)),
            )
            for r in range(world)
        ]
        out = run_all(key, cmds, log_dir, [threads] * world, TIMEOUT_S)
        diff = max(r["max_abs_diff_vs_rank0"] for r in out.results)
        return _sample(job, out.results, out, max_param_diff_across_ranks=diff)

    return Contender(key, f"DDP over gloo, {world} ranks", world, f"{threads} each", world, run)


def rpc_ps(trainers: int, threads: int) -> Contender:
    key = f"rpc-ps-{trainers}"

    def run(job: PeerJob, log_dir: Path) -> Sample:
        port = free_port()
        world = trainers + 1
        cmds = [
            module_cmd(
                "bench.peers.rpc_ps",
                *("--job", job.to_json(), "--threads", str(1 if r == 0 else threads)),
                *("--rank", str(r), "--world", str(world), "--port", str(port)),
            )
            for r in range(world)
        ]
        # The server runs the optimizer single-threaded, as lmps's servers do.
        out = run_all(key, cmds, log_dir, [1] + [threads] * trainers, TIMEOUT_S)
        return _sample(job, out.results, out, server_updates=out.results[0]["updates"])

    label = f"torch rpc, 1 PS + {trainers} trainers"
    return Contender(key, label, trainers + 1, f"{threads} each, PS 1", trainers, run)


def lmps(workers: int, servers: int, threads: int) -> Contender:
    key = f"lmps-{workers}x{servers}"

    def run(job: PeerJob, log_dir: Path) -> Sample:
        out = lmps_sync.run(
            job,
            servers=servers,
            workers=workers,
            threads=threads,
            log_dir=log_dir / key,
            timeout_s=TIMEOUT_S,
        )
        return Sample(
            wall_s=out["wall_s"],
            cpu_s=out["cpu_s"],
            tokens=out["tokens_timed"],
            losses=out["losses"],
            whole_wall_s=out["whole_run_wall_s"],
            whole_cpu_s=out["whole_run_cpu_s"],
            extra={
                k: out[k] for k in ("rows_match", "pull_s", "compute_s", "push_s", "cpu_by_process")
            },
        )

    label = f"lmps SYNC, {servers} PS + {workers} worker{'s' if workers > 1 else ''}"
    return Contender(key, label, workers + servers + 1, f"{threads} each, PS 1", workers, run)


def lineup(workers: int, servers: int) -> list[Contender]:
    """Everyone, in the order of the table: the single-process baselines, the two torch
    peers, lmps, and lmps's one-worker pair for the one-thread torch process."""
    cores = os.cpu_count() or 1
    per = max(1, cores // workers)
    singles = [single(1)] + ([single(cores)] if cores > 1 else [])
    return [
        *singles,
        ddp(workers, per),
        rpc_ps(workers, per),
        lmps(workers, servers, per),
        lmps(1, 1, 1),
    ]
