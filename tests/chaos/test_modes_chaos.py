"""The modes beyond SYNC survive failures, as SYNC does (docs/modes.md): real processes and
SIGKILL. Local steps (DiLoCo) lose a worker, the coordinator and a parameter server;
streaming fragments lose a worker and a parameter server; bounded staleness loses a worker
and keeps its bound; compressed (int8) pushes lose a worker and a parameter server. Every
batch is trained exactly once or counted by the epoch's summary (streaming fragments: at
least once, every repeat counted).

Each test prints a line for the closing note's table: fault, mode, outcome.
"""

from __future__ import annotations

import math
import re
import signal
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import grpc
import pytest
import torch

from lmps.client.launcher import LocalCluster
from lmps.core.data import plan_data_shards
from lmps.core.model import GPTConfig
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, job_pb2, parameter_pb2, parameter_pb2_grpc, tensor_pb2
from tests.chaos.test_failures import BATCH, SGD, by_step, kill_mid_push, start
from tests.cluster.jobs import Driver, make_spec

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

# Smaller than test_failures' MODEL: the local-steps rounds keep workers busy on their own.
MODEL = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128, dropout=0.0)
SEED = 7  # make_spec's: the data plan below depends on it
H = 4  # local steps per round
LEASE = 8  # batches per lease: two rounds of H
FRAGMENTS = 2  # streaming fragments: a window of H / F = 2 batches, one flush per lease
WINDOW = H // FRAGMENTS
BATCHES = 64  # eight leases, four per worker
OUTER = job_pb2.OptimizerConfig(
    kind=job_pb2.SGD, lr=0.7, momentum=0.9, nesterov=True, schedule=job_pb2.CONSTANT
)
INNER = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=3e-3, schedule=job_pb2.CONSTANT)
INT8 = job_pb2.PushCompression(kind=tensor_pb2.Compressed.INT8)


def learnable_tokens(n: int, seed: int) -> torch.Tensor:
    """Tokens a small model learns in a few steps: 16 of the vocabulary, each followed by
    the next one (mod 16) four times in five, else by a random one of the 16."""
    g = torch.Generator().manual_seed(seed)
    jumps = torch.where(
        torch.rand(n, generator=g) < 0.8,
        torch.ones(n, dtype=torch.int64),
        torch.randint(0, 16, (n,), generator=g),
    )
    return (torch.cumsum(jumps, 0) % 16).to(torch.int32)


def submit_mode(
    driver: Driver,
    *,
    local_steps: int = 0,
    fragments: int = 0,
    overlap: bool = False,
    staleness: int = -1,
    compression: job_pb2.PushCompression | None = None,
    lease: int = LEASE,
    batches: int = BATCHES,
    checkpoint_every: int = 0,
    replication: int = 1,
) -> str:
    """A job on every registered server and two workers: local steps H (0: none) in F
    streaming fragments (0: none), bounded staleness S (-1: SYNC), compressed pushes."""
    spec = make_spec(
        MODEL,
        OUTER if local_steps else SGD,
        batch_size=BATCH,
        batches_per_lease=lease,
        seed=SEED,
        shard_bytes=1 << 14,
        workers=2,
    )
    spec.num_servers = 0
    spec.checkpoint_every = checkpoint_every
    spec.replication = replication
    if local_steps:
        spec.local_steps.CopyFrom(
            job_pb2.LocalSteps(
                steps=local_steps, inner_optimizer=INNER, fragments=fragments, overlap=overlap
            )
        )
    if staleness >= 0:
        spec.consistency = job_pb2.BOUNDED_STALENESS
        spec.max_staleness = staleness
    if compression is not None:
        spec.push_compression.CopyFrom(compression)
    train = learnable_tokens(batches * BATCH * MODEL.block_size + 1, 5)
    evals = learnable_tokens(8 * MODEL.block_size + 1, 6)
    return driver.submit(spec, train, evals)


def run_until(
    driver: Driver,
    job_id: str,
    epoch: int,
    when: Callable[[list[job_pb2.StepEvent]], bool],
    fault: Callable[[], None],
) -> tuple[list[job_pb2.StepEvent], job_pb2.EpochSummary | None, int]:
    """Run an epoch, calling `fault()` once, after the first step event for which
    `when(events so far)` holds. Returns the step events, the summary and how many events
    came before the fault (-1: it never ran)."""
    stream: Iterator[job_pb2.ProgressEvent] = driver.stub.RunEpoch(
        coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=epoch), timeout=300
    )
    steps: list[job_pb2.StepEvent] = []
    summary = None
    faulted_at = -1
    for ev in stream:
        kind = ev.WhichOneof("kind")
        if kind == "step":
            steps.append(ev.step)
            if faulted_at < 0 and when(steps):
                faulted_at = len(steps)
                fault()
        elif kind == "summary":
            summary = ev.summary
    return steps, summary, faulted_at


def first_round_of_a_lease(victim: str, after: int) -> Callable[[list[job_pb2.StepEvent]], bool]:
    """Past `after` events, the last event of `victim`'s first round of a lease: it is then
    training the lease's second round (or waiting to), so the lease is half trained."""

    def when(steps: list[job_pb2.StepEvent]) -> bool:
        s = steps[-1]
        return len(steps) > after and s.worker_id == victim and s.batch_index % LEASE == H - 1

    return when


def batch_after(victim: str, after: int) -> Callable[[list[job_pb2.StepEvent]], bool]:
    """Past `after` events, the next event of `victim`."""
    return lambda steps: len(steps) > after and steps[-1].worker_id == victim


def shard_batches(batches: int, lease: int, epoch: int) -> list[int]:
    plan = plan_data_shards(batches * BATCH, BATCH, lease, SEED, epoch)
    return [len(ids) // BATCH for ids in plan]


def assert_trained_once(
    steps: list[job_pb2.StepEvent],
    summary: job_pb2.EpochSummary,
    lease: int,
    batches: int = BATCHES,
) -> set[tuple[int, int]]:
    """test_failures.assert_every_batch_trained for this file's data: every batch of every
    data shard appears, or the summary counts it as trained without an event; repeats only
    where the summary owns up (batches_redone). Returns the batches with no event."""
    sizes = shard_batches(batches, lease, summary.epoch)
    expected = {(j, b) for j, n in enumerate(sizes) for b in range(n)}
    seen = Counter((s.data_shard, s.batch_index) for s in steps)
    unreported = expected - set(seen)
    assert set(seen) <= expected, sorted(set(seen) - expected)
    assert summary.batches == len(steps) + len(unreported)
    assert sum(c - 1 for c in seen.values()) == summary.batches_redone
    assert summary.data_shards_completed == len(sizes)
    return unreported


def assert_rounds(steps: list[job_pb2.StepEvent], h: int, lease: int, epoch: int = 0) -> None:
    """Local steps: every lease's batches go in rounds, each H consecutive batches from a
    multiple of H (the last of a data shard may be shorter), reported at one version and in
    order; consecutive rounds of a lease are consecutive versions."""
    sizes = shard_batches(BATCHES, lease, epoch)
    rounds: dict[tuple[str, int], list[int]] = {}
    for s in steps:
        rounds.setdefault((s.lease_id, s.step), []).append(s.batch_index)
    for (lease_id, step), got in rounds.items():
        first = got[0]
        shard = int(lease_id.rsplit("-s", 1)[1])
        want = list(range(first, min(first + h, sizes[shard])))
        assert first % h == 0 and got == want, (lease_id, step, got)
    by_lease: dict[str, list[int]] = {}
    for lease_id, step in rounds:
        by_lease.setdefault(lease_id, []).append(step)
    for lease_id, versions in by_lease.items():
        assert versions == list(range(versions[0], versions[0] + len(versions))), (
            lease_id,
            versions,
        )


def uninterrupted(
    batches: int, lease: int, h: int, workers: tuple[str, ...] = ("worker-0", "worker-1")
) -> dict[int, set[tuple[int, int]]]:
    """The steps of an uninterrupted epoch 0 and their batches (`by_step` of one): under
    SYNC's deterministic leases worker i trains data shards i, i + W, ... in order, one
    round (H batches of one lease, one batch without local steps) per version."""
    out: dict[int, set[tuple[int, int]]] = {}
    for i, _ in enumerate(sorted(workers)):
        version = 0
        for j, n in enumerate(shard_batches(batches, lease, 0)):
            if j % len(workers) != i:
                continue
            for first in range(0, n, h):
                out.setdefault(version, set()).update(
                    (j, b) for b in range(first, min(first + h, n))
                )
                version += 1
    return out


def assert_composed(
    steps: list[job_pb2.StepEvent],
    summary: job_pb2.EpochSummary,
    ref: dict[int, set[tuple[int, int]]],
    lease: int,
) -> set[tuple[int, int]]:
    """No step (round) lost: the epoch made the reference's steps, each of its batches; a
    step's reported batches are the reference step's, and the batches no event reported are
    exactly the ones missing from them. Returns those."""
    unreported = assert_trained_once(steps, summary, lease)
    got = by_step(steps)
    assert summary.start_step == min(ref) and summary.end_step == max(ref) + 1
    bad = {s: sorted(c) for s, c in got.items() if not c <= ref.get(s, set())}
    assert not bad, f"steps made of other batches than the reference's: {bad}"
    assert set().union(*(ref[s] - got.get(s, set()) for s in ref)) == unreported
    return unreported


def metric(cluster: LocalCluster, member: str, name: str) -> float:
    """One unlabelled series of a member's Prometheus endpoint."""
    proc = next(p for p in cluster.procs if p.name == member)
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def staleness_buckets(cluster: LocalCluster, servers: list[str]) -> dict[str, int]:
    """lmps_ps_push_staleness_steps buckets (le -> cumulative count) summed over `servers`."""
    out: dict[str, int] = {}
    for name in servers:
        proc = next(p for p in cluster.procs if p.name == name)
        url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for le, n in re.findall(
            r'^lmps_ps_push_staleness_steps_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
        ):
            out[le] = out.get(le, 0) + int(float(n))
    return out


def assert_pushes_compressed(cluster: LocalCluster, servers: list[str]) -> float:
    """Every push reached `servers` int8: under half the bytes of the fp32 shards it carries
    (int8 is a quarter plus a scale per 1024). Returns the worst bytes per parameter byte."""
    worst = 0.0
    for name in servers:
        pushes = metric(cluster, name, "lmps_ps_pushes_total")
        received = metric(cluster, name, "lmps_ps_pushed_bytes_total")
        held = metric(cluster, name, "lmps_ps_parameter_bytes")
        assert pushes > 0 and held > 0, name
        worst = max(worst, received / pushes / held)
    assert worst < 0.5, worst
    return worst


def job_status(driver: Driver, job_id: str) -> coordinator_pb2.JobStatus:
    return driver.stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=30)


def released_leases(
    steps: list[job_pb2.StepEvent], faulted_at: int, lost: str
) -> dict[str, list[job_pb2.StepEvent]]:
    """Leases first seen after the fault on data shards the lost worker had events for:
    the lost worker's re-leased shards (lease id -> its events)."""
    lost_shards = {s.data_shard for s in steps if s.worker_id == lost}
    before = {s.lease_id for s in steps[:faulted_at]}
    out: dict[str, list[job_pb2.StepEvent]] = {}
    for s in steps[faulted_at:]:
        if s.lease_id not in before and s.data_shard in lost_shards and s.worker_id != lost:
            out.setdefault(s.lease_id, []).append(s)
    return out


# -- local steps ---------------------------------------------------------------------------


def test_local_steps_worker_killed_mid_round_re_leases_from_a_round_start(
    tmp_path: Path,
) -> None:
    """H = 4, leases of 8: worker-1 is killed while training the second round of a lease.
    The epoch completes on worker-0; every batch is trained once (or counted); the lost
    lease goes back from a round's start, never from inside a round."""
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, local_steps=H)
        steps, summary, at = run_until(
            driver,
            job_id,
            0,
            first_round_of_a_lease("worker-1", BATCHES // 4),
            lambda: cluster.kill("worker-1", signal.SIGKILL),
        )
        assert summary is not None and at > 0
        assert list(summary.workers_lost) == ["worker-1"]
        assert summary.leases_released >= 1
        unreported = assert_trained_once(steps, summary, LEASE)
        assert_rounds(steps, H, LEASE)
        # Every lease's first event is a round's start, those re-leased after the kill too.
        firsts: dict[str, int] = {}
        for s in steps:
            firsts.setdefault(s.lease_id, s.batch_index)
        assert all(b % H == 0 for b in firsts.values()), firsts
        released = released_leases(steps, at, "worker-1")
        for lease_id, events in released.items():
            assert events[0].batch_index % H == 0, (lease_id, events[0].batch_index)
        # The lease cut short (worker-1 was in its second round): the rest of it goes back
        # from a round's start, H where its first round is in the parameters, 0 where it
        # was dropped with the worker (its step not made yet): worker-1's batches below
        # that point are kept whole rounds, those from it are the batches redone. Should
        # worker-1 have finished the lease before the kill landed, it held its next lease,
        # untouched, instead.
        cut = steps[at - 1]
        rest = [ev for evs in released.values() for ev in evs if ev.data_shard == cut.data_shard]
        lost = sorted(
            s.batch_index
            for s in steps
            if s.data_shard == cut.data_shard and s.worker_id == "worker-1"
        )
        if rest:
            resumed = rest[0].batch_index
            assert resumed in (0, H), rest[0]
            assert [b for b in lost if b < resumed] == list(range(resumed))
            assert len([b for b in lost if b >= resumed]) == summary.batches_redone
        else:
            assert lost == list(range(LEASE)), lost
        assert all(s.worker_id == "worker-0" for s in steps[at + LEASE :])
        assert all(math.isfinite(s.loss) for s in steps)
        status = job_status(driver, job_id)
        assert status.step == summary.end_step and status.epochs_done == 1
        print(
            f"\nFAULT local steps H={H}, worker SIGKILL mid-round: epoch completed on the "
            f"survivor, {summary.leases_released} leases re-leased (the cut one from batch "
            f"{rest[0].batch_index if rest else '-'}), {summary.batches_redone} batches redone, "
            f"{len(unreported)} unreported, {summary.end_step} rounds"
        )
    finally:
        driver.close()
        cluster.stop()


def test_local_steps_coordinator_killed_and_restarted_resumes_at_a_round(
    tmp_path: Path,
) -> None:
    """H = 4 with a checkpoint every 2 rounds: the coordinator is SIGKILLed mid-epoch and
    restarted; the client asks for the epoch again and it resumes from the mid-epoch
    checkpoint: every batch of the epoch trained, as many rounds as an uninterrupted run,
    each of the uninterrupted run's batches. (The inner AdamW moments are not checkpointed,
    so the parameters are not an uninterrupted run's: the loss still falls.)"""
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, local_steps=H, checkpoint_every=2)
        initial = driver.stub.Evaluate(
            coordinator_pb2.EvaluateJobRequest(job_id=job_id), timeout=120
        ).loss

        def fault() -> None:
            cluster.kill("coordinator", signal.SIGKILL)
            cluster.restart("coordinator")

        with pytest.raises(grpc.RpcError) as err:
            run_until(driver, job_id, 0, lambda steps: len(steps) >= BATCHES * 5 // 8, fault)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        status = job_status(driver, job_id)
        assert status.epochs_done == 0
        events = driver.run_epoch(job_id, 0)
        begin, summary = events[0].start, events[-1].summary
        steps = [e.step for e in events if e.HasField("step")]
        ref = uninterrupted(BATCHES, LEASE, H)
        rounds = len(ref)
        print(
            f"\nFAULT local steps H={H}, coordinator SIGKILL + restart: resumed at round "
            f"{begin.start_step} (batch {begin.batches_done}/{BATCHES}), {summary.end_step} "
            f"rounds (uninterrupted {rounds}), eval loss {initial:.3f} -> "
            f"{summary.eval_loss:.3f}"
        )
        assert begin.batches_done > 0, "did not resume from the mid-epoch checkpoint"
        assert begin.start_step > 0 and begin.start_step % 2 == 0  # a checkpoint's round
        assert begin.batches_done + begin.total_batches == BATCHES
        assert list(begin.workers) == ["worker-0", "worker-1"]
        # The retried epoch trains exactly the batches the checkpoint does not hold.
        trained = Counter((s.data_shard, s.batch_index) for s in steps)
        assert all(c == 1 for c in trained.values()), trained.most_common(3)
        assert summary.batches_redone == 0
        assert begin.batches_done + len(trained) == BATCHES
        assert summary.data_shards_completed == len(shard_batches(BATCHES, LEASE, 0))
        done_before = set().union(*(ref[s] for s in range(begin.start_step)))
        assert set(trained) | done_before == set().union(*ref.values())
        assert not set(trained) & done_before
        # As many rounds as an uninterrupted run, each made of its batches.
        assert summary.start_step == begin.start_step and summary.end_step == rounds
        assert by_step(steps) == {s: c for s, c in ref.items() if s >= begin.start_step}
        assert_rounds(steps, H, LEASE)
        status = job_status(driver, job_id)
        assert status.step == rounds and status.epochs_done == 1
        assert all(math.isfinite(s.loss) for s in steps)
        assert math.isfinite(summary.train_loss) and math.isfinite(summary.eval_loss)
        assert summary.eval_loss < initial
    finally:
        driver.close()
        cluster.stop()


def test_local_steps_parameter_server_killed_with_replication_loses_no_round(
    tmp_path: Path,
) -> None:
    """H = 4, replication 2 on three servers: ps-1 is lost with a round's pushes to it in
    flight; the backups take over with no round lost: the epoch makes the rounds of an
    uninterrupted run, each of its batches, and the next epoch runs on the survivors."""
    cluster = start(tmp_path, servers=3)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, local_steps=H, replication=2)
        shard_map = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        assert all(s.backup_server_id not in ("", s.server_id) for s in shard_map.shards)
        ps0 = next(e.address for e in shard_map.servers if e.server_id == "ps-0")
        steps, summary, at = run_until(
            driver,
            job_id,
            0,
            lambda steps: len(steps) >= 2 * 2 * H,  # two rounds of both workers in
            lambda: kill_mid_push(cluster, "ps-1", ps0, job_id),
        )
        assert summary is not None and at > 0
        ref = uninterrupted(BATCHES, LEASE, H)
        unreported = assert_composed(steps, summary, ref, LEASE)
        print(
            f"\nFAULT local steps H={H}, ps SIGKILL mid-push (replication 2): "
            f"{summary.failovers} failover, {summary.steps_lost} rounds lost, "
            f"{summary.batches_redone} batches redone, {len(unreported)} unreported, "
            f"{summary.end_step} rounds (uninterrupted {len(ref)})"
        )
        assert summary.failovers == 1 and list(summary.servers_lost) == ["ps-1"]
        assert summary.restores == 0 and summary.steps_lost == 0
        assert_rounds(steps, H, LEASE)
        assert all(math.isfinite(s.loss) for s in steps)
        after = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        assert {s.server_id for s in after.shards} == {"ps-0", "ps-2"}
        nxt = driver.run_epoch(job_id, 1)[-1].summary
        assert nxt.failovers == 0 and nxt.start_step == summary.end_step
        assert nxt.end_step > nxt.start_step and math.isfinite(nxt.eval_loss)
    finally:
        driver.close()
        cluster.stop()


# -- streaming fragments -------------------------------------------------------------------


def lease_runs(steps: list[job_pb2.StepEvent]) -> list[list[job_pb2.StepEvent]]:
    """The leases as trained, in the order their first events came: one run of events per
    lease trained by one worker (a new run where a worker's lease id changes or its batches
    start again: a new attempt deals lease ids afresh)."""
    runs: list[list[job_pb2.StepEvent]] = []
    last: dict[str, list[job_pb2.StepEvent]] = {}
    for s in steps:
        run = last.get(s.worker_id)
        if run is None or run[-1].lease_id != s.lease_id or s.batch_index <= run[-1].batch_index:
            run = last[s.worker_id] = []
            runs.append(run)
        run.append(s)
    return runs


def assert_fragment_versions(
    steps: list[job_pb2.StepEvent], summary: job_pb2.EpochSummary
) -> list[tuple[list[job_pb2.StepEvent], list[job_pb2.StepEvent]]]:
    """Streaming fragments, SYNC: a worker pushes once a version, in its leases' order, each
    lease from its first batch (0 in an epoch not resumed) in windows of H / F batches at
    consecutive versions, then F - 1 flushes (no events). So the version after a lease
    counted whole is F past its last window, and the worker's next lease starts there; a
    lease not whole is trained again, and the worker's next lease (if it lives on: a new
    attempt's) starts later. The epoch ends at the last whole lease's last window + F.

    Returns each run (`lease_runs`) trained again, with the later run of its data shard."""
    runs = lease_runs(steps)
    for run in runs:
        got = [s.batch_index for s in run]
        assert got == list(range(len(got))), (run[0].lease_id, got)
        want = [run[0].step + b // WINDOW for b in got]
        assert [s.step for s in run] == want, (run[0].lease_id, [s.step for s in run])
    again: dict[int, list[job_pb2.StepEvent]] = {}
    for i, run in enumerate(runs):
        later = [r for r in runs[i + 1 :] if r[0].data_shard == run[0].data_shard]
        if later:
            again[i] = later[0]
    by_worker: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        by_worker.setdefault(run[0].worker_id, []).append(i)
    for worker, order in by_worker.items():
        assert runs[order[0]][0].step == summary.start_step, (worker, runs[order[0]][0])
        for i, j in pairwise(order):
            end, nxt = runs[i][-1].step, runs[j][0].step
            if i in again:
                assert nxt > end, (worker, runs[i][0].lease_id, end, nxt)
            else:
                assert nxt == end + FRAGMENTS, (worker, runs[i][0].lease_id, end, nxt)
    whole_ends = [r[-1].step + FRAGMENTS for i, r in enumerate(runs) if i not in again]
    assert summary.end_step == max(whole_ends), (summary.end_step, max(whole_ends))
    return [(runs[i], redo) for i, redo in sorted(again.items())]


def server_shards(driver: Driver, job_id: str) -> dict[str, tuple[int, dict[str, int]]]:
    """Each server of the coordinator's shard map, as the server itself says: its version
    and the fragment of each shard it holds."""
    shard_map = driver.stub.GetShardMap(
        coordinator_pb2.GetShardMapRequest(job_id=job_id), timeout=10
    )
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for entry in shard_map.servers:
        with open_channel(entry.address) as channel:
            stub = parameter_pb2_grpc.ParameterServiceStub(channel)
            resp = stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job_id), timeout=10)
        out[entry.server_id] = (
            int(resp.version),
            {info.spec.shard_id: int(info.spec.fragment) for info in resp.shards},
        )
    return out


def repeats(steps: list[job_pb2.StepEvent]) -> Counter[tuple[int, int]]:
    """(data shard, batch) -> how many more events than one it has."""
    seen = Counter((s.data_shard, s.batch_index) for s in steps)
    return Counter({k: c - 1 for k, c in seen.items() if c > 1})


@pytest.mark.parametrize("overlap", [False, True])
def test_streaming_fragments_worker_killed_mid_lease_trains_the_lease_again(
    tmp_path: Path, overlap: bool
) -> None:
    """H = 4 in F = 2 fragments (windows of 2 batches; a lease of 8 is 4 windows and a
    flush): worker-1 is killed halfway through a lease. The epoch completes on worker-0 and
    no batch is lost: every batch has an event (or is counted without one).

    Exactly once cannot hold: the windows worker-1 synced are in their fragments already,
    but its progress on the fragment not synced yet is gone with it, so a lease counts in
    the parameters only whole and the cut one is trained again from its first batch. The
    relation asserted: the repeats are exactly the batches worker-1 reported of leases not
    whole, each once more, by worker-0 in a whole lease from batch 0; summary.batches_redone
    is their number; nothing else repeats; the versions (every server's, the job's) are
    what the leases imply (`assert_fragment_versions`). With `overlap` the kill may also
    cut a sync on the worker's sync thread; the same holds."""
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, local_steps=H, fragments=FRAGMENTS, overlap=overlap)
        steps, summary, at = run_until(
            driver,
            job_id,
            0,
            # Past its first lease, its second window of a lease in: two windows and the
            # flush to go.
            lambda steps: (
                len(steps) > BATCHES // 4
                and steps[-1].worker_id == "worker-1"
                and steps[-1].batch_index % LEASE == 2 * WINDOW - 1
            ),
            lambda: cluster.kill("worker-1", signal.SIGKILL),
        )
        assert summary is not None and at > 0
        assert list(summary.workers_lost) == ["worker-1"]
        assert summary.leases_released >= 1
        unreported = assert_trained_once(steps, summary, LEASE)
        again = assert_fragment_versions(steps, summary)
        redone = [run for run, _ in again]
        assert all(r[0].worker_id == "worker-1" for r in redone), [r[0] for r in redone]
        for _, redo in again:
            assert redo[0].worker_id == "worker-0" and len(redo) == LEASE, redo[0]
        assert repeats(steps) == Counter((s.data_shard, s.batch_index) for r in redone for s in r)
        assert summary.batches_redone == sum(len(r) for r in redone)
        # The lease the kill cut: trained again, or (the kill landed after its flush) whole,
        # its next lease going back untouched.
        cut = [r for r in lease_runs(steps) if r[0].worker_id == "worker-1"][-1]
        assert cut in redone or len(cut) == LEASE, cut[0]
        assert all(s.worker_id == "worker-0" for s in steps[at + 2 * LEASE :])
        assert all(math.isfinite(s.loss) for s in steps)
        versions = {server: v for server, (v, _) in server_shards(driver, job_id).items()}
        assert set(versions.values()) == {summary.end_step}, versions
        status = job_status(driver, job_id)
        assert status.step == summary.end_step and status.epochs_done == 1
        print(
            f"\nFAULT streaming H={H} F={FRAGMENTS}, worker SIGKILL mid-lease: epoch completed "
            f"on the survivor, {summary.leases_released} leases re-leased, {len(redone)} "
            f"trained again, {summary.batches_redone} batches redone, {len(unreported)} "
            f"unreported, {summary.end_step} versions"
        )
    finally:
        driver.close()
        cluster.stop()


def test_streaming_fragments_parameter_server_killed_with_replication_loses_no_step(
    tmp_path: Path,
) -> None:
    """H = 4 in F = 2 fragments, replication 2 on three servers: ps-1 is lost with pushes
    to it in flight. The backups take over with no rollback and no step lost, every shard
    keeps its fragment (on the coordinator's map and on the surviving servers, the copies
    re-created there too), and the next epoch runs on the survivors.

    Exactly once cannot hold: the epoch resumes at the survivors' version, where the leases
    in progress are not whole (the workers' progress on the fragments not synced yet goes
    with the failed attempt), so each is trained again from its first batch, the window
    the survivors hold from the unreported push included. The relation asserted: every
    batch has an event; repeats only within the leases in progress at the failover, at most
    one per worker, each trained again from the new attempt's version; summary.batches
    counts each training (the events, and the pushes in the survivors that no event
    reported) and batches_redone every one beyond a batch's first; the versions are what
    the leases imply (`assert_fragment_versions`), on every surviving server."""
    cluster = start(tmp_path, servers=3)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, local_steps=H, fragments=FRAGMENTS, replication=2)
        shard_map = driver.stub.GetShardMap(
            coordinator_pb2.GetShardMapRequest(job_id=job_id), timeout=10
        )
        assert all(s.backup_server_id not in ("", s.server_id) for s in shard_map.shards)
        fragment_of = {s.shard_id: s.fragment for s in shard_map.shards}
        assert set(fragment_of.values()) == set(range(FRAGMENTS))
        for server, (_, loaded) in server_shards(driver, job_id).items():
            assert loaded.items() <= fragment_of.items(), server
        ps0 = next(e.address for e in shard_map.servers if e.server_id == "ps-0")
        steps, summary, at = run_until(
            driver,
            job_id,
            0,
            # Both workers a window into their second lease.
            lambda steps: len(steps) >= 2 * LEASE + 2 * WINDOW,
            lambda: kill_mid_push(cluster, "ps-1", ps0, job_id),
        )
        assert summary is not None and at > 0
        assert summary.failovers == 1 and list(summary.servers_lost) == ["ps-1"]
        assert summary.restores == 0 and summary.steps_lost == 0
        sizes = shard_batches(BATCHES, LEASE, 0)
        expected = {(j, b) for j, n in enumerate(sizes) for b in range(n)}
        assert {(s.data_shard, s.batch_index) for s in steps} == expected
        assert summary.data_shards_completed == len(sizes)
        assert summary.batches - summary.batches_redone == len(expected)
        again = assert_fragment_versions(steps, summary)
        redone = [run for run, _ in again]
        assert len({r[0].worker_id for r in redone}) == len(redone) <= 2, redone
        assert len({redo[0].step for _, redo in again}) <= 1  # the new attempt's version
        assert repeats(steps) == Counter((s.data_shard, s.batch_index) for r in redone for s in r)
        unreported = summary.batches - len(steps)  # pushed to the survivors, no event
        assert 0 <= unreported <= 2 * WINDOW and (unreported == 0 or redone)
        assert summary.batches_redone == sum(len(r) for r in redone) + unreported
        assert all(math.isfinite(s.loss) for s in steps)
        after = driver.stub.GetShardMap(
            coordinator_pb2.GetShardMapRequest(job_id=job_id), timeout=10
        )
        assert {s.server_id for s in after.shards} == {"ps-0", "ps-2"}
        assert {s.shard_id: s.fragment for s in after.shards} == fragment_of
        survivors = server_shards(driver, job_id)
        assert set(survivors) == {"ps-0", "ps-2"}
        for server, (version, on_server) in survivors.items():
            assert version == summary.end_step, (server, version)
            assert on_server.items() <= fragment_of.items(), server
        assert set().union(*(f.keys() for _, f in survivors.values())) == fragment_of.keys()
        nxt = driver.run_epoch(job_id, 1)[-1].summary
        assert nxt.failovers == 0 and nxt.start_step == summary.end_step
        per_lease = LEASE // WINDOW + FRAGMENTS - 1  # its windows and flushes
        assert nxt.end_step - nxt.start_step == len(sizes) // 2 * per_lease
        assert math.isfinite(nxt.eval_loss)
        print(
            f"\nFAULT streaming H={H} F={FRAGMENTS}, ps SIGKILL mid-push (replication 2): "
            f"{summary.failovers} failover, {summary.steps_lost} steps lost, {len(redone)} "
            f"leases trained again from the version {[r[0].step for _, r in again]}, "
            f"{summary.batches_redone} batches redone ({unreported} in the survivors with no "
            f"event), {summary.end_step} versions (uninterrupted {len(sizes) // 2 * per_lease})"
        )
    finally:
        driver.close()
        cluster.stop()


# -- bounded staleness ---------------------------------------------------------------------


def test_bounded_staleness_worker_killed_keeps_the_bound(tmp_path: Path) -> None:
    """S = 2: worker-1 is killed mid-epoch; the epoch completes on worker-0, every batch
    trained once (or counted), and no push was ever staler than S, by the step events and
    by the servers' staleness histogram."""
    bound = 2
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, staleness=bound, lease=4)
        before = staleness_buckets(cluster, ["ps-0", "ps-1"])
        after_first = batch_after("worker-1", BATCHES // 4)
        steps, summary, at = run_until(
            driver,
            job_id,
            0,
            # At the first batch of one of its leases: running at most `bound` steps ahead,
            # the worker is still inside that lease, so it is lost with a lease outstanding.
            lambda steps: after_first(steps) and steps[-1].batch_index % 4 == 0,
            lambda: cluster.kill("worker-1", signal.SIGKILL),
        )
        assert summary is not None and at > 0
        after = staleness_buckets(cluster, ["ps-0", "ps-1"])
        lag = [s.step - s.computed_at for s in steps]
        print(
            f"\nFAULT bounded staleness s={bound}, worker SIGKILL: epoch completed, "
            f"{summary.leases_released} leases re-leased, {summary.batches_redone} batches "
            f"redone, lags seen {sorted(Counter(lag).items())}"
        )
        assert list(summary.workers_lost) == ["worker-1"]
        assert summary.leases_released >= 1
        assert_trained_once(steps, summary, 4)
        assert all(0 <= x <= bound for x in lag), lag
        pushes = after["+Inf"] - before.get("+Inf", 0)
        assert pushes >= len(steps)  # at least every reported push, on some server
        assert after[f"{float(bound)}"] - before.get(f"{float(bound)}", 0) == pushes
        assert all(math.isfinite(s.loss) for s in steps)
        status = job_status(driver, job_id)
        assert status.step == summary.end_step and status.epochs_done == 1
    finally:
        driver.close()
        cluster.stop()


# -- compressed pushes ---------------------------------------------------------------------


def test_int8_pushes_worker_killed_mid_epoch(tmp_path: Path) -> None:
    """int8 pushes with error feedback: worker-1 is killed mid-epoch; the epoch completes on
    worker-0 with every batch trained once (or counted), and the pushes were int8."""
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, compression=INT8, lease=2)
        steps, summary, at = run_until(
            driver,
            job_id,
            0,
            batch_after("worker-1", BATCHES // 4),
            lambda: cluster.kill("worker-1", signal.SIGKILL),
        )
        assert summary is not None and at > 0
        assert list(summary.workers_lost) == ["worker-1"]
        assert summary.leases_released >= 1
        unreported = assert_trained_once(steps, summary, 2)
        assert all(math.isfinite(s.loss) for s in steps)
        ratio = assert_pushes_compressed(cluster, ["ps-0", "ps-1"])
        status = job_status(driver, job_id)
        assert status.step == summary.end_step and status.epochs_done == 1
        print(
            f"\nFAULT int8 pushes, worker SIGKILL: epoch completed, {summary.leases_released} "
            f"leases re-leased, {summary.batches_redone} batches redone, {len(unreported)} "
            f"unreported, push bytes / fp32 bytes {ratio:.2f}"
        )
    finally:
        driver.close()
        cluster.stop()


def test_int8_pushes_parameter_server_killed_with_replication_loses_no_step(
    tmp_path: Path,
) -> None:
    """int8 pushes, replication 2 on three servers: ps-1 is lost with pushes to it in
    flight; the backups take over with no step lost (the uninterrupted run's steps, each of
    its batches) and training goes on into the next epoch."""
    cluster = start(tmp_path, servers=3)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit_mode(driver, compression=INT8, lease=2, replication=2)
        shard_map = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        ps0 = next(e.address for e in shard_map.servers if e.server_id == "ps-0")
        steps, summary, at = run_until(
            driver,
            job_id,
            0,
            lambda steps: len(steps) >= 14,
            lambda: kill_mid_push(cluster, "ps-1", ps0, job_id),
        )
        assert summary is not None and at > 0
        ref = uninterrupted(BATCHES, 2, 1)
        unreported = assert_composed(steps, summary, ref, 2)
        print(
            f"\nFAULT int8 pushes, ps SIGKILL mid-push (replication 2): {summary.failovers} "
            f"failover, {summary.steps_lost} steps lost, {summary.batches_redone} batches "
            f"redone, {len(unreported)} unreported, {summary.end_step} steps (uninterrupted "
            f"{len(ref)})"
        )
        assert summary.failovers == 1 and list(summary.servers_lost) == ["ps-1"]
        assert summary.restores == 0 and summary.steps_lost == 0
        assert all(math.isfinite(s.loss) for s in steps)
        after = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        assert {s.server_id for s in after.shards} == {"ps-0", "ps-2"}
        nxt = driver.run_epoch(job_id, 1)[-1].summary
        assert nxt.failovers == 0 and nxt.start_step == summary.end_step
        assert nxt.end_step - nxt.start_step == len(ref)  # epoch 1: as many steps again
        assert_pushes_compressed(cluster, ["ps-0", "ps-2"])
    finally:
        driver.close()
        cluster.stop()
