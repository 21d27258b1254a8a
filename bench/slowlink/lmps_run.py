"""Contender: lmps on the shaped network, with any JobSpec overrides on top of SYNC.

The coordinator and the P servers are a `LocalCluster` (no workers) listening on the
servers' address in this namespace; each worker runs in its own namespace with `--host` and
`--advertise` set to that namespace's address, so its pulls and pushes (and its leases)
cross its shaped link. Every process starts in a Unix session of its own, as the DDP ranks.

The job is the `SlowJob`: same preset, seed, AdamW (constant lr) on the servers, G/W
sequences per worker per step, `batches_per_lease = 1` (lmps's rows are then the DDP
ranks' rows, checked from the events' data shards under plain SYNC). It runs
`job.epochs` epochs; the coordinator's end-of-epoch eval gives the eval curve, and the
Evaluate RPC gives the loss before the first step and checks the last one.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from bench.common import median
from bench.slowlink.job import SlowJob, split_tokens
from bench.slowlink.outcome import Outcome, Point
from bench.slowlink.topology import Topology, WorkerLink
from lmps.client.launcher import ClusterSpec, LocalCluster, wait_healthy
from lmps.client.train import submit_messages
from lmps.core.data import prepare_corpus
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2

WORKER_PORT = 50071
"""Each worker namespace has its own ports: the same one everywhere."""


def worker_cmd(link: WorkerLink, coordinator: str, worker_id: str) -> list[str]:
    return [
        *link.exec_prefix(),
        sys.executable,
        "-m",
        "lmps.services.worker.main",
        *("--host", link.ip, "--port", str(WORKER_PORT), "--metrics-port", "-1"),
        *("--grace", "2", "--coordinator", coordinator, "--id", worker_id),
        *("--advertise", f"{link.ip}:{WORKER_PORT}"),
    ]


@contextmanager
def cluster_on(
    topo: Topology,
    *,
    servers: int,
    threads: int,
    log_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> Iterator[LocalCluster]:
    """Coordinator + `servers` servers here, one worker per worker namespace (ids
    worker-0.. in the namespaces' order); all registered when this yields; all stopped."""
    log_dir.mkdir(parents=True, exist_ok=True)
    state = tempfile.TemporaryDirectory(prefix="lmps-slowlink-")
    env = {**(extra_env or {})}
    cluster = LocalCluster(
        ClusterSpec(
            servers=servers,
            workers=0,
            host=topo.server_ip,
            run_dir=str(log_dir),
            state_dir=state.name,
            extra_env=env,
        )
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        cluster.start(timeout_s)
        for i, link in enumerate(topo.workers):
            with (log_dir / f"worker-{i}.log").open("wb") as log:
                workers.append(
                    subprocess.Popen(
                        worker_cmd(link, cluster.coordinator, f"worker-{i}"),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={
                            **os.environ,
                            "OMP_NUM_THREADS": str(threads),
                            "PYTHONUNBUFFERED": "1",
                            **env,
                        },
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout_s
        for i, (link, proc) in enumerate(zip(topo.workers, workers, strict=True)):
            _wait_serving(f"{link.ip}:{WORKER_PORT}", proc, log_dir / f"worker-{i}.log", deadline)
        _wait_members(cluster.coordinator, servers + len(workers), deadline)
        yield cluster
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cluster.stop()
        state.cleanup()


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker at {address} exited with {proc.returncode}:\n{tail}")
        try:
            wait_healthy(address, timeout_s=1.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def _wait_members(coordinator: str, want: int, deadline: float) -> None:
    with open_channel(coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        while True:
            status = stub.GetClusterStatus(coordinator_pb2.ClusterStatusRequest(), timeout=5)
            alive = sum(m.alive for m in status.members)
            if alive >= want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {alive}/{want} members registered")
            time.sleep(0.1)


def spec_for(
    job: SlowJob, servers: int, workers: int, overrides: Mapping[str, Any]
) -> job_pb2.JobSpec:
    """The SYNC job, then `overrides` (JobSpec field -> value; a message is copied in)."""
    if job.global_batch % workers:
        raise ValueError(f"global batch {job.global_batch} does not split over {workers}")
    corpus = prepare_corpus(job.data, job.vocab_size, 0.05, Path(job.cache_dir))
    spec = job_pb2.JobSpec(
        name="slowlink",
        model=codec.model_to_proto(job.config),
        optimizer=job_pb2.OptimizerConfig(
            kind=job_pb2.ADAMW,
            lr=job.lr,
            weight_decay=job.weight_decay,
            beta1=job.beta1,
            beta2=job.beta2,
            eps=job.eps,
            schedule=job_pb2.CONSTANT,
        ),
        batch_size=job.global_batch // workers,
        batches_per_lease=1,
        seed=job.seed,
        epochs=job.epochs,
        num_servers=servers,
        num_workers=workers,
        consistency=job_pb2.SYNC,
        tokenizer_json=corpus.tokenizer_json,
        wait_for_members_s=60,
    )
    for name, value in overrides.items():
        if isinstance(value, Message):
            getattr(spec, name).CopyFrom(value)
        else:
            setattr(spec, name, value)
    return spec


def run(
    topo: Topology,
    job: SlowJob,
    overrides: Mapping[str, Any],
    *,
    servers: int,
    threads: int,
    log_dir: Path,
    timeout_s: float,
) -> Outcome:
    workers = len(topo.workers)
    spec = spec_for(job, servers, workers, overrides)
    train, evals = split_tokens(job)
    with (
        cluster_on(topo, servers=servers, threads=threads, log_dir=log_dir) as cluster,
        open_channel(cluster.coordinator) as channel,
    ):
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        submitted = stub.SubmitJob(
            submit_messages(spec, train, evals), timeout=timeout_s, wait_for_ready=True
        )
        job_id = submitted.job_id
        ask = coordinator_pb2.EvaluateJobRequest(job_id=job_id)
        first = stub.Evaluate(ask, timeout=timeout_s)
        t0 = time.time()
        steps: list[tuple[float, int, job_pb2.StepEvent]] = []  # (arrival, epoch, event)
        summaries: list[tuple[float, job_pb2.EpochSummary]] = []
        for epoch in range(job.epochs):
            request = coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=epoch)
            for ev in stub.RunEpoch(request, timeout=timeout_s):
                kind = ev.WhichOneof("kind")
                if kind == "step":
                    steps.append((time.time(), epoch, ev.step))
                elif kind == "summary":
                    summaries.append((time.time(), ev.summary))
        t1 = time.time()
        last = stub.Evaluate(ask, timeout=timeout_s)
    return _outcome(job, workers, overrides, t0, t1, first, last, steps, summaries)


def _outcome(
    job: SlowJob,
    workers: int,
    overrides: Mapping[str, Any],
    t0: float,
    t1: float,
    first: coordinator_pb2.EvaluateJobResponse,
    last: coordinator_pb2.EvaluateJobResponse,
    steps: list[tuple[float, int, job_pb2.StepEvent]],
    summaries: list[tuple[float, job_pb2.EpochSummary]],
) -> Outcome:
    # Train curve: point n is the mean of every worker's n-th StepEvent, known when the last
    # of them arrives (under SYNC: global step n). Tokens: every event that arrived by then.
    by_worker: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, _, ev in steps:
        by_worker[ev.worker_id].append((t, ev.loss))
    arrivals = [t for t, _, _ in steps]
    done = list(itertools.accumulate(ev.tokens for _, _, ev in steps))
    train = []
    for n in range(min((len(v) for v in by_worker.values()), default=0)):
        at = max(v[n][0] for v in by_worker.values())
        loss = sum(v[n][1] for v in by_worker.values()) / len(by_worker)
        tokens = max((d for a, d in zip(arrivals, done, strict=True) if a <= at), default=0)
        train.append(Point(at, tokens, loss))
    evals = [Point(t0, 0, first.loss)]
    pauses = []
    for t, summary in summaries:
        done_by_t = sum(ev.tokens for a, _, ev in steps if a <= t)
        evals.append(Point(t, done_by_t, summary.eval_loss))
        # The epoch-end evaluation (a pull per worker) and checkpoint, as the coordinator
        # timed them (`closing_s`): after the epoch's last push, flushes included.
        pauses.append((t - summary.closing_s, t))
    tokens = sum(ev.tokens for _, _, ev in steps)
    checks = {
        "all_epochs": len(summaries) == job.epochs,
        "token_budget": tokens == job.tokens,
        "evaluate_is_last_epoch_eval": bool(summaries)
        and abs(last.loss - summaries[-1][1].eval_loss) < 1e-6,
    }
    if not overrides:  # plain SYNC: step s trains data shards k*W + w of its epoch
        by_step: dict[int, list[job_pb2.StepEvent]] = defaultdict(list)
        epoch_of = {}
        for _, epoch, ev in steps:
            by_step[ev.step].append(ev)
            epoch_of[ev.step] = epoch
        checks["same_rows_as_ddp"] = sorted(by_step) == list(range(job.steps)) and all(
            sorted(e.data_shard for e in evs)
            == [(s - epoch_of[s] * job.steps_per_epoch) * workers + w for w in range(workers)]
            for s, evs in by_step.items()
        )
    return Outcome(
        t0=t0,
        t1=t1,
        tokens=tokens,
        train=train,
        evals=evals,
        checks=checks,
        pauses=pauses,
        extra={
            "events": len(steps),
            "pull_s_median": median([ev.pull_s for _, _, ev in steps]),
            "compute_s_median": median([ev.compute_s for _, _, ev in steps]),
            "push_s_median": median([ev.push_s for _, _, ev in steps]),
            "final_version": int(last.version),
        },
    )
