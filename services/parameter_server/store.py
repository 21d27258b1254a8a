"""The state of one parameter server: shards, optimizer, and the SYNC barrier.

Pure torch + threading; the gRPC servicer is a thin wrapper around `ParameterStore`.
Every mutating call validates everything first and only then changes state under the
lock, so a rejected push or load leaves the server exactly as it was.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lmps.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from lmps.optim import OptimizerSettings, ShardOptimizer
from lmps.partition import Shard


@dataclass(frozen=True)
class PushResult:
    version: int  # server version after the push
    applied: bool  # this push completed the step
    pending: int  # members still to push for the step


@dataclass(frozen=True)
class ShardStats:
    norm: float
    mean: float
    std: float
    max_abs: float
    nonfinite: int


@dataclass
class _Job:
    job_id: str
    specs: dict[str, Shard]  # shard_id -> placement, in load order
    optimizer: ShardOptimizer
    version: int
    members: set[str]
    # Barrier state for step `version`: weighted gradient sums and who contributed.
    acc: dict[str, torch.Tensor] = field(default_factory=dict)
    pushed: dict[str, float] = field(default_factory=dict)  # worker_id -> weight


def stats_of(t: torch.Tensor) -> ShardStats:
    t = t.detach().double()
    finite = torch.isfinite(t)
    return ShardStats(
        norm=float(t.norm()),
        mean=float(t.mean()) if t.numel() else 0.0,
        std=float(t.std()) if t.numel() > 1 else 0.0,
        max_abs=float(t.abs().max()) if t.numel() else 0.0,
        nonfinite=int((~finite).sum()),
    )


def _check_values(
    specs: Mapping[str, Shard], values: Sequence[tuple[str, torch.Tensor]], what: str
) -> dict[str, torch.Tensor]:
    """Exactly one finite float 1-D tensor of the right size per shard, else raise."""
    out: dict[str, torch.Tensor] = {}
    for shard_id, t in values:
        spec = specs.get(shard_id)
        if spec is None:
            raise NotFound(f"{what}: unknown shard {shard_id!r}")
        if shard_id in out:
            raise InvalidArgument(f"{what}: shard {shard_id!r} sent twice")
        if not t.is_floating_point():
            raise InvalidArgument(f"{what}: shard {shard_id!r} has non-float dtype {t.dtype}")
        if t.dim() != 1 or t.numel() != spec.numel:
            raise InvalidArgument(
                f"{what}: shard {shard_id!r} needs shape [{spec.numel}], got {list(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"{what}: shard {shard_id!r} contains NaN or Inf")
        out[shard_id] = t
    missing = [s for s in specs if s not in out]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InvalidArgument(f"{what}: missing shards {missing[:3]}{more}")
    return out


class ParameterStore:
    """Thread-safe. One job at a time (Load replaces it)."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self.applied_steps = 0  # updates applied since start (for metrics)
        self.last_apply_s = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def load(
        self,
        job_id: str,
        settings: OptimizerSettings,
        shards: Sequence[Shard],
        values: Sequence[tuple[str, torch.Tensor]],
        members: Iterable[str],
        version: int = 0,
    ) -> int:
        """Install a job. Returns fp32 bytes held. Validates fully before replacing anything."""
        if not job_id:
            raise InvalidArgument("load: empty job id")
        specs: dict[str, Shard] = {}
        for s in shards:
            if s.shard_id in specs:
                raise InvalidArgument(f"load: duplicate shard {s.shard_id!r}")
            if s.numel <= 0:
                raise InvalidArgument(f"load: shard {s.shard_id!r} has numel {s.numel}")
            specs[s.shard_id] = s
        if not specs:
            raise InvalidArgument("load: no shards")
        checked = _check_values(specs, values, "load")
        masters = {sid: checked[sid].to(torch.float32).clone() for sid in specs}
        optimizer = ShardOptimizer(
            masters, decay={sid: s.weight_decay for sid, s in specs.items()}, settings=settings
        )
        job = _Job(job_id, specs, optimizer, version, set(members))
        with self._cond:
            self._job = job
            self._cond.notify_all()
        return sum(t.numel() * 4 for t in masters.values())

    def _require(self, job_id: str) -> _Job:
        job = self._job
        if job is None:
            raise FailedPrecondition("no job is loaded on this parameter server")
        if job_id and job_id != job.job_id:
            raise NotFound(f"unknown job {job_id!r} (this server holds {job.job_id!r})")
        return job

    # -- reads -----------------------------------------------------------------------------

    def pull(
        self, job_id: str, min_version: int, shard_ids: Sequence[str], timeout_s: float | None
    ) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """Copies of the shards at one version >= min_version (waits up to timeout_s)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            job = self._require(job_id)
            for sid in shard_ids:
                if sid not in job.specs:
                    raise NotFound(f"pull: unknown shard {sid!r}")
            while job.version < min_version:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(
                        f"version {job.version} did not reach {min_version} in time"
                    )
                self._cond.wait(timeout=remaining)
                job = self._require(job_id)  # a Load may have replaced the job meanwhile
            values = job.optimizer.values
            wanted = shard_ids or list(job.specs)
            return job.version, [(sid, values[sid].clone()) for sid in wanted]

    def describe(self, job_id: str = "") -> tuple[str, int, list[Shard], list[str], list[str]]:
        """(job_id, version, shard specs, members, pushed-for-pending-step); empty if no job."""
        with self._cond:
            if self._job is None and not job_id:
                return "", 0, [], [], []
            job = self._require(job_id)
            return (
                job.job_id,
                job.version,
                list(job.specs.values()),
                sorted(job.members),
                sorted(job.pushed),
            )

    def shard(self, job_id: str, shard_id: str) -> tuple[Shard, int, torch.Tensor, int]:
        """(spec, version, copy of value, optimizer state bytes of this shard)."""
        with self._cond:
            job = self._require(job_id)
            spec = job.specs.get(shard_id)
            if spec is None:
                raise NotFound(f"unknown shard {shard_id!r}")
            return spec, job.version, job.optimizer.values[shard_id].clone(), 0

    def optimizer_state_bytes(self) -> int:
        with self._cond:
            return 0 if self._job is None else self._job.optimizer.state_bytes()

    # -- writes ----------------------------------------------------------------------------

    def push(
        self,
        job_id: str,
        worker_id: str,
        step: int,
        weight: float,
        grads: Sequence[tuple[str, torch.Tensor]],
    ) -> PushResult:
        """Accept one worker's complete gradient for `step`; apply when the barrier is met."""
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidArgument(f"push: weight must be a positive number, got {weight}")
        with self._cond:
            job = self._require(job_id)
            if worker_id not in job.members:
                raise NotFound(f"push: worker {worker_id!r} is not a member of job {job.job_id!r}")
            if step < job.version:
                raise FailedPrecondition(
                    f"push: stale step {step}; server is at version {job.version}"
                )
            if step > job.version:
                raise OutOfRange(f"push: future step {step}; server is at version {job.version}")
            if worker_id in job.pushed:
                raise AlreadyExists(f"push: worker {worker_id!r} already pushed step {step}")
            checked = _check_values(job.specs, grads, "push")
            # All checks passed: from here on nothing can fail half-way.
            for sid, g in checked.items():
                contrib = g.to(torch.float32) * weight
                if sid in job.acc:
                    job.acc[sid].add_(contrib)
                else:
                    job.acc[sid] = contrib
            job.pushed[worker_id] = weight
            applied = self._maybe_apply(job)
            pending = 0 if applied else len(job.members - job.pushed.keys())
            return PushResult(job.version, applied, pending)

    def set_members(
        self, job_id: str, members: Iterable[str], discard_pending: bool = False
    ) -> tuple[int, bool]:
        with self._cond:
            job = self._require(job_id)
            job.members = set(members)
            if discard_pending:
                job.acc = {}
                job.pushed = {}
            applied = self._maybe_apply(job)
            return job.version, applied

    def _maybe_apply(self, job: _Job) -> bool:
        """Run the optimizer if every member pushed for the pending step. Holds the lock."""
        if not job.pushed or not job.members <= job.pushed.keys():
            return False
        start = time.perf_counter()
        total = sum(job.pushed.values())
        mean = {sid: acc.div_(total) for sid, acc in job.acc.items()}
        job.optimizer.step(mean, job.version)
        job.version += 1
        job.acc = {}
        job.pushed = {}
        self.applied_steps += 1
        self.last_apply_s = time.perf_counter() - start
        self._cond.notify_all()
        return True
