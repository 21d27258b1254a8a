"""`slowlink`: lmps against DDP where the network is the bottleneck.

Every worker sits in a network namespace of its own behind a veth pair shaped with `tc tbf`
on both ends (default 100 Mbit/s each way, `LMPS_BENCH_SLOWLINK_MBIT`); the pairs meet on a
bridge in a namespace of its own, where the coordinator and the parameter servers (here,
in the root namespace) join through one more, unshaped, veth (`topology`). On that network
every contender (`contenders.lineup`: DDP over gloo with one rank per namespace, lmps SYNC
with 2 servers and one worker per namespace, and the DiLoCo local-steps rows once
`lmps.v1.LocalSteps` exists) trains the same `SlowJob`: the `mini` preset, seed, global
batch, rows and token budget, with an eval after every epoch. Reported per contender: wall
time, tokens, final eval loss, bytes on the worker links (their counters, read through a
holder process in the bridge's namespace) per token, and when the eval curve first reaches
the loss SYNC ends with; loss-vs-time and loss-vs-bytes figures go next to the JSON.

The modules: `topology` (namespaces, bridge, tbf, counters), `job`, `ddp` (the child,
`python -m bench.slowlink.ddp`), `lmps_run`, `outcome`, `contenders`, `report`, `figures`,
`suite`. Needs root and iproute2; skips with the reason otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.common import Context


def run(ctx: Context) -> dict[str, Any]:
    # Imported here: the DDP children import this package too and need only torch.
    from bench.slowlink.suite import run as run_suite

    return run_suite(ctx)
