"""Talk to every parameter server in parallel: pull all shards, push all gradients.

`ServerPool` is the trainer's `ParameterClient` over gRPC. As in BytePS (OSDI'20), each
worker talks to every server directly and each link is used once per direction per step.
Pushes may be compressed (int8 or top-k, `lmps.core.compress`) with error feedback: the
residuals are the pool's, one per shard, kept across pushes. Uncompressed, an embedding
shard travels as its nonzero rows whenever that is the smaller message (lossless:
`lmps.core.sparse_rows`). With gradient clipping on the servers (`clip`) every push is
followed by the exchange of its step's global norm (`lmps.core.clip.StepCommitter`:
GradNorm, then ApplyStep, on every server in parallel).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc
import torch

from lmps.core.clip import StepCommitter
from lmps.core.compress import NONE, Compression, ErrorFeedback
from lmps.core.partition import Shard
from lmps.core.sparse_rows import RowGrid, encode_push, push_grids
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.rpc.clip import GrpcNormServer
from lmps.services.worker.pulls import PullStream, Sink
from lmps.v1 import parameter_pb2


class Cancellable(Protocol):
    """A call in flight (a Pull's iterator, a Push's future)."""

    def cancel(self) -> bool: ...


PULL = "/lmps.v1.ParameterService/Pull"
PUSH = "/lmps.v1.ParameterService/Push"


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
        mixed_versions: bool = False,
        *,
        compression: Compression = NONE,
        clip: bool = False,
        sparse_rows: bool = True,
    ) -> None:
        self.job_id = job_id
        self.worker_id = worker_id
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.mixed_versions = mixed_versions
        """Bounded staleness and ASYNC: a pull may find the servers at different versions."""
        self.compression = compression
        """How pushes travel; "none": dense in `wire_dtype` (no residuals, no extra copy)."""
        self.feedback = (
            None if compression.kind == "none" else ErrorFeedback(compression, wire_dtype)
        )
        """Error-feedback residuals of compressed pushes (topk values go in `wire_dtype`)."""
        self.row_grids: dict[str, RowGrid] = (
            push_grids(shards) if sparse_rows and self.feedback is None else {}
        )
        """Shards pushed as their nonzero rows when that is smaller (uncompressed pushes;
        `sparse_rows=False`: none, every push dense)."""
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
        # Pull and Push carry their tensors pre-serialized (no message objects: one copy each
        # way, `codec.shard_tensor_bytes` / `codec.view_shard_tensor`); same wire messages.
        self._pull_raw = {
            sid: ch.unary_stream(
                PULL,
                request_serializer=parameter_pb2.PullRequest.SerializeToString,
                response_deserializer=None,
            )
            for sid, ch in self.channels.items()
        }
        self._push_raw = {
            sid: ch.stream_unary(
                PUSH,
                request_serializer=None,
                response_deserializer=parameter_pb2.PushResponse.FromString,
            )
            for sid, ch in self.channels.items()
        }
        self._calls: set[Cancellable] = set()  # calls in flight
        self._calls_lock = threading.Lock()
        self._generation = 0  # one per epoch or evaluation (`begin`)
        self._cancelled = -1  # the generation cancelled last
        self.executor = ThreadPoolExecutor(
            max_workers=max(1, 2 * len(self.channels)), thread_name_prefix="ps"
        )
        self.committer: StepCommitter | None = None
        """The servers clip each step by its global norm (SYNC, `JobSettings.clip_on_servers`):
        each push is followed by the exchange of its norm, and a pull for v by the one of
        step v - 1 when this worker did not make it."""
        if clip:
            norms = {
                sid: GrpcNormServer(ch, job_id, timeout_s, track=self._track, untrack=self._untrack)
                for sid, ch in self.channels.items()
            }
            self.committer = StepCommitter(norms, shards, fanout=self._fanout)

    def _fanout(self, fn: Callable[[str], Any], items: Sequence[str]) -> list[Any]:
        """`fn` over every item in parallel on the pool's threads; raises the first error."""
        futures = [self.executor.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    def begin(self) -> int:
        """A new generation of calls (an epoch's, an evaluation's); `cancel(generation)`
        then cancels those in flight and those made later, until the next `begin`."""
        with self._calls_lock:
            self._generation += 1
            return self._generation

    def _track(self, call: Cancellable) -> None:
        with self._calls_lock:
            self._calls.add(call)
            cancelled = self._cancelled == self._generation
        if cancelled:  # a pull made just after its epoch was cancelled would wait forever
            call.cancel()

    def _untrack(self, call: Cancellable) -> None:
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

    def open_pull(
        self,
        min_version: int,
        sink: Sink,
        timeout_s: float | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> PullStream:
        """Start a pull of every shard (or of `shard_ids`) at a version >= min_version;
        each shard goes to `sink` as it arrives (`PullStream`). With clipping, step
        min_version - 1 is committed first unless this pool did (a no-op where it is
        applied: one GradNorm round trip)."""
        if self.committer is not None:
            self.committer.before_pull(min_version)
        return PullStream(self, min_version, sink, timeout_s, shard_ids)

    def pull(
        self,
        min_version: int,
        timeout_s: float | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """All shards (or `shard_ids`) from their servers at a version >= min_version:
        (version, values as read-only views of the received bytes). SYNC: one version
        everywhere; bounded staleness and ASYNC: each server answers at a version >=
        min_version, and the lowest is the one the gradient counts as computed at."""
        values: dict[str, torch.Tensor] = {}
        version = self.open_pull(min_version, values.__setitem__, timeout_s, shard_ids).result()
        return version, values

    def open_push(self, step: int, weight: float, computed_at: int | None = None) -> PushStream:
        """Start this worker's push for `step` to every server now, before the gradients
        exist: each shard goes out as soon as it is `add`ed (during backward), so the push
        overlaps the computation that produces it (DDP's bucketed all-reduce idea)."""
        return PushStream(self, step, weight, computed_at)

    def push(
        self,
        step: int,
        weight: float,
        grads: Mapping[str, torch.Tensor],
        computed_at: int | None = None,
    ) -> int:
        """Push to every server in parallel; raises the first server error. Returns the
        highest version among the servers' answers (`PushStream.close`)."""
        stream = PushStream(self, step, weight, computed_at, shard_ids=list(grads))
        try:
            for sid, grad in grads.items():
                stream.add(sid, grad)
        except BaseException:
            stream.abort()
            raise
        return stream.close()


class PushStream:
    """One push of one step, one client stream per server fed from a queue: the header at
    once, then each shard's gradient as it is added (a shard goes to its owner and backup).
    The server sees an ordinary Push; it is keyed by shard id, so order does not matter."""

    def __init__(
        self,
        pool: ServerPool,
        step: int,
        weight: float,
        computed_at: int | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> None:
        """`shard_ids`: the shards this push carries (streaming fragments: one fragment's;
        a server holding none of them gets the header alone); None: every shard."""
        self._pool, self._step = pool, step
        self._sends = {
            server: sum(1 for sid in sids if shard_ids is None or sid in shard_ids)
            for server, sids in pool.by_server.items()
        }
        self.grad_norm = 0.0
        """The global norm of the step's gradient (before clipping), once `close` returned,
        when the servers clip; 0.0 otherwise."""
        header = parameter_pb2.PushHeader(
            job_id=pool.job_id,
            worker_id=pool.worker_id,
            step=step,
            weight=weight,
            computed_at=computed_at,
        )
        self._header = parameter_pb2.PushRequest(header=header).SerializeToString()
        self._queues: dict[str, queue.SimpleQueue[tuple[str, torch.Tensor] | None]] = {
            s: queue.SimpleQueue() for s in pool.by_server
        }
        self._holders: dict[str, list[str]] = {}
        for server, sids in pool.by_server.items():
            for sid in sids:
                self._holders.setdefault(sid, []).append(server)
        # Compressed: each shard is encoded once, by whichever request thread reaches it
        # first (owner and backup get the same bytes, so both replicas make the same update),
        # and its new residual is kept only when every server accepted the push (`close`):
        # a failed or aborted push leaves the residuals as they were, since none of its
        # values counts as sent. One push at a time per pool: a push starts from the
        # residuals the last completed one left.
        self._feedback = pool.feedback
        self._staged: dict[str, torch.Tensor] = {}  # shard -> residual once this push is done
        self._blobs: dict[str, tuple[bytes, int]] = {}  # shard -> (bytes, sends still to go)
        self._once = {sid: threading.Lock() for sid in self._holders} if self._feedback else {}
        self._calls: dict[str, grpc.Future] = {}
        for server in pool.by_server:
            call = pool._push_raw[server].future(self._messages(server), timeout=pool.timeout_s)
            pool._track(call)
            self._calls[server] = call

    def _messages(self, server: str) -> Iterator[bytes]:
        yield self._header
        for _ in range(self._sends[server]):
            item = self._queues[server].get()
            if item is None:  # aborted: the call is being cancelled, the server refuses it
                return
            sid, grad = item
            # PushRequest.grad (field 2), encoded straight from the gradient's memory, here
            # on gRPC's request thread rather than on the one running backward.
            if self._feedback is None:
                yield self._dense(sid, grad)
            else:
                yield self._compressed(sid, grad)

    def _dense(self, sid: str, grad: torch.Tensor) -> bytes:
        """An uncompressed push of `sid`: its nonzero rows when that message is smaller (the
        same decoded values: `lmps.core.sparse_rows`), else the shard in the wire dtype."""
        pool = self._pool
        grid = pool.row_grids.get(sid)
        sent = grad if grid is None else encode_push(grad, grid, pool.wire_dtype)
        if isinstance(sent, torch.Tensor):
            return codec.shard_tensor_bytes(sid, self._step, sent, pool.wire_dtype, wrap=2)
        return codec.compressed_shard_bytes(sid, self._step, sent, wrap=2)

    def _compressed(self, sid: str, grad: torch.Tensor) -> bytes:
        """The error-feedback step for `sid`, made once for all its holders."""
        assert self._feedback is not None
        with self._once[sid]:
            blob, left = self._blobs.pop(sid, (b"", len(self._holders[sid])))
            if not blob:
                sent, self._staged[sid] = self._feedback.step(sid, grad)
                blob = codec.compressed_shard_bytes(sid, self._step, sent, wrap=2)
            if left > 1:  # the other holder's stream sends the same bytes
                self._blobs[sid] = (blob, left - 1)
            return blob

    def add(self, shard_id: str, grad: torch.Tensor) -> None:
        """The final gradient of `shard_id` (not written to until `close` returns)."""
        for server in self._holders[shard_id]:
            self._queues[server].put((shard_id, grad))

    def close(self) -> int:
        """Wait for every server's answer (each shard must have been added); raises the first
        server error. Returns the highest version among the answers (each server's version
        after the push; under ASYNC the version the push made there). With clipping, then
        commits the step (waits for its last push, exchanges its norm: `grad_norm`) and
        returns the version after that."""
        errors = []
        versions = []
        for call in self._calls.values():
            try:
                versions.append(int(call.result().version))
            except grpc.RpcError as err:
                errors.append(err)
            finally:
                self._pool._untrack(call)
        if errors:
            raise errors[0]
        if self._feedback is not None:
            self._feedback.commit(self._staged)
        committer = self._pool.committer
        if committer is not None:
            self.grad_norm = committer.after_push(self._step)
            return self._step + 1
        return max(versions)

    def abort(self) -> None:
        """Give up this push (backward failed, the epoch was cancelled): every stream is
        cancelled, so no server applies a partial gradient."""
        for server, call in self._calls.items():
            self._queues[server].put(None)
            call.cancel()
            self._pool._untrack(call)
