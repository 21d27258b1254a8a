"""lmps SYNC with each worker behind a shaped link (`bench.slowlink`'s network at 5 Mbit/s):
the links hold their rate, every pull and push really crosses them, and the trained model is
still exactly single-process torch's (`test_parity.reference`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from bench.slowlink.lmps_run import cluster_on
from bench.slowlink.report import peak_bytes_per_s
from bench.slowlink.topology import (
    ByteSampler,
    Shaping,
    Topology,
    TopologyError,
    shaped_network,
    unavailable,
)
from lmps.client import model_io
from lmps.core.data import plan_data_shards, to_sequences
from lmps.core.model import init_model
from lmps.v1 import job_pb2
from tests.cluster.jobs import SMALL, Driver, make_spec, random_tokens
from tests.cluster.test_parity import BATCH, OPTIMIZERS, SEED, reference

pytestmark = pytest.mark.cluster

SHAPING = Shaping(rate_mbit=5)
"""Slow enough that the check bites: unshaped, this job peaks near 1.5 MB/s a link here,
twice what 5 Mbit/s (625 kB/s) plus the bucket allows."""
BATCHES = 24  # 12 steps of 2 workers
WINDOW_S = 1.0
"""Throughput is checked over every span between byte samples at least this long."""


@pytest.fixture
def network() -> Iterator[Topology]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    stack = ExitStack()
    try:
        topo = stack.enter_context(shaped_network(2, SHAPING))
    except TopologyError as err:
        pytest.skip(f"cannot build the shaped network here: {err}")
    with stack:
        yield topo


def test_sync_across_shaped_links(tmp_path: Path, network: Topology) -> None:
    topo = network
    optimizer = OPTIMIZERS["adamw-cosine"]
    train = random_tokens(BATCHES * BATCH * SMALL.block_size + 1, SMALL.vocab_size, seed=1)
    evals = random_tokens(4 * SMALL.block_size + 1, SMALL.vocab_size, seed=2)
    spec = make_spec(SMALL, optimizer, batch_size=BATCH, seed=SEED, epochs=1)
    with (
        cluster_on(topo, servers=2, threads=1, log_dir=tmp_path) as cluster,
        ByteSampler(topo, interval_s=0.05) as sampler,
    ):
        driver = Driver(cluster.coordinator)
        try:
            job_id = driver.submit(spec, train, evals)
            before = topo.counters()
            events = driver.run_epoch(job_id, 0)
            after = topo.counters()
            trained = model_io.fetch_model(cluster.coordinator, job_id)
        finally:
            driver.close()
    steps: dict[int, list[job_pb2.StepEvent]] = defaultdict(list)
    for ev in events:
        if ev.WhichOneof("kind") == "step":
            steps[ev.step.step].append(ev.step)
    per_worker = Counter(e.worker_id for evs in steps.values() for e in evs)
    assert sum(per_worker.values()) == BATCHES and len(per_worker) == 2

    # 1. No span of the run carried more than tbf lets through: rate x span + the bucket.
    for link in topo.workers:
        for direction in ("up", "down"):
            times, counts = sampler.series(link.netns, direction)
            peak = peak_bytes_per_s(times, counts, WINDOW_S)
            limit = 1.05 * SHAPING.bytes_per_s + SHAPING.burst / WINDOW_S
            assert peak <= limit, f"{link.netns} {direction}: {peak:.0f} B/s > {limit:.0f}"
            whole = (counts[-1] - counts[0]) / (times[-1] - times[0])
            assert whole <= SHAPING.bytes_per_s + SHAPING.burst / (times[-1] - times[0])

    # 2. Every step's pull came down and its push went up this worker's shaped link.
    model_bytes = sum(p.numel() * 4 for p in init_model(SMALL, SEED).parameters())
    for i, link in enumerate(topo.workers):
        n = per_worker[f"worker-{i}"]
        down = after[link.netns].down - before[link.netns].down
        up = after[link.netns].up - before[link.netns].up
        assert n > 0
        assert down >= model_bytes * n, f"worker-{i} received {down} B for {n} pulls"
        assert up >= model_bytes * n, f"worker-{i} sent {up} B for {n} pushes"
    moved = sum(after[w.netns].up + after[w.netns].down for w in topo.workers) - sum(
        before[w.netns].up + before[w.netns].down for w in topo.workers
    )
    assert moved >= model_bytes * BATCHES * 2

    # 3. Shaping changed the timing, not the result: single-process torch on the same rows.
    n_seq = to_sequences(train, SMALL.block_size).shape[0]
    plans = {0: plan_data_shards(n_seq, BATCH, 1, SEED, 0)}
    expected = reference(optimizer, train, steps, plans, dict.fromkeys(steps, 0))
    got = dict(trained.model.named_parameters())
    assert trained.version == len(steps)
    for name, p in expected.named_parameters():
        torch.testing.assert_close(got[name], p, msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]
    print(
        f"\nslowlink: {len(steps)} steps at {SHAPING.rate_mbit:g} Mbit/s, "
        f"{moved / 1e6:.1f} MB on the worker links ({model_bytes / 1e3:.0f} KB model)"
    )
