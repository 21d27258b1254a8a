"""Contender: lmps itself, a SYNC job on a `LocalCluster` of W workers and P servers.

Driven from the bench process, as `bench.training` does: start the cluster (every member a
process in its own session), submit the job, run one epoch and follow its StepEvents. The
job is the `PeerJob`: same preset, seed, AdamW settings (constant lr, no warmup), G/W
sequences per worker per step, and `batches_per_lease = 1`, which makes lmps's rows at each
step exactly `step_rows` (checked against the events' data shards). The epoch has exactly
`job.steps` global steps because the corpus is cut to `job.sequences` windows.

The timed window runs from the arrival of the last worker's StepEvent of the last warm-up
step to that of the last step; CPU is every cluster process's (coordinator, servers,
workers) user + system time from /proc read at those two moments. The epoch's end (eval,
checkpoint) falls outside it.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from bench.peers.job import PeerJob, train_tokens
from bench.peers.launch import children_cpu
from bench.training import cpu_seconds
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.client.train import TrainOptions, build_spec, submit_messages
from lmps.core.data import prepare_corpus
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2


def spec_for(job: PeerJob, servers: int, workers: int) -> tuple[job_pb2.JobSpec, Tensor]:
    """The job's spec, and an eval split of one window per worker (evaluated after the
    timed window: lmps splits it over the workers at the epoch's end)."""
    opts = TrainOptions(
        preset=job.preset,
        vocab_size=job.vocab_size,
        batch_size=job.global_batch // workers,
        batches_per_lease=1,
        epochs=1,
        optimizer="adamw",
        lr=job.lr,
        weight_decay=job.weight_decay,
        schedule="constant",
        warmup_steps=0,
        min_lr=0.0,
        seed=job.seed,
        servers=servers,
        workers=workers,
    )
    corpus = prepare_corpus(job.data, job.vocab_size, 0.05, Path(job.cache_dir))
    spec = build_spec(opts, corpus.vocab_size, corpus.tokenizer_json)
    # The torch contenders build AdamW from `job`: the servers must run that very update.
    s = codec.optimizer_request_from_proto(spec.optimizer)
    mine = (job.lr, job.weight_decay, job.beta1, job.beta2, job.eps)
    if (s.lr, s.weight_decay, s.beta1, s.beta2, s.eps) != mine:
        raise ValueError(f"lmps's AdamW {s} differs from the peers' {mine}")
    return spec, corpus.eval[: workers * job.config.block_size + 1]


def run(
    job: PeerJob, *, servers: int, workers: int, threads: int, log_dir: Path, timeout_s: float
) -> dict[str, Any]:
    """One lmps run of `job`: the window's wall and CPU time, per-step losses, the events."""
    if job.global_batch % workers:
        raise ValueError(f"global batch {job.global_batch} does not split over {workers}")
    spec, evals = spec_for(job, servers, workers)
    train = train_tokens(job)
    # A fresh coordinator state each run: one left by an earlier run would be read at start.
    state = tempfile.TemporaryDirectory(prefix="lmps-peers-")
    cluster = LocalCluster(
        ClusterSpec(
            servers=servers,
            workers=workers,
            run_dir=str(log_dir),
            worker_threads=threads,
            state_dir=state.name,
        )
    )
    cpu_all0, t_all0 = children_cpu(), time.perf_counter()
    try:
        cluster.start()
        pids = {p.name: p.pid for p in cluster.procs}
        with open_channel(cluster.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            resp = stub.SubmitJob(
                submit_messages(spec, train, evals), timeout=timeout_s, wait_for_ready=True
            )
            stream: Iterator[job_pb2.ProgressEvent] = stub.RunEpoch(
                coordinator_pb2.RunEpochRequest(job_id=resp.job_id, epoch=0),
                timeout=timeout_s,
                wait_for_ready=True,
            )
            out = _follow(job, workers, stream, pids)
    finally:
        cluster.stop()
        state.cleanup()
    out.update(
        whole_run_wall_s=time.perf_counter() - t_all0,
        # The cluster's processes were all waited for by stop(): their lives, startup,
        # submit and the epoch's end included.
        whole_run_cpu_s=children_cpu() - cpu_all0,
        processes=len(pids),
    )
    return out


def _follow(
    job: PeerJob, workers: int, stream: Iterator[job_pb2.ProgressEvent], pids: dict[str, int]
) -> dict[str, Any]:
    steps: dict[int, list[job_pb2.StepEvent]] = defaultdict(list)
    marks: dict[str, tuple[float, dict[str, float]]] = {}
    edges = {job.warmup_steps - 1: "start", job.steps - 1: "end"}
    for ev in stream:
        if ev.WhichOneof("kind") != "step":
            continue
        steps[ev.step.step].append(ev.step)
        # The step is done on the workers once each has reported it (after its push).
        if len(steps[ev.step.step]) == workers and ev.step.step in edges:
            cpu = {name: cpu_seconds([pid]) for name, pid in pids.items()}
            marks[edges[ev.step.step]] = (time.perf_counter(), cpu)
    if sorted(steps) != list(range(job.steps)) or set(marks) != {"start", "end"}:
        raise RuntimeError(f"lmps ran steps {sorted(steps)}, expected {job.steps}")
    (t0, cpu0), (t1, cpu1) = marks["start"], marks["end"]
    timed = [e for s in range(job.warmup_steps, job.steps) for e in steps[s]]
    return {
        "wall_s": t1 - t0,
        "cpu_s": sum(cpu1.values()) - sum(cpu0.values()),
        # Where it went: the coordinator, each server, each worker.
        "cpu_by_process": {name: cpu1[name] - cpu0[name] for name in pids},
        "losses": [sum(e.loss for e in steps[s]) / workers for s in range(job.steps)],
        # Data shard j is batch j of the epoch order: lmps's step s must be shards s*W + w.
        "rows_match": all(
            sorted(e.data_shard for e in steps[s]) == [s * workers + w for w in range(workers)]
            for s in range(job.steps)
        ),
        "tokens_timed": sum(e.tokens for e in timed),
        "pull_s": [e.pull_s for e in timed],
        "compute_s": [e.compute_s for e in timed],
        "push_s": [e.push_s for e in timed],
    }
