"""`peers`: lmps against the systems it could be replaced with, on one machine, one run.

Contenders (see `contenders.lineup`), each in processes of their own Unix sessions:
one torch process with 1 thread and with one per core; torch DDP over gloo with W ranks;
a torch.distributed.rpc parameter server (1 server + W trainers, synchronous); lmps SYNC
with W workers + P servers; and lmps with 1 worker + 1 server against the 1-thread process.
All train the same `PeerJob`: model preset and seed, global batch G per step (G/W per rank),
the same rows at each step, AdamW with the same settings. Each run reports tokens/s over a
timed window after warm-up steps, and tokens per CPU-second (user + system of every process
of the contender over that window). Every run is checked (`checks`) before its ratio counts.

The modules: `job` (what is trained, shared pieces), `single`, `ddp`, `rpc_ps` (child
entry points, `python -m bench.peers.<name>`), `lmps_sync` (a LocalCluster job driven from
here), `launch` (sessions, results, CPU), `contenders`, `checks`, `report`, `suite`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.common import Context


def run(ctx: Context) -> dict[str, Any]:
    # Imported here, not at the top: the child processes import this package too, and they
    # need torch, not rich, gRPC and the lmps client.
    from bench.peers.suite import run as run_suite

    return run_suite(ctx)
