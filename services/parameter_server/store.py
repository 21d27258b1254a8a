"""The state of one parameter server: shards, their optimizer, versions and snapshots.

The update runs on the server (MXNet KVStore's `set_optimizer`): `ShardOptimizer` over the
fp32 master shards. When pushes become an update, and which version a pull may see, is the
job's `Barrier` (`consistency.py`, ps-lite's settable request handle from Parameter Server,
OSDI'14); the store applies what the barrier hands it, bumps the version, keeps the digest of
which workers made each step and the checkpoint snapshots. With gradient clipping
(`max_grad_norm`, SYNC) a complete step is parked until its global norm, which spans every
server, comes back from the workers (`grad_norm`, then `apply_step`; `lmps.core.clip`).

Pure torch + threading; the gRPC servicer is a thin wrapper around `ParameterStore`.
Every mutating call validates everything first and only then changes state under the
lock, so a rejected push or load leaves the server exactly as it was.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from lmps.core import clip
from lmps.core.compress import Encoded
from lmps.core.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from lmps.core.optim import OptimizerSettings, ShardOptimizer
from lmps.core.partition import Shard
from lmps.core.settings import Consistency
from lmps.core.sparse_rows import Rows, check_shard
from lmps.services.parameter_server.consistency import Barrier, Update, make_barrier


@dataclass(frozen=True)
class PushResult:
    version: int  # server version after the push
    applied: bool  # this push completed the step
    pending: int  # members still to push for the step
    staleness: int = 0
    """Versions between the one the gradient was computed at and the one it is applied at:
    step - computed_at under SYNC and bounded staleness (a push is applied as its step);
    under ASYNC the server's version when it applied the push - computed_at."""


@dataclass(frozen=True)
class ShardStats:
    norm: float
    mean: float
    std: float
    max_abs: float
    nonfinite: int


OptState = dict[str, dict[str, torch.Tensor]]  # shard_id -> torch optimizer state


@dataclass
class _Parked:
    """A complete SYNC step waiting for its global norm (gradient clipping)."""

    step: int
    update: Update
    sums: dict[str, float]  # shard id -> fp64 sum of squares of its mean gradient, load order


@dataclass(frozen=True)
class _Clipped:
    """An applied step's norm: what `grad_norm` and `apply_step` answer for it later."""

    sums: dict[str, float]
    norm: float


@dataclass(frozen=True)
class Snapshot:
    version: int
    values: dict[str, torch.Tensor]
    state: OptState
    history: str = ""  # the step-composition digest at `version`


@dataclass
class _Job:
    job_id: str
    specs: dict[str, Shard]  # shard_id -> placement, in load order
    optimizer: ShardOptimizer
    version: int
    barrier: Barrier  # membership and pending pushes: when they become an update
    checkpoint_every: int = 0
    snapshot: Snapshot | None = None
    # Digest of which workers (with which weights) made every step since the load. Servers
    # whose digests differ applied different steps to their shards: a worker that died
    # between its pushes to two servers counted on one only. The coordinator compares them.
    history: str = ""
    # (encoding key, shard id) -> the shard encoded at `version` for pulls (`pull_encoded`).
    encoded: dict[tuple[Hashable, str], bytes] = field(default_factory=dict)
    max_grad_norm: float = 0.0  # > 0: every SYNC step waits for its global norm (`parked`)
    parked: _Parked | None = None  # the step at `version`, complete, awaiting its norm
    clipped: dict[int, _Clipped] = field(default_factory=dict)  # the last KEEP_NORMS steps
    # Streaming fragments (F > 1): step s updates the shards of fragment s mod F only, at
    # the lr of outer step s // F (Streaming DiLoCo); 1 = every step updates every shard.
    fragments: int = 1

    def expected(self, step: int) -> dict[str, Shard]:
        """The shards a push for `step` carries (all of them without fragments)."""
        if self.fragments == 1:
            return self.specs
        return {sid: s for sid, s in self.specs.items() if s.fragment == step % self.fragments}

    def take_snapshot(self) -> Snapshot:
        values = {sid: t.clone() for sid, t in self.optimizer.values.items()}
        return Snapshot(self.version, values, self.optimizer.state_dict(), self.history)


# Bounds that keep every update finite in fp32: AdamW squares gradients (1e18**2 < 3.4e38)
# and the weighted sum runs in fp64. Larger values are rejected as INVALID_ARGUMENT.
MAX_GRAD_ABS = 1e18
MAX_WEIGHT = 1e12
MAX_WAIT_S = 3600.0  # longest a pull or snapshot waits for a version, whatever the deadline
KEEP_NORMS = 4  # applied steps whose sums and norm are kept (a late worker's GradNorm)


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
    specs: Mapping[str, Shard],
    values: Sequence[tuple[str, torch.Tensor]],
    what: str,
    max_abs: float | None = None,
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
        # One pass over the shard: aminmax propagates NaN and keeps ±Inf, so its two ends
        # say whether every value is finite and in range (isfinite().all() plus abs().max()
        # is two passes and a temporary, ~25x slower per MiB here). The slow check only
        # names the fault once a shard is refused.
        lo, hi = (float(x) for x in torch.aminmax(t))
        bound = math.inf if max_abs is None else max_abs
        if not (math.isfinite(lo) and math.isfinite(hi) and -bound <= lo and hi <= bound):
            if not bool(torch.isfinite(t).all()):
                raise InvalidArgument(f"{what}: shard {shard_id!r} contains NaN or Inf")
            raise InvalidArgument(f"{what}: shard {shard_id!r} has values beyond ±{bound:g}")
        out[shard_id] = t
    missing = [s for s in specs if s not in out]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InvalidArgument(f"{what}: missing shards {missing[:3]}{more}")
    return out


# A push's gradients: dense tensors, or some of them compressed (`lmps.core.compress`).
PushGrads = list[tuple[str, torch.Tensor]] | list[tuple[str, torch.Tensor | Encoded]]


def _densify(
    specs: Mapping[str, Shard], grads: PushGrads, what: str
) -> list[tuple[str, torch.Tensor]]:
    """`grads` with every compressed gradient (`lmps.core.compress`, already validated by the
    codec) decoded to its dense fp32 shard, so that the checks and the barrier see only
    tensors; `grads` itself when none is compressed. A compressed shard's numel is checked
    against the shard first: a top-k message of a few bytes could otherwise claim any size
    (and sparse rows' grid: the rows must be the shard's parameter rows)."""
    if all(isinstance(g, torch.Tensor) for _, g in grads):
        return cast(list[tuple[str, torch.Tensor]], grads)
    out: list[tuple[str, torch.Tensor]] = []
    for shard_id, g in grads:
        if not isinstance(g, torch.Tensor):
            spec = specs.get(shard_id)
            if spec is None:
                raise NotFound(f"{what}: unknown shard {shard_id!r}")
            if g.numel != spec.numel:
                raise InvalidArgument(
                    f"{what}: shard {shard_id!r} needs numel {spec.numel}, compressed {g.numel}"
                )
            if isinstance(g, Rows):
                try:
                    check_shard(g, spec)
                except ValueError as err:
                    raise InvalidArgument(f"{what}: shard {shard_id!r}: {err}") from None
            g = g.decode()
        out.append((shard_id, g))
    return out


def _add_push(history: str, push: tuple[str, int, float]) -> str:
    """The digest of a set of pushes, with one more (ASYNC): the sum of their hashes modulo
    2**256 on top of the digest the job was loaded with, so the order they came in does not
    matter and servers that applied the same pushes agree."""
    worker, step, weight = push
    h = int(hashlib.sha256(f"{worker}|{step}|{weight!r}".encode()).hexdigest(), 16)
    try:
        base = int(history, 16)
    except ValueError:  # a digest loaded from elsewhere that is not hex: its hash stands in
        base = int(hashlib.sha256(history.encode()).hexdigest(), 16)
    return f"{(base + h) % (1 << 256):064x}"


class ParameterStore:
    """Thread-safe. One job at a time (Load replaces it)."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def load(
        self,
        job_id: str,
        settings: OptimizerSettings,
        shards: Sequence[Shard],
        values: Sequence[tuple[str, torch.Tensor]],
        members: Iterable[str],
        version: int = 0,
        state: OptState | None = None,
        checkpoint_every: int = 0,
        history: str = "",
        consistency: Consistency = "sync",
        max_staleness: int = 0,
        max_grad_norm: float = 0.0,
        fragments: int = 1,
    ) -> int:
        """Install a job. Returns fp32 bytes held. Validates fully before replacing anything.

        `state` restores optimizer state (checkpoints); it must then cover every shard.
        `consistency` picks the job's barrier (`consistency.BARRIERS`); `max_staleness` is
        its bound under bounded staleness. `max_grad_norm` > 0 (SYNC only) clips every step
        by its global norm: a complete step waits for it (`grad_norm`, `apply_step`).
        `fragments` F > 1 (streaming fragments, SYNC only): a push for step s carries the
        shards of fragment s mod F (`Shard.fragment`) and the step updates only those.
        """
        if not job_id:
            raise InvalidArgument("load: empty job id")
        if not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise InvalidArgument(f"load: max_grad_norm must be finite and >= 0: {max_grad_norm}")
        if max_grad_norm and (consistency == "async" or max_staleness):
            raise InvalidArgument(
                "load: max_grad_norm is clipped on the servers under SYNC only, not under "
                f"{consistency} with max_staleness {max_staleness} (workers clip there)"
            )
        fragments = fragments or 1
        if fragments > 1 and (consistency != "sync" or max_staleness or max_grad_norm):
            raise InvalidArgument(
                f"load: fragments {fragments} sync one fragment per SYNC step: not under "
                f"{consistency} with max_staleness {max_staleness}, max_grad_norm "
                f"{max_grad_norm:g} (local steps clip on the workers)"
            )
        specs: dict[str, Shard] = {}
        for s in shards:
            if not 0 <= s.fragment < fragments:
                raise InvalidArgument(
                    f"load: shard {s.shard_id!r} is in fragment {s.fragment}, not below "
                    f"fragments {fragments}"
                )
            if s.shard_id in specs:
                raise InvalidArgument(f"load: duplicate shard {s.shard_id!r}")
            if s.numel <= 0:
                raise InvalidArgument(f"load: shard {s.shard_id!r} has numel {s.numel}")
            specs[s.shard_id] = s
        if not specs:
            raise InvalidArgument("load: no shards")
        try:
            checked = _check_values(specs, values, "load")
        except NotFound as err:  # a value for a shard the header doesn't list: a bad stream
            raise InvalidArgument(str(err)) from None
        # No copy here: `ShardOptimizer` makes its own (it must own the leaves it updates).
        masters = {sid: checked[sid].to(torch.float32) for sid in specs}
        try:
            optimizer = ShardOptimizer(
                masters, decay={sid: s.weight_decay for sid, s in specs.items()}, settings=settings
            )
            if state:
                optimizer.load_state_dict(state)
            barrier = make_barrier(
                consistency,
                job_id=job_id,
                numel={sid: s.numel for sid, s in specs.items()},
                members=members,
                version=version,
                max_staleness=max_staleness,
            )
        except ValueError as err:
            raise InvalidArgument(f"load: {err}") from None
        job = _Job(job_id, specs, optimizer, version, barrier, checkpoint_every)
        job.max_grad_norm = max_grad_norm
        job.fragments = fragments
        job.history = history or hashlib.sha256(f"{job_id}|{version}".encode()).hexdigest()
        with self._cond:
            self._job = job
            self._cond.notify_all()
        return sum(t.numel() * 4 for t in masters.values())

    def close(self) -> None:
        """Shutting down: wake every waiting pull/snapshot so it ends now (UNAVAILABLE)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _wait_for(
        self,
        job_id: str,
        version: int,
        timeout_s: float | None,
        active: Callable[[], bool] | None,
        *,
        pull: bool = False,
        until: Callable[[_Job], bool] | None = None,
    ) -> _Job:
        """Wait (holding the lock between naps) until the job reaches `version`, or with
        `pull`, until its barrier lets a pull for `version` see the job's version, or with
        `until`, until that holds of the job.

        Waits in short slices so that a client that went away, a shutdown, or the deadline
        ends the wait promptly instead of pinning a handler thread.
        """
        if timeout_s is None or not math.isfinite(timeout_s) or timeout_s > MAX_WAIT_S:
            timeout_s = MAX_WAIT_S  # no deadline (or an absurd one): still bounded
        deadline = time.monotonic() + timeout_s
        job = self._require(job_id)

        def ready(job: _Job) -> bool:
            if until is not None:
                return until(job)
            return job.barrier.readable(job.version, version) if pull else job.version >= version

        while not ready(job):
            if self._closed:
                raise Unavailable("the parameter server is shutting down")
            if active is not None and not active():
                raise Aborted("the client went away")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"version {job.version} did not reach {version} in time")
            self._cond.wait(timeout=min(remaining, 0.5))
            job = self._require(job_id)  # a Load may have replaced the job meanwhile
        return job

    def _require(self, job_id: str) -> _Job:
        job = self._job
        if job is None:
            raise FailedPrecondition("no job is loaded on this parameter server")
        if job_id and job_id != job.job_id:
            raise NotFound(f"unknown job {job_id!r} (this server holds {job.job_id!r})")
        return job

    # -- reads -----------------------------------------------------------------------------

    def pull(
        self,
        job_id: str,
        min_version: int,
        shard_ids: Sequence[str],
        timeout_s: float | None,
        active: Callable[[], bool] | None = None,
    ) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """Copies of the shards at one version >= min_version (waits up to timeout_s)."""
        with self._cond:
            job = self._require(job_id)
            for sid in shard_ids:
                if sid not in job.specs:
                    raise NotFound(f"pull: unknown shard {sid!r}")
            job = self._wait_for(job_id, min_version, timeout_s, active, pull=True)
            values = job.optimizer.values
            wanted = shard_ids or list(job.specs)
            return job.version, [(sid, values[sid].clone()) for sid in wanted]

    def pull_encoded(
        self,
        job_id: str,
        min_version: int,
        shard_ids: Sequence[str],
        timeout_s: float | None,
        active: Callable[[], bool] | None = None,
        *,
        key: Hashable,
        encode: Callable[[str, int, torch.Tensor], bytes],
    ) -> tuple[int, list[bytes]]:
        """`pull`, each shard as `encode(shard_id, version, value)`: the encoded bytes are
        the copy, made under the lock once per (version, `key`, shard) and shared by every
        pull of that version, instead of one clone per pull and an encoding of each.

        The cache goes when the version moves on or a push for the next step begins
        (`pushing`: by then its pusher has pulled; the pulls still streaming hold their own
        references), so it is not held alongside the incoming gradients."""
        with self._cond:
            job = self._require(job_id)
            for sid in shard_ids:
                if sid not in job.specs:
                    raise NotFound(f"pull: unknown shard {sid!r}")
            job = self._wait_for(job_id, min_version, timeout_s, active, pull=True)
            values = job.optimizer.values
            out = []
            for sid in shard_ids or list(job.specs):
                blob = job.encoded.get((key, sid))
                if blob is None:
                    blob = job.encoded[(key, sid)] = encode(sid, job.version, values[sid])
                out.append(blob)
            return job.version, out

    def pushing(self, job_id: str, step: int) -> None:
        """A push for `step` has begun arriving: its worker has pulled that version, so the
        pull encodings can go now rather than be held while the gradients stream in (the
        pulls still streaming keep their own references). Only a hint: changes no state."""
        with self._cond:
            job = self._job
            if job is not None and job.job_id == job_id and job.version == step:
                job.encoded.clear()

    def history(self, job_id: str = "") -> str:
        with self._cond:
            return self._require(job_id).history

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
                sorted(job.barrier.members),
                sorted(job.barrier.pushed),
            )

    def shard(self, job_id: str, shard_id: str) -> tuple[Shard, int, torch.Tensor, int]:
        """(spec, version, copy of value, optimizer state bytes of this shard)."""
        with self._cond:
            job = self._require(job_id)
            spec = job.specs.get(shard_id)
            if spec is None:
                raise NotFound(f"unknown shard {shard_id!r}")
            state_bytes = job.optimizer.shard_state_bytes()[shard_id]
            return spec, job.version, job.optimizer.values[shard_id].clone(), state_bytes

    def shard_state_bytes(self, job_id: str = "") -> dict[str, int]:
        """Optimizer state bytes of every shard (0 before its first step, or for plain SGD)."""
        with self._cond:
            return self._require(job_id).optimizer.shard_state_bytes()

    def snapshot(
        self,
        job_id: str,
        version: int,
        timeout_s: float | None,
        active: Callable[[], bool] | None = None,
    ) -> Snapshot:
        """Values and optimizer state at exactly `version` (live, or the held snapshot)."""
        with self._cond:
            # SYNC: every version is one whole step, so "exactly `version`" is a wait for it.
            job = self._wait_for(job_id, version, timeout_s, active)
            if job.version == version:
                return job.take_snapshot()
            if job.snapshot is not None and job.snapshot.version == version:
                return job.snapshot
            held = job.snapshot.version if job.snapshot else "none"
            raise FailedPrecondition(
                f"snapshot: version {version} is gone (server at {job.version}, snapshot {held})"
            )

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
        grads: PushGrads,
        computed_at: int | None = None,
    ) -> PushResult:
        """Accept one worker's complete gradient for `step`; apply when the barrier is met.

        A gradient may be compressed (an `Encoded` from `codec.read_push_request`): it is
        decoded to dense fp32 first, outside the lock, then checked and applied exactly as a
        dense push of the decoded values.

        Takes the gradients: once they are checked `grads` is emptied, so that the barrier
        holds the only references and frees each as soon as it is summed (a caller's list
        would keep a whole push alive through the update and a snapshot)."""
        if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
            raise InvalidArgument(f"push: weight must be in (0, {MAX_WEIGHT:g}], got {weight}")
        with self._cond:
            specs = self._require(job_id).specs
        # Decoding runs outside the lock (other pushes go on meanwhile); a Load in between is
        # caught below, where the values are checked against the job's specs again.
        dense = _densify(specs, grads, "push")
        with self._cond:
            job = self._require(job_id)
            job.barrier.admit(worker_id, step, job.version, computed_at)
            if job.parked is not None and step <= job.parked.step:
                raise FailedPrecondition(
                    f"push: step {step} is complete (every member pushed); it awaits its norm"
                )
            # SYNC and SSP take pushes for steps >= the version (applied as that step); ASYNC
            # takes them for steps <= it and applies them now, at the version.
            stale = max(step, job.version) - (step if computed_at is None else computed_at)
            expected = job.expected(step)
            if len(expected) < len(job.specs):
                for sid, _ in dense:
                    spec = job.specs.get(sid)
                    if spec is not None and sid not in expected:
                        raise InvalidArgument(
                            f"push: shard {sid!r} is in fragment {spec.fragment}; step {step} "
                            f"syncs fragment {step % job.fragments} of {job.fragments}"
                        )
            checked = _check_values(expected, dense, "push", max_abs=MAX_GRAD_ABS)
            # All checks passed: from here on nothing can fail half-way.
            if step == job.version:
                job.encoded.clear()  # the pusher has pulled this version (see `pull_encoded`)
            grads.clear()
            dense.clear()
            update = job.barrier.push(worker_id, step, weight, checked)
            del checked
            applied = self._apply_all(job, update)
            del update
            # Parked (clipping): complete, nothing left to push for it.
            pending = 0 if applied or job.parked is not None else job.barrier.pending
            return PushResult(job.version, applied, pending, stale)

    def set_members(
        self,
        job_id: str,
        members: Iterable[str],
        discard_pending: bool = False,
        discard: Iterable[str] = (),
        join_at: int = 0,
    ) -> tuple[int, bool]:
        """Replace the barrier's members: (version, whether that completed the pending step).

        Members new in `members` are required from version `join_at` on (0: at once).
        FailedPrecondition, nothing changed, when `join_at` > 0 and the version is past it.
        """
        with self._cond:
            job = self._require(job_id)
            if join_at and job.version > join_at:
                # SYNC: step `join_at` was made without the joiner here; the caller retries
                # the join at a later version, so it takes effect at one version everywhere.
                raise FailedPrecondition(
                    f"set_members: join_at {join_at} is past; server is at version {job.version}"
                )
            if join_at and job.parked is not None and join_at <= job.parked.step:
                raise FailedPrecondition(
                    f"set_members: join_at {join_at}: that step is complete here, awaiting "
                    "its norm; join at the next"
                )
            if discard_pending and job.parked is not None:
                # An attempt starts at this version: the step waiting for its norm is not
                # in it (its pushers are gone); it is pushed anew.
                job.parked = None
                job.barrier.rewind(job.version)
            # A parked step stays when workers are only discarded: it is complete, and the
            # workers that pushed for it commit it (the discarded ones' pushes are in it).
            drop = job.barrier.pushed if discard_pending else discard
            applied = self._apply_all(job, job.barrier.set_members(members, drop, join_at))
            return job.version, applied

    # -- gradient clipping: a SYNC step's global norm spans servers -------------------------

    def awaiting_norm(self, job_id: str = "") -> bool:
        """The step at the job's version is complete and waits for its norm."""
        with self._cond:
            return self._require(job_id).parked is not None

    def _clipping(self, job: _Job, what: str) -> None:
        if not job.max_grad_norm:
            raise FailedPrecondition(f"{what}: job {job.job_id!r} does not clip gradients")

    def grad_norm(
        self,
        job_id: str,
        step: int,
        timeout_s: float | None,
        active: Callable[[], bool] | None = None,
    ) -> tuple[int, dict[str, float]]:
        """(version, each held shard's fp64 sum of squares of step `step`'s mean gradient),
        waiting up to `timeout_s` until the step is complete here. A step applied already:
        the sums it had while they are kept (`KEEP_NORMS`), else none."""
        with self._cond:
            job = self._require(job_id)
            self._clipping(job, "grad norm")
            if step > job.version:
                raise OutOfRange(f"grad norm: step {step} is past version {job.version}")

            def complete(job: _Job) -> bool:
                return job.version > step or (job.parked is not None and job.parked.step == step)

            job = self._wait_for(job_id, step + 1, timeout_s, active, until=complete)
            self._clipping(job, "grad norm")  # a Load may have replaced the job meanwhile
            if job.version > step:
                done = job.clipped.get(step)
                return job.version, dict(done.sums) if done else {}
            assert job.parked is not None
            return job.version, dict(job.parked.sums)

    def apply_step(self, job_id: str, step: int, grad_norm: float) -> tuple[int, float, bool]:
        """Apply the parked step `step`, clipped by the global norm `grad_norm` as
        clip_grad_norm_ clips: (version, the norm the step was applied with, whether this
        call applied it). Idempotent: a step applied already with this norm changes nothing;
        with another, FailedPrecondition (nothing changes)."""
        if not (math.isfinite(grad_norm) and grad_norm >= 0):
            raise InvalidArgument(f"apply step: grad_norm must be finite and >= 0: {grad_norm}")
        with self._cond:
            job = self._require(job_id)
            self._clipping(job, "apply step")
            if step < job.version:
                done = job.clipped.get(step)
                if done is None:
                    raise FailedPrecondition(
                        f"apply step: step {step} was applied before the norms kept here "
                        f"(version {job.version})"
                    )
                if done.norm != grad_norm:
                    raise FailedPrecondition(
                        f"apply step: step {step} was applied with norm {done.norm!r}, "
                        f"not {grad_norm!r}"
                    )
                return job.version, done.norm, False
            if step > job.version:
                raise OutOfRange(f"apply step: step {step} is past version {job.version}")
            parked = job.parked
            if parked is None:
                raise FailedPrecondition(
                    f"apply step: step {step} is not complete here (pushes still to come)"
                )
            # The norm covers every shard of the job, these among them: never below their
            # own part (a margin for the different order of the fp64 additions).
            own = math.sqrt(sum(parked.sums.values()))
            if grad_norm < own * (1 - 1e-9):
                raise InvalidArgument(
                    f"apply step: grad_norm {grad_norm!r} is below this server's part of it, "
                    f"{own!r}"
                )
            clip.scale_(parked.update.grads, job.max_grad_norm, grad_norm)
            job.parked = None
            self._apply(job, parked.update)
            job.clipped[step] = _Clipped(parked.sums, grad_norm)
            for old in [k for k in job.clipped if k <= step - KEEP_NORMS]:
                del job.clipped[old]
            self._apply_all(job, job.barrier.ready())
            return job.version, grad_norm, True

    def _apply_all(self, job: _Job, update: Update | None) -> bool:
        """`_apply` the update, then every later step the barrier has complete already
        (bounded staleness: pushes for them came in ahead). With clipping a step is parked
        instead, until its norm comes (`apply_step`). Holds the lock."""
        applied = False
        while update is not None:
            if job.max_grad_norm and update.push is None:
                self._park(job, update)
                return applied
            applied = self._apply(job, update) or applied
            update = job.barrier.ready()
        return applied

    def _park(self, job: _Job, update: Update) -> None:
        """SYNC with clipping: the complete step at `version` waits for its global norm; its
        shards' sums of squares are what `grad_norm` answers. Holds the lock."""
        sums = {sid: clip.sum_sq(g) for sid, g in update.grads.items()}
        job.parked = _Parked(job.version, update, sums)
        self._cond.notify_all()  # GradNorm calls waiting for it

    def _apply(self, job: _Job, update: Update | None) -> bool:
        """Run the optimizer on the barrier's update, if it made one. Holds the lock."""
        if update is None:
            return False
        # An update is the step at `version`: its lr, then exactly one version up (SYNC: a
        # step of every member's pushes; ASYNC: one push).
        job.encoded.clear()  # encodings of the version about to be replaced
        # Streaming fragments: one fragment's outer step, at the lr of round version // F.
        job.optimizer.step(update.grads, job.version // job.fragments, partial=job.fragments > 1)
        # The update's gradients are spent: let them go now, before a snapshot is taken
        # (the caller's frame still holds `update` until this returns).
        update.grads.clear()
        if update.push is None:
            made_of = ",".join(f"{w}:{weight!r}" for w, weight in update.made_of)
            job.history = hashlib.sha256(
                f"{job.history}|{job.version}|{made_of}".encode()
            ).hexdigest()
        else:  # ASYNC: servers may apply the same pushes in different orders
            job.history = _add_push(job.history, update.push)
        job.version += 1
        # SYNC: every server of the job passes through the same versions, so the snapshots
        # they hold at one multiple make one consistent checkpoint. ASYNC: each server's
        # snapshot at a multiple holds that many pushes, in its own order; whether they are
        # the same pushes on every server, the digests say (and the coordinator checks).
        if job.checkpoint_every and job.version % job.checkpoint_every == 0:
            # Drop the old snapshot first: holding it while the new one is copied would be a
            # third copy of the whole state at the peak. (A Snapshot RPC still streaming the
            # old one keeps its own reference, so it stays whole.)
            job.snapshot = None
            job.snapshot = job.take_snapshot()
        self._cond.notify_all()
        return True
