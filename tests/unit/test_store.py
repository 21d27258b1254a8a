"""Unit tests for the parameter server's state (services/parameter_server/store.py).

In-process: a `ParameterStore` object, no gRPC, no threads except where a wait is the point.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable

import pytest
import torch

from lmps.core.compress import Compression, Encoded, encode
from lmps.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from lmps.core.optim import OPTIMIZERS, OptimizerSettings
from lmps.core.partition import ParamInfo, Shard, plan_shards
from lmps.services.parameter_server.store import MAX_GRAD_ABS, MAX_WEIGHT, ParameterStore

JOB = "job-1"
SHARDS: list[Shard] = plan_shards(
    [ParamInfo("w", (6, 5), True), ParamInfo("b", (5,), False)], ["ps-0"], shard_bytes=48
)
SGD = OptimizerSettings(kind="sgd", lr=1.0)
ADAMW = OptimizerSettings(kind="adamw", lr=0.05, weight_decay=0.1, beta2=0.99)


def randn(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(s.shard_id, torch.randn(s.numel, generator=g)) for s in SHARDS]


def filled(value: float) -> list[tuple[str, torch.Tensor]]:
    return [(s.shard_id, torch.full((s.numel,), value)) for s in SHARDS]


def new_store(
    settings: OptimizerSettings = SGD,
    members: tuple[str, ...] = ("w0",),
    **kwargs,
) -> ParameterStore:
    store = ParameterStore("ps-0")
    store.load(JOB, settings, SHARDS, randn(0), members, **kwargs)
    return store


def values(store: ParameterStore) -> dict[str, torch.Tensor]:
    _, out = store.pull(JOB, 0, [], timeout_s=0)
    return dict(out)


def version(store: ParameterStore) -> int:
    return store.describe(JOB)[1]


def pushed(store: ParameterStore) -> list[str]:
    return store.describe(JOB)[4]


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def step(store: ParameterStore, seed: int, worker: str = "w0") -> None:
    result = store.push(JOB, worker, version(store), 1.0, randn(seed))
    assert result.applied


# -- snapshots -----------------------------------------------------------------------------


def test_snapshot_of_the_current_version_is_live_state():
    store = new_store(ADAMW)
    step(store, 1)
    snap = store.snapshot(JOB, 1, timeout_s=0)

    assert snap.version == 1
    assert_equal(snap.values, values(store))
    assert set(snap.state) == {s.shard_id for s in SHARDS}
    for st in snap.state.values():
        assert st["step"].dim() == 0 and float(st["step"]) == 1.0
    step(store, 2)  # a copy: training on does not change it
    assert not torch.equal(snap.values[SHARDS[0].shard_id], values(store)[SHARDS[0].shard_id])


def test_held_snapshot_survives_until_the_next_multiple():
    store = new_store(ADAMW, checkpoint_every=2)
    step(store, 1)
    step(store, 2)
    at_2 = values(store)
    state_2 = store.snapshot(JOB, 2, timeout_s=0).state
    step(store, 3)  # the server moves on to 3

    held = store.snapshot(JOB, 2, timeout_s=0)
    assert held.version == 2
    assert_equal(held.values, at_2)
    for sid, st in state_2.items():
        assert_equal(held.state[sid], st)
    assert store.snapshot(JOB, 3, timeout_s=0).version == 3  # live

    with pytest.raises(FailedPrecondition, match="version 1 is gone"):
        store.snapshot(JOB, 1, timeout_s=0)  # not a multiple of 2: never held
    step(store, 4)  # 4: a new snapshot replaces the one of 2
    with pytest.raises(FailedPrecondition, match="version 2 is gone"):
        store.snapshot(JOB, 2, timeout_s=0)
    step(store, 5)
    assert store.snapshot(JOB, 4, timeout_s=0).version == 4


def test_no_held_snapshot_without_checkpoint_every():
    store = new_store()
    step(store, 1)
    with pytest.raises(FailedPrecondition):
        store.snapshot(JOB, 0, timeout_s=0)


def test_snapshot_of_a_future_version_times_out():
    store = new_store()
    with pytest.raises(DeadlineExceeded):
        store.snapshot(JOB, 1, timeout_s=0.05)
    assert version(store) == 0


def test_snapshot_waits_for_a_future_version():
    store = new_store()
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.snapshot(JOB, 1, timeout_s=10)))
    waiter.start()
    step(store, 1)
    waiter.join(timeout=10)
    assert [s.version for s in got] == [1]
    assert_equal(got[0].values, values(store))


# -- members and pending pushes ------------------------------------------------------------


def test_set_members_discard_drops_only_that_workers_push():
    store = new_store(members=("w0", "w1", "w2"))
    store.push(JOB, "w0", 0, 1.0, randn(10))
    store.push(JOB, "w1", 0, 1.0, randn(11))

    assert store.set_members(JOB, ["w0", "w1", "w2"], discard=["w1"]) == (0, False)
    assert pushed(store) == ["w0"]

    store.push(JOB, "w1", 0, 1.0, randn(21))  # allowed again, with another gradient
    assert store.push(JOB, "w2", 0, 1.0, randn(12)).applied

    reference = new_store(members=("w0", "w1", "w2"))
    for w, seed in [("w0", 10), ("w1", 21), ("w2", 12)]:
        reference.push(JOB, w, 0, 1.0, randn(seed))
    assert_equal(values(store), values(reference))


def test_set_members_discard_pending_drops_every_push():
    store = new_store(members=("w0", "w1", "w2"))
    store.push(JOB, "w0", 0, 1.0, randn(10))
    store.push(JOB, "w1", 0, 1.0, randn(11))
    before = values(store)

    assert store.set_members(JOB, ["w0", "w1", "w2"], discard_pending=True) == (0, False)

    assert pushed(store) == []
    assert_equal(values(store), before)
    for w in ("w0", "w1", "w2"):
        store.push(JOB, w, 0, 1.0, filled(0.0))
    assert version(store) == 1
    assert_equal(values(store), before)  # SGD with zero gradient: the old pushes are gone


def test_removing_the_last_missing_member_applies_the_step():
    store = new_store(members=("w0", "w1"))
    store.push(JOB, "w0", 0, 1.0, randn(3))
    assert store.set_members(JOB, ["w0"]) == (1, True)
    assert version(store) == 1


# -- the weighted mean ---------------------------------------------------------------------


def test_weighted_mean_is_independent_of_push_order():
    # Element 0 cancels: (1e17 - 1e17) + 1 = 1 in fp64, but (1e17 + 1) - 1e17 = 0, so a sum
    # in arrival order would differ between these orders. The rest is ordinary data.
    workers = {"w0": (1e17, 3.0, 30), "w1": (-1e17, 3.0, 31), "w2": (1.0, 2.0, 32)}

    def grads(w: str) -> list[tuple[str, torch.Tensor]]:
        first, _, seed = workers[w]
        out = randn(seed)
        out[0][1][0] = first
        return out

    results = []
    for order in itertools.permutations(workers):
        store = new_store(members=tuple(workers))
        for w in order:
            store.push(JOB, w, 0, workers[w][1], grads(w))
        assert version(store) == 1
        results.append(values(store))
    for other in results[1:]:
        assert_equal(other, results[0])


def test_weighted_mean_weighs_by_samples():
    store = new_store(members=("w0", "w1"))
    before = values(store)
    store.push(JOB, "w0", 0, 3.0, filled(1.0))
    store.push(JOB, "w1", 0, 1.0, filled(5.0))
    after = values(store)
    for sid in before:  # SGD lr 1: minus the mean (3 * 1 + 1 * 5) / 4 = 2
        assert torch.equal(after[sid], before[sid] - 2.0)


# -- restoring optimizer state -------------------------------------------------------------


def test_load_with_state_restores_adamw_moments():
    first = new_store(ADAMW)
    for seed in (1, 2, 3):
        step(first, seed)
    snap = first.snapshot(JOB, 3, timeout_s=0)

    def from_snapshot(with_state: bool) -> ParameterStore:
        store = ParameterStore("ps-0")
        state = snap.state if with_state else None
        store.load(JOB, ADAMW, SHARDS, list(snap.values.items()), ["w0"], 3, state)
        return store

    restored, cold = from_snapshot(True), from_snapshot(False)
    for store in (first, restored, cold):
        step(store, 4)

    assert version(restored) == version(first) == 4
    assert_equal(values(restored), values(first))
    later = restored.snapshot(JOB, 4, timeout_s=0).state
    for sid, st in first.snapshot(JOB, 4, timeout_s=0).state.items():
        assert_equal(later[sid], st)
    # Without the moments the same step lands elsewhere: the comparison above means something.
    assert any(not torch.equal(values(cold)[k], v) for k, v in values(first).items())


def test_restored_state_is_not_shared_with_the_snapshot():
    first = new_store(ADAMW)
    step(first, 1)
    snap = first.snapshot(JOB, 1, timeout_s=0)
    kept = {sid: {k: t.clone() for k, t in st.items()} for sid, st in snap.state.items()}
    restored = ParameterStore("ps-0")
    restored.load(JOB, ADAMW, SHARDS, list(snap.values.items()), ["w0"], 1, snap.state)
    step(restored, 2)
    for sid, st in kept.items():
        assert_equal(snap.state[sid], st)


# -- bounds on gradients and weights -------------------------------------------------------


def big_at(shard_index: int, value: float) -> list[tuple[str, torch.Tensor]]:
    grads = randn(5)
    grads[shard_index][1][-1] = value
    return grads


@pytest.mark.parametrize(
    "weight, grads",
    [
        (1.0, big_at(0, 2 * MAX_GRAD_ABS)),
        (1.0, big_at(-1, -2 * MAX_GRAD_ABS)),
        (MAX_WEIGHT * 2, randn(5)),
        (float("inf"), randn(5)),
        (float("nan"), randn(5)),
        (0.0, randn(5)),
        (-1.0, randn(5)),
    ],
    ids=["grad+", "grad-", "weight", "weight-inf", "weight-nan", "weight-0", "weight-neg"],
)
def test_out_of_range_push_is_invalid_and_changes_nothing(weight, grads):
    store = new_store(members=("w0", "w1"))
    store.push(JOB, "w1", 0, 1.0, randn(7))
    before = values(store)

    with pytest.raises(InvalidArgument):
        store.push(JOB, "w0", 0, weight, grads)

    assert version(store) == 0
    assert pushed(store) == ["w1"]
    assert_equal(values(store), before)
    # The refused push left no trace: w0 may push again, and the step is w1's and this one.
    store.push(JOB, "w0", 0, 1.0, randn(8))
    reference = new_store(members=("w0", "w1"))
    reference.push(JOB, "w1", 0, 1.0, randn(7))
    reference.push(JOB, "w0", 0, 1.0, randn(8))
    assert_equal(values(store), values(reference))


def test_the_bounds_themselves_are_accepted():
    store = new_store(members=("w0",))
    result = store.push(JOB, "w0", 0, MAX_WEIGHT, big_at(0, MAX_GRAD_ABS))
    assert result.applied
    assert all(bool(torch.isfinite(t).all()) for t in values(store).values())


# -- the store with its barrier ------------------------------------------------------------


def test_load_with_an_unknown_consistency_is_invalid_and_keeps_the_old_job():
    store = new_store(members=("w0", "w1"))
    store.push(JOB, "w0", 0, 1.0, randn(1))
    before = values(store)

    with pytest.raises(InvalidArgument, match="unknown consistency"):
        store.load("job-2", SGD, SHARDS, randn(9), ["w2"], consistency="hogwild")  # type: ignore[arg-type]

    assert store.describe() == (JOB, 0, SHARDS, ["w0", "w1"], ["w0"])
    assert_equal(values(store), before)


def test_sync_is_the_default_consistency():
    explicit = new_store(ADAMW, members=("w0", "w1"), consistency="sync")
    default = new_store(ADAMW, members=("w0", "w1"))
    for store in (explicit, default):
        for seed in (1, 2):
            store.push(JOB, "w1", version(store), 2.0, randn(10 + seed))
            store.push(JOB, "w0", version(store), 1.0, randn(20 + seed))
    assert version(explicit) == version(default) == 2
    assert_equal(values(explicit), values(default))
    assert explicit.history(JOB) == default.history(JOB)


def test_history_is_the_digest_of_each_steps_composition():
    store = new_store(members=("w0", "w1"), history="h0")
    store.push(JOB, "w1", 0, 3.0, randn(1))
    store.push(JOB, "w0", 0, 0.5, randn(2))
    store.set_members(JOB, ["w1"])
    store.push(JOB, "w1", 1, 1.0, randn(3))

    h1 = hashlib.sha256(b"h0|0|w0:0.5,w1:3.0").hexdigest()  # sorted workers, repr weights
    assert store.history(JOB) == hashlib.sha256(f"{h1}|1|w1:1.0".encode()).hexdigest()
    assert new_store().history(JOB) == hashlib.sha256(f"{JOB}|0".encode()).hexdigest()


def test_pull_waits_for_the_barrier_to_complete_the_step():
    store = new_store(members=("w0", "w1"))
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.pull(JOB, 1, [], timeout_s=10)))
    waiter.start()
    store.push(JOB, "w0", 0, 1.0, randn(1))
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and not got  # one member short: version 1 is not there yet
    store.push(JOB, "w1", 0, 1.0, randn(2))
    waiter.join(timeout=10)
    assert [v for v, _ in got] == [1]
    assert_equal(dict(got[0][1]), values(store))


@pytest.mark.parametrize(
    "settings, per_element, extra",
    [
        (SGD, 0, 0),  # plain SGD keeps no state
        (OptimizerSettings(kind="sgd", lr=0.1, momentum=0.9), 4, 0),  # momentum buffer
        (ADAMW, 8, 4),  # exp_avg + exp_avg_sq (fp32), and a scalar fp32 step
    ],
    ids=["sgd", "momentum", "adamw"],
)
def test_optimizer_state_bytes_per_shard(settings: OptimizerSettings, per_element, extra):
    store = new_store(settings)
    assert store.shard_state_bytes(JOB) == {s.shard_id: 0 for s in SHARDS}  # before a step
    step(store, 1)

    # What is held: AdamW's moments at the fused kernel's padded size (`UpdateRule.align`).
    align = OPTIMIZERS[settings.kind].align
    want = {s.shard_id: -(-s.numel // align) * align * per_element + extra for s in SHARDS}
    assert store.shard_state_bytes(JOB) == want
    for s in SHARDS:
        assert store.shard(JOB, s.shard_id)[3] == want[s.shard_id]
    assert store.optimizer_state_bytes() == sum(want.values())


def test_a_worker_joining_mid_step_counts_from_join_at() -> None:
    store = new_store(members=("w0", "w1"))
    store.push(JOB, "w0", 0, 1.0, filled(1.0))
    assert store.set_members(JOB, ["w0", "w1", "j"], join_at=1) == (0, False)
    with pytest.raises(FailedPrecondition):  # not a member for step 0
        store.push(JOB, "j", 0, 1.0, filled(5.0))
    assert store.push(JOB, "w1", 0, 1.0, filled(3.0)).applied  # step 0 without the joiner
    result = store.push(JOB, "w0", 1, 1.0, filled(1.0))
    assert (result.version, result.applied, result.pending) == (1, False, 2)


def test_a_join_at_a_version_already_made_changes_nothing() -> None:
    store = new_store(members=("w0", "w1"))
    for step in (0, 1):
        store.push(JOB, "w0", step, 1.0, filled(1.0))
        store.push(JOB, "w1", step, 1.0, filled(1.0))
    store.push(JOB, "w0", 2, 1.0, filled(1.0))  # version 2, w0's push pending
    before = store.describe(JOB), store.history(JOB), values(store)
    with pytest.raises(FailedPrecondition):
        store.set_members(JOB, ["w0", "w1", "j"], discard_pending=True, join_at=1)
    with pytest.raises(FailedPrecondition):
        store.set_members(JOB, ["w1"], join_at=1)  # would complete the step: still refused
    after = store.describe(JOB), store.history(JOB), values(store)
    assert before[:2] == after[:2] and before[0][4] == ["w0"]
    assert_equal(before[2], after[2])
    assert store.set_members(JOB, ["w0", "w1", "j"], join_at=2) == (2, False)  # now is fine


# -- encoded pulls -------------------------------------------------------------------------


def test_pulls_of_one_version_share_one_encoding_until_the_next_push() -> None:
    store = new_store(members=("w0", "w1"))
    calls: list[tuple[str, int]] = []

    def encode(sid: str, v: int, t: torch.Tensor) -> bytes:
        calls.append((sid, v))
        return t.numpy().tobytes()

    def pull() -> list[bytes]:
        return store.pull_encoded(JOB, 0, [], 0, key="f32", encode=encode)[1]

    first, second = pull(), pull()
    assert [b is c for b, c in zip(first, second, strict=True)] == [True] * len(SHARDS)
    assert calls == [(s.shard_id, 0) for s in SHARDS]  # once per shard, not per pull
    assert first == [t.numpy().tobytes() for _, t in randn(0)]
    # Another key (wire dtype) is its own encoding.
    store.pull_encoded(JOB, 0, [SHARDS[0].shard_id], 0, key="bf16", encode=encode)
    assert len(calls) == len(SHARDS) + 1
    # A push beginning for another step leaves it; one for the pending step lets it go.
    store.pushing(JOB, 1)
    store.pushing("another-job", 0)
    pull()
    assert len(calls) == len(SHARDS) + 1
    store.pushing(JOB, 0)
    calls.clear()
    pull()
    assert calls == [(s.shard_id, 0) for s in SHARDS]
    # So does an accepted push (a caller that did not say `pushing`); the version is still 0.
    store.push(JOB, "w0", 0, 1.0, randn(1))
    calls.clear()
    pull()
    assert calls == [(s.shard_id, 0) for s in SHARDS]
    # The step is made: the next pull encodes the new values at version 1.
    store.push(JOB, "w1", 0, 1.0, randn(2))
    calls.clear()
    after = pull()
    assert calls == [(s.shard_id, 1) for s in SHARDS]
    assert after == [t.numpy().tobytes() for _, t in values(store).items()]


def test_a_push_hands_its_gradients_to_the_store() -> None:
    store = new_store()
    grads = randn(1)
    store.push(JOB, "w0", 0, 1.0, grads)
    assert grads == []  # the store holds the only references: freed as they are summed


# -- compressed pushes ---------------------------------------------------------------------

COMPRESSED = [Compression("int8", chunk=4), Compression("topk", ratio=0.3)]


def compressed(seed: int, c: Compression) -> list[tuple[str, torch.Tensor | Encoded]]:
    return [(sid, encode(g, c, torch.bfloat16)) for sid, g in randn(seed)]


def decoded(grads: list[tuple[str, torch.Tensor | Encoded]]) -> list[tuple[str, torch.Tensor]]:
    return [(sid, g if isinstance(g, torch.Tensor) else g.decode()) for sid, g in grads]


@pytest.mark.parametrize("c", COMPRESSED, ids=lambda c: c.spec)
@pytest.mark.parametrize("settings", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_a_compressed_push_applies_its_decoded_values_exactly(
    c: Compression, settings: OptimizerSettings
) -> None:
    """Two workers, one pushing compressed and one dense, for three steps; a second store
    gets the decoded values pushed dense: bit-identical parameters and history."""
    store, reference = new_store(settings, ("w0", "w1")), new_store(settings, ("w0", "w1"))
    for t in range(3):
        sent = compressed(10 + t, c)
        want = decoded(sent)
        for s, grads in ((store, sent), (reference, want)):
            s.push(JOB, "w1", t, 1.0, randn(20 + t))
            assert s.push(JOB, "w0", t, 2.0, grads).applied
        assert sent == []  # taken, as a dense push's are
    assert version(store) == 3
    assert_equal(values(store), values(reference))
    assert store.history(JOB) == reference.history(JOB)


@pytest.mark.parametrize(
    ("shard", "make", "needle"),
    [
        (0, lambda n: encode(torch.ones(n + 1), Compression("int8")), "needs numel"),
        (1, lambda n: encode(torch.ones(n - 1), Compression("topk", ratio=0.5)), "needs numel"),
        (0, lambda n: encode(torch.full((n,), 1e20), Compression("int8")), "beyond"),
    ],
    ids=["int8-numel", "topk-numel", "int8-out-of-range"],
)
def test_a_bad_compressed_push_is_invalid_and_changes_nothing(
    shard: int, make: Callable[[int], Encoded], needle: str
) -> None:
    store = new_store(members=("w0", "w1"))
    store.push(JOB, "w1", 0, 1.0, randn(7))
    before = values(store)
    grads = compressed(3, Compression("int8"))
    grads[shard] = (grads[shard][0], make(SHARDS[shard].numel))
    with pytest.raises(InvalidArgument, match=needle):
        store.push(JOB, "w0", 0, 1.0, grads)
    assert (version(store), pushed(store)) == (0, ["w1"])
    assert_equal(values(store), before)
