"""Fault injection with real processes and SIGKILL: the cluster survives and loses nothing.

Each test prints a line for the closing note's table: fault, outcome, steps lost, recovery.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from lmps.client import model_io
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.data import plan_data_shards
from lmps.core.model import GPTConfig
from lmps.rpc import codec
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, job_pb2, parameter_pb2, parameter_pb2_grpc
from tests.cluster.jobs import Driver, make_spec, random_tokens

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

BATCH = 4
BATCHES = 160
# Big enough that an epoch outlasts a process start (a replacement must find work left).
MODEL = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=256)
SGD = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.05, momentum=0.9, schedule=job_pb2.CONSTANT)


def start(tmp: Path, servers: int = 2, workers: int = 2) -> LocalCluster:
    return LocalCluster(
        ClusterSpec(servers=servers, workers=workers, worker_threads=1, run_dir=str(tmp))
    ).start()


def submit(
    driver: Driver,
    checkpoint_every: int = 0,
    batches_per_lease: int = 2,
    replication: int = 1,
    workers: int = 2,
) -> str:
    spec = make_spec(
        MODEL,
        SGD,
        batch_size=BATCH,
        batches_per_lease=batches_per_lease,
        shard_bytes=1 << 16,
        workers=workers,
    )
    spec.checkpoint_every = checkpoint_every
    spec.replication = replication
    spec.num_servers = 0  # every registered server
    train = random_tokens(BATCHES * BATCH * MODEL.block_size + 1, MODEL.vocab_size, 5)
    evals = random_tokens(4 * MODEL.block_size + 1, MODEL.vocab_size, 6)
    return driver.submit(spec, train, evals)


def run_with_fault(
    driver: Driver, job_id: str, epoch: int, after_steps: int, fault: object
) -> tuple[list[job_pb2.StepEvent], job_pb2.EpochSummary, float]:
    """Run an epoch, calling `fault()` after `after_steps` step events. Returns the step
    events, the summary and the seconds from the fault to the next step event."""
    stream: Iterator[job_pb2.ProgressEvent] = driver.stub.RunEpoch(
        coordinator_pb2.RunEpochRequest(job_id=job_id, epoch=epoch), timeout=300
    )
    steps: list[job_pb2.StepEvent] = []
    summary = None
    faulted_at = recovered = 0.0
    for ev in stream:
        kind = ev.WhichOneof("kind")
        if kind == "step":
            steps.append(ev.step)
            if faulted_at and not recovered:
                recovered = time.monotonic()
            if len(steps) == after_steps:
                fault()  # type: ignore[operator]
                faulted_at = time.monotonic()
        elif kind == "summary":
            summary = ev.summary
    assert summary is not None
    return steps, summary, recovered - faulted_at


def assert_every_batch_trained(
    steps: list[job_pb2.StepEvent], summary: job_pb2.EpochSummary, batches_per_lease: int = 2
) -> set[tuple[int, int]]:
    """Every batch of every data shard appears, or the summary counts it as trained without
    an event; repeats only where the summary owns up. Returns the batches with no event.

    (After a server loss with replication, a push that reached the surviving servers but not
    the lost one is never reported, yet the survivors applied it: the coordinator counts it.)"""
    n_seq = BATCHES * BATCH
    plan = plan_data_shards(n_seq, BATCH, batches_per_lease, 7, summary.epoch)
    expected = {(j, b) for j, ids in enumerate(plan) for b in range(len(ids) // BATCH)}
    seen = Counter((s.data_shard, s.batch_index) for s in steps)
    unreported = expected - set(seen)
    assert set(seen) <= expected
    assert summary.batches == len(steps) + len(unreported)
    repeats = sum(c - 1 for c in seen.values())
    assert repeats == summary.batches_redone
    assert summary.data_shards_completed == len(plan)
    return unreported


def by_step(steps: list[job_pb2.StepEvent]) -> dict[int, set[tuple[int, int]]]:
    """Which (data shard, batch) pairs made each step: the step's composition."""
    out: dict[int, set[tuple[int, int]]] = {}
    for s in steps:
        out.setdefault(s.step, set()).add((s.data_shard, s.batch_index))
    return out


def params_of(coordinator: str, job_id: str) -> dict[str, torch.Tensor]:
    model = model_io.fetch_model(coordinator, job_id).model
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(float((got[n] - v).abs().max()) for n, v in expected.items())


def assert_same_params(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]


def assert_composed_as(
    steps: list[job_pb2.StepEvent],
    summary: job_pb2.EpochSummary,
    ref: dict[int, set[tuple[int, int]]],
) -> set[tuple[int, int]]:
    """The epoch made the steps of the reference's (`by_step` of an uninterrupted run), each
    of the same batches: a step's reported batches are the reference step's, and the batches
    no event reported are exactly the ones missing from them. Returns those."""
    unreported = assert_every_batch_trained(steps, summary)
    got = by_step(steps)
    assert summary.start_step == min(ref) and summary.end_step == max(ref) + 1
    bad = {s: sorted(c) for s, c in got.items() if not c <= ref.get(s, set())}
    assert not bad, f"steps made of other batches than the reference's: {bad}"
    assert set().union(*(ref[s] - got.get(s, set()) for s in ref)) == unreported
    return unreported


def missing_per_step(
    steps: list[job_pb2.StepEvent], ref: dict[int, set[tuple[int, int]]]
) -> dict[int, int]:
    """Step -> how many of the reference's batches it lacks, where it is not the reference's."""
    got = by_step(steps)
    return {s: len(ref[s] - got.get(s, set())) for s in ref if got.get(s) != ref[s]}


def test_worker_killed_mid_epoch_and_a_replacement_joins(tmp_path: Path) -> None:
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit(driver)

        def fault() -> None:
            cluster.kill("worker-1", signal.SIGKILL)
            cluster.add_worker("worker-2")

        steps, summary, recovery = run_with_fault(driver, job_id, 0, 6, fault)
        assert list(summary.workers_lost) == ["worker-1"]
        assert "worker-2" in summary.workers_joined
        assert summary.leases_released >= 1
        assert any(s.worker_id == "worker-2" for s in steps), "the replacement got no work"
        assert_every_batch_trained(steps, summary)
        status = driver.stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=10)
        assert status.step == summary.end_step and status.epochs_done == 1
        print(
            f"\nFAULT worker SIGKILL: epoch completed, {summary.leases_released} leases re-leased, "
            f"{summary.batches_redone} batches redone, 0 steps lost, "
            f"next step after {recovery:.2f}s"
        )
    finally:
        driver.close()
        cluster.stop()


def test_parameter_server_killed_rolls_back_to_checkpoint(tmp_path: Path) -> None:
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit(driver, checkpoint_every=4)

        def fault() -> None:
            cluster.kill("ps-1", signal.SIGKILL)
            time.sleep(1.0)
            cluster.restart("ps-1")  # a new, empty process under the same id

        _, summary, recovery = run_with_fault(driver, job_id, 0, 14, fault)
        assert summary.restores == 1
        assert 0 <= summary.steps_lost <= 4 + 2  # at most a checkpoint interval (+ in flight)
        assert summary.data_shards_completed == len(
            plan_data_shards(BATCHES * BATCH, BATCH, 2, 7, 0)
        )
        # The servers agree and carry on from the checkpoint: a second epoch runs cleanly.
        events = driver.run_epoch(job_id, 1)
        assert (
            events[-1].summary.restores == 0 and events[-1].summary.start_step == summary.end_step
        )
        print(
            f"\nFAULT ps SIGKILL + restart (replication 1): rolled back to checkpoint, "
            f"{summary.steps_lost} steps lost and redone, next step after {recovery:.2f}s"
        )
    finally:
        driver.close()
        cluster.stop()


def kill_mid_push(cluster: LocalCluster, name: str, survivor: str, job_id: str) -> None:
    """Lose server `name` while the workers' pushes to it are in flight: once a worker has
    pushed the pending step to `survivor`, `name` is frozen (SIGSTOP): it takes the pushes in
    but never answers, while the other servers get the same pushes and make the step. So the
    survivors hold a step no worker reported (a worker reports a step once its push reached
    every server), the race a plain SIGKILL hits now and then. Killed once the survivors'
    version stands still (no step can be made without `name`)."""
    with open_channel(survivor) as channel:
        stub = parameter_pb2_grpc.ParameterServiceStub(channel)
        request = parameter_pb2.ListShardsRequest(job_id=job_id)
        for _ in range(20_000):  # the pushes of one step come within a few hundred polls
            if stub.ListShards(request, timeout=10).pushed:
                break
        cluster.kill(name, signal.SIGSTOP)
        last, still = -1, 0
        while still < 3:
            time.sleep(0.2)
            version = int(stub.ListShards(request, timeout=10).version)
            still, last = (still + 1 if version == last else 0), version
    cluster.kill(name, signal.SIGKILL)  # and it never comes back


def test_parameter_server_killed_with_replication_backups_take_over(tmp_path: Path) -> None:
    """ps-1 is lost with pushes to it in flight: the backups take over at the survivors'
    version, and the job ends with the parameters of an uninterrupted run, each step made of
    the same batches (a step the survivors made but no worker reported is not trained
    again: it was, when the failover resumed from the reported steps only)."""
    cluster = start(tmp_path, servers=3)
    driver = Driver(cluster.coordinator)
    try:
        # The oracle: the same job, uninterrupted, on the same cluster.
        ref_id = submit(driver, replication=2)
        ref_events = driver.run_epoch(ref_id, 0)
        ref = by_step([e.step for e in ref_events if e.WhichOneof("kind") == "step"])
        expected = params_of(cluster.coordinator, ref_id)

        job_id = submit(driver, replication=2)
        shard_map = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        assert all(s.backup_server_id not in ("", s.server_id) for s in shard_map.shards)
        ps0 = next(e.address for e in shard_map.servers if e.server_id == "ps-0")

        def fault() -> None:
            kill_mid_push(cluster, "ps-1", ps0, job_id)

        steps, summary, recovery = run_with_fault(driver, job_id, 0, 14, fault)
        params = params_of(cluster.coordinator, job_id)
        print(
            f"\nFAULT ps SIGKILL mid-push (replication 2): {summary.failovers} failover, "
            f"{summary.steps_lost} steps lost, {summary.batches_redone} batches redone, "
            f"{summary.batches} batches for {len(steps)} step events, steps not as the "
            f"reference's (step: batches missing) {missing_per_step(steps, ref)}, vs "
            f"uninterrupted max abs diff {max_diff(params, expected):.1e}, next step after "
            f"{recovery:.2f}s"
        )
        assert summary.failovers == 1 and list(summary.servers_lost) == ["ps-1"]
        assert summary.restores == 0 and summary.steps_lost == 0
        assert_composed_as(steps, summary, ref)
        assert_same_params(params, expected)
        after = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        assert {s.server_id for s in after.shards} == {"ps-0", "ps-2"}
        # Training goes on: the next epoch runs on the two survivors.
        assert driver.run_epoch(job_id, 1)[-1].summary.failovers == 0
    finally:
        driver.close()
        cluster.stop()


def held_copies(address: str, job_id: str, version: int) -> dict[str, list[torch.Tensor]]:
    """Shard id -> [value, optimizer state tensors by name] as the server holds them."""
    with open_channel(address) as channel:
        stub = parameter_pb2_grpc.ParameterServiceStub(channel)
        request = parameter_pb2.SnapshotRequest(job_id=job_id, version=version)
        return {
            m.shard_id: [
                codec.decode(m.value),
                *(codec.decode(m.state[k]) for k in sorted(m.state)),
            ]
            for m in stub.Snapshot(request, timeout=60)
        }


def test_lost_copies_are_recreated_so_a_second_server_loss_is_survived(tmp_path: Path) -> None:
    """Replication 2 on three servers: ps-1 is lost mid-epoch, the backups take over and the
    copies it held are re-created on ps-0 and ps-2, equal to the originals (values and
    momentum) from then on; so losing ps-2 in the next epoch is survived too, with no step
    lost. (Without re-replication the shards ps-1 shared with ps-2 had one copy left: the
    second loss rolled back to the last checkpoint and waited for a second server that never
    came, until the client's deadline.) Both losses hit pushes in flight (`kill_mid_push`),
    and the two epochs end with the parameters of an uninterrupted run."""
    cluster = start(tmp_path, servers=3)
    driver = Driver(cluster.coordinator)
    try:
        ref_id = submit(driver, replication=2)
        ref = [
            by_step([e.step for e in driver.run_epoch(ref_id, epoch) if e.HasField("step")])
            for epoch in (0, 1)
        ]
        expected = params_of(cluster.coordinator, ref_id)
        job_id = submit(driver, replication=2)
        shard_map = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        ps0 = next(e.address for e in shard_map.servers if e.server_id == "ps-0")

        steps, first, _ = run_with_fault(
            driver, job_id, 0, 14, lambda: kill_mid_push(cluster, "ps-1", ps0, job_id)
        )
        missing = [missing_per_step(steps, ref[0])]
        assert first.failovers == 1 and list(first.servers_lost) == ["ps-1"]
        assert first.restores == 0 and first.steps_lost == 0
        assert_composed_as(steps, first, ref[0])
        # Every shard has two copies again, on the two survivors...
        shard_map = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        for s in shard_map.shards:
            assert {s.server_id, s.backup_server_id} == {"ps-0", "ps-2"}, s
        # ... and the re-created ones were updated like the originals ever since.
        held = {
            e.server_id: held_copies(e.address, job_id, first.end_step) for e in shard_map.servers
        }
        assert held.keys() == {"ps-0", "ps-2"} and held["ps-0"].keys() == held["ps-2"].keys()
        worst = 0.0
        for sid, copy in held["ps-0"].items():
            other = held["ps-2"][sid]
            assert len(copy) == len(other) == 2, sid  # value and SGD's momentum buffer
            for a, b in zip(copy, other, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=sid: f"{i}: {m}")  # type: ignore[misc]
                worst = max(worst, float((a - b).abs().max()))

        steps, second, _ = run_with_fault(
            driver, job_id, 1, 14, lambda: kill_mid_push(cluster, "ps-2", ps0, job_id)
        )
        missing.append(missing_per_step(steps, ref[1]))
        params = params_of(cluster.coordinator, job_id)
        print(
            f"\nFAULT ps SIGKILL mid-push, then another in the next epoch (replication 2, 3 "
            f"servers): copies re-created, owner vs backup max abs diff {worst:.1e}; "
            f"{first.steps_lost + second.steps_lost} steps lost, "
            f"{first.batches_redone + second.batches_redone} batches redone, steps not as "
            f"the reference's (step: batches missing) {missing}, vs uninterrupted max abs "
            f"diff {max_diff(params, expected):.1e}"
        )
        assert second.failovers == 1 and list(second.servers_lost) == ["ps-2"]
        assert second.restores == 0 and second.steps_lost == 0
        assert second.start_step == first.end_step
        assert_composed_as(steps, second, ref[1])
        assert_same_params(params, expected)
        # One server left: one copy of everything, and nowhere for a second.
        after = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(), timeout=10)
        assert {(s.server_id, s.backup_server_id) for s in after.shards} == {("ps-0", "")}
    finally:
        driver.close()
        cluster.stop()


def test_coordinator_killed_and_restarted_recovers_the_job(tmp_path: Path) -> None:
    cluster = start(tmp_path)
    driver = Driver(cluster.coordinator)
    try:
        job_id = submit(driver, checkpoint_every=4)
        first = driver.run_epoch(job_id, 0)[-1].summary

        def fault() -> None:
            cluster.kill("coordinator", signal.SIGKILL)
            cluster.restart("coordinator")

        killed_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            run_with_fault(driver, job_id, 1, 30, fault)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        # The restarted coordinator found the job on disk; the client asks for epoch 1 again.
        status = driver.stub.GetJob(coordinator_pb2.GetJobRequest(job_id=job_id), timeout=30)
        assert status.epochs_done == 1 and status.step >= first.end_step
        events = driver.run_epoch(job_id, 1)
        summary = events[-1].summary
        recovered = time.monotonic() - killed_at
        begin = events[0].start
        n_shards = len(plan_data_shards(BATCHES * BATCH, BATCH, 2, 7, 1))
        assert summary.data_shards_completed == n_shards
        assert begin.batches_done + begin.total_batches == BATCHES
        assert begin.batches_done > 0, "did not resume from the mid-epoch checkpoint"
        assert summary.end_step > first.end_step
        print(
            f"\nFAULT coordinator SIGKILL + restart: job recovered from its state dir, "
            f"epoch resumed "
            f"at batch {begin.batches_done}/{BATCHES}, finished {recovered:.1f}s after the kill"
        )
    finally:
        driver.close()
        cluster.stop()
