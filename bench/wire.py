"""`wire`: the whole model's bytes moved by lmps, by bare gRPC, and by a raw TCP socket.

The `small` preset's fp32 parameters (13.9M, 56 MB) on 127.0.0.1, four ways, each a
process of its own session serving this one:

- `lmps-1ps`, `lmps-2ps`: `ServerPool.pull` and `.push` against 1 and 2 real parameter
  servers holding the model at the default shard size (1 MiB; the `shards` rig). Each push
  is a real SGD step on the servers, and the next pull waits for it, as in training.
- `grpc-bare`: `bench.wire_bare`, a generic-handler grpcio server streaming `bytes`
  messages with no serializer, one message per lmps shard of the 1-server plan (the same
  sizes: the same number of messages), on lmps's channel and server options.
- `tcp`: `bench.wire_tcp`, `sendall` / `recv_into` on one socket.

Rounds of pull then push; the contenders are visited round-robin in each repeat, in an
order rotated per repeat. GB/s = model bytes / time (10^9). Ratios are paired within a
repeat: lmps pull / bare pull, lmps push / bare push (lmps with 1 server, like for like),
bare / TCP in both directions, and 2 servers / 1.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.common import Context, environment, median, spread, write_result
from bench.ps import PSRig, Round, model_params, shared_rig
from bench.wire_bare import BareClient
from bench.wire_tcp import TcpClient
from lmps.client.launcher import free_port
from lmps.core.partition import DEFAULT_SHARD_BYTES
from lmps.services.worker.pool import ServerPool

NAME = "wire"
MODEL = "small"
RATIOS = {
    "lmps pull / bare pull": (("lmps-1ps", "pull"), ("grpc-bare", "pull")),
    "lmps push / bare push": (("lmps-1ps", "push"), ("grpc-bare", "push")),
    "bare pull / TCP pull": (("grpc-bare", "pull"), ("tcp", "pull")),
    "bare push / TCP push": (("grpc-bare", "push"), ("tcp", "push")),
    "lmps 2 servers / 1, pull": (("lmps-2ps", "pull"), ("lmps-1ps", "pull")),
    "lmps 2 servers / 1, push": (("lmps-2ps", "push"), ("lmps-1ps", "push")),
}
"""Name -> ((numerator, direction), (denominator, direction)), as throughput ratios."""


@contextmanager
def _server(name: str, module: str, args: list[str], log_dir: Path) -> Iterator[None]:
    """A bench server process in its own session (as lmps's servers are), stopped on exit."""
    with open(log_dir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _timed(pull: Callable[[], None], push: Callable[[], None]) -> Callable[[], Round]:
    def one() -> Round:
        t0 = time.perf_counter()
        pull()
        t1 = time.perf_counter()
        push()
        return Round(t1 - t0, time.perf_counter() - t1)

    return one


def _lmps(rig: PSRig, stack: ExitStack) -> tuple[Callable[[], Round], list[int]]:
    """One pull + push round against `rig`'s servers, and the plan's shard sizes."""
    params = model_params(MODEL)
    job = rig.load(params, DEFAULT_SHARD_BYTES)
    pool: ServerPool = rig.pool(job)
    stack.callback(pool.close)
    return (lambda: rig.rounds(pool, job, 1)[0]), [s.numel * 4 for s in job.shards]


def run(ctx: Context) -> dict[str, Any]:
    started = environment()
    repeats, rounds = (2, 2) if ctx.quick else (5, 3)
    nbytes = model_params(MODEL).nbytes
    log_dir = ctx.log_dir(NAME)
    samples: dict[str, list[list[Round]]] = {}
    with ExitStack() as stack:
        one_ps = stack.enter_context(PSRig(log_dir / "one_server", servers=1))
        contenders: dict[str, Callable[[], Round]] = {}
        contenders["lmps-1ps"], sizes = _lmps(one_ps, stack)
        contenders["lmps-2ps"], _ = _lmps(shared_rig(ctx), stack)
        grpc_port, tcp_port = free_port(), free_port()
        sizes_arg = ",".join(map(str, sizes))
        stack.enter_context(
            _server(
                "grpc-bare",
                "bench.wire_bare",
                ["--port", str(grpc_port), "--sizes", sizes_arg],
                log_dir,
            )
        )
        stack.enter_context(
            _server(
                "tcp", "bench.wire_tcp", ["--port", str(tcp_port), "--nbytes", str(nbytes)], log_dir
            )
        )
        bare = BareClient(f"127.0.0.1:{grpc_port}", sizes)
        stack.callback(bare.close)
        tcp = TcpClient(tcp_port, nbytes)
        stack.callback(tcp.close)
        contenders["grpc-bare"] = _timed(bare.pull, bare.push)
        contenders["tcp"] = _timed(tcp.pull, tcp.push)

        names = list(contenders)
        for name in names:
            contenders[name]()  # warm-up: connections, allocations, the first Load's pages
            samples[name] = []
        for rep in range(repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append([contenders[name]() for _ in range(rounds)])
            ctx.console.log(f"wire: repeat {rep + 1}/{repeats} done")

    result = _summarize(samples, nbytes)
    result.update(
        environment=started,
        params={
            "model": MODEL,
            "bytes": nbytes,
            "messages_per_direction": len(sizes),
            "largest_message_bytes": max(sizes),
            "repeats": repeats,
            "rounds_per_repeat": rounds,
            "host": "127.0.0.1",
            "unit": "GB/s = 10^9 bytes of fp32 model per second",
        },
    )
    _print(ctx, result)
    path = write_result(ctx, NAME, result)
    ctx.console.print(f"wrote {path}")
    return result


def _per_repeat(reps: list[list[Round]], direction: str) -> list[float]:
    """Median seconds of `direction` in each repeat."""
    return [median([getattr(r, f"{direction}_s") for r in rep]) for rep in reps]


def _summarize(samples: dict[str, list[list[Round]]], nbytes: int) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for name, reps in samples.items():
        row: dict[str, Any] = {}
        for d in ("pull", "push"):
            per_rep = _per_repeat(reps, d)
            row[f"{d}_s"] = median(per_rep)
            row[f"{d}_gb_s"] = nbytes / median(per_rep) / 1e9
            row[f"{d}_spread"] = spread(per_rep)
        row["rounds"] = [[(r.pull_s, r.push_s) for r in rep] for rep in reps]
        rows[name] = row
    ratios = {}
    for label, ((a, da), (b, db)) in RATIOS.items():
        # Throughput ratio a / b = time b / time a, repeat by repeat.
        pairs = zip(_per_repeat(samples[a], da), _per_repeat(samples[b], db), strict=True)
        ratios[label] = median([tb / ta for ta, tb in pairs])
    return {"contenders": rows, "ratios": ratios}


def _print(ctx: Context, r: dict[str, Any]) -> None:
    p = r["params"]
    table = Table(
        title=f"wire: {p['model']} fp32 ({p['bytes'] / 1e6:.0f} MB, {p['messages_per_direction']} "
        f"messages <= 1 MiB) on 127.0.0.1, median of {p['repeats']} repeats"
    )
    for col in ("path", "pull GB/s", "spread", "push GB/s", "spread"):
        table.add_column(col, justify="left" if col == "path" else "right")
    labels = {
        "lmps-1ps": "lmps Pull / Push, 1 server",
        "lmps-2ps": "lmps Pull / Push, 2 servers",
        "grpc-bare": "bare grpcio bytes stream",
        "tcp": "raw TCP socket",
    }
    for name, row in r["contenders"].items():
        table.add_row(
            labels[name],
            f"{row['pull_gb_s']:.2f}",
            f"{row['pull_spread']:.0%}",
            f"{row['push_gb_s']:.2f}",
            f"{row['push_spread']:.0%}",
        )
    table.caption = "lmps push includes the servers' SGD step; bare and TCP only move bytes"
    ctx.console.print(table)
    ratios = Table(title="wire: ratios (throughput, paired within a repeat, median)")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    for name, value in r["ratios"].items():
        ratios.add_row(name, f"{value:.2f}")
    ctx.console.print(ratios)
