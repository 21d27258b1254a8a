"""The coordinator's Prometheus series (lmps_coordinator_*), read at scrape time.

A custom collector over what the coordinator already keeps: the member registry (who is
alive), the jobs (step = parameter version, epoch, last eval loss, the running epoch's
leases) and the placement's tallies (failovers, restores). Nothing here is updated on the
training path, and nothing is registered at import: `lmps serve coordinator` registers one
`CoordinatorCollector` on its process registry. Catalogue: docs/metrics.md.

Per-job series carry `job_id` (not `job`: Prometheus sets `job` to the scrape job) and are
exported for the latest job and any job running an epoch, so a dashboard follows the
current run and a finished run's series go stale instead of piling up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmps.core.settings import JobState
from lmps.services.coordinator.registry import Registry, Role

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from lmps.services.coordinator.driver import Driver
    from lmps.services.coordinator.jobs import Job


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    """Every family this collector exports, empty: one table for collect and describe."""
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    return {
        "members": gauge(
            "lmps_coordinator_members_alive",
            "Members heartbeating within the expiry, by role (ps | worker)",
            labels=["role"],
        ),
        "step": gauge(
            "lmps_coordinator_step",
            "Global step of the job: its parameter version (optimizer steps applied)",
            labels=["job_id"],
        ),
        "total_steps": gauge(
            "lmps_coordinator_total_steps",
            "Steps the job is planned to run (the length of its learning-rate schedule)",
            labels=["job_id"],
        ),
        "epoch": gauge(
            "lmps_coordinator_epoch",
            "Epoch of the job (0-based): the one running, else the next to run",
            labels=["job_id"],
        ),
        "running": gauge(
            "lmps_coordinator_epoch_running",
            "1 while the job runs an epoch, else 0",
            labels=["job_id"],
        ),
        "state": gauge(
            "lmps_coordinator_job_state",
            "1 for the state the job is in, 0 for the others: ready (epochs to run), "
            "running, completed (every epoch of its spec done), failed",
            labels=["job_id", "state"],
        ),
        "eval_loss": gauge(
            "lmps_coordinator_eval_loss",
            "Mean eval loss (nats per token) at the end of the job's last epoch; absent "
            "before the first",
            labels=["job_id"],
        ),
        "leases": gauge(
            "lmps_coordinator_leases_outstanding",
            "Data leases handed to workers and not yet completed in the running epoch",
            labels=["job_id"],
        ),
        "training": gauge(
            "lmps_coordinator_epoch_workers",
            "Workers in the running epoch's barrier (still training)",
            labels=["job_id"],
        ),
        "failovers": counter(
            "lmps_coordinator_failovers",
            "Times backups took over the shards of lost parameter servers (replication 2)",
        ),
        "servers_lost": counter(
            "lmps_coordinator_servers_lost",
            "Parameter servers dropped by failovers",
        ),
        "replicas_restored": counter(
            "lmps_coordinator_replicas_restored",
            "Shard copies re-created after failovers, so that the next server loss is "
            "survived too (replication 2)",
        ),
        "unreplicated": gauge(
            "lmps_coordinator_shards_unreplicated",
            "Shards of a replication-2 job held by one server only (a failover left one "
            "server): the next loss of it rolls back to a checkpoint",
            labels=["job_id"],
        ),
        "restores": counter(
            "lmps_coordinator_restores",
            "Times a job's servers were loaded from its latest checkpoint (an epoch rolled "
            "back after losing a server without a backup, a restarted coordinator's job, or a "
            "job another one had replaced on the servers)",
        ),
    }


class CoordinatorCollector(Collector):
    """lmps_coordinator_* over `members` and `driver`, computed when scraped."""

    def __init__(self, members: Registry, driver: Driver) -> None:
        self.members = members
        self.driver = driver

    def describe(self) -> Iterator[Metric]:
        return iter(_families().values())

    def _shown(self) -> list[Job]:
        jobs = list(self.driver.jobs.values())  # a copy: submit may add one meanwhile
        return [j for j in jobs if j.job_id == self.driver.latest or j.state == JobState.RUNNING]

    def collect(self) -> Iterator[Metric]:
        f = _families()
        for role in Role:
            f["members"].add_metric([role.value], len(self.members.alive(role)))
        for job in self._shown():
            jid = [job.job_id]
            desk = job.epoch  # the running epoch's leases, None between epochs
            running = job.state == JobState.RUNNING
            f["step"].add_metric(jid, job.step)
            f["total_steps"].add_metric(jid, job.settings.optimizer.total_steps)
            f["epoch"].add_metric(jid, desk.epoch if running and desk else job.epochs_done)
            f["running"].add_metric(jid, 1 if running else 0)
            # One series per state (a Prometheus state set): alerts and panels select
            # `state="failed"` without knowing an enum's numbers.
            for state in JobState:
                f["state"].add_metric([job.job_id, state.value.lower()], int(job.state == state))
            if not math.isnan(job.last_eval_loss):
                f["eval_loss"].add_metric(jid, job.last_eval_loss)
            f["leases"].add_metric(jid, len(desk.book.outstanding) if desk else 0)
            f["training"].add_metric(jid, len(desk.active) if desk else 0)
            if job.settings.replication > 1:
                single = sum(1 for s in list(job.shards) if not s.backup_server_id)
                f["unreplicated"].add_metric(jid, single)
        placement = self.driver.placement
        f["failovers"].add_metric([], placement.failovers)
        f["servers_lost"].add_metric([], placement.servers_lost)
        f["replicas_restored"].add_metric([], placement.replicas_restored)
        f["restores"].add_metric([], placement.restores)
        return iter(f.values())
