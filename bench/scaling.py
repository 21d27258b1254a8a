"""`scaling`: lmps SYNC and DDP at W = 1, 2, 4 workers on the same job (issue 9's note).

For each W the `peers` job (same preset, seed, rows, AdamW) runs as DDP over gloo with W
ranks and as lmps SYNC with W workers and P = 2 servers (`LMPS_BENCH_SERVERS`), each in
fresh processes of their own sessions, interleaved, an order rotated per repeat. The global
batch stays 8 sequences, so a worker's share shrinks as W grows (strong scaling): with 2
cores, W = 4 runs 4 + 2 + 1 lmps processes (4 DDP ranks) on 2 cores, i.e. oversubscribed,
and each process gets cores / W torch threads (at least 1).

Reported per W: the step time (window wall / timed steps), tokens/s, tokens per CPU-second,
lmps's per-worker pull / compute / push (StepEvents), the bytes each lmps worker moves per
step (a pull and a push of the fp32 model), the server tier's traffic per step (W models in,
W models out, split over P servers) and DDP's ring all-reduce bytes per rank, 2(W-1)/W x
the model; and lmps / DDP per W, paired within a repeat. Every run is checked as `peers`
checks it (losses finite, falling, within 0.01 of single-process torch's).
"""

from __future__ import annotations

import os
from typing import Any

from rich.table import Table

from bench.common import Context, environment, median, write_result
from bench.peers.contenders import Contender, Sample, ddp, lmps, single
from bench.peers.job import build_model, model_bytes
from bench.peers.report import summarize
from bench.peers.suite import Plan, interleave, make_job

NAME = "scaling"
WORKERS = (1, 2, 4)
FULL = Plan(preset="small", global_batch=8, warmup_steps=2, timed_steps=3, repeats=2)
QUICK = Plan(preset="mini", global_batch=4, warmup_steps=1, timed_steps=2, repeats=1)


def _lineup(workers: int, servers: int) -> list[Contender]:
    cores = os.cpu_count() or 1
    per = max(1, cores // workers)
    # torch-1 first: the loss reference every run is checked against.
    return [single(1), ddp(workers, per), lmps(workers, servers, per)]


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    servers = int(os.environ.get("LMPS_BENCH_SERVERS", "") or 2)
    plan = QUICK if ctx.quick else FULL
    job = make_job(plan)
    nbytes = model_bytes(build_model(job))
    by_w: dict[int, dict[str, Any]] = {}
    for w in WORKERS:
        if job.global_batch % w:
            continue
        contenders = _lineup(w, servers)
        samples = interleave(ctx, job, contenders, plan.repeats)
        summary = summarize(
            job, contenders, samples, workers=w, servers=servers, model_bytes=nbytes
        )
        by_w[w] = _row(job.timed_steps, w, servers, nbytes, samples, summary)
    _print(ctx, job.preset, servers, by_w)
    payload = {
        "environment": started,
        "params": {"servers": servers, "plan": plan.__dict__, "cores": os.cpu_count()},
        "model_bytes_fp32": nbytes,
        "by_workers": by_w,
    }
    path = write_result(ctx, NAME, payload)
    ctx.console.print(f"wrote {path}")
    return payload


def _row(
    steps: int,
    w: int,
    servers: int,
    nbytes: int,
    samples: dict[str, list[Sample]],
    summary: dict[str, Any],
) -> dict[str, Any]:
    lk, dk = f"lmps-{w}x{servers}", f"ddp-{w}"
    rows = summary["contenders"]
    ratio = summary["ratios"].get(f"{lk}/{dk}", {})
    return {
        "step_s": {k: median([s.wall_s / steps for s in samples[k]]) for k in (lk, dk)},
        "tokens_per_s": {k: rows[k]["tokens_per_s"] for k in (lk, dk)},
        "tokens_per_cpu_s": {k: rows[k]["tokens_per_cpu_s"] for k in (lk, dk)},
        "ok": {k: rows[k]["ok"] for k in (lk, dk)},
        "lmps_step_breakdown": summary["lmps_step_breakdown"][lk],
        "lmps_bytes_per_worker_step": 2 * nbytes,
        "server_tier_bytes_per_step": {"in": w * nbytes, "out": w * nbytes},
        "per_server_bytes_per_step": 2 * w * nbytes / servers,
        "ddp_bytes_per_rank_step": 2 * (w - 1) / w * nbytes,
        "lmps_over_ddp": ratio,
        "summary": summary,
    }


def _print(ctx: Context, preset: str, servers: int, by_w: dict[int, dict[str, Any]]) -> None:
    table = Table(
        title=f"scaling: {preset}, lmps W workers + {servers} servers vs DDP W ranks, "
        f"{os.cpu_count()} cores (W = 4 oversubscribes them)"
    )
    for col in (
        "W",
        "lmps step s",
        "ddp step s",
        "lmps pull/compute/push ms",
        "lmps tok/CPU-s",
        "ddp tok/CPU-s",
        "lmps/ddp tok/s",
        "lmps/ddp tok/CPU-s",
        "MB/worker-step lmps / ddp",
        "MB/server-step",
    ):
        table.add_column(col, justify="right")
    for w, r in by_w.items():
        lk, dk = f"lmps-{w}x{servers}", f"ddp-{w}"
        b = r["lmps_step_breakdown"]
        parts = "/".join(f"{1000 * b[f'{k}_s_median']:.0f}" for k in ("pull", "compute", "push"))
        ratio = r["lmps_over_ddp"]
        ok = "" if all(r["ok"].values()) else " FAILED"
        table.add_row(
            str(w),
            f"{r['step_s'][lk]:.2f}",
            f"{r['step_s'][dk]:.2f}",
            parts,
            f"{r['tokens_per_cpu_s'][lk]:,.0f}",
            f"{r['tokens_per_cpu_s'][dk]:,.0f}",
            f"{ratio.get('tokens_per_s', float('nan')):.2f}{ok}",
            f"{ratio.get('tokens_per_cpu_s', float('nan')):.2f}{ok}",
            f"{r['lmps_bytes_per_worker_step'] / 1e6:.0f} / "
            f"{r['ddp_bytes_per_rank_step'] / 1e6:.0f}",
            f"{r['per_server_bytes_per_step'] / 1e6:.0f}",
        )
    ctx.console.print(table)
