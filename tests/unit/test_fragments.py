"""Streaming fragments (Streaming DiLoCo) in one process: two worker `Trainer`s with a
`StreamingLoop` each and two `ParameterStore`s, against single-process torch running the
same algorithm, bit for bit; and the stores' fragment rules on their own.

The reference keeps one model per worker with its own torch AdamW (fused, state carried
over), the global parameters as one flat fp32 tensor per shard with torch SGD (Nesterov)
over them as the outer optimizer (a shard without a gradient is skipped, as the servers'
partial step does), and per worker the global values it last took and the sequences it
trained since each fragment's last sync. Which batches each worker trained at each version
is read back from the step events; the flushes follow from the leases (F - 1 after each
lease's last window). Seconds long.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import pytest
import torch

from lmps.core.errors import InvalidArgument
from lmps.core.model import GPT, GPTConfig, init_model
from lmps.core.optim import OptimizerSettings, lr_at
from lmps.core.partition import Shard, assemble, assign_fragments, shard_view
from lmps.services.parameter_server.store import ParameterStore
from lmps.services.worker.fragments import StreamingLoop
from lmps.services.worker.local_steps import InnerLoop
from lmps.services.worker.replica import Replica
from lmps.services.worker.trainer import StepResult
from tests.unit.test_inprocess_parity import (
    BATCH,
    CONFIG,
    JOB,
    SEED,
    SERVERS,
    WORKERS,
    initial_shards,
    loaded_stores,
)
from tests.unit.test_local_steps import (
    EPOCHS,
    INNER,
    LEASE,
    OUTER,
    SHARDS,
    Book,
    _sequences,
    _torch_optimizer,
    inner_step,
    train_epochs,
)
from tests.unit.test_local_steps import Event as RoundEvent


def fragmented(fragments: int) -> tuple[list[Shard], dict[str, torch.Tensor]]:
    shards, values = initial_shards(init_model(CONFIG, SEED))
    return assign_fragments(shards, fragments), values


def train(
    h: int, fragments: int, sequences: torch.Tensor, overlap: bool = False
) -> tuple[list[StepResult], dict[str, torch.Tensor], Book, list[Shard], dict[str, ParameterStore]]:
    shards, values = fragmented(fragments)
    stores = loaded_stores(OUTER, shards, values, WORKERS, fragments=fragments)
    book = Book(stores, sequences)
    decay = {s.shard_id: s.weight_decay for s in shards}
    fragment_of = {s.shard_id: s.fragment for s in shards}

    def loops(replica: Replica) -> dict[str, Any]:
        inner = InnerLoop(replica, h, INNER, decay)
        streaming = StreamingLoop(inner, fragment_of, fragments, overlap=overlap)
        return {"local": inner, "streaming": streaming}

    results, trained, _ = train_epochs(shards, stores, book, loops)
    return results, trained, book, shards, stores


class Event(RoundEvent, Protocol):
    """What the reference reads of a batch: a round's event and its lease."""

    @property
    def lease_id(self) -> str: ...


def schedules(
    results: Sequence[Event], fragments: int
) -> dict[str, dict[int, tuple[int, list[Event]]]]:
    """Per worker: version -> (epoch, the batches of its window there; [] for a flush). A
    lease id starts with its epoch, `e<epoch>-`."""
    out: dict[str, dict[int, tuple[int, list[Event]]]] = defaultdict(dict)
    by_lease: dict[tuple[str, str], list[Event]] = defaultdict(list)
    for r in results:
        by_lease[(r.worker_id, r.lease_id)].append(r)
    for (w, lease_id), rs in by_lease.items():
        epoch = int(lease_id.split("-")[0][1:])
        for r in rs:
            out[w].setdefault(r.step, (epoch, []))[1].append(r)
        last = max(r.step for r in rs)
        for i in range(1, fragments):
            assert last + i not in out[w], "a flush where a window is"
            out[w][last + i] = (epoch, [])
    return out


def streaming_reference(
    config: GPTConfig,
    shards: Sequence[Shard],
    h: int,
    fragments: int,
    inner: OptimizerSettings,
    outer: OptimizerSettings,
    results: Sequence[Any],
    tokens_of: Callable[[Any], torch.Tensor],
    overlap: bool = False,
) -> dict[str, torch.Tensor]:
    """Streaming DiLoCo in one process on the windows a run made (`results`: `Event`s, one
    per batch): the final global value of every shard. `overlap`: a window's sync is taken
    after the next window trained, rebased (new global + what trained since the push)."""
    window = h // fragments
    init = dict(init_model(config, SEED).named_parameters())
    global_ = {s.shard_id: shard_view(init[s.param].detach(), s).clone() for s in shards}
    decayed = {s.shard_id: s.weight_decay for s in shards}
    outer_params = {sid: torch.nn.Parameter(v) for sid, v in global_.items()}
    groups: list[dict[str, Any]] = [
        {
            "params": [p for sid, p in outer_params.items() if decayed[sid]],
            "weight_decay": outer.weight_decay,
        },
        {"params": [p for sid, p in outer_params.items() if not decayed[sid]], "weight_decay": 0.0},
    ]
    outer_opt = torch.optim.SGD(
        groups, lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov, foreach=False
    )
    of = {s.shard_id: s for s in shards}
    members = {f: [s.shard_id for s in shards if s.fragment == f] for f in range(fragments)}
    plan = schedules(results, fragments)
    models: dict[str, GPT] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    taken: dict[str, dict[str, torch.Tensor]] = {}  # worker -> the global values it holds
    since: dict[str, list[float]] = {}
    epoch_of: dict[str, int] = {}
    at_push: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # overlap
    unsettled: dict[str, dict[str, torch.Tensor]] = {}  # overlap: worker -> a sync's values

    def settle(w: str, new: Mapping[str, torch.Tensor]) -> None:
        if overlap:
            drift = {sid: local_slice(w, sid) - at_push[w].pop(sid) for sid in new}
            set_local(w, {sid: v + drift[sid] for sid, v in new.items()})
        else:
            set_local(w, new)
        taken[w].update({sid: t.clone() for sid, t in new.items()})

    def local_slice(w: str, sid: str) -> torch.Tensor:
        s = of[sid]
        return shard_view(dict(models[w].named_parameters())[s.param].detach(), s)

    def set_local(w: str, values: Mapping[str, torch.Tensor]) -> None:
        params = dict(models[w].named_parameters())
        with torch.no_grad():
            for sid, v in values.items():
                s = of[sid]
                params[s.param].view(-1)[s.start : s.start + s.numel].copy_(v)

    versions = sorted({v for sched in plan.values() for v in sched})

    def last_window(w: str, v: int) -> bool:
        """Whether w's window at v is its lease's last (a flush follows, or nothing)."""
        nxt = plan[w].get(v + 1)
        return nxt is None or not nxt[1]

    for v in versions:
        f = v % fragments
        pushers = sorted(w for w in plan if v in plan[w])
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        weights: dict[str, float] = {}
        for w in pushers:
            epoch, batches = plan[w][v]
            if w not in models:
                models[w] = init_model(config, SEED)
                opts[w] = _torch_optimizer(models[w], inner)
            if epoch_of.get(w) != epoch:  # an epoch starts from a full pull
                epoch_of[w] = epoch
                set_local(w, {sid: outer_params[sid].detach() for sid in global_})
                taken[w] = {sid: outer_params[sid].detach().clone() for sid in global_}
                since[w] = [0.0] * fragments
            model, opt = models[w], opts[w]
            model.train()
            for k, r in enumerate(sorted(batches, key=lambda r: r.batch_index)):
                inner_step(model, opt, tokens_of(r), lr_at(inner, v * window + k))
            trained = sum(tokens_of(r).shape[0] for r in batches)
            since[w] = [x + trained for x in since[w]]
            if w in unsettled:  # overlap: the last window's sync, after this window trained
                settle(w, unsettled.pop(w))
            deltas[w] = {sid: taken[w][sid] - local_slice(w, sid) for sid in members[f]}
            if overlap:
                at_push[w].update({sid: local_slice(w, sid).clone() for sid in members[f]})
            weights[w] = since[w][f]
            since[w][f] = 0.0
        total = sum(weights[w] for w in pushers)
        outer_opt.zero_grad(set_to_none=True)
        for sid in members[f]:
            acc = torch.zeros(of[sid].numel, dtype=torch.float64)
            for w in pushers:
                acc.add_(deltas[w][sid], alpha=weights[w])
            outer_params[sid].grad = acc.div_(total).to(torch.float32)
        for group in outer_opt.param_groups:
            group["lr"] = lr_at(outer, v // fragments)
        outer_opt.step()
        new = {sid: outer_params[sid].detach().clone() for sid in members[f]}
        for w in pushers:
            if overlap and plan[w][v][1] and not last_window(w, v):
                unsettled[w] = new  # settled after the next window trained
            else:
                settle(w, new)
    return {sid: p.detach() for sid, p in outer_params.items()}


@pytest.mark.parametrize(
    ("h", "fragments", "overlap"), [(4, 2, False), (6, 3, False), (6, 3, True)]
)
def test_streaming_fragments_match_single_process_streaming_diloco(
    h: int, fragments: int, overlap: bool
) -> None:
    sequences = _sequences()
    results, trained, book, shards, stores = train(h, fragments, sequences, overlap)
    window = h // fragments

    # Every batch trained once; each lease is its windows of K batches, then F - 1 flushes.
    assert len(results) == EPOCHS * SHARDS * LEASE
    assert len({(r.lease_id, r.batch_index) for r in results}) == len(results)
    per_lease: dict[str, set[int]] = defaultdict(set)
    for r in results:
        per_lease[r.lease_id].add(r.step)
    windows = -(-LEASE // window)
    for steps in per_lease.values():
        assert len(steps) == windows and max(steps) - min(steps) == windows - 1
    # w0 holds 3 leases an epoch, each windows + F - 1 versions; w1 runs dry first.
    versions = EPOCHS * 3 * (windows + fragments - 1)
    for store in stores.values():
        assert store.pull(JOB, 0, [], timeout_s=0)[0] == versions

    def tokens_of(r: StepResult) -> torch.Tensor:
        return book.rows[r.lease_id][r.batch_index * BATCH : (r.batch_index + 1) * BATCH]

    expected = streaming_reference(
        CONFIG, shards, h, fragments, INNER, OUTER, results, tokens_of, overlap
    )
    init = dict(init_model(CONFIG, SEED).named_parameters())
    moved = 0.0
    for s in shards:
        # Bit for bit: the same kernels on the same values in the same order.
        torch.testing.assert_close(
            trained[s.shard_id], expected[s.shard_id], rtol=0, atol=0, msg=f"{s.shard_id} differs"
        )
        moved = max(
            moved, float((shard_view(init[s.param].detach(), s) - expected[s.shard_id]).abs().max())
        )
    assert moved > 1e-2, "training did not move the parameters"
    assemble(shards, trained)  # every shard of every parameter came back
    print(f"\nstreaming H={h} F={fragments}: {versions} versions, moved {moved:.3e}")


ADAMW_OUTER = OptimizerSettings(kind="adamw", lr=1e-2, weight_decay=0.1, total_steps=10)


def one_store(fragments: int) -> tuple[ParameterStore, list[Shard]]:
    shards, values = fragmented(fragments)
    mine = [s for s in shards if s.server_id == SERVERS[0]]
    store = ParameterStore(SERVERS[0])
    store.load(
        JOB,
        ADAMW_OUTER,
        mine,
        [(s.shard_id, values[s.shard_id]) for s in mine],
        ["w0"],
        fragments=fragments,
    )
    return store, mine


def test_each_shard_syncs_exactly_once_per_round_at_the_rounds_lr() -> None:
    fragments = 3
    store, mine = one_store(fragments)
    assert {s.fragment for s in mine} == set(range(fragments))
    before = dict(store.pull(JOB, 0, [], timeout_s=0)[1])
    changed: dict[str, list[int]] = defaultdict(list)
    rounds = 2
    for v in range(rounds * fragments):
        part = [(s.shard_id, torch.ones(s.numel)) for s in mine if s.fragment == v % fragments]
        result = store.push(JOB, "w0", v, 4.0, part)
        assert result.applied and result.version == v + 1
        now = dict(store.pull(JOB, v + 1, [], timeout_s=0)[1])
        for sid, t in now.items():
            if not torch.equal(t, before[sid]):
                changed[sid].append(v)
        before = now
    # Each shard moved at exactly the versions of its fragment, once per round of F.
    for s in mine:
        assert changed[s.shard_id] == [s.fragment + r * fragments for r in range(rounds)]
    # And its AdamW took one step per round: the step count is the round's (lr at v // F).
    state = store.snapshot(JOB, rounds * fragments, timeout_s=0).state
    for s in mine:
        assert int(state[s.shard_id]["step"]) == rounds


@pytest.mark.parametrize(
    ("pick", "match"),
    [
        (lambda s: s.fragment == 1, "is in fragment 1; step 0 syncs fragment 0 of 2"),
        (lambda s: True, "is in fragment 1; step 0 syncs fragment 0 of 2"),
        (lambda s: s.fragment == 0 and not s.shard_id.endswith("#0"), "missing shards"),
    ],
)
def test_a_push_outside_its_steps_fragment_is_refused_changing_nothing(
    pick: Callable[[Shard], bool], match: str
) -> None:
    store, mine = one_store(2)
    if not any(s.fragment == 0 and not pick(s) for s in mine) and "missing" in match:
        pytest.skip("every fragment-0 shard is an #0")
    before = dict(store.pull(JOB, 0, [], timeout_s=0)[1])
    with pytest.raises(InvalidArgument, match=match):
        store.push(JOB, "w0", 0, 4.0, [(s.shard_id, torch.ones(s.numel)) for s in mine if pick(s)])
    version, after = store.pull(JOB, 0, [], timeout_s=0)
    assert version == 0
    assert all(torch.equal(t, before[sid]) for sid, t in after)
    # The right push still goes through.
    ok = [(s.shard_id, torch.ones(s.numel)) for s in mine if s.fragment == 0]
    assert store.push(JOB, "w0", 0, 4.0, ok).applied


@pytest.mark.parametrize(
    ("load", "match"),
    [
        ({"consistency": "async"}, "sync one fragment per SYNC step"),
        ({"consistency": "bounded_staleness", "max_staleness": 1}, "max_staleness 1"),
        ({"max_grad_norm": 1.0}, "max_grad_norm 1"),
        ({"fragments": 1}, "not below fragments 1"),
    ],
)
def test_a_load_the_fragments_do_not_fit_is_refused(load: dict[str, object], match: str) -> None:
    shards, values = fragmented(2)
    mine = [s for s in shards if s.server_id == SERVERS[0]]
    store = ParameterStore(SERVERS[0])
    kwargs: dict[str, Any] = {"fragments": 2, **load}
    with pytest.raises(InvalidArgument, match=match):
        store.load(
            JOB, OUTER, mine, [(s.shard_id, values[s.shard_id]) for s in mine], ["w0"], **kwargs
        )


def test_a_streaming_loop_refuses_what_does_not_divide() -> None:
    shards, _ = fragmented(2)
    replica = Replica(CONFIG, shards, torch.device("cpu"))
    inner = InnerLoop(replica, 4, INNER, {s.shard_id: s.weight_decay for s in shards})
    fragment_of = {s.shard_id: s.fragment for s in shards}
    with pytest.raises(ValueError, match="must be >= 2 and divide H 4"):
        StreamingLoop(inner, fragment_of, 3)
    with pytest.raises(ValueError, match="outside"):
        StreamingLoop(inner, {**fragment_of, shards[0].shard_id: 2}, 2)
    loop = StreamingLoop(inner, fragment_of, 2)
    with pytest.raises(RuntimeError, match="reset"):
        loop.train(0, [torch.zeros(BATCH, CONFIG.block_size + 1, dtype=torch.int64)], 4.0)
    assert replace(shards[0], fragment=1).fragment == 1
