"""Re-replication: after a failover, put back the second copy of every shard that lost one.

`partition.promote` leaves the shards of a lost server with one copy (the promoted backup,
or the owner whose backup was lost). Without a second copy the next loss of a server
holding one of them would roll the epoch back to a checkpoint. Here those shards get a new
backup (`partition.assign_backups`: least-held server first, owners never move) on the
survivors or on an idle server that joined, and each server receiving copies is loaded with
their values and optimizer state at the failover's version, copied from the survivors,
before the workers are told the new map. Chain replication in Parameter Server (Li et al.,
OSDI'14, section 4.3) re-creates a lost range's replicas the same way, from a live copy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from lmps.core.partition import Shard, assign_backups
from lmps.services.coordinator.cluster import Cluster
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.registry import Role

log = logging.getLogger("lmps.coordinator")


@dataclass(frozen=True)
class Copies:
    """The job's placement once the lost copies are re-created (or could not be)."""

    shards: list[Shard]
    """The shard map: promoted owners, with new backups where a server could take one."""
    servers: dict[str, str]
    """The job's servers: the survivors and any server that joined to hold copies."""
    joined: dict[str, str] = field(default_factory=dict)
    """Incarnation of every joined server that was loaded (`Job.server_epochs`)."""
    restored: int = 0
    """Shards whose second copy was re-created."""


def rereplicate(
    *,
    cluster: Cluster,
    fleet: Fleet,
    job: Job,
    shards: list[Shard],
    survivors: dict[str, str],
    lost: int,
    version: int,
    history: str,
    workers: Mapping[str, str],
) -> Copies:
    """Give the shards left with one copy a new backup, on the survivors or on up to `lost`
    idle servers that joined (a replacement, or a lost one restarted), and load every server
    that receives copies with all it now holds at `version` (values and optimizer state,
    copied from the survivors, and their step digest `history`).

    Consistent because training is paused: the caller runs this between the epoch's streams
    closing and the workers being configured with the new map, so no step is applied between
    the copy and the load (SYNC: a step needs every member's push, and no worker can pull the
    next version while the lost server is still in its map). Half-pushed steps held by the
    survivors but not by the loaded servers are dropped everywhere alike when the next attempt
    opens the barrier (`LeaseDesk.open`). A server that moved on anyway makes the snapshot, or
    the next attempt's version check, fail: the epoch then rolls back, as without replicas.

    With one server left there is nowhere for a second copy: logged, and the shards stay
    single (`lmps_coordinator_shards_unreplicated`); the epoch goes on and a further loss
    rolls back to a checkpoint."""
    single = [s.shard_id for s in shards if not s.backup_server_id]
    if not single:
        return Copies(shards, survivors)
    spares = _spares(cluster, fleet, survivors, lost)
    # Read before the load: a restart after it must count as a loss of what was loaded.
    incarnations = cluster.incarnations(spares)
    candidates = {**survivors, **spares}
    if len(candidates) < 2:
        log.warning(
            "job %s: %d shards keep a single copy: only %s is left and no idle parameter "
            "server joined; training goes on unreplicated, a further loss rolls back to a "
            "checkpoint",
            job.job_id,
            len(single),
            ", ".join(sorted(candidates)),
        )
        return Copies(shards, survivors)
    rebacked = assign_backups(shards, sorted(candidates))
    receivers = {
        new.backup_server_id: candidates[new.backup_server_id]
        for new, old in zip(rebacked, shards, strict=True)
        if new != old
    }
    # Every survivor streams what it holds at exactly `version`; `snapshot` refuses copies
    # made of different steps. Load replaces a receiver's job whole, so it gets the shards
    # it already held too (the same values: it stands at `version` like the others).
    values, states = fleet.snapshot(job.job_id, survivors, version, timeout_s=120.0)
    fleet.load(
        job.job_id,
        job.settings,
        rebacked,
        receivers,
        sorted(workers),
        version,
        values,
        states or None,  # none before the first step (or plain SGD): fresh state is the same
        history=history,
    )
    log.info(
        "job %s: second copies of %d shards re-created on %s at version %d",
        job.job_id,
        len(single),
        ", ".join(sorted(receivers)),
        version,
    )
    joined = {s: incarnations[s] for s in receivers if s in spares}
    return Copies(rebacked, {**survivors, **receivers}, joined, len(single))


def _spares(cluster: Cluster, fleet: Fleet, taken: Mapping[str, str], want: int) -> dict[str, str]:
    """Up to `want` parameter servers answering now, not in `taken`, that hold no job (one
    that does may serve another job: loading it would wipe that job's state)."""
    spares: dict[str, str] = {}
    for sid, address in cluster.reachable(Role.PS).items():
        if len(spares) >= want:
            break
        if sid in taken:
            continue
        try:
            if fleet.idle(address):
                spares[sid] = address
        except grpc.RpcError:
            continue  # gone again since the probe: no place for copies
    return spares
