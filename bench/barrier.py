"""`barrier`: a SYNC step's mean at the barrier, as built, against accumulating on arrival.

Issue 9 asked for each push to be accumulated into the pending sum as it arrives, so that
the barrier's critical path is one final scale and the optimizer step. This measures what
that would buy, in one process, on one server's shards of a 2-server plan (`ps-1`: the
server with the small shards too) for W = 2 workers of equal weight:

- `at barrier`: `SyncBarrier.push` as built. The first push is only kept (a view of the
  bytes received); the last one sums both in fp64 shard by shard, in sorted worker order, in
  a shard-sized scratch buffer that stays in cache, and divides.
- `on arrival`: the first push is added into a zeroed model-sized fp64 accumulator as it
  arrives (0 + w * g: exact in fp64 for an fp32 g); the last one adds its w * g,
  divides and rounds to fp32. With two contributions the result is bit for bit the
  barrier's whichever arrives first (fp addition commutes: a + b == b + a); with three or
  more, only a prefix in sorted order could be summed early.

Reported per step (median over repeats, CPU ms of this one thread): the work
at the first push, the work at the last push (the critical path: every pull of the next
version waits for it), their total, and the accumulator's memory. The two means are
compared bit for bit on every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from rich.table import Table

from bench.common import Context, environment, median, write_result
from lmps.core.model import GPT, preset
from lmps.core.partition import ParamInfo, Shard, plan_shards
from lmps.services.parameter_server.consistency import SyncBarrier

NAME = "barrier"
SERVER = "ps-1"
WEIGHTS = {"w0": 4.0, "w1": 4.0}


def server_shards(name: str) -> list[Shard]:
    """`SERVER`'s shards of the default 2-server plan of preset `name`."""
    with torch.device("meta"):
        model = GPT(preset(name))
    infos = [ParamInfo(n, tuple(p.shape), True) for n, p in model.named_parameters()]
    return [s for s in plan_shards(infos, ["ps-0", "ps-1"]) if s.server_id == SERVER]


class OnArrival:
    """The alternative: a model-sized fp64 accumulator, started by the first push."""

    def __init__(self, shards: list[Shard]) -> None:
        self.acc = {s.shard_id: torch.empty(s.numel, dtype=torch.float64) for s in shards}

    def first(self, grads: dict[str, torch.Tensor], weight: float) -> None:
        for sid, g in grads.items():
            # The barrier's own two passes: 0 + w * g (exact in fp64), where starting from
            # +0.0 maps a -0.0 gradient to +0.0 as the barrier does (w * g alone would not).
            self.acc[sid].zero_().add_(g, alpha=weight)

    def last(self, grads: dict[str, torch.Tensor], weight: float, total: float) -> dict[str, Any]:
        return {
            sid: self.acc[sid].add_(g, alpha=weight).div_(total).to(torch.float32)
            for sid, g in grads.items()
        }

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.acc.values())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (`torch.equal` alone takes -0.0 for +0.0)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _cpu_ms(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.process_time()
    out = fn(*args)
    return (time.process_time() - t0) * 1e3, out


def compare(name: str, repeats: int, steps: int) -> dict[str, Any]:
    """Both ways on preset `name`, `steps` steps per repeat; raises if the means differ."""
    shards = server_shards(name)
    numel = {s.shard_id: s.numel for s in shards}
    gen = torch.Generator().manual_seed(0)
    grads = {w: {s.shard_id: torch.randn(s.numel, generator=gen) for s in shards} for w in WEIGHTS}
    total = sum(WEIGHTS.values())
    barrier = SyncBarrier(job_id="bench", numel=numel, members=list(WEIGHTS))
    alt = OnArrival(shards)
    keys = ("built first", "built last", "alt first", "alt last")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeats):
        for _ in range(steps):
            step = barrier.version
            first, _ = _cpu_ms(barrier.push, "w0", step, WEIGHTS["w0"], grads["w0"])
            last, update = _cpu_ms(barrier.push, "w1", step, WEIGHTS["w1"], grads["w1"])
            a_first, _ = _cpu_ms(alt.first, grads["w0"], WEIGHTS["w0"])
            a_last, mean = _cpu_ms(alt.last, grads["w1"], WEIGHTS["w1"], total)
            if update is None or update.grads.keys() != mean.keys():
                raise RuntimeError("the barrier made no update, or another set of shards")
            if not all(_same_bits(update.grads[sid], m) for sid, m in mean.items()):
                raise RuntimeError("accumulating on arrival changed the mean's bits")
            for key, ms in zip(rows, (first, last, a_first, a_last), strict=True):
                rows[key].append(ms)
    med = {k: median(v) for k, v in rows.items()}
    return {
        "preset": name,
        "shards": len(shards),
        "params": sum(numel.values()),
        "same_bits": True,
        "ms": med,
        "critical_path_saved_ms": med["built last"] - med["alt last"],
        "extra_cpu_ms": med["alt first"] + med["alt last"] - med["built first"] - med["built last"],
        "accumulator_bytes": alt.nbytes,
        "samples_ms": rows,
    }


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    torch.set_num_threads(1)  # as the servers run their updates
    presets, repeats, steps = (["tiny"], 3, 5) if ctx.quick else (["mini", "small"], 5, 10)
    results = [compare(name, repeats, steps) for name in presets]
    table = Table(title=f"barrier: one SYNC step's mean on {SERVER}'s shards, W = 2 (CPU ms)")
    for col in ("preset", "at barrier: first / last push", "on arrival: first / last push"):
        table.add_column(col)
    for col in ("critical path saved", "extra CPU", "accumulator MiB"):
        table.add_column(col, justify="right")
    for r in results:
        ms = r["ms"]
        table.add_row(
            f"{r['preset']} ({r['shards']} shards)",
            f"{ms['built first']:.1f} / {ms['built last']:.1f}",
            f"{ms['alt first']:.1f} / {ms['alt last']:.1f}",
            f"{r['critical_path_saved_ms']:.1f}",
            f"{r['extra_cpu_ms']:+.1f}",
            f"{r['accumulator_bytes'] / (1 << 20):.0f}",
        )
    ctx.console.print(table)
    ctx.console.print("means bit for bit equal on every step: yes")
    result = {"environment": started, "server": SERVER, "weights": WEIGHTS, "results": results}
    ctx.console.log(f"wrote {write_result(ctx, NAME, result)}")
    return result
