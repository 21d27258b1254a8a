"""`peers`: the plans (presets, batch, steps, repeats), the interleaved runs, the result."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Context, environment, write_result
from bench.peers.contenders import Contender, Sample, lineup
from bench.peers.job import PeerJob, build_model, model_bytes
from bench.peers.report import print_tables, summarize
from lmps.core.data import prepare_corpus
from lmps.core.model import preset

NAME = "peers"


@dataclass(frozen=True)
class Plan:
    preset: str
    global_batch: int
    warmup_steps: int
    timed_steps: int
    repeats: int


QUICK = (Plan("mini", global_batch=4, warmup_steps=1, timed_steps=2, repeats=1),)
FULL = (
    # Two warm-up steps: DDP rebuilds its gradient buckets in its second iteration.
    Plan("mini", global_batch=8, warmup_steps=2, timed_steps=4, repeats=3),
    Plan("small", global_batch=8, warmup_steps=2, timed_steps=3, repeats=2),
)
LARGE = Plan("gpt2", global_batch=8, warmup_steps=2, timed_steps=3, repeats=2)
"""Added by `python -m bench --large`: GPT-2 small (124M) is for machines with cores and
memory to spare (each of up to 7 processes holds the model, its gradients and AdamW state)."""


def plans(quick: bool, large: bool = False) -> list[Plan]:
    return [*(QUICK if quick else FULL), *((LARGE,) if large else ())]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, "") or default)


def make_job(plan: Plan) -> PeerJob:
    # Prepared (and cached) here once, so the children only read the cache.
    vocab = prepare_corpus(
        "builtin:pydoc", preset(plan.preset).vocab_size, 0.05, Path(".cache/lmps")
    ).vocab_size
    return PeerJob(
        preset=plan.preset,
        vocab_size=vocab,
        global_batch=plan.global_batch,
        warmup_steps=plan.warmup_steps,
        timed_steps=plan.timed_steps,
    )


def interleave(
    ctx: Context, job: PeerJob, contenders: list[Contender], repeats: int
) -> dict[str, list[Sample]]:
    """Every contender once per repeat, in an order rotated by one each repeat, so a busy
    moment of the machine falls on different contenders each time."""
    samples: dict[str, list[Sample]] = {c.key: [] for c in contenders}
    log_dir = ctx.log_dir(NAME)
    for rep in range(repeats):
        k = rep % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            sample = c.run(job, log_dir)
            samples[c.key].append(sample)
            ctx.console.log(
                f"peers {job.preset} {rep + 1}/{repeats} {c.key}: "
                f"{sample.tokens_per_s:,.0f} tokens/s, {sample.tokens_per_cpu_s:,.0f} per CPU-s"
            )
    return samples


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    workers = _env_int("LMPS_BENCH_WORKERS", 2)
    servers = _env_int("LMPS_BENCH_SERVERS", 2)
    contenders = lineup(workers, servers)
    by_preset: dict[str, dict[str, Any]] = {}
    for plan in plans(ctx.quick, ctx.large):
        job = make_job(plan)
        samples = interleave(ctx, job, contenders, plan.repeats)
        by_preset[plan.preset] = summarize(
            job,
            contenders,
            samples,
            workers=workers,
            servers=servers,
            model_bytes=model_bytes(build_model(job)),
        )
        print_tables(ctx.console, by_preset[plan.preset])
    payload = {
        "environment": started,
        "params": {
            "workers": workers,
            "servers": servers,
            "cores": os.cpu_count(),
            "data": "builtin:pydoc, lmps's epoch-0 order; step s = rows [s*G, (s+1)*G)",
            "optimizer": "AdamW, constant lr (torch.optim.AdamW; lmps: on the servers)",
            "plans": [p.__dict__ for p in plans(ctx.quick, ctx.large)],
            "cpu": "user + system of every process of a contender over the timed window",
        },
        "presets": by_preset,
    }
    path = write_result(ctx, NAME, payload)
    ctx.console.print(f"wrote {path}")
    return payload
