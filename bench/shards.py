"""`shards`: how the largest shard size (`shard_bytes`) changes pull+push throughput.

Two real parameter-server processes hold a model-sized parameter set (the `mini` preset's
shapes, 4.3M parameters / 17 MB; in the full run also `small`, 13.9M / 56 MB), planned by
`plan_shards` at each candidate size and loaded through the ParameterService stub. One worker
(this process, through `ServerPool`) then runs rounds of pull-all + push-all; each push is a
real SGD step. A round moves the model's fp32 bytes twice (down and up), so
MB/s = 2 * model bytes / round time.

Sizes are visited round-robin within each repeat, in a rotated order, so slow moments of a
shared machine spread over all of them. Within a repeat, each size's round time is divided by
the fastest size's in that same repeat (sizes a few seconds apart see about the same load);
a size's score is the median of those ratios over the repeats, then the geometric mean over
the models (1.0 = fastest every time). The recommendation keeps the current default when its
score is within `TIE` of the top score, and otherwise names the top one: on a machine this
noisy, changing the default needs a margin larger than the repeat-to-repeat wobble.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from bench.common import Context, environment, human_bytes, mb_per_s, median, spread, write_result
from bench.ps import Loaded, ModelParams, PSRig, Round, model_params, shared_rig
from lmps.core.partition import DEFAULT_SHARD_BYTES

NAME = "shards"
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
TIE = 0.05
"""A size scoring within 5% of the top is not measurably worse on this machine."""


def _measure(
    rig: PSRig, params: ModelParams, repeats: int, rounds: int, ctx: Context
) -> dict[int, dict[str, Any]]:
    samples: dict[int, list[list[Round]]] = {s: [] for s in SIZES}
    plans: dict[int, Loaded] = {}
    for rep in range(repeats):
        order = SIZES[rep % len(SIZES) :] + SIZES[: rep % len(SIZES)]
        for shard_bytes in order:
            job = rig.load(params, shard_bytes)
            pool = rig.pool(job)
            try:
                rig.rounds(pool, job, 1)  # warm-up: connections, server allocations
                samples[shard_bytes].append(rig.rounds(pool, job, rounds))
            finally:
                pool.close()
            plans[shard_bytes] = job
        ctx.console.log(f"shards {params.name}: repeat {rep + 1}/{repeats} done")

    out: dict[int, dict[str, Any]] = {}
    for shard_bytes, reps in samples.items():
        flat = [r for rep in reps for r in rep]
        job = plans[shard_bytes]
        per_rep = [median([r.total_s for r in rep]) for rep in reps]
        out[shard_bytes] = {
            "shards": len(job.shards),
            "largest_shard_bytes": max(s.numel for s in job.shards) * 4,
            "server_imbalance": job.imbalance(),
            "round_s": median([r.total_s for r in flat]),
            "pull_s": median([r.pull_s for r in flat]),
            "push_s": median([r.push_s for r in flat]),
            "round_mb_s": mb_per_s(2 * params.nbytes, median([r.total_s for r in flat])),
            "pull_mb_s": mb_per_s(params.nbytes, median([r.pull_s for r in flat])),
            "push_mb_s": mb_per_s(params.nbytes, median([r.push_s for r in flat])),
            "repeat_spread": spread(per_rep),
            "rounds_s": [[r.total_s for r in rep] for rep in reps],
        }
    # Throughput relative to the fastest size of the same repeat, then the median over repeats.
    for rep in range(repeats):
        times = {s: median([r.total_s for r in samples[s][rep]]) for s in SIZES}
        fastest = min(times.values())
        for s in SIZES:
            out[s].setdefault("relative_each_repeat", []).append(fastest / times[s])
    for v in out.values():
        v["relative"] = median(v["relative_each_repeat"])
    return out


def recommend(by_model: dict[str, dict[int, dict[str, Any]]]) -> tuple[int, int, dict[int, float]]:
    """(recommended size, top-scoring size, score per size); the rule is in the docstring."""
    scores = {
        s: math.exp(sum(math.log(m[s]["relative"]) for m in by_model.values()) / len(by_model))
        for s in SIZES
    }
    top = max(SIZES, key=lambda s: scores[s])
    keep = scores.get(DEFAULT_SHARD_BYTES, 0.0) >= scores[top] * (1 - TIE)
    return (DEFAULT_SHARD_BYTES if keep else top), top, scores


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    models = ["mini"] if ctx.quick else ["mini", "small"]
    repeats = 2 if ctx.quick else 3
    rounds = {"mini": 3 if ctx.quick else 6, "small": 3}
    by_model: dict[str, dict[int, dict[str, Any]]] = {}
    meta: dict[str, dict[str, int]] = {}
    rig = shared_rig(ctx)
    for name in models:
        params = model_params(name)
        meta[name] = {"parameters": params.numel, "bytes": params.nbytes}
        rig.load(params, DEFAULT_SHARD_BYTES)  # warm-up: the first Load is slow
        by_model[name] = _measure(rig, params, repeats, rounds[name], ctx)
    chosen, top, scores = recommend(by_model)
    for name, rows in by_model.items():
        _print(ctx, name, meta[name], rows)
    ctx.console.print(
        "score (throughput / fastest size of the same repeat; median over repeats, geometric "
        "mean over "
        + ", ".join(models)
        + "): "
        + ", ".join(f"{human_bytes(s)} {scores[s]:.2f}" for s in SIZES)
    )
    ctx.console.print(
        f"[bold]recommended shard_bytes: {human_bytes(chosen)} ({chosen})[/] "
        f"(top score: {human_bytes(top)}; current DEFAULT_SHARD_BYTES: "
        f"{human_bytes(DEFAULT_SHARD_BYTES)}, kept when within {TIE:.0%} of the top score)"
    )
    if ctx.quick:
        ctx.console.print(
            "[yellow]--quick: one model and 2 repeats are too few to choose a default on a "
            "noisy machine; take the recommendation from a full run[/]"
        )
    payload = {
        "environment": started,
        "params": {
            "servers": 2,
            "sizes": SIZES,
            "models": meta,
            "repeats": repeats,
            "rounds_per_repeat": {m: rounds[m] for m in models},
            "optimizer": "SGD lr 1e-4 (applied on the servers at every push)",
        },
        "unit": "MB/s = 10^6 bytes; a round moves 2 x model fp32 bytes (pull + push)",
        "models": {m: {str(s): v for s, v in rows.items()} for m, rows in by_model.items()},
        "scores": {str(s): v for s, v in scores.items()},
        "recommended_shard_bytes": chosen,
        "top_scoring_shard_bytes": top,
        "current_default_shard_bytes": DEFAULT_SHARD_BYTES,
        "rule": f"keep the current default if its score is within {TIE:.0%} of the top score, "
        "else the top-scoring size",
    }
    path = write_result(ctx, NAME, payload)
    ctx.console.print(f"wrote {path}")
    return payload


def _print(ctx: Context, name: str, meta: dict[str, int], rows: dict[int, dict[str, Any]]) -> None:
    table = Table(
        title=f"shards: {name} ({meta['parameters'] / 1e6:.1f}M params, "
        f"{meta['bytes'] / 1e6:.0f} MB fp32), 2 servers, pull+push per round (median)"
    )
    for col in (
        "shard_bytes",
        "shards",
        "imbalance",
        "round ms",
        "pull MB/s",
        "push MB/s",
        "round MB/s",
        "vs fastest",
        "spread",
    ):
        table.add_column(col, justify="right")
    for size, r in rows.items():
        table.add_row(
            human_bytes(size) + (" *" if size == DEFAULT_SHARD_BYTES else ""),
            str(r["shards"]),
            f"{r['server_imbalance']:.3f}",
            f"{r['round_s'] * 1e3:.0f}",
            f"{r['pull_mb_s']:.0f}",
            f"{r['push_mb_s']:.0f}",
            f"{r['round_mb_s']:.0f}",
            f"{r['relative']:.2f}",
            f"{r['repeat_spread']:.0%}",
        )
    table.caption = (
        "* current default. imbalance = bytes on the fullest server / mean. vs fastest = "
        "median over repeats of (fastest size's round time / this size's) in the same repeat. "
        "spread = (max - min) / median of the per-repeat round times"
    )
    ctx.console.print(table)
