"""`slowlink`: the plans, one run of every contender on a fresh shaped network, the result."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import Context, environment, write_result
from bench.slowlink.contenders import LAUNCHERS, SYNC, RunArgs, lineup
from bench.slowlink.figures import draw
from bench.slowlink.job import SlowJob, model_bytes
from bench.slowlink.outcome import Outcome
from bench.slowlink.report import print_table, summarize
from bench.slowlink.topology import (
    ByteSampler,
    Shaping,
    TopologyError,
    shaped_network,
    unavailable,
)
from lmps.core.data import prepare_corpus
from lmps.core.model import preset

NAME = "slowlink"
WORKERS = 2
SERVERS = 2
TIMEOUT_S = 3600.0
"""One contender's run; SYNC's full plan takes several minutes at 100 Mbit/s."""


@dataclass(frozen=True)
class Plan:
    preset: str
    global_batch: int
    steps_per_epoch: int
    epochs: int
    eval_windows: int


QUICK = Plan("mini", global_batch=4, steps_per_epoch=2, epochs=2, eval_windows=4)
# 32 steps per epoch: a whole round of the H=32 local-steps row fits in one.
FULL = Plan("mini", global_batch=8, steps_per_epoch=32, epochs=3, eval_windows=16)


def shaping_from_env() -> Shaping:
    """LMPS_BENCH_SLOWLINK_MBIT sets each worker link's rate (default 100 Mbit/s)."""
    return Shaping(rate_mbit=float(os.environ.get("LMPS_BENCH_SLOWLINK_MBIT", "") or 100))


def make_job(plan: Plan) -> SlowJob:
    # Prepared (and cached) here once, so the children only read the cache.
    vocab = prepare_corpus(
        "builtin:pydoc", preset(plan.preset).vocab_size, 0.05, Path(".cache/lmps")
    ).vocab_size
    return SlowJob(
        preset=plan.preset,
        vocab_size=vocab,
        global_batch=plan.global_batch,
        steps_per_epoch=plan.steps_per_epoch,
        epochs=plan.epochs,
        eval_windows=plan.eval_windows,
    )


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    shaping = shaping_from_env()
    plan = QUICK if ctx.quick else FULL
    reason = unavailable()
    if reason is None:
        try:
            return _run(ctx, started, shaping, plan)
        except TopologyError as err:
            reason = f"the kernel refused the shaped network: {err}"
    ctx.console.print(f"[yellow]slowlink skipped: {reason}[/]")
    payload = {"environment": started, "skipped": reason}
    write_result(ctx, NAME, payload)
    return payload


def _run(ctx: Context, started: dict[str, Any], shaping: Shaping, plan: Plan) -> dict[str, Any]:
    job = make_job(plan)
    contenders = lineup(job, WORKERS, SERVERS)
    only = os.environ.get("LMPS_BENCH_SLOWLINK_ONLY", "")
    if only:  # a subset (SYNC always: its loss is the target)
        keys = {*only.split(","), SYNC}
        contenders = [c for c in contenders if c.key in keys]
    args = RunArgs(
        servers=SERVERS,
        threads=max(1, (os.cpu_count() or 1) // WORKERS),
        log_dir=ctx.log_dir(NAME),
        timeout_s=TIMEOUT_S,
    )
    runs: dict[str, tuple[Outcome, ByteSampler]] = {}
    for c in contenders:
        # A fresh network per contender: counters from zero, no connection left over.
        with shaped_network(WORKERS, shaping) as topo, ByteSampler(topo) as sampler:
            out = LAUNCHERS[c.launcher](topo, job, c, args)
        runs[c.key] = (out, sampler)
        ctx.console.log(f"slowlink {c.key}: {out.wall_s:.0f} s, eval loss {out.evals[-1].loss:.3f}")
    summary = summarize(job, contenders, runs, shaping)
    print_table(ctx.console, summary, contenders, shaping, model_bytes(job))
    figures = draw(summary, ctx.out_dir, NAME)
    payload = {
        "environment": started,
        "params": {
            "workers": WORKERS,
            "servers": SERVERS,
            "plan": asdict(plan),
            "shaping": {**asdict(shaping), "burst_bytes": shaping.burst, "tbf": shaping.tbf()},
            "topology": "one namespace per worker; a veth to a bridge in a namespace of its "
            "own, tbf on both ends; coordinator + servers + client here behind an unshaped "
            "veth to the same bridge",
            "model_bytes_fp32": model_bytes(job),
            "data": "builtin:pydoc, lmps's per-epoch orders, batches_per_lease 1",
        },
        **summary,
        "figures": [str(p) for p in figures],
    }
    path = write_result(ctx, NAME, payload)
    ctx.console.print(f"wrote {path}; figures {', '.join(str(p) for p in figures)}")
    return payload
