"""One real parameter-server process driven over real gRPC with the generated stubs.

The contract under test is `protos/lmps/v1/parameter.proto`: every documented status code of
Push / Pull / Load / GetShard, that a rejected call leaves every parameter bit-identical (and
the pending SYNC step intact), that the server stays SERVING, and that a step's update is
the plain SGD rule on the weighted mean of the members' gradients.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from lmps.client.launcher import LocalCluster
from lmps.core.compress import Compression, ErrorFeedback, encode
from lmps.core.optim import FUSED_ALIGN, OptimizerSettings
from lmps.core.partition import Shard
from lmps.rpc import codec
from lmps.services.worker.pool import ServerPool
from lmps.v1 import job_pb2, parameter_pb2, parameter_pb2_grpc, tensor_pb2
from tests.conftest import LoadJob, health_status, load_messages

pytestmark = pytest.mark.cluster

Stub: TypeAlias = parameter_pb2_grpc.ParameterServiceStub
Grads: TypeAlias = dict[str, torch.Tensor]
Code = grpc.StatusCode

SERVER = "ps-0"  # LocalCluster's id for its first parameter server
MEMBERS = ["w0", "w1"]
LR = 0.125
SGD = OptimizerSettings(kind="sgd", lr=LR)


def _shard(param: str, shape: tuple[int, ...], index: int, start: int, numel: int) -> Shard:
    return Shard(f"{param}#{index}", param, shape, start, numel, SERVER, len(shape) >= 2)


# A small job: a (6, 4) weight split in two slices, an odd-length bias and a scalar.
SHARDS = [
    _shard("wte.weight", (6, 4), 0, 0, 12),
    _shard("wte.weight", (6, 4), 1, 12, 12),
    _shard("ln_f.bias", (5,), 0, 0, 5),
    _shard("logit_scale", (), 0, 0, 1),
]
NUMEL = {s.shard_id: s.numel for s in SHARDS}


def random_values(seed: int) -> Grads:
    gen = torch.Generator().manual_seed(seed)
    return {sid: torch.randn(n, generator=gen) for sid, n in NUMEL.items()}


# -- RPC helpers ---------------------------------------------------------------------------


def pull_all(
    stub: Stub, job_id: str, min_version: int = 0, timeout: float = 10.0
) -> tuple[int, Grads]:
    """Every shard at one version, decoded."""
    request = parameter_pb2.PullRequest(job_id=job_id, min_version=min_version)
    msgs = list(stub.Pull(request, timeout=timeout))
    versions = {m.version for m in msgs}
    assert len(versions) == 1, f"one pull mixed versions {versions}"
    values = {m.shard_id: codec.decode(m.tensor) for m in msgs}
    assert len(values) == len(msgs), "a shard was sent twice"
    return versions.pop(), values


def header(job_id: str, worker: str, step: int, weight: float = 1.0) -> parameter_pb2.PushRequest:
    h = parameter_pb2.PushHeader(job_id=job_id, worker_id=worker, step=step, weight=weight)
    return parameter_pb2.PushRequest(header=h)


def grad(sid: str, tensor: tensor_pb2.Tensor, step: int) -> parameter_pb2.PushRequest:
    return parameter_pb2.PushRequest(
        grad=tensor_pb2.ShardTensor(shard_id=sid, version=step, tensor=tensor)
    )


def push_messages(
    job_id: str, worker: str, step: int, grads: Grads, weight: float = 1.0
) -> list[parameter_pb2.PushRequest]:
    msgs = [header(job_id, worker, step, weight)]
    msgs += [grad(sid, codec.encode(g), step) for sid, g in grads.items()]
    return msgs


def push(
    stub: Stub, job_id: str, worker: str, step: int, grads: Grads, weight: float = 1.0
) -> parameter_pb2.PushResponse:
    return stub.Push(iter(push_messages(job_id, worker, step, grads, weight)), timeout=10)


def sgd(values: Grads, contributions: list[tuple[float, Grads]]) -> Grads:
    """Reference update: p - lr * weighted mean of the contributed gradients."""
    total = sum(w for w, _ in contributions)
    out = {}
    for sid, p in values.items():
        mean = sum(w * g[sid].to(torch.float32) for w, g in contributions) / total
        out[sid] = p - LR * mean
    return out


def assert_identical(got: Grads, want: Grads) -> None:
    assert got.keys() == want.keys()
    for sid in want:
        assert got[sid].dtype == torch.float32
        assert torch.equal(got[sid], want[sid]), f"shard {sid} changed"


def assert_serving(channel: grpc.Channel) -> None:
    for service in ("", "lmps.v1.ParameterService"):
        assert health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Job:
    job_id: str
    init: Grads


@pytest.fixture
def job(load_job: LoadJob) -> Job:
    """A fresh job with random values; members w0 and w1; plain SGD."""
    job_id = f"test-{uuid.uuid4().hex[:8]}"
    init = random_values(seed=0)
    resp = load_job(job_id, SHARDS, init, MEMBERS, SGD)
    assert resp.shards == len(SHARDS)
    assert resp.bytes == 4 * sum(NUMEL.values())
    return Job(job_id, init)


@dataclass
class MidStep:
    """Step 0 applied (version 1); w0 has pushed for step 1, w1 has not."""

    job_id: str
    values: Grads  # parameters at version 1
    g0: Grads  # w0's gradient for step 1 (weight W0)
    g1: Grads  # a valid gradient w1 may push for step 1


W0 = 3.0


@pytest.fixture
def mid_step(ps_stub: Stub, job: Job) -> MidStep:
    assert push(ps_stub, job.job_id, "w0", 0, random_values(10)).applied is False
    assert push(ps_stub, job.job_id, "w1", 0, random_values(11)).applied is True
    g0 = random_values(12)
    resp = push(ps_stub, job.job_id, "w0", 1, g0, weight=W0)
    assert (resp.version, resp.applied, resp.pending) == (1, False, 1)
    version, values = pull_all(ps_stub, job.job_id)
    assert version == 1
    return MidStep(job.job_id, values, g0, random_values(13))


# -- bad input -----------------------------------------------------------------------------

# Each case sends one bad call built from the mid-step state and names the status it must get.
BadCall = Callable[[Stub, MidStep], object]


def _push(build: Callable[[MidStep], list[parameter_pb2.PushRequest]]) -> BadCall:
    return lambda stub, m: stub.Push(iter(build(m)), timeout=10)


def _w1(m: MidStep, **overrides: object) -> list[parameter_pb2.PushRequest]:
    """w1's valid push for step 1, with header fields overridden."""
    fields: dict[str, object] = {"job_id": m.job_id, "worker": "w1", "step": 1, "weight": 1.0}
    fields.update(overrides)
    return push_messages(grads=m.g1, **fields)  # type: ignore[arg-type]


def _with_grad(m: MidStep, sid: str, tensor: tensor_pb2.Tensor) -> list[parameter_pb2.PushRequest]:
    """w1's valid push with shard `sid`'s gradient replaced by `tensor`."""
    msgs = _w1(m)
    for msg in msgs[1:]:
        if msg.grad.shard_id == sid:
            msg.grad.tensor.CopyFrom(tensor)
    return msgs


def _nonfinite(m: MidStep, value: float) -> list[parameter_pb2.PushRequest]:
    bad = m.g1["wte.weight#1"].clone()
    bad[5] = value
    return _with_grad(m, "wte.weight#1", codec.encode(bad))


def _short_bytes(m: MidStep) -> list[parameter_pb2.PushRequest]:
    t = codec.encode(m.g1["ln_f.bias#0"])
    t.data = t.data[:-1]
    return _with_grad(m, "ln_f.bias#0", t)


def _drop(m: MidStep, sid: str) -> list[parameter_pb2.PushRequest]:
    return [msg for msg in _w1(m) if msg.grad.shard_id != sid]


def _pull(stub: Stub, timeout: float = 10.0, **fields: object) -> list[tensor_pb2.ShardTensor]:
    return list(stub.Pull(parameter_pb2.PullRequest(**fields), timeout=timeout))  # type: ignore[arg-type]


BAD_CALLS: dict[str, tuple[BadCall, grpc.StatusCode]] = {
    # -- push: which shards arrive
    "push-unknown-shard": (
        _push(lambda m: [*_w1(m), grad("nope#0", codec.encode(torch.zeros(3)), 1)]),
        Code.NOT_FOUND,
    ),
    "push-missing-shard": (_push(lambda m: _drop(m, "logit_scale#0")), Code.INVALID_ARGUMENT),
    "push-no-shards": (_push(lambda m: _w1(m)[:1]), Code.INVALID_ARGUMENT),
    "push-duplicate-shard": (_push(lambda m: [*_w1(m), _w1(m)[2]]), Code.INVALID_ARGUMENT),
    # -- push: what a gradient looks like
    "push-wrong-byte-length": (_push(_short_bytes), Code.INVALID_ARGUMENT),
    "push-int32-grad": (
        _push(
            lambda m: _with_grad(m, "ln_f.bias#0", codec.encode(torch.ones(5, dtype=torch.int32)))
        ),
        Code.INVALID_ARGUMENT,
    ),
    "push-bool-grad": (
        _push(
            lambda m: _with_grad(m, "ln_f.bias#0", codec.encode(torch.ones(5, dtype=torch.bool)))
        ),
        Code.INVALID_ARGUMENT,
    ),
    "push-unspecified-dtype": (
        _push(
            lambda m: _with_grad(m, "ln_f.bias#0", tensor_pb2.Tensor(shape=[5], data=b"\0" * 20))
        ),
        Code.INVALID_ARGUMENT,
    ),
    "push-wrong-numel": (
        _push(lambda m: _with_grad(m, "wte.weight#0", codec.encode(torch.zeros(13)))),
        Code.INVALID_ARGUMENT,
    ),
    "push-wrong-rank": (
        _push(lambda m: _with_grad(m, "wte.weight#0", codec.encode(torch.zeros(3, 4)))),
        Code.INVALID_ARGUMENT,
    ),
    "push-nan": (_push(lambda m: _nonfinite(m, float("nan"))), Code.INVALID_ARGUMENT),
    "push-inf": (_push(lambda m: _nonfinite(m, float("inf"))), Code.INVALID_ARGUMENT),
    "push-minus-inf": (_push(lambda m: _nonfinite(m, float("-inf"))), Code.INVALID_ARGUMENT),
    # -- push: header
    "push-stale-step": (_push(lambda m: _w1(m, step=0)), Code.FAILED_PRECONDITION),
    "push-future-step": (_push(lambda m: _w1(m, step=2)), Code.OUT_OF_RANGE),
    "push-duplicate-worker": (_push(lambda m: _w1(m, worker="w0")), Code.ALREADY_EXISTS),
    "push-unknown-worker": (_push(lambda m: _w1(m, worker="w9")), Code.NOT_FOUND),
    "push-unknown-job": (_push(lambda m: _w1(m, job_id="no-such-job")), Code.NOT_FOUND),
    "push-missing-header": (_push(lambda m: _w1(m)[1:]), Code.INVALID_ARGUMENT),
    "push-empty-stream": (_push(lambda m: []), Code.INVALID_ARGUMENT),
    "push-header-twice": (_push(lambda m: [_w1(m)[0], *_w1(m)]), Code.INVALID_ARGUMENT),
    "push-header-after-grads": (_push(lambda m: [*_w1(m), _w1(m)[0]]), Code.INVALID_ARGUMENT),
    "push-zero-weight": (_push(lambda m: _w1(m, weight=0.0)), Code.INVALID_ARGUMENT),
    "push-negative-weight": (_push(lambda m: _w1(m, weight=-1.0)), Code.INVALID_ARGUMENT),
    "push-nan-weight": (_push(lambda m: _w1(m, weight=float("nan"))), Code.INVALID_ARGUMENT),
    "push-inf-weight": (_push(lambda m: _w1(m, weight=float("inf"))), Code.INVALID_ARGUMENT),
    # -- reads
    "pull-unknown-shard": (
        lambda s, m: _pull(s, job_id=m.job_id, shard_ids=["wte.weight#0", "nope#0"]),
        Code.NOT_FOUND,
    ),
    "pull-unknown-job": (lambda s, m: _pull(s, job_id="no-such-job"), Code.NOT_FOUND),
    "pull-future-version": (
        lambda s, m: _pull(s, timeout=0.5, job_id=m.job_id, min_version=5),
        Code.DEADLINE_EXCEEDED,
    ),
    "get-shard-unknown": (
        lambda s, m: s.GetShard(parameter_pb2.GetShardRequest(shard_id="nope#0"), timeout=10),
        Code.NOT_FOUND,
    ),
    "get-shard-unknown-job": (
        lambda s, m: s.GetShard(
            parameter_pb2.GetShardRequest(job_id="no-such-job", shard_id="ln_f.bias#0"), timeout=10
        ),
        Code.NOT_FOUND,
    ),
    "list-shards-unknown-job": (
        lambda s, m: s.ListShards(
            parameter_pb2.ListShardsRequest(job_id="no-such-job"), timeout=10
        ),
        Code.NOT_FOUND,
    ),
    "set-members-unknown-job": (
        lambda s, m: s.SetMembers(
            parameter_pb2.SetMembersRequest(job_id="no-such-job", members=["w0"]), timeout=10
        ),
        Code.NOT_FOUND,
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_is_rejected_and_changes_nothing(
    case: str, ps_stub: Stub, ps_channel: grpc.Channel, mid_step: MidStep
) -> None:
    call, code = BAD_CALLS[case]
    with pytest.raises(grpc.RpcError) as info:
        call(ps_stub, mid_step)
    assert info.value.code() == code, info.value.details()

    # Every parameter is bit-identical, the version did not move, w0's push is still pending.
    version, values = pull_all(ps_stub, mid_step.job_id)
    assert version == 1
    assert_identical(values, mid_step.values)
    listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=10)
    assert (listing.job_id, listing.version) == (mid_step.job_id, 1)
    assert list(listing.pushed) == ["w0"]
    assert_serving(ps_channel)

    # Nothing leaked into the step's gradient sum: w1's valid push completes exactly the
    # step that w0 and w1 contributed to.
    resp = push(ps_stub, mid_step.job_id, "w1", 1, mid_step.g1)
    assert (resp.version, resp.applied, resp.pending) == (2, True, 0)
    version, after = pull_all(ps_stub, mid_step.job_id)
    assert version == 2
    want = sgd(mid_step.values, [(W0, mid_step.g0), (1.0, mid_step.g1)])
    for sid in want:
        torch.testing.assert_close(after[sid], want[sid])


@pytest.mark.parametrize(
    "case",
    [
        "missing-value",
        "unknown-value",
        "duplicate-value",
        "duplicate-spec",
        "wrong-size",
        "int-value",
        "nan-value",
        "no-header",
        "header-twice",
        "bad-optimizer",
        "bad-consistency",
        "empty-job-id",
    ],
)
def test_bad_load_is_rejected_and_keeps_the_old_job(
    case: str, ps_stub: Stub, ps_channel: grpc.Channel, job: Job
) -> None:
    new = random_values(99)
    msgs = list(load_messages("replacement", SHARDS, new, MEMBERS, SGD))
    value_of = {m.shard.shard_id: m for m in msgs[1:]}
    if case == "missing-value":
        msgs = [m for m in msgs if m.shard.shard_id != "ln_f.bias#0"]
    elif case == "unknown-value":
        extra = tensor_pb2.ShardTensor(shard_id="nope#0", tensor=codec.encode(torch.zeros(2)))
        msgs.append(parameter_pb2.LoadRequest(shard=extra))
    elif case == "duplicate-value":
        msgs.append(value_of["logit_scale#0"])
    elif case == "duplicate-spec":
        msgs[0].header.shards.append(msgs[0].header.shards[0])
    elif case == "wrong-size":
        value_of["wte.weight#1"].shard.tensor.CopyFrom(codec.encode(torch.zeros(11)))
    elif case == "int-value":
        value_of["ln_f.bias#0"].shard.tensor.CopyFrom(
            codec.encode(torch.zeros(5, dtype=torch.int64))
        )
    elif case == "nan-value":
        value_of["ln_f.bias#0"].shard.tensor.CopyFrom(codec.encode(torch.full((5,), float("nan"))))
    elif case == "no-header":
        msgs = msgs[1:]
    elif case == "header-twice":
        msgs.insert(1, msgs[0])
    elif case == "bad-optimizer":
        msgs[0].header.optimizer.lr = 0.0
    elif case == "bad-consistency":
        msgs[0].header.consistency = 99  # type: ignore[assignment]  # proto3 enums are open
    elif case == "empty-job-id":
        msgs[0].header.job_id = ""
    with pytest.raises(grpc.RpcError) as info:
        ps_stub.Load(iter(msgs), timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()

    version, values = pull_all(ps_stub, job.job_id)
    assert version == 0
    assert_identical(values, job.init)
    listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=10)
    assert listing.job_id == job.job_id
    assert list(listing.members) == MEMBERS
    assert_serving(ps_channel)


def test_load_replaces_the_job(ps_stub: Stub, job: Job) -> None:
    """The unmodified stream the bad-load cases start from is valid and replaces the job."""
    new = random_values(99)
    resp = ps_stub.Load(iter(load_messages("replacement", SHARDS, new, ["w2"], SGD, 7)), timeout=10)
    assert resp.shards == len(SHARDS)
    version, values = pull_all(ps_stub, "replacement")
    assert version == 7
    assert_identical(values, new)
    listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=10)
    assert (listing.job_id, list(listing.members)) == ("replacement", ["w2"])
    with pytest.raises(grpc.RpcError) as info:
        pull_all(ps_stub, job.job_id)
    assert info.value.code() == Code.NOT_FOUND


# -- good path -----------------------------------------------------------------------------


def test_load_then_pull_returns_the_loaded_values(ps_stub: Stub, job: Job) -> None:
    version, values = pull_all(ps_stub, job.job_id)
    assert version == 0
    assert_identical(values, job.init)
    # A subset pull returns exactly the requested shards, in a lower-precision wire dtype too.
    request = parameter_pb2.PullRequest(
        job_id=job.job_id, shard_ids=["ln_f.bias#0"], wire_dtype=tensor_pb2.BFLOAT16
    )
    (msg,) = list(ps_stub.Pull(request, timeout=10))
    assert msg.shard_id == "ln_f.bias#0"
    got = codec.decode(msg.tensor)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, job.init["ln_f.bias#0"].to(torch.bfloat16))


def test_two_members_weighted_sgd_step(ps_stub: Stub, job: Job) -> None:
    g0, g1 = random_values(1), random_values(2)
    first = push(ps_stub, job.job_id, "w0", 0, g0, weight=3.0)
    assert (first.version, first.applied, first.pending) == (0, False, 1)
    # The pending step is invisible to pulls: still version 0, still the initial values.
    version, values = pull_all(ps_stub, job.job_id)
    assert version == 0
    assert_identical(values, job.init)

    second = push(ps_stub, job.job_id, "w1", 0, g1, weight=1.0)
    assert (second.version, second.applied, second.pending) == (1, True, 0)
    version, values = pull_all(ps_stub, job.job_id)
    assert version == 1
    want = sgd(job.init, [(3.0, g0), (1.0, g1)])
    for sid in want:
        torch.testing.assert_close(values[sid], want[sid])
    # Not the unweighted mean: the weights matter.
    unweighted = sgd(job.init, [(1.0, g0), (1.0, g1)])
    assert not torch.allclose(values["wte.weight#0"], unweighted["wte.weight#0"])


def test_low_precision_gradients_are_accepted(ps_stub: Stub, job: Job) -> None:
    g0 = {sid: g.to(torch.bfloat16) for sid, g in random_values(3).items()}
    g1 = {sid: g.to(torch.float64) for sid, g in random_values(4).items()}
    assert push(ps_stub, job.job_id, "w0", 0, g0).applied is False
    assert push(ps_stub, job.job_id, "w1", 0, g1).applied is True
    _, values = pull_all(ps_stub, job.job_id)
    want = sgd(job.init, [(1.0, g0), (1.0, g1)])
    for sid in want:
        torch.testing.assert_close(values[sid], want[sid])


@pytest.mark.parametrize(
    ("g", "w0"),
    [(3e38, 1.0), (1.0, 1e39)],
    ids=["gradient-sum-past-fp32-max", "weight-past-fp32-max"],
)
def test_finite_pushes_never_make_parameters_nonfinite(
    g: float, w0: float, ps_stub: Stub, ps_channel: grpc.Channel, job: Job
) -> None:
    """Every gradient and weight is finite, but fp32 `g * weight` sums overflow.

    Either the server refuses the push that would overflow (INVALID_ARGUMENT, nothing
    changed) or it applies the exact weighted mean; it never writes Inf or NaN.
    """
    grads = {sid: torch.full((n,), g) for sid, n in NUMEL.items()}
    try:
        push(ps_stub, job.job_id, "w0", 0, grads, weight=w0)
        resp = push(ps_stub, job.job_id, "w1", 0, grads, weight=1.0)
    except grpc.RpcError as err:
        assert err.code() == Code.INVALID_ARGUMENT, err.details()
        _, values = pull_all(ps_stub, job.job_id)
        assert_identical(values, job.init)
        assert_serving(ps_channel)
        return
    assert resp.applied
    _, values = pull_all(ps_stub, job.job_id)
    for sid, value in values.items():
        assert bool(torch.isfinite(value).all()), f"{sid} became {value.tolist()}"
        # The weighted mean of two equal gradients is that gradient.
        torch.testing.assert_close(value, job.init[sid] - LR * g)


def test_pull_waits_for_the_pending_step(ps_stub: Stub, job: Job) -> None:
    g0, g1 = random_values(5), random_values(6)
    result: dict[str, tuple[int, Grads] | grpc.RpcError] = {}

    def waiting_pull() -> None:
        try:
            result["pull"] = pull_all(ps_stub, job.job_id, min_version=1, timeout=20)
        except grpc.RpcError as err:  # pragma: no cover - reported below
            result["error"] = err

    thread = threading.Thread(target=waiting_pull)
    thread.start()
    push(ps_stub, job.job_id, "w0", 0, g0)
    thread.join(timeout=0.5)
    assert thread.is_alive(), "the pull returned before the step was applied"
    push(ps_stub, job.job_id, "w1", 0, g1)
    thread.join(timeout=20)
    assert "error" not in result, result.get("error")
    pulled = result["pull"]
    assert isinstance(pulled, tuple)
    version, values = pulled
    assert version == 1
    want = sgd(job.init, [(1.0, g0), (1.0, g1)])
    for sid in want:
        torch.testing.assert_close(values[sid], want[sid])


def test_set_members_completes_the_pending_step(ps_stub: Stub, job: Job) -> None:
    none_pending = ps_stub.SetMembers(
        parameter_pb2.SetMembersRequest(job_id=job.job_id, members=MEMBERS), timeout=10
    )
    assert (none_pending.version, none_pending.applied) == (0, False)

    g0 = random_values(7)
    assert push(ps_stub, job.job_id, "w0", 0, g0, weight=2.0).applied is False
    resp = ps_stub.SetMembers(
        parameter_pb2.SetMembersRequest(job_id=job.job_id, members=["w0"]), timeout=10
    )
    assert (resp.version, resp.applied) == (1, True)
    version, values = pull_all(ps_stub, job.job_id)
    assert version == 1
    want = sgd(job.init, [(2.0, g0)])
    for sid in want:
        torch.testing.assert_close(values[sid], want[sid])

    # w1 left: its push is now from a non-member.
    with pytest.raises(grpc.RpcError) as info:
        push(ps_stub, job.job_id, "w1", 1, random_values(8))
    assert info.value.code() == Code.NOT_FOUND
    listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job.job_id), timeout=10)
    assert list(listing.members) == ["w0"]
    # A lone member's push now applies at once.
    assert push(ps_stub, job.job_id, "w0", 1, random_values(9)).applied is True


def _check_info(info: parameter_pb2.ShardInfo, spec: Shard, version: int) -> None:
    got = info.spec
    assert (got.shard_id, got.param, got.start, got.numel, got.server_id) == (
        spec.shard_id,
        spec.param,
        spec.start,
        spec.numel,
        spec.server_id,
    )
    assert tuple(got.param_shape) == spec.param_shape
    assert got.weight_decay == spec.weight_decay
    assert info.dtype == "float32"
    assert list(info.shape) == [spec.numel]
    assert info.version == version
    assert info.byte_size == 4 * spec.numel


def _check_stats(stats: parameter_pb2.ShardStats, value: torch.Tensor) -> None:
    v = value.double()
    assert stats.norm == pytest.approx(float(v.norm()), rel=1e-9)
    assert stats.mean == pytest.approx(float(v.mean()), rel=1e-9, abs=1e-12)
    assert stats.max_abs == pytest.approx(float(v.abs().max()), rel=1e-9)
    assert stats.std == pytest.approx(float(v.std()) if v.numel() > 1 else 0.0, rel=1e-9)
    assert stats.nonfinite == 0


def test_list_and_get_shard_describe_the_current_values(ps_stub: Stub, job: Job) -> None:
    push(ps_stub, job.job_id, "w0", 0, random_values(20))
    push(ps_stub, job.job_id, "w1", 0, random_values(21))
    _, values = pull_all(ps_stub, job.job_id, min_version=1)
    assert not torch.equal(values["wte.weight#0"], job.init["wte.weight#0"])

    bare = ps_stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job.job_id), timeout=10)
    assert (bare.server_id, bare.job_id, bare.version) == (SERVER, job.job_id, 1)
    assert list(bare.members) == MEMBERS
    assert list(bare.pushed) == []
    assert bare.total_bytes == 4 * sum(NUMEL.values())
    assert [i.spec.shard_id for i in bare.shards] == [s.shard_id for s in SHARDS]
    for info, spec in zip(bare.shards, SHARDS, strict=True):
        _check_info(info, spec, version=1)
        assert not info.HasField("stats")

    full = ps_stub.ListShards(parameter_pb2.ListShardsRequest(with_stats=True), timeout=10)
    for info, spec in zip(full.shards, SHARDS, strict=True):
        _check_info(info, spec, version=1)
        _check_stats(info.stats, values[spec.shard_id])

    for spec in SHARDS:
        info = ps_stub.GetShard(
            parameter_pb2.GetShardRequest(job_id=job.job_id, shard_id=spec.shard_id), timeout=10
        )
        _check_info(info, spec, version=1)
        _check_stats(info.stats, values[spec.shard_id])


def test_shards_report_their_optimizer_state_bytes(ps_stub: Stub, load_job: LoadJob) -> None:
    """AdamW keeps two fp32 moments per element and an fp32 step counter per shard, once the
    first step has run; ListShards and GetShard both say so."""
    job_id = f"test-{uuid.uuid4().hex[:8]}"
    load_job(job_id, SHARDS, random_values(0), ["w0"], OptimizerSettings(kind="adamw", lr=0.01))

    def reported() -> tuple[list[int], list[int]]:
        listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job_id), timeout=10)
        infos = [
            ps_stub.GetShard(
                parameter_pb2.GetShardRequest(job_id=job_id, shard_id=s.shard_id), timeout=10
            )
            for s in SHARDS
        ]
        return [i.optimizer_state_bytes for i in listing.shards], [
            i.optimizer_state_bytes for i in infos
        ]

    assert reported() == ([0] * len(SHARDS), [0] * len(SHARDS))  # no step yet: no state
    assert push(ps_stub, job_id, "w0", 0, random_values(1)).applied
    want = [2 * 4 * (-(-s.numel // FUSED_ALIGN) * FUSED_ALIGN) + 4 for s in SHARDS]  # padded
    assert reported() == (want, want)


def test_load_with_explicit_sync_consistency(ps_stub: Stub, job: Job) -> None:
    msgs = list(load_messages("explicit-sync", SHARDS, job.init, MEMBERS, SGD))
    msgs[0].header.consistency = job_pb2.SYNC
    assert ps_stub.Load(iter(msgs), timeout=10).shards == len(SHARDS)
    push(ps_stub, "explicit-sync", "w0", 0, random_values(1))
    assert push(ps_stub, "explicit-sync", "w1", 0, random_values(2)).applied
    version, values = pull_all(ps_stub, "explicit-sync")
    assert version == 1
    assert_identical(values, sgd(job.init, [(1.0, random_values(1)), (1.0, random_values(2))]))


def test_get_shard_without_id_is_invalid(ps_stub: Stub, job: Job) -> None:
    with pytest.raises(grpc.RpcError) as info:
        ps_stub.GetShard(parameter_pb2.GetShardRequest(job_id=job.job_id), timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT


def test_pull_with_integer_wire_dtype_is_invalid(ps_stub: Stub, job: Job) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _pull(ps_stub, job_id=job.job_id, wire_dtype=tensor_pb2.INT32)
    assert info.value.code() == Code.INVALID_ARGUMENT


def test_a_streamed_push_applies_and_an_aborted_one_changes_nothing(
    ps_stub: Stub, ps_cluster: LocalCluster, job: Job
) -> None:
    """The worker's `PushStream` (shards added while backward runs): a push opened and then
    aborted half-way is refused by the server as a cancelled stream, leaving no trace; two
    full streamed pushes make the step as plain pushes do."""
    address = {SERVER: ps_cluster.procs[1].address}
    pools = {w: ServerPool(job.job_id, w, SHARDS, address) for w in MEMBERS}
    try:
        g0, g1 = random_values(1), random_values(2)
        half = pools["w0"].open_push(0, 3.0)
        half.add(SHARDS[0].shard_id, g0[SHARDS[0].shard_id])
        half.abort()
        listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(job_id=job.job_id))
        assert (listing.version, list(listing.pushed)) == (0, [])
        for worker, g, weight in (("w0", g0, 3.0), ("w1", g1, 1.0)):
            stream = pools[worker].open_push(0, weight)
            for sid in reversed(list(g)):  # any order: backward makes the last layers first
                stream.add(sid, g[sid])
            stream.close()
        version, values = pull_all(ps_stub, job.job_id, min_version=1)
        assert version == 1
        want = sgd(job.init, [(3.0, g0), (1.0, g1)])
        for sid in want:
            torch.testing.assert_close(values[sid], want[sid])
    finally:
        for pool in pools.values():
            pool.close()


def test_compressed_pushes_apply_and_a_malformed_one_changes_nothing(
    ps_stub: Stub, ps_cluster: LocalCluster, job: Job
) -> None:
    """Over real gRPC: w0 pushes int8, w1 top-k (error feedback in their `ServerPool`s);
    the step is the SGD rule on the values they decode to. A refused push keeps the
    residuals it started from; a malformed compressed push or load is INVALID_ARGUMENT with
    nothing changed."""
    address = {SERVER: ps_cluster.procs[1].address}
    settings = {"w0": Compression("int8", chunk=5), "w1": Compression("topk", ratio=0.25)}
    pools = {
        w: ServerPool(job.job_id, w, SHARDS, address, compression=settings[w]) for w in MEMBERS
    }
    try:
        g = {"w0": random_values(1), "w1": random_values(2)}
        with pytest.raises(grpc.RpcError) as info:  # a future step: read in full, refused
            pools["w0"].push(5, 3.0, g["w0"])
        assert info.value.code() == Code.OUT_OF_RANGE
        assert pools["w0"].feedback is not None and pools["w0"].feedback.residuals == {}

        # What each worker's error feedback sends, computed apart (the same EF step).
        sends: dict[str, Grads] = {}
        for w in MEMBERS:
            ef = ErrorFeedback(settings[w])
            sends[w] = {sid: ef.compress(sid, x).decode() for sid, x in g[w].items()}
            pools[w].push(0, 3.0 if w == "w0" else 1.0, g[w])
            feedback = pools[w].feedback
            assert feedback is not None
            assert feedback.residuals.keys() == ef.residuals.keys() == g[w].keys()
            for sid, r in ef.residuals.items():
                assert torch.equal(feedback.residuals[sid], r)
        version, values = pull_all(ps_stub, job.job_id, min_version=1)
        assert version == 1
        want = sgd(job.init, [(3.0, sends["w0"]), (1.0, sends["w1"])])
        for sid in want:
            torch.testing.assert_close(values[sid], want[sid])

        # Malformed: a duplicated top-k index in one shard of an otherwise valid push.
        msgs = [header(job.job_id, "w1", 1)]
        for sid, x in random_values(3).items():
            blob = codec.compressed_shard_bytes(sid, 1, encode(x, settings["w1"]), wrap=2)
            msgs.append(parameter_pb2.PushRequest.FromString(blob))
        bad = msgs[1].grad.compression
        bad.indices = bad.indices[:4] * (len(bad.indices) // 4)  # index repeated k times
        with pytest.raises(grpc.RpcError) as info:
            ps_stub.Push(iter(msgs), timeout=10)
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert "strictly increasing" in (info.value.details() or "")
        # A compressed value in a Load is refused too, and the job stays.
        loads = list(load_messages("other-job", SHARDS, job.init, MEMBERS, SGD))
        loads[1].shard.compression.CopyFrom(bad)
        with pytest.raises(grpc.RpcError) as info:
            ps_stub.Load(iter(loads), timeout=10)
        assert info.value.code() == Code.INVALID_ARGUMENT
        listing = ps_stub.ListShards(parameter_pb2.ListShardsRequest(), timeout=10)
        assert (listing.job_id, listing.version, list(listing.pushed)) == (job.job_id, 1, [])
        assert_identical(pull_all(ps_stub, job.job_id)[1], values)
    finally:
        for pool in pools.values():
            pool.close()
