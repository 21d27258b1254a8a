"""The worker's replica hands each shard's gradient over while backward still runs."""

from __future__ import annotations

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
