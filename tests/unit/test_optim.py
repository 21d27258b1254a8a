"""The server-side update rule against torch.optim on the full, unsharded tensors."""

from __future__ import annotations

import itertools
import math
from typing import cast, get_args

import pytest
import torch

from lmps.core.optim import (
    DEFAULTS,
    FUSED_ALIGN,
    KINDS,
    OPTIMIZERS,
    SCHEDULE_NAMES,
    SCHEDULES,
    OptimizerKind,
    OptimizerRequest,
    OptimizerSettings,
    ScheduleName,
    ShardOptimizer,
    lr_at,
)
from lmps.core.partition import ParamInfo, Shard, assemble, plan_shards, shard_view
from lmps.rpc import codec
from lmps.v1 import job_pb2

SERVERS = ["ps-0", "ps-1"]
# Shapes of a small GPT: an embedding and a projection big enough to be split at 512-byte
# shards, plus 1-D biases / LayerNorm weights (no weight decay) and a scalar.
PARAMS = [
    ParamInfo("wte.weight", (40, 16), True),
    ParamInfo("h.0.attn.c_attn.weight", (16, 48), True),
    ParamInfo("h.0.attn.c_attn.bias", (48,), False),
    ParamInfo("ln_f.weight", (16,), False),
    ParamInfo("logit_scale", (), False),
]
SHARD_BYTES = 512
STEPS = 5


def by_server(shards: list[Shard]) -> dict[str, list[Shard]]:
    return {sid: [s for s in shards if s.server_id == sid] for sid in SERVERS}


def reference_run(
    settings: OptimizerSettings, init: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """torch.optim on the full tensors, with the same two param groups and lr schedule."""
    params = {name: t.clone() for name, t in init.items()}
    groups = [
        {
            "params": [params[p.name] for p in PARAMS if p.weight_decay],
            "weight_decay": settings.weight_decay,
        },
        {"params": [params[p.name] for p in PARAMS if not p.weight_decay], "weight_decay": 0.0},
    ]
    opt: torch.optim.Optimizer
    if settings.kind == "sgd":
        opt = torch.optim.SGD(
            groups,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            foreach=False,
        )
    else:
        opt = torch.optim.AdamW(
            groups,
            lr=settings.lr,
            betas=(settings.beta1, settings.beta2),
            eps=settings.eps,
            foreach=False,
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(settings, s) / settings.lr)
    for g in grads:
        for name, p in params.items():
            p.grad = g[name].clone()
        opt.step()
        sched.step()
    return params


def sharded_run(
    settings: OptimizerSettings, init: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """One ShardOptimizer per server, each seeing only its own slices."""
    shards = plan_shards(PARAMS, SERVERS, shard_bytes=SHARD_BYTES)
    servers = {
        server: ShardOptimizer(
            {s.shard_id: shard_view(init[s.param], s).clone() for s in owned},
            decay={s.shard_id: s.weight_decay for s in owned},
            settings=settings,
        )
        for server, owned in by_server(shards).items()
    }
    for step, g in enumerate(grads):
        for server, owned in by_server(shards).items():
            servers[server].step({s.shard_id: shard_view(g[s.param], s) for s in owned}, step)
    values = {sid: v for opt in servers.values() for sid, v in opt.values.items()}
    return assemble(shards, values)


def random_params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p.name: torch.randn(p.shape, generator=gen) for p in PARAMS}


def test_the_plan_splits_a_weight_across_both_servers():
    # The parity tests below only mean something if a 2-D weight really is cut in pieces
    # that live on different servers.
    shards = plan_shards(PARAMS, SERVERS, shard_bytes=SHARD_BYTES)
    attn = [s for s in shards if s.param == "h.0.attn.c_attn.weight"]
    assert len(attn) > 1
    assert {s.server_id for s in attn} == set(SERVERS)


@pytest.mark.parametrize(
    "settings",
    [
        OptimizerSettings("sgd", lr=0.1),
        OptimizerSettings("sgd", lr=0.1, momentum=0.9, weight_decay=0.1),
        OptimizerSettings("sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
        OptimizerSettings("adamw", lr=0.05, weight_decay=0.1),
        OptimizerSettings(
            "adamw",
            lr=0.05,
            beta1=0.8,
            beta2=0.99,
            eps=1e-6,
            weight_decay=0.2,
            schedule="cosine",
            warmup_steps=2,
            total_steps=6,
            min_lr=0.005,
        ),
    ],
    ids=["sgd", "sgd-momentum-wd", "sgd-nesterov-wd", "adamw-wd", "adamw-cosine-warmup"],
)
def test_sharded_steps_match_torch_on_full_tensors(settings):
    init = random_params(0)
    grads = [random_params(100 + i) for i in range(STEPS)]

    expected = reference_run(settings, init, grads)
    got = sharded_run(settings, init, grads)

    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
        assert not torch.equal(got[name], init[name]), f"{name} never moved"


def test_lr_warmup_then_constant():
    s = OptimizerSettings("sgd", lr=0.4, warmup_steps=4)
    assert [lr_at(s, i) for i in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert lr_at(s, 10**6) == pytest.approx(0.4)
    assert lr_at(OptimizerSettings("sgd", lr=0.4), 0) == 0.4


def test_lr_cosine_endpoints_and_floor():
    s = OptimizerSettings(
        "adamw", lr=1.0, schedule="cosine", warmup_steps=2, total_steps=12, min_lr=0.1
    )
    assert lr_at(s, 0) == pytest.approx(0.5)
    assert lr_at(s, 2) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_at(s, 7) == pytest.approx(0.55)  # halfway: the mean of lr and min_lr
    assert lr_at(s, 11) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at(s, 12) == pytest.approx(0.1)
    assert lr_at(s, 1000) == pytest.approx(0.1)
    decay = [lr_at(s, i) for i in range(2, 13)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_lr_cosine_without_warmup_and_warmup_longer_than_job():
    s = OptimizerSettings("sgd", lr=2.0, schedule="cosine", total_steps=4)
    assert [lr_at(s, i) for i in range(5)] == pytest.approx(
        [2.0, 1.0 + math.cos(math.pi / 4), 1.0, 1.0 - math.cos(math.pi / 4), 0.0]
    )
    long = OptimizerSettings("sgd", lr=1.0, schedule="cosine", warmup_steps=10, total_steps=5)
    assert lr_at(long, 7) == pytest.approx(0.8)
    assert lr_at(long, 10) == 0.0
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(s, -1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "adam"}, "unknown optimizer kind 'adam'"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"lr": math.nan}, "lr must be finite"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"momentum": -0.1}, "momentum must be in"),
        ({"nesterov": True}, "nesterov needs momentum"),
        ({"kind": "adamw", "momentum": 0.9}, "SGD settings"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"beta1": 1.0}, "beta1 must be in"),
        ({"beta2": -0.5}, "beta2 must be in"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"schedule": "linear"}, "unknown lr schedule"),
        ({"schedule": "cosine"}, "cosine schedule needs total_steps"),
        ({"warmup_steps": -1}, "must be >= 0"),
        ({"min_lr": 0.5}, "min_lr must be in"),
    ],
)
def test_settings_reject_invalid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSettings(**{"kind": "sgd", "lr": 0.1, **kwargs})


def small_optimizer(settings: OptimizerSettings) -> ShardOptimizer:
    return ShardOptimizer(
        {"w#0": torch.randn(6), "w#1": torch.randn(5), "b#0": torch.randn(3)},
        decay={"w#0": True, "w#1": True, "b#0": False},
        settings=settings,
    )


def grads_for(opt: ShardOptimizer, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {sid: torch.randn(v.shape, generator=gen) for sid, v in opt.values.items()}


@pytest.mark.parametrize(
    "bad",
    [
        lambda g: {k: v for k, v in g.items() if k != "b#0"},
        lambda g: {**g, "x#0": torch.zeros(3)},
        lambda g: {**g, "w#1": torch.zeros(4)},
        lambda g: {**g, "w#1": torch.zeros(5, dtype=torch.int64)},
    ],
    ids=["missing", "extra", "wrong-size", "integer"],
)
def test_bad_gradients_raise_and_change_nothing(bad):
    opt = small_optimizer(OptimizerSettings("adamw", lr=0.1, weight_decay=0.1))
    opt.step(grads_for(opt, 1), step=0)
    before = {k: v.clone() for k, v in opt.values.items()}
    state = opt.state_dict()

    with pytest.raises(ValueError, match="gradient"):
        opt.step(bad(grads_for(opt, 2)), step=1)

    for k, v in opt.values.items():
        assert torch.equal(v, before[k])
    for sid, st in opt.state_dict().items():
        for key, v in st.items():
            assert torch.equal(v, state[sid][key])


def test_state_dict_round_trip_continues_identically():
    settings = OptimizerSettings("adamw", lr=0.05, weight_decay=0.1)
    a = small_optimizer(settings)
    for i in range(2):
        a.step(grads_for(a, i), step=i)
    b = ShardOptimizer(a.values, decay={"w#0": True, "w#1": True, "b#0": False}, settings=settings)
    b.load_state_dict(a.state_dict())
    fresh = ShardOptimizer(
        a.values, decay={"w#0": True, "w#1": True, "b#0": False}, settings=settings
    )

    for i in range(2, 4):
        for opt in (a, b, fresh):
            opt.step(grads_for(a, i), step=i)

    for sid in a.values:
        torch.testing.assert_close(b.values[sid], a.values[sid], rtol=0, atol=0)
    # The restored moments matter: without them the trajectory differs.
    assert not torch.equal(fresh.values["w#0"], a.values["w#0"])


def test_load_state_dict_rejects_partial_or_misshaped_state():
    settings = OptimizerSettings("sgd", lr=0.1, momentum=0.9)
    opt = small_optimizer(settings)
    opt.step(grads_for(opt, 0), step=0)
    state = opt.state_dict()

    with pytest.raises(ValueError, match=r"missing \['b#0'\]"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "b#0"})
    with pytest.raises(ValueError, match="has shape"):
        opt.load_state_dict({**state, "b#0": {"momentum_buffer": torch.zeros(4)}})
    opt.load_state_dict({})  # empty = fresh state, as before the first step
    assert opt.state_bytes() == 0


def test_state_bytes_per_optimizer():
    sgd = small_optimizer(OptimizerSettings("sgd", lr=0.1))
    momentum = small_optimizer(OptimizerSettings("sgd", lr=0.1, momentum=0.9))
    adamw = small_optimizer(OptimizerSettings("adamw", lr=0.1))
    assert adamw.state_bytes() == 0
    for opt in (sgd, momentum, adamw):
        opt.step(grads_for(opt, 0), step=0)

    assert sgd.state_bytes() == 0
    assert momentum.state_bytes() == 14 * 4  # one buffer per element
    # Two moments + a step counter per shard; the fused kernel's moments are held at the
    # padded size (each of the 3 shards padded to FUSED_ALIGN elements): what is in memory.
    assert adamw.state_bytes() == 2 * 3 * FUSED_ALIGN * 4 + 3 * 4
    assert adamw.state_dict()["w#1"]["exp_avg"].shape == (5,)  # saved at the shard's size


def test_optimizer_owns_copies_of_its_shards():
    given = {"w#0": torch.ones(4)}
    opt = ShardOptimizer(given, decay={"w#0": False}, settings=OptimizerSettings("sgd", lr=0.5))
    opt.step({"w#0": torch.ones(4)}, step=0)

    assert torch.equal(given["w#0"], torch.ones(4))
    assert torch.equal(opt.values["w#0"], torch.full((4,), 0.5))


@pytest.mark.parametrize(
    ("shards", "decay", "match"),
    [
        ({"w#0": torch.zeros(4)}, {}, r"decay flags: missing \['w#0'\]"),
        ({"w#0": torch.zeros(2, 2)}, {"w#0": True}, "1-D float32"),
        ({"w#0": torch.zeros(4, dtype=torch.float64)}, {"w#0": True}, "1-D float32"),
    ],
)
def test_constructor_rejects_bad_shards(shards, decay, match):
    with pytest.raises(ValueError, match=match):
        ShardOptimizer(shards, decay=decay, settings=OptimizerSettings("sgd", lr=0.1))


# -- the registries: one table per fact ------------------------------------------------------


def test_registries_name_what_the_literals_name():
    assert set(get_args(OptimizerKind)) == set(OPTIMIZERS) == set(KINDS)
    assert set(get_args(ScheduleName)) == set(SCHEDULES) == set(SCHEDULE_NAMES)
    for rule in OPTIMIZERS.values():
        for name in (*rule.takes, *rule.refuses):
            assert name in DEFAULTS, name


def test_registry_builds_the_torch_rule_with_its_kernels():
    # SGD: the single-tensor loop; AdamW: the fused kernel (over padded shards).
    expected: dict[OptimizerKind, tuple[type, str]] = {
        "sgd": (torch.optim.SGD, "foreach"),
        "adamw": (torch.optim.AdamW, "fused"),
    }
    assert set(expected) == set(OPTIMIZERS)
    for kind, (cls, flag) in expected.items():
        opt = small_optimizer(OptimizerSettings(kind, lr=0.1))
        assert type(opt._optimizer) is cls
        want = flag == "fused"
        assert all(bool(group[flag]) is want for group in opt._optimizer.param_groups)


def _cut_run(cuts: list[int], x: torch.Tensor, steps: int, settings: OptimizerSettings):
    """`x` cut at `cuts` into shards on one ShardOptimizer; `steps` seeded steps -> the
    whole tensor and the state, reassembled."""
    bounds = [0, *cuts, x.numel()]
    ids = [f"x#{i}" for i in range(len(bounds) - 1)]
    opt = ShardOptimizer(
        {sid: x[a:b] for sid, a, b in zip(ids, bounds, bounds[1:], strict=False)},
        decay=dict.fromkeys(ids, True),
        settings=settings,
    )
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        g = torch.randn(x.numel(), generator=gen)
        opt.step({sid: g[a:b] for sid, a, b in zip(ids, bounds, bounds[1:], strict=False)}, step)
    state = opt.state_dict()
    moments = torch.cat([state[sid]["exp_avg_sq"] for sid in ids])
    return torch.cat([opt.values[sid] for sid in ids]), moments


def test_fused_adamw_does_not_depend_on_where_a_parameter_was_cut():
    # The fused kernel's scalar tail rounds differently from its vector lanes: unpadded,
    # a cut 3 elements in changes 3 results (measured); padded shards never do, which is
    # what keeps resume onto another number of servers bit-exact.
    settings = OptimizerSettings("adamw", lr=1e-2, weight_decay=0.1).resolve(0)
    x = torch.randn(3001, generator=torch.Generator().manual_seed(3)) * 0.02
    whole, whole_m = _cut_run([], x, 12, settings)
    for cuts in ([3], [17], [1, 2, 3], [64, 1500], [2999]):
        values, moments = _cut_run(cuts, x, 12, settings)
        assert torch.equal(values, whole), cuts
        assert torch.equal(moments, whole_m), cuts
    # And it is AdamW: torch's single-tensor loop on the whole tensor agrees to rounding.
    ref = torch.nn.Parameter(x.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    gen = torch.Generator().manual_seed(7)
    for _ in range(12):
        ref.grad = torch.randn(x.numel(), generator=gen)
        opt.step()
    torch.testing.assert_close(whole, ref.detach(), rtol=1e-5, atol=1e-7)


def test_padded_state_round_trips_through_state_dict():
    settings = OptimizerSettings("adamw", lr=1e-2).resolve(0)
    a = small_optimizer(settings)
    a.step(grads_for(a, 0), 0)
    b = small_optimizer(settings)
    b.assign(a.values)
    b.load_state_dict(a.state_dict())
    for opt in (a, b):
        opt.step(grads_for(opt, 1), 1)
    for sid in a.values:
        assert torch.equal(a.values[sid], b.values[sid])
        assert a.values[sid].shape == (a.state_dict()[sid]["exp_avg"].numel(),)


def test_every_registry_name_has_its_proto_enum_value_and_back():
    for kind in OPTIMIZERS:
        s = OptimizerSettings(kind, lr=0.1)
        m = codec.optimizer_to_proto(s)
        assert job_pb2.OptimizerKind.Name(m.kind) == kind.upper()
        assert codec.optimizer_from_proto(m) == s
    for name in SCHEDULES:
        s = OptimizerSettings("sgd", lr=0.1, schedule=name, total_steps=10)
        m = codec.optimizer_to_proto(s)
        assert job_pb2.LrSchedule.Name(m.schedule) == name.upper()
        assert codec.optimizer_from_proto(m) == s
    # And no enum value is left without a rule (UNSPECIFIED aside).
    assert {v.name.lower() for v in job_pb2.OptimizerKind.DESCRIPTOR.values} - set(OPTIMIZERS) == {
        "optimizer_unspecified"
    }
    assert {v.name.lower() for v in job_pb2.LrSchedule.DESCRIPTOR.values} - set(SCHEDULES) == {
        "lr_schedule_unspecified"
    }


def test_wire_zeros_mean_the_defaults():
    m = job_pb2.OptimizerConfig(kind=job_pb2.ADAMW, lr=0.1)
    s = codec.optimizer_from_proto(m)
    assert (s.beta1, s.beta2, s.eps, s.schedule) == (0.9, 0.95, 1e-8, "constant")
    with pytest.raises(ValueError, match="optimizer kind must be SGD or ADAMW"):
        codec.optimizer_from_proto(job_pb2.OptimizerConfig(lr=0.1))


def test_a_request_may_leave_the_cosine_horizon_open_but_a_server_may_not():
    request = OptimizerRequest("adamw", lr=0.1, schedule="cosine")
    m = codec.optimizer_to_proto(request)
    assert m.total_steps == 0
    assert codec.optimizer_request_from_proto(m) == request
    with pytest.raises(ValueError, match="cosine schedule needs total_steps"):
        codec.optimizer_from_proto(m)  # what a parameter server's Load does
    resolved = request.resolve(40)
    assert type(resolved) is OptimizerSettings
    assert resolved == OptimizerSettings("adamw", lr=0.1, schedule="cosine", total_steps=40)
    assert request.resolve(40).resolve(7).total_steps == 40  # a set count stays
    with pytest.raises(ValueError, match="still open"):
        lr_at(cast(OptimizerSettings, request), 0)
    # Everything but the horizon is checked in a request too.
    with pytest.raises(ValueError, match="SGD settings"):
        OptimizerRequest("adamw", lr=0.1, momentum=0.9)
