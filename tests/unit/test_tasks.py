"""The tasks (lm, classify, sft): layouts, losses, evaluation, gradient accumulation, bf16
autocast, a frozen backbone, and parity of two workers and two parameter stores with one
torch process on the union batch. Pure torch, in process, seconds long."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmps.core import tasks
from lmps.core.model import GPT, GPTConfig, init_model
from lmps.core.optim import OptimizerSettings, lr_at
from lmps.core.partition import ParamInfo, Shard, assemble, plan_shards, shard_view
from lmps.core.tasks import IGNORE, TASKS, EvalCounts, classification_metrics
from lmps.services.parameter_server.store import ParameterStore
from lmps.services.worker.replica import Replica

LM = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
CLS = dataclasses.replace(LM, num_labels=3)
SERVERS = ("ps-0", "ps-1")
WORKERS = ("w0", "w1")
JOB = "job-tasks"
SEED = 5


def classify_rows(n: int, config: GPTConfig, seed: int = 0) -> torch.Tensor:
    """n random examples whose label is a function of their first token (learnable)."""
    g = torch.Generator().manual_seed(seed)
    width = config.block_size + 1
    rows = torch.zeros(n, width, dtype=torch.int32)
    lengths = torch.randint(1, config.block_size, (n,), generator=g)
    for i in range(n):
        ids = torch.randint(1, config.vocab_size, (int(lengths[i]),), generator=g)
        rows[i, 0] = int(ids[0]) % config.num_labels
        rows[i, 1] = int(lengths[i])
        rows[i, 2 : 2 + int(lengths[i])] = ids
    return rows


def sft_rows(n: int, config: GPTConfig, seed: int = 0) -> torch.Tensor:
    """n rows: a prompt (no targets), a response (targets) of varying lengths, padding -1."""
    g = torch.Generator().manual_seed(seed)
    width = config.block_size + 1
    rows = torch.full((n, width), -1, dtype=torch.int32)
    for i in range(n):
        prompt = int(torch.randint(1, 6, (1,), generator=g))
        response = int(torch.randint(1, width - prompt, (1,), generator=g))
        ids = torch.randint(0, config.vocab_size, (prompt + response,), generator=g)
        rows[i, :prompt] = -ids[:prompt] - 1
        rows[i, prompt : prompt + response] = ids[prompt:]
    return rows


def lm_rows(n: int, config: GPTConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (n, config.block_size + 1), generator=g).int()


ROWS = {"lm": (LM, lm_rows), "classify": (CLS, classify_rows), "sft": (LM, sft_rows)}


# -- layouts and losses --------------------------------------------------------------------


def test_classify_pooling_ignores_padding() -> None:
    for pooling in ("last", "mean"):
        config = dataclasses.replace(CLS, pooling=pooling)
        model = init_model(config, SEED).eval()
        ids = torch.randint(0, config.vocab_size, (1, 5))
        alone = model.classify(ids, torch.tensor([5]))
        padded = torch.cat([ids, torch.randint(0, config.vocab_size, (1, 7))], dim=1)
        torch.testing.assert_close(model.classify(padded, torch.tensor([5])), alone)
        h = model.hidden(ids)
        hidden = h[:, -1] if pooling == "last" else h.mean(1)
        assert model.score is not None
        torch.testing.assert_close(alone, model.score(hidden))


def test_classify_loss_and_eval() -> None:
    model = init_model(CLS, SEED)
    rows = classify_rows(9, CLS)
    task = TASKS["classify"]
    task.check(rows, CLS)
    logits = torch.stack(
        [model.classify(r[2 : 2 + int(r[1])][None].long(), r[1:2]) for r in rows]
    ).squeeze(1)
    expected = F.cross_entropy(logits, rows[:, 0].long())
    torch.testing.assert_close(task.loss(model, rows), expected)
    counts = task.evaluate(model, rows)
    assert counts.count == 9 and counts.confusion is not None
    assert int(counts.confusion.sum()) == 9
    for true, pred in zip(rows[:, 0].tolist(), logits.argmax(1).tolist(), strict=True):
        assert counts.confusion[true, pred] >= 1
    torch.testing.assert_close(counts.loss_sum, float(expected.detach()) * 9, rtol=1e-5, atol=1e-5)


def test_classification_metrics() -> None:
    # true 0: 3 right, 1 as class 1; true 1: 2 right; class 2 never seen nor predicted.
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    accuracy, f1 = classification_metrics(confusion)
    assert accuracy == pytest.approx(5 / 6)
    f1_0, f1_1 = 2 * 3 / (2 * 3 + 0 + 1), 2 * 2 / (2 * 2 + 1 + 0)
    assert f1 == pytest.approx((f1_0 + f1_1) / 2)
    assert classification_metrics(torch.zeros(2, 2, dtype=torch.long)) == (0.0, 0.0)


def test_sft_loss_counts_targets_only() -> None:
    model = init_model(LM, SEED)
    rows = sft_rows(6, LM)
    task = TASKS["sft"]
    task.check(rows, LM)
    x, y = tasks.InstructionTuning.split(rows)
    ids = torch.where(rows < 0, -rows - 1, rows).long()
    assert torch.equal(x, ids[:, :-1])
    assert torch.equal(y == IGNORE, rows[:, 1:] < 0)
    logits, _ = model(x)
    keep = y != IGNORE
    expected = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(task.loss(model, rows), expected)
    assert task.units(rows) == int(keep.sum())
    # Changing a prompt token's target-ness changes nothing but its own loss term.
    counts = task.evaluate(model, rows)
    assert counts.count == int(keep.sum())


@pytest.mark.parametrize(
    ("task", "bad", "match"),
    [
        ("classify", lambda r: r.__setitem__((0, 0), 3), "labels outside"),
        ("classify", lambda r: r.__setitem__((0, 1), 0), "lengths outside"),
        ("classify", lambda r: r.__setitem__((0, 2), 64), "token ids outside"),
        ("sft", lambda r: r.__setitem__((0, 3), 64), "values outside"),
        ("sft", lambda r: r[0, 1:].fill_(-1), "no target token"),
        ("lm", lambda r: r.__setitem__((0, 0), -1), "token ids outside"),
    ],
)
def test_bad_rows_are_refused(task: str, bad: object, match: str) -> None:
    config, make = ROWS[task]
    rows = make(4, config)
    bad(rows)  # type: ignore[operator]
    with pytest.raises(ValueError, match=match):
        TASKS[task].check(rows, config)


def test_rows_from_a_stream() -> None:
    rows = classify_rows(4, CLS)
    torch.testing.assert_close(TASKS["classify"].rows(rows.flatten(), CLS), rows)
    with pytest.raises(ValueError, match="whole rows of block_size"):
        TASKS["classify"].rows(rows.flatten()[:-1], CLS)
    with pytest.raises(ValueError, match="classification head"):
        TASKS["classify"].check(rows, LM)


# -- the replica: micro-batches, autocast, frozen backbone ---------------------------------


def shards_of(model: GPT, freeze_backbone: bool = False) -> list[Shard]:
    decays = tasks.decay_rule(freeze_backbone)
    infos = [ParamInfo(n, tuple(p.shape), decays(n, p)) for n, p in model.named_parameters()]
    return plan_shards(infos, SERVERS, shard_bytes=2048)


def replica(task: str, config: GPTConfig, **options: object) -> Replica:
    model = init_model(config, SEED)
    r = Replica(
        config,
        shards_of(model, bool(options.get("freeze_backbone"))),
        torch.device("cpu"),
        task=task,  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )
    r.load(
        {
            s: shard_view(dict(model.named_parameters())[r.shards[s].param].detach(), r.shards[s])
            for s in r.shards
        }
    )
    return r


@pytest.mark.parametrize("task", sorted(TASKS))
def test_micro_batches_give_the_whole_batch_gradient(task: str) -> None:
    config, make = ROWS[task]
    rows = make(8, config, seed=3)
    whole = replica(task, config)
    loss, grads = whole.train_step(rows)
    parts = replica(task, config, micro_batches=4)
    got: dict[str, torch.Tensor] = {}
    loss4, grads4 = parts.train_step(rows, on_grad=lambda sid, g: got.__setitem__(sid, g.clone()))
    assert loss4 == pytest.approx(loss, rel=1e-5)
    assert got.keys() == grads.keys()  # every shard handed over once, after the last slice
    for sid in grads:
        torch.testing.assert_close(grads4[sid], grads[sid], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[sid], grads[sid], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32() -> None:
    rows = lm_rows(8, LM, seed=4)
    loss32, grads32 = replica("lm", LM).train_step(rows)
    r16 = replica("lm", LM, autocast=torch.bfloat16)
    loss16, grads16 = r16.train_step(rows)
    assert all(g.dtype == torch.float32 for g in grads16.values())  # fp32 grads to the servers
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[s].flatten() for s in grads32])
    assert float(F.cosine_similarity(flat32, flat16, dim=0)) > 0.99
    assert not torch.equal(flat32, flat16)  # it did run in bf16


def test_frozen_backbone_pushes_zeros_and_the_servers_keep_it() -> None:
    rows = classify_rows(8, CLS, seed=2)
    r = replica("classify", CLS, freeze_backbone=True)
    _, grads = r.train_step(rows)
    for sid, g in grads.items():
        head = r.shards[sid].param.startswith(tasks.HEAD)
        assert bool(g.abs().sum() > 0) == head, sid
    # Servers: zero gradients and no decay leave the frozen shards bit for bit as they were,
    # with SGD momentum and with AdamW (and decay on for the head).
    model = init_model(CLS, SEED)
    shards = shards_of(model, freeze_backbone=True)
    assert all(not s.weight_decay for s in shards if not s.param.startswith(tasks.HEAD))
    for settings in (
        OptimizerSettings(kind="sgd", lr=0.1, momentum=0.9, weight_decay=0.1, total_steps=9),
        OptimizerSettings(kind="adamw", lr=0.01, weight_decay=0.1, total_steps=9),
    ):
        values, _ = train_two_workers("classify", CLS, settings, shards, freeze_backbone=True)
        init = dict(model.named_parameters())
        for name, value in values.items():
            if name.startswith(tasks.HEAD):
                assert not torch.equal(value, init[name].detach())
            else:
                assert torch.equal(value, init[name].detach()), name


# -- two workers, two stores vs one process --------------------------------------------------


def train_two_workers(
    task: str,
    config: GPTConfig,
    settings: OptimizerSettings,
    shards: list[Shard],
    steps: int = 4,
    freeze_backbone: bool = False,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """`steps` SYNC steps; worker k gets rows of different sizes each step. Returns the
    trained parameters and each step's union batch."""
    _, make = ROWS[task]
    model = init_model(config, SEED)
    params = dict(model.named_parameters())
    stores = {sid: ParameterStore(sid) for sid in SERVERS}
    for sid, store in stores.items():
        mine = [s for s in shards if s.server_id == sid]
        values = [(s.shard_id, shard_view(params[s.param].detach(), s).clone()) for s in mine]
        store.load(JOB, settings, mine, values, WORKERS)
    replicas = {
        w: Replica(
            config,
            shards,
            torch.device("cpu"),
            task=task,  # type: ignore[arg-type]
            freeze_backbone=freeze_backbone,
        )
        for w in WORKERS
    }
    unions = []
    for step in range(steps):
        batches = {"w0": make(4, config, seed=10 * step), "w1": make(2, config, seed=10 * step + 1)}
        unions.append(torch.cat([batches["w0"], batches["w1"]]))
        for w, rep in replicas.items():
            pulled: dict[str, torch.Tensor] = {}
            for store in stores.values():
                version, got = store.pull(JOB, step, [], timeout_s=5)
                assert version == step
                pulled.update(got)
            rep.load(pulled)
            _, grads = rep.train_step(batches[w])
            for sid, store in stores.items():
                part = [
                    (s.shard_id, grads[s.shard_id].clone()) for s in shards if s.server_id == sid
                ]
                store.push(JOB, w, step, rep.task.weight(batches[w]), part)
    trained: dict[str, torch.Tensor] = {}
    for store in stores.values():
        version, part = store.pull(JOB, steps, [], timeout_s=5)
        trained.update(part)
    return assemble(shards, trained), unions


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_two_workers_match_one_process_on_the_union_batch(task: str) -> None:
    config, _ = ROWS[task]
    # eps 1e-5, not 1e-8: the classifier's attention key biases get gradients of rounding
    # noise only (softmax is shift-invariant), which AdamW with a tiny eps blows up to
    # full-size steps of random sign, in the reference as in the cluster.
    settings = OptimizerSettings(kind="adamw", lr=3e-3, weight_decay=0.1, eps=1e-5, total_steps=4)
    model = init_model(config, SEED)
    shards = shards_of(model)
    trained, unions = train_two_workers(task, config, settings, shards)
    decays = tasks.decay_rule(False)
    named = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": 0.1},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        foreach=False,
    )
    for step, union in enumerate(unions):
        opt.zero_grad()
        TASKS[task].loss(model, union).backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, step)
        opt.step()
    init = dict(init_model(config, SEED).named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(trained[n], p.detach(), msg=lambda m, n=n: f"{task} {n}: {m}")  # type: ignore[misc]
    assert (
        max(float((init[n] - p).detach().abs().max()) for n, p in model.named_parameters()) > 1e-3
    )


def test_eval_counts_add_up() -> None:
    a = EvalCounts(1.0, 2, torch.tensor([[1, 0], [0, 1]]))
    b = EvalCounts(2.0, 1, torch.tensor([[0, 1], [0, 0]]))
    total = a.plus(b)
    assert (total.loss_sum, total.count) == (3.0, 3)
    assert total.confusion is not None and total.confusion.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError):
        a.plus(EvalCounts(0.0, 1))
