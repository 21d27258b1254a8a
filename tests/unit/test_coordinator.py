"""The coordinator's rooms without processes: settings built once at submit, the epoch's plan
phase against a fake fleet, the resume record, and when a job is marked FAILED.
In-process, seconds."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import torch

from lmps.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lmps.core.model import GPTConfig
from lmps.core.settings import (
    DEFAULT_BATCHES_PER_LEASE,
    DEFAULT_KEEP_CHECKPOINTS,
    DEFAULT_WAIT_FOR_MEMBERS_S,
    JobState,
    default_total_steps,
)
from lmps.rpc import codec
from lmps.services.coordinator import driver as driver_mod
from lmps.services.coordinator import jobs
from lmps.services.coordinator.cluster import Cluster
from lmps.services.coordinator.driver import Driver, fails_for_good
from lmps.services.coordinator.epoch import EpochRun
from lmps.services.coordinator.fleet import Fleet
from lmps.services.coordinator.jobs import Job, Resume
from lmps.services.coordinator.placement import Placement
from lmps.services.coordinator.registry import Registry, Role
from lmps.v1 import job_pb2

TINY = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16)
ROOT = Path(__file__).resolve().parents[2]


class Context:
    """Stands in for grpc.ServicerContext: only `is_active` is used."""

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


def spec(**fields: Any) -> job_pb2.JobSpec:
    base: dict[str, Any] = {
        "name": "t",
        "model": codec.model_to_proto(TINY),
        "optimizer": job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1),
        "batch_size": 2,
        "epochs": 2,
    }
    return job_pb2.JobSpec(**{**base, **fields})


def tokens(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32) % TINY.vocab_size


def cluster_registry(workers: int = 3) -> Registry:
    registry = Registry()
    for i in range(2):
        registry.register(Role.PS, f"127.0.0.1:{7000 + i}")
    for i in range(workers):
        registry.register(Role.WORKER, f"127.0.0.1:{8000 + i}")
    return registry


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Driver:
    d = Driver(cluster_registry())

    def deploy(job: Job, params: Any, state: Any, version: int, wait_s: float) -> None:
        job.servers = {"ps-0": "127.0.0.1:7000"}
        job.workers = {"worker-0": "127.0.0.1:8000"}
        job.step = version

    monkeypatch.setattr(d.placement, "deploy", deploy)
    return d


# -- settings at submit ------------------------------------------------------------------------


def test_submit_resolves_every_default_once(driver: Driver) -> None:
    train = tokens(4 * 10 + 1)  # 10 sequences of 4 + 1 tokens: 5 batches of 2
    job = driver.submit(spec(), train, tokens(9))
    s = job.settings
    assert s.batches_per_lease == DEFAULT_BATCHES_PER_LEASE
    assert s.keep_checkpoints == DEFAULT_KEEP_CHECKPOINTS
    assert s.wait_for_members_s == DEFAULT_WAIT_FOR_MEMBERS_S
    assert s.replication == 1 and s.consistency == "sync"
    # The workers hint is every heartbeating worker (3) when num_workers is left open; the
    # 5 batches form one data shard (8 batches per lease), which one worker trains alone.
    assert s.optimizer.total_steps == default_total_steps(2, 10, 2, 3, batches_per_lease=8) == 10
    assert job.state is JobState.READY and job.train.shape == (10, 5)
    pinned = driver.submit(spec(num_workers=1), train, tokens(9)).settings
    assert pinned.optimizer.total_steps == default_total_steps(2, 10, 2, 1, batches_per_lease=8)
    given = job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.1, total_steps=77)
    assert (
        driver.submit(spec(optimizer=given), train, tokens(9)).settings.optimizer.total_steps == 77
    )


def test_submit_sizes_a_local_steps_job_in_rounds(driver: Driver) -> None:
    """DiLoCo: H = 2 and the default lease of H batches. 20 sequences of 4 + 1 tokens: 10
    batches of 2 in 5 leases of 2, over 3 workers: the busiest has 2 leases = 2 rounds an
    epoch, 2 epochs. The inner optimizer counts inner steps: 4 x 2."""
    inner = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-3)
    local = job_pb2.LocalSteps(steps=2, inner_optimizer=inner)
    s = driver.submit(spec(local_steps=local), tokens(4 * 20 + 1), tokens(9)).settings
    assert s.batches_per_lease == 2
    assert s.optimizer.total_steps == default_total_steps(
        2, 20, 2, 3, batches_per_lease=2, local_steps=2
    )
    assert s.optimizer.total_steps == 4
    assert s.local_steps is not None and s.local_steps.inner.total_steps == 8
    required = "job spec: local_steps.inner_optimizer is required"
    with pytest.raises(InvalidArgument, match=re.escape(required)):
        driver.submit(spec(local_steps=job_pb2.LocalSteps(steps=2)), tokens(41), tokens(0))
    with pytest.raises(InvalidArgument, match="batches_per_lease 3 must be a multiple of"):
        driver.submit(spec(local_steps=local, batches_per_lease=3), tokens(41), tokens(0))


def test_submit_sizes_a_fragments_job_in_outer_rounds(driver: Driver) -> None:
    """Streaming fragments, H = 2, F = 2: windows of 1 batch, and the default lease is
    F x H = 4 batches. 20 sequences of 4 + 1 tokens: 10 batches of 2 in leases of 4, 4, 2
    over 3 workers: the busiest has 4 windows + 1 flush = 5 versions an epoch, 10 a job: 5
    outer rounds. The inner optimizer still counts outer x H inner steps: 5 x 2."""
    inner = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=1e-3)
    local = job_pb2.LocalSteps(steps=2, inner_optimizer=inner, fragments=2)
    s = driver.submit(spec(local_steps=local), tokens(4 * 20 + 1), tokens(9)).settings
    assert s.batches_per_lease == 4
    assert s.optimizer.total_steps == default_total_steps(
        2, 20, 2, 3, batches_per_lease=4, local_steps=2, fragments=2
    )
    assert s.optimizer.total_steps == 5
    assert s.local_steps is not None and s.local_steps.inner.total_steps == 10
    staleness = {"consistency": job_pb2.BOUNDED_STALENESS, "max_staleness": 1}
    with pytest.raises(InvalidArgument, match=r"job spec: local_steps\.fragments 2 needs SYNC"):
        driver.submit(spec(local_steps=local, **staleness), tokens(41), tokens(0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "job spec: batch_size must be > 0"),
        ({"wire_dtype": 5}, "job spec: wire_dtype must be a float type"),
        ({"wait_for_members_s": -1.0}, "job spec: wait_for_members_s must be in [0, 3600]"),
        ({"replication": 3}, "job spec: replication must be 1 or 2"),
        ({"optimizer": job_pb2.OptimizerConfig(kind=job_pb2.SGD, lr=0.0)}, "job spec: optimizer:"),
        ({"model": job_pb2.ModelConfig()}, "job spec: "),
    ],
)
def test_submit_refuses_a_bad_spec(driver: Driver, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        driver.submit(spec(**fields), tokens(41), tokens(0))
    assert not driver.jobs


def test_submit_refuses_bad_data(driver: Driver) -> None:
    with pytest.raises(
        InvalidArgument, match=r"train split: the data has token ids outside \[0, 16\)"
    ):
        driver.submit(spec(), torch.tensor([1, 2, 99], dtype=torch.int32), tokens(0))
    with pytest.raises(InvalidArgument, match="fewer than one batch of 2"):
        driver.submit(spec(), tokens(5), tokens(0))


def test_job_json_round_trips_the_settings(tmp_path: Path) -> None:
    s = codec.job_settings_from_proto(spec(), total_steps=9)
    job = Job(
        job_id="job-1", settings=s, train=tokens(10).reshape(2, 5), eval=tokens(0), parameters=1
    )
    jobs.save(tmp_path, job)
    (tmp_path / "job-1" / "LATEST").write_text("step-00000003\n")
    ckpt = tmp_path / "job-1" / "step-00000003"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text('{"version": 3, "epoch": 1, "done": {"2": 1}}')
    (loaded,) = jobs.load_all(tmp_path)
    assert loaded.settings == s and loaded.needs_restore
    assert loaded.resume == Resume(1, {2: 1}) and loaded.step == 3


def test_nothing_but_the_one_conversion_reads_jobspec_fields() -> None:
    out = subprocess.run(
        ["grep", "-rnE", r"spec\.[a-z]", "services/coordinator", "--include=*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    # The servicer's SubmitJob checks the upload against the announced token counts (framing,
    # not settings) and clears the tokenizer from the status copy; nothing else.
    allowed = ("spec.train_tokens", "spec.eval_tokens", "spec.tokenizer_json = ")
    bad = [line for line in out.splitlines() if not any(a in line for a in allowed)]
    assert not bad, bad


# -- resume ------------------------------------------------------------------------------------


def test_resume_applies_only_to_its_epoch() -> None:
    r = Resume(2, {0: 3})
    assert r.done_in(2) == {0: 3} and r.done_in(1) == {}
    job = Job(
        job_id="j",
        settings=codec.job_settings_from_proto(spec(), total_steps=1),
        train=tokens(10).reshape(2, 5),
        eval=tokens(0),
        parameters=1,
    )
    jobs.apply_manifest(job, {"version": 7, "epochs_done": 2, "epoch": 1, "done": {"0": 1}})
    assert job.resume is None  # a checkpoint of an epoch already done resumes nothing
    jobs.apply_manifest(job, {"version": 7, "epochs_done": 2, "epoch": 2, "done": {"0": 1}})
    assert job.resume == Resume(2, {0: 1})


def test_a_restored_job_waits_for_its_workers_then_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    job = Job(
        job_id="j",
        settings=codec.job_settings_from_proto(spec(wait_for_members_s=0.2), total_steps=1),
        train=tokens(10).reshape(2, 5),
        eval=tokens(0),
        parameters=1,
    )
    jobs.apply_manifest(job, {"version": 7, "epochs_done": 1, "epoch": None, "workers": 2})
    assert job.rejoin == 2  # the checkpointed run had two workers
    cluster = Cluster(registry=Registry(), fleet=Fleet())  # none has re-registered yet
    with pytest.raises(Unavailable, match="client went away"):
        cluster.wait_rejoin(job, gone=lambda: True)
    assert job.rejoin == 2  # a retried epoch waits again
    with caplog.at_level("WARNING"):
        cluster.wait_rejoin(job, gone=lambda: False)  # past wait_for_members_s: go on
    assert "0 of 2 workers back" in caplog.text and job.rejoin == 0


# -- the plan phase ----------------------------------------------------------------------------


class FakeFleet(Fleet):
    """Every member answers; the servers stand at `at`; barrier changes are recorded."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.members: list[tuple[list[str], bool]] = []
        self.configured: list[list[str]] = []

    def reachable(self, address: str, timeout_s: float = 3.0) -> bool:
        return True

    def version(self, job_id: str, servers: Mapping[str, str], settle_s: float = 3.0) -> int:
        return self.at

    def set_members(
        self,
        job_id: str,
        servers: Mapping[str, str],
        members: set[str],
        discard_pending: bool = False,
        discard: Sequence[str] = (),
        join_at: int = 0,
    ) -> int:
        self.members.append((sorted(members), discard_pending))
        return self.at

    def configure(
        self,
        job_id: str,
        settings: Any,
        shards: Any,
        servers: Any,
        workers: Mapping[str, str],
        timeout_s: float = 300.0,
    ) -> None:
        self.configured.append(sorted(workers))


def test_plan_phase_leases_resumes_and_opens_the_barrier() -> None:
    registry = cluster_registry(workers=2)
    fleet = FakeFleet(at=12)
    cluster = Cluster(registry=registry, fleet=fleet)
    s = codec.job_settings_from_proto(spec(batches_per_lease=1, checkpoint_every=5), total_steps=9)
    job = Job(
        job_id="j", settings=s, train=tokens(8 * 5).reshape(8, 5), eval=tokens(0), parameters=1
    )
    job.servers = {"ps-0": "127.0.0.1:7000"}
    job.workers = {"worker-0": "127.0.0.1:8000"}  # worker-1 is new: configured in the plan
    job.resume = Resume(0, {0: 1, 1: 1})
    run = EpochRun(
        job=job,
        epoch_no=0,
        context=cast(grpc.ServicerContext, Context()),
        cluster=cluster,
        placement=Placement(cluster=cluster, fleet=fleet, jobs_dir=None),
        fleet=fleet,
    )
    a = run._plan()
    assert fleet.configured == [["worker-1"]]
    assert sorted(job.workers) == ["worker-0", "worker-1"]
    assert fleet.members == [(["worker-0", "worker-1"], True)]  # SYNC: discard_pending
    assert a.start_step == job.step == 12 and a.next_checkpoint == 15
    assert job.epoch is a.desk and a.desk.remaining == 2
    start = run._start_event(a).start
    assert (start.data_shards, start.total_batches, start.batches_done) == (4, 2, 2)
    # Shards 0 and 1 are done; shard 2 -> worker-0, shard 3 -> worker-1 (j mod W).
    lease = a.desk.take("worker-1")
    assert lease is not None and lease.data_shard == 3


# -- FAILED ------------------------------------------------------------------------------------


class Raising:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, **kwargs: Any) -> Raising:
        return self

    def run(self) -> Iterator[job_pb2.ProgressEvent]:
        yield job_pb2.ProgressEvent()
        raise self.error


@pytest.mark.parametrize(
    ("error", "fails"),
    [
        (FailedPrecondition("no --state-dir: this coordinator keeps no checkpoints"), True),
        (NotFound("unknown job"), True),
        (RuntimeError("a bug"), True),
        (Unavailable("parameter servers did not come back in 600s"), False),
    ],
)
def test_an_epoch_error_fails_the_job_unless_retryable(
    driver: Driver, monkeypatch: pytest.MonkeyPatch, error: Exception, fails: bool
) -> None:
    job = driver.submit(spec(), tokens(41), tokens(0))
    monkeypatch.setattr(driver_mod, "EpochRun", Raising(error))
    context = cast(grpc.ServicerContext, Context())
    with pytest.raises(type(error)):
        list(driver.run_epoch(job.job_id, 0, context))
    assert job.epoch is None
    if not fails:
        assert job.state is JobState.READY and job.error == ""
        return
    assert job.state is JobState.FAILED and str(error) in job.error
    with pytest.raises(
        FailedPrecondition, match=f"job {job.job_id} failed: .*{re.escape(str(error))}"
    ):
        list(driver.run_epoch(job.job_id, 0, context))


def test_a_client_that_went_away_fails_nothing(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = driver.submit(spec(), tokens(41), tokens(0))
    monkeypatch.setattr(driver_mod, "EpochRun", Raising(FailedPrecondition("x")))
    context = Context()
    events = driver.run_epoch(job.job_id, 0, cast(grpc.ServicerContext, context))
    next(events)
    context.active = False
    with pytest.raises(FailedPrecondition):
        next(events)
    assert job.state is JobState.READY


def test_fails_for_good_reads_rpc_codes() -> None:
    class Rpc(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

    context = cast(grpc.ServicerContext, Context())
    assert not fails_for_good(Rpc(grpc.StatusCode.UNAVAILABLE), context)
    assert not fails_for_good(Rpc(grpc.StatusCode.DEADLINE_EXCEEDED), context)
    assert fails_for_good(Rpc(grpc.StatusCode.INTERNAL), context)
    assert not fails_for_good(grpc.RpcError(), context)  # a cancelled request stream
