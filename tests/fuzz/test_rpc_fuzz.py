"""Property-based fuzzing of every RPC of the three lmps services against a live cluster.

One cluster (coordinator, 2 parameter servers, 2 workers; real processes on 127.0.0.1) is
loaded with a small job and trained for one epoch, then every RPC is driven with malformed
and hostile messages: wrong sizes, dtypes and shapes, unknown, empty and huge ids, steps far
in the past and future, NaN/Inf values and weights, empty and oversized streams, missing and
duplicated headers, random bytes as tensor data and as whole messages, and clients that
cancel mid-stream. Each case asserts that:

- the answer is OK only where the input is valid, and any error is a status code the
  proto documents for that RPC (`contract.documented_codes`), or CANCELLED /
  DEADLINE_EXCEEDED where the test itself cancelled or set a short deadline, or grpc's own
  INTERNAL for bytes that do not parse as the request message; answers of known bugs
  (`harness.KNOWN_BUGS`, each with a reproducer in test_bug_reproducers.py) pass too;
- a valid read-only request succeeds and returns the right data;
- the server it hit still answers SERVING on grpc.health.v1.

Each test then checks the whole cluster is intact (`Fuzzed.assert_intact`): the sha256 of
every parameter on every server, versions, barrier members and pending pushes, jobs,
workers. So that this can hold, inputs to RPCs that change state when they succeed (Load,
Push, SetMembers, SubmitJob, RunEpoch, TrainEpoch, Configure, Register) are restricted to
ones that must be refused (built with at least one defect, or naming an unknown job), or
that change nothing (SetMembers with the members already set). Pushes come from ids that are
not real workers: the setup hands every server's barrier to two fake members, so no
legitimate push can land during the run.

LMPS_FUZZ_SCALE multiplies the number of cases per test (default 1: about a minute here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmps.rpc import codec
from lmps.v1 import coordinator_pb2, parameter_pb2, tensor_pb2, worker_pb2
from tests.cluster.jobs import SMALL
from tests.fuzz import harness
from tests.fuzz import strategies as S
from tests.fuzz.contract import all_rpcs
from tests.fuzz.harness import FUZZ_MEMBERS, Code, Fuzzed, client_stream, server_stream, unary

pytestmark = pytest.mark.cluster

SCALE = float(os.environ.get("LMPS_FUZZ_SCALE", "1"))


def fuzz(n: int) -> Any:
    """Hypothesis settings for `n` cases (times LMPS_FUZZ_SCALE), no per-case deadline."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,  # no .hypothesis/ in the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """The cluster; tests/fuzz/conftest.py prints the case counts at the end of the session."""
    cluster = harness.start(str(tmp_path_factory.mktemp("fuzz")))
    try:
        yield cluster
    finally:
        harness.stop(cluster)


@pytest.fixture(autouse=True)
def _intact_after(fx: Fuzzed) -> Iterator[None]:
    yield
    fx.assert_intact()


def jobs(fx: Fuzzed) -> st.SearchStrategy[str]:
    """The real job or "" (= the latest / loaded job) 60% of the time, else an unknown id."""
    return S.weighted(60, st.sampled_from([fx.job_id, ""]), S.other_ids(fx.job_id, ""))


def known_job(fx: Fuzzed, job_id: str) -> bool:
    return job_id in (fx.job_id, "")


def test_every_rpc_is_fuzzed() -> None:
    """A new RPC needs a fuzz test here: the list below must name every RPC of the services."""
    missing = {r.name for r in all_rpcs()} - FUZZED
    assert not missing, f"RPCs without a fuzz test: {sorted(missing)}"


# -- ParameterService ------------------------------------------------------------------------


@fuzz(100)
@given(data=st.data())
def test_push(fx: Fuzzed, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    server = fx.servers[name]
    case = data.draw(S.push_cases(server.shards, fx.version, FUZZ_MEMBERS, tuple(fx.worker_ids)))
    S.with_job(case, data.draw(st.one_of(st.just(fx.job_id), jobs(fx))))
    out = client_stream(server.stub.Push, case.messages, cancel_after=case.cancel_after)
    caused = [Code.CANCELLED] if case.cancel_after is not None else []
    fx.check("ParameterService/Push", out, ok=False, caused=caused, what=case)
    fx.assert_serving([name])


@fuzz(30)
@given(data=st.data())
def test_push_values_that_overflow_fp32(fx: Fuzzed, data: st.DataObject) -> None:
    """A complete push from a barrier member at the current step whose only fault is size:
    float64 gradients beyond the fp32 range (Inf once stored) or a weight that overflows
    the weighted sum. Must be refused; were it accepted, the pending step is dropped again
    so that the run goes on."""
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    server = fx.servers[name]
    items = data.draw(S.good_tensors(server.shards))
    weight = 1.0
    if data.draw(st.booleans()):
        weight = data.draw(st.sampled_from([1e300, 1.7e308, 3.5e38, 1e39]))
    else:
        sid = data.draw(st.sampled_from(list(server.shards)))
        big = torch.ones(server.shards[sid], dtype=torch.float64)
        big[data.draw(st.integers(0, server.shards[sid] - 1))] = data.draw(
            st.sampled_from([1e39, -1e300, 1.7e308, 3.5e38])
        )
        items = [(s, codec.encode(big) if s == sid else t) for s, t in items]
    header = parameter_pb2.PushRequest(
        header=parameter_pb2.PushHeader(
            job_id=fx.job_id, worker_id=FUZZ_MEMBERS[0], step=fx.version, weight=weight
        )
    )
    grads = [
        parameter_pb2.PushRequest(grad=tensor_pb2.ShardTensor(shard_id=s, tensor=t))
        for s, t in items
    ]
    try:
        out = client_stream(server.stub.Push, [header, *grads])
        fx.check("ParameterService/Push", out, ok=False, what=f"weight={weight}")
    finally:
        server.stub.SetMembers(
            parameter_pb2.SetMembersRequest(
                job_id=fx.job_id, members=FUZZ_MEMBERS, discard_pending=True
            ),
            timeout=harness.TIMEOUT_S,
        )


@fuzz(100)
@given(data=st.data())
def test_load(fx: Fuzzed, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    has_state = hasattr(parameter_pb2, "ShardState")
    case = data.draw(S.load_cases(fx.job_id, has_state))
    out = client_stream(fx.servers[name].stub.Load, case.messages, cancel_after=case.cancel_after)
    caused = [Code.CANCELLED] if case.cancel_after is not None else []
    fx.check("ParameterService/Load", out, ok=False, caused=caused, what=case)
    fx.assert_serving([name])


@fuzz(120)
@given(data=st.data())
def test_pull(fx: Fuzzed, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    server = fx.servers[name]
    real = list(server.shards)
    if data.draw(st.booleans()):  # a valid request, or one field off
        request = parameter_pb2.PullRequest(
            job_id=data.draw(st.sampled_from([fx.job_id, ""])),
            min_version=data.draw(st.integers(0, fx.version)),
            shard_ids=data.draw(st.lists(st.sampled_from(real), max_size=5)),
            wire_dtype=data.draw(st.sampled_from([0, *S.FLOAT_DTYPES])),
        )
        field = data.draw(
            st.sampled_from(["none", "job_id", "min_version", "shard_ids", "wire_dtype"])
        )
        if field == "job_id":
            request.job_id = data.draw(S.other_ids(fx.job_id, ""))
        elif field == "min_version":
            request.min_version = data.draw(st.one_of(st.just(fx.version + 1), S.u64))
        elif field == "shard_ids":
            request.shard_ids.append(data.draw(S.other_ids(*real)))
        elif field == "wire_dtype":
            request.wire_dtype = data.draw(S.enums)
    else:
        request = parameter_pb2.PullRequest(
            job_id=data.draw(jobs(fx)),
            min_version=data.draw(
                st.one_of(st.integers(0, fx.version), st.just(fx.version + 1), S.u64)
            ),
            shard_ids=data.draw(st.lists(st.one_of(st.sampled_from(real), S.text), max_size=5)),
            wire_dtype=data.draw(S.enums),
        )
    cancel = data.draw(st.one_of(st.none(), st.none(), st.integers(1, 3)))
    future = request.min_version > fx.version
    valid = (
        known_job(fx, request.job_id)
        and all(s in server.shards for s in request.shard_ids)
        and request.wire_dtype in (0, *S.FLOAT_DTYPES)
        and not future
    )
    caused = [Code.DEADLINE_EXCEEDED] if future else []
    caused += [Code.CANCELLED] if cancel is not None else []
    out = server_stream(
        server.stub.Pull, request, timeout=0.3 if future else harness.TIMEOUT_S, cancel_after=cancel
    )
    ok = valid if cancel is None else (None if valid else False)
    fx.check("ParameterService/Pull", out, ok=ok, caused=caused, what=request)
    if out.ok:
        expect_pull(fx, server, request, out.responses)
    fx.assert_serving([name])


def expect_pull(fx: Fuzzed, server: harness.Server, request: Any, msgs: list[Any]) -> None:
    """A successful pull is one consistent version with exactly the shards asked for."""
    want = list(request.shard_ids) or list(server.shards)
    assert [m.shard_id for m in msgs] == want, "pull answered other shards than asked"
    dtype = codec.wire_dtype(request.wire_dtype)
    for m in msgs:
        assert m.version == fx.version
        got = codec.decode(m.tensor)
        assert got.dtype == dtype and list(got.shape) == [server.shards[m.shard_id]]
        assert torch.equal(got, fx.values[m.shard_id].to(dtype)), f"{m.shard_id} value changed"


@fuzz(80)
@given(data=st.data())
def test_set_members(fx: Fuzzed, data: st.DataObject) -> None:
    """Unknown jobs must be refused; the loaded job may only be told the members it has."""
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    same = data.draw(st.booleans())
    fields: dict[str, Any] = {"discard_pending": data.draw(st.booleans())}
    if "discard" in parameter_pb2.SetMembersRequest.DESCRIPTOR.fields_by_name:
        fields["discard"] = data.draw(st.lists(S.text, max_size=3))
    join_at = 0
    if "join_at" in parameter_pb2.SetMembersRequest.DESCRIPTOR.fields_by_name:
        # The members are the ones already set, so a join_at the server has not passed
        # changes nothing; one it has passed (0 < join_at < version) must be refused.
        join_at = data.draw(
            st.one_of(
                st.sampled_from([0, max(0, fx.version - 1), fx.version, fx.version + 1, 2**64 - 1]),
                st.integers(0, 2**64 - 1),
            )
        )
        fields["join_at"] = join_at
    if same:
        members = data.draw(st.lists(st.sampled_from(FUZZ_MEMBERS), min_size=2, max_size=5))
        members = members if set(members) == set(FUZZ_MEMBERS) else list(FUZZ_MEMBERS)
        job_id = data.draw(st.sampled_from([fx.job_id, ""]))
    else:
        members = data.draw(st.lists(S.text, max_size=4))
        job_id = data.draw(S.other_ids(fx.job_id, ""))
    request = parameter_pb2.SetMembersRequest(job_id=job_id, members=members, **fields)
    out = unary(fx.servers[name].stub.SetMembers, request)
    ok = same and not (0 < join_at < fx.version)
    fx.check("ParameterService/SetMembers", out, ok=ok, what=request)
    if same and not ok:
        assert out.code.name == "FAILED_PRECONDITION", out.details
    if out.ok:
        resp = out.responses[0]
        assert resp.version == fx.version and not resp.applied
    fx.assert_serving([name])


@fuzz(80)
@given(data=st.data())
def test_list_and_get_shard(fx: Fuzzed, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    server = fx.servers[name]
    job_id = data.draw(jobs(fx))
    request = parameter_pb2.ListShardsRequest(job_id=job_id, with_stats=data.draw(st.booleans()))
    out = fx.check(
        "ParameterService/ListShards",
        unary(server.stub.ListShards, request),
        ok=known_job(fx, job_id),
        what=request,
    )
    if out.ok:
        resp = out.responses[0]
        assert resp.version == fx.version and len(resp.shards) == len(server.shards)
    shard_id = data.draw(S.ids(*server.shards))
    get = parameter_pb2.GetShardRequest(job_id=data.draw(jobs(fx)), shard_id=shard_id)
    valid = known_job(fx, get.job_id) and shard_id in server.shards
    out = fx.check(
        "ParameterService/GetShard", unary(server.stub.GetShard, get), ok=valid, what=get
    )
    if out.ok:
        info = out.responses[0]
        assert info.version == fx.version and info.spec.numel == server.shards[shard_id]
        assert info.stats.nonfinite == 0 and math.isfinite(info.stats.norm)
    fx.assert_serving([name])


@fuzz(60)
@given(data=st.data())
def test_snapshot(fx: Fuzzed, data: st.DataObject) -> None:
    if not hasattr(parameter_pb2, "SnapshotRequest"):
        pytest.skip("this build has no ParameterService/Snapshot")
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    server = fx.servers[name]
    version = data.draw(
        S.weighted(40, st.just(fx.version), st.one_of(st.integers(0, fx.version + 1), S.u64))
    )
    request = parameter_pb2.SnapshotRequest(job_id=data.draw(jobs(fx)), version=version)
    future = version > fx.version
    cancel = data.draw(st.one_of(st.none(), st.integers(1, 2)))
    caused = [Code.DEADLINE_EXCEEDED] if future else []
    caused += [Code.CANCELLED] if cancel is not None else []
    out = server_stream(
        server.stub.Snapshot,
        request,
        timeout=0.3 if future else harness.TIMEOUT_S,
        cancel_after=cancel,
    )
    fx.check("ParameterService/Snapshot", out, ok=None, caused=caused, what=request)
    if out.ok:
        assert all(m.version == version for m in out.responses)
        if cancel is None:
            assert {m.shard_id for m in out.responses} == set(server.shards)
    fx.assert_serving([name])


@fuzz(60)
@given(data=st.data())
def test_grad_norm_and_apply_step(fx: Fuzzed, data: st.DataObject) -> None:
    """The fuzzed job does not clip gradients: GradNorm and ApplyStep of it are refused
    (FAILED_PRECONDITION; a NaN, infinite or negative norm INVALID_ARGUMENT), of any other job
    NOT_FOUND, whatever the step; nothing changes."""
    name = data.draw(st.sampled_from(sorted(fx.servers)))
    server = fx.servers[name]
    step = data.draw(S.weighted(50, st.integers(0, fx.version + 1), S.u64))
    norm = data.draw(st.floats(allow_nan=True, allow_infinity=True))
    asked = parameter_pb2.GradNormRequest(job_id=data.draw(jobs(fx)), step=step)
    # A job that clipped would make a GradNorm for its pending step wait: a short deadline.
    out = unary(server.stub.GradNorm, asked, timeout=1.0)
    late = [Code.DEADLINE_EXCEEDED]
    fx.check("ParameterService/GradNorm", out, ok=False, caused=late, what=asked)
    apply = parameter_pb2.ApplyStepRequest(job_id=data.draw(jobs(fx)), step=step, grad_norm=norm)
    out = unary(server.stub.ApplyStep, apply)
    fx.check("ParameterService/ApplyStep", out, ok=False, what=apply)
    fx.assert_serving([name])


def test_oversized_streams(fx: Fuzzed) -> None:
    """Long and heavy streams, each refused: 20k gradients of unknown shards, one 64 MiB
    gradient, a Load header of 5k shards without values, and a message over the 256 MiB
    limit (grpc's own RESOURCE_EXHAUSTED, which the test causes)."""
    name, server = sorted(fx.servers.items())[0]
    header = parameter_pb2.PushRequest(
        header=parameter_pb2.PushHeader(
            job_id=fx.job_id, worker_id=FUZZ_MEMBERS[0], step=fx.version, weight=1.0
        )
    )

    def grad(sid: str, t: tensor_pb2.Tensor) -> parameter_pb2.PushRequest:
        return parameter_pb2.PushRequest(grad=tensor_pb2.ShardTensor(shard_id=sid, tensor=t))

    tiny = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[1], data=bytes(4))
    cases: list[tuple[str, Any, list[Any], list[Code]]] = [
        (
            "20k unknown shards",
            server.stub.Push,
            [header] + [grad(f"nope#{i}", tiny) for i in range(20_000)],
            [],
        ),
        (
            "64 MiB gradient",
            server.stub.Push,
            [header, grad(next(iter(server.shards)), codec.encode(torch.zeros(2**24)))],
            [],
        ),
    ]
    specs = [
        parameter_pb2.ShardSpec(shard_id=f"p{i}#0", param=f"p{i}", param_shape=[1], numel=1)
        for i in range(5_000)
    ]
    load = parameter_pb2.LoadHeader(job_id="fuzz-big", shards=specs, optimizer=harness.SGD)
    cases.append(
        ("5k shards, no values", server.stub.Load, [parameter_pb2.LoadRequest(header=load)], [])
    )
    # A channel that lets the client send what the server must refuse.
    address = next(p.address for p in fx.cluster.procs if p.name == name)
    unlimited = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    over = tensor_pb2.Tensor(dtype=tensor_pb2.UINT8, shape=[257 * 2**20], data=bytes(257 * 2**20))
    push = type(server.stub)(unlimited).Push
    cases.append(("257 MiB message", push, [header, grad("x", over)], [Code.RESOURCE_EXHAUSTED]))
    try:
        for what, fn, messages, caused in cases:
            rpc = "ParameterService/Load" if fn is server.stub.Load else "ParameterService/Push"
            out = client_stream(fn, messages, timeout=60)
            fx.check(rpc, out, ok=False, caused=caused, what=what)
            fx.assert_serving([name])
    finally:
        unlimited.close()


# -- CoordinatorService -------------------------------------------------------------------------


@fuzz(80)
@given(data=st.data())
def test_register(fx: Fuzzed, data: st.DataObject) -> None:
    """Only registrations the contract refuses: no (or an unknown) role, or no host:port."""
    if data.draw(st.booleans()):
        role = data.draw(S.enums.filter(lambda r: r not in (1, 2)))
        address = data.draw(S.text)
    else:
        role = data.draw(st.sampled_from([1, 2]))
        address = data.draw(S.text.filter(lambda a: ":" not in a))
    request = coordinator_pb2.RegisterRequest(role=role, address=address, id=data.draw(S.text))
    fx.check(
        "CoordinatorService/Register", unary(fx.coord.Register, request), ok=False, what=request
    )
    fx.assert_serving(["coordinator"])


@fuzz(60)
@given(member=st.one_of(S.text, st.sampled_from(["ps-0", "ps-1", "worker-0", "worker-1"])))
def test_heartbeat(fx: Fuzzed, member: str) -> None:
    """Heartbeats only refresh liveness; unknown ids are NOT_FOUND."""
    request = coordinator_pb2.HeartbeatRequest(id=member)
    real = member in {p.name for p in fx.cluster.procs}
    fx.check(
        "CoordinatorService/Heartbeat",
        unary(fx.coord.Heartbeat, request),
        ok=real or None,
        what=request,
    )


@fuzz(60)
@given(data=st.data())
def test_submit_job(fx: Fuzzed, data: st.DataObject) -> None:
    case = data.draw(
        st.one_of(
            S.submit_cases(fx.spec, fx.train, SMALL.vocab_size),
            S.submit_cancel_cases(fx.spec, fx.train),
        )
    )
    out = client_stream(fx.coord.SubmitJob, case.messages, cancel_after=case.cancel_after)
    caused = [Code.CANCELLED] if case.cancel_after is not None else []
    fx.check("CoordinatorService/SubmitJob", out, ok=False, caused=caused, what=case)
    fx.assert_serving(["coordinator"])


@fuzz(60)
@given(data=st.data())
def test_run_epoch_unknown_jobs(fx: Fuzzed, data: st.DataObject) -> None:
    """Only unknown jobs: a known one would train."""
    request = coordinator_pb2.RunEpochRequest(
        job_id=data.draw(S.other_ids(fx.job_id, "")), epoch=data.draw(S.u32)
    )
    out = server_stream(fx.coord.RunEpoch, request)
    fx.check("CoordinatorService/RunEpoch", out, ok=False, what=request)


@fuzz(100)
@given(data=st.data())
def test_leases(fx: Fuzzed, data: st.DataObject) -> None:
    """No epoch runs: no lease may be handed out and none can be completed."""
    workers = st.one_of(st.sampled_from(fx.worker_ids), S.text)
    lease = coordinator_pb2.LeaseDataRequest(
        job_id=data.draw(jobs(fx)),
        worker_id=data.draw(workers),
        epoch=data.draw(st.one_of(st.integers(0, 2), S.u32)),
        next_step=data.draw(st.one_of(st.just(fx.version), S.u64)),
    )
    out = fx.check(
        "CoordinatorService/LeaseData", unary(fx.coord.LeaseData, lease), ok=None, what=lease
    )
    if out.ok:
        assert out.responses[0].done and not out.responses[0].HasField("lease"), (
            "a lease outside an epoch"
        )
    complete = coordinator_pb2.CompleteLeaseRequest(
        job_id=data.draw(jobs(fx)),
        worker_id=data.draw(workers),
        lease_id=data.draw(
            st.one_of(st.sampled_from(["e0-l0", "e0-l0-s0", "e0-l1-s1", "e1-l0"]), S.text)
        ),
    )
    fx.check(
        "CoordinatorService/CompleteLease",
        unary(fx.coord.CompleteLease, complete),
        ok=False,
        what=complete,
    )
    fx.assert_serving(["coordinator"])


@fuzz(60)
@given(data=st.data())
def test_coordinator_reads(fx: Fuzzed, data: st.DataObject) -> None:
    """GetShardMap, GetJob, GetClusterStatus, Evaluate and ExportModel (cancelled or not)."""
    rpc = data.draw(
        st.sampled_from(["GetShardMap", "GetJob", "GetClusterStatus", "Evaluate", "ExportModel"])
    )
    job_id = data.draw(jobs(fx))
    ok = known_job(fx, job_id)
    if rpc == "GetShardMap":
        out = unary(fx.coord.GetShardMap, coordinator_pb2.GetShardMapRequest(job_id=job_id))
        if out.ok:
            assert len(out.responses[0].shards) == len(fx.shard_map.shards)
    elif rpc == "GetJob":
        out = unary(fx.coord.GetJob, coordinator_pb2.GetJobRequest(job_id=job_id))
        if out.ok:
            assert out.responses[0].job_id == fx.job_id and out.responses[0].step == fx.version
    elif rpc == "GetClusterStatus":
        ok = True
        out = unary(fx.coord.GetClusterStatus, coordinator_pb2.ClusterStatusRequest())
    elif rpc == "Evaluate":
        out = unary(fx.coord.Evaluate, coordinator_pb2.EvaluateJobRequest(job_id=job_id))
        if out.ok:
            resp = out.responses[0]
            assert resp.version == fx.version and resp.tokens > 0 and math.isfinite(resp.loss)
    else:
        cancel = data.draw(st.one_of(st.none(), st.integers(1, 3)))
        request = coordinator_pb2.ExportModelRequest(job_id=job_id)
        out = server_stream(fx.coord.ExportModel, request, cancel_after=cancel)
        caused = [Code.CANCELLED] if cancel is not None else []
        fx.check(
            f"CoordinatorService/{rpc}",
            out,
            ok=ok if cancel is None else (None if ok else False),
            caused=caused,
            what=request,
        )
        if out.ok and cancel is None:
            header, shards = out.responses[0].header, out.responses[1:]
            assert header.version == fx.version and len(shards) == len(fx.shard_map.shards)
            for m in shards:
                assert torch.equal(codec.decode(m.shard.tensor), fx.values[m.shard.shard_id])
        fx.assert_serving(["coordinator"])
        return
    fx.check(f"CoordinatorService/{rpc}", out, ok=ok, what=f"job_id={job_id[:60]!r}")
    fx.assert_serving(["coordinator"])


# -- WorkerService -------------------------------------------------------------------------------


@fuzz(40)
@given(data=st.data())
def test_configure(fx: Fuzzed, data: st.DataObject) -> None:
    """Only configurations the worker must refuse (checked here on the meta device)."""
    name = data.draw(st.sampled_from(fx.worker_ids))
    request = data.draw(
        S.configure_requests(fx.spec, fx.shard_map).filter(lambda r: not S.configure_ok(r))
    )
    _, stub = fx.workers[name]
    fx.check("WorkerService/Configure", unary(stub.Configure, request), ok=False, what=request)
    fx.assert_serving([name])


@fuzz(50)
@given(data=st.data())
def test_train_epoch_unknown_jobs(fx: Fuzzed, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(fx.worker_ids))
    request = worker_pb2.TrainEpochRequest(
        job_id=data.draw(S.other_ids(fx.job_id, "")),
        epoch=data.draw(S.u32),
        start_step=data.draw(S.u64),
    )
    _, stub = fx.workers[name]
    out = server_stream(stub.TrainEpoch, request)
    fx.check("WorkerService/TrainEpoch", out, ok=False, what=request)
    fx.assert_serving([name])


@fuzz(60)
@given(data=st.data())
def test_worker_evaluate_and_status(fx: Fuzzed, data: st.DataObject) -> None:
    """Valid sequences of the loaded job are scored at min_version <= the current version;
    anything else must be refused. (A min_version in the future wedges the worker: B5.)"""
    name = data.draw(st.sampled_from(fx.worker_ids))
    _, stub = fx.workers[name]
    job_id = data.draw(S.weighted(70, st.just(fx.job_id), S.other_ids(fx.job_id)))
    tokens = data.draw(S.eval_tokens(SMALL.vocab_size, SMALL.block_size))
    valid = job_id == fx.job_id and S.eval_tokens_ok(tokens, SMALL.vocab_size, SMALL.block_size)
    min_version = data.draw(st.integers(0, fx.version)) if job_id == fx.job_id else data.draw(S.u64)
    request = worker_pb2.EvaluateRequest(job_id=job_id, tokens=tokens, min_version=min_version)
    out = fx.check("WorkerService/Evaluate", unary(stub.Evaluate, request), ok=valid, what=request)
    if out.ok:
        assert out.responses[0].version == fx.version
        assert math.isfinite(out.responses[0].loss_sum)
    status = fx.check(
        "WorkerService/GetStatus", unary(stub.GetStatus, worker_pb2.WorkerStatusRequest()), ok=True
    )
    assert status.responses[0].worker_id == name and not status.responses[0].training
    fx.assert_serving([name])


# -- any RPC: random bytes as the whole message -----------------------------------------------

READ_ONLY = {
    "ParameterService/Pull",
    "ParameterService/GradNorm",
    "ParameterService/ListShards",
    "ParameterService/GetShard",
    "ParameterService/Snapshot",
    "CoordinatorService/Heartbeat",
    "CoordinatorService/GetShardMap",
    "CoordinatorService/GetClusterStatus",
    "CoordinatorService/GetJob",
    "CoordinatorService/ExportModel",
    "WorkerService/GetStatus",
}


def _parses(cls: type, raw: bytes) -> bool:
    try:
        cls.FromString(raw)  # type: ignore[attr-defined]
    except Exception:  # DecodeError, or upb's RuntimeError on deep nesting
        return False
    return True


@fuzz(150)
@given(data=st.data())
def test_random_bytes_as_messages(fx: Fuzzed, data: st.DataObject) -> None:
    """Random bytes sent as the request message(s) of any RPC. Bytes that do not parse as
    the request type get grpc's own INTERNAL ("Exception deserializing request!"); bytes that
    do parse are sent only to read-only RPCs (a parsed message could be a valid one)."""
    rpc = data.draw(st.sampled_from(all_rpcs()))
    raws = data.draw(
        st.lists(st.binary(max_size=64), min_size=1, max_size=3 if rpc.client_streaming else 1)
    )
    parse = [_parses(rpc.request, r) for r in raws]
    if all(parse) and rpc.name not in READ_ONLY:
        raws[0] = b"\x00" + raws[0]  # field number 0 never parses
        parse[0] = False
    channel = fx.channels()[_process_of(fx, rpc.service, data)]
    ident = {"request_serializer": None, "response_deserializer": None}
    caused = [] if all(parse) else [Code.INTERNAL]
    short = rpc.method in ("Pull", "Snapshot", "GradNorm")
    caused += [Code.DEADLINE_EXCEEDED] if short else []
    timeout = 1.0 if short else harness.TIMEOUT_S
    if rpc.client_streaming:
        out = client_stream(channel.stream_unary(rpc.path, **ident), raws, timeout=timeout)
    elif rpc.server_streaming:
        out = server_stream(channel.unary_stream(rpc.path, **ident), raws[0], timeout=timeout)
    else:
        out = unary(channel.unary_unary(rpc.path, **ident), raws[0], timeout=timeout)
    ok = None if all(parse) else False
    fx.check(rpc.name, out, ok=ok, caused=caused, what=raws, label=" (raw bytes)")


def _process_of(fx: Fuzzed, service: str, data: st.DataObject) -> str:
    if service == "CoordinatorService":
        return "coordinator"
    if service == "ParameterService":
        return data.draw(st.sampled_from(sorted(fx.servers)))
    return data.draw(st.sampled_from(fx.worker_ids))


FUZZED = {
    "ParameterService/Load",
    "ParameterService/Pull",
    "ParameterService/Push",
    "ParameterService/SetMembers",
    "ParameterService/ListShards",
    "ParameterService/GetShard",
    "ParameterService/Snapshot",
    "ParameterService/GradNorm",
    "ParameterService/ApplyStep",
    "CoordinatorService/Register",
    "CoordinatorService/Heartbeat",
    "CoordinatorService/SubmitJob",
    "CoordinatorService/RunEpoch",
    "CoordinatorService/LeaseData",
    "CoordinatorService/CompleteLease",
    "CoordinatorService/GetShardMap",
    "CoordinatorService/GetClusterStatus",
    "CoordinatorService/GetJob",
    "CoordinatorService/Evaluate",
    "CoordinatorService/ExportModel",
    "WorkerService/Configure",
    "WorkerService/TrainEpoch",
    "WorkerService/Evaluate",
    "WorkerService/GetStatus",
}
