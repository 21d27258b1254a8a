"""`wire_dtype`: pull+push rounds with 16-bit floats on the wire vs float32.

Same rig as `shards` (2 real parameter servers, one `ServerPool` worker, an SGD step per
push) at the default shard size. The pools differ only in `wire_dtype`: the servers cast
fp32 masters to it for Pull, the worker casts gradients to it for Push and the servers
accumulate them in fp32. Half the bytes travel; the casts cost CPU on both ends. Dtypes are
visited round-robin within each repeat on the same loaded job.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.table import Table

from bench.common import Context, environment, median, spread, write_result
from bench.ps import Round, model_params, shared_rig
from lmps.core.partition import DEFAULT_SHARD_BYTES

NAME = "wire_dtype"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    models = ["mini"] if ctx.quick else ["mini", "small"]
    repeats = 2 if ctx.quick else 3
    rounds = {"mini": 3 if ctx.quick else 5, "small": 3}
    dtypes = ["float32", "bfloat16"] if ctx.quick else list(DTYPES)
    out: dict[str, dict[str, Any]] = {}
    rig = shared_rig(ctx)
    for name in models:
        params = model_params(name)
        job = rig.load(params, DEFAULT_SHARD_BYTES)
        pools = {d: rig.pool(job, DTYPES[d]) for d in dtypes}
        samples: dict[str, list[list[Round]]] = {d: [] for d in dtypes}
        try:
            for rep in range(repeats):
                for d in dtypes[rep % len(dtypes) :] + dtypes[: rep % len(dtypes)]:
                    rig.rounds(pools[d], job, 1)  # warm-up
                    samples[d].append(rig.rounds(pools[d], job, rounds[name]))
        finally:
            for pool in pools.values():
                pool.close()
        ctx.console.log(f"wire_dtype {name} done")
        rows: dict[str, Any] = {}
        for d, reps in samples.items():
            flat = [r for rep in reps for r in rep]
            rows[d] = {
                "round_s": median([r.total_s for r in flat]),
                "pull_s": median([r.pull_s for r in flat]),
                "push_s": median([r.push_s for r in flat]),
                "repeat_spread": spread([median([r.total_s for r in rep]) for rep in reps]),
                "rounds_s": [[r.total_s for r in rep] for rep in reps],
            }
        for d in dtypes:
            rows[d]["speedup_vs_float32"] = rows["float32"]["round_s"] / rows[d]["round_s"]
        out[name] = {"parameters": params.numel, "bytes": params.nbytes, "dtypes": rows}
    _print(ctx, out)
    payload = {
        "environment": started,
        "params": {
            "servers": 2,
            "shard_bytes": DEFAULT_SHARD_BYTES,
            "dtypes": dtypes,
            "repeats": repeats,
            "rounds_per_repeat": {m: rounds[m] for m in models},
        },
        "unit": "seconds per round (pull all + push all); speedup = float32 time / this time",
        "models": out,
    }
    path = write_result(ctx, NAME, payload)
    ctx.console.print(f"wrote {path}")
    return payload


def _print(ctx: Context, out: dict[str, dict[str, Any]]) -> None:
    table = Table(title="wire_dtype: pull+push round per wire dtype, 2 servers (median)")
    for col in ("model", "wire dtype", "pull ms", "push ms", "round ms", "speedup", "spread"):
        table.add_column(col, justify="right")
    for name, m in out.items():
        for d, r in m["dtypes"].items():
            table.add_row(
                f"{name} ({m['bytes'] / 1e6:.0f} MB)",
                d,
                f"{r['pull_s'] * 1e3:.0f}",
                f"{r['push_s'] * 1e3:.0f}",
                f"{r['round_s'] * 1e3:.0f}",
                f"{r['speedup_vs_float32']:.2f}x",
                f"{r['repeat_spread']:.0%}",
            )
    table.caption = "speedup = float32 round time / this round time, same loaded job"
    ctx.console.print(table)
