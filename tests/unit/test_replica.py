"""The worker's replica hands each shard's gradient over while backward still runs."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lmps.core.model import GPT, GPTConfig, decay_mask
from lmps.core.partition import ParamInfo, plan_shards
from lmps.services.worker.replica import Replica

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def make_replica() -> Replica:
    with torch.device("meta"):
        infos = [
            ParamInfo(n, tuple(p.shape), decay_mask(n, p))
            for n, p in GPT(CONFIG).named_parameters()
        ]
    shards = plan_shards(infos, ["ps-0", "ps-1"], shard_bytes=1024)
    return Replica(CONFIG, shards, torch.device("cpu"))


def test_each_shard_is_handed_over_once_during_backward_with_its_final_gradient() -> None:
    replica = make_replica()
    batch = torch.randint(
        0, CONFIG.vocab_size, (4, CONFIG.block_size + 1), generator=torch.Generator().manual_seed(0)
    )
    handed: dict[str, torch.Tensor] = {}
    untouched_at_first: list[int] = []

    def on_grad(sid: str, grad: torch.Tensor) -> None:
        assert sid not in handed, f"{sid} handed over twice"
        if not handed:  # the first hand-over: backward has not reached some parameters yet
            untouched_at_first.append(
                sum(1 for p in replica.params.values() if p.grad is None or not p.grad.any())
            )
        handed[sid] = grad.clone()

    loss, grads = replica.train_step(batch, on_grad=on_grad)
    assert handed.keys() == grads.keys() == replica.shards.keys()
    for sid, g in grads.items():
        assert torch.equal(handed[sid], g), sid  # what was sent is what backward ended with
    assert untouched_at_first[0] > 0, "shards were handed over only after backward"
    # Without a sink: the same gradients.
    replica2 = make_replica()
    replica2.model.load_state_dict(replica.model.state_dict())
    loss2, grads2 = replica2.train_step(batch)
    assert loss2 == loss
    for sid in grads:
        assert torch.equal(grads2[sid], grads[sid]), sid


class LazyPull:
    """Arrivals that load a shard only when forward first waits for it (a pull whose shards
    all arrive just in time), recording the order of the waits."""

    def __init__(self, replica: Replica, values: dict[str, torch.Tensor]) -> None:
        self.replica, self.values = replica, values
        self.waits: list[tuple[str, ...]] = []
        self.loaded: set[str] = set()

    def wait(self, shard_ids: Iterable[str]) -> None:
        ids = tuple(shard_ids)
        self.waits.append(ids)
        for sid in ids:
            if sid not in self.loaded:
                self.replica.load_one(sid, self.values[sid])
                self.loaded.add(sid)


def _values(replica: Replica, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {sid: torch.randn(s.numel, generator=gen) * 0.1 for sid, s in replica.shards.items()}


def test_forward_waits_layer_by_layer_and_computes_what_a_whole_load_does() -> None:
    batch = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.block_size + 1))
    whole, streamed = make_replica(), make_replica()
    values = _values(whole, 1)
    whole.load(values)
    loss_w, grads_w = whole.train_step(batch)
    # Garbage in the streamed replica's parameters: only what the pull loads may be used.
    streamed.load({sid: torch.full_like(v, float("nan")) for sid, v in values.items()})
    pull = LazyPull(streamed, values)
    loss_s, grads_s = streamed.train_step(batch, arrivals=pull)
    assert loss_s == loss_w
    for sid in grads_w:
        assert torch.equal(grads_s[sid], grads_w[sid]), sid
    # Every shard was waited for, the embeddings first, then block 0 before block 1.
    assert pull.loaded == set(values)
    first = {streamed.shards[sid].param for sid in pull.waits[0]}
    assert first <= {"transformer.wte.weight", "transformer.wpe.weight"}
    order = [streamed.shards[ids[0]].param for ids in pull.waits]
    h0 = max(i for i, p in enumerate(order) if p.startswith("transformer.h.0."))
    h1 = min(i for i, p in enumerate(order) if p.startswith("transformer.h.1."))
    assert h0 < h1
    # A later step without arrivals waits for nothing.
    pull.waits.clear()
    streamed.train_step(batch)
    assert pull.waits == []


def test_a_failed_pull_fails_the_step_before_it_uses_missing_shards() -> None:
    replica = make_replica()

    class Broken:
        def wait(self, shard_ids: Iterable[str]) -> None:
            raise RuntimeError("server ps-1 went away")

    batch = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.block_size + 1))
    handed: list[str] = []
    try:
        replica.train_step(batch, on_grad=lambda sid, g: handed.append(sid), arrivals=Broken())
    except RuntimeError as err:
        assert "went away" in str(err)
    else:
        raise AssertionError("the step ran without its parameters")
    assert handed == []  # nothing reached the push
    replica.train_step(batch)  # and the replica is usable for the next step
