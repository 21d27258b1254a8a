"""Sparse-row pushes over real gRPC: one real parameter-server process (`ps_cluster`) and the
worker's own `Replica` and `ServerPool`.

A classification job pushed with sparse rows (the default for uncompressed pushes) ends
bit-identical to the same job pushed dense (`ServerPool(sparse_rows=False)`), with fewer
gradient bytes counted by the server (`lmps_ps_pushed_bytes_total`); a rows push off its
shard's row grid is INVALID_ARGUMENT, names the shard and changes nothing.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
import torch

from lmps.client.launcher import LocalCluster
from lmps.core.model import init_model
from lmps.core.optim import OptimizerSettings
from lmps.core.partition import shard_view
from lmps.core.sparse_rows import RowGrid, Rows, push_grids
from lmps.rpc import codec
from lmps.services.worker.pool import ServerPool
from lmps.services.worker.replica import Replica
from lmps.v1 import parameter_pb2
from tests.conftest import LoadJob
from tests.service.test_lifecycle import scrape
from tests.service.test_metrics import value
from tests.service.test_parameter_server import (
    SERVER,
    Grads,
    Stub,
    assert_identical,
    header,
    pull_all,
)
from tests.unit.test_sparse_rows import BATCH, CONFIG, classify_batch, model_shards

pytestmark = pytest.mark.cluster

STEPS = 4
ADAMW = OptimizerSettings(kind="adamw", lr=1e-2, weight_decay=0.1, beta2=0.95)
SHARDS = model_shards(CONFIG, shard_bytes=4 * 1000)  # wte (256, 16): 5 shards, cut mid-row


def pushed_bytes(cluster: LocalCluster) -> float:
    return value(scrape(cluster.procs[1].metrics_port), "lmps_ps_pushed_bytes_total")


def train(
    cluster: LocalCluster, stub: Stub, load_job: LoadJob, sparse_rows: bool
) -> tuple[str, Grads, float]:
    """STEPS classify steps of one worker -> (job id, parameters, gradient bytes received)."""
    job_id = f"rows-{uuid.uuid4().hex[:8]}"
    init = init_model(CONFIG, seed=3)
    values = {s.shard_id: shard_view(init.get_parameter(s.param).data, s) for s in SHARDS}
    load_job(job_id, SHARDS, values, ["w0"], ADAMW)
    replica = Replica(CONFIG, SHARDS, torch.device("cpu"), task="classify")
    address = {SERVER: cluster.procs[1].address}
    pool = ServerPool(job_id, "w0", SHARDS, address, timeout_s=30, sparse_rows=sparse_rows)
    before = pushed_bytes(cluster)
    try:
        for t in range(STEPS):
            version, pulled = pool.pull(t)
            assert version == t
            replica.load(pulled)
            _, grads = replica.train_step(classify_batch(CONFIG, seed=t))
            assert pool.push(t, float(BATCH), grads) == t + 1
    finally:
        pool.close()
    version, final = pull_all(stub, job_id, min_version=STEPS)
    assert version == STEPS
    return job_id, final, pushed_bytes(cluster) - before


def test_a_classify_job_pushed_as_rows_equals_it_pushed_dense(
    ps_cluster: LocalCluster, ps_stub: Stub, load_job: LoadJob
) -> None:
    _, dense, dense_bytes = train(ps_cluster, ps_stub, load_job, sparse_rows=False)
    job_id, rows, rows_bytes = train(ps_cluster, ps_stub, load_job, sparse_rows=True)
    assert_identical(rows, dense)
    init = init_model(CONFIG, seed=3).get_parameter("transformer.wte.weight")
    moved = rows["transformer.wte.weight#0"] - shard_view(init.data, SHARDS[0])
    assert SHARDS[0].param == "transformer.wte.weight" and float(moved.abs().max()) > 1e-3
    # wte is 256 x 16 (4096 of the model's 7.7k values) and a batch touches at most 32 of its
    # rows; wpe at most 8 of 16.
    assert rows_bytes < 0.6 * dense_bytes, (rows_bytes, dense_bytes)
    print(f"\nclassify push bytes: dense {dense_bytes:.0f}, rows {rows_bytes:.0f} over {STEPS}")

    # A rows gradient on the wrong grid (width 8 instead of 16) in an otherwise valid push.
    wte = next(s for s in SHARDS if s.param == "transformer.wte.weight" and s.start % 16)
    msgs = [header(job_id, "w0", STEPS)]
    for s in SHARDS:
        if s.shard_id == wte.shard_id:
            no_rows = torch.zeros(0, dtype=torch.int32)
            bad = Rows(s.numel, RowGrid(8, s.start % 8), no_rows, torch.zeros(0))
            blob = codec.compressed_shard_bytes(s.shard_id, STEPS, bad, wrap=2)
        else:
            blob = codec.shard_tensor_bytes(s.shard_id, STEPS, torch.zeros(s.numel), wrap=2)
        msgs.append(parameter_pb2.PushRequest.FromString(blob))
    assert wte.shard_id in push_grids(SHARDS)
    with pytest.raises(grpc.RpcError) as info:
        ps_stub.Push(iter(msgs), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert repr(wte.shard_id) in details and "width 8" in details, details
    listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job_id), timeout=10)
    assert (listing.version, list(listing.pushed)) == (STEPS, [])
    assert_identical(pull_all(ps_stub, job_id)[1], rows)
