"""`training`: tokens/s of a real cluster vs one plain torch process doing the same work.

Cluster: `LocalCluster` with 2 parameter servers and 2 workers (each worker gets
cores / workers torch threads, as in `make demo`), the `tiny` preset on `builtin:pydoc`, the
demo's job (`lmps.client.train.build_spec` with its defaults: AdamW, batch 16 per worker, SYNC).
The job runs several epochs; the first is a warm-up, each later one is timed on the client
from its EpochStart event to its last StepEvent (training only, not the end-of-epoch eval).

Baseline: in this process, the same model (`init_model`, same seed), AdamW with the same
settings and schedule, and for each global step of the timed epoch one batch holding as many
sequences as all workers' batches of that step together (the SYNC cluster's step is
mathematically that step), for the epoch's first 10 steps (a rate needs no more, and a
whole epoch can take minutes, see below). It runs twice, with 1 torch thread and with one per
core, right after each timed cluster epoch (the idle cluster stays up), so all three see
about the same machine load. The headline ratios are against the better of the two at that
moment: on a busy 2-core machine a 2-thread torch process can be several times slower than a
1-thread one (a descheduled OpenMP thread stalls the other), so neither is always the fair
baseline.

Two ratios: tokens/s (wall clock), and tokens per CPU-second (user + system time of the 5
cluster processes from /proc, of this process from `time.process_time`), which depends far
less on what else the machine runs. Per-step pull / compute / push come from the workers'
StepEvents.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from bench.common import Context, environment, median, spread, write_result
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.client.preflight import resolve_model_flags
from lmps.client.train import TrainOptions, build_spec, submit_messages
from lmps.core.data import PreparedCorpus, prepare_corpus, to_sequences
from lmps.core.model import GPTConfig, decay_mask, init_model, preset
from lmps.core.optim import OptimizerSettings, lr_at
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2

NAME = "training"
SERVERS = 2
WORKERS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class EpochRun:
    """One timed cluster epoch, as the client saw it."""

    wall_s: float  # EpochStart -> last StepEvent
    cpu_s: float  # CPU time (user + system) of every cluster process over the RunEpoch call
    tokens: int
    steps: dict[int, list[job_pb2.StepEvent]]  # global step -> the workers' events
    summary: job_pb2.EpochSummary

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_s

    @property
    def events(self) -> list[job_pb2.StepEvent]:
        return [e for evs in self.steps.values() for e in evs]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (Linux /proc; NaN elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return math.nan
        # Fields after the command name (which may contain spaces) in parentheses;
        # utime and stime are fields 14 and 15 of the whole line.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def _run_epoch(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, job_id: str, epoch: int, pids: list[int]
) -> EpochRun:
    cpu0 = cpu_seconds(pids)
    stream: Iterator[job_pb2.ProgressEvent] = stub.RunEpoch(
        coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=epoch),
        timeout=600,
        wait_for_ready=True,
    )
    started = last = math.nan
    tokens = 0
    steps: dict[int, list[job_pb2.StepEvent]] = defaultdict(list)
    summary = None
    for ev in stream:
        kind = ev.WhichOneof("kind")
        if kind == "start":
            started = time.perf_counter()
        elif kind == "step":
            last = time.perf_counter()
            tokens += ev.step.tokens
            steps[ev.step.step].append(ev.step)
        elif kind == "summary":
            summary = ev.summary
    if summary is None or not steps:
        raise RuntimeError(f"epoch {epoch} ended without steps or a summary")
    return EpochRun(last - started, cpu_seconds(pids) - cpu0, tokens, dict(steps), summary)


class Baseline:
    """Single-process torch: the cluster's model, optimizer and global steps."""

    def __init__(
        self, config: GPTConfig, spec: job_pb2.JobSpec, train: torch.Tensor, threads: int
    ) -> None:
        self.threads = threads
        self.settings: OptimizerSettings = codec.optimizer_from_proto(spec.optimizer)
        self.model = init_model(config, int(spec.seed))
        self.sequences = to_sequences(train, config.block_size)
        named = list(self.model.named_parameters())
        s = self.settings
        groups = [
            {"params": [p for n, p in named if decay_mask(n, p)], "weight_decay": s.weight_decay},
            {"params": [p for n, p in named if not decay_mask(n, p)], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps)
        self.step_no = 0
        self.offset = 0

    def _batch(self, rows: int) -> torch.Tensor:
        n = self.sequences.shape[0]
        idx = torch.arange(self.offset, self.offset + rows) % n
        self.offset = (self.offset + rows) % n
        return self.sequences[idx].long()

    def step(self, rows: int) -> tuple[float, float, float]:
        """One optimizer step on `rows` sequences -> (loss, compute_s, optimizer_s)."""
        batch = self._batch(rows)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=False)
        _, loss = self.model(batch[:, :-1], batch[:, 1:])  # (B, T) inputs, next-token targets
        assert loss is not None
        loss.backward()
        t1 = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.settings, self.step_no)
        self.opt.step()
        self.step_no += 1
        return float(loss.detach()), t1 - t0, time.perf_counter() - t1

    def run(self, rows_per_step: list[int]) -> dict[str, Any]:
        """Steps of `rows_per_step[i]` sequences each, timed, with `threads` torch threads."""
        self.model.train()
        losses, compute, optim = [], [], []
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t0, cpu0 = time.perf_counter(), time.process_time()
            for rows in rows_per_step:
                loss, c, o = self.step(rows)
                losses.append(loss)
                compute.append(c)
                optim.append(o)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            torch.set_num_threads(before)
        tokens = sum(rows_per_step) * (self.sequences.shape[1] - 1)
        return {
            "wall_s": wall,
            "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "cpu_s": cpu,
            "tokens_per_cpu_s": tokens / cpu,
            "steps": len(rows_per_step),
            "mean_loss": sum(losses) / len(losses),
            "compute_s_median": median(compute),
            "optimizer_s_median": median(optim),
        }


def _corpus(quick: bool, block: int, batch: int) -> tuple[PreparedCorpus, torch.Tensor]:
    vocab = resolve_model_flags(TrainOptions()).vocab_size  # the default preset's
    corpus = prepare_corpus("builtin:pydoc", vocab, 0.05, Path(".cache/lmps"))
    train = corpus.train
    if quick:
        # 4 batches per worker per epoch: a few steps to time, quick to run.
        train = train[: WORKERS * 4 * batch * block + 1]
    return corpus, train


def _thread_counts() -> list[int]:
    """Baseline torch threads: 1, and all cores (when that is more)."""
    cores = os.cpu_count() or 1
    return sorted({1, cores})


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    timed_epochs = 1 if ctx.quick else 3
    baseline_steps = 4 if ctx.quick else 10
    opts = resolve_model_flags(
        TrainOptions(epochs=1 + timed_epochs, servers=SERVERS, workers=WORKERS)
    )
    block = preset(opts.preset).block_size
    corpus, train = _corpus(ctx.quick, block, opts.batch_size)
    spec = build_spec(opts, corpus.vocab_size, corpus.tokenizer_json)
    config = codec.model_from_proto(spec.model)
    n_seq = to_sequences(train, block).shape[0]
    spec.optimizer.total_steps = opts.epochs * math.ceil(n_seq // opts.batch_size / WORKERS)
    evals = corpus.eval[: 4 * block + 1]  # a few sequences: the epoch-end eval stays cheap

    baselines = {n: Baseline(config, spec, train, threads=n) for n in _thread_counts()}
    for b in baselines.values():
        b.run([WORKERS * opts.batch_size])  # warm-up: allocator, kernels
    epochs: list[EpochRun] = []
    base_runs: dict[int, list[dict[str, Any]]] = {n: [] for n in baselines}
    cluster = LocalCluster(
        ClusterSpec(servers=SERVERS, workers=WORKERS, run_dir=str(ctx.log_dir(NAME)))
    )
    t_start = time.perf_counter()
    cluster.start()
    startup_s = time.perf_counter() - t_start
    try:
        with open_channel(cluster.coordinator) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            resp = stub.SubmitJob(
                submit_messages(spec, train, evals), timeout=300, wait_for_ready=True
            )
            pids = [proc.pid for proc in cluster.procs]
            _run_epoch(stub, resp.job_id, 0, pids)  # warm-up epoch
            ctx.console.log("training: warm-up epoch done")
            for epoch in range(1, opts.epochs):
                epochs.append(_run_epoch(stub, resp.job_id, epoch, pids))
                # Right after, the baselines do the same steps (same sequences per step);
                # the first `baseline_steps` of them, as a 2-thread process on a busy
                # 2-core machine can take minutes for a whole epoch.
                rows = _rows_per_step(epochs[-1], block)[:baseline_steps]
                for n, b in baselines.items():
                    base_runs[n].append(b.run(rows))
                ctx.console.log(f"training: epoch {epoch} timed, and the baselines")
    finally:
        cluster.stop()

    result = _summarize(epochs, base_runs)
    result.update(
        environment=started,
        params={
            "preset": opts.preset,
            "parameters": sum(p.numel() for p in init_model(config, 0).parameters()),
            "corpus": "builtin:pydoc" + (" (truncated)" if ctx.quick else ""),
            "train_sequences": n_seq,
            "batch_size_per_worker": opts.batch_size,
            "servers": SERVERS,
            "workers": WORKERS,
            "worker_torch_threads": max(1, (os.cpu_count() or 1) // WORKERS),
            "optimizer": "adamw (cluster: on the servers; baseline: torch.optim.AdamW)",
            "timed_epochs": len(epochs),
            "baseline_steps_per_run": baseline_steps,
            "cluster_startup_s": startup_s,
        },
    )
    _print(ctx, result)
    path = write_result(ctx, NAME, result)
    ctx.console.print(f"wrote {path}")
    return result


def _rows_per_step(run: EpochRun, block: int) -> list[int]:
    """Sequences in each global step of a cluster epoch (all workers' batches together)."""
    return [sum(e.tokens for e in evs) // block for _, evs in sorted(run.steps.items())]


def _paired(cluster: list[float], base: list[float]) -> float:
    """Median over epochs of cluster / baseline, each pair timed back to back."""
    return median([c / b for c, b in zip(cluster, base, strict=True)])


def _summarize(
    epochs: list[EpochRun], base_runs: dict[int, list[dict[str, Any]]]
) -> dict[str, Any]:
    cluster_tps = [e.tokens_per_s for e in epochs]
    cluster_tpc = [e.tokens_per_cpu_s for e in epochs]
    baselines: dict[str, dict[str, Any]] = {}
    for n, runs in base_runs.items():
        tps = [r["tokens_per_s"] for r in runs]
        tpc = [r["tokens_per_cpu_s"] for r in runs]
        baselines[f"threads={n}"] = {
            "threads": n,
            "tokens_per_s": median(tps),
            "tokens_per_s_each": tps,
            "spread": spread(tps),
            "ratio_cluster_to_this": _paired(cluster_tps, tps),
            "tokens_per_cpu_s": median(tpc),
            "cpu_ratio_cluster_to_this": _paired(cluster_tpc, tpc),
            "compute_s_median": median([r["compute_s_median"] for r in runs]),
            "optimizer_s_median": median([r["optimizer_s_median"] for r in runs]),
            "runs": runs,
        }

    def best(key: str) -> list[float]:
        """The better single process at each moment (epoch by epoch) on `key`."""
        cols = zip(*([r[key] for r in runs] for runs in base_runs.values()), strict=True)
        return [max(col) for col in cols]

    events = [ev for e in epochs for ev in e.events]
    pull = [ev.pull_s for ev in events]
    compute = [ev.compute_s for ev in events]
    push = [ev.push_s for ev in events]
    total = sum(pull) + sum(compute) + sum(push)
    return {
        "cluster": {
            "tokens_per_s": median(cluster_tps),
            "tokens_per_s_each": cluster_tps,
            "spread": spread(cluster_tps),
            "tokens_per_cpu_s": median(cluster_tpc),
            "cpu_s_each": [e.cpu_s for e in epochs],
            "steps_per_epoch": [len(e.steps) for e in epochs],
            "tokens_per_epoch": [e.tokens for e in epochs],
            "wall_s_each": [e.wall_s for e in epochs],
            "mean_train_loss": [e.summary.train_loss for e in epochs],
            "summary_tokens_per_s": [e.summary.tokens_per_s for e in epochs],
        },
        "baselines": baselines,
        "ratio_cluster_to_best_baseline": _paired(cluster_tps, best("tokens_per_s")),
        "cpu_ratio_cluster_to_best_baseline": _paired(cluster_tpc, best("tokens_per_cpu_s")),
        "step_breakdown": {
            "worker_steps": len(events),
            "pull_s_median": median(pull),
            "compute_s_median": median(compute),
            "push_s_median": median(push),
            "pull_fraction": sum(pull) / total,
            "compute_fraction": sum(compute) / total,
            "push_fraction": sum(push) / total,
        },
    }


def _print(ctx: Context, r: dict[str, Any]) -> None:
    p = r["params"]
    table = Table(
        title=f"training: {p['preset']} ({p['parameters'] / 1e6:.2f}M params), "
        f"{p['train_sequences']} sequences/epoch, median of {p['timed_epochs']} epochs"
    )
    for col in (
        "run",
        "torch threads",
        "tokens/s",
        "spread",
        "cluster / this",
        "tokens per CPU-s",
        "cluster / this",
    ):
        table.add_column(col, justify="right")
    for b in r["baselines"].values():
        table.add_row(
            "1 process, torch, global batch",
            str(b["threads"]),
            f"{b['tokens_per_s']:,.0f}",
            f"{b['spread']:.0%}",
            f"{b['ratio_cluster_to_this']:.2f}",
            f"{b['tokens_per_cpu_s']:,.0f}",
            f"{b['cpu_ratio_cluster_to_this']:.2f}",
        )
    c = r["cluster"]
    table.add_row(
        f"cluster: {p['servers']} PS + {p['workers']} workers",
        f"{p['worker_torch_threads']} per worker",
        f"{c['tokens_per_s']:,.0f}",
        f"{c['spread']:.0%}",
        "1.00",
        f"{c['tokens_per_cpu_s']:,.0f}",
        "1.00",
    )
    table.caption = (
        f"cluster / best single process, epoch by epoch (median): tokens/s "
        f"{r['ratio_cluster_to_best_baseline']:.2f}, tokens per CPU-second "
        f"{r['cpu_ratio_cluster_to_best_baseline']:.2f}. CPU-s: user + system of all "
        "processes involved (the cluster's 5, or this one)."
    )
    ctx.console.print(table)

    b = r["step_breakdown"]
    steps = Table(title="training: one step (median); cluster from the workers' StepEvents")
    for col in ("", "pull ms", "fwd+bwd ms", "push / optimizer ms", "share pull/compute/push"):
        steps.add_column(col, justify="right")
    steps.add_row(
        f"cluster worker, {p['batch_size_per_worker']} seqs",
        f"{b['pull_s_median'] * 1e3:.0f}",
        f"{b['compute_s_median'] * 1e3:.0f}",
        f"{b['push_s_median'] * 1e3:.0f}",
        f"{b['pull_fraction']:.0%} / {b['compute_fraction']:.0%} / {b['push_fraction']:.0%}",
    )
    for base in r["baselines"].values():
        steps.add_row(
            f"1 process, {base['threads']} threads, {p['workers'] * p['batch_size_per_worker']} "
            "seqs",
            "-",
            f"{base['compute_s_median'] * 1e3:.0f}",
            f"{base['optimizer_s_median'] * 1e3:.0f}",
            "-",
        )
    ctx.console.print(steps)
