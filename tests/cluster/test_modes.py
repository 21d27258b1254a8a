"""The modes beyond SYNC on a real 2-server, 2-worker cluster.

- Local steps (DiLoCo): the cluster's parameters equal single-process torch running DiLoCo
  on the rounds the cluster made (inner AdamW per worker, outer Nesterov SGD), and each
  worker pushed once per round, not once per batch.
- Bounded staleness (SSP): with one worker frozen for a while, the other runs ahead; no push
  is ever staler than the bound (step events and the servers' staleness histogram), every
  step is still made of SYNC's batches, and s = 0 gives SYNC's parameters bit for bit.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import torch

from lmps.client import model_io
from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.core.data import plan_data_shards, to_sequences
from lmps.core.model import init_model
from lmps.core.partition import Shard, shard_view
from lmps.rpc import codec
from lmps.v1 import coordinator_pb2, job_pb2
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens
from tests.unit.test_fragments import streaming_reference
from tests.unit.test_local_steps import diloco_reference

pytestmark = pytest.mark.cluster

BATCH = 4
SEED = 11
LEASE = 6
LEASES = 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        servers=2, workers=2, worker_threads=1, run_dir=str(tmp_path_factory.mktemp("modes"))
    )
    with LocalCluster(spec) as c:
        yield c


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    train = random_tokens(LEASES * LEASE * BATCH * SMALL.block_size + 1, SMALL.vocab_size, 1)
    evals = random_tokens(4 * SMALL.block_size + 1, SMALL.vocab_size, seed=2)
    return train, evals


def _steps(events: list[job_pb2.ProgressEvent]) -> list[job_pb2.StepEvent]:
    kinds = [ev.WhichOneof("kind") for ev in events]
    assert kinds[0] == "start" and kinds[-1] == "summary"
    return [ev.step for ev in events if ev.WhichOneof("kind") == "step"]


def _pushes(cluster: LocalCluster) -> int:
    total = 0
    for p in cluster.procs:
        if p.name.startswith("ps-"):
            url = f"http://127.0.0.1:{p.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            m = re.search(r"^lmps_ps_pushes_total (\S+)$", text, re.M)
            total += int(float(m.group(1))) if m else 0
    return total


def _staleness_counts(cluster: LocalCluster) -> dict[str, int]:
    """The servers' lmps_ps_push_staleness_steps buckets (le -> cumulative count), summed."""
    out: dict[str, int] = {}
    for p in cluster.procs:
        if p.name.startswith("ps-"):
            url = f"http://127.0.0.1:{p.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
            for le, n in re.findall(
                r'^lmps_ps_push_staleness_steps_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
            ):
                out[le] = out.get(le, 0) + int(float(n))
    return out


# DiLoCo's outer optimizer (SGD, lr 0.7, Nesterov momentum 0.9, constant lr) and the
# reference's view of it (a constant lr needs no total_steps).
OUTER = job_pb2.OptimizerConfig(
    kind=job_pb2.SGD, lr=0.7, momentum=0.9, nesterov=True, schedule=job_pb2.CONSTANT
)
OUTER_SETTINGS = codec.optimizer_from_proto(
    job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.7, momentum=0.9, nesterov=True, total_steps=1)
)


def inner_adamw(total_steps: int) -> job_pb2.OptimizerConfig:
    """The workers' inner AdamW, its schedule explicit: the reference needs the one they ran."""
    return job_pb2.OptimizerConfig(
        kind=job_pb2.ADAMW,
        lr=2e-3,
        weight_decay=0.1,
        schedule=job_pb2.COSINE,
        warmup_steps=2,
        total_steps=total_steps,
    )


def epoch_tokens(train: torch.Tensor) -> Callable[[job_pb2.StepEvent], torch.Tensor]:
    """A step event's (B, T+1) tokens in epoch 0's data order."""
    sequences = to_sequences(train, SMALL.block_size)
    plan = plan_data_shards(sequences.shape[0], BATCH, LEASE, SEED, 0)

    def tokens_of(ev: job_pb2.StepEvent) -> torch.Tensor:
        ids = plan[ev.data_shard][ev.batch_index * BATCH : (ev.batch_index + 1) * BATCH]
        return sequences[ids]

    return tokens_of


def _train_local(
    cluster: LocalCluster, local: job_pb2.LocalSteps, train: torch.Tensor, evals: torch.Tensor
) -> tuple[list[job_pb2.StepEvent], model_io.TrainedModel, list[Shard], int]:
    """One epoch of a job with DiLoCo's outer optimizer and `local`: its step events, the
    trained model, its shards as planned, and the pushes the servers took for it."""
    spec = make_spec(SMALL, OUTER, batch_size=BATCH, batches_per_lease=LEASE, seed=SEED)
    spec.local_steps.CopyFrom(local)
    driver = Driver(cluster.coordinator)
    pushes_before = _pushes(cluster)
    try:
        job_id = driver.submit(spec, train, evals)
        steps = _steps(driver.run_epoch(job_id, 0))
        trained = model_io.fetch_model(cluster.coordinator, job_id)
        shard_map = driver.stub.GetShardMap(coordinator_pb2.GetShardMapRequest(job_id=job_id))
    finally:
        driver.close()
    shards = [codec.shard_from_proto(m) for m in shard_map.shards]
    return steps, trained, shards, _pushes(cluster) - pushes_before


def test_local_steps_match_single_process_diloco(cluster: LocalCluster) -> None:
    h = 3  # leases of 6: two rounds each
    inner = inner_adamw(total_steps=40)
    train, evals = _data()
    steps, trained, _, pushes = _train_local(
        cluster, job_pb2.LocalSteps(steps=h, inner_optimizer=inner), train, evals
    )
    assert len(steps) == LEASES * LEASE  # every batch once, each with its own event
    assert len({(s.data_shard, s.batch_index) for s in steps}) == len(steps)
    rounds = {(s.step, s.worker_id) for s in steps}
    assert len(rounds) == LEASES * 2  # two rounds a lease: one push per round, not per batch
    assert pushes == 2 * len(rounds)  # to each of the two servers
    assert all(s.computed_at == s.step for s in steps)
    assert trained.version == len({s.step for s in steps})

    tokens_of = epoch_tokens(train)

    # The outer schedule: the coordinator resolved total_steps; constant lr needs none.
    outer_settings = OUTER_SETTINGS
    inner_settings = codec.optimizer_from_proto(inner)
    # One thread, as each worker runs: the key bias's gradient is rounding noise (softmax
    # ignores a per-query constant), which AdamW scales up to lr-sized steps, so the reference
    # must round as the workers do.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = diloco_reference(
            SMALL, SEED, h, inner_settings, outer_settings, steps, tokens_of
        )
    finally:
        torch.set_num_threads(threads)
    got = dict(trained.model.named_parameters())
    init = dict(init_model(SMALL, SEED).named_parameters())
    worst = moved = 0.0
    for n, p in expected.named_parameters():
        torch.testing.assert_close(got[n], p, msg=f"local steps: {n} differs")
        worst = max(worst, float((got[n] - p).detach().abs().max()))
        moved = max(moved, float((init[n] - p).detach().abs().max()))
    assert moved > 1e-2
    print(
        f"\nlocal steps H={h}: {len(rounds)} pushes for {len(steps)} batches, max diff {worst:.2e}"
    )


@pytest.mark.parametrize("overlap", [False, True])
def test_streaming_fragments_match_single_process_streaming_diloco(
    cluster: LocalCluster, overlap: bool
) -> None:
    h, fragments = 6, 3  # leases of 6: three windows of 2, then two flushes
    inner = inner_adamw(total_steps=80)
    train, evals = _data()
    local = job_pb2.LocalSteps(steps=h, inner_optimizer=inner, fragments=fragments, overlap=overlap)
    steps, trained, shards, pushed = _train_local(cluster, local, train, evals)
    assert {s.fragment for s in shards} == set(range(fragments))
    assert len(steps) == LEASES * LEASE  # every batch once, each with its own event
    assert len({(s.data_shard, s.batch_index) for s in steps}) == len(steps)
    # w0 has 3 leases, w1 2: 3 x (3 windows + 2 flushes) versions; a push per window and
    # flush of every worker, to each of the two servers.
    assert trained.version == 3 * (3 + fragments - 1)
    pushes = LEASES * (3 + fragments - 1)
    assert pushed == 2 * pushes

    tokens_of = epoch_tokens(train)

    outer_settings = OUTER_SETTINGS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs (see the local-steps test)
    try:
        expected = streaming_reference(
            SMALL,
            shards,
            h,
            fragments,
            codec.optimizer_from_proto(inner),
            outer_settings,
            steps,
            tokens_of,
            overlap,
        )
    finally:
        torch.set_num_threads(threads)
    got = dict(trained.model.named_parameters())
    init = dict(init_model(SMALL, SEED).named_parameters())
    moved = 0.0
    for s in shards:
        value = shard_view(got[s.param].detach(), s)
        torch.testing.assert_close(value, expected[s.shard_id], msg=f"{s.shard_id} differs")
        start = shard_view(init[s.param].detach(), s)
        moved = max(moved, float((start - expected[s.shard_id]).abs().max()))
    assert moved > 1e-2
    print(f"\nstreaming H={h} F={fragments}: {pushes} pushes for {len(steps)} batches")


def _ssp_spec(staleness: int) -> job_pb2.JobSpec:
    adamw = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=3e-3, schedule=job_pb2.CONSTANT)
    spec = make_spec(SMALL, adamw, batch_size=BATCH, batches_per_lease=LEASE, seed=SEED)
    spec.consistency = job_pb2.BOUNDED_STALENESS if staleness >= 0 else job_pb2.SYNC
    spec.max_staleness = max(0, staleness)
    return spec


def _run(
    cluster: LocalCluster, spec: job_pb2.JobSpec, freeze: str = ""
) -> tuple[list[job_pb2.StepEvent], dict[str, torch.Tensor]]:
    train, evals = _data()
    driver = Driver(cluster.coordinator)
    try:
        job_id = driver.submit(spec, train, evals)
        thaw = None
        if freeze:
            # Freeze one worker for a moment once the epoch is under way: a slow machine.
            def pause() -> None:
                time.sleep(1.0)
                cluster.kill(freeze, signal.SIGSTOP)
                time.sleep(1.5)
                cluster.kill(freeze, signal.SIGCONT)

            thaw = threading.Thread(target=pause)
            thaw.start()
        steps = _steps(driver.run_epoch(job_id, 0))
        if thaw is not None:
            thaw.join()
        trained = model_io.fetch_model(cluster.coordinator, job_id)
    finally:
        driver.close()
    return steps, {n: p.detach() for n, p in trained.model.named_parameters()}


def test_bounded_staleness_keeps_its_bound_and_zero_is_sync(cluster: LocalCluster) -> None:
    sync_steps, sync_params = _run(cluster, _ssp_spec(-1))
    zero_steps, zero_params = _run(cluster, _ssp_spec(0))
    key = sorted((s.step, s.worker_id, s.data_shard, s.batch_index) for s in sync_steps)
    assert sorted((s.step, s.worker_id, s.data_shard, s.batch_index) for s in zero_steps) == key
    for n, p in sync_params.items():
        assert torch.equal(zero_params[n], p), f"ssp:0 differs from sync at {n}"

    bound = 2
    before = _staleness_counts(cluster)
    steps, params = _run(cluster, _ssp_spec(bound), freeze="worker-1")
    after = _staleness_counts(cluster)
    # SYNC's composition: the same batches make the same steps; only versions may lag.
    assert sorted((s.step, s.worker_id, s.data_shard, s.batch_index) for s in steps) == key
    lag = [s.step - s.computed_at for s in steps]
    assert all(0 <= x <= bound for x in lag), lag
    assert max(lag) > 0, "no push was stale: the frozen worker never fell behind"
    pushes = after["+Inf"] - before["+Inf"]
    assert pushes == 2 * len(steps)  # every push, on both servers
    assert after[f"{float(bound)}"] - before[f"{float(bound)}"] == pushes  # none past the bound
    assert any(not torch.equal(params[n], p) for n, p in sync_params.items())
    print(f"\nSSP s={bound}: lag histogram {sorted(set(lag))} over {len(steps)} steps")


def test_async_trains_every_batch_once_with_one_version_per_push(cluster: LocalCluster) -> None:
    """ASYNC: every batch trained exactly once (one event each, none redone), every push
    applied on both servers (one version per push: the servers end at the number of
    batches), pushes stale (computed before other workers' pushes landed) yet taken, each
    mid-epoch checkpoint holding exactly the batches whose pushes made its version, and the
    loss going down on data with something to learn (each token follows the one before)."""
    import json  # the checkpoints' manifests

    adamw = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-2, schedule=job_pb2.CONSTANT)
    spec = make_spec(SMALL, adamw, batch_size=BATCH, batches_per_lease=LEASE, seed=SEED)
    spec.consistency = job_pb2.ASYNC
    spec.checkpoint_every, spec.keep_checkpoints = 10, 100
    n = LEASES * LEASE * BATCH * SMALL.block_size + 1
    train = (torch.arange(n, dtype=torch.int32) * 3) % SMALL.vocab_size
    evals = (torch.arange(4 * SMALL.block_size + 1, dtype=torch.int32) * 3 + 1) % SMALL.vocab_size
    before = _staleness_counts(cluster)
    driver = Driver(cluster.coordinator)
    try:
        job_id = driver.submit(spec, train, evals)
        events = driver.run_epoch(job_id, 0)
        trained = model_io.fetch_model(cluster.coordinator, job_id)
    finally:
        driver.close()
    after = _staleness_counts(cluster)
    steps = _steps(events)
    summary = events[-1].summary
    batches = LEASES * LEASE

    assert len(steps) == batches == summary.batches and summary.batches_redone == 0
    assert len({(s.data_shard, s.batch_index) for s in steps}) == batches
    # One version per push on every server; a push is in every server from step + 1 on.
    assert trained.version == summary.end_step == batches
    assert after["+Inf"] - before["+Inf"] == 2 * batches  # every push, on both servers
    assert all(s.computed_at <= s.step < batches for s in steps)
    assert max(s.step for s in steps) == batches - 1
    assert max(s.step - s.computed_at for s in steps) > 0, "no push was stale"

    found = 0
    for manifest in sorted(
        (cluster.run_dir / "state" / "jobs" / job_id).glob("step-*/manifest.json")
    ):
        m = json.loads(manifest.read_text())
        if m["epoch"] != 0:
            continue  # the submit's and the epoch end's
        v = m["version"]
        held: dict[str, int] = {}
        for s in steps:
            if s.step < v:
                held[str(s.data_shard)] = held.get(str(s.data_shard), 0) + 1
        assert m["done"] == held and sum(held.values()) == v, (v, m["done"], held)
        found += 1
    assert found, "no mid-epoch checkpoint was written"

    def loss(model: torch.nn.Module) -> float:
        seqs = to_sequences(evals, SMALL.block_size).long()
        with torch.no_grad():
            _, out = model(seqs[:, :-1], seqs[:, 1:])
        return float(out)

    first, last = loss(init_model(SMALL, SEED)), loss(trained.model)
    assert last < first - 0.5, (first, last)
    assert abs(summary.eval_loss - last) < 1e-4
    print(f"\nASYNC: eval loss {first:.3f} -> {last:.3f}; {found} mid-epoch checkpoints exact")
