"""Where a job's parameters live: deploy, fail over, checkpoint, restore, evaluate.

Deploy partitions the full tensors over the servers at hand in ~MB parts balanced across
them (BytePS, OSDI'20; ps-lite's key-range slicer: `lmps.core.partition.plan_shards`), loads
them and configures the workers. Checkpoints store whole tensors, so a restore re-shards
onto however many servers are there now (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc
import torch

from lmps.core import tasks
from lmps.core.errors import FailedPrecondition, InvalidArgument, LmpsError, Unavailable
from lmps.core.partition import ParamInfo, assemble, plan_shards, promote
from lmps.core.settings import JobState
from lmps.core.tasks import EvalCounts, Evaluation
from lmps.services.coordinator import checkpoint, jobs, replicas
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
        self.replicas_restored = 0  # shard copies re-created after failovers
        # Server id -> the job this coordinator last loaded there. A server holds one job, so
        # loading another one evicts it (see `_evict`).
        self.holders: dict[str, Job] = {}

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
        servers = self._servers_for(s.num_servers, s.replication, wait_s)
        workers = self.cluster.wait_members(Role.WORKER, s.num_workers, wait_s)
        decays = tasks.decay_rule(s.freeze_backbone)
        infos = [ParamInfo(n, tuple(t.shape), decays(n, t)) for n, t in params.items()]
        try:
            shards = plan_shards(
                infos,
                sorted(servers),
                s.shard_bytes,
                s.replication,
                fragments=s.local_steps.fragments if s.local_steps else 1,
            )
        except ValueError as err:
            raise InvalidArgument(f"job spec: {err}") from None
        values, states = checkpoint.scatter_state(shards, params, state)
        self._evict(job, servers)  # before the load: a failed one may have replaced them too
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

    def _servers_for(self, want: int, replication: int, wait_s: float) -> dict[str, str]:
        """`want` parameter servers (0 = every registered one), and at least `replication`:
        each copy of a shard lives on a different server (`JobSettings` refuses a `want`
        below it)."""
        if want or replication < 2:
            return self.cluster.wait_members(Role.PS, want, wait_s)
        with contextlib.suppress(Unavailable):  # told below, naming the replication
            self.cluster.wait_members(Role.PS, replication, wait_s)  # pods start in any order
        servers = self.cluster.reachable(Role.PS)  # all of them, as num_servers 0 asks
        if len(servers) < replication:
            raise Unavailable(
                f"replication {replication} needs {replication} parameter servers, "
                f"{len(servers)} registered after {wait_s:.0f}s; start another with "
                f"`lmps serve ps --coordinator <this address>`, or train with --replication 1"
            )
        return servers

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
        the epoch resumes from what that version holds. The copies lost with those servers
        are re-created first (`replicas.rereplicate`), so a further loss is survived too. Returns
        the servers dropped; none when that is impossible (no replicas, a shard with no copy
        left, the survivors disagree on the version, or re-creating a copy failed) and the
        epoch must roll back to a checkpoint instead."""
        if job.settings.replication < 2:
            return []
        dead = self.cluster.lost_servers(job)
        if not dead:
            return []
        try:
            shards = promote(job.shards, dead)
            survivors = {s: a for s, a in job.servers.items() if s not in dead}
            version, history = self.fleet.state(job.job_id, survivors)
            # SYNC: the steps below `version` are in the survivors, reported or not: a push
            # that reached them but failed on a lost server has no event, and training its
            # batch again would apply it twice. ASYNC: such pushes are only counted; their
            # batches are trained again (at least once: AsyncLeaseDesk).
            if job.epoch is not None and job.epoch.account(version) is None:
                raise FailedPrecondition(
                    f"the workers' step events do not add up to version {version}"
                )
            progress = job.epoch.progress(below_step=version) if job.epoch else {}
            heartbeating = self.cluster.heartbeating(Role.WORKER)
            limit = job.settings.num_workers
            workers = {r.id: r.address for r in (heartbeating[:limit] if limit else heartbeating)}
            copies = replicas.rereplicate(
                cluster=self.cluster,
                fleet=self.fleet,
                job=job,
                shards=shards,
                survivors=survivors,
                lost=len(dead),
                version=version,
                history=history,
                workers=workers,
            )
            shards, servers = copies.shards, copies.servers
            # Only now may workers go on: with the new map they push to the new copies too.
            self.fleet.configure(job.job_id, job.settings, shards, servers, workers)
        except (ValueError, grpc.RpcError, LmpsError) as err:
            log.warning("failover impossible: %s", err)
            return []
        with job.lock:
            job.shards, job.servers, job.workers = shards, servers, workers
            kept = {s: i for s, i in job.server_epochs.items() if s not in dead}
            job.server_epochs = {**kept, **copies.joined}
            self._evict(job, copies.joined)  # a joined server now holds this job
            job.resume = Resume(epoch_no, progress)
            job.step = version
        self.failovers, self.servers_lost = self.failovers + 1, self.servers_lost + len(dead)
        self.replicas_restored += copies.restored
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
            "workers": len(job.workers),  # what a restored epoch waits for (Job.rejoin)
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

    def _evict(self, job: Job, servers: Iterable[str]) -> None:
        """`job` is being loaded onto `servers`, replacing what they hold: every other job
        that was there is reloaded from its latest checkpoint when next used (an older job's
        `lmps generate --job`, `--resume`), instead of finding its servers holding another."""
        for server_id in servers:
            held = self.holders.get(server_id)
            if held is not None and held is not job:
                held.needs_restore = True
            self.holders[server_id] = job

    def ensure_loaded(self, job: Job) -> None:
        """Reload `job` from its latest checkpoint if its servers do not hold it: a job a
        restarted coordinator recovered, or one another job has since replaced (`_evict`).
        FailedPrecondition when that would pull the servers from under a job running an
        epoch, or when there is nothing to reload from (no --state-dir)."""
        with job.lock:
            if not job.needs_restore:
                return
            others = [h for h in self.holders.values() if h is not job]
            busy = sorted({h.job_id for h in others if h.state == JobState.RUNNING})
            if busy:
                raise FailedPrecondition(
                    f"job {job.job_id} must be reloaded onto the parameter servers, which job "
                    f"{busy[0]} is running an epoch on; try again after that epoch ends"
                )
            if self.jobs_dir is None:
                raise FailedPrecondition(
                    f"job {job.job_id} is no longer on the parameter servers (another job was "
                    "loaded onto them) and this coordinator keeps no checkpoints to reload it "
                    "from: it runs without --state-dir"
                )
            self.restore(job, wait_s=job.settings.wait_for_members_s)

    def evaluate(self, job: Job) -> Evaluation:
        """The task's evaluation on the eval split, spread over the workers."""
        self.ensure_loaded(job)
        if job.eval.shape[0] == 0:
            return Evaluation(math.nan, 0, job.step)
        alive = {w: a for w, a in job.workers.items() if self.cluster.is_alive(w)}
        counts, version = self.fleet.evaluate(job.job_id, alive or job.workers, job.eval, job.step)
        n = job.settings.model.num_labels
        if counts.confusion is not None:
            counts = EvalCounts(counts.loss_sum, counts.count, counts.confusion.view(n, n))
        return Evaluation.of(counts, version)
