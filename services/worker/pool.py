"""Talk to every parameter server in parallel: pull all shards, push all gradients.

`ServerPool` is the trainer's `ParameterClient` over gRPC. As in BytePS (OSDI'20), each
worker talks to every server directly and each link is used once per direction per step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from lmps.core.partition import Shard
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import parameter_pb2, parameter_pb2_grpc, tensor_pb2


class ServerPool:
    """One channel per server; pulls and pushes fan out over a thread pool."""

    def __init__(
        self,
        job_id: str,
        worker_id: str,
        shards: Sequence[Shard],
        addresses: Mapping[str, str],
        wire_dtype: torch.dtype = torch.float32,
        timeout_s: float = 600.0,
    ) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        # Pull each shard from its owner; push its gradient to owner and backup (if any).
        self.owned: dict[str, list[str]] = {}
        self.by_server: dict[str, list[str]] = {}
        for s in shards:
            self.owned.setdefault(s.server_id, []).append(s.shard_id)
            for holder in filter(None, (s.server_id, s.backup_server_id)):
                self.by_server.setdefault(holder, []).append(s.shard_id)
        missing = self.by_server.keys() - addresses.keys()
        if missing:
            raise ValueError(f"no address for servers {sorted(missing)}")
        self.channels = {sid: open_channel(addresses[sid]) for sid in self.by_server}
        self.stubs = {
            sid: parameter_pb2_grpc.ParameterServiceStub(ch) for sid, ch in self.channels.items()
        }
        self._calls: set[grpc.Future] = set()
        self._calls_lock = threading.Lock()
        self._generation = 0  # one per epoch or evaluation (`begin`)
        self._cancelled = -1  # the generation cancelled last
        self.executor = ThreadPoolExecutor(
            max_workers=max(1, 2 * len(self.stubs)), thread_name_prefix="ps"
        )

    def begin(self) -> int:
        """A new generation of calls (an epoch's, an evaluation's); `cancel(generation)`
        then cancels those in flight and those made later, until the next `begin`."""
        with self._calls_lock:
            self._generation += 1
            return self._generation

    def _track(self, call: grpc.Future) -> None:
        with self._calls_lock:
            self._calls.add(call)
            cancelled = self._cancelled == self._generation
        if cancelled:  # a pull made just after its epoch was cancelled would wait forever
            call.cancel()

    def _untrack(self, call: grpc.Future) -> None:
        with self._calls_lock:
            self._calls.discard(call)

    def cancel(self, generation: int | None = None) -> None:
        """Cancel every pull/push in flight (the epoch that needed them was cancelled); with
        `generation`, also those that generation makes later, and nothing if it is over."""
        with self._calls_lock:
            if generation is not None:
                if generation != self._generation:
                    return
                self._cancelled = generation
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def close(self) -> None:
        self.executor.shutdown(wait=False)
        for ch in self.channels.values():
            ch.close()

    def _pull_one(
        self, server_id: str, min_version: int, timeout_s: float | None = None
    ) -> tuple[int, dict[str, torch.Tensor]]:
        # Only the shards this server owns (it may also hold backups of others). No
        # wait_for_ready: a dead server must fail the step now, not in ten minutes.
        owned = self.owned[server_id]
        stream = self.stubs[server_id].Pull(
            parameter_pb2.PullRequest(
                job_id=self.job_id,
                min_version=min_version,
                wire_dtype=codec.to_proto_dtype(self.wire_dtype),
                shard_ids=[] if owned == self.by_server[server_id] else owned,
            ),
            timeout=timeout_s or self.timeout_s,
        )
        values: dict[str, torch.Tensor] = {}
        versions = set()
        self._track(stream)
        try:
            for msg in stream:
                values[msg.shard_id] = codec.decode(msg.tensor)
                versions.add(msg.version)
        finally:
            self._untrack(stream)
        if len(versions) != 1:
            raise RuntimeError(f"server {server_id} sent mixed versions {sorted(versions)}")
        return versions.pop(), values

    def pull(
        self, min_version: int, timeout_s: float | None = None
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """All shards from all servers at a version >= min_version; one version everywhere."""
        futures = [
            self.executor.submit(self._pull_one, s, min_version, timeout_s) for s in self.owned
        ]
        values: dict[str, torch.Tensor] = {}
        versions = set()
        for f in futures:
            v, part = f.result()
            versions.add(v)
            values.update(part)
        # SYNC: every server answers at the same version (a step is one version everywhere).
        if len(versions) != 1:
            raise RuntimeError(f"servers are at different versions {sorted(versions)}")
        return versions.pop(), values

    def _push_messages(
        self, server_id: str, step: int, weight: float, grads: Mapping[str, torch.Tensor]
    ) -> Iterator[parameter_pb2.PushRequest]:
        yield parameter_pb2.PushRequest(
            header=parameter_pb2.PushHeader(
                job_id=self.job_id, worker_id=self.worker_id, step=step, weight=weight
            )
        )
        for sid in self.by_server[server_id]:
            yield parameter_pb2.PushRequest(
                grad=tensor_pb2.ShardTensor(
                    shard_id=sid, version=step, tensor=codec.encode(grads[sid], self.wire_dtype)
                )
            )

    def _push_one(
        self, server_id: str, step: int, weight: float, grads: Mapping[str, torch.Tensor]
    ) -> parameter_pb2.PushResponse:
        call = self.stubs[server_id].Push.future(
            self._push_messages(server_id, step, weight, grads),
            timeout=self.timeout_s,
        )
        self._track(call)
        try:
            resp: parameter_pb2.PushResponse = call.result()
            return resp
        finally:
            self._untrack(call)

    def push(self, step: int, weight: float, grads: Mapping[str, torch.Tensor]) -> None:
        """Push to every server in parallel; raises the first server error."""
        futures = [self.executor.submit(self._push_one, s, step, weight, grads) for s in self.stubs]
        errors = []
        for f in futures:
            try:
                f.result()
            except grpc.RpcError as err:
                errors.append(err)
        if errors:
            raise errors[0]
