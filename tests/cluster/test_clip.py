"""Gradient clipping on a real 2-server, 2-worker cluster: every step's mean gradient clipped
by its global norm across both servers (the workers exchange it: GradNorm, ApplyStep) equals
one process running torch with clip_grad_norm_ on the union of the workers' batches; and
`lmps train --max-grad-norm` writes each step's norm to metrics.jsonl."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.v1 import job_pb2
from tests.cluster.jobs import SMALL, make_spec, random_tokens
from tests.cluster.test_parity import BATCH, SEED, reference, run_job
from tests.cluster.test_run_outputs import SMALL as SMALL_FLAGS
from tests.cluster.test_run_outputs import TEXT, lmps

pytestmark = pytest.mark.cluster

EPOCHS = 2
BATCHES = 6  # per epoch, one per lease: 3 steps of both workers
MAX_NORM = 0.5  # the tiny model's step norms are about 1: every step clips
SGD = job_pb2.OptimizerConfig(
    kind=job_pb2.SGD, lr=0.05, momentum=0.9, weight_decay=0.01, schedule=job_pb2.CONSTANT
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(
        servers=2, workers=2, worker_threads=1, run_dir=str(tmp_path_factory.mktemp("clip"))
    )
    with LocalCluster(spec) as c:
        yield c


def test_clipped_cluster_matches_clip_grad_norm_on_the_union_batch(cluster: LocalCluster) -> None:
    train = random_tokens(BATCHES * BATCH * SMALL.block_size + 1, SMALL.vocab_size, seed=1)
    evals = random_tokens(4 * SMALL.block_size + 1, SMALL.vocab_size, seed=2)
    spec = make_spec(SMALL, SGD, batch_size=BATCH, seed=SEED, epochs=EPOCHS)
    spec.max_grad_norm = MAX_NORM
    run = run_job(cluster, spec, train, evals, epochs=EPOCHS)
    steps, plans, epoch_of, trained = run.steps, run.plans, run.epoch_of, run.trained
    assert sum(len(v) for v in steps.values()) == EPOCHS * BATCHES
    norms: list[float] = []
    expected = reference(SGD, train, steps, plans, epoch_of, max_grad_norm=MAX_NORM, norms=norms)
    got = dict(trained.model.named_parameters())
    for n, p in expected.named_parameters():
        torch.testing.assert_close(got[n], p, msg=n)
    # The workers of a step report one norm (bit for bit), clip_grad_norm_'s for the union.
    reported = []
    for s in sorted(steps):
        assert len({ev.grad_norm for ev in steps[s]}) == 1, steps[s]
        reported.append(steps[s][0].grad_norm)
    torch.testing.assert_close(
        torch.tensor(reported, dtype=torch.float64),
        torch.tensor(norms, dtype=torch.float64),
        rtol=1e-5,
        atol=0.0,
    )
    assert all(x > MAX_NORM for x in reported)
    worst = max(float((got[n] - p).detach().abs().max()) for n, p in expected.named_parameters())
    off = max(abs(a - b) for a, b in zip(reported, norms, strict=True))
    print(f"\ncluster clip: {len(steps)} steps, params max abs diff {worst:.3e}, norms {off:.3e}")


def test_train_writes_grad_norms_to_metrics_jsonl(tmp_path: Path, cluster: LocalCluster) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT)
    argv = ["train", "--coordinator", cluster.coordinator, "--data", "corpus.txt", *SMALL_FLAGS]
    done = lmps(*argv, "--max-grad-norm", "0.5", "--cache-dir", "cache", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert steps and all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in steps)
