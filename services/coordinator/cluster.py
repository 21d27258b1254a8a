"""Who is in the cluster now: the registry's heartbeats checked against health probes.

A heartbeat can be seconds old, so "alive" for anything that is about to be called means
registered, heartbeating and answering grpc.health.v1 now. A parameter server counts as the
one a job was loaded onto only while its incarnation is unchanged: a restarted server lost
its shards (TF2 ParameterServerStrategy's coordinator treats that as a lost PS; here the
epoch fails over or rolls back, see epoch.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from lmps.core.errors import Unavailable
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job
from lmps.services.coordinator.registry import MemberRecord, Registry, Role

log = logging.getLogger("lmps.coordinator")
_NAMES = {
    Role.PS: ("parameter servers", "lmps serve ps"),
    Role.WORKER: ("workers", "lmps serve worker"),
}


class Cluster:
    def __init__(self, *, registry: Registry, fleet: Fleet) -> None:
        self.registry = registry
        self.fleet = fleet

    def heartbeating(self, role: Role) -> list[MemberRecord]:
        """Members of `role` whose heartbeats are fresh (no probe), sorted by id."""
        return self.registry.alive(role)

    def is_alive(self, member_id: str) -> bool:
        return self.registry.is_alive(member_id)

    def reachable(self, role: Role, limit: int = 0) -> dict[str, str]:
        """id -> address of the members of `role` heartbeating and answering now, sorted by
        id; the first `limit` of them (0 = all)."""
        alive = [
            (r.id, r.address) for r in self.registry.alive(role) if self.fleet.reachable(r.address)
        ]
        return dict(alive[:limit] if limit else alive)

    def wait_members(self, role: Role, want: int, wait_s: float) -> dict[str, str]:
        """`want` reachable members of `role` (0 = all, at least one), sorted by id. A dead
        member heartbeats no more, but stays in the registry until its heartbeats expire."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = self.reachable(role)
            if (want and len(alive) >= want) or (not want and alive):
                return dict(list(alive.items())[:want]) if want else alive
            if time.monotonic() >= deadline:
                name, cmd = _NAMES[role]
                raise Unavailable(
                    f"need {want or 1} {name}, {len(alive)} registered after {wait_s:.0f}s; "
                    f"start more with `{cmd} --coordinator <this address>`"
                )
            time.sleep(0.2)

    def wait_back(self, role: Role, want: int, wait_s: float, gone: Callable[[], bool]) -> None:
        """Until `want` members of `role` are reachable (after a loss: maybe new ones);
        Unavailable when `gone()` (the client left) or after `wait_s`."""
        if self.wait_for(role, want, wait_s, gone) < want:
            raise Unavailable(f"{_NAMES[role][0]} did not come back in {wait_s:.0f}s")

    def wait_for(self, role: Role, want: int, wait_s: float, gone: Callable[[], bool]) -> int:
        """How many members of `role` are reachable once `want` are or `wait_s` has passed;
        Unavailable when `gone()` (the client left) first."""
        deadline = time.monotonic() + wait_s
        while (here := len(self.reachable(role))) < want:
            if gone():
                raise Unavailable(f"client went away while waiting for {_NAMES[role][0]}")
            if time.monotonic() > deadline:
                return here
            time.sleep(0.5)
        return here

    def wait_rejoin(self, job: Job, gone: Callable[[], bool]) -> None:
        """After a restore (a coordinator restart, a rollback) the workers re-register in any
        order. Wait, up to the job's `wait_for_members_s`, for as many as the checkpointed run
        had (`job.rejoin`; `num_workers` where the spec names one): the worker count W the
        epoch plans with fixes the steps' composition (data shard j -> worker j mod W), and a
        late worker would instead join the running epoch and rebalance it. Past the wait the
        epoch goes on with the workers there, and says so in the log."""
        want = job.settings.num_workers or job.rejoin
        if not job.rejoin:
            return  # not restored, or a checkpoint from before the manifest kept a count
        wait_s = job.settings.wait_for_members_s
        here = len(self.reachable(Role.WORKER))
        if here < want:  # said, so that a pause before the epoch starts has a reason
            log.info(
                "job %s: waiting up to %.0fs for %d workers, %d back",
                job.job_id,
                wait_s,
                want,
                here,
            )
            here = self.wait_for(Role.WORKER, want, wait_s, gone)
        job.rejoin = 0  # once per restore: later epochs take the workers there (0 = all)
        if here < want:
            log.warning(
                "job %s: %d of %d workers back after %.0fs; the epoch goes on with them "
                "(another worker count: another composition of the steps)",
                job.job_id,
                here,
                want,
                wait_s,
            )

    def incarnations(self, ids: Iterable[str]) -> dict[str, str]:
        out = {}
        for member_id in ids:
            rec = self.registry.find(member_id)
            out[member_id] = rec.incarnation if rec else ""
        return out

    def lost_servers(self, job: Job, probe: bool = True) -> set[str]:
        """Servers of the job that are dead, restarted (state gone) or, with `probe`,
        not answering a health check now."""
        lost = set()
        for server_id, incarnation in job.server_epochs.items():
            rec = self.registry.find(server_id)
            if (
                rec is None
                or not self.registry.is_alive(server_id)
                or rec.incarnation != incarnation
                or (probe and not self.fleet.reachable(job.servers[server_id]))
            ):
                lost.add(server_id)
        return lost

    def servers_intact(self, job: Job, probe: bool = True) -> bool:
        """Every server of the job alive and still the process we loaded."""
        return not self.lost_servers(job, probe)
