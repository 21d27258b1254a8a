"""Where a job's parameters live: deploy, fail over, checkpoint, restore, evaluate.

Deploy partitions the full tensors over the servers at hand in ~MB parts balanced across
them (BytePS, OSDI'20; ps-lite's key-range slicer: `lmps.core.partition.plan_shards`), loads
them and configures the workers. Checkpoints store whole tensors, so a restore re-shards
onto however many servers are there now (see checkpoint.py).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from pathlib import Path

import grpc
import torch

from lmps.core.errors import FailedPrecondition, InvalidArgument, LmpsError, Unavailable
from lmps.core.model import decay_mask
from lmps.core.partition import ParamInfo, assemble, plan_shards, promote
from lmps.services.coordinator import checkpoint, jobs
from lmps.services.coordinator.cluster import Cluster
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job, Resume
from lmps.services.coordinator.registry import Role

log = logging.getLogger("lmps.coordinator")


class Placement:
    def __init__(self, *, cluster: Cluster, fleet: Fleet, jobs_dir: Path | None) -> None:
        """`jobs_dir`: where jobs and their checkpoints live; None keeps no checkpoints."""
        self.cluster = cluster
        self.fleet = fleet
        self.jobs_dir = jobs_dir
        self._checkpoint_lock = threading.Lock()  # one writer at a time, versions never go back
        # Since this process started (lmps_coordinator_*_total, services/coordinator/metrics.py).
        self.failovers = self.servers_lost = self.restores = 0

    def deploy(
        self,
        job: Job,
        params: Mapping[str, torch.Tensor],
        state: Mapping[str, Mapping[str, torch.Tensor]],
        version: int,
        wait_s: float,
    ) -> None:
        """Partition `params` (full tensors) over the servers at hand and load them, then
        configure the workers. Used for new jobs and for restores (re-sharding)."""
        s = job.settings
        servers = self.cluster.wait_members(Role.PS, s.num_servers, wait_s)
        workers = self.cluster.wait_members(Role.WORKER, s.num_workers, wait_s)
        infos = [ParamInfo(n, tuple(t.shape), decay_mask(n, t)) for n, t in params.items()]
        if s.replication > len(servers):
            raise Unavailable(
                f"replication {s.replication} needs {s.replication} parameter servers"
            )
        try:
            shards = plan_shards(infos, sorted(servers), s.shard_bytes, s.replication)
        except ValueError as err:
            raise InvalidArgument(f"job spec: {err}") from None
        values, states = checkpoint.scatter_state(shards, params, state)
        self.fleet.load(
            job.job_id,
            s,
            shards,
            servers,
            sorted(workers),
            version,
            values,
            states if state else None,
        )
        self.fleet.configure(job.job_id, s, shards, servers, workers)
        job.shards, job.servers, job.workers = shards, servers, workers
        job.server_epochs = self.cluster.incarnations(servers)
        job.step = version

    def configure(self, job: Job, workers: Mapping[str, str], timeout_s: float = 300.0) -> None:
        """Tell `workers` the job's settings and shard map (a newcomer, or after a failover)."""
        self.fleet.configure(
            job.job_id, job.settings, job.shards, job.servers, workers, timeout_s=timeout_s
        )

    def refresh_workers(self, job: Job, epoch_no: int) -> None:
        """Use the workers alive now (heartbeating and answering): configure newcomers,
        forget the dead. A worker killed a moment ago still looks alive in the registry."""
        s = job.settings
        alive = self.cluster.reachable(Role.WORKER, limit=s.num_workers)
        if not alive:
            alive = self.cluster.wait_members(Role.WORKER, s.num_workers, s.wait_for_members_s)
        for wid, address in sorted(alive.items()):
            if job.workers.get(wid) == address:
                continue
            try:
                self.configure(job, {wid: address}, timeout_s=60.0)
            except grpc.RpcError as err:
                log.warning("epoch %d: worker %s left out: %s", epoch_no, wid, err)
                del alive[wid]
        if not alive:
            raise Unavailable("no worker could be configured for the epoch")
        job.workers = alive

    def failover(self, job: Job, epoch_no: int) -> list[str]:
        """Replication 2: drop the lost servers and promote backups, keeping the version;
        the epoch resumes from what that version holds. Returns the servers dropped; none
        when that is impossible (no replicas, a shard with no copy left, or the survivors
        disagree on the version) and the epoch must roll back to a checkpoint instead."""
        if job.settings.replication < 2:
            return []
        dead = self.cluster.lost_servers(job)
        if not dead:
            return []
        try:
            shards = promote(job.shards, dead)
            survivors = {s: a for s, a in job.servers.items() if s not in dead}
            version = self.fleet.version(job.job_id, survivors)
            progress = job.epoch.progress(below_step=version) if job.epoch else {}
            heartbeating = self.cluster.heartbeating(Role.WORKER)
            limit = job.settings.num_workers
            workers = {r.id: r.address for r in (heartbeating[:limit] if limit else heartbeating)}
            self.fleet.configure(job.job_id, job.settings, shards, survivors, workers)
        except (ValueError, grpc.RpcError, LmpsError) as err:
            log.warning("failover impossible: %s", err)
            return []
        with job.lock:
            job.shards, job.servers, job.workers = shards, survivors, workers
            job.server_epochs = {s: i for s, i in job.server_epochs.items() if s not in dead}
            job.resume = Resume(epoch_no, progress)
            job.step = version
        self.failovers, self.servers_lost = self.failovers + 1, self.servers_lost + len(dead)
        return sorted(dead)

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(
        self,
        job: Job,
        version: int,
        epoch: int | None,
        done: Mapping[int, int],
        redone: int = 0,
    ) -> Path | None:
        """Write a consistent checkpoint of `version` (fetched from every server); `epoch`,
        `done` and `redone` say where in an epoch it is (see `jobs.Resume`)."""
        if self.jobs_dir is None:
            return None
        with self._checkpoint_lock:
            return self._checkpoint(self.jobs_dir, job, version, epoch, done, redone)

    def _checkpoint(
        self,
        root: Path,
        job: Job,
        version: int,
        epoch: int | None,
        done: Mapping[int, int],
        redone: int,
    ) -> Path:
        latest = checkpoint.latest(root, job.job_id)
        if latest is not None and checkpoint.version_of(latest) > version:
            raise FailedPrecondition(f"checkpoint {version} is older than {latest.name}")
        values, states = self.fleet.snapshot(job.job_id, job.servers, version, timeout_s=120.0)
        params = assemble(job.shards, values)
        state = checkpoint.gather_state(job.shards, states) if states else {}
        manifest = {
            "epochs_done": job.epochs_done,
            "epoch": epoch,
            "done": {str(k): v for k, v in done.items()},
            "redone": redone,
            "last_eval_loss": None if math.isnan(job.last_eval_loss) else job.last_eval_loss,
            "servers": sorted(job.servers),
            "shard_bytes": job.settings.shard_bytes,
        }
        path = checkpoint.write(root, job.job_id, version, params, state, manifest)
        checkpoint.prune(root, job.job_id, job.settings.keep_checkpoints)
        log.info("checkpoint %s", path)
        return path

    def checkpoint_async(
        self, job: Job, version: int, epoch: int, done: Mapping[int, int], redone: int = 0
    ) -> threading.Thread:
        """`checkpoint` in a thread of its own (mid-epoch: training goes on meanwhile)."""

        def write() -> None:
            try:
                self.checkpoint(job, version, epoch=epoch, done=done, redone=redone)
            except Exception as err:  # a missed checkpoint is not fatal: the next one may do
                log.warning("checkpoint at version %d failed: %s", version, err)

        t = threading.Thread(target=write, name=f"checkpoint-{version}", daemon=True)
        t.start()
        return t

    def restore(self, job: Job, wait_s: float = 300.0) -> int:
        """Load the latest checkpoint into the servers at hand. Returns its version."""
        if self.jobs_dir is None:
            raise FailedPrecondition("no --state-dir: this coordinator keeps no checkpoints")
        path = checkpoint.latest(self.jobs_dir, job.job_id)
        if path is None:
            raise FailedPrecondition(f"job {job.job_id} has no checkpoint to restore")
        ckpt = checkpoint.read(path)
        self.deploy(job, ckpt.params, ckpt.state, ckpt.version, wait_s)
        jobs.apply_manifest(job, ckpt.manifest)
        job.needs_restore = False
        self.restores += 1
        log.info("job %s restored from %s onto %s", job.job_id, path, sorted(job.servers))
        return ckpt.version

    def ensure_loaded(self, job: Job) -> None:
        with job.lock:
            if job.needs_restore:
                self.restore(job, wait_s=job.settings.wait_for_members_s)

    def evaluate(self, job: Job) -> tuple[float, int, int]:
        """(mean loss, tokens, version) on the eval split, spread over the workers."""
        self.ensure_loaded(job)
        if job.eval.shape[0] == 0:
            return math.nan, 0, job.step
        alive = {w: a for w, a in job.workers.items() if self.cluster.is_alive(w)}
        loss_sum, count, version = self.fleet.evaluate(
            job.job_id, alive or job.workers, job.eval, job.step
        )
        return loss_sum / max(count, 1), count, version
