"""The coordinator's calls to parameter servers and workers, fanned out in parallel.

The one module of the coordinator that speaks to members (ps-lite keeps its transport in one
place the same way): one channel per address, every call with a deadline. Settings go out
through the codec's mappers (`optimizer_to_proto`, `job_settings_to_proto`), never by hand.

With gradient clipping a complete SYNC step waits on its servers for its norm, which the
workers of the step exchange (`lmps.core.clip.commit_step`). Should they all die first, the
step would wait for ever: so before the servers' version is read (`state`) or snapshotted,
such a step is committed from here, with the same procedure (`settle`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmps.core.clip import commit_step
from lmps.core.errors import FailedPrecondition, LmpsError, Unavailable
from lmps.core.partition import Shard
from lmps.core.settings import JobSettings
from lmps.core.tasks import EvalCounts
from lmps.rpc import codec
from lmps.rpc.channel import DEFAULT_TIMEOUT_S, open_channel
from lmps.rpc.clip import GrpcNormServer
from lmps.v1 import (
    parameter_pb2,
    parameter_pb2_grpc,
    tensor_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

_T = TypeVar("_T")
_R = TypeVar("_R")
log = logging.getLogger("lmps.fleet")


class Diverged(Unavailable):
    """The job's servers hold states that do not belong together: roll back."""


class Fleet:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fanout")

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = open_channel(address)
            return ch

    def ps(self, address: str) -> parameter_pb2_grpc.ParameterServiceStub:
        return parameter_pb2_grpc.ParameterServiceStub(self._channel(address))

    def worker(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        return worker_pb2_grpc.WorkerServiceStub(self._channel(address))

    def fanout(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """Run fn over items in parallel; re-raise the first error."""
        futures = [self._pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    def reachable(self, address: str, timeout_s: float = 3.0) -> bool:
        """The member answers SERVING on grpc.health.v1 right now (a heartbeat can be 10 s old)."""
        try:
            resp = health_pb2_grpc.HealthStub(self._channel(address)).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    # -- parameter servers -----------------------------------------------------------------

    def load(
        self,
        job_id: str,
        settings: JobSettings,
        shards: Sequence[Shard],
        servers: Mapping[str, str],
        members: Sequence[str],
        version: int,
        values: Mapping[str, torch.Tensor],
        states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        history: str = "",
    ) -> None:
        """Load every server with its shards (and optimizer state when restoring).

        `history`: the step-composition digest the servers start from; a server loaded to
        join others mid-job (a re-created backup) must carry theirs, or it looks diverged."""

        def load_one(server_id: str) -> None:
            mine = [s for s in shards if s.held_by(server_id)]
            header = parameter_pb2.LoadHeader(
                job_id=job_id,
                optimizer=codec.optimizer_to_proto(settings.optimizer),
                shards=[codec.shard_to_proto(s) for s in mine],
                members=sorted(members),
                version=version,
                consistency=codec.consistency_to_proto(settings.consistency),
                max_staleness=settings.max_staleness,
                checkpoint_every=settings.checkpoint_every,
                history=history,
                # SYNC: the servers clip each step (ASYNC and local steps: the workers do).
                max_grad_norm=settings.max_grad_norm if settings.clip_on_servers else 0.0,
                # Streaming fragments: version v updates the shards of fragment v mod F only.
                fragments=settings.local_steps.fragments if settings.local_steps else 1,
            )

            def messages() -> Iterator[parameter_pb2.LoadRequest]:
                yield parameter_pb2.LoadRequest(header=header)
                for s in mine:
                    value = codec.encode(values[s.shard_id])
                    if states is None:
                        yield parameter_pb2.LoadRequest(
                            shard=tensor_pb2.ShardTensor(
                                shard_id=s.shard_id, version=version, tensor=value
                            )
                        )
                        continue
                    st = {k: codec.encode(v) for k, v in states.get(s.shard_id, {}).items()}
                    yield parameter_pb2.LoadRequest(
                        state=parameter_pb2.ShardState(
                            shard_id=s.shard_id, version=version, value=value, state=st
                        )
                    )

            self.ps(servers[server_id]).Load(messages(), timeout=600.0, wait_for_ready=True)

        self.fanout(load_one, sorted(servers))

    def set_members(
        self,
        job_id: str,
        servers: Mapping[str, str],
        members: set[str],
        discard_pending: bool = False,
        discard: Sequence[str] = (),
        join_at: int = 0,
    ) -> int:
        """Replace the barrier's members everywhere (SYNC: the members are the workers whose
        gradients make up each step; see leases.LeaseDesk). Returns the lowest version at which a
        dropped contribution could have been pending (version before any apply it caused).

        New members are required from version `join_at` on (0: at once). FailedPrecondition
        when a server is past `join_at` (that server changed nothing; the others did)."""
        request = parameter_pb2.SetMembersRequest(
            job_id=job_id,
            members=sorted(members),
            discard_pending=discard_pending,
            discard=list(discard),
            join_at=join_at,
        )

        def send(address: str) -> parameter_pb2.SetMembersResponse:
            # No wait_for_ready: a dead server must fail this fast (the epoch then rolls back).
            try:
                resp: parameter_pb2.SetMembersResponse = self.ps(address).SetMembers(
                    request, timeout=DEFAULT_TIMEOUT_S
                )
            except grpc.RpcError as err:
                if join_at and err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise FailedPrecondition(f"{address}: {err.details()}") from None
                raise
            return resp

        # Every answer in before an error is raised: a caller that undoes a refused join
        # must not overtake a request still on its way to another server.
        futures = [self._pool.submit(send, address) for address in servers.values()]
        wait(futures)
        results = [f.result() for f in futures]
        return min(int(r.version) - int(r.applied) for r in results)

    def version(self, job_id: str, servers: Mapping[str, str], settle_s: float = 3.0) -> int:
        """The servers' common version. Diverged if they disagree on it, or on the history
        of which workers made each step (a step applied differently on different shards),
        for longer than `settle_s` (pushes still in flight can finish a step meanwhile)."""
        return self.state(job_id, servers, settle_s)[0]

    def state(
        self, job_id: str, servers: Mapping[str, str], settle_s: float = 3.0
    ) -> tuple[int, str]:
        """(common version, step-composition digest) of the servers; Diverged as `version`."""
        # SYNC: a server's version is its count of applied steps, the same on every server.
        # ASYNC: its count of pushes, the same once every push reached every server; the
        # digests then agree whatever order each server applied them in.
        deadline = time.monotonic() + settle_s
        while True:
            try:
                self.settle(job_id, servers)
                return self._state_once(job_id, servers)
            except Diverged:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.25)

    def idle(self, address: str) -> bool:
        """The server holds no job (a fresh or restarted process): free to take one on."""
        resp = self.ps(address).ListShards(
            parameter_pb2.ListShardsRequest(), timeout=DEFAULT_TIMEOUT_S
        )
        return not resp.job_id

    def _listings(
        self, job_id: str, servers: Mapping[str, str]
    ) -> list[parameter_pb2.ListShardsResponse]:
        """Every server's ListShards, in the order of `servers`."""

        def one(address: str) -> parameter_pb2.ListShardsResponse:
            resp: parameter_pb2.ListShardsResponse = self.ps(address).ListShards(
                parameter_pb2.ListShardsRequest(job_id=job_id), timeout=DEFAULT_TIMEOUT_S
            )
            return resp

        return self.fanout(one, list(servers.values()))

    def _states(self, job_id: str, servers: Mapping[str, str]) -> list[tuple[int, str]]:
        """(version, step-composition digest) of every server, from ListShards."""
        return [(int(r.version), str(r.history)) for r in self._listings(job_id, servers)]

    def settle(self, job_id: str, servers: Mapping[str, str]) -> float | None:
        """Gradient clipping: commit a step that is complete and waits for its norm on some
        servers (`ListShardsResponse.awaiting_norm`) when every other server has it complete
        too or applied, the same exchange the workers of the step make (idempotent: they may
        be making it meanwhile). Returns its norm; None when there is none to commit, or it
        cannot be committed here (a server still waits for a push for it: the attempt that
        starts at this version drops it, `SetMembersRequest.discard_pending`)."""
        listings = self._listings(job_id, servers)
        waiting = [int(r.version) for r in listings if r.awaiting_norm]
        if not waiting:
            return None
        step = min(waiting)
        if any(
            not (int(r.version) == step and r.awaiting_norm) and int(r.version) != step + 1
            for r in listings
        ):
            log.info("job %s: step %d waits for its norm, but not on every server", job_id, step)
            return None
        ids = sorted(servers)
        norms = {
            sid: GrpcNormServer(self._channel(servers[sid]), job_id, DEFAULT_TIMEOUT_S)
            for sid in ids
        }
        held = [codec.shard_from_proto(info.spec) for r in listings for info in r.shards]
        owners = {s.shard_id: s.server_id for s in held}
        try:
            norm = commit_step(
                norms,
                step,
                owners=owners,
                shards=owners.keys(),
                fanout=self.fanout,
            )
        except (grpc.RpcError, LmpsError) as err:
            log.warning("job %s: could not commit step %d: %s", job_id, step, err)
            return None
        log.info("job %s: committed step %d (grad norm %s) for its workers", job_id, step, norm)
        return norm

    def _state_once(self, job_id: str, servers: Mapping[str, str]) -> tuple[int, str]:
        seen = set(self._states(job_id, servers))
        if len(seen) != 1:
            versions = sorted({v for v, _ in seen})
            raise Diverged(f"parameter servers diverged: versions {versions}, {len(seen)} states")
        return seen.pop()

    def lowest_version(self, job_id: str, servers: Mapping[str, str]) -> int:
        """The lowest version among the servers (they may be a step apart mid-epoch)."""
        return min(self.versions(job_id, servers))

    def versions(self, job_id: str, servers: Mapping[str, str]) -> list[int]:
        """Every server's version (mid-epoch they may be a step apart). A step complete and
        awaiting its norm (gradient clipping) counts as made: a join at it is refused."""
        listings = self._listings(job_id, servers)
        return [int(r.version) + int(r.awaiting_norm) for r in listings]

    def snapshot(
        self, job_id: str, servers: Mapping[str, str], version: int, timeout_s: float = 600.0
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Every shard's value and optimizer state at exactly `version`."""

        def one(address: str) -> list[parameter_pb2.ShardState]:
            stream = self.ps(address).Snapshot(
                parameter_pb2.SnapshotRequest(job_id=job_id, version=version), timeout=timeout_s
            )
            return list(stream)

        values: dict[str, torch.Tensor] = {}
        states: dict[str, dict[str, torch.Tensor]] = {}
        self.settle(job_id, servers)  # a step before `version` whose workers died
        parts = self.fanout(one, list(servers.values()))
        if len({msg.history for part in parts for msg in part}) > 1:
            raise Diverged(f"version {version} was made of different steps on different servers")
        for part in parts:
            for msg in part:
                values[msg.shard_id] = codec.decode(msg.value)
                if msg.state:
                    states[msg.shard_id] = {k: codec.decode(v) for k, v in msg.state.items()}
        return values, states

    def pull(
        self, job_id: str, shards: Sequence[Shard], servers: Mapping[str, str], min_version: int
    ) -> Iterator[tensor_pb2.ShardTensor]:
        """Every shard once, from its owner."""
        for server_id in sorted(servers):
            owned = [s.shard_id for s in shards if s.server_id == server_id]
            if not owned:
                continue
            stream = self.ps(servers[server_id]).Pull(
                parameter_pb2.PullRequest(job_id=job_id, min_version=min_version, shard_ids=owned),
                timeout=600.0,
                wait_for_ready=True,
            )
            yield from stream

    # -- workers ---------------------------------------------------------------------------

    def configure(
        self,
        job_id: str,
        settings: JobSettings,
        shards: Sequence[Shard],
        servers: Mapping[str, str],
        workers: Mapping[str, str],
        timeout_s: float = 300.0,
    ) -> None:
        request = worker_pb2.ConfigureRequest(
            job_id=job_id,
            spec=codec.job_settings_to_proto(settings.for_workers()),  # workers don't tokenize
            shards=[codec.shard_to_proto(s) for s in shards],
            servers=[
                worker_pb2.ServerAddress(server_id=k, address=v) for k, v in sorted(servers.items())
            ],
        )

        def one(address: str) -> None:
            self.worker(address).Configure(request, timeout=timeout_s, wait_for_ready=True)

        self.fanout(one, list(workers.values()))

    def evaluate(
        self, job_id: str, workers: Mapping[str, str], sequences: torch.Tensor, min_version: int
    ) -> tuple[EvalCounts, int]:
        """(the task's summed counts, version) over `sequences`, split across workers.

        A worker that is unreachable (it may have died since its last heartbeat) is left
        out and the split is redone over the others."""
        addresses = [workers[w] for w in sorted(workers)]
        while True:
            parts = [p for p in torch.tensor_split(sequences, len(addresses)) if p.shape[0]]

            def run(
                i: int, parts: list[torch.Tensor] = parts, addresses: list[str] = addresses
            ) -> worker_pb2.EvaluateResponse | str:
                try:
                    resp: worker_pb2.EvaluateResponse = self.worker(addresses[i]).Evaluate(
                        worker_pb2.EvaluateRequest(
                            job_id=job_id, tokens=codec.encode(parts[i]), min_version=min_version
                        ),
                        timeout=600.0,
                    )
                    return resp
                except grpc.RpcError as err:
                    if len(addresses) == 1 or err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    return addresses[i]

            outcome = self.fanout(run, list(range(len(parts))))
            failed = [r for r in outcome if isinstance(r, str)]
            if not failed:
                break
            addresses = [a for a in addresses if a not in failed]
        results = [r for r in outcome if not isinstance(r, str)]
        counts = [
            EvalCounts(
                r.loss_sum,
                int(r.tokens),
                torch.tensor(list(r.confusion), dtype=torch.long) if r.confusion else None,
            )
            for r in results
        ]
        total = counts[0]
        for c in counts[1:]:
            total = total.plus(c)
        return total, min(int(r.version) for r in results)
