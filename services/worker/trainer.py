"""The worker's training loop: lease -> pull -> step -> push, one epoch at a time.

This is the worker side of the Parameter Server (Li et al., OSDI'14, Algorithm 1): for each
data shard it is given, a worker pulls the current weights from the servers, computes a
gradient on one batch and pushes it back; the servers aggregate and update. Run here in
bulk synchronous (BSP) mode: every pull waits for the version the last step produced, and the
worker follows whatever version it pulled, so all workers of a step compute at the same
weights and the servers apply their weighted mean once per step.

Plain Python + torch: no gRPC and no protobuf. The loop talks to its collaborators through
the small Protocols below; `ServerPool` (gRPC to every parameter server) is a
`ParameterClient`, `services/worker/leases.py` is the coordinator's `LeaseSource`, and the
in-process tests plug a `ParameterStore` and a fake lease queue into the same loop.
Lines marked `# SYNC:` are where a new consistency mode (async, bounded staleness, local
steps) would branch; `# ASYNC:` marks where the asynchronous mode does (`asynchronous`: each
push is applied at once, the worker never waits for the others).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from lmps.core import clip
from lmps.core.errors import InvalidArgument
from lmps.core.model import GPTConfig
from lmps.core.tasks import TASKS, Task
from lmps.services.worker.fragments import StreamingLoop
from lmps.services.worker.local_steps import InnerLoop

# -- collaborators -------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """A run of batches of one data shard, handed to one worker for one epoch."""

    lease_id: str
    data_shard: int
    """Index of the data shard in the epoch's order."""
    first_batch: int
    """Index (within the data shard) of the first batch in `tokens`."""
    batches: int
    """Batches in `tokens`."""
    tokens: torch.Tensor
    """Int tokens (batches * batch_size, block_size + 1), batch-major."""


class LeaseSource(Protocol):
    """Hands out the epoch's data; the coordinator in the cluster."""

    def next_lease(self, epoch: int, next_step: int) -> Lease | None:
        """The next lease of `epoch` for a worker about to compute `next_step`; None when the
        epoch has no data left (the worker is then released from the barrier)."""
        ...

    def complete(self, lease: Lease) -> None:
        """Report every batch of `lease` trained."""
        ...


class ParameterClient(Protocol):
    """Every parameter server of the job, seen as one; `ServerPool` in the cluster."""

    def pull(
        self,
        min_version: int,
        timeout_s: float | None = None,
        shard_ids: Collection[str] | None = None,
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Every shard's value (or those of `shard_ids`) at a version >= `min_version`:
        (version, {shard_id: value}). SYNC: one version everywhere. Bounded staleness and
        ASYNC: servers may answer at different versions; `version` is then the lowest."""
        ...

    def push(
        self,
        step: int,
        weight: float,
        grads: Mapping[str, torch.Tensor],
        computed_at: int | None = None,
    ) -> int | None:
        """This worker's gradient for `step`, weighted by `weight` (its batch's sequences),
        computed at version `computed_at` (None: at `step`; bounded staleness and ASYNC set
        it). Returns the highest version among the servers' answers (their versions after
        the push), or None from a client that does not say."""
        ...

    def open_push(self, step: int, weight: float, computed_at: int | None = None) -> GradientSink:
        """`push`, fed shard by shard while backward runs (see `GradientSink`)."""
        ...

    def cancel(self) -> None:
        """Abort pulls and pushes in flight (the epoch that needed them was cancelled)."""
        ...


class PullInFlight(Protocol):
    """A pull whose shards go to the model as they arrive (`ServerPool.open_pull`)."""

    waited_s: float
    """Seconds spent blocked on it so far."""

    def version(self) -> int:
        """The version it answers at (what `ParameterClient.pull` returns first)."""
        ...

    def wait(self, shard_ids: Iterable[str]) -> None: ...

    def result(self) -> int:
        """Until every shard is loaded; raises the pull's error. Returns `version()`."""
        ...

    def cancel(self) -> None: ...


@runtime_checkable
class StreamingPulls(Protocol):
    """A `ParameterClient` that can also pull shard by shard (`ServerPool`)."""

    def open_pull(
        self,
        min_version: int,
        sink: Callable[[str, torch.Tensor], None],
        timeout_s: float | None = None,
    ) -> PullInFlight: ...


class GradientSink(Protocol):
    """One push in progress: `add` each shard's final gradient (any order, each once), then
    `close` (waits for the servers, raises their error, returns what `ParameterClient.push`
    returns); `abort` gives it up, applying nothing anywhere."""

    grad_norm: float
    """Once `close` returned: the global norm of the step's gradient before clipping, where
    the servers clip it (SYNC with max_grad_norm: `ServerPool` exchanges it); else 0.0."""

    def add(self, shard_id: str, grad: torch.Tensor) -> None: ...

    def close(self) -> int | None: ...

    def abort(self) -> None: ...


class CollectingPush:
    """A `GradientSink` that collects and makes one `push` at `close`: for clients that
    cannot stream (the in-process tests' stores)."""

    def __init__(
        self, client: ParameterClient, step: int, weight: float, computed_at: int | None = None
    ) -> None:
        self.client, self.step, self.weight = client, step, weight
        self.computed_at = computed_at
        self.grads: dict[str, torch.Tensor] = {}
        self.grad_norm = 0.0

    def add(self, shard_id: str, grad: torch.Tensor) -> None:
        self.grads[shard_id] = grad

    def close(self) -> int | None:
        return self.client.push(self.step, self.weight, self.grads, self.computed_at)

    def abort(self) -> None:
        self.grads = {}


class StepModel(Protocol):
    """A model replica filled from shards; `Replica` in the cluster."""

    def load(self, values: Mapping[str, torch.Tensor]) -> None: ...

    def load_one(self, shard_id: str, value: torch.Tensor) -> None: ...

    def train_step(
        self,
        batch: torch.Tensor,
        on_grad: Callable[[str, torch.Tensor], None] | None = None,
        arrivals: PullInFlight | None = None,
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """(loss, every shard's gradient); `on_grad` gets each one as soon as it is made;
        with `arrivals`, each layer's forward first waits for its own shards."""
        ...


# -- the loop ------------------------------------------------------------------------------


@dataclass
class _Sync:
    """Streaming fragments: one fragment's push and pull, in flight on the sync thread, and
    the results of the window it syncs (reported once it is settled)."""

    step: int
    future: Future[tuple[dict[str, torch.Tensor], float, float]]
    results: list[StepResult]
    busy_s: float
    """Seconds the worker spent on the window (training and settling the sync before)."""


@dataclass(frozen=True)
class StepResult:
    """One batch trained: what the worker reports for it."""

    worker_id: str
    step: int
    """The step the batch's update was applied as: from version `step` + 1 on, every
    server's parameters hold it. The version the gradient was pushed for; under ASYNC the
    highest version among the servers just before each applied it."""
    loss: float
    """Mean cross-entropy of the batch."""
    tokens: int
    """Target tokens in the batch."""
    tokens_per_s: float
    """`tokens` over the whole step (pull + compute + push)."""
    pull_s: float
    compute_s: float
    push_s: float
    lease_id: str
    data_shard: int
    batch_index: int
    """Index of the batch within its data shard."""
    computed_at: int
    """The version the gradient was computed at: `step` under SYNC; at most max_staleness
    below it under bounded staleness; the round's start under local steps; under ASYNC the
    lowest version the worker pulled (any number of versions below `step`)."""
    grad_norm: float = 0.0
    """With max_grad_norm: the global L2 norm of the gradient clipped, before clipping. SYNC:
    the step's mean gradient (the same on every worker of the step); ASYNC: this push's;
    local steps: this batch's inner step. 0.0 when clipping is off."""


class Trainer:
    """One worker's loop over one model replica. Not thread-safe: one epoch at a time.

    `step` is the step the worker computes next (read by status calls while training).
    """

    def __init__(
        self,
        *,
        worker_id: str,
        model: StepModel,
        params: ParameterClient,
        leases: LeaseSource,
        batch_size: int,
        step: int = 0,
        local: InnerLoop | None = None,
        staleness: int = 0,
        asynchronous: bool = False,
        weigh: Callable[[torch.Tensor], float] | None = None,
        max_grad_norm: float = 0.0,
        streaming: StreamingLoop | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.model = model
        self.params = params
        self.leases = leases
        self.batch_size = batch_size
        self.step = step
        self.local = local
        """Local steps (DiLoCo): each push is a round of `local.steps` batches; None: each
        batch pushes its gradient."""
        self.streaming = streaming
        """Streaming fragments (over `local`'s inner loop): each push is one fragment's,
        after a window of H / F batches, and a lease ends with F - 1 flushes."""
        if streaming is not None and (local is None or streaming.inner is not local):
            raise ValueError("streaming fragments run over the trainer's local steps")
        self._sync_thread: ThreadPoolExecutor | None = None
        """Streaming fragments: where a fragment's push and pull run (one at a time)."""
        self.staleness = staleness
        """Bounded staleness: how many steps this worker may run ahead of the servers'
        version (0: SYNC)."""
        self.asynchronous = asynchronous
        """ASYNC: the servers apply each push at once; the worker pulls whatever version
        they are at (at least the one after its last push's step, which that push made on
        every server: the pull never waits) and never waits for the other workers."""
        self._computed_at: int | None = None
        self.weigh = weigh or (lambda batch: float(batch.shape[0]))
        """A batch's push weight (`lmps.core.tasks.Task.weight`): its sequences, or for SFT
        its target tokens, so the servers' weighted mean is the union batch's mean loss
        gradient."""
        if max_grad_norm and not asynchronous:
            raise ValueError("a worker clips its own pushes under ASYNC only")
        self.max_grad_norm = max_grad_norm
        """ASYNC: clip each push's gradient by its global norm here, before it is sent (an
        update is one push: exactly clip_grad_norm_ of it). SYNC clips on the servers
        (`ServerPool`), local steps the inner gradients (`InnerLoop`)."""

    def cancel(self) -> None:
        """Unblock a pull waiting on the barrier (the epoch was cancelled)."""
        self.params.cancel()

    def run_epoch(
        self, epoch: int, start_step: int, active: Callable[[], bool] = lambda: True
    ) -> Iterator[StepResult]:
        """Train on leases of `epoch` until none is left or `active()` turns false.

        Yields one result per batch. A lease is completed once all its batches are trained;
        a lease cut short by `active()` is not (the coordinator gives it to someone else).
        """
        self.step = start_step
        if self.streaming is not None:
            self.streaming.ready = False  # an epoch starts from a full pull
        while active():
            lease = self.leases.next_lease(epoch, self.step)
            if lease is None:
                # SYNC: out of data; the source has released this worker from the barrier,
                # so the others' next steps no longer wait for its push. ASYNC: nobody
                # waits for it anyway.
                return
            # SYNC: one push per version. A push is one batch's gradient, or under local
            # steps one round's pseudo-gradient: up to H batches of this lease (rounds never
            # cross leases, so the last round of a lease may be shorter).
            if self.streaming is not None:
                if not (yield from self._train_streaming(lease, active)):
                    return  # cancelled: the lease is not complete
                self.leases.complete(lease)
                continue
            per = 1 if self.local is None else self.local.steps
            for first in range(0, lease.batches, per):
                if not active():
                    return
                if self.local is None:
                    yield self._train_batch(lease, first, self._batch(lease, first))
                else:
                    n = min(per, lease.batches - first)
                    results = self._train_round(lease, first, n, active)
                    if results is None:
                        return  # cancelled mid-round: nothing was pushed
                    yield from results
                # The next step is the next version. ASYNC: the push made it on every server,
                # so the next pull, for it, never waits.
                self.step += 1
            self.leases.complete(lease)

    def _pull(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Pull before every step (or round). SYNC: wait for the version the last step
        produced. Bounded staleness s: any version >= step - s will do (Petuum SSP's read
        rule), so a worker runs up to s steps ahead of the slowest before it waits. ASYNC:
        the version after its last push's step, which that push made on every server: it
        never waits, and sees whatever the servers are at.

        A worker that joined mid-epoch (or lagged) moves up to the servers' version: its
        gradient is then pushed for that step."""
        version, values = self.params.pull(max(0, self.step - self.staleness))
        self._adopt(version)
        return version, values

    def _adopt(self, version: int) -> None:
        """The step is the version pulled (a worker that lagged moves up to it)."""
        self.step = max(self.step, version)
        # Bounded staleness: the push says which version its gradient was computed at (the
        # servers check it against the bound); SYNC leaves it out (it is the step). ASYNC:
        # the push is for the version pulled (the lowest), and says so too.
        self._computed_at = version if self.staleness or self.asynchronous else None

    def _open_pull(self) -> tuple[int, PullInFlight | None]:
        """`_pull` into the model: shard by shard as they arrive where the client can
        (the forward then waits per layer: `train_step(arrivals=)`), else all at once."""
        if not isinstance(self.params, StreamingPulls):
            version, values = self._pull()
            self.model.load(values)
            return version, None
        pull = self.params.open_pull(max(0, self.step - self.staleness), self.model.load_one)
        try:
            version = pull.version()
        except BaseException:
            pull.cancel()
            raise
        self._adopt(version)
        return version, pull

    def _batch(self, lease: Lease, b: int) -> torch.Tensor:
        return lease.tokens[b * self.batch_size : (b + 1) * self.batch_size]

    def _train_round(
        self, lease: Lease, first: int, n: int, active: Callable[[], bool]
    ) -> list[StepResult] | None:
        """Local steps: pull, `n` inner steps on batches `first`.. of the lease, push Δ.
        One result per batch, all at the round's version; the round's pull time is on its
        first batch and its push time on its last."""
        assert self.local is not None
        t0 = time.perf_counter()
        version, values = self._pull()
        t1 = time.perf_counter()
        batches = [self._batch(lease, first + k) for k in range(n)]
        done = self.local.run_round(version, values, batches, active)
        if done is None:
            return None
        del values
        t2 = time.perf_counter()
        weight = sum(self.weigh(b) for b in batches)
        self.params.push(self.step, weight, done.delta, self._computed_at)
        t3 = time.perf_counter()
        tokens = [b.shape[0] * (b.shape[1] - 1) for b in batches]
        return [
            StepResult(
                worker_id=self.worker_id,
                step=self.step,
                loss=done.losses[k],
                tokens=tokens[k],
                tokens_per_s=sum(tokens) / max(t3 - t0, 1e-9),
                pull_s=t1 - t0 if k == 0 else 0.0,
                compute_s=done.compute_s[k],
                push_s=t3 - t2 if k == n - 1 else 0.0,
                lease_id=lease.lease_id,
                data_shard=lease.data_shard,
                batch_index=lease.first_batch + first + k,
                computed_at=version,
                grad_norm=done.norms[k],
            )
            for k in range(n)
        ]

    def _train_streaming(
        self, lease: Lease, active: Callable[[], bool]
    ) -> Generator[StepResult, None, bool]:
        """Streaming fragments: the lease's windows of K batches, each followed by the push
        of fragment (version mod F) and the pull of its new values at version + 1, then the
        F - 1 flushes. With overlap a window's sync runs while the next window trains, and
        is settled (rebased) after it. One result per batch, at its window's version, as
        soon as its sync is settled (a flush reports nothing: the coordinator knows where
        they fall, and counts a lease in the parameters from its last flush on); push_s
        and pull_s are the sync's time not hidden behind training, and a flush's time is in
        no result. False when cancelled (nothing of the window in progress pushed; the
        epoch's next lease starts from a full pull)."""
        s = self.streaming
        assert s is not None
        if not s.ready:
            _, values = self._pull()
            s.reset(values)
            del values
        pending: _Sync | None = None  # overlap: the last window's sync, in flight
        try:
            for first in range(0, lease.batches, s.window):
                if not active():
                    s.ready = False
                    return False
                t0 = time.perf_counter()
                n = min(s.window, lease.batches - first)
                batches = [self._batch(lease, first + k) for k in range(n)]
                weight = sum(self.weigh(b) for b in batches)
                done = s.train(self.step, batches, weight, active)
                if done is None:
                    return False
                t1 = time.perf_counter()
                if pending is not None:  # the window before: settle its sync, report it
                    yield from self._settle(pending)
                    pending = None
                t2 = time.perf_counter()
                tokens = [b.shape[0] * (b.shape[1] - 1) for b in batches]
                results = [
                    StepResult(
                        worker_id=self.worker_id,
                        step=self.step,
                        loss=done.losses[k],
                        tokens=tokens[k],
                        tokens_per_s=0.0,  # set once its sync is settled
                        pull_s=0.0,
                        compute_s=done.compute_s[k],
                        push_s=0.0,
                        lease_id=lease.lease_id,
                        data_shard=lease.data_shard,
                        batch_index=lease.first_batch + first + k,
                        computed_at=self.step,
                        grad_norm=done.norms[k],
                    )
                    for k in range(n)
                ]
                pending = self._start_sync(results, (t1 - t0) + (time.perf_counter() - t2))
                if not s.overlap:
                    yield from self._settle(pending)
                    pending = None
                self.step += 1
            if pending is not None:
                yield from self._settle(pending)
                pending = None
            for _ in range(s.fragments - 1):
                if not active():
                    s.ready = False
                    return False
                self._settle_now(self._start_sync([], 0.0))
                self.step += 1
            return True
        finally:
            if pending is not None and not pending.future.cancel():
                # Cancelled or failed with a sync in flight: let it end (a push cut half-way
                # would be on some servers only; a cancelled epoch cancels the pool's calls,
                # so a pull waiting on a frozen barrier ends too), then drop the rest.
                s.ready = False
                pending.future.exception()

    def _start_sync(self, results: list[StepResult], busy_s: float) -> _Sync:
        """Push fragment (step mod F)'s Δ for `step` and pull its values at step + 1, on the
        sync thread (SYNC: the pull waits for every member's push of the step)."""
        s = self.streaming
        assert s is not None
        step = self.step
        delta, weight = s.delta(step)
        if self._sync_thread is None:
            self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix="fragment-sync")

        def run() -> tuple[dict[str, torch.Tensor], float, float]:
            t_push = time.perf_counter()
            self.params.push(step, weight, delta, self._computed_at)
            t_pull = time.perf_counter()
            _, values = self.params.pull(step + 1, shard_ids=list(delta))
            return values, t_pull - t_push, time.perf_counter() - t_pull

        return _Sync(step, self._sync_thread.submit(run), results, busy_s)

    def _settle_now(self, sync: _Sync) -> tuple[float, float]:
        """Wait for `sync`, then take its fragment's new values (`StreamingLoop.settle`):
        (push seconds, pull seconds) not hidden behind training."""
        s = self.streaming
        assert s is not None
        t0 = time.perf_counter()
        try:
            values, push_s, pull_s = sync.future.result()
        except BaseException:
            s.ready = False
            raise
        s.settle(sync.step, values)
        # Only the part waited for counts (with overlap the rest ran behind training),
        # shared between push and pull as their durations are.
        waited = time.perf_counter() - t0
        share = min(1.0, waited / (push_s + pull_s)) if push_s + pull_s > 0 else 0.0
        return push_s * share, pull_s * share

    def _settle(self, sync: _Sync) -> Iterator[StepResult]:
        """`_settle_now`, then `sync`'s window's results with its timings."""
        push_s, pull_s = self._settle_now(sync)
        n = len(sync.results)
        total = sum(r.tokens for r in sync.results)
        wall = max(sync.busy_s + push_s + pull_s, 1e-9)
        for k, r in enumerate(sync.results):
            last = k == n - 1
            yield dataclasses.replace(
                r,
                tokens_per_s=total / wall,
                push_s=push_s if last else 0.0,
                pull_s=pull_s if last else 0.0,
            )

    def _train_batch(self, lease: Lease, b: int, batch: torch.Tensor) -> StepResult:
        t0 = time.perf_counter()
        version, pull = self._open_pull()
        t1 = time.perf_counter()
        before = 0.0 if pull is None else pull.waited_s
        # SYNC: push the plain gradient of this step, weighted by the batch's sequences; each
        # shard leaves while backward still runs (push_s: the part not hidden behind it).
        try:
            sink = self.params.open_push(self.step, self.weigh(batch), self._computed_at)
        except BaseException:
            if pull is not None:
                pull.cancel()
            raise
        norm = 0.0
        # Only a streamed pull has arrivals to wait for (models that cannot take them are
        # only ever given whole pulls).
        arrivals: dict[str, Any] = {} if pull is None else {"arrivals": pull}
        try:
            if self.max_grad_norm:
                # ASYNC clipping: the whole gradient's norm first, so nothing leaves during
                # backward (no overlap), then the clipped shards.
                loss, grads = self.model.train_step(batch, **arrivals)
                norm = clip.clip_(grads, self.max_grad_norm)
                for sid, g in grads.items():
                    sink.add(sid, g)
            else:
                loss, _ = self.model.train_step(batch, on_grad=sink.add, **arrivals)
            if pull is not None:
                pull.result()  # every shard loaded (those forward did not use too)
        except BaseException:
            sink.abort()
            if pull is not None:
                pull.cancel()
            raise
        t2 = time.perf_counter()
        # The pull not hidden behind forward: the wait for its version, and for shards
        # forward reached before they arrived.
        hidden_wait = 0.0 if pull is None else pull.waited_s - before
        made = sink.close()
        t3 = time.perf_counter()
        norm = norm or sink.grad_norm
        n_tokens = batch.shape[0] * (batch.shape[1] - 1)
        step = self.step
        if self.asynchronous and made is not None:
            # ASYNC: each server applied the push at its own version, at once; from the
            # highest version it made on, every server holds it (what the event reports).
            step = made - 1
        return StepResult(
            worker_id=self.worker_id,
            step=step,
            loss=loss,
            tokens=n_tokens,
            tokens_per_s=n_tokens / max(t3 - t0, 1e-9),
            pull_s=t1 - t0 + hidden_wait,
            compute_s=t2 - t1 - hidden_wait,
            push_s=t3 - t2,
            lease_id=lease.lease_id,
            data_shard=lease.data_shard,
            batch_index=lease.first_batch + b,
            computed_at=version,
            grad_norm=norm,
        )


# -- evaluation ----------------------------------------------------------------------------


def check_eval_tokens(sequences: torch.Tensor, config: GPTConfig, task: Task | None = None) -> None:
    """Raise InvalidArgument unless `sequences` are int (N, T+1) rows the model can score in
    the layout of `task` (default: language modelling, token ids in the vocabulary, T at
    most block_size)."""
    try:
        (task or TASKS["lm"]).check(sequences, config)
    except ValueError as err:
        raise InvalidArgument(f"evaluate: {err}") from None
