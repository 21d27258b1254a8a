"""Gradient clipping by global norm (`max_grad_norm`) against torch.nn.utils.clip_grad_norm_.

SYNC, in one process: two `Trainer`s and two `ParameterStore`s (the harness of
tests/unit/test_inprocess_parity.py, with the stores clipping and the clients exchanging each
step's norm through the real `StepCommitter`) equal one torch model stepping on the union
batch with clip_grad_norm_. Then the store's side of the exchange (GradNorm waits for the
barrier, ApplyStep is idempotent and refuses what does not fit, a parked step and membership
changes), the exchange itself with replicated shards and with a step whose pushers are gone,
and the two modes where a worker clips alone: ASYNC (its push) and local steps (its inner
gradients). Seconds long.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from lmps.client import cli
from lmps.client.run_log import StepAggregator
from lmps.client.train import build_spec
from lmps.client.train_options import TrainOptions
from lmps.core import clip
from lmps.core.data import to_sequences
from lmps.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
)
from lmps.core.model import GPT, decay_mask, init_model
from lmps.core.optim import OptimizerSettings, lr_at
from lmps.core.partition import Shard, assemble
from lmps.core.settings import JobSettings
from lmps.services.parameter_server.store import KEEP_NORMS, ParameterStore
from lmps.services.worker.local_steps import InnerLoop
from lmps.services.worker.replica import Replica
from lmps.services.worker.trainer import Lease, StepResult, Trainer
from lmps.v1 import job_pb2
from tests.unit.test_inprocess_parity import (
    BATCH,
    BATCHES,
    CONFIG,
    JOB,
    OPTIMIZERS,
    SEED,
    SERVERS,
    WAIT_S,
    StoreClient,
    StoreNorms,
    initial_shards,
    loaded_stores,
    reference,
    train_in_process,
)

MAX_NORM = 0.5  # the tiny model's step norms are about 1: every step clips


def sequences() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    n = BATCHES * BATCH * CONFIG.block_size + 1
    tokens = torch.randint(0, CONFIG.vocab_size, (n,), generator=g, dtype=torch.int32)
    return to_sequences(tokens, CONFIG.block_size)


def worst_diff(trained: dict[str, torch.Tensor], expected: GPT) -> float:
    return max(float((trained[n] - p.detach()).abs().max()) for n, p in expected.named_parameters())


# -- SYNC: two workers, two stores, against torch on the union batch ---------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sync_clipping_matches_clip_grad_norm_on_the_union_batch(name: str) -> None:
    settings, seqs = OPTIMIZERS[name], sequences()
    results, version, trained, leases = train_in_process(settings, seqs, max_grad_norm=MAX_NORM)
    norms: list[float] = []
    expected = reference(
        settings,
        seqs,
        results,
        leases.plans,
        leases.epoch_of,
        max_grad_norm=MAX_NORM,
        norms=norms,
    )
    for n, p in expected.named_parameters():
        torch.testing.assert_close(trained[n], p.detach(), msg=lambda m, n=n: f"{n}: {m}")  # type: ignore[misc]

    # Every worker of a step reported the same norm (the same sums, added in the same order),
    # and it is the one clip_grad_norm_ returned for the union batch.
    per_step: dict[int, set[float]] = defaultdict(set)
    for r in results:
        per_step[r.step].add(r.grad_norm)
    assert all(len(v) == 1 for v in per_step.values()), per_step
    got = torch.tensor([per_step[s].pop() for s in sorted(per_step)], dtype=torch.float64)
    want = torch.tensor(norms, dtype=torch.float64)
    assert len(got) == version == len(norms)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)
    clipped = int((got > MAX_NORM).sum())
    assert clipped > len(got) // 2, f"only {clipped} of {len(got)} steps clipped"
    print(
        f"\nclip {name}: {version} steps, {clipped} clipped, params max abs diff "
        f"{worst_diff(trained, expected):.3e}, norms max abs diff "
        f"{float((got - want).abs().max()):.3e}"
    )


def test_a_bound_above_every_norm_is_exactly_the_unclipped_run() -> None:
    settings, seqs = OPTIMIZERS["adamw"], sequences()
    plain, v0, unclipped, _ = train_in_process(settings, seqs)
    loose, v1, trained, _ = train_in_process(settings, seqs, max_grad_norm=1e6)
    assert v0 == v1
    for n, t in unclipped.items():
        assert torch.equal(trained[n], t), n  # min(1, coef) multiplies by exactly 1.0
    assert all(r.grad_norm == 0.0 for r in plain)
    assert all(0 < r.grad_norm < 1e6 for r in loose)


# -- the store's side: GradNorm, ApplyStep, a parked step ---------------------------------------

SGD = OptimizerSettings(kind="sgd", lr=0.25)
SHARDS = [
    Shard("a#0", "a", (3,), 0, 3, "ps-0", False),
    Shard("b#0", "b", (2, 2), 0, 4, "ps-0", True),
]
GRADS = {
    "w0": {"a#0": torch.tensor([3.0, 0.0, 4.0]), "b#0": torch.tensor([1.0, 1.0, 1.0, 1.0])},
    "w1": {"a#0": torch.tensor([1.0, 2.0, 0.0]), "b#0": torch.tensor([-1.0, 0.0, 1.0, 2.0])},
}
INIT = {"a#0": torch.zeros(3), "b#0": torch.ones(4)}


def store(max_grad_norm: float = 1.0, version: int = 0) -> ParameterStore:
    s = ParameterStore("ps-0")
    init = [(sid, t.clone()) for sid, t in INIT.items()]
    s.load(JOB, SGD, SHARDS, init, ["w0", "w1"], version=version, max_grad_norm=max_grad_norm)
    return s


def push(s: ParameterStore, worker: str, step: int = 0) -> None:
    s.push(JOB, worker, step, 1.0, [(sid, g.clone()) for sid, g in GRADS[worker].items()])


def values(s: ParameterStore) -> dict[str, torch.Tensor]:
    return dict(s.pull(JOB, 0, [], timeout_s=0)[1])


def parked() -> tuple[ParameterStore, dict[str, float]]:
    """A `store()` whose step 0 both workers pushed, parked for its norm, and the step's sums
    (GradNorm's answer)."""
    s = store()
    push(s, "w0")
    push(s, "w1")
    _, sums = s.grad_norm(JOB, 0, WAIT_S)
    return s, sums


def mean() -> dict[str, torch.Tensor]:
    return {sid: (GRADS["w0"][sid] + GRADS["w1"][sid]) / 2 for sid in INIT}


def test_grad_norm_waits_for_the_barrier_then_answers_the_mean_s_sums() -> None:
    s = store()
    push(s, "w0")
    answers: list[tuple[int, dict[str, float]]] = []
    waiting = threading.Thread(target=lambda: answers.append(s.grad_norm(JOB, 0, WAIT_S)))
    waiting.start()
    waiting.join(timeout=0.3)
    assert waiting.is_alive() and not answers  # w1 has not pushed: the step is not complete
    assert not s.awaiting_norm(JOB)
    push(s, "w1")
    waiting.join(timeout=WAIT_S)
    (version, sums) = answers[0]
    assert version == 0 and s.awaiting_norm(JOB)
    assert sums == {sid: float((g.double() ** 2).sum()) for sid, g in mean().items()}
    # Parked: the version stays, a pull for the next one waits, values are untouched.
    assert torch.equal(values(s)["a#0"], INIT["a#0"])
    with pytest.raises(DeadlineExceeded):
        s.pull(JOB, 1, [], timeout_s=0.05)
    with pytest.raises(OutOfRange):
        s.grad_norm(JOB, 1, 0.05)  # step 1 cannot complete before 0 is applied


def test_apply_step_clips_as_torch_and_is_idempotent() -> None:
    s, sums = parked()
    norm = clip.total_norm(sums)
    assert norm > 1.0  # this step clips
    version, used, applied = s.apply_step(JOB, 0, norm)
    assert (version, used, applied) == (1, norm, True)
    # torch: clip_grad_norm_ on the mean, then SGD.
    params = [torch.nn.Parameter(INIT[sid].clone()) for sid in INIT]
    for p, g in zip(params, mean().values(), strict=True):
        p.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(float(torch_norm), norm)
    torch.optim.SGD(params, lr=SGD.lr, foreach=False).step()
    after = values(s)
    for p, sid in zip(params, INIT, strict=True):
        torch.testing.assert_close(after[sid], p.detach(), rtol=0, atol=1e-7)
    # Idempotent: the same norm again (another worker of the step) changes nothing.
    assert s.apply_step(JOB, 0, norm) == (1, norm, False)
    assert all(torch.equal(after[k], v) for k, v in values(s).items())
    # GradNorm of the applied step: the same sums, at once.
    assert s.grad_norm(JOB, 0, 0) == (1, sums)


def test_apply_step_refuses_what_does_not_fit_and_changes_nothing() -> None:
    s, sums = parked()
    norm = clip.total_norm(sums)
    before = values(s)
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(InvalidArgument):
            s.apply_step(JOB, 0, bad)
    with pytest.raises(InvalidArgument, match="below"):
        s.apply_step(JOB, 0, norm / 2)  # less than this server's own part of the norm
    with pytest.raises(OutOfRange):
        s.apply_step(JOB, 1, norm)
    with pytest.raises(NotFound):
        s.apply_step("other-job", 0, norm)
    assert s.awaiting_norm(JOB) and all(torch.equal(before[k], v) for k, v in values(s).items())
    s.apply_step(JOB, 0, norm)
    after = values(s)
    with pytest.raises(FailedPrecondition, match="applied with norm"):
        s.apply_step(JOB, 0, norm * 1.5)  # a different norm for an applied step
    assert all(torch.equal(after[k], v) for k, v in values(s).items())
    with pytest.raises(FailedPrecondition, match="not complete"):
        s.apply_step(JOB, 1, norm)  # step 1: nobody pushed yet


def test_grad_norm_and_apply_step_refuse_without_clipping_and_bad_steps() -> None:
    plain = store(max_grad_norm=0.0)
    with pytest.raises(FailedPrecondition, match="does not clip"):
        plain.grad_norm(JOB, 0, 0)
    with pytest.raises(FailedPrecondition, match="does not clip"):
        plain.apply_step(JOB, 0, 1.0)
    s = store()
    with pytest.raises(OutOfRange):
        s.grad_norm(JOB, 3, 0)
    with pytest.raises(NotFound):
        s.grad_norm("other-job", 0, 0)


def test_load_refuses_clipping_on_servers_outside_sync() -> None:
    s = ParameterStore("ps-0")
    init = [(sid, t.clone()) for sid, t in INIT.items()]
    for kwargs in (
        {"consistency": "async", "max_grad_norm": 1.0},
        {"consistency": "bounded_staleness", "max_staleness": 2, "max_grad_norm": 1.0},
        {"max_grad_norm": -1.0},
        {"max_grad_norm": math.nan},
    ):
        with pytest.raises(InvalidArgument):
            s.load(JOB, SGD, SHARDS, init, ["w0"], **kwargs)
    s.load(JOB, SGD, SHARDS, init, ["w0"], consistency="bounded_staleness", max_grad_norm=1.0)


def test_a_parked_step_survives_a_discard_and_refuses_a_second_push() -> None:
    s, sums = parked()
    with pytest.raises(FailedPrecondition, match="complete"):
        push(s, "w0")  # the step is complete: another push for it is refused
    # A worker lost after its push is discarded, but the parked step is complete: it stays.
    assert s.set_members(JOB, ["w0"], discard=["w1"]) == (0, False)
    assert s.awaiting_norm(JOB)
    assert s.grad_norm(JOB, 0, 0) == (0, sums)
    s.apply_step(JOB, 0, clip.total_norm(sums))
    assert s.pull(JOB, 1, [], timeout_s=0)[0] == 1


def test_a_join_at_a_parked_step_is_refused_and_taken_at_the_next() -> None:
    s = store(version=5)
    push(s, "w0", step=5)
    push(s, "w1", step=5)
    with pytest.raises(FailedPrecondition, match="awaiting its norm"):
        s.set_members(JOB, ["w0", "w1", "w2"], join_at=5)
    assert s.set_members(JOB, ["w0", "w1", "w2"], join_at=6) == (5, False)
    _, sums = s.grad_norm(JOB, 5, 0)
    assert s.apply_step(JOB, 5, clip.total_norm(sums))[0] == 6  # w2 is not needed for 5


def test_discard_pending_drops_a_parked_step_and_it_is_pushed_anew() -> None:
    s, _ = parked()
    assert s.set_members(JOB, ["w0", "w1"], discard_pending=True) == (0, False)
    assert not s.awaiting_norm(JOB)
    assert torch.equal(values(s)["b#0"], INIT["b#0"])
    push(s, "w0")  # the same step again, from the start
    push(s, "w1")
    _, sums = s.grad_norm(JOB, 0, WAIT_S)
    assert s.apply_step(JOB, 0, clip.total_norm(sums))[0] == 1


def test_the_last_steps_norms_are_kept() -> None:
    s = store(max_grad_norm=100.0)
    for step in range(KEEP_NORMS + 2):
        push(s, "w0", step)
        push(s, "w1", step)
        _, sums = s.grad_norm(JOB, step, WAIT_S)
        s.apply_step(JOB, step, clip.total_norm(sums))
    assert s.grad_norm(JOB, 0, 0) == (KEEP_NORMS + 2, {})  # gone: applied, no sums
    with pytest.raises(FailedPrecondition, match="before the norms kept"):
        s.apply_step(JOB, 0, 1.0)
    assert s.grad_norm(JOB, KEEP_NORMS + 1, 0)[1]


# -- the exchange: replicated shards, a step whose pushers are gone --------------------------


def test_commit_counts_a_replicated_shard_once() -> None:
    # ps-0 owns a#0 and backs up b#0; ps-1 owns b#0: b#0's sums come from both, counted once.
    shards = [
        Shard("a#0", "a", (3,), 0, 3, "ps-0", False),
        Shard("b#0", "b", (2, 2), 0, 4, "ps-1", True, backup_server_id="ps-0"),
    ]
    stores = {sid: ParameterStore(sid) for sid in SERVERS}
    for sid, st in stores.items():
        mine = [sh for sh in shards if sh.held_by(sid)]
        st.load(
            JOB,
            SGD,
            mine,
            [(sh.shard_id, INIT[sh.shard_id].clone()) for sh in mine],
            ["w0"],
            max_grad_norm=1.0,
        )
        st.push(JOB, "w0", 0, 1.0, [(sh.shard_id, GRADS["w0"][sh.shard_id]) for sh in mine])
    committer = clip.StepCommitter({s: StoreNorms(st) for s, st in stores.items()}, shards)
    norm = committer.after_push(0)
    want = math.sqrt(sum(float((g.double() ** 2).sum()) for g in GRADS["w0"].values()))
    assert norm == pytest.approx(want, rel=1e-12)
    b = {sid: st.pull(JOB, 1, ["b#0"], timeout_s=0)[1][0][1] for sid, st in stores.items()}
    assert torch.equal(b["ps-0"], b["ps-1"])  # owner and backup made the same update


def test_a_step_whose_pushers_are_gone_is_committed_by_the_next_pull() -> None:
    shards, values0 = initial_shards(init_model(CONFIG, SEED))
    stores = loaded_stores(SGD, shards, values0, ["w0", "w1"], max_grad_norm=0.01)
    grads = {s.shard_id: torch.full((s.numel,), 0.1) for s in shards}
    for w in ("w0", "w1"):  # both push, neither commits (they died)
        StoreClient(w, stores, shards).push(0, 1.0, grads)
    assert all(st.awaiting_norm(JOB) for st in stores.values())
    joiner = StoreClient("w2", stores, shards, clip=True)
    version, _ = joiner.pull(1, timeout_s=WAIT_S)
    assert version == 1
    assert joiner.committer is not None and joiner.committer.committed == 0
    # Its next pull needs no exchange for step 0 again.
    assert joiner.pull(1, timeout_s=0)[0] == 1


# -- a worker clipping alone: ASYNC pushes, local steps' inner gradients ----------------------


class OneWorker:
    """A `LeaseSource` of one worker: `n` leases of one batch each, then none."""

    def __init__(self, seqs: torch.Tensor, n: int) -> None:
        self.leases = [Lease(f"l{i}", i, 0, 1, seqs[i * BATCH : (i + 1) * BATCH]) for i in range(n)]

    def next_lease(self, epoch: int, next_step: int) -> Lease | None:
        return self.leases.pop(0) if self.leases else None

    def complete(self, lease: Lease) -> None:
        pass


def torch_model() -> tuple[GPT, list[dict[str, object]]]:
    model = init_model(CONFIG, SEED)
    params = list(model.named_parameters())
    groups: list[dict[str, object]] = [
        {"params": [p for n, p in params if decay_mask(n, p)]},
        {"params": [p for n, p in params if not decay_mask(n, p)], "weight_decay": 0.0},
    ]
    return model, groups


def clipped_backward(model: GPT, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """The gradient of `batch`'s loss in `model`, clipped by clip_grad_norm_ to MAX_NORM: the
    norm before clipping."""
    b = batch.long()
    opt.zero_grad()
    _, loss = model(b[:, :-1], b[:, 1:])
    assert loss is not None
    loss.backward()
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))


def test_async_worker_clips_its_own_push_as_clip_grad_norm() -> None:
    settings = OptimizerSettings(kind="sgd", lr=0.05, momentum=0.9, weight_decay=0.01)
    seqs, n = sequences(), 4
    shards, values0 = initial_shards(init_model(CONFIG, SEED))
    stores = loaded_stores(settings, shards, values0, ["w0"], consistency="async")
    trainer = Trainer(
        worker_id="w0",
        model=Replica(CONFIG, shards, torch.device("cpu")),
        params=StoreClient("w0", stores, shards, mixed=True),
        leases=OneWorker(seqs, n),
        batch_size=BATCH,
        asynchronous=True,
        max_grad_norm=MAX_NORM,
    )
    results: list[StepResult] = list(trainer.run_epoch(0, 0))
    assert [r.step for r in results] == list(range(n))
    # torch: one worker's pushes applied one at a time, each clipped alone.
    model, groups = torch_model()
    opt = torch.optim.SGD(
        groups, lr=settings.lr, momentum=settings.momentum, weight_decay=0.01, foreach=False
    )
    norms = []
    for i in range(n):
        norms.append(clipped_backward(model, opt, seqs[i * BATCH : (i + 1) * BATCH]))
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, i)
        opt.step()
    torch.testing.assert_close(
        torch.tensor([r.grad_norm for r in results]), torch.tensor(norms), rtol=1e-5, atol=0.0
    )
    assert all(x > MAX_NORM for x in norms)
    trained: dict[str, torch.Tensor] = {}
    for st in stores.values():
        trained.update(st.pull(JOB, 0, [], timeout_s=0)[1])
    got = assemble(shards, trained)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), msg=lambda m, n=name: f"{n}: {m}")  # type: ignore[misc]


def test_local_steps_clip_each_inner_gradient_as_clip_grad_norm() -> None:
    inner = OptimizerSettings(kind="adamw", lr=2e-3, weight_decay=0.1, schedule="constant")
    seqs, h = sequences(), 3
    shards, values0 = initial_shards(init_model(CONFIG, SEED))
    replica = Replica(CONFIG, shards, torch.device("cpu"))
    decay = {s.shard_id: s.weight_decay for s in shards}
    loop = InnerLoop(replica, h, inner, decay, max_grad_norm=MAX_NORM)
    batches = [seqs[k * BATCH : (k + 1) * BATCH] for k in range(h)]
    done = loop.run_round(0, values0, batches)
    assert done is not None
    # torch: the same H inner steps on one model, clip_grad_norm_ before each.
    model, groups = torch_model()
    opt = torch.optim.AdamW(
        groups,
        lr=inner.lr,
        betas=(inner.beta1, inner.beta2),
        eps=inner.eps,
        weight_decay=inner.weight_decay,
        foreach=False,
    )
    norms = []
    for batch in batches:
        norms.append(clipped_backward(model, opt, batch))
        opt.step()
    torch.testing.assert_close(torch.tensor(done.norms), torch.tensor(norms), rtol=1e-5, atol=0.0)
    assert all(x > MAX_NORM for x in norms)
    start = assemble(shards, values0)
    delta = assemble(shards, done.delta)
    for name, p in model.named_parameters():
        # Δ = θ(v) - θ_local: θ_local = θ(v) - Δ is the model after the clipped inner steps.
        torch.testing.assert_close(start[name] - delta[name], p.detach(), msg=name)


# -- settings -----------------------------------------------------------------------------------


def test_settings_say_where_clipping_runs_and_refuse_it_with_staleness() -> None:
    base = JobSettings(
        name="t",
        model=CONFIG,
        optimizer=OptimizerSettings(kind="sgd", lr=0.1, total_steps=10),
        batch_size=2,
        seed=0,
        epochs=1,
    )
    assert not base.clip_on_servers
    assert replace(base, max_grad_norm=1.0).clip_on_servers
    assert replace(base, consistency="bounded_staleness", max_grad_norm=1.0).clip_on_servers
    assert not replace(base, consistency="async", max_grad_norm=1.0).clip_on_servers
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="max_grad_norm"):
            replace(base, max_grad_norm=bad)
    with pytest.raises(ValueError, match=r"max_grad_norm 1 .*max_staleness 2"):
        replace(base, consistency="bounded_staleness", max_staleness=2, max_grad_norm=1.0)


def test_train_flag_reaches_the_spec_and_is_validated() -> None:
    args = cli.build_parser().parse_args(["train", "--max-grad-norm", "0.25"])
    opts = cli._train_options(args)
    assert opts.max_grad_norm == 0.25
    spec = build_spec(opts, vocab_size=64, tokenizer_json="")
    assert spec.max_grad_norm == 0.25
    for bad in ({"max_grad_norm": -1.0}, {"max_grad_norm": math.nan}):
        with pytest.raises(ValueError, match="--max-grad-norm"):
            TrainOptions(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"--max-grad-norm .*ssp:2"):
        TrainOptions(max_grad_norm=1.0, consistency="ssp:2")
    TrainOptions(max_grad_norm=1.0, consistency="ssp:2", local_steps=2)  # clipped on workers


def test_metrics_rows_carry_the_step_norm_when_clipping_is_on() -> None:
    def event(worker: str, norm: float) -> job_pb2.StepEvent:
        return job_pb2.StepEvent(worker_id=worker, step=0, loss=1.0, tokens=10, grad_norm=norm)

    agg = StepAggregator(epoch=1, workers=2, lr=lambda s: 0.1)
    agg.add(event("w0", 1.5))
    (row,) = agg.add(event("w1", 1.5))
    assert row.to_json()["grad_norm"] == 1.5
    off = StepAggregator(epoch=1, workers=1, lr=lambda s: 0.1)
    (row,) = off.add(event("w0", 0.0))
    assert row.to_json()["grad_norm"] is None
