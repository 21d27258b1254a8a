"""One pull of every shard from every server, handed out shard by shard as it arrives.

`ServerPool.open_pull` starts one Pull stream per server on the pool's threads and gives
each shard to a sink the moment its message is parsed (the trainer's sink copies it into the
replica's parameter), so the next forward can start on the first layers while the later
ones are still on the wire: each layer waits only for its own shards (`wait`, called from
the replica's forward pre-hooks). This is the pull half of overlapping communication with
computation (the push half is `PushStream`, fed by backward's gradient hooks); the values
loaded are the same bytes as a whole pull's, so a step's result does not change.

Errors end the pull at once: a failed stream (a dead server, a cancelled epoch, a malformed
message) wakes every waiter with that error, and the others are cancelled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import torch

from lmps.rpc import codec
from lmps.v1 import parameter_pb2

if TYPE_CHECKING:
    from lmps.services.worker.pool import ServerPool

Sink = Callable[[str, torch.Tensor], None]
"""Takes a shard's value: a READ-ONLY view of the received bytes (it keeps them alive)."""


class _Stream(Protocol):
    """A Pull call: its messages as received bytes, and cancel."""

    def __iter__(self) -> Iterator[bytes]: ...

    def cancel(self) -> bool: ...


class PullStream:
    """A pull in flight. `version` once the servers said which version they answer;
    `wait(shard_ids)` until those shards were handed to the sink; `result` at the end.
    One thread waits on it at a time (the trainer's); any thread may `cancel`."""

    def __init__(
        self,
        pool: ServerPool,
        min_version: int,
        sink: Sink,
        timeout_s: float | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> None:
        """`shard_ids`: pull only these (streaming fragments: one fragment's), from the
        servers that own one of them; None: every shard."""
        self._pool = pool
        self._sink = sink
        self._cond = threading.Condition()
        self._arrived: set[str] = set()
        owned = {
            server: [sid for sid in sids if shard_ids is None or sid in shard_ids]
            for server, sids in pool.owned.items()
        }
        self._expected = {sid for sids in owned.values() for sid in sids}
        if shard_ids is not None and self._expected != set(shard_ids):
            unknown = sorted(set(shard_ids) - self._expected)[:3]
            raise ValueError(f"pull: no server owns shards {unknown}")
        # A server none of `shard_ids` is on is still asked for one shard of its own (not
        # handed to the sink): the pull then also waits for its version, so this worker's
        # next push cannot reach it before it made the step (SYNC would refuse it).
        self._probes = {sids[0] for server, sids in pool.owned.items() if not owned[server]}
        for server, sids in pool.owned.items():
            owned[server] = owned[server] or sids[:1]
        self._expected |= self._probes
        self._servers = len(owned)
        self._versions: dict[str, int] = {}  # server -> the version it answers at
        self._error: BaseException | None = None
        self._running = len(owned)
        # The shards a caller is blocked on: an arrival wakes it only when it is one of them
        # (or the last), not once per message (each wake-up is a thread switch and a GIL
        # hand-over on the pull's critical path).
        self._want: frozenset[str] = frozenset()
        self._calls: list[_Stream] = []
        self.waited_s = 0.0
        """Seconds callers spent blocked in `version` and `wait`: the pull not hidden."""
        request = {
            server: parameter_pb2.PullRequest(
                job_id=pool.job_id,
                min_version=min_version,
                wire_dtype=codec.to_proto_dtype(pool.wire_dtype),
                # Only the shards this server owns (it may also hold backups of others).
                shard_ids=[] if mine == pool.by_server[server] else mine,
            )
            for server, mine in owned.items()
        }
        for server in owned:
            # No wait_for_ready: a dead server must fail the step now, not in ten minutes.
            call = pool._pull_raw[server](request[server], timeout=timeout_s or pool.timeout_s)
            pool._track(call)
            self._calls.append(call)
            pool.executor.submit(self._read, server, call)

    def _read(self, server: str, call: _Stream) -> None:
        try:
            for blob in call:
                sid, version, value = codec.view_shard_tensor(blob)
                with self._cond:
                    seen = self._versions.get(server)
                    if seen is None:  # a server's first message: its version is known
                        seen = self._versions[server] = version
                        self._cond.notify_all()
                if seen != version:
                    raise RuntimeError(f"server {server} sent mixed versions {seen}, {version}")
                if sid not in self._expected or sid in self._arrived:
                    raise RuntimeError(f"server {server} sent shard {sid!r} unasked or twice")
                if sid not in self._probes:
                    self._sink(sid, value)  # outside the lock: a copy of up to a shard's bytes
                with self._cond:
                    self._arrived.add(sid)
                    if sid in self._want or len(self._arrived) == len(self._expected):
                        self._cond.notify_all()
        except BaseException as err:  # handed to every waiter (a failed step, any cause)
            self._fail(err)
        finally:
            self._pool._untrack(call)
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            first = self._error is None
            if first:
                self._error = err
            self._cond.notify_all()
        if first:  # the step is lost: stop the other streams too
            for call in self._calls:
                call.cancel()

    def _block(self, ready: Callable[[], bool], want: Iterable[str] = ()) -> None:
        """Wait under the lock until `ready()` or an error (raised); `want`: the shards
        whose arrival may make it ready (besides the last shard and a stream's end)."""
        t0 = time.perf_counter()
        with self._cond:
            self._want = frozenset(want)
            while not ready() and self._error is None:
                if self._running == 0:  # every stream ended without it
                    missing = sorted(self._expected - self._arrived)[:3]
                    self._error = RuntimeError(f"pull ended without shards {missing}")
                    break
                self._cond.wait()
            self._want = frozenset()
            error = self._error
        self.waited_s += time.perf_counter() - t0
        if error is not None:
            raise error

    def version(self) -> int:
        """The version the pull answers at, once every server said (their first message).
        SYNC: one version everywhere (RuntimeError otherwise); bounded staleness and ASYNC
        (`mixed_versions`): the lowest, which the gradient counts as computed at."""
        n = self._servers
        self._block(lambda: len(self._versions) == n)
        versions = set(self._versions.values())
        if len(versions) != 1 and not self._pool.mixed_versions:
            err = RuntimeError(f"servers are at different versions {sorted(versions)}")
            self._fail(err)
            raise err
        return min(versions)

    def wait(self, shard_ids: Iterable[str]) -> None:
        """Until every one of `shard_ids` has been handed to the sink."""
        wanted = set(shard_ids)
        self._block(lambda: wanted <= self._arrived, wanted)

    def result(self) -> int:
        """Until every shard arrived and every stream ended; raises the pull's error.
        Returns `version()`."""
        self._block(lambda: self._arrived == self._expected and self._running == 0)
        return self.version()

    def cancel(self) -> None:
        """Give up the pull (the step failed): every stream is cancelled."""
        self._fail(RuntimeError("pull cancelled"))
